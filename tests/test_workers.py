"""`sidecar serve --workers 2`: two processes share the port and the Redis control plane, and both drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import RedisServer, SidecarProcess

MASTER = "sk-workers-master"


async def test_two_workers_share_sessions_registry_and_drain(tmp_path: Path) -> None:
    """Sessions land on both workers (two replicas in /admin/sessions); SIGTERM drains both and exits 0."""
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    async with FakeProvider() as provider:
        config = tmp_path / "config.yaml"
        entry = {"model": "openai/gpt-realtime-whisper", "api_base": provider.url, "api_key": provider.api_key}
        config.write_text(
            yaml.safe_dump(
                {
                    "model_list": [{"model_name": "gpt-realtime-whisper", "litellm_params": entry}],
                    "general_settings": {"master_key": MASTER},
                }
            )
        )
        env = {
            "SIDECAR_LITELLM_CONFIG": str(config),
            "SIDECAR_REDIS_URL": redis.url,
            "SIDECAR_WORKERS": "2",
            "SIDECAR_DRAIN_GRACE_S": "0.5",
            "SIDECAR_SPOOL_DIR": str(tmp_path / "spool"),
        }
        sidecar = SidecarProcess(env, workdir=tmp_path / "run")
        await sidecar.start()
        try:
            # `sidecar serve` re-executed itself (same pid) on the C allocator (sidecar/tuning.py).
            environ = (await asyncio.to_thread(Path(f"/proc/{sidecar.pid}/environ").read_bytes)).split(b"\0")
            assert b"PYTHONMALLOC=malloc" in environ
            url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime?intent=transcription"
            headers = {"Authorization": f"Bearer {MASTER}"}
            sessions: list[ClientConnection] = []
            replicas: set[str] = set()
            async with httpx.AsyncClient(base_url=sidecar.http, headers=headers) as http:
                while len(replicas) < 2 and len(sessions) < 40:
                    ws = await connect(url, additional_headers=headers)
                    assert orjson.loads(await ws.recv())["type"] == "session.created"
                    sessions.append(ws)
                    listed = (await http.get("/admin/sessions")).json()["data"]
                    replicas = {s["replica"] for s in listed}
            assert len(replicas) == 2
            code = await sidecar.terminate()
            for ws in sessions:
                try:
                    while True:
                        await ws.recv()
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1001
            assert code == 0
        finally:
            await sidecar.kill()
            await redis.stop()
