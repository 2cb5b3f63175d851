"""The live-captions page: its HTTP routes, and the page itself in Debian's headless Chromium.

The browser test serves the sidecar (fake provider, fake LiteLLM) on a loopback port and runs
tests/browser/captions.mjs, which drives /usr/bin/chromium through playwright-core (tools/, installed by
scripts/ensure-playwright.sh; Chromium by scripts/ensure-chromium.sh) with a fake microphone playing the
shared test speech. A screenshot is kept at test-artifacts/captions.png.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest

from sidecar.auth import hash_key
from sidecar.catalog import describe
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT
from tests.relay_stack import USER_KEY, stack

REPO = Path(__file__).resolve().parents[1]
SPEECH_WAV = REPO / "examples" / "audio" / "speech_24k_pcm16.wav"
DRIVER = REPO / "tests" / "browser" / "captions.mjs"
SCREENSHOT = REPO / "test-artifacts" / "captions.png"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
WHISPER = "gpt-realtime-whisper"
CAPTIONS = {
    "captions_page": True,
    "captions_key": USER_KEY,
    "client_secret_key": "captions-test-signing-key-0123456789",
}


@pytest.fixture(scope="module")
def playwright_core() -> Path:
    """playwright-core under tools/ (npm, idempotent); Debian's Chromium must already be installed."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (as root)"
    subprocess.run(["bash", str(REPO / "scripts" / "ensure-playwright.sh")], check=True, capture_output=True)
    return REPO / "tools" / "node_modules" / "playwright-core"


async def test_captions_routes_are_absent_unless_enabled(tmp_path: Path) -> None:
    """Without SIDECAR_CAPTIONS_PAGE the page and its token endpoint do not exist (404)."""
    async with stack(tmp_path) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        assert (await http.get("/captions/")).status_code == 404
        assert (await http.post("/captions/token")).status_code == 404


async def test_captions_page_and_assets_are_served_with_a_strict_policy(tmp_path: Path) -> None:
    """The page, its three assets (right types, same-origin CSP), a redirect to /captions/, nothing else."""
    async with stack(tmp_path, **CAPTIONS) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        page = await http.get("/captions/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'role="log"' in page.text and "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in (("captions.js", "text/javascript"), ("captions-worklet.js", "text/javascript")):
            response = await http.get(f"/captions/{name}")
            assert (response.status_code, response.headers["content-type"].split(";")[0]) == (200, kind)
        assert (await http.get("/captions/captions.css")).headers["content-type"].startswith("text/css")
        assert (await http.get("/captions/captions.py")).status_code == 404
        assert (await http.get("/captions/..%2Fclient_secrets.py")).status_code == 404
        moved = await http.get("/captions")
        assert (moved.status_code, moved.headers["location"]) == (308, "captions/")


async def test_captions_token_is_a_pinned_secret_billed_to_the_captions_key(tmp_path: Path) -> None:
    """POST /captions/token mints for the captions key: PCM16 24 kHz, no VAD, the default model and its price."""
    async with stack(tmp_path, **CAPTIONS) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        response = await http.post("/captions/token")
        body = response.json()
        catalog = s.sidecar.app.state.services.catalog
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert body["value"].startswith("ek_") and USER_KEY not in body["value"]
    audio_input = body["session"]["audio"]["input"]
    assert audio_input == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": WHISPER},
        "turn_detection": None,
    }
    row = next(r for r in describe(catalog) if r["id"] == WHISPER)
    assert body["model"] == {"id": WHISPER, "kind": row["kind"], "unit": "second", "pricing": row["pricing"]}


async def test_captions_page_streams_the_microphone_and_bills_exactly_what_it_sent(
    tmp_path: Path, playwright_core: Path
) -> None:
    """In headless Chromium the page captions the fake mic live; the bill is the bytes it reports sending."""
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    async with stack(tmp_path, **CAPTIONS) as s:
        driver = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            f"{s.sidecar.http}/captions/",
            str(SPEECH_WAV),
            str(SCREENSHOT),
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(driver.communicate(), timeout=180)
        assert driver.returncode == 0, err.decode()
        page = orjson.loads(out.splitlines()[-1])
        row = await s.final_row()
        price = s.sidecar.app.state.services.catalog.resolve(WHISPER).price.per_unit
    sent = int(page["bytesSent"])
    assert sent > 0 and sent % 4800 == 0  # whole 100 ms appends of 24 kHz PCM16
    assert (row.audio_bytes, row.audio_seconds) == (sent, Decimal(sent) / 48000)
    assert Decimal(page["audioSeconds"]) == Decimal(sent) / 48000
    assert page["secondsText"] == f"{Decimal(sent) / 48000:.1f} s"
    # The page's estimate is seconds * listed price; the billing DB keeps costs to 10 decimal places.
    assert abs(Decimal(page["costUsd"]) - row.audio_seconds * price) < Decimal("1e-15")
    assert abs(row.cost_usd - row.audio_seconds * price) <= Decimal("1e-10")
    assert (row.key_hash, row.model, row.close_reason) == (hash_key(USER_KEY), WHISPER, "client_close")
    assert len(page["captions"]) >= 2 and set(page["captions"]) == {DEFAULT_TRANSCRIPT}
    assert any(DEFAULT_TRANSCRIPT.startswith(text) and text != DEFAULT_TRANSCRIPT for text in page["partials"])
    assert (page["captionsRole"], page["captionsLive"], page["statusRole"]) == ("log", "polite", "status")
    assert (page["buttons"], page["firstFocus"], page["focusWhileLive"]) == (
        ["Start captions", "Stop"],
        "start",
        "stop",
    )
    assert page["model"] == WHISPER and page["status"] == "Stopped."
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
