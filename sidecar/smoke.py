"""`sidecar smoke MODEL`: can the sidecar reach this model's deployments right now? (docs/api.md, "The CLI")

Every deployment of MODEL is tried in config order (the relay's failover order), each reported on its own
line, including those after one that works (so a broken fallback shows), on every route that serves MODEL
(catalog `routes_of`: /v1/realtime, /v1/live/sessions, /v1/realtime/translations), one header and one
summary per route. One attempt does what a relayed session does first:

1. opens the upstream WebSocket with the relay's URL and headers for the route (`upstream.route_target`;
   for an Azure transcription deployment, after the relay's client-secret exchange, sidecar/azure_auth.py);
2. waits for the first server event (normally `session.created`);
3. when the URL carries no model (`Target.inject_model`), sends the relay's model `session.update`;
4. appends 100 ms of silence (24 kHz PCM16, the session default) and commits it;
5. waits for the upstream's answer: the first server event after the audio that is not `session.updated`
   (normally `input_audio_buffer.committed`; a transcription server says nothing before a commit, which is
   why the commit is sent).

On the other two routes steps 2-5 are what their protocol needs before the first server event:

- GPT-Live: sends `session.start` naming the deployment's model (as the relay's first message does), waits
  for `session.started` (the server's answer before anything else), then sends `session.close`. It costs
  the provider's price of the session's few seconds (GPT-Live bills session time from `session.started`).
- Realtime translation: waits for `session.created` (the server speaks first; nothing is sent, nothing is
  billed: translation bills input audio).

An attempt succeeds when step 5 gets a non-error event; it fails on the first of: an HTTP refusal of the
upgrade, a DNS, TCP or TLS failure, an `error` event, the upstream closing the connection, or the timeout
(`timeout_s` for the connect, then `timeout_s` again for steps 2-5). Exit status: 0 when at least one
deployment succeeded on every route of the model (the relay would serve it), 1 otherwise, 2 for an unknown or
non-realtime model or an unusable config. A successful /v1/realtime attempt costs the provider's price of
0.1 s of audio. Azure deployments on the deprecated preview URL form get one `warning:` line first.

Output: `ok` / `FAIL` lines naming the deployment's `deployment_id`, provider and upstream host (scheme,
host and port only: no path, no credentials), then one summary line. Never a secret: upstream text (error
messages, refusal bodies, close reasons) is scrubbed like the relay scrubs it for clients
(`session.secrets_of`), and every printed line is scrubbed again of every provider key in the config and
of its master key. Failure reasons are our own words, never a foreign exception's text.

The connect uses the relay's connect options but its own call to websockets (not `upstream.websocket_dialer`,
which flattens failures into one message) so that each failure keeps its kind and phase: DNS, refused, TLS
(including a reset during the TLS handshake), timeout before or after the transport was up, HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException

from sidecar import azure_auth, protocol
from sidecar.catalog import (
    LIVE_ENDPOINT,
    REALTIME_ENDPOINT,
    ROUTES,
    TRANSLATION_ENDPOINT,
    Catalog,
    Deployment,
    RealtimeModel,
    Route,
)
from sidecar.config import Settings
from sidecar.errors import SidecarError, UpstreamError
from sidecar.session import REDACTED, secrets_of
from sidecar.upstream import OPENAI_HOSTS, Target, preview_warning, route_target

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
#: 100 ms of silence in the session's default input format, `audio/pcm` 24 kHz 16-bit mono (48000 bytes/s).
SILENCE: Final = b"\x00" * 4800
#: Upstream text (error messages, refusal bodies) is cut to this many characters.
MAX_DETAIL_CHARS: Final = 200
_SESSION_UPDATED: Final = frozenset({"session.updated", "transcription_session.updated"})
_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt. `detail` says what answered and when, or why it failed (no secrets)."""

    deployment: Deployment
    #: `scheme://host[:port]` dialled (host_label): the operator's own config, never a credential.
    upstream: str
    ok: bool
    detail: str
    answer_ms: float | None = None


@dataclass(slots=True)
class _Progress:
    """How far a connect got, so a failure can be told apart by phase."""

    #: The transport is up: TCP connected and, for wss://, the TLS handshake done.
    transport_up: bool = False


# --- failure reasons (pure) ---------------------------------------------------------------------------


def host_label(url: str) -> str:
    """`scheme://host[:port]` of an upstream URL: no credentials, path or query."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port: the connect fails with InvalidURI, the label just omits it
        port = ""
    return f"{parts.scheme}://{parts.hostname}{port}" if parts.scheme and parts.hostname else "no host"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by `[redacted]` (longest first, so no fragment survives)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        yield current
        current = current.__cause__ or current.__context__


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of `kind` in `exc`'s chain."""
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _short(text: str, secrets: Iterable[str]) -> str:
    text = scrub(" ".join(text.split()), secrets)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def _error_body(body: bytes | None) -> tuple[str, str]:
    """(code, message) of an OpenAI-shaped `{"error": {...}}` body; empty strings when it is not one."""
    try:
        data = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return "", ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", ""
    code, message = error.get("code"), error.get("message")
    return ("" if code is None else str(code)), ("" if message is None else str(message))


def status_reason(status: int, body: bytes | None, *, secrets: Iterable[str]) -> str:
    """Why an upstream refused the upgrade with HTTP `status`, with the body's error code and message."""
    code, message = _error_body(body)
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {_short(message, secrets)}" if message else "")
    if status in (401, 403):
        return f"authentication refused ({detail})"
    if status == 404:
        return f"no such endpoint or deployment ({detail}); check api_base, api_version and the model name"
    if status == 429:
        return f"rate limited ({detail})"
    return f"upstream refused the WebSocket upgrade ({detail})"


def connect_reason(
    exc: BaseException, *, url: str, timeout_s: float, transport_up: bool, secrets: Iterable[str]
) -> str:
    """A clear reason for a failed connect, from the exception chain. Pure; never a foreign message."""
    parts = urlsplit(url)
    host, where = parts.hostname or "", host_label(url)
    tls = parts.scheme == "wss"
    if (refused := _find(exc, InvalidStatus)) is not None:
        return status_reason(refused.response.status_code, refused.response.body, secrets=secrets)
    if _find(exc, socket.gaierror) is not None:
        return f"DNS lookup failed for {host}"
    if (cert := _find(exc, ssl.SSLCertVerificationError)) is not None:
        return f"TLS handshake failed with {where}: certificate not trusted ({_ssl_detail(cert)})"
    if (tls_error := _find(exc, ssl.SSLError)) is not None:
        return f"TLS handshake failed with {where} ({_ssl_detail(tls_error)})"
    if _find(exc, ConnectionRefusedError) is not None:
        return f"connection refused by {where}"
    if _find(exc, TimeoutError) is not None:
        phase = "waiting for the WebSocket upgrade response" if transport_up else f"connecting to {where}"
        return f"timed out after {timeout_s:g} s {phase}"
    if _find(exc, ConnectionResetError) or _find(exc, EOFError) or _find(exc, BrokenPipeError):
        if tls and not transport_up:
            return f"TLS handshake failed with {where} (connection closed during the handshake: is it a TLS port?)"
        return f"{where} closed the connection before answering the WebSocket upgrade"
    return _other_reason(exc, where)


def _ssl_detail(exc: ssl.SSLError) -> str:
    """OpenSSL's short reason (`WRONG_VERSION_NUMBER`, `certificate has expired`): set by the ssl module only."""
    detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    return str(detail) if detail else type(exc).__name__


def _other_reason(exc: BaseException, where: str) -> str:
    if _find(exc, InvalidURI) is not None:
        return "invalid upstream URL (check api_base)"
    if (handshake := _find(exc, InvalidHandshake)) is not None:
        return f"WebSocket upgrade with {where} failed ({type(handshake).__name__})"
    if (ws_error := _find(exc, WebSocketException)) is not None:
        return f"WebSocket error with {where} ({type(ws_error).__name__})"
    if (os_error := _find(exc, OSError)) is not None and os_error.errno is not None:
        return f"network error with {where} ({errno.errorcode.get(os_error.errno, str(os_error.errno))})"
    return f"connecting to {where} failed ({type(exc).__name__})"


def closed_reason(exc: ConnectionClosed, *, secrets: Iterable[str]) -> str:
    """Why the session ended early: the upstream's close frame, or none (a dropped connection)."""
    if exc.rcvd is None:
        return "the upstream dropped the connection (no close frame)"
    reason = f": {_short(exc.rcvd.reason, secrets)}" if exc.rcvd.reason else ""
    return f"the upstream closed the session (code {exc.rcvd.code}{reason})"


def error_event_reason(event: dict[str, Any], *, secrets: Iterable[str]) -> str:
    """An upstream `error` event as a reason: its code and scrubbed message."""
    error = event.get("error")
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or error.get("type") or "unknown"
    message = error.get("message")
    return f"error event {code}" + (f": {_short(str(message), secrets)}" if message else "")


# --- one attempt (I/O) --------------------------------------------------------------------------------


def _connection_class(progress: _Progress) -> type[ClientConnection]:
    """A ClientConnection that records when its transport is up (asyncio calls connection_made after TLS)."""

    class _Connection(ClientConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            progress.transport_up = True
            super().connection_made(transport)

    return _Connection


async def _dial(
    tgt: Target,
    headers: tuple[tuple[str, str], ...],
    *,
    timeout_s: float,
    max_frame_bytes: int,
    progress: _Progress,
) -> ClientConnection:
    """Open the upstream WebSocket as the relay's dialer does (upstream.websocket_dialer), keeping the phase."""
    return await connect(
        tgt.url,
        additional_headers=list(headers),
        max_size=max_frame_bytes,
        open_timeout=timeout_s,
        close_timeout=timeout_s,
        ping_interval=None,
        compression=None,
        user_agent_header="realtime-sidecar",
        create_connection=_connection_class(progress),
    )


def model_injection(upstream_model: str) -> str:
    """The relay's session.update naming the transcription model (the shape of `Session.model_injection`)."""
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": upstream_model}}}}
    return protocol.dumps({"type": protocol.SESSION_UPDATE, "event_id": protocol.event_id(), "session": session})


class _Exchange:
    """The event half of one attempt: read events against one deadline, fail on errors. Raises UpstreamError."""

    def __init__(self, connection: ClientConnection, *, timeout_s: float, secrets: tuple[str, ...]) -> None:
        self.connection = connection
        self.timeout_s = timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s  # one deadline for steps 2-5
        self.secrets = secrets

    async def next_event(self, waiting_for: str) -> dict[str, Any]:
        """The next server event; raises UpstreamError on an error event, a close, junk or the deadline."""
        try:
            async with asyncio.timeout_at(self.deadline):
                frame = await self.connection.recv()
        except TimeoutError as exc:
            raise UpstreamError(f"timed out after {self.timeout_s:g} s waiting for {waiting_for}") from exc
        except ConnectionClosed as exc:
            raise UpstreamError(closed_reason(exc, secrets=self.secrets)) from exc
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"the upstream sent a frame that is not JSON while waiting for {waiting_for}") from exc
        if not isinstance(event, dict):
            raise UpstreamError(f"the upstream sent a frame that is not an event while waiting for {waiting_for}")
        if event.get("type") == "error":
            raise UpstreamError(error_event_reason(event, secrets=self.secrets))
        return event

    async def send(self, text: str) -> None:
        """Send one event; raises UpstreamError when the upstream has gone."""
        try:
            await self.connection.send(text)
        except ConnectionClosed as exc:
            raise UpstreamError(closed_reason(exc, secrets=self.secrets)) from exc


async def _converse(exchange: _Exchange, tgt: Target, started: float) -> str:
    """Steps 2-5 of the module docstring. Returns what answered and when; raises UpstreamError."""
    if tgt.route == LIVE_ENDPOINT:
        return await _converse_live(exchange, tgt, started)
    if tgt.route == TRANSLATION_ENDPOINT:
        first = await exchange.next_event("session.created")
        return f"{first.get('type')} after {(time.perf_counter() - started) * 1000:.0f} ms"
    first = await exchange.next_event("session.created")
    first_ms = (time.perf_counter() - started) * 1000
    if tgt.inject_model:
        await exchange.send(model_injection(tgt.deployment.model))
    audio = base64.b64encode(SILENCE).decode()
    await exchange.send(protocol.dumps({"type": protocol.APPEND, "event_id": protocol.event_id(), "audio": audio}))
    await exchange.send(protocol.dumps({"type": "input_audio_buffer.commit", "event_id": protocol.event_id()}))
    answer = await exchange.next_event("an answer to the audio")
    while answer.get("type") in _SESSION_UPDATED:
        answer = await exchange.next_event("an answer to the audio")
    return f"{first.get('type')} after {first_ms:.0f} ms, {answer.get('type')}"


async def _converse_live(exchange: _Exchange, tgt: Target, started: float) -> str:
    """GPT-Live: session.start (the deployment's model, as the relay rewrites it), session.started, then
    session.close so that the provider stops billing session time."""
    start = {"type": "session.start", "event_id": protocol.event_id(), "session": {"model": tgt.deployment.model}}
    await exchange.send(protocol.dumps(start))
    first = await exchange.next_event("session.started")
    first_ms = (time.perf_counter() - started) * 1000
    if first.get("type") != "session.started":
        raise UpstreamError(f"the upstream answered session.start with {str(first.get('type'))[:64]!r}")
    with contextlib.suppress(UpstreamError):  # the answer is in; a close that fails changes nothing
        await exchange.send(protocol.dumps({"type": "session.close", "event_id": protocol.event_id()}))
    return f"session.started after {first_ms:.0f} ms"


async def probe(
    deployment: Deployment,
    *,
    transcription: bool,
    timeout_s: float,
    max_frame_bytes: int,
    secrets: tuple[str, ...],
    route: Route = REALTIME_ENDPOINT,
) -> Outcome:
    """One attempt against one deployment on `route` (module docstring). Never raises a connect failure."""
    tgt = route_target(deployment, route, transcription=transcription, openai_hosts=OPENAI_HOSTS)
    if deployment.provider == "azure" and not deployment.api_base:
        reason = "no api_base configured (Azure needs one: is its os.environ/ variable set?)"
        return Outcome(deployment, host_label(tgt.url), False, reason)
    upstream_secrets = (*secrets_of(deployment), *secrets)
    progress = _Progress()
    started = time.perf_counter()
    headers = tgt.headers
    if tgt.client_secret is not None:  # Azure transcription: the relay's client-secret exchange first
        try:
            secret = await azure_auth.mint(tgt.client_secret, timeout_s=timeout_s)
        except UpstreamError as exc:
            return Outcome(deployment, host_label(tgt.url), False, str(exc))
        headers, upstream_secrets = secret.headers, (secret.value, *upstream_secrets)
    try:
        connection = await _dial(tgt, headers, timeout_s=timeout_s, max_frame_bytes=max_frame_bytes, progress=progress)
    except (OSError, WebSocketException, EOFError) as exc:
        reason = connect_reason(
            exc, url=tgt.url, timeout_s=timeout_s, transport_up=progress.transport_up, secrets=upstream_secrets
        )
        return Outcome(deployment, host_label(tgt.url), False, _with_hint(reason, deployment))
    connect_ms = (time.perf_counter() - started) * 1000
    try:
        exchange = _Exchange(connection, timeout_s=timeout_s, secrets=upstream_secrets)
        timings = await _converse(exchange, tgt, started)
    except UpstreamError as exc:
        return Outcome(deployment, host_label(tgt.url), False, str(exc))
    finally:
        await connection.close()
    answer_ms = (time.perf_counter() - started) * 1000
    detail = f"connected in {connect_ms:.0f} ms, {timings} after {answer_ms:.0f} ms"
    return Outcome(deployment, host_label(tgt.url), True, detail, answer_ms)


def _with_hint(reason: str, deployment: Deployment) -> str:
    if reason.startswith("authentication refused") and not deployment.api_key:
        return reason + "; this deployment has no api_key (is its os.environ/ variable set?)"
    return reason


# --- the command --------------------------------------------------------------------------------------


def catalog_secrets(catalog: Catalog) -> tuple[str, ...]:
    """Every provider key of every deployment on every route, and the master key."""
    models = [m for route in ROUTES for m in catalog.served(route).values()]
    keys = {d.api_key for m in models for d in m.deployments if d.api_key}
    if catalog.master_key:
        keys.add(catalog.master_key)
    return tuple(sorted(keys, key=len, reverse=True))


def format_outcome(outcome: Outcome) -> str:
    """One report line: status, deployment_id, provider, upstream host, detail."""
    d = outcome.deployment
    status = "ok  " if outcome.ok else "FAIL"
    return f"{status} {d.deployment_id} ({d.provider}, {outcome.upstream}): {outcome.detail}"


def format_summary(model: RealtimeModel, outcomes: list[Outcome]) -> str:
    """The last line: which deployment the relay would use, and in how long it answered; or that none did."""
    answered = next((o for o in outcomes if o.ok), None)
    if answered is None:
        return f"{model.name}: FAILED, none of its {len(outcomes)} deployment(s) answered"
    d = answered.deployment
    return f"{model.name}: OK, {d.deployment_id} ({d.provider}) answered in {answered.answer_ms or 0:.0f} ms"


def _load(settings: Settings) -> Catalog:
    """config.yaml's models and, with SIDECAR_LITELLM_DATABASE_URL, LiteLLM's DB-stored ones (as `serve`)."""
    from sidecar.proxy_models import load_catalog

    return load_catalog(settings, environ=dict(os.environ))


async def run_smoke(
    settings: Settings,
    model_name: str,
    *,
    timeout_s: float = 10.0,
    out: Callable[[str], None] = print,
) -> int:
    """Try every deployment of `model_name` on every route that serves it and print a line for each, then a
    summary per route.

    Returns EXIT_OK (0) when one answered on each route, EXIT_FAILED (1) otherwise, EXIT_USAGE (2) for an
    unknown or non-realtime model or an unusable config (printed as `FAIL <model>: <reason>`). Never raises a
    SidecarError; never prints a secret.
    """
    try:
        catalog = _load(settings)
        routes = catalog.routes_of(model_name) or (REALTIME_ENDPOINT,)
        models = [(route, catalog.resolve(model_name, route=route)) for route in routes]
    except SidecarError as exc:
        out(f"FAIL {model_name}: {exc}")
        return EXIT_USAGE
    secrets = catalog_secrets(catalog)

    def say(line: str) -> None:
        out(scrub(line, secrets))

    if (warning := preview_warning([d for _, m in models for d in m.deployments])) is not None:
        say(f"warning: {warning}")

    answered = [
        await _smoke_route(model, route, settings=settings, timeout_s=timeout_s, secrets=secrets, say=say)
        for route, model in models
    ]
    return EXIT_OK if all(answered) else EXIT_FAILED


async def _smoke_route(
    model: RealtimeModel,
    route: Route,
    *,
    settings: Settings,
    timeout_s: float,
    secrets: tuple[str, ...],
    say: Callable[[str], None],
) -> bool:
    """Every deployment of `model` on `route`: a header, a line each, a summary. True when one answered."""
    plural = "s" if len(model.deployments) != 1 else ""
    where = "" if route == REALTIME_ENDPOINT else f" on {route}"
    say(
        f"smoke {model.name} ({model.kind}{where}): {len(model.deployments)} deployment{plural}, "
        f"timeout {timeout_s:g} s"
    )
    outcomes: list[Outcome] = []
    for deployment in model.deployments:
        outcome = await probe(
            deployment,
            transcription=model.kind == "realtime-transcription",
            timeout_s=timeout_s,
            max_frame_bytes=settings.max_frame_bytes,
            secrets=secrets,
            route=route,
        )
        outcomes.append(outcome)
        say(format_outcome(outcome))
    say(format_summary(model, outcomes))
    return any(o.ok for o in outcomes)
