"""Contract tests: the sidecar on a real socket, the official openai SDK as client, a fake provider."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.protocol import APPEND
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, FakeProvider, Faults
from tests.relay_stack import MASTER_KEY, USER_KEY, entry, stack
from tests.support import COMPLETED, TRANSCRIBE, chunks, next_of, next_raw, sdk_transcript


async def refusal(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Open a WebSocket that must be refused; return the HTTP status and JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers or {}):
            pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


async def test_sdk_streams_speech_and_receives_transcript(tmp_path: Path, speech_pcm16: bytes) -> None:
    """The openai SDK streams the test speech in 100 ms chunks, commits, and gets the transcript."""
    async with stack(tmp_path) as s:
        assert await sdk_transcript(s.sidecar.openai(USER_KEY), speech_pcm16) == DEFAULT_TRANSCRIPT
        upstream = s.provider.sessions[0]
        assert upstream.audio_bytes == len(speech_pcm16) == 320022


async def test_master_key_api_key_header_and_browser_subprotocol(tmp_path: Path) -> None:
    """The master key, the api-key header and the browser subprotocol form all authenticate."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {MASTER_KEY}"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        async with connect(url, additional_headers={"api-key": USER_KEY}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        protocols = ["realtime", f"openai-insecure-api-key.{USER_KEY}"]
        async with connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            assert orjson.loads(await ws.recv())["type"] == "session.created"
        async with connect(f"{s.sidecar.ws}/realtime?intent=transcription", subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert orjson.loads(await ws.recv())["session"]["type"] == "transcription"


async def test_every_refusal_has_its_status_and_code(tmp_path: Path) -> None:
    """Each row of the contract's refusal table, answered before the upgrade."""
    async with stack(tmp_path) as s:
        lite = s.litellm
        lite.add_key("sk-expired", expires="2000-01-01T00:00:00Z")
        lite.add_key("sk-blocked", blocked=True)
        lite.add_key("sk-narrow", models=["gpt-realtime"])
        lite.add_key("sk-broke", max_budget=1.0, spend=1.5)
        lite.add_key("sk-team", team_id="t1")
        lite.teams["t1"] = {"blocked": True, "models": []}
        base = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"

        def bearer(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        cases: list[tuple[str, dict[str, str], int, str]] = [
            (base, {}, 401, "invalid_api_key"),
            (base, bearer("sk-unknown"), 401, "invalid_api_key"),
            (base, bearer("sk-expired"), 401, "invalid_api_key"),
            (base, bearer("sk-blocked"), 403, "key_blocked"),
            (base, bearer("sk-team"), 403, "key_blocked"),
            (base, bearer("sk-narrow"), 403, "model_not_allowed"),
            (base, bearer("sk-broke"), 403, "budget_exceeded"),
            (f"{s.sidecar.ws}/v1/realtime?model=nope", bearer(USER_KEY), 404, "model_not_found"),
            (f"{s.sidecar.ws}/v1/realtime?model=whisper-1", bearer(USER_KEY), 400, "model_not_realtime"),
        ]
        for url, headers, status, code in cases:
            got_status, body = await refusal(url, headers)
            assert (got_status, body["error"]["code"]) == (status, code), (url, headers)
            assert set(body["error"]) >= {"message", "type", "code"}


async def test_all_deployments_down_is_502_and_failover_uses_the_next(tmp_path: Path) -> None:
    """A refusing first deployment fails over to the second; when all refuse, 502 upstream_unavailable."""
    async with FakeProvider(faults=Faults(refuse_status=500)) as bad, FakeProvider() as good:
        entries = [
            entry("gpt-realtime-whisper", "openai/gpt-realtime-whisper", bad.url, bad.api_key),
            entry("gpt-realtime-whisper", "openai/gpt-realtime-whisper", good.url, good.api_key),
            entry("broken", "openai/gpt-realtime-whisper", bad.url, bad.api_key, model_info={"realtime": True}),
        ]
        async with stack(tmp_path, entries=entries, provider=good) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime-whisper", extra_query=TRANSCRIBE) as conn:
                await next_of(conn, "session.created")
            assert len(bad.handshakes) == 1 and len(good.handshakes) == 1
            url = f"{s.sidecar.ws}/v1/realtime?model=broken&intent=transcription"
            status, body = await refusal(url, {"Authorization": f"Bearer {USER_KEY}"})
            assert (status, body["error"]["code"]) == (502, "upstream_unavailable")
            assert bad.host_port not in orjson.dumps(body).decode()


async def test_session_update_model_is_rewritten_and_mismatch_refused(tmp_path: Path) -> None:
    """session.update: the public model is rewritten to the deployment name; any other model is refused."""
    async with FakeProvider() as provider:
        entries = [entry("captions", "openai/gpt-realtime-whisper", provider.url, provider.api_key)]
        async with stack(tmp_path, entries=entries, provider=provider) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="captions", extra_query=TRANSCRIBE) as conn:
                created = await next_of(conn, "session.created")
                assert "gpt-realtime-whisper" not in created.model_dump_json()
                await conn.session.update(
                    session={
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"model": "captions", "language": "en"}}},
                    }
                )
                updated = await next_of(conn, "session.updated")
                assert updated.session.audio.input.transcription.model == "captions"
                await conn.session.update(
                    session={
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"model": "whisper-1"}}},
                    }
                )
                error = await next_of(conn, "error")
                assert error.error.code == "model_mismatch"
            forwarded = [e for e in provider.sessions[0].events if e["type"] == "session.update"]
            assert len(forwarded) == 1
            assert forwarded[0]["session"]["audio"]["input"]["transcription"]["model"] == "gpt-realtime-whisper"


async def test_openai_transcription_gets_model_in_session_not_url(tmp_path: Path) -> None:
    """On an OpenAI host, a transcription session carries no ?model= and the sidecar sets the model itself."""
    async with FakeProvider(faults=Faults(reject_model_on_transcription=True)) as provider:
        async with stack(tmp_path, provider=provider, openai_hosts=("127.0.0.1",)) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime-whisper", extra_query=TRANSCRIBE) as conn:
                await next_of(conn, "session.updated")
            handshake = provider.handshakes[0]
            assert handshake.path == "/v1/realtime"
            assert handshake.query == {"intent": "transcription"}
            first = provider.sessions[0].events[0]
            assert first["type"] == "session.update"
            assert first["session"]["audio"]["input"]["transcription"]["model"] == "gpt-realtime-whisper"


async def test_no_frame_reveals_upstream_key_or_host(tmp_path: Path) -> None:
    """The provider's error naming its key, host and deployment reaches the client scrubbed."""
    async with FakeProvider() as provider:
        entries = [
            entry(
                "captions",
                "openai/secret-deployment-7",
                provider.url,
                provider.api_key,
                model_info={"base_model": "gpt-realtime-whisper"},
            )
        ]
        async with stack(tmp_path, entries=entries, provider=provider) as s:
            url = f"{s.sidecar.ws}/v1/realtime?model=captions&intent=transcription"
            frames: list[str] = []
            async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
                await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
                while True:
                    frame = await ws.recv()
                    assert isinstance(frame, str)
                    frames.append(frame)
                    if orjson.loads(frame)["type"] == "error":
                        break
            raw = "".join(frames)
            for secret in (provider.api_key, provider.host_port, "127.0.0.1", "secret-deployment-7"):
                assert secret not in raw
            assert orjson.loads(frames[-1])["error"]["code"] == "input_audio_buffer_commit_empty"


async def test_bad_input_gets_errors_and_the_session_lives_on(tmp_path: Path) -> None:
    """Malformed JSON, a non-object, invalid base64, binary and unknown events never end the session."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            await ws.send("{not json")
            assert orjson.loads(await ws.recv())["error"]["code"] == "invalid_json"
            await ws.send("[1, 2]")
            assert orjson.loads(await ws.recv())["error"]["code"] == "invalid_event"
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "@@@notbase64"}).decode())
            assert orjson.loads(await ws.recv())["error"]["code"] == "invalid_base64"
            await ws.send(b"\x00\x01binary")
            assert orjson.loads(await ws.recv())["error"]["code"] == "binary_not_supported"
            await ws.send(orjson.dumps({"type": "no.such.event"}).decode())
            assert orjson.loads(await ws.recv())["error"]["code"] == "unknown_event"
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            assert orjson.loads(await ws.recv())["type"] == "input_audio_buffer.committed"
        upstream = s.provider.sessions[0]
        assert [e.get("type") for e in upstream.events] == [
            "no.such.event",
            "input_audio_buffer.append",
            "input_audio_buffer.commit",
        ]


async def test_fragments_and_pings_go_through_websockets_around_the_fast_path(tmp_path: Path) -> None:
    """A fragmented message and a ping from the client (frames sidecar/wsserver.py leaves to websockets)
    arrive whole and answered between plain frames; invalid UTF-8 in a text frame closes with 1007."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
            text = orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAAAAAA"}).decode()
            await ws.send([text[:10], text[10:20], text[20:]])  # one message in three frames
            pong = await ws.ping(b"are you there")
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            await asyncio.wait_for(pong, 10)
            assert orjson.loads(await ws.recv())["type"] == "input_audio_buffer.committed"
            await ws.send(b"\xff\xfe not utf-8", text=True)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
        upstream = s.provider.sessions[0]
        appends = [e["audio"] for e in upstream.events if e.get("type") == "input_audio_buffer.append"]
        assert appends == ["AAAA", "AAAAAAAA"]
        assert upstream.audio_bytes == 9


async def test_frame_over_the_limit_closes_with_1009(tmp_path: Path) -> None:
    """A client frame larger than the configured limit ends the session with 1009, billed once."""
    async with stack(tmp_path, max_frame_bytes=64 * 1024) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
            await ws.recv()
            big = base64.b64encode(b"\x00" * 60_000).decode()
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": big}).decode())
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await s.provider.sessions[0].closed.wait()
        await s.sidecar.app.state.services.supervisor.live_empty()
        await s.sidecar.app.state.services.publisher.settled()
        assert [(r.status, r.close_reason) for r in s.rows()] == [("final", "frame_too_large")]


async def test_upstream_drop_closes_client_with_1011(tmp_path: Path, speech_pcm16: bytes) -> None:
    """When the provider drops the TCP connection mid-stream, the client gets upstream_error then 1011."""
    async with FakeProvider(faults=Faults(drop_after_appends=3)) as provider:
        async with stack(tmp_path, provider=provider) as s:
            url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
            async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
                for audio in list(chunks(speech_pcm16))[:3]:
                    await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}).decode())
                received: list[dict[str, Any]] = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        received.append(orjson.loads(await ws.recv()))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
            assert received[-1]["type"] == "error" and received[-1]["error"]["code"] == "upstream_error"


async def test_close_codes_are_relayed_both_ways(tmp_path: Path) -> None:
    """An upstream clean close code reaches the client; a client close code reaches the upstream."""
    async with FakeProvider(faults=Faults(close_after_appends=(1, 4321, "provider says bye"))) as provider:
        async with stack(tmp_path, provider=provider) as s:
            url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
            headers = {"Authorization": f"Bearer {USER_KEY}"}
            async with connect(url, additional_headers=headers) as ws:
                await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4321
            provider.faults.close_after_appends = None
            async with connect(url, additional_headers=headers) as ws:
                await ws.recv()
                await ws.close(code=4000, reason="client done")
            second = await provider.wait_for_session(1)
            await second.closed.wait()
            assert second.close_code == 4000


async def test_client_abort_closes_the_upstream(tmp_path: Path) -> None:
    """A client that vanishes without a close frame gets its upstream session closed."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"})
        await ws.recv()
        ws.transport.abort()
        upstream = await s.provider.wait_for_session(0)
        await asyncio.wait_for(upstream.closed.wait(), timeout=10)
        assert upstream.closed.is_set()


async def test_slow_client_holds_the_upstream_back(tmp_path: Path) -> None:
    """A client that stops reading stalls the provider's sends (bounded buffers), and then everything arrives."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        async with connect(url, additional_headers=headers, max_queue=1, max_size=None) as ws:
            await ws.recv()
            # A first client frame puts the sidecar's client connection on its fast (and direct) path.
            await ws.send(orjson.dumps({"type": APPEND, "audio": "AAAA"}).decode())
            big = {"type": "response.output_text.delta", "delta": "x" * 1_000_000}
            count = 64  # 64 MB: far more than the sidecar's bounded queues and socket buffers hold
            push = asyncio.create_task(_push(s.provider, big, count))
            # Negative check: while the client reads nothing, the provider cannot finish pushing.
            done, _ = await asyncio.wait([push], timeout=2)
            assert not done
            received: list[str] = []
            while len(received) < count:
                event = orjson.loads(await ws.recv())
                if event["type"] == "response.output_text.delta":
                    received.append(event["item_id"])
            await push
            # Back on the direct path once the client reads again: the next frame still comes after them.
            await s.provider.send_all({**big, "delta": "after", "item_id": "last"})
            assert (await next_raw(ws, "response.output_text.delta"))["item_id"] == "last"
        assert received == [f"item_{n}" for n in range(count)]  # queued and direct frames kept their order


async def _push(provider: FakeProvider, event: dict[str, Any], count: int) -> None:
    for n in range(count):
        await provider.send_all({**event, "item_id": f"item_{n}"})


async def test_stalled_provider_holds_the_client_back(tmp_path: Path) -> None:
    """A provider that stops reading stalls the client's sends (bounded buffers); then every append arrives,
    in order, and is metered once."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        audio = base64.b64encode(bytes(750_000)).decode()  # 1 MB of base64 per append
        count = 64
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            await ws.recv()
            upstream = await s.provider.wait_for_session(0)
            s.provider.hold_reads()

            async def push() -> None:
                for n in range(count):
                    await ws.send(orjson.dumps({"type": APPEND, "event_id": f"a{n}", "audio": audio}).decode())

            pushing = asyncio.create_task(push())
            # Negative check: while the provider reads nothing, the client cannot finish sending.
            done, _ = await asyncio.wait([pushing], timeout=2)
            assert not done
            s.provider.release_reads()
            await pushing
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            await next_raw(ws, COMPLETED)
        appends = [e["event_id"] for e in upstream.events if e.get("type") == APPEND]
        assert appends == [f"a{n}" for n in range(count)]
        assert upstream.audio_bytes == count * 750_000


async def test_models_endpoint_lists_realtime_models(tmp_path: Path) -> None:
    """GET /v1/realtime/models lists the realtime models with kind, unit and price, never upstream details."""
    import httpx

    async with stack(tmp_path) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        body = (await http.get("/v1/realtime/models")).json()
        ids = [row["id"] for row in body["data"]]
        assert ids == ["gpt-realtime-whisper", "gpt-realtime"]
        assert body["data"][0]["unit"] == "second"
        assert [row["routes"] for row in body["data"]] == [["/v1/realtime"], ["/v1/realtime"]]
        assert s.provider.api_key not in str(body) and s.provider.host_port not in str(body)
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_azure_preview_form_reaches_the_provider_exactly(tmp_path: Path) -> None:
    """An Azure deployment on the preview form (realtime_protocol beta) uses its exact path, query and
    api-key header. (The GA form, the default, is in test_azure_transcription.py.)"""
    async with FakeProvider() as provider:
        entries = [
            entry(
                "captions",
                "azure/my-whisper",
                provider.url,
                provider.api_key,
                model_info={"base_model": "azure/gpt-realtime-whisper"},
                api_version="2025-04-01-preview",
                realtime_protocol="beta",
            )
        ]
        async with stack(tmp_path, entries=entries, provider=provider) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="captions", extra_query=TRANSCRIBE) as conn:
                created = await next_of(conn, "session.created")
                assert "my-whisper" not in created.model_dump_json()
            handshake = provider.handshakes[0]
            query = {"api-version": "2025-04-01-preview", "deployment": "my-whisper", "intent": "transcription"}
            assert (handshake.path, handshake.query) == ("/openai/realtime", query)
            assert handshake.headers["api-key"] == provider.api_key
            assert "authorization" not in handshake.headers
