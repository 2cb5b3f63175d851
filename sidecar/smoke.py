"""`sidecar smoke MODEL`: can the sidecar reach this model's deployments right now?

For each deployment in order: open the upstream session (the same URL and headers the relay uses),
wait for its first server event, append 100 ms of silence, and wait for the next event (or none within
the timeout, which is fine: a transcription server says nothing until a commit). Prints which deployment
answered and in how long; never prints a secret. Exit 0 when one deployment works, else 1 with the reason
for each.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable

import orjson

from sidecar.catalog import Deployment, load_catalog
from sidecar.config import Settings
from sidecar.errors import SidecarError, UpstreamError
from sidecar.session import REDACTED, secrets_of
from sidecar.upstream import OPENAI_HOSTS, Dialer, target, websocket_dialer

SILENCE_B64 = base64.b64encode(b"\x00" * 4800).decode()


def _scrub(text: str, deployment: Deployment) -> str:
    for secret in secrets_of(deployment):
        text = text.replace(secret, REDACTED)
    return text


async def check(deployment: Deployment, dial: Dialer, *, transcription: bool, timeout_s: float) -> str:
    """Open one deployment and wait for its first event. Returns that event's type; raises UpstreamError."""
    tgt = target(deployment, transcription=transcription, openai_hosts=OPENAI_HOSTS)
    connection = await dial(tgt)
    try:
        try:
            first = await asyncio.wait_for(connection.recv(), timeout_s)
        except TimeoutError as exc:
            raise UpstreamError("no server event before the timeout") from exc
        event = orjson.loads(first)
        if event.get("type") == "error":
            error = event.get("error") or {}
            raise UpstreamError(f"error event: {error.get('code')}: {error.get('message')}")
        await connection.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": SILENCE_B64}).decode())
        return str(event.get("type"))
    except (ValueError, AttributeError) as exc:
        raise UpstreamError("the first server event is not a JSON object") from exc
    finally:
        await connection.close()


async def run_smoke(
    settings: Settings,
    model_name: str,
    *,
    timeout_s: float = 10.0,
    dial: Dialer | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Check each deployment of `model_name`; 0 when one answers, 1 otherwise, 2 for an unknown model."""
    try:
        catalog = load_catalog(
            settings.litellm_config,
            environ=dict(os.environ),
            default_transcription_model=settings.default_transcription_model,
        )
        model = catalog.resolve(model_name)
    except SidecarError as exc:
        out(f"FAIL {model_name}: {exc}")
        return 2
    dial = dial or websocket_dialer(max_frame_bytes=settings.max_frame_bytes, connect_timeout_s=timeout_s)
    transcription = model.kind == "realtime-transcription"
    for deployment in model.deployments:
        started = time.perf_counter()
        try:
            first = await check(deployment, dial, transcription=transcription, timeout_s=timeout_s)
        except UpstreamError as exc:
            out(f"FAIL {deployment.deployment_id} ({deployment.provider}): {_scrub(str(exc), deployment)}")
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000
        out(f"OK {deployment.deployment_id} ({deployment.provider}) answered {first} in {elapsed_ms:.0f} ms")
        return 0
    return 1
