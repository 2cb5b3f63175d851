"""The captions page over WebRTC in Debian's headless Chromium, against a real WebRTC peer (aiortc).

Chromium's fake microphone plays the shared test speech into a real call: the page POSTs its SDP offer,
sends the microphone as an audio track and opens the `oai-events` data channel; sidecar.testing.rtc_peer
answers, decodes the audio, counts it exactly, and sends transcription events whose usage is the seconds it
received. ICE runs over the machine's own address: Chromium with `--disable-features=WebRtcHideLocalIpsWithMdns`
(tests/browser/captions.mjs), aiortc with no STUN server (it gathers every interface but 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aioice.ice import get_host_addresses
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar import captions
from sidecar.auth import hash_key
from sidecar.billing.tables import RealtimeUsage, quantize
from sidecar.billing.writer import make_engine
from sidecar.calls.offer import parse_realtime
from sidecar.metering import bill_time
from sidecar.testing.fake_calls import FakeCallProvider
from sidecar.testing.rtc_peer import DEFAULT_TRANSCRIPT, RtcPeer
from tests.relay_stack import MASTER_KEY, USER_KEY, entry, stack
from tests.support import Running, bound_socket, serve

REPO = Path(__file__).resolve().parents[1]
SPEECH_WAV = REPO / "examples" / "audio" / "speech_24k_pcm16.wav"
DRIVER = REPO / "tests" / "browser" / "captions.mjs"
SCREENSHOT = REPO / "test-artifacts" / "captions-webrtc.png"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
WHISPER = "gpt-realtime-whisper"
SECRET = "ek_direct-test-secret"
EXAMPLE_MASTER_KEY = "sk-sidecar-master-example"  # examples/config.yaml's, the only key `make run` accepts
CAPTIONS = {
    "captions_page": True,
    "captions_key": USER_KEY,
    "client_secret_key": "captions-test-signing-key-0123456789",
}


@pytest.fixture(scope="module")
def playwright_core() -> Path:
    """playwright-core under tools/ (npm, idempotent); Debian's Chromium must already be installed."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (as root)"
    # aiortc gathers ICE candidates on every interface but 127.0.0.1: a call on one machine needs another one up.
    assert get_host_addresses(use_ipv4=True, use_ipv6=True), "WebRTC tests need a network interface besides lo"
    subprocess.run(["bash", str(REPO / "scripts" / "ensure-playwright.sh")], check=True, capture_output=True)
    return REPO / "tools" / "node_modules" / "playwright-core"


async def drive(page_url: str, *, min_captions: int = 2, ending: str = "stop") -> dict[str, Any]:
    """Run the keyboard-only driver on `page_url`: start, `min_captions` captions, then Stop (or close the tab:
    `ending="close"`); what the page showed."""
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    driver = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        page_url,
        str(SPEECH_WAV),
        str(SCREENSHOT),
        str(min_captions),
        ending,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(driver.communicate(), timeout=180)
    assert driver.returncode == 0, err.decode()
    page: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return page


# ---- the page and the peer alone (no sidecar): a stand-in for the sidecar's token and calls routes ----------


@dataclass
class DirectCalls:
    """The captions page's routes, a fixed token, and POST /v1/realtime/calls answered by the peer itself."""

    peer: RtcPeer
    ttl_s: int = 60  # the tokens' lifetime (expires_at), as POST /captions/token's
    offers: list[Any] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    hangups: list[tuple[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/captions/", captions.page, methods=["GET"]),
                Route("/captions/token", self.token, methods=["POST"]),
                Route("/captions/{name}", captions.asset, methods=["GET"]),
                Route("/v1/realtime/calls", self.create, methods=["POST"]),
                Route("/v1/realtime/calls/{call_id}/hangup", self.hangup, methods=["POST"]),
            ]
        )

    async def token(self, request: Request) -> Response:
        self.tokens.append(SECRET if not self.tokens else f"{SECRET}-{len(self.tokens) + 1}")
        return JSONResponse(
            {
                "value": self.tokens[-1],
                "expires_at": int(time.time()) + self.ttl_s,
                "session": captions.captions_session(WHISPER),
                "model": {"id": WHISPER, "kind": "transcription", "unit": "second", "pricing": {}},
            }
        )

    async def create(self, request: Request) -> Response:
        assert request.headers["authorization"] == f"Bearer {SECRET}"
        offer = parse_realtime(request.headers.get("content-type"), await request.body(), query_model=None)
        self.offers.append(offer)
        answer = await self.peer.answer(offer.sdp)
        return Response(answer, status_code=201, media_type="application/sdp", headers={"Location": CALL_PATH})

    async def hangup(self, request: Request) -> Response:
        self.hangups.append((request.path_params["call_id"], request.headers["authorization"]))
        await self.peer.calls[-1].close()  # the provider ends the call: the page sees its data channel close
        return Response(status_code=200)


CALL_PATH = "/v1/realtime/calls/rs_direct0123"


@contextlib.asynccontextmanager
async def direct_calls(*, ttl_s: int = 60) -> AsyncIterator[tuple[DirectCalls, Running]]:
    peer = RtcPeer()
    calls = DirectCalls(peer, ttl_s=ttl_s)
    try:
        async with serve(calls.app()) as running:
            yield calls, running
    finally:
        await peer.aclose()


async def test_the_page_calls_a_real_webrtc_peer_that_hears_the_microphone(playwright_core: Path) -> None:
    """Chromium and the aiortc peer connect on this machine: the peer decodes the fake microphone, captions
    appear from the data channel, Stop commits, and the page adds up exactly the seconds the peer heard."""
    async with direct_calls() as (calls, running):
        page = await drive(f"{running.http}/captions/?transport=webrtc")
        peer_call = calls.peer.calls[0]
    assert len(calls.peer.calls) == 1 and len(calls.offers) == 1
    assert calls.offers[0].session == {"type": "transcription"}
    # Every frame the peer decoded is in one item; the page's seconds are the sum of the items' usage.
    assert peer_call.frames > 0 and peer_call.received == peer_call.billed == sum(peer_call.items, Fraction(0))
    assert Decimal(page["audioSeconds"]) == Decimal(peer_call.received.numerator) / peer_call.received.denominator
    assert len(page["captions"]) == len(peer_call.items) >= 2 and set(page["captions"]) == {DEFAULT_TRANSCRIPT}
    assert peer_call.items[:2] == [Fraction(2), Fraction(2)]
    assert any(DEFAULT_TRANSCRIPT.startswith(text) and text != DEFAULT_TRANSCRIPT for text in page["partials"])
    # Stop: the microphone off, a commit on the data channel, then the hangup of the Location's call id.
    assert [e["type"] for e in peer_call.client_events] == ["input_audio_buffer.commit"]
    assert calls.hangups == [("rs_direct0123", f"Bearer {SECRET}")]
    assert (page["transport"], page["callId"], page["status"]) == ("webrtc", "rs_direct0123", "Stopped.")
    assert page["bytesSent"] == "0" and page["model"] == WHISPER


async def test_a_call_whose_secret_is_about_to_expire_hangs_up_with_a_fresh_one(playwright_core: Path) -> None:
    """The call's secret has under 10 s left at Stop: the page fetches a fresh one (same key) for the hangup."""
    async with direct_calls(ttl_s=5) as (calls, running):
        page = await drive(f"{running.http}/captions/?transport=webrtc", min_captions=1)
    assert calls.tokens == [SECRET, f"{SECRET}-2"]
    assert calls.hangups == [("rs_direct0123", f"Bearer {SECRET}-2")] and page["status"] == "Stopped."


# ---- through the sidecar: its create and hangup routes, the call watched on the fake provider's sideband ------


async def test_a_browser_call_through_the_sidecar_is_billed_exactly_the_seconds_the_peer_heard(
    tmp_path: Path, playwright_core: Path
) -> None:
    """The page's call goes through POST /v1/realtime/calls with its client secret (never forwarded); the
    provider's media side is the aiortc peer; the sidecar bills the call from the sideband's transcription
    usage, and the final row is exactly the audio the peer decoded, billed to the captions key."""
    peer = RtcPeer()
    async with FakeCallProvider(answerer=peer) as fake:
        entries = [entry(WHISPER, f"openai/{WHISPER}", fake.url, fake.api_key)]
        async with stack(tmp_path, entries=entries, **CAPTIONS) as s:
            page = await drive(f"{s.sidecar.http}/captions/?transport=webrtc")
            row = await s.final_row()
            price = s.sidecar.app.state.services.catalog.resolve(WHISPER).price
        await peer.aclose()
    call, peer_call = fake.calls[0], peer.calls[0]
    heard = Decimal(peer_call.received.numerator) / peer_call.received.denominator
    assert len(fake.calls) == 1 and len(peer.calls) == 1
    assert call.auth == f"Bearer {fake.api_key}" and call.session["type"] == "transcription"
    assert peer_call.frames > 0 and peer_call.received == peer_call.billed
    assert len(page["captions"]) == len(peer_call.items) >= 2 and set(page["captions"]) == {DEFAULT_TRANSCRIPT}
    assert Decimal(page["audioSeconds"]) == heard
    # The page knows the call by the sidecar's session id only; the provider's call id stays behind it.
    assert page["callId"].startswith("rs_") and call.call_id not in str(page)
    assert (row.key_hash, row.model, row.session_id) == (hash_key(USER_KEY), WHISPER, page["callId"])
    assert row.close_reason == "client_hangup" and call.hung_up.is_set() and fake.hangups == 1
    # Billed: the seconds the peer decoded, as the metering rounds and prices them (no audio passed the sidecar).
    quantity, cost = bill_time(peer_call.received, price)
    assert (row.unit, row.quantity, row.cost_usd) == ("second", quantize(quantity), quantize(cost))
    assert row.quantity == heard and (row.audio_bytes, row.audio_seconds) == (0, 0)
    assert orjson.loads(row.upstream_usage) == {"duration_seconds": float(heard), "events": len(peer_call.items)}
    assert (page["transport"], page["status"]) == ("webrtc", "Stopped.")


async def test_a_call_whose_tab_is_closed_is_ended_by_the_provider_and_billed_what_the_peer_heard(
    tmp_path: Path, playwright_core: Path
) -> None:
    """The user closes the tab mid-call (no commit, no hangup): the provider ends the call when its peer
    connection closes, reporting what it heard, and the sidecar bills exactly that (`upstream_close`)."""
    peer = RtcPeer()
    async with FakeCallProvider(answerer=peer) as fake:
        entries = [entry(WHISPER, f"openai/{WHISPER}", fake.url, fake.api_key)]
        async with stack(tmp_path, entries=entries, **CAPTIONS) as s:
            page = await drive(f"{s.sidecar.http}/captions/?transport=webrtc", ending="close")
            call = await fake.wait_for_call()
            await call.ended.wait()
            row = await s.final_row()
            price = s.sidecar.app.state.services.catalog.resolve(WHISPER).price
        await peer.aclose()
    peer_call = peer.calls[0]
    assert (call.end_reason, call.hung_up.is_set(), fake.hangups) == ("media_closed", False, 0)
    assert peer_call.client_events == [] and page["status"] != "Stopped."
    assert peer_call.frames > 0 and peer_call.received == peer_call.billed and len(peer_call.items) >= 3
    quantity, cost = bill_time(peer_call.received, price)
    assert (row.session_id, row.close_reason) == (page["callId"], "upstream_close")
    assert (row.quantity, row.cost_usd) == (quantize(quantity), quantize(cost))


async def test_a_refused_call_leaves_the_page_idle_with_the_reason_and_bills_nothing(
    tmp_path: Path, playwright_core: Path
) -> None:
    """Every deployment refuses the offer: the sidecar answers 502, the page shows its message (no provider
    detail) and is ready again; no call reaches the peer, no session is live and nothing is billed."""
    peer = RtcPeer()
    async with FakeCallProvider(answerer=peer) as fake:
        fake.refuse_offer_status = 503
        entries = [entry(WHISPER, f"openai/{WHISPER}", fake.url, fake.api_key)]
        async with stack(tmp_path, entries=entries, **CAPTIONS) as s:
            page = await drive(f"{s.sidecar.http}/captions/?transport=webrtc", ending="refused")
            services = s.sidecar.app.state.services
            await services.publisher.settled()
            rows, live = s.rows(), dict(services.supervisor.live)
        await peer.aclose()
    assert page["status"] == (
        "The captions service refused the call: Every deployment of the model failed to create the call."
    )
    assert page["callId"] is None and fake.url.split("//")[1] not in str(page)
    assert (fake.offer_attempts, fake.calls, peer.calls) == (1, [], [])
    assert (rows, live, page["captions"], page["buttons"]) == ([], {}, [], ["Start captions", "Stop"])


async def test_a_call_an_administrator_ends_stops_the_page_and_bills_what_the_provider_reported(
    tmp_path: Path, playwright_core: Path
) -> None:
    """DELETE /admin/sessions/{id} mid-call: the sidecar hangs the call up at the provider, the page sees the
    call end and says so; billed exactly the seconds reported before the hangup, as the page counted them."""
    peer = RtcPeer()
    async with FakeCallProvider(answerer=peer) as fake:
        entries = [entry(WHISPER, f"openai/{WHISPER}", fake.url, fake.api_key)]
        async with stack(tmp_path, entries=entries, **CAPTIONS) as s:
            url = f"{s.sidecar.http}/captions/?transport=webrtc"
            browsing = asyncio.ensure_future(drive(url, min_captions=1, ending="ended"))
            peer_call = await peer.wait_for_call()
            await peer_call.wait_for_items(2)
            session_id = next(iter(s.sidecar.app.state.services.supervisor.live))
            async with httpx.AsyncClient(base_url=s.sidecar.http) as http:
                ended = await http.delete(
                    f"/admin/sessions/{session_id}", headers={"Authorization": f"Bearer {MASTER_KEY}"}
                )
            page = await browsing
            row = await s.final_row()
            price = s.sidecar.app.state.services.catalog.resolve(WHISPER).price
        await peer.aclose()
    call = fake.calls[0]
    assert ended.status_code == 202 and call.hung_up.is_set() and fake.hangups == 1
    assert (page["status"], page["callId"], row.session_id) == (
        "Captions stopped: the call ended.",
        session_id,
        session_id,
    )
    assert peer_call.client_events == [] and len(peer_call.items) >= 2
    quantity, cost = bill_time(peer_call.billed, price)
    assert (row.quantity, row.cost_usd) == (quantize(quantity), quantize(cost))
    assert Decimal(page["audioSeconds"]) == row.quantity and len(page["captions"]) == len(peer_call.items)
    assert row.close_reason == "session_terminated"


# ---- `make run` ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with bound_socket() as sock:
        port: int = sock.getsockname()[1]
    return port


def test_make_run_serves_the_captions_page_over_webrtc_and_bills_the_call(
    tmp_path: Path, playwright_core: Path
) -> None:
    """`make run` with the captions page on: the page's WebRTC call fails over from the WebSocket fake to the
    fake WebRTC provider and its real peer; after Ctrl-C the billing DB holds the call, billed the seconds the
    page was told it streamed (the peer's reports), to the example master key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "FAKE_PROVIDER"))}
    env.update(
        FAKE_PROVIDER_PORT=str(free_port()),
        SIDECAR_PORT=str(port),
        SIDECAR_DATABASE_URL=f"sqlite:///{tmp_path / 'billing.db'}",
        SIDECAR_SPOOL_DIR=str(tmp_path / "spool"),
        SIDECAR_CAPTIONS_PAGE="1",
        SIDECAR_CAPTIONS_KEY=EXAMPLE_MASTER_KEY,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.testing.devstack"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        announced: list[str] = []
        for line in proc.stdout:
            announced.append(line)
            if line.startswith("sidecar on"):
                break
        page = asyncio.run(drive(f"http://127.0.0.1:{port}/captions/?transport=webrtc"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert any(line.startswith("fake WebRTC provider on http://127.0.0.1:") for line in announced)
    assert proc.returncode == 0
    with Session(make_engine(env["SIDECAR_DATABASE_URL"])) as db:
        rows = list(db.exec(select(RealtimeUsage)).all())
    assert len(rows) == 1 and rows[0].status == "final" and rows[0].session_id == page["callId"]
    assert (rows[0].key_hash, rows[0].model, rows[0].close_reason) == (
        hash_key(EXAMPLE_MASTER_KEY),
        WHISPER,
        "client_hangup",
    )
    assert rows[0].quantity == Decimal(page["audioSeconds"]) > 0 and len(page["captions"]) >= 2
