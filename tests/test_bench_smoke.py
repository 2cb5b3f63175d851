"""`make bench` in miniature: the benchmark runs end to end and its JSON says the relay relayed.

Runs `python -m bench.run --levels 1 --duration 3 --targets sidecar,direct,nginx --bursts 2 --bursts-level 1`
as a subprocess (it
starts the benchmark provider, `sidecar serve` in Redis mode on the local Redis, a real nginx (installed by
`.ci/run`) and the load generator) into a
temporary output directory. No timing is asserted: only that both targets produced round trips and no
errors, and that the outputs exist.
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

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _run_bench(out: Path) -> subprocess.CompletedProcess[str]:
    """The smoke run, stopped with SIGTERM (which makes it stop its own subprocesses) if it overruns."""
    command = [sys.executable, "-m", "bench.run", "--levels", "1", "--duration", "3"]
    command += ["--targets", "sidecar,direct,nginx", "--bursts", "2", "--bursts-level", "1", "--out", str(out)]
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
