"""Client secrets: minting in the OpenAI shape, verification, single use, pinning, and connects that use them."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.auth import hash_key
from sidecar.client_secrets import (
    DEFAULT_TTL_S,
    MAX_TTL_S,
    ClientSecrets,
    Grant,
    InvalidRequest,
    MemoryClaims,
    RedisClaims,
    Signer,
    parse_request,
)
from sidecar.config import Settings
from sidecar.errors import ConfigError, InvalidApiKey
from sidecar.pinning import Pin
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, replicas, stack
from tests.support import chunks, next_of, next_raw

SECRET_KEY = "test-client-secret-signing-key-0123456789"
WHISPER = "gpt-realtime-whisper"
PCM = {"type": "audio/pcm", "rate": 24000}
TRANSCRIPTION_SESSION: dict[str, Any] = {
    "type": "transcription",
    "audio": {"input": {"format": PCM, "transcription": {"model": WHISPER}, "turn_detection": None}},
}


def payload_of(secret: str) -> dict[str, Any]:
    """The (signed, readable) payload of a secret."""
    body = secret.rpartition(".")[0].removeprefix("ek_")
    decoded: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return decoded


def grant(**changes: Any) -> Grant:
    """A grant for USER_KEY and the whisper model, created at t=1000 for 60 s."""
    fields: dict[str, Any] = {
        "secret_id": "abc123",
        "key_hash": hash_key(USER_KEY),
        "model": WHISPER,
        "transcription": True,
        "session": TRANSCRIPTION_SESSION,
        "created_at": 1000,
        "expires_at": 1060,
        **changes,
    }
    return Grant(**fields)


@contextlib.asynccontextmanager
async def secrets_stack(tmp_path: Path, **settings: Any) -> AsyncIterator[Stack]:
    """The contract-test sidecar with a fixed signing key (embedded mode)."""
    async with stack(tmp_path, client_secret_key=SECRET_KEY, **settings) as s:
        yield s


async def mint(s: Stack, key: str = USER_KEY, **body: Any) -> Any:
    """Mint through the official SDK (client.realtime.client_secrets.create)."""
    client = s.sidecar.openai(key)
    params = {"session": TRANSCRIPTION_SESSION, **body}
    return await client.realtime.client_secrets.create(**params)


async def browser_connect(s: Stack, secret: str, query: str = "intent=transcription") -> ClientConnection:
    """Connect like a browser: the secret in the subprotocol, no headers; past session.created."""
    protocols = ["realtime", f"openai-insecure-api-key.{secret}"]
    ws = await connect(f"{s.sidecar.ws}/v1/realtime?{query}", subprotocols=protocols)  # type: ignore[arg-type]
    assert ws.subprotocol == "realtime"
    assert orjson.loads(await ws.recv())["type"] == "session.created"
    return ws


async def refused(s: Stack, secret: str, query: str = "intent=transcription") -> tuple[int, str]:
    """A browser connect that must be refused before the upgrade: its status and error code."""
    protocols = ["realtime", f"openai-insecure-api-key.{secret}"]
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{s.sidecar.ws}/v1/realtime?{query}", subprotocols=protocols):  # type: ignore[arg-type]
            pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")["error"]["code"]


# ---- pure: secrets, requests, claims, pins -----------------------------------------------------------------


def test_signed_secret_round_trips_and_carries_only_the_key_hash() -> None:
    """A signed secret verifies to its grant; it holds the key's sha256 hash and never the key."""
    secret = Signer(SECRET_KEY).sign(grant())
    assert secret.startswith("ek_")
    assert Signer(SECRET_KEY).verify(secret, now=1059) == grant()
    assert USER_KEY not in secret and USER_KEY not in orjson.dumps(payload_of(secret)).decode()
    assert payload_of(secret)["kh"] == hash_key(USER_KEY)


def test_expiry_follows_the_injected_clock() -> None:
    """A secret verifies before expires_at and is refused (401) from expires_at on."""
    now = [1000.0]
    secrets = ClientSecrets(signer=Signer(SECRET_KEY), claims=MemoryClaims(), clock=lambda: now[0])
    minted, value = secrets.mint(key_hash="h", model=WHISPER, transcription=True, session={}, ttl_s=60)
    assert (minted.created_at, minted.expires_at) == (1000, 1060)
    now[0] = 1059.9
    assert secrets.verify(value) == minted
    now[0] = 1060.0
    with pytest.raises(InvalidApiKey, match="expired"):
        secrets.verify(value)


def test_tampered_or_foreign_secrets_are_refused() -> None:
    """A changed payload, a changed mac, another server's key or garbage: all refused as invalid_api_key."""
    secret = Signer(SECRET_KEY).sign(grant())
    body, _, mac = secret.rpartition(".")
    other = Signer(SECRET_KEY).sign(grant(model="gpt-realtime"))
    forged_payload = other.rpartition(".")[0] + "." + mac
    flipped_mac = body + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    for bad in (forged_payload, flipped_mac, Signer("another-key-" * 4).sign(grant()), "ek_nonsense", "ek_.", "ek_ü.x"):
        with pytest.raises(InvalidApiKey):
            Signer(SECRET_KEY).verify(bad, now=1000)


def test_request_defaults_caps_and_validation() -> None:
    """TTL defaults to 60 s, is capped at 600 s, OpenAI's 10..7200 range is enforced; models default sensibly."""
    plain = parse_request(None, default_transcription_model=WHISPER)
    assert (plain.ttl_s, plain.model, plain.transcription) == (DEFAULT_TTL_S, "gpt-realtime", False)
    long = parse_request({"expires_after": {"anchor": "created_at", "seconds": 7200}}, default_transcription_model="w")
    assert long.ttl_s == MAX_TTL_S
    spoken = parse_request({"session": {"type": "transcription"}}, default_transcription_model="w")
    assert (spoken.model, spoken.transcription) == ("w", True)
    for body in (
        [],
        {"expires_after": {"seconds": 5}},
        {"expires_after": {"seconds": 7201}},
        {"expires_after": {"seconds": "60"}},
        {"expires_after": {"anchor": "now", "seconds": 60}},
        {"session": {"type": "translation"}},
        {"session": "transcription"},
    ):
        with pytest.raises(InvalidRequest):
            parse_request(body, default_transcription_model="w")


async def test_memory_claims_are_single_use_until_they_expire() -> None:
    """The first claim wins, later ones lose; a claim is forgotten only after its ttl."""
    now = [0.0]
    claims = MemoryClaims(clock=lambda: now[0])
    assert await claims.claim("a", ttl_s=10) is True
    assert await claims.claim("a", ttl_s=10) is False
    assert await claims.claim("b", ttl_s=10) is True
    now[0] = 10.0
    assert await claims.claim("a", ttl_s=10) is True


async def test_redis_claims_are_single_use_across_clients(redis_url: str, unique: str) -> None:
    """Two replicas (two Redis clients) claiming one id: exactly one wins, and the claim carries an expiry."""
    first, second = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    try:
        prefix = f"test:{unique}"
        results = [
            await RedisClaims(first, prefix=prefix).claim("id-1", ttl_s=120),
            await RedisClaims(second, prefix=prefix).claim("id-1", ttl_s=120),
        ]
        assert results == [True, False]
        assert 0 < await first.ttl(f"{prefix}:client-secret:id-1") <= 120
    finally:
        await first.delete(f"test:{unique}:client-secret:id-1")
        await first.aclose()
        await second.aclose()


def test_pin_refuses_changes_to_bound_settings_in_ga_and_beta_form() -> None:
    """Bound leaves may be repeated but not changed; open fields stay free; beta spellings are caught too."""
    pin = Pin(TRANSCRIPTION_SESSION)
    assert pin.conflict({"type": "transcription", "audio": {"input": {"format": PCM}}}) is None
    assert pin.conflict({"audio": {"input": {"transcription": {"language": "en"}, "noise_reduction": None}}}) is None
    assert pin.conflict({"input_audio_format": "pcm16"}) is None
    assert pin.conflict({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}) == "audio.input.format.type"
    assert pin.conflict({"input_audio_format": "g711_ulaw"}) == "audio.input.format.type"
    assert pin.conflict({"audio": {"input": {"format": None}}}) == "audio.input.format"
    assert pin.conflict({"type": "realtime"}) == "type"
    assert pin.conflict({"turn_detection": {"type": "server_vad"}}) == "audio.input.turn_detection"
    assert pin.conflict({"input_audio_transcription": {"model": "whisper-1"}}) == "audio.input.transcription.model"


def test_settings_read_the_new_variables() -> None:
    """SIDECAR_CLIENT_SECRET_KEY, SIDECAR_CAPTIONS_PAGE and SIDECAR_CAPTIONS_KEY parse and validate."""
    base = {"SIDECAR_LITELLM_CONFIG": "config.yaml"}
    plain = Settings.from_env(base)
    assert (plain.client_secret_key, plain.captions_page, plain.captions_key) == (None, False, None)
    full = Settings.from_env(
        {**base, "SIDECAR_CLIENT_SECRET_KEY": SECRET_KEY, "SIDECAR_CAPTIONS_PAGE": "1", "SIDECAR_CAPTIONS_KEY": "sk-c"}
    )
    assert (full.client_secret_key, full.captions_page, full.captions_key) == (SECRET_KEY, True, "sk-c")
    assert SECRET_KEY not in repr(full) and "sk-c" not in repr(full)
    for bad in (
        {"SIDECAR_CLIENT_SECRET_KEY": "short"},
        {"SIDECAR_CAPTIONS_PAGE": "1"},
        {"SIDECAR_CAPTIONS_PAGE": "maybe", "SIDECAR_CAPTIONS_KEY": "sk-c"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env({**base, **bad})


# ---- minting over HTTP ------------------------------------------------------------------------------------------


async def test_sdk_mints_a_secret_in_the_openai_shape(tmp_path: Path) -> None:
    """client.realtime.client_secrets.create returns value, expires_at and the bound session; no key inside."""
    async with secrets_stack(tmp_path) as s:
        created = await mint(s, expires_after={"anchor": "created_at", "seconds": 120})
        assert created.value.startswith("ek_") and USER_KEY not in created.value
        assert created.session.type == "transcription"
        assert created.session.audio is not None and created.session.audio.input is not None
        assert created.session.audio.input.transcription is not None
        assert created.session.audio.input.transcription.model == WHISPER
        payload = payload_of(created.value)
        assert (payload["exp"] - payload["iat"], payload["exp"]) == (120, created.expires_at)
        assert (payload["kh"], payload["m"], payload["tr"]) == (hash_key(USER_KEY), WHISPER, True)
        realtime = await mint(s, session={"type": "realtime", "model": "gpt-realtime"})
        assert realtime.session.type == "realtime" and realtime.session.model == "gpt-realtime"
        assert payload_of(realtime.value)["exp"] - payload_of(realtime.value)["iat"] == DEFAULT_TTL_S


async def test_minting_refusals_match_the_websocket_table(tmp_path: Path) -> None:
    """401/403/404/400 with the WebSocket's codes and an OpenAI error body; the SDK raises its own errors."""
    async with secrets_stack(tmp_path) as s:
        lite = s.litellm
        lite.add_key("sk-blocked", blocked=True)
        lite.add_key("sk-narrow", models=["gpt-realtime"])
        lite.add_key("sk-broke", max_budget=1.0, spend=1.5)

        def session(model: str) -> dict[str, Any]:
            return {"type": "realtime", "model": model}

        cases: list[tuple[dict[str, str], Any, int, str]] = [
            ({}, {}, 401, "invalid_api_key"),
            ({"Authorization": "Bearer sk-unknown"}, {}, 401, "invalid_api_key"),
            ({"Authorization": "Bearer sk-blocked"}, {"session": session(WHISPER)}, 403, "key_blocked"),
            ({"Authorization": "Bearer sk-narrow"}, {"session": session(WHISPER)}, 403, "model_not_allowed"),
            ({"Authorization": "Bearer sk-broke"}, {"session": session(WHISPER)}, 403, "budget_exceeded"),
            ({"api-key": USER_KEY}, {"session": session("nope")}, 404, "model_not_found"),
            ({"api-key": USER_KEY}, {"session": session("whisper-1")}, 400, "model_not_realtime"),
            ({"api-key": USER_KEY}, {"expires_after": {"seconds": 1}}, 400, "invalid_request"),
            ({"api-key": USER_KEY}, "not json", 400, "invalid_request"),
        ]
        async with httpx.AsyncClient(base_url=s.sidecar.http) as http:
            for headers, body, status, code in cases:
                content = body if isinstance(body, str) else orjson.dumps(body)
                response = await http.post("/v1/realtime/client_secrets", headers=headers, content=content)
                assert (response.status_code, response.json()["error"]["code"]) == (status, code), (headers, body)
                assert set(response.json()["error"]) >= {"message", "type", "code"}
                assert response.headers["cache-control"] == "no-store"
        with pytest.raises(openai.PermissionDeniedError):
            await mint(s, "sk-narrow")
        secret = (await mint(s)).value
        with pytest.raises(openai.AuthenticationError):
            await mint(s, secret)  # a client secret cannot mint client secrets


async def test_redis_mode_without_a_signing_key_refuses_to_mint(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Replicas sharing Redis need SIDECAR_CLIENT_SECRET_KEY: without it minting answers 503."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with stack(tmp_path, redis=client, control_prefix=f"test:{unique}") as s:
            with pytest.raises(openai.InternalServerError) as info:
                await mint(s)
            assert info.value.status_code == 503
    finally:
        await client.aclose()


# ---- connecting with a secret -------------------------------------------------------------------------------------


async def test_browser_form_session_is_pinned_upstream_and_billed_to_the_minting_key(
    tmp_path: Path, speech_pcm16: bytes
) -> None:
    """The secret opens a transcription session; bound settings go upstream first; usage bills the key's hash."""
    async with secrets_stack(tmp_path) as s:
        secret = (await mint(s)).value
        ws = await browser_connect(s, secret)
        updated = await next_raw(ws, "session.updated")
        assert updated["session"]["audio"]["input"]["transcription"]["model"] == WHISPER
        for audio in chunks(speech_pcm16):
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}).decode())
        await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
        done = await next_raw(ws, "conversation.item.input_audio_transcription.completed")
        assert done["transcript"] == DEFAULT_TRANSCRIPT
        await ws.close()
        row = await s.final_row()
        first = s.provider.sessions[0].events[0]
        assert first["type"] == "session.update"
        assert first["session"]["audio"]["input"]["turn_detection"] is None
        assert first["session"]["audio"]["input"]["format"] == PCM
    assert (row.key_hash, row.key_alias, row.model) == (hash_key(USER_KEY), "alice-key", WHISPER)
    assert (row.audio_bytes, row.audio_seconds) == (len(speech_pcm16), Decimal(len(speech_pcm16)) / 48000)


async def test_sdk_connects_with_the_secret_as_its_api_key(tmp_path: Path) -> None:
    """The openai SDK given the secret as api_key (Authorization: Bearer ek_...) opens the bound session."""
    async with secrets_stack(tmp_path) as s:
        secret = (await mint(s)).value
        async with s.sidecar.openai(secret).realtime.connect(
            model=WHISPER, extra_query={"intent": "transcription"}
        ) as conn:
            created = await next_of(conn, "session.created")
            assert created.session.type == "transcription"


async def test_a_secret_opens_one_session_only(tmp_path: Path) -> None:
    """The second connect with a used secret is refused 401, even while the first session is live."""
    async with secrets_stack(tmp_path) as s:
        secret = (await mint(s)).value
        ws = await browser_connect(s, secret)
        assert await refused(s, secret) == (401, "invalid_api_key")
        await ws.close()
        assert await refused(s, secret) == (401, "invalid_api_key")


async def test_single_use_holds_across_replicas(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Minted on replica A, used on replica B; A then refuses it: the claim lives in the shared Redis."""
    async with replicas(tmp_path, redis_url, unique, client_secret_key=SECRET_KEY) as pair:
        secret = (await mint(pair.a)).value
        ws = await browser_connect(pair.b, secret)
        assert await refused(pair.a, secret) == (401, "invalid_api_key")
        await ws.close()


async def test_expired_tampered_and_foreign_secrets_are_refused_at_connect(tmp_path: Path) -> None:
    """An expired secret (minted on an injected clock), a tampered one, one signed elsewhere: 401 each."""
    async with secrets_stack(tmp_path) as s:
        past = ClientSecrets(signer=Signer(SECRET_KEY), claims=MemoryClaims(), clock=lambda: 1_000_000.0)
        _, expired = past.mint(
            key_hash=hash_key(USER_KEY), model=WHISPER, transcription=True, session=TRANSCRIPTION_SESSION, ttl_s=60
        )
        live = (await mint(s)).value
        body, _, mac = live.rpartition(".")
        tampered = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + mac
        foreign = Signer("another-server-signing-key-0123456789").sign(grant(created_at=2**40 - 60, expires_at=2**40))
        for secret in (expired, tampered, foreign):
            assert await refused(s, secret) == (401, "invalid_api_key")
        ws = await browser_connect(s, live)  # the refusals did not use up the live one
        await ws.close()


async def test_a_different_model_in_the_query_is_refused(tmp_path: Path) -> None:
    """A secret bound to one model cannot open another: 403 model_not_allowed; the secret stays usable."""
    async with secrets_stack(tmp_path) as s:
        secret = (await mint(s)).value
        assert await refused(s, secret, "model=gpt-realtime") == (403, "model_not_allowed")
        ws = await browser_connect(s, secret, f"model={WHISPER}&intent=transcription")
        await ws.close()


async def test_a_key_blocked_or_deleted_after_minting_is_refused_at_connect(tmp_path: Path) -> None:
    """The minting key is re-checked fresh at connect: blocked -> 403 key_blocked, deleted -> 401."""
    async with secrets_stack(tmp_path) as s:
        first, second = (await mint(s)).value, (await mint(s)).value
        s.litellm.update_key(USER_KEY, blocked=True)
        assert await refused(s, first) == (403, "key_blocked")
        s.litellm.delete_key(USER_KEY)
        assert await refused(s, second) == (401, "invalid_api_key")


async def test_a_secret_session_is_revoked_like_any_other(tmp_path: Path) -> None:
    """An admin revocation of the minting key's hash ends the secret's session with 4001 key_revoked."""
    async with secrets_stack(tmp_path) as s:
        ws = await browser_connect(s, (await mint(s)).value)
        async with httpx.AsyncClient(base_url=s.sidecar.http) as http:
            response = await http.post(
                "/admin/revocations",
                json={"key_hash": hash_key(USER_KEY)},
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
            )
        assert response.status_code == 202
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                last = orjson.loads(await ws.recv())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        assert last["error"]["code"] == "key_revoked"
        assert (await s.final_row()).close_reason == "key_revoked"


async def test_session_updates_may_not_change_bound_settings(tmp_path: Path) -> None:
    """Changing the bound format or type answers session_pinned; another model model_mismatch; open fields pass."""
    async with secrets_stack(tmp_path) as s:
        ws = await browser_connect(s, (await mint(s)).value)
        await next_raw(ws, "session.updated")  # the bound settings, applied first
        attempts: list[tuple[dict[str, Any], str]] = [
            ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session_pinned"),
            ({"type": "realtime"}, "session_pinned"),
            (
                {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}},
                "session_pinned",
            ),
            (
                {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}},
                "model_mismatch",
            ),
        ]
        for session, code in attempts:
            await ws.send(orjson.dumps({"type": "session.update", "event_id": "e1", "session": session}).decode())
            error = await next_raw(ws, "error")
            assert (error["error"]["code"], error["error"]["event_id"]) == (code, "e1")
        await ws.send(
            orjson.dumps(
                {"type": "transcription_session.update", "session": {"input_audio_format": "g711_alaw"}}
            ).decode()
        )
        assert (await next_raw(ws, "error"))["error"]["code"] == "session_pinned"
        allowed = {"type": "transcription", "audio": {"input": {"transcription": {"model": WHISPER, "language": "en"}}}}
        await ws.send(orjson.dumps({"type": "session.update", "session": allowed}).decode())
        updated = await next_raw(ws, "session.updated")
        assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
        assert updated["session"]["audio"]["input"]["format"] == PCM
        await ws.close()
        updates = [e for e in s.provider.sessions[0].events if e["type"].endswith("session.update")]
        assert len(updates) == 2  # the bound settings and the allowed update; nothing refused went upstream
