"""`make run`: the bundled fake provider and the sidecar on examples/config.yaml, one process.

No provider account is needed: the example config's default model, gpt-realtime-whisper, points at the
fake provider (`ws://127.0.0.1:18787`), and so do its gpt-live-1 (GPT-Live, `/v1/live/sessions`) and
gpt-realtime-translate (realtime translation, `/v1/realtime/translations`): the fake speaks all three
protocols (fake_provider.py, fake_live.py, fake_translation.py), so `sidecar smoke gpt-live-1` on
examples/config.yaml checks one while `make run` is up. `FAKE_PROVIDER_PORT` moves the fake provider (the
config's address is rewritten to match) and `SIDECAR_HOST` / `SIDECAR_PORT` move the sidecar. A port already
taken is one clear line and exit status 2. Stop with Ctrl-C.

WebRTC calls (`POST /v1/realtime/calls`) of gpt-realtime-whisper go to a second fake, the fake WebRTC
provider (fake_calls.py, on a free port) whose media side is a real WebRTC peer (rtc_peer.py): `make run`
serves the model with one more deployment pointing there, after the example's own. The WebSocket fake
answers a call's create 404, so a call fails over to it, while WebSocket sessions never reach it. With
`SIDECAR_CAPTIONS_PAGE=1 SIDECAR_CAPTIONS_KEY=sk-sidecar-master-example`, the captions page captions over
WebRTC at http://127.0.0.1:8787/captions/?transport=webrtc (docs/browser.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sidecar.app import create_app
from sidecar.catalog import build_catalog, load_price_map
from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.logs import configure_logging
from sidecar.server import DrainingServer, config_for
from sidecar.testing.fake_calls import FakeCallProvider
from sidecar.testing.fake_provider import FakeProvider
from sidecar.testing.rtc_peer import RtcPeer

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"
#: Where examples/config.yaml expects the fake provider (not 9100: that is node_exporter's).
DEFAULT_FAKE_PORT = 18787
FAKE_URL = f"ws://127.0.0.1:{DEFAULT_FAKE_PORT}"
FAKE_KEY = "sk-fake-provider-key"
#: What the fake provider serves (OpenAI's paths; the Azure forms too, under /openai/v1).
FAKE_ROUTES = ("/v1/realtime", "/v1/live/sessions", "/v1/realtime/translations")
#: The model whose WebRTC calls `make run` serves (with the fake WebRTC provider's deployment).
WEBRTC_MODEL = "gpt-realtime-whisper"


class PortTaken(ConfigError):
    """A port `make run` needs is in use."""


def fake_port(environ: Mapping[str, str]) -> int:
    """FAKE_PROVIDER_PORT, else 18787. Raises ConfigError unless a port number."""
    raw = environ.get("FAKE_PROVIDER_PORT", "") or str(DEFAULT_FAKE_PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"FAKE_PROVIDER_PORT must be a port number, got {raw!r}")
    return int(raw)


def with_webrtc(config: dict[str, Any], calls_url: str) -> dict[str, Any]:
    """`config` with one more WEBRTC_MODEL deployment, last: the fake WebRTC provider at `calls_url`."""
    entry = {
        "model_name": WEBRTC_MODEL,
        "litellm_params": {"model": f"openai/{WEBRTC_MODEL}", "api_base": calls_url, "api_key": FAKE_KEY},
    }
    return {**config, "model_list": [*config.get("model_list", []), entry]}


def listen(host: str, port: int, what: str, variable: str) -> socket.socket:
    """A listening socket, or PortTaken naming the variable that moves it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortTaken(f"port {port} ({what}) is already in use; set {variable} to another port") from exc
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from exc
    sock.listen(512)
    return sock


async def run(environ: Mapping[str, str]) -> None:
    """Serve until interrupted. Raises ConfigError (PortTaken) before serving anything."""
    env = {"SIDECAR_LITELLM_CONFIG": str(EXAMPLE_CONFIG), **environ}
    settings = Settings.from_env(env)
    port = fake_port(environ)
    text = settings.litellm_config.read_text(encoding="utf-8").replace(FAKE_URL, f"ws://127.0.0.1:{port}")
    litellm_config = yaml.safe_load(text)
    build_catalog(litellm_config, price_map=load_price_map(), environ=env)  # a config error stops here
    provider_socket = listen("127.0.0.1", port, "the fake provider", "FAKE_PROVIDER_PORT")
    provider_socket.close()  # checked: FakeProvider binds it itself
    sidecar_socket = listen(settings.host, settings.port, "the sidecar", "SIDECAR_PORT")
    configure_logging()
    for chatty in ("aioice", "aiortc"):  # every ICE check at info level would drown the sidecar's own lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    peer = RtcPeer()
    with contextlib.closing(sidecar_socket):
        async with (
            FakeProvider(port=port, api_key=FAKE_KEY) as provider,
            FakeCallProvider(api_key=FAKE_KEY, answerer=peer) as calls,
        ):
            served = with_webrtc(litellm_config, calls.url)
            catalog = build_catalog(served, price_map=load_price_map(), environ=env)
            print(f"fake provider on {provider.url} ({', '.join(FAKE_ROUTES)})", flush=True)
            print(
                f"fake WebRTC provider on {calls.url} ({WEBRTC_MODEL}'s calls; media: a real WebRTC peer)", flush=True
            )
            print(
                f"sidecar on ws://{settings.host}:{settings.port}/v1/realtime (master key in {EXAMPLE_CONFIG.name})",
                flush=True,
            )
            app = create_app(settings, catalog=catalog)
            config = config_for(app, host=settings.host, port=settings.port, max_frame_bytes=settings.max_frame_bytes)
            server = DrainingServer(config, app=app, grace_s=settings.drain_grace_s)
            try:
                await server.serve(sockets=[sidecar_socket])
            finally:
                await peer.aclose()


def main() -> None:
    """`make run`."""
    try:
        asyncio.run(run(os.environ))
    except ConfigError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
