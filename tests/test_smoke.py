"""`sidecar smoke MODEL` against the fake provider on real loopback sockets: every failure kind, failover,
the CLI wiring, and that no output ever carries a provider key or the master key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.http11 import Response

from sidecar.config import Settings
from sidecar.smoke import EXIT_FAILED, EXIT_OK, EXIT_USAGE, SILENCE, connect_reason, run_smoke
from sidecar.testing.fake_provider import DEFAULT_API_KEY, FakeProvider, Faults

MASTER_KEY = "sk-smoke-master-key-5f3c9a"
WRONG_KEY = "sk-wrong-provider-key-77e1d2"
LEAKY_KEY = "sk-leaky-provider-key-0a9b8c"
SECRETS = (DEFAULT_API_KEY, MASTER_KEY, WRONG_KEY, LEAKY_KEY)
TRANSCRIBER = "openai/gpt-realtime-whisper"  # a realtime-transcription model in LiteLLM's price map
DURATION = re.compile(r"answered in \d+ ms")


@dataclass
class Report:
    """What one smoke run returned and printed."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """Every printed line."""
        return "\n".join(self.lines)

    def line(self, deployment_id: str) -> str:
        """The report line of one deployment."""
        return next(line for line in self.lines if f" {deployment_id} (" in line)


def assert_no_secrets(text: str) -> None:
    """No provider key and no master key anywhere in `text`."""
    for secret in SECRETS:
        assert secret not in text


def entry(
    name: str, api_base: str, *, key: str | None = DEFAULT_API_KEY, model: str = TRANSCRIBER, **extra: Any
) -> Any:
    """One LiteLLM model_list entry; `extra` goes to litellm_params except `model_info`."""
    info = extra.pop("model_info", None)
    params = {"model": model, "api_base": api_base, **({"api_key": key} if key is not None else {}), **extra}
    return {"model_name": name, "litellm_params": params, **({"model_info": info} if info else {})}


def write_config(path: Path, *entries: Any) -> Path:
    """A LiteLLM config.yaml with these entries and the master key."""
    config = {"model_list": list(entries), "general_settings": {"master_key": MASTER_KEY}}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def settings_for(tmp_path: Path, *entries: Any) -> Settings:
    """Settings reading a config with these entries."""
    return Settings(litellm_config=write_config(tmp_path / "config.yaml", *entries))


async def smoke(settings: Settings, model: str, *, timeout_s: float = 10.0) -> Report:
    """Run the smoke in-process, capturing its lines; checks that no secret was printed."""
    lines: list[str] = []
    code = await run_smoke(settings, model, timeout_s=timeout_s, out=lines.append)
    report = Report(code, lines)
    assert_no_secrets(report.text)
    return report


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    """The fake provider on a free loopback port."""
    async with FakeProvider() as fake:
        yield fake


@contextlib.asynccontextmanager
async def leaky_error_provider() -> AsyncIterator[str]:
    """A provider that opens sessions but answers a commit with an `error` event naming its key and address."""

    async def handler(connection: ServerConnection) -> None:
        host, port = connection.local_address[:2]
        await connection.send(orjson.dumps({"type": "session.created", "event_id": "e1", "session": {}}).decode())
        async for message in connection:
            if orjson.loads(message).get("type") == "input_audio_buffer.commit":
                message = f"Buffer rejected (key {LEAKY_KEY} at {host}:{port})."
                error = {"type": "invalid_request_error", "code": "input_audio_buffer_commit_empty", "message": message}
                await connection.send(orjson.dumps({"type": "error", "event_id": "e2", "error": error}).decode())

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        yield f"ws://{host}:{port}"


# --- success ------------------------------------------------------------------------------------------


async def test_success_names_the_deployment_and_its_duration(provider: FakeProvider, tmp_path: Path) -> None:
    """A working deployment: exit 0, its id, provider and host, and how long it took to answer."""
    settings = settings_for(tmp_path, entry("whisper", provider.url, model_info={"id": "fake-primary"}))
    report = await smoke(settings, "whisper")
    assert report.code == EXIT_OK
    line = report.line("fake-primary")
    assert line.startswith(f"ok   fake-primary (openai, {provider.url})")
    assert "session.created after" in line and "input_audio_buffer.committed after" in line
    assert report.lines[-1].startswith("whisper: OK, fake-primary (openai)")
    assert DURATION.search(report.lines[-1])


async def test_sends_a_little_silence_and_commits_it(provider: FakeProvider, tmp_path: Path) -> None:
    """The upstream gets 100 ms of PCM16 silence and a commit, on the relay's transcription URL."""
    await smoke(settings_for(tmp_path, entry("whisper", provider.url)), "whisper")
    session = provider.sessions[0]
    assert session.handshake.query == {"model": "gpt-realtime-whisper", "intent": "transcription"}
    assert session.handshake.headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert [event["type"] for event in session.events] == ["input_audio_buffer.append", "input_audio_buffer.commit"]
    assert session.audio_bytes == len(SILENCE) == 4800


async def test_model_is_injected_when_the_url_carries_none(tmp_path: Path) -> None:
    """Azure GA transcription: no model in the URL, so the relay's session.update names the deployment (after
    the relay's client-secret exchange, which Azure's transcription socket wants instead of the api-key)."""
    async with FakeProvider(azure_deployments=["my-whisper-deployment"]) as provider:
        azure = entry(
            "azure-whisper",
            provider.url.replace("ws://", "http://"),
            model="azure/my-whisper-deployment",
            realtime_protocol="GA",
            model_info={"base_model": "azure/gpt-realtime-whisper"},
        )
        report = await smoke(settings_for(tmp_path, azure), "azure-whisper")
    assert report.code == EXIT_OK, report.text
    session = provider.sessions[0]
    assert session.handshake.path == "/openai/v1/realtime"
    assert session.handshake.query == {"intent": "transcription"}
    assert provider.azure is not None and session.handshake.headers["authorization"] == (
        f"Bearer {provider.azure.minted[0]}"
    )
    assert provider.azure.minted[0] not in report.text and "warning" not in report.text
    update = session.events[0]
    assert update["type"] == "session.update"
    assert update["session"]["audio"]["input"]["transcription"]["model"] == "my-whisper-deployment"


async def test_conversation_model_opens_without_intent(provider: FakeProvider, tmp_path: Path) -> None:
    """A conversation model is opened as a conversation session (no intent) and answers the same way."""
    settings = settings_for(tmp_path, entry("voice", provider.url, model="openai/gpt-realtime"))
    report = await smoke(settings, "voice")
    assert report.code == EXIT_OK, report.text
    assert provider.sessions[0].handshake.query == {"model": "gpt-realtime"}


# --- GPT-Live and realtime translation (issue 15) ---------------------------------------------------------


async def test_live_deployment_answers_session_start(provider: FakeProvider, tmp_path: Path) -> None:
    """GPT-Live: opened on /v1/live/sessions (no query), session.start with the model, session.started,
    then session.close so that the session stops costing."""
    settings = settings_for(tmp_path, entry("gpt-live-1", provider.url, model="openai/gpt-live-1"))
    report = await smoke(settings, "gpt-live-1")
    assert report.code == EXIT_OK, report.text
    assert report.lines[0].startswith("smoke gpt-live-1 (live-session on /v1/live/sessions): 1 deployment")
    assert "session.started after" in report.line("gpt-live-1#0")
    assert report.lines[-1].startswith("gpt-live-1: OK, gpt-live-1#0 (openai)")
    session = provider.sessions[0]
    await session.closed.wait()
    assert (session.handshake.path, session.handshake.query) == ("/v1/live/sessions", {})
    assert session.handshake.headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert [event["type"] for event in session.events] == ["session.start", "session.close"]
    assert session.events[0]["session"] == {"model": "gpt-live-1"}


async def test_azure_live_deployment_gets_its_deployment_name(provider: FakeProvider, tmp_path: Path) -> None:
    """Azure GPT-Live: /openai/v1/live/sessions with api-key; session.start names the deployment."""
    azure = entry(
        "live",
        provider.url.replace("ws://", "http://"),
        model="azure/my-live-deployment",
        model_info={"base_model": "azure/gpt-live-1"},
    )
    report = await smoke(settings_for(tmp_path, azure), "live")
    assert report.code == EXIT_OK, report.text
    session = provider.sessions[0]
    assert session.handshake.path == "/openai/v1/live/sessions"
    assert session.handshake.headers["api-key"] == DEFAULT_API_KEY
    assert session.events[0]["session"]["model"] == "my-live-deployment"


@pytest.mark.parametrize(
    ("model", "path", "query_model"),
    [
        ("openai/gpt-realtime-translate", "/v1/realtime/translations", "gpt-realtime-translate"),
        ("azure/my-translate-deployment", "/openai/v1/realtime/translations", "my-translate-deployment"),
    ],
    ids=["openai", "azure"],
)
async def test_translation_deployment_answers_session_created(
    provider: FakeProvider, tmp_path: Path, model: str, path: str, query_model: str
) -> None:
    """Translation: opened with ?model=, the first server event is session.created; nothing is sent."""
    info = {"base_model": "azure/gpt-realtime-translate"} if model.startswith("azure/") else None
    settings = settings_for(tmp_path, entry("translate", provider.url, model=model, model_info=info))
    report = await smoke(settings, "translate")
    assert report.code == EXIT_OK, report.text
    assert "(realtime-translation on /v1/realtime/translations)" in report.lines[0]
    assert "session.created after" in report.line("translate#0")
    session = provider.sessions[0]
    assert (session.handshake.path, session.handshake.query) == (path, {"model": query_model})
    assert session.events == []


async def test_live_and_translation_failures(provider: FakeProvider, tmp_path: Path) -> None:
    """A refused GPT-Live key and a translation upgrade refused by a fault are reported as on /v1/realtime."""
    live = entry("gpt-live-1", provider.url, model="openai/gpt-live-1", key=WRONG_KEY)
    report = await smoke(settings_for(tmp_path, live), "gpt-live-1")
    assert report.code == EXIT_FAILED
    assert "authentication refused (HTTP 401 invalid_api_key" in report.line("gpt-live-1#0")
    provider.faults = Faults(refuse_status=503)
    translate = entry("gpt-realtime-translate", provider.url, model="openai/gpt-realtime-translate")
    report = await smoke(settings_for(tmp_path, translate), "gpt-realtime-translate")
    assert report.code == EXIT_FAILED
    assert "upstream refused the WebSocket upgrade (HTTP 503 fault_injected" in report.line("gpt-realtime-translate#0")


async def test_live_timeout_waiting_for_session_started(tmp_path: Path) -> None:
    """A GPT-Live upstream that never answers session.start times out waiting for session.started."""

    async def silent(connection: ServerConnection) -> None:
        async for _ in connection:
            pass

    async with serve(silent, "127.0.0.1", 0, compression=None) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        settings = settings_for(tmp_path, entry("gpt-live-1", f"ws://{host}:{port}", model="openai/gpt-live-1"))
        report = await smoke(settings, "gpt-live-1", timeout_s=0.3)
    assert report.code == EXIT_FAILED
    assert report.line("gpt-live-1#0").endswith("timed out after 0.3 s waiting for session.started")


# --- failures, one kind each ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [WRONG_KEY, None], ids=["wrong-key", "no-key"])
async def test_auth_refused(provider: FakeProvider, tmp_path: Path, key: str | None) -> None:
    """HTTP 401 from the upstream is reported as an authentication refusal, with a hint when no key is set."""
    report = await smoke(settings_for(tmp_path, entry("whisper", provider.url, key=key)), "whisper")
    assert report.code == EXIT_FAILED
    line = report.line("whisper#0")
    assert line.startswith("FAIL whisper#0 (openai,")
    assert "authentication refused (HTTP 401 invalid_api_key" in line
    assert ("no api_key" in line) is (key is None)
    assert report.lines[-1] == "whisper: FAILED, none of its 1 deployment(s) answered"


async def test_upstream_refusal_status(provider: FakeProvider, tmp_path: Path) -> None:
    """Any other refusal of the upgrade is reported with its HTTP status and error code."""
    provider.faults = Faults(refuse_status=500)
    report = await smoke(settings_for(tmp_path, entry("whisper", provider.url)), "whisper")
    assert report.code == EXIT_FAILED
    assert "upstream refused the WebSocket upgrade (HTTP 500 fault_injected" in report.line("whisper#0")


async def test_dns_failure(tmp_path: Path) -> None:
    """A host that does not resolve is a DNS failure naming the host (no network needed: .invalid)."""
    settings = settings_for(tmp_path, entry("whisper", "ws://does-not-exist.invalid:9"))
    # A generous timeout: without a reachable resolver the lookup fails only after the resolver's own retries.
    report = await smoke(settings, "whisper", timeout_s=60)
    assert report.code == EXIT_FAILED
    assert report.line("whisper#0").endswith("DNS lookup failed for does-not-exist.invalid")


async def test_tls_failure(provider: FakeProvider, tmp_path: Path) -> None:
    """wss:// to a port that does not speak TLS is a TLS handshake failure."""
    settings = settings_for(tmp_path, entry("whisper", f"wss://{provider.host_port}"))
    report = await smoke(settings, "whisper")
    assert report.code == EXIT_FAILED
    assert f"TLS handshake failed with wss://{provider.host_port}" in report.line("whisper#0")


async def test_connection_refused(tmp_path: Path) -> None:
    """A closed port is reported as a refused connection."""
    port = closed_port()
    report = await smoke(settings_for(tmp_path, entry("whisper", f"ws://127.0.0.1:{port}")), "whisper")
    assert report.code == EXIT_FAILED
    assert report.line("whisper#0").endswith(f"connection refused by ws://127.0.0.1:{port}")


async def test_azure_without_api_base(tmp_path: Path) -> None:
    """An Azure deployment whose api_base is unset is reported as such, without dialling anything."""
    azure = entry(
        "voice",
        "os.environ/SMOKE_TEST_UNSET_BASE",
        model="azure/my-deployment",
        model_info={"base_model": "azure/gpt-realtime"},
    )
    report = await smoke(settings_for(tmp_path, azure), "voice")
    assert report.code == EXIT_FAILED
    assert report.line("voice#0") == (
        "FAIL voice#0 (azure, no host): no api_base configured (Azure needs one: is its os.environ/ variable set?)"
    )


async def test_timeout_waiting_for_the_upgrade(provider: FakeProvider, tmp_path: Path) -> None:
    """An upstream that never answers the upgrade times out after the given timeout."""
    provider.faults = Faults(stall_handshake=True)
    report = await smoke(settings_for(tmp_path, entry("whisper", provider.url)), "whisper", timeout_s=0.3)
    assert report.code == EXIT_FAILED
    assert report.line("whisper#0").endswith("timed out after 0.3 s waiting for the WebSocket upgrade response")


async def test_error_event_is_reported_scrubbed(tmp_path: Path) -> None:
    """An `error` event fails the deployment with its code and its message, key and address redacted."""
    async with leaky_error_provider() as url:
        report = await smoke(settings_for(tmp_path, entry("whisper", url, key=LEAKY_KEY)), "whisper")
    assert report.code == EXIT_FAILED
    reason = report.line("whisper#0").split("): ", 1)[1]
    assert reason == "error event input_audio_buffer_commit_empty: Buffer rejected (key [redacted] at [redacted])."


async def test_upstream_close_is_reported(provider: FakeProvider, tmp_path: Path) -> None:
    """The upstream closing the session before answering the audio is reported with its close code."""
    provider.faults = Faults(close_after_appends=(1, 4000, "going away"))
    report = await smoke(settings_for(tmp_path, entry("whisper", provider.url)), "whisper")
    assert report.code == EXIT_FAILED
    assert report.line("whisper#0").endswith("the upstream closed the session (code 4000: going away)")


async def test_upstream_drop_is_reported(provider: FakeProvider, tmp_path: Path) -> None:
    """A connection dropped without a close frame is reported as such."""
    provider.faults = Faults(drop_after_appends=1)
    report = await smoke(settings_for(tmp_path, entry("whisper", provider.url)), "whisper")
    assert report.code == EXIT_FAILED
    assert report.line("whisper#0").endswith("the upstream dropped the connection (no close frame)")


# --- several deployments --------------------------------------------------------------------------------


async def test_failover_reports_both_and_succeeds(provider: FakeProvider, tmp_path: Path) -> None:
    """First deployment refused, second good: exit 0, both reported, the second named as the answer."""
    bad = entry("whisper", f"ws://127.0.0.1:{closed_port()}")
    report = await smoke(settings_for(tmp_path, bad, entry("whisper", provider.url)), "whisper")
    assert report.code == EXIT_OK
    assert report.line("whisper#0").startswith("FAIL whisper#0")
    assert report.line("whisper#1").startswith("ok   whisper#1")
    assert report.lines[-1].startswith("whisper: OK, whisper#1 (openai)")


async def test_every_deployment_is_checked(provider: FakeProvider, tmp_path: Path) -> None:
    """Deployments after a working one are still checked, so a broken fallback is visible."""
    settings = settings_for(tmp_path, entry("whisper", provider.url), entry("whisper", provider.url, key=WRONG_KEY))
    report = await smoke(settings, "whisper")
    assert report.code == EXIT_OK
    assert "authentication refused" in report.line("whisper#1")
    assert report.lines[-1].startswith("whisper: OK, whisper#0 (openai)")


async def test_all_deployments_failing_is_exit_1(tmp_path: Path) -> None:
    """When no deployment answers, exit 1 and the summary says so."""
    port = closed_port()
    settings = settings_for(tmp_path, *(entry("whisper", f"ws://127.0.0.1:{port}") for _ in range(2)))
    report = await smoke(settings, "whisper")
    assert report.code == EXIT_FAILED
    assert report.lines[-1] == "whisper: FAILED, none of its 2 deployment(s) answered"


# --- the model itself -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [("nope", "does not exist"), ("whisper-1", "not available for realtime")],
)
async def test_unknown_or_non_realtime_model_is_exit_2(tmp_path: Path, model: str, message: str) -> None:
    """An unknown model, or one that is not realtime, exits 2 with the reason and dials nothing."""
    settings = settings_for(tmp_path, entry("whisper-1", "ws://does-not-exist.invalid:9", model="openai/whisper-1"))
    report = await smoke(settings, model)
    assert report.code == EXIT_USAGE
    assert report.lines == [report.lines[0]] and message in report.lines[0]
    assert report.lines[0].startswith(f"FAIL {model}:")


# --- failure reasons from exceptions (pure) -------------------------------------------------------------


def refused(status: int, body: dict[str, Any]) -> InvalidStatus:
    """The exception websockets raises for an HTTP refusal of the upgrade."""
    return InvalidStatus(Response(status, "Refused", Headers(), orjson.dumps(body)))


def cert_error() -> ssl.SSLCertVerificationError:
    """A certificate verification failure as the ssl module raises it."""
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    return error


def chained(outer: Exception, cause: BaseException) -> Exception:
    """`outer` raised from `cause`."""
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "url", "transport_up", "expected"),
    [
        (socket.gaierror(-2, "x"), "wss://api.example.com/v1", False, "DNS lookup failed for api.example.com"),
        (
            cert_error(),
            "wss://api.example.com/v1",
            False,
            "TLS handshake failed with wss://api.example.com: certificate not trusted (self-signed certificate)",
        ),
        (ConnectionRefusedError(111, "x"), "ws://10.0.0.1:81/v1", False, "connection refused by ws://10.0.0.1:81"),
        (TimeoutError(), "wss://h:8443/v1", False, "timed out after 2 s connecting to wss://h:8443"),
        (TimeoutError(), "wss://h/v1", True, "timed out after 2 s waiting for the WebSocket upgrade response"),
        (
            ConnectionResetError(),
            "wss://h/v1",
            False,
            "TLS handshake failed with wss://h (connection closed during the handshake: is it a TLS port?)",
        ),
        (
            chained(InvalidMessage("x"), EOFError()),
            "ws://h/v1",
            True,
            "ws://h closed the connection before answering the WebSocket upgrade",
        ),
        (
            refused(403, {"error": {"code": "403", "message": f"Key {WRONG_KEY} is not allowed"}}),
            "wss://h/v1",
            True,
            "authentication refused (HTTP 403 403: Key [redacted] is not allowed)",
        ),
        (
            refused(404, {"error": {"code": "DeploymentNotFound", "message": "no such deployment"}}),
            "wss://h/v1",
            True,
            "no such endpoint or deployment (HTTP 404 DeploymentNotFound: no such deployment); "
            "check api_base, api_version and the model name",
        ),
        (refused(429, {}), "wss://h/v1", True, "rate limited (HTTP 429)"),
    ],
    ids=["dns", "cert", "refused", "timeout-connect", "timeout-upgrade", "tls-reset", "closed", "403", "404", "429"],
)
def test_connect_reasons(exc: BaseException, url: str, transport_up: bool, expected: str) -> None:
    """Each foreign connect exception becomes one clear reason of our own, with upstream text scrubbed."""
    assert connect_reason(exc, url=url, timeout_s=2.0, transport_up=transport_up, secrets=SECRETS) == expected


# --- the command line -----------------------------------------------------------------------------------


async def sidecar_cli(*args: str, config: Path) -> tuple[int, str]:
    """Run `python -m sidecar.cli ...` as a subprocess (the test's loop keeps serving meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OPENAI_", "AZURE_"))}
    env["SIDECAR_LITELLM_CONFIG"] = str(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_cli_smoke_succeeds(provider: FakeProvider, tmp_path: Path) -> None:
    """`sidecar smoke MODEL` as a process: exit 0 and the report on stdout, no secret in it."""
    config = write_config(tmp_path / "config.yaml", entry("whisper", provider.url, model_info={"id": "fake-1"}))
    code, output = await sidecar_cli("smoke", "whisper", "--timeout", "10", config=config)
    assert code == 0, output
    assert "ok   fake-1 (openai," in output and DURATION.search(output)
    assert_no_secrets(output)


async def test_cli_smoke_failure_exit_codes(tmp_path: Path) -> None:
    """`sidecar smoke` exits 1 when every deployment fails and 2 for an unknown model."""
    config = write_config(tmp_path / "config.yaml", entry("whisper", f"ws://127.0.0.1:{closed_port()}"))
    failed, output = await sidecar_cli("smoke", "whisper", config=config)
    unknown, _ = await sidecar_cli("smoke", "nope", config=config)
    assert (failed, unknown) == (1, 2)
    assert "connection refused" in output
    assert_no_secrets(output)
