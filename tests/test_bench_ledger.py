"""`make bench-ledger` in miniature: each part runs end to end and checks its own figures.

A few sessions through `bench.ledger`'s throughput run (2 worker processes, one event or a batch a transaction,
with and without the pipeline),
its `sidecar consume --sink litellm` run and its lag run, on clones of the session's LiteLLM template and a
throwaway redis-server (the sidecar's stream name is fixed). No timing is asserted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench import ledger
from tests.billing_support import RedisServer
from tests.conftest import PG_ADMIN_DSN


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A throwaway redis-server for the consumer runs."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(("pipeline", "batch"), [(False, 1), (True, 1), (False, 4), (True, 4)])
def test_throughput_run_applies_every_event_once(litellm_template: str, pipeline: bool, batch: int) -> None:
    """Two workers apply 6 sessions of 2 checkpoints and a final, `batch` events a transaction: 18 events applied,
    the ledger verified."""
    with ledger.database(PG_ADMIN_DSN, template=litellm_template) as dsn:
        run = ledger.run_throughput(dsn, workers=2, sessions_count=6, checkpoints=2, pipeline=pipeline, batch=batch)
    assert (run.events, run.applied, run.skipped, run.verified, run.batch) == (18, 18, 0, True, batch)
    assert f"| apply | 2 | {batch} |" in ledger.throughput_table([run])


async def test_consume_and_lag_runs_see_every_row(
    litellm_template: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real `sidecar consume --sink litellm` applies pre-published events (verified) and concurrent sessions'
    finals (one lag each)."""
    with ledger.database(PG_ADMIN_DSN, template=litellm_template) as dsn:
        run = await ledger.run_consume_throughput(
            dsn, redis_server.url, sessions_count=4, checkpoints=1, log_dir=tmp_path
        )
    assert (run.via, run.events, run.verified) == ("sidecar consume", 8, True)
    with ledger.database(PG_ADMIN_DSN, template=litellm_template) as dsn:
        lag = await ledger.run_lag(
            dsn, redis_server.url, sessions_count=5, checkpoints=1, checkpoint_s=0.05, log_dir=tmp_path, poll_s=0.005
        )
    assert (lag.sessions, lag.events, len(lag.lags_ms)) == (5, 10, 5)
    assert all(ms >= 0 for ms in lag.lags_ms) and lag.warmup_ms >= 0
    assert "| all | 5 | 10 |" in ledger.lag_table([lag])
