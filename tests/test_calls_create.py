"""WebRTC call create and hangup through a real sidecar (issue 17, items 1 and 3's client side): the official
SDK and plain HTTP against the app stack, with the fake WebRTC provider (sidecar/testing/fake_calls.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.calls import endpoints
from sidecar.calls.offer import parse_realtime
from sidecar.testing.fake_calls import FakeCall, FakeCallProvider
from sidecar.testing.fake_provider import FakeProvider
from sidecar.testing.fake_sdp import BROWSER_OFFER
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, entry, stack

RT = "gpt-realtime"
RT_DEPLOYMENT = "my-rt-deployment"
LIVE = "gpt-live-1"
LIVE_DEPLOYMENT = "my-live-deployment"
WHISPER = "gpt-realtime-whisper"
TRANSCRIBER = "whisper-1"
TRANSCRIBER_DEPLOYMENT = "my-whisper-deployment"
OTHER_KEY = "sk-other-key-test-0002"
WS_MODEL = "ws-realtime"


def entries(*providers: FakeCallProvider, azure: bool = False) -> list[dict[str, Any]]:
    """gpt-realtime (a deployment per provider, in order), gpt-live-1 and the transcription model."""
    out = []
    for fake in providers:
        if azure:
            out.append(
                entry(
                    RT,
                    f"azure/{RT_DEPLOYMENT}",
                    fake.url,
                    fake.api_key,
                    model_info={"base_model": "azure/gpt-realtime"},
                )
            )
        else:
            out.append(entry(RT, f"openai/{RT_DEPLOYMENT}", fake.url, fake.api_key, model_info={"base_model": RT}))
    first = providers[0]
    out.append(entry(LIVE, f"openai/{LIVE_DEPLOYMENT}", first.url, first.api_key, model_info={"base_model": LIVE}))
    out.append(entry(WHISPER, f"openai/{WHISPER}", first.url, first.api_key))
    info = {"base_model": TRANSCRIBER}
    out.append(entry(TRANSCRIBER, f"openai/{TRANSCRIBER_DEPLOYMENT}", first.url, first.api_key, model_info=info))
    return out


@contextlib.asynccontextmanager
async def calls_stack(
    tmp_path: Path, *providers: FakeCallProvider, azure: bool = False, **settings: Any
) -> AsyncIterator[Stack]:
    """A sidecar serving the call routes against `providers` (their deployments in order), and WS_MODEL on a
    WebSocket fake provider; USER_KEY and OTHER_KEY."""
    async with FakeProvider() as websocket:
        both = [*entries(*providers, azure=azure), entry(WS_MODEL, f"openai/{RT}", websocket.url, websocket.api_key)]
        async with stack(tmp_path, entries=both, provider=websocket, **settings) as running:
            running.litellm.add_key(OTHER_KEY, key_alias="bob-key", user_id="bob", team_id="")
            yield running


@contextlib.asynccontextmanager
async def fake() -> AsyncIterator[FakeCallProvider]:
    async with FakeCallProvider() as provider:
        yield provider


def secrets_of(provider: FakeCallProvider, call: FakeCall | None = None) -> list[str]:
    """What no client may see: the provider key, its host:port, the deployment names, the provider call id."""
    found = [provider.api_key, provider.url.removeprefix("http://"), RT_DEPLOYMENT, LIVE_DEPLOYMENT]
    return found + ([call.call_id] if call is not None else [])


def leaks(text: str, provider: FakeCallProvider, call: FakeCall | None = None) -> list[str]:
    return [secret for secret in secrets_of(provider, call) if secret.lower() in text.lower()]


def shown(response: httpx.Response) -> str:
    """Everything a client sees of an answer: its status line's reason, headers and body."""
    return " ".join([*(f"{k}: {v}" for k, v in response.headers.items()), response.text])


async def create_sdp(
    base: str, key: str, *, path: str = "/v1/realtime/calls", model: str | None = RT
) -> httpx.Response:
    """A plain-HTTP realtime create with an application/sdp body and the model in the query."""
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{base}{path}",
            params={"model": model} if model else None,
            content=BROWSER_OFFER.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/sdp"},
        )


async def mint(base: str, session: dict[str, Any]) -> str:
    async with httpx.AsyncClient() as http:
        minted = await http.post(
            f"{base}/v1/realtime/client_secrets",
            json={"session": session},
            headers={"Authorization": f"Bearer {USER_KEY}"},
        )
    assert minted.status_code == 200, minted.text
    value: str = minted.json()["value"]
    return value


def call_id(location: str) -> str:
    assert location.startswith("/v1/realtime/calls/rs_"), location
    return location.rsplit("/", 1)[1]


async def test_sdk_realtime_call_is_created_watched_hung_up_and_billed(tmp_path: Path) -> None:
    """The SDK's multipart create gets 201, the provider's SDP answer and a Location on the sidecar's own id;
    the provider sees its key and the deployment's model; the SDK's hangup ends it as client_hangup, billed once."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        client = running.sidecar.openai(USER_KEY)
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT, "instructions": "Be brief."}
        )
        call = await provider.wait_for_call()
        answer = raw.http_response
        assert answer.status_code == 201
        assert answer.headers["content-type"].startswith("application/sdp")
        assert answer.text == call.answer_sdp
        session_id = call_id(answer.headers["location"])
        assert leaks(shown(answer), provider, call) == []
        assert call.auth == f"Bearer {provider.api_key}"
        assert call.session["model"] == RT_DEPLOYMENT and call.session["instructions"] == "Be brief."
        assert call.offer_sdp == BROWSER_OFFER
        assert session_id in running.sidecar.app.state.services.supervisor.live
        await call.wait_for_sideband()
        await client.realtime.calls.hangup(session_id)
        await call.hung_up.wait()
        row = await running.final_row()
        assert (row.session_id, row.close_reason, row.model) == (session_id, "client_hangup", RT)


async def test_plain_sdp_create_with_the_query_model_on_every_path(tmp_path: Path) -> None:
    """application/sdp with ?model= works on /v1/realtime/calls and its aliases; hangup works on the alias too."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        for index, path in enumerate(("/v1/realtime/calls", "/realtime/calls", "/openai/v1/realtime/calls")):
            answer = await create_sdp(running.sidecar.http, MASTER_KEY, path=path)
            assert answer.status_code == 201, answer.text
            call = await provider.wait_for_call(index)
            assert call.session["model"] == RT_DEPLOYMENT
            session_id = call_id(answer.headers["location"])
            async with httpx.AsyncClient() as http:
                hung = await http.post(
                    f"{running.sidecar.http}{path}/{session_id}/hangup",
                    headers={"Authorization": f"Bearer {MASTER_KEY}"},
                )
            assert hung.status_code == 200
            await call.hung_up.wait()
        services = running.sidecar.app.state.services
        await services.supervisor.live_empty()
        await services.publisher.settled()
        assert sorted(row.close_reason for row in running.rows() if row.status == "final") == ["client_hangup"] * 3


async def test_client_secret_is_used_up_and_never_reaches_the_provider(tmp_path: Path) -> None:
    """A browser's client secret creates one call: the provider sees the deployment key, the secret's model and
    bound settings; a second create with it is 401; a request changing a bound setting is 400 session_pinned
    and leaves the secret usable."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        secret = await mint(running.sidecar.http, {"type": "realtime", "model": RT, "instructions": "bound"})
        browser = running.sidecar.openai(secret)
        with pytest.raises(openai.BadRequestError) as pinned:
            await browser.realtime.calls.create(sdp=BROWSER_OFFER, session={"type": "realtime", "instructions": "mine"})
        assert pinned.value.code == "session_pinned"
        raw = await browser.realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER)
        assert raw.http_response.status_code == 201
        call = await provider.wait_for_call()
        assert secret not in call.auth and call.auth == f"Bearer {provider.api_key}"
        assert call.session["model"] == RT_DEPLOYMENT and call.session["instructions"] == "bound"
        with pytest.raises(openai.AuthenticationError):
            await browser.realtime.calls.create(sdp=BROWSER_OFFER)
        assert len(provider.calls) == 1
        session_id = call_id(raw.http_response.headers["location"])
        # The secret stands for its key on the hangup (checked, not used up again).
        await browser.realtime.calls.hangup(session_id)
        row = await running.final_row()
        assert row.close_reason == "client_hangup" and row.key_alias == "alice-key"
        # Nothing the provider received (creates, sideband handshakes, hangup) carried the secret or the user key.
        assert {r.method for r in provider.requests} == {"POST", "WEBSOCKET"}
        for received in provider.requests:
            seen = " ".join([received.path, *received.query.values(), *received.headers.values()])
            assert secret not in seen and USER_KEY not in seen


async def test_secret_for_another_model_and_transcription_secret(tmp_path: Path) -> None:
    """A secret's model wins: naming another one is 403; a transcription secret makes a transcription call."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        secret = await mint(
            running.sidecar.http, {"type": "transcription", "audio": {"input": {"transcription": {"model": WHISPER}}}}
        )
        answer = await create_sdp(running.sidecar.http, secret, model=RT)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "model_not_allowed"
        answer = await create_sdp(running.sidecar.http, secret, model=None)
        assert answer.status_code == 201, answer.text
        call = await provider.wait_for_call()
        assert call.session["type"] == "transcription"
        assert call.session["audio"]["input"]["transcription"]["model"] == WHISPER
        assert "model" not in call.session


async def test_model_refusals_are_counted_and_bill_nothing(tmp_path: Path) -> None:
    """Unknown, unauthorized, missing and wrong-route models are refused before the provider is asked."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        running.litellm.update_key(OTHER_KEY, models=[WHISPER])
        base = running.sidecar.http
        cases = [
            (USER_KEY, "no-such-model", 404, "model_not_found"),
            (OTHER_KEY, RT, 403, "model_not_allowed"),
            (USER_KEY, None, 404, "model_not_found"),
            (USER_KEY, LIVE, 400, "model_not_realtime"),
            ("sk-unknown", RT, 401, "invalid_api_key"),
        ]
        for key, model, status, code in cases:
            answer = await create_sdp(base, key, model=model)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
        assert provider.offer_attempts == 0 and running.rows() == []
        metrics = running.sidecar.app.state.services.metrics.render().decode()
        assert 'sidecar_refusals_total{code="model_not_allowed",model="gpt-realtime"} 1.0' in metrics


async def test_lease_limit_and_budget(tmp_path: Path) -> None:
    """The key's concurrency lease counts live calls (429 past it); a spent budget is 403; both bill nothing."""
    async with fake() as provider, calls_stack(tmp_path, provider, max_sessions_per_key=1) as running:
        first = await create_sdp(running.sidecar.http, USER_KEY)
        assert first.status_code == 201
        second = await create_sdp(running.sidecar.http, USER_KEY)
        assert second.status_code == 429 and second.json()["error"]["code"] == "concurrency_limit"
        assert len(provider.calls) == 1
        running.litellm.update_key(OTHER_KEY, spend=10.0, max_budget=5.0)
        broke = await create_sdp(running.sidecar.http, OTHER_KEY)
        assert broke.status_code == 403 and broke.json()["error"]["code"] == "budget_exceeded"
        assert len(provider.calls) == 1
        await running.sidecar.openai(USER_KEY).realtime.calls.hangup(call_id(first.headers["location"]))
        row = await running.final_row()  # the one call, billed once; the refused ones not at all
        assert row.close_reason == "client_hangup"


async def test_failover_and_all_deployments_failing(tmp_path: Path) -> None:
    """A deployment answering 500 is skipped for the next (counted); when every one fails the client gets 502
    with no provider detail, the lease is released and nothing is billed."""
    async with fake() as bad, fake() as good, calls_stack(tmp_path, bad, good, max_sessions_per_key=1) as running:
        bad.refuse_offer_status = 500
        answer = await create_sdp(running.sidecar.http, USER_KEY)
        assert answer.status_code == 201
        assert bad.offer_attempts == 1 and bad.calls == [] and len(good.calls) == 1
        metrics = running.sidecar.app.state.services.metrics.render().decode()
        assert "sidecar_upstream_connect_failures_total{" in metrics
        await running.sidecar.openai(USER_KEY).realtime.calls.hangup(call_id(answer.headers["location"]))
        await running.final_row()

        good.refuse_offer_status = 429
        failed = await create_sdp(running.sidecar.http, USER_KEY)
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_unavailable"
        assert leaks(shown(failed), bad) == [] and leaks(shown(failed), good) == []
        assert len(running.rows()) == 1  # still only the first call's row
        good.refuse_offer_status = None  # the lease of the failed create was given back: the key may call again
        again = await create_sdp(running.sidecar.http, USER_KEY)
        assert again.status_code == 201, again.text


async def test_offer_the_provider_refuses_is_the_clients_error_scrubbed(tmp_path: Path) -> None:
    """A 4xx about the offer itself is 400 offer_refused with the provider's message, no provider detail."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{running.sidecar.http}/v1/realtime/calls?model={RT}",
                content=b"v=0\r\ns=-\r\n",
                headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/sdp"},
            )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "offer_refused"
        assert "SDP" in answer.json()["error"]["message"]
        assert leaks(shown(answer), provider) == [] and running.rows() == []


async def test_malformed_creates(tmp_path: Path) -> None:
    """Bodies that are not an offer are 400 invalid_request; an oversized offer 413; nothing reaches the provider."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        async with httpx.AsyncClient() as http:
            url = f"{running.sidecar.http}/v1/realtime/calls?model={RT}"
            auth = {"Authorization": f"Bearer {USER_KEY}"}
            wrong_type = await http.post(url, json={"sdp": BROWSER_OFFER}, headers=auth)
            assert wrong_type.status_code == 400 and wrong_type.json()["error"]["code"] == "invalid_request"
            big = ("v=0\r\n" + "a=x\r\n" * 7000).encode()
            too_big = await http.post(url, content=big, headers={**auth, "Content-Type": "application/sdp"})
            assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert provider.offer_attempts == 0


async def test_azure_form(tmp_path: Path) -> None:
    """An Azure deployment is called at /openai/v1/realtime/calls with api-key and the deployment name; the
    client sees neither; the hangup goes to the Azure path."""
    async with fake() as provider, calls_stack(tmp_path, provider, azure=True) as running:
        client = running.sidecar.openai(USER_KEY)
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT}
        )
        call = await provider.wait_for_call()
        assert call.azure and call.auth == provider.api_key
        assert call.session["model"] == RT_DEPLOYMENT
        assert leaks(shown(raw.http_response), provider, call) == []
        await client.realtime.calls.hangup(call_id(raw.http_response.headers["location"]))
        await call.hung_up.wait()
        assert (await running.final_row()).close_reason == "client_hangup"


async def test_sdk_live_call_and_hangup(tmp_path: Path) -> None:
    """client.live.create gets the sidecar's id as session.id and the provider's answer; the provider sees the
    deployment's model; client.live.sessions.hangup ends it, billed once; the WebSocket route still answers."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        client = running.sidecar.openai(USER_KEY)
        created = await client.live.create(session={"model": LIVE}, transport={"type": "webrtc", "sdp": BROWSER_OFFER})
        call = await provider.wait_for_call()
        assert created.session.id.startswith("rs_") and created.transport.sdp == call.answer_sdp
        assert call.session["model"] == LIVE_DEPLOYMENT and call.auth == f"Bearer {provider.api_key}"
        assert leaks(created.model_dump_json(), provider, call) == []
        await client.live.sessions.hangup(created.session.id)
        await call.hung_up.wait()
        row = await running.final_row()
        assert (row.session_id, row.close_reason, row.model) == (created.session.id, "client_hangup", LIVE)
        # The same path is still the GPT-Live WebSocket route: an upgrade without a key is refused 401, not 405.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{running.sidecar.ws}/v1/live/sessions"):
                pass
        assert refused.value.response.status_code == 401


async def test_hangup_by_another_key_or_unknown_id_is_404(tmp_path: Path) -> None:
    """Only the call's owner (or the master key) may hang it up; another key and an unknown id get 404 and the
    call goes on."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        answer = await create_sdp(running.sidecar.http, USER_KEY)
        session_id = call_id(answer.headers["location"])
        call = await provider.wait_for_call()
        other = running.sidecar.openai(OTHER_KEY)
        with pytest.raises(openai.NotFoundError):
            await other.realtime.calls.hangup(session_id)
        with pytest.raises(openai.NotFoundError):
            await running.sidecar.openai(USER_KEY).realtime.calls.hangup("rs_" + "0" * 32)
        with pytest.raises(openai.NotFoundError):  # a realtime call id is not a GPT-Live session, even its owner's
            await running.sidecar.openai(USER_KEY).live.sessions.hangup(session_id)
        assert not call.hung_up.is_set() and session_id in running.sidecar.app.state.services.supervisor.live
        await running.sidecar.openai(MASTER_KEY).realtime.calls.hangup(session_id)
        await call.hung_up.wait()
        assert (await running.final_row()).close_reason == "client_hangup"


async def test_draining_replica_refuses_creates(tmp_path: Path) -> None:
    """A draining replica answers a create 503 service_unavailable before the provider is asked."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running, httpx.AsyncClient() as http:
        assert (await http.get(f"{running.sidecar.http}/healthz")).status_code == 200  # the lifespan has run
        await running.sidecar.app.state.services.supervisor.drain(0)
        answer = await create_sdp(running.sidecar.http, USER_KEY)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "service_unavailable"
        assert provider.offer_attempts == 0 and running.rows() == []


async def test_input_transcriber_of_a_conversation_call_is_renamed_and_billed(tmp_path: Path) -> None:
    """A conversation call naming an input transcription model (not the default one): the provider gets its
    deployment name, and the transcription seconds the sideband reports are billed at that model's price."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        session = {"type": "realtime", "model": RT, "audio": {"input": {"transcription": {"model": TRANSCRIBER}}}}
        client = running.sidecar.openai(USER_KEY)
        raw = await client.realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER, session=session)
        call = await provider.wait_for_call()
        assert call.session["audio"]["input"]["transcription"]["model"] == TRANSCRIBER_DEPLOYMENT
        await call.wait_for_sideband()
        await call.transcription_completed(seconds=30.0, usage={"type": "duration", "seconds": 30.0})
        await client.realtime.calls.hangup(call_id(raw.http_response.headers["location"]))
        row = await running.final_row()
        transcribers = running.sidecar.app.state.services.catalog.transcribers
        per_second = {name: transcribers[name].price.per_unit for name in (TRANSCRIBER, WHISPER)}
        unit = transcribers[TRANSCRIBER].price.unit
        assert unit == "second" and per_second[TRANSCRIBER] != per_second[WHISPER]
        assert row.cost_usd == 30 * per_second[TRANSCRIBER]


async def test_live_call_with_a_client_secret(tmp_path: Path) -> None:
    """A client secret minted for a GPT-Live model creates a GPT-Live call: the provider sees its own key and
    the deployment's model, nothing of the secret; the secret is then used up."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        secret = await mint(running.sidecar.http, {"type": "realtime", "model": LIVE})
        browser = running.sidecar.openai(secret)
        transport: Any = {"type": "webrtc", "sdp": BROWSER_OFFER}
        created = await browser.live.create(session={"model": LIVE, "instructions": "hi"}, transport=transport)
        call = await provider.wait_for_call()
        assert call.session == {"model": LIVE_DEPLOYMENT, "instructions": "hi"}
        assert call.auth == f"Bearer {provider.api_key}" and created.session.id.startswith("rs_")
        with pytest.raises(openai.AuthenticationError):
            await browser.live.create(session={"model": LIVE}, transport=transport)
        await browser.live.sessions.hangup(created.session.id)
        assert (await running.final_row()).close_reason == "client_hangup"


async def test_a_call_answered_but_not_watched_is_hung_up_and_its_lease_released(tmp_path: Path) -> None:
    """If starting the watch fails after the provider answered, the call is hung up at once, the lease is given
    back and nothing is billed (no call the sidecar cannot meter is left running)."""
    async with fake() as provider, calls_stack(tmp_path, provider, max_sessions_per_key=1) as running:
        assert (await create_sdp(running.sidecar.http, USER_KEY, model="no-such-model")).status_code == 404  # started
        services = running.sidecar.app.state.services
        request = parse_realtime("application/sdp", BROWSER_OFFER.encode(), query_model=RT)
        principal = await services.checker.principal(USER_KEY)

        def refuse(watch: object) -> None:
            raise RuntimeError("the watch could not start")

        with pytest.raises(RuntimeError):
            await endpoints._create(
                services, request, services.catalog.resolve(RT), principal, None, transcription=False, start=refuse
            )
        call = await provider.wait_for_call()
        assert call.hung_up.is_set() and provider.hangups == 1
        assert services.supervisor.live == {}
        again = await create_sdp(running.sidecar.http, USER_KEY)  # the one lease of the key is free again
        assert again.status_code == 201, again.text
        await running.sidecar.openai(USER_KEY).realtime.calls.hangup(call_id(again.headers["location"]))
        row = await running.final_row()  # the second call only
        assert row.session_id == call_id(again.headers["location"])


async def test_a_websocket_session_is_not_a_call(tmp_path: Path) -> None:
    """The hangup routes end calls only: a live WebSocket session's id is 404 there, even for its owner, and the
    session goes on."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        client = running.sidecar.openai(USER_KEY)
        async with client.realtime.connect(model=WS_MODEL) as connection:
            await connection.session.update(session={"type": "realtime", "instructions": "x"})
            supervisor = running.sidecar.app.state.services.supervisor
            (session_id,) = supervisor.live
            with pytest.raises(openai.NotFoundError):
                await client.realtime.calls.hangup(session_id)
            with pytest.raises(openai.NotFoundError):
                await running.sidecar.openai(MASTER_KEY).live.sessions.hangup(session_id)
            assert session_id in supervisor.live and not supervisor.live[session_id].relay.ended
        row = await running.final_row()
        assert row.close_reason != "client_hangup"
