"""`make run`: the bundled fake provider on :9100 and the sidecar on examples/config.yaml, one process.

No provider account is needed: the example config's default model, gpt-realtime-whisper, points at the
fake provider. Stop with Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import uvicorn

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.logs import configure_logging
from sidecar.testing.fake_provider import FakeProvider

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"
FAKE_PORT = 9100
FAKE_KEY = "sk-fake-provider-key"


async def run() -> None:
    """Serve until interrupted."""
    env = {"SIDECAR_LITELLM_CONFIG": str(EXAMPLE_CONFIG), **os.environ}
    settings = Settings.from_env(env)
    configure_logging()
    async with FakeProvider(port=FAKE_PORT, api_key=FAKE_KEY) as provider:
        print(f"fake provider on {provider.url}")
        print(f"sidecar on ws://{settings.host}:{settings.port}/v1/realtime (master key in {EXAMPLE_CONFIG.name})")
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            ws="websockets-sansio",
            ws_max_size=settings.max_frame_bytes,
            ws_per_message_deflate=False,
            log_config=None,
        )
        await uvicorn.Server(config).serve()


if __name__ == "__main__":
    asyncio.run(run())
