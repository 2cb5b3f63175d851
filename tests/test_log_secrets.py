"""No raw key in any log line, whatever the client does (issue 12, item 7): the access line with
`?api_key=`, headers and subprotocols logged at DEBUG, extra fields, exception text, uncaught exceptions,
and the stderr of a real `sidecar serve`."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.logs import UVICORN_LOGGERS, configure_logging
from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import SidecarProcess, serve_env
from tests.relay_stack import MASTER_KEY, USER_KEY, stack

SECRET = "sk-live-abcdef123456"  # key-shaped
PLAIN = "plainsecret123"  # a secret with no recognisable shape: caught by where it stands
PATH = "/v1/realtime?model=gpt-realtime-whisper&intent=transcription"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the process's logging and exception hooks are restored after."""
    root = logging.getLogger()
    uvicorn = [logging.getLogger(name) for name in UVICORN_LOGGERS]
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    saved_uvicorn = [(lg.handlers[:], lg.propagate, lg.level) for lg in uvicorn]
    buffer = io.StringIO()
    configure_logging(stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        sys.excepthook, threading.excepthook = saved[2], saved[3]
        for lg, (handlers, propagate, level) in zip(uvicorn, saved_uvicorn, strict=True):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
        logging.captureWarnings(False)


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    """The JSON lines written so far."""
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("logger", "message", "args", "secret"),
    [
        ("uvicorn.error", '%s - "WebSocket %s" 401', ("127.0.0.1:5", f"/v1/realtime?api_key={SECRET}"), SECRET),
        ("uvicorn.error", '%s - "WebSocket %s" [accepted]', ("127.0.0.1:5", f"/v1/realtime?key={PLAIN}"), PLAIN),
        ("uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", f"/x?token={PLAIN}", "1.1", 200), PLAIN),
        ("uvicorn.error", "< %s: %s", ("authorization", f"Bearer {PLAIN}"), PLAIN),
        ("uvicorn.error", "< %s: %s", ("api-key", "0123456789abcdef0123456789abcdef"), "0123456789abcdef"),
        ("uvicorn.error", "< %s: %s", ("sec-websocket-protocol", f"realtime, openai-insecure-api-key.{PLAIN}"), PLAIN),
        ("websockets.client", "> %s: %s", ("Authorization", f"Bearer {SECRET}"), SECRET),
        ("sidecar.app", "body %s", ('{"api_key": "' + PLAIN + '"}',), PLAIN),
        ("sidecar.app", "cannot reach %s", (f"postgresql://billing:{PLAIN}@db:5432/billing",), PLAIN),
        ("sidecar.app", "secret %s", ("ek_eyJtb2RlbCI6Im0ifQ.c2lnbmF0dXJl",), "eyJtb2RlbCI6Im0ifQ"),
        ("sidecar.app", "a key in a message: %s", (SECRET,), SECRET),
    ],
)
def test_every_key_shape_is_redacted(
    json_log: io.StringIO, logger: str, message: str, args: tuple[object, ...], secret: str
) -> None:
    """A secret in a query string, a header line, a subprotocol, a JSON body, a URL or key-shaped anywhere
    is replaced by [redacted]; the rest of the line stays."""
    logging.getLogger(logger).warning(message, *args)
    [line] = lines(json_log)
    assert secret not in str(line["msg"]) and "[redacted]" in str(line["msg"])
    assert str(line["msg"]).startswith(message.split("%", 1)[0])


def test_extra_fields_and_exception_text_are_redacted_for_every_handler(json_log: io.StringIO) -> None:
    """A key in an `extra` field or in a logged exception's text reaches neither the JSON line nor any
    other handler on the root logger (the filter rewrites the record itself)."""
    other = io.StringIO()
    plain = logging.StreamHandler(other)
    plain.setFormatter(logging.Formatter("%(message)s %(reason)s"))
    logging.getLogger().addHandler(plain)
    try:
        raise ValueError(f"LiteLLM said no to Bearer {PLAIN} and {SECRET}")
    except ValueError:
        logging.getLogger("sidecar.control").exception("lost", extra={"reason": f"key {SECRET}"})
    [line] = lines(json_log)
    assert line["reason"] == "key [redacted]" and line["exc_type"] == "ValueError"
    assert "ValueError" in other.getvalue()  # the traceback was written there, redacted
    for written in (json_log.getvalue(), other.getvalue()):
        assert SECRET not in written and PLAIN not in written


def test_uncaught_exceptions_are_logged_redacted(json_log: io.StringIO) -> None:
    """An uncaught exception, in the main thread or another, is one redacted JSON line, not raw stderr."""
    try:
        raise RuntimeError(f"boom with {SECRET}")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)

    def fail() -> None:
        raise RuntimeError(f"thread boom with Bearer {PLAIN}")

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()
    written = lines(json_log)
    assert [(line["logger"], line["exc_type"]) for line in written] == [("sidecar.uncaught", "RuntimeError")] * 2
    assert "boom with [redacted]" in str(written[0]["msg"]) and "Traceback" in str(written[0]["msg"])
    assert SECRET not in json_log.getvalue() and PLAIN not in json_log.getvalue()


async def test_a_debug_session_logs_no_key(json_log: io.StringIO, tmp_path: Path) -> None:
    """At DEBUG (websockets then logs every handshake header, both sides), sessions opened with the key in
    the Authorization header, the query string and the browser subprotocol log no key: not the client's,
    the master key or the provider's."""
    logging.getLogger().setLevel(logging.DEBUG)
    async with stack(tmp_path) as s:
        logging.getLogger("uvicorn.error").setLevel(logging.DEBUG)  # the server's handshake and access lines
        url = f"{s.sidecar.ws}{PATH}&api_key={USER_KEY}"
        for options in (
            {"additional_headers": {"Authorization": f"Bearer {USER_KEY}"}},
            {"subprotocols": ["realtime", f"openai-insecure-api-key.{USER_KEY}"]},
        ):
            async with connect(url, **options) as ws:  # type: ignore[arg-type]
                assert orjson.loads(await ws.recv())["type"] == "session.created"
        await s.sidecar.app.state.services.supervisor.live_empty()
        provider_key = s.provider.api_key
    written = json_log.getvalue()
    messages = [str(line["msg"]) for line in lines(json_log)]
    assert "< authorization: bearer [redacted]" in (m.lower() for m in messages)  # headers logged, redacted
    assert sum(m.endswith('"WebSocket /v1/realtime?[redacted]" [accepted]') for m in messages) == 2
    for secret in (USER_KEY, MASTER_KEY, provider_key):
        assert secret not in written


async def test_sidecar_serve_stderr_has_no_raw_key(tmp_path: Path) -> None:
    """A real `sidecar serve`, as deployed: connects with `?api_key=<key>` and the key in every credential
    form (refused or accepted) leave their access lines on stderr with the query redacted and no key."""
    key = "sk-client-put-me-in-the-url-0001"
    master = "sk-serve-master-0001"
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, master_key=master)
        sidecar = SidecarProcess(env, workdir=tmp_path / "run")
        await sidecar.start()
        try:
            url = f"ws://127.0.0.1:{sidecar.port}{PATH}&api_key={key}"
            for refused in (
                {},
                {"additional_headers": {"Authorization": f"Bearer {key}"}},
                {"additional_headers": {"api-key": key}},
                {"subprotocols": ["realtime", f"openai-insecure-api-key.{key}"]},
            ):
                with pytest.raises(InvalidStatus) as refusal:
                    await connect(url, **refused)  # type: ignore[arg-type]
                assert refusal.value.response.status_code == 401
            for accepted in (
                {"additional_headers": {"Authorization": f"Bearer {master}"}},
                {"subprotocols": ["realtime", f"openai-insecure-api-key.{master}"]},
            ):
                async with connect(url, **accepted) as ws:  # type: ignore[arg-type]
                    assert orjson.loads(await ws.recv())["type"] == "session.created"
            assert await sidecar.terminate() == 0
        finally:
            await sidecar.kill()
    written = sidecar.log.read_text()
    messages = [str(orjson.loads(line)["msg"]) for line in written.splitlines()]
    assert sum(m.endswith('"WebSocket /v1/realtime" 401 invalid_api_key') for m in messages) == 4
    assert sum(m.endswith('"WebSocket /v1/realtime?[redacted]" [accepted]') for m in messages) == 2
    for secret in (key, master, provider.api_key):
        assert secret not in written


def test_litellm_is_never_imported_by_the_sidecar_or_the_tests() -> None:
    """The sidecar reads LiteLLM's JSON files and never imports the package (docs/configuration.md), and no test
    module imports it at collection: its import installs log filters on the root and uvicorn loggers that rewrite
    the records these tests check (LiteLLM's own helpers run in a child process: tests/litellm_crypto.py)."""
    assert "litellm" not in sys.modules
