"""The pure parts of `make chaos` and `make soak` (bench/chaos): the table and its invariants, the flatness verdict,
the provider's per-session tags, the argument parsing of both entry points, and the task gauge the soak reads.
The runs themselves are not part of `make test` (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from bench.chaos import flat, run, soak, tally
from bench.chaos.provider import tag_of
from sidecar.metrics import Metrics
from sidecar.testing.fake_wire import FakeSession, Handshake

REPO = Path(__file__).resolve().parents[1]
SECOND = 48_000  # bytes of 24 kHz PCM16


def figures(tag: str, sent: int, billed: int, *, decoded: int | None = None, rows: int = 1) -> tally.SessionFigures:
    return tally.SessionFigures(tag, sent, sent if decoded is None else decoded, billed, rows)


# ---- tally ------------------------------------------------------------------------------------------


def test_an_exact_row_passes_with_its_totals() -> None:
    """Sessions billed exactly what they sent: sums in seconds, nothing lost or doubled, pass."""
    row = tally.evaluate(
        "redis-kill",
        [figures("a", 3 * SECOND, 3 * SECOND), figures("b", SECOND // 2, SECOND // 2)],
        allowed_lost_s=Decimal(0),
    )
    assert (row.sessions, row.sent_s, row.billed_s, row.lost_s, row.double_s) == (
        2,
        Decimal("3.5"),
        Decimal("3.5"),
        Decimal(0),
        Decimal(0),
    )
    assert row.ok and row.failures == ()


def test_double_billing_fails_whatever_the_allowance() -> None:
    """A session billed more than it sent fails the row even where losses are allowed."""
    row = tally.evaluate("sidecar-kill", [figures("a", SECOND, SECOND + 4800)], allowed_lost_s=Decimal("1.35"))
    assert not row.ok
    assert row.double_s == Decimal("0.1")
    assert "double-billed 0.1" in row.failures[0]


def test_a_loss_within_the_allowance_passes_and_one_beyond_it_fails() -> None:
    """Lost per session is compared with the fault's allowance: 1.3 s passes at 1.35, 1.4 s fails."""
    within = tally.evaluate("k", [figures("a", 5 * SECOND, 5 * SECOND - 62_400)], allowed_lost_s=Decimal("1.35"))
    beyond = tally.evaluate("k", [figures("a", 5 * SECOND, 5 * SECOND - 67_200)], allowed_lost_s=Decimal("1.35"))
    assert within.ok and within.worst_lost_s == Decimal("1.3")
    assert not beyond.ok and "lost 1.4" in beyond.failures[0]


def test_any_loss_fails_a_fault_that_must_lose_nothing() -> None:
    """With no allowance one append (0.1 s) short is a failure, and so is a session without a row."""
    short = tally.evaluate("pg-refuse", [figures("a", SECOND, SECOND - 4800)], allowed_lost_s=Decimal(0))
    missing = tally.evaluate("pg-refuse", [figures("a", SECOND, 0, rows=0)], allowed_lost_s=Decimal(0))
    assert not short.ok
    assert not missing.ok and any("no billing row" in f for f in missing.failures)


def test_audio_the_provider_decoded_unbilled_fails() -> None:
    """The provider decoding more than is billed (beyond the allowance) fails, even when sent looks covered."""
    row = tally.evaluate("x", [figures("a", SECOND, SECOND, decoded=2 * SECOND)], allowed_lost_s=Decimal(0))
    assert not row.ok and "provider decoded 1" in row.failures[0]


def test_two_rows_for_one_client_session_fail() -> None:
    """A client session must map to one sidecar session, one billing row."""
    row = tally.evaluate("x", [figures("a", SECOND, SECOND, rows=2)], allowed_lost_s=Decimal(0))
    assert not row.ok and "2 billing rows" in row.failures[0]


def test_a_row_without_audio_proves_nothing() -> None:
    """No session sent audio: the row fails rather than passing vacuously."""
    assert not tally.evaluate("x", [], allowed_lost_s=Decimal(0)).ok
    assert not tally.evaluate("x", [figures("a", 0, 0, rows=0)], allowed_lost_s=Decimal(0)).ok


def test_the_kill_allowance_is_one_interval_a_poll_and_an_append() -> None:
    """A SIGKILLed sidecar may lose its last checkpoint interval, one supervisor poll and the append in flight."""
    assert tally.allowance_for_kill(Decimal(1)) == Decimal("1.35")
    assert tally.allowance_for_kill(Decimal(5)) == Decimal("5.35")


def test_the_table_shows_passes_failures_and_skipped_rows() -> None:
    """One markdown line per row; a skipped row says why and does not fail the matrix, a failed one does."""
    good = tally.evaluate(
        "redis-kill", [figures("a", SECOND, SECOND)], allowed_lost_s=Decimal(0), note="clients: closed 1"
    )
    bad = tally.evaluate("pg-refuse", [figures("a", SECOND, 0)], allowed_lost_s=Decimal(0))
    skip = tally.skipped("net-loss", "tc qdisc netem: unknown")
    text = tally.table([good, skip])
    lines = text.splitlines()
    assert lines[0] == tally.HEADER and len(lines) == 4
    assert "| redis-kill | 1 | 1.000 | 1.000 | 1.000 | 0.000 (0.000) | 0.000 | 0 | pass | clients: closed 1 |" in text
    assert "| net-loss |" in text and "not run | tc qdisc netem: unknown |" in text
    assert tally.Matrix([good, skip]).exit_status() == 0
    assert tally.Matrix([good, bad, skip]).exit_status() == 1
    assert "FAIL: a: lost 1" in tally.table([bad])


# ---- flatness ---------------------------------------------------------------------------------------


def test_a_noisy_flat_series_is_flat_and_a_climbing_one_is_not() -> None:
    """Noise around a level passes; a steady climb beyond the tolerance over the window fails."""
    noisy = [(float(t), 100.0 + (3 if t % 2 else -3)) for t in range(0, 120)]
    climbing = [(float(t), 100.0 + 0.5 * t) for t in range(0, 120)]
    tolerance = flat.Tolerance(absolute=4, relative=0.1)
    assert flat.verdict("rss", noisy, warmup_s=30, tolerance=tolerance).flat
    judged = flat.verdict("rss", climbing, warmup_s=30, tolerance=tolerance)
    assert not judged.flat
    assert judged.slope_per_min == pytest.approx(30.0)
    assert judged.samples == 90 and judged.low == 115.0 and judged.high == 159.5


def test_the_warm_up_is_not_judged() -> None:
    """A ramp before the warm-up ends does not count against a series flat afterwards."""
    series = [(float(t), (10.0 * t if t < 20 else 200.0)) for t in range(60)]
    assert flat.verdict("fds", series, warmup_s=20, tolerance=flat.Tolerance(10, 0.1)).flat
    assert not flat.verdict("fds", series, warmup_s=0, tolerance=flat.Tolerance(10, 0.1)).flat


def test_growth_that_follows_the_load_is_not_a_leak() -> None:
    """Descriptors that track live sessions (2 per session) while the load rises are flat at equal load; the
    same series with a time trend on top is not."""
    live = [(float(t), 50.0 + t + 10 * ((t * 7) % 11)) for t in range(60)]  # rising, with churn
    tracking = [(t, 20.0 + 2 * n) for t, n in live]
    leaking = [(t, 20.0 + 2 * n + 3 * t) for t, n in live]
    tolerance = flat.Tolerance(absolute=10, relative=0.1)
    assert not flat.verdict("fds", tracking, warmup_s=0, tolerance=tolerance).flat  # judged without the load
    assert flat.verdict("fds", tracking, warmup_s=0, tolerance=tolerance, live=live).flat
    assert not flat.verdict("fds", leaking, warmup_s=0, tolerance=tolerance, live=live).flat


def test_too_few_samples_after_the_warm_up_is_an_error() -> None:
    """The verdict needs at least three samples after the warm-up."""
    with pytest.raises(ValueError, match="2 samples"):
        flat.verdict("tasks", [(0.0, 1.0), (5.0, 1.0), (6.0, 1.0)], warmup_s=4, tolerance=flat.Tolerance(1, 0))


# ---- the provider's tags ----------------------------------------------------------------------------


def test_a_provider_session_is_tagged_by_its_appends_event_ids() -> None:
    """The tag is the part of the first dotted event_id before the dot; none without one."""
    session = FakeSession(handshake=Handshake(path="/v1/realtime", query={}, headers={}))
    session.events.append({"type": "session.update", "event_id": "evt_sidecar"})
    assert tag_of(session) is None
    session.events.append({"type": "input_audio_buffer.append", "event_id": "redis-kill-a3.17"})
    assert tag_of(session) == "redis-kill-a3"


# ---- the entry points -------------------------------------------------------------------------------


def test_chaos_arguments() -> None:
    """--faults picks rows by name (all by default), unknown names and bad numbers exit 2."""
    options = run.parse_args(["--faults", "redis-kill, pg-refuse", "--sessions", "2", "--docs", "no"])
    assert options.faults == ("redis-kill", "pg-refuse") and options.sessions == 2 and not options.docs
    assert options.checkpoint_s == Decimal(1)
    assert set(run.parse_args([]).faults) == set(run.ALL_NAMES)
    for bad in (["--faults", "redis-kil"], ["--sessions", "0"], ["--checkpoint-s", "0"]):
        with pytest.raises(SystemExit) as exited:
            run.parse_args(bad)
        assert exited.value.code == 2


def test_soak_arguments() -> None:
    """Defaults follow the duration (warm-up a quarter, samples every D/120 s within 1..5 s); bad values exit 2."""
    options = soak.parse_args(["--duration-s", "60"])
    assert (options.duration_s, options.warmup_s, options.sample_s, options.concurrency) == (60, 15, 1.0, 200)
    assert options.session_s == (4.0, 16.0) and options.chunk_ms == 500 and options.keys == 0
    assert soak.parse_args(["--keys", "20", "--chunk-ms", "100"]).keys == 20
    assert soak.parse_args([]).sample_s == 5.0
    for bad in (
        ["--session-s", "9:3"],
        ["--session-s", "x"],
        ["--duration-s", "0"],
        ["--duration-s", "60", "--warmup-s", "60"],
    ):
        with pytest.raises(SystemExit) as exited:
            soak.parse_args(bad)
        assert exited.value.code == 2


def test_make_chaos_and_make_soak_run_the_entry_points() -> None:
    """`make -n` shows what the targets run (SOAK_S is the duration); `--list` names every fault and exits 0."""
    dry = subprocess.run(
        ["make", "-n", "chaos", "soak", "SOAK_S=60"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert ".venv/bin/python -m bench.chaos.run" in dry.stdout
    assert ".venv/bin/python -m bench.chaos.soak --duration-s 60" in dry.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "bench.chaos.run", "--list"], cwd=REPO, capture_output=True, text=True
    )
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(run.ALL_NAMES)
    refused = subprocess.run(
        [sys.executable, "-m", "bench.chaos.soak", "--duration-s", "-1"], cwd=REPO, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--duration-s must be positive" in refused.stderr


def test_results_go_between_the_markers_of_docs_reliability(tmp_path: Path) -> None:
    """put_in_docs replaces only what is between a harness's markers; both pairs are in docs/reliability.md."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    for marker in (run.BEGIN, run.END, soak.BEGIN, soak.END):
        assert doc.count(marker) == 1, marker
    page = tmp_path / "page.md"
    page.write_text(f"head\n{run.BEGIN}\nold\n{run.END}\ntail\n")
    run.put_in_docs("new table", run.BEGIN, run.END, page)
    assert page.read_text() == f"head\n{run.BEGIN}\nnew table\n{run.END}\ntail\n"


def test_soak_reads_unlabelled_samples() -> None:
    """The soak's reading of /metrics: the value of an unlabelled sample, None when absent."""
    text = "# HELP sidecar_asyncio_tasks x\nsidecar_asyncio_tasks 42.0\nsidecar_live_sessions_extra 1\n"
    assert soak.metric(text, "sidecar_asyncio_tasks") == 42.0
    assert soak.metric(text, "sidecar_live_sessions") is None
    gc_text = 'python_gc_collections_total{generation="0"} 9.0\npython_gc_collections_total{generation="2"} 3.0\n'
    assert soak.metric(gc_text, "python_gc_collections_total", 'generation="2"') == 3.0


# ---- the gauge the soak reads -----------------------------------------------------------------------


async def test_the_asyncio_tasks_gauge_counts_the_loop_s_tasks() -> None:
    """sidecar_asyncio_tasks follows the tasks alive in the running loop at each scrape."""
    metrics = Metrics()
    before = soak.metric(metrics.render().decode(), "sidecar_asyncio_tasks")
    assert before is not None and before >= 1  # this test's own task
    stop = asyncio.Event()
    extra = [asyncio.create_task(stop.wait()) for _ in range(5)]
    assert soak.metric(metrics.render().decode(), "sidecar_asyncio_tasks") == before + 5
    stop.set()
    await asyncio.gather(*extra)
    assert soak.metric(metrics.render().decode(), "sidecar_asyncio_tasks") == before


def test_a_row_s_evidence_reads_the_metrics_and_the_consumers_logs(tmp_path: Path) -> None:
    """The spool depth and publish failures come from the sidecar's /metrics text; consumer retries are its
    warnings that say they retry, counted over every consumer of the row."""
    text = "sidecar_usage_spool_depth 0.0\nsidecar_usage_publish_failures_total 4.0\n"
    assert run._sample(text, "sidecar_usage_spool_depth") == 0.0
    assert run._publish_failures(text) == 4
    assert run._publish_failures("") == 0
    warning = '{"level":"warning","msg":"billing consumer c: billing write: database failure; retrying in 0.5s"}'
    (tmp_path / "consumer-1.log").write_text(f"{warning}\n{warning}\n" + '{"level":"info","msg":"started"}\n')
    (tmp_path / "consumer-2.log").write_text(warning + "\n")
    (tmp_path / "sidecar-1.log").write_text(warning + "\n")
    assert run._consumer_retries(tmp_path) == 3
