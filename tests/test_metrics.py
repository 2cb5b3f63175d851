"""GET /metrics: per-model accrual at checkpoints, refusals by model, counters, build info, Redis health."""

from __future__ import annotations

import asyncio
import logging
import platform
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.auth import KeyChecker, Principal
from sidecar.control import ControlError, MemoryStore, Supervisor
from sidecar.metrics import Metrics
from tests.relay_stack import MASTER_KEY, USER_KEY, stack
from tests.support import chunks

MODEL = "gpt-realtime-whisper"
URL = f"/v1/realtime?model={MODEL}&intent=transcription"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in an exposition text, or None when it is not there."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


async def test_audio_and_cost_accrue_at_checkpoints_and_end_at_the_billed_figures(
    tmp_path: Path, speech_pcm16: bytes
) -> None:
    """Audio seconds and cost show by model at a live session's checkpoints and end equal to the billed row."""
    parts = list(chunks(speech_pcm16))
    async with stack(tmp_path, checkpoint_s=0.25) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        ws = await connect(f"{s.sidecar.ws}{URL}", additional_headers={"Authorization": f"Bearer {USER_KEY}"})
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        supervisor = s.sidecar.app.state.services.supervisor
        for part in parts[:5]:
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": part}).decode())
        async with asyncio.timeout(10):
            while sample((await http.get("/metrics")).text, "sidecar_audio_seconds_total", model=MODEL) != 0.5:
                await supervisor.next_poll()
        text = (await http.get("/metrics")).text
        assert len(supervisor.live) == 1  # still live: accrued at a checkpoint, not at the end
        assert (sample(text, "sidecar_cost_usd_total", model=MODEL) or 0) > 0
        for part in parts[5:12]:
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": part}).decode())
        await ws.close()
        row = await s.final_row()
        text = (await http.get("/metrics")).text
    assert row.audio_seconds == Decimal("1.2")
    assert sample(text, "sidecar_audio_seconds_total", model=MODEL) == float(row.audio_seconds)
    assert sample(text, "sidecar_cost_usd_total", model=MODEL) == float(row.cost_usd)
    assert sample(text, "sidecar_sessions_total", close_reason="client_close", model=MODEL) == 1.0


async def test_refusals_carry_a_model_of_the_config_and_never_a_made_up_one(tmp_path: Path) -> None:
    """A refused session is counted with its model when the config has it, and with "" for any other name."""
    async with stack(tmp_path) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        for key, model in (("sk-unknown", "gpt-realtime"), (USER_KEY, "made-up-model-123")):
            url = f"{s.sidecar.ws}/v1/realtime?model={model}"
            with pytest.raises(InvalidStatus):
                await connect(url, additional_headers={"Authorization": f"Bearer {key}"})
        text = (await http.get("/metrics")).text
    assert sample(text, "sidecar_refusals_total", code="invalid_api_key", model="gpt-realtime") == 1.0
    assert sample(text, "sidecar_refusals_total", code="model_not_found", model="") == 1.0
    assert "made-up-model-123" not in text


def test_publish_failures_are_a_counter_fed_by_the_publisher_s_count() -> None:
    """The publisher's cumulative failure count is exposed as sidecar_usage_publish_failures_total, a counter."""
    failures = 3
    metrics = Metrics()
    metrics.watch(live=lambda: 2, failures=lambda: failures, spool=lambda: 7)
    text = metrics.render().decode()
    assert "# TYPE sidecar_usage_publish_failures_total counter" in text
    assert sample(text, "sidecar_usage_publish_failures_total") == 3.0
    failures = 5
    text = metrics.render().decode()
    assert sample(text, "sidecar_usage_publish_failures_total") == 5.0
    assert sample(text, "sidecar_live_sessions") == 2.0
    assert sample(text, "sidecar_usage_spool_depth") == 7.0


def test_build_info_and_the_process_and_gc_collectors() -> None:
    """sidecar_build_info names the package version and Python; process and GC figures are exposed."""
    text = Metrics().render().decode()
    info = {"version": version("realtime-sidecar"), "python": platform.python_version()}
    assert sample(text, "sidecar_build_info", **info) == 1.0
    assert (sample(text, "process_resident_memory_bytes") or 0) > 0
    assert sample(text, "process_cpu_seconds_total") is not None
    assert sample(text, "python_gc_collections_total", generation="0") is not None


class FlakyStore(MemoryStore):
    """A MemoryStore whose Redis can be switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def acquire(self, key_hash: str, session_id: str, *, limit: int, now: float) -> bool:
        if self.down:
            raise ControlError("control store unreachable (ConnectionError)")
        return await super().acquire(key_hash, session_id, limit=limit, now=now)

    async def ping(self) -> bool:
        return not self.down


async def test_a_redis_outage_is_one_warning_a_gauge_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis outage: admissions go ahead and are counted, one warning per outage, sidecar_redis_up follows."""
    store = FlakyStore()
    metrics = Metrics()
    supervisor = Supervisor(
        store=store,
        checker=KeyChecker(master_key=MASTER_KEY, client=None),
        metrics=metrics,
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=100,
        max_sessions_per_key=100,
    )
    principal = Principal(key_hash="h" * 64)
    caplog.set_level(logging.INFO, logger="sidecar.control")

    def warnings() -> int:
        return sum(r.levelno == logging.WARNING and "Redis unreachable" in r.message for r in caplog.records)

    store.down = True
    for n in range(3):
        await supervisor.admit(principal, f"rs_{n}")
    await supervisor.beat()
    text = metrics.render().decode()
    assert sample(text, "sidecar_redis_up") == 0.0
    assert sample(text, "sidecar_redis_errors_total", operation="admission") == 3.0
    assert sample(text, "sidecar_redis_errors_total", operation="heartbeat") == 1.0
    assert warnings() == 1
    store.down = False
    await supervisor.beat()
    assert sample(metrics.render().decode(), "sidecar_redis_up") == 1.0
    assert [r.message for r in caplog.records if r.levelno == logging.INFO] == ["Redis reachable again"]
    store.down = True
    await supervisor.admit(principal, "rs_9")
    assert warnings() == 2
