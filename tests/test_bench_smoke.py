"""`make bench` in miniature: the benchmark runs end to end and its JSON says the relay relayed.

Runs `python -m bench.run --levels 1 --duration 3 --targets sidecar,direct,nginx --bursts 2 --bursts-level 1
--surface-level 1 --surface-rounds 1` as a subprocess (it starts the benchmark provider, `sidecar serve` in
Redis mode on the local Redis, a real nginx (installed by `.ci/run`) and the load generator) into a
temporary output directory; the surface round runs the sidecar once more on each route (/v1/realtime,
GPT-Live, translation). No timing is asserted: only that every target and surface produced round trips
and no errors, and that the outputs exist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.run import surface_order

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _run_bench(out: Path) -> subprocess.CompletedProcess[str]:
    """The smoke run, stopped with SIGTERM (which makes it stop its own subprocesses) if it overruns."""
    command = [sys.executable, "-m", "bench.run", "--levels", "1", "--duration", "3"]
    command += ["--targets", "sidecar,direct,nginx", "--bursts", "2", "--bursts-level", "1", "--out", str(out)]
    command += ["--surface-level", "1", "--surface-rounds", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One smoke run shared by the tests of this module (it takes about 20 seconds)."""
    out = tmp_path_factory.mktemp("bench")
    return _run_bench(out), out


def _result(out: Path, target: str) -> dict[str, Any]:
    document = json.loads((out / "latest.json").read_text())
    rows = [r for r in document["results"] if r["target"] == target]
    assert len(rows) == 1, f"expected one {target} result, got {rows}"
    row: dict[str, Any] = rows[0]
    return row


def test_smoke_run_exits_zero(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The smoke benchmark finishes by itself with exit status 0."""
    done, _ = smoke
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("target", ["sidecar", "direct", "nginx"])
def test_target_relayed_round_trips_without_errors(
    smoke: tuple[subprocess.CompletedProcess[str], Path], target: str
) -> None:
    """Each target's one session connected, got replies to its appends, and saw no error at all."""
    done, out = smoke
    row = _result(out, target)
    assert row["errors"] == 0, (row.get("error_detail"), row.get("failure"), done.stderr[-2000:])
    assert row["connected"] == 1
    assert row["rtt_ms"]["count"] > 0
    assert row["appends_in_window"] > 0
    assert row["close_codes"] == {"1000": 1}


def test_sidecar_row_has_relay_figures(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The sidecar row carries the relay's CPU and memory readings and its published usage events."""
    _, out = smoke
    relay = _result(out, "sidecar")["relay"]
    assert relay is not None
    assert relay["rss_start_mb"] > 0
    assert relay["rss_peak_mb"] >= relay["rss_start_mb"]
    assert relay["released_all_sessions"] is True
    assert _result(out, "sidecar")["usage_events_published"] >= 2  # the first checkpoint and the final
    assert 0 <= relay["kernel_us_per_chunk_reply"] <= relay["cpu_us_per_chunk_reply"]
    assert _result(out, "direct")["relay"] is None


def test_repeated_burst_reads_memory_after_each(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """`--bursts 2`: the sidecar level ran twice on one process, RSS read after each, and the goal uses it."""
    _, out = smoke
    relay = _result(out, "sidecar")["relay"]
    assert len(relay["rss_after_bursts_mb"]) == 2
    assert relay["burst_errors"] == 0
    assert relay["released_all_sessions"] is True
    assert "kept_kb_per_session_last_burst" in relay
    assert "rss_after_bursts_mb" not in _result(out, "nginx")["relay"]  # only the sidecar's level repeats
    goals = json.loads((out / "latest.json").read_text())["goals"]
    kept = next(g for g in goals if g["goal"].startswith("nothing kept"))
    assert "2 bursts of 1 on one process" in kept["measured"]


def test_outputs_written(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The run writes latest.json/latest.md and a timestamped copy of each, and prints the table."""
    done, out = smoke
    document = json.loads((out / "latest.json").read_text())
    assert (out / f"{document['timestamp']}.json").exists()
    assert (out / f"{document['timestamp']}.md").exists()
    assert "| sidecar | 1 |" in (out / "latest.md").read_text()
    assert "| direct | 1 |" in done.stdout


# ---- surfaces (issue 15): GPT-Live and translation beside /v1/realtime --------------------------------------


def _surfaces(out: Path) -> dict[str, Any]:
    block: dict[str, Any] = json.loads((out / "latest.json").read_text())["surfaces"]
    return block


@pytest.mark.parametrize("surface", ["realtime", "live", "translation"])
def test_each_surface_relayed_round_trips_without_errors(
    smoke: tuple[subprocess.CompletedProcess[str], Path], surface: str
) -> None:
    """The surface round ran the sidecar on each route: its session connected, every append was answered,
    it closed with 1000, nothing failed, and the sidecar published its usage."""
    done, out = smoke
    rows = [r for r in _surfaces(out)["runs"] if r["surface"] == surface]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["errors"] == 0, (row.get("error_detail"), row.get("failure"), done.stderr[-2000:])
    assert row["target"] == "sidecar" and row["round"] == 1
    assert row["connected"] == 1
    assert row["rtt_ms"]["count"] > 0
    assert row["close_codes"] == {"1000": 1}
    assert row["relay"]["released_all_sessions"] is True
    assert row["usage_events_published"] >= 1


def test_surface_summary_compares_each_new_surface_with_realtime(
    smoke: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """The summary has a row per surface, ratios for the new ones, the table in the markdown and a goal."""
    done, out = smoke
    block = _surfaces(out)
    assert [s["surface"] for s in block["summary"]] == ["realtime", "live", "translation"]
    for item in block["summary"][1:]:
        assert item["runs"] == 1
        assert item["cpu_ratio"] is not None and item["kb_ratio"] is not None
        assert item["pass"] is not None
    assert all(r["target"] == "sidecar" and "surface" not in r for r in _result_rows(out))
    for route in ("`/v1/realtime`", "`/v1/live/sessions`", "`/v1/realtime/translations`"):
        assert route in (out / "latest.md").read_text()
        assert route in done.stdout
    goals = json.loads((out / "latest.json").read_text())["goals"]
    assert any(g["goal"].startswith("GPT-Live and translation within 10 %") for g in goals)


def _result_rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((out / "latest.json").read_text())["results"]
    return [r for r in rows if r["target"] == "sidecar"]


def test_surface_rounds_rotate_the_order() -> None:
    """Each round starts with another surface, so none always runs first or right after the same one."""
    assert surface_order(["live", "translation"], 4) == [
        ["realtime", "live", "translation"],
        ["live", "translation", "realtime"],
        ["translation", "realtime", "live"],
        ["realtime", "live", "translation"],
    ]


def _surface_row(surface: str, cpu: float, kb: float, *, errors: int = 0) -> dict[str, Any]:
    relay = {"cpu_us_per_chunk_reply": cpu, "kernel_us_per_chunk_reply": cpu / 2, "kb_per_session": kb}
    rtt = {"p50": 1.0, "p99": 2.0}
    return {"surface": surface, "errors": errors, "rtt_ms": rtt, "relay": relay | {"rss_start_mb": 50.0}}


def test_surface_verdict_is_the_ratio_of_medians_within_ten_percent() -> None:
    """Medians over the rounds; a new surface passes when CPU and KB are both at most 1.10x realtime's."""
    rows = [
        *(_surface_row("realtime", cpu, 40.0) for cpu in (50.0, 60.0, 55.0)),
        *(_surface_row("live", cpu, 43.0) for cpu in (59.0, 61.0, 60.0)),  # 60 / 55 = 1.09x
        *(_surface_row("translation", cpu, 45.0) for cpu in (50.0, 55.0, 52.0)),  # KB 45 / 40 = 1.125x
    ]
    block = report.surfaces(rows, level=1000, rounds=3)
    assert block is not None
    realtime, live, translation = block["summary"]
    assert realtime["cpu_us_per_chunk_reply"] == {"median": 55.0, "min": 50.0, "max": 60.0, "n": 3}
    assert "pass" not in realtime
    assert (live["cpu_ratio"], live["kb_ratio"], live["pass"]) == (1.091, 1.075, True)
    assert (translation["kb_ratio"], translation["pass"]) == (1.125, False)
    errors = report.surfaces(
        [_surface_row("realtime", 50, 40), _surface_row("live", 50, 40, errors=1)], level=1, rounds=1
    )
    assert errors is not None and errors["summary"][1]["pass"] is False
