"""In-flight control with two sidecar replicas sharing one real Redis, clients on the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.auth import hash_key
from sidecar.control import RedisStore, SessionInfo
from tests.relay_stack import MASTER_KEY, PRICE_MAP, USER_KEY, Stack, replicas, stack
from tests.support import chunks

PRICE = Decimal(repr(PRICE_MAP["gpt-realtime-whisper"]["input_cost_per_second"]))
URL = "/v1/realtime?model=gpt-realtime-whisper&intent=transcription"


async def open_ws(s: Stack, key: str = USER_KEY) -> ClientConnection:
    """A raw WebSocket session through one replica, past session.created."""
    ws = await connect(f"{s.sidecar.ws}{URL}", additional_headers={"Authorization": f"Bearer {key}"})
    assert orjson.loads(await ws.recv())["type"] == "session.created"
    return ws


async def ending_of(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    """Read until the sidecar closes: the last event before the close, and the close code."""
    last: dict[str, Any] = {}
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            last = orjson.loads(await ws.recv())
    assert closed.value.rcvd is not None
    return last, closed.value.rcvd.code


def admin(s: Stack, key: str = MASTER_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=s.sidecar.http, headers={"Authorization": f"Bearer {key}"})


async def test_revocation_through_either_replica_ends_sessions_on_both(
    tmp_path: Path, redis_url: str, unique: str
) -> None:
    """POST /admin/revocations on A ends the key's sessions on A and B by push (4001, key_revoked first)."""
    async with replicas(tmp_path, redis_url, unique, key_recheck_s=3600) as pair:
        on_a, on_b = await open_ws(pair.a), await open_ws(pair.b)
        started = time.perf_counter()
        async with admin(pair.a) as http:
            response = await http.post("/admin/revocations", json={"key_hash": hash_key(USER_KEY)})
        assert response.status_code == 202 and response.json()["sessions"] == 2
        for ws in (on_a, on_b):
            last, code = await ending_of(ws)
            assert (last["type"], last["error"]["code"], code) == ("error", "key_revoked", 4001)
        # With re-checks an hour apart, only the pub/sub push can have ended them; report how fast it was.
        print(f"revocation ended both sessions in {time.perf_counter() - started:.3f} s")


async def test_revocation_by_team_and_user(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Revocations by team_id and by user_id match the sessions of that team or user only."""
    async with replicas(tmp_path, redis_url, unique, key_recheck_s=3600) as pair:
        pair.litellm.add_key("sk-bob", user_id="bob", team_id="team-2")
        alice, bob = await open_ws(pair.a), await open_ws(pair.b, "sk-bob")
        async with admin(pair.b) as http:
            assert (await http.post("/admin/revocations", json={"team_id": "team-2"})).json()["sessions"] == 1
            assert (await ending_of(bob))[1] == 4001
            assert (await http.post("/admin/revocations", json={"user_id": "alice"})).json()["sessions"] == 1
            assert (await ending_of(alice))[1] == 4001
            bad = await http.post("/admin/revocations", json={"nothing": "x"})
            assert bad.status_code == 400


async def test_admin_lists_and_terminates_sessions_across_replicas(tmp_path: Path, redis_url: str, unique: str) -> None:
    """GET /admin/sessions on B lists A's and B's sessions; DELETE on B ends A's session with 4003."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        on_a, on_b = await open_ws(pair.a), await open_ws(pair.b)
        async with admin(pair.b) as http:
            listed = (await http.get("/admin/sessions")).json()["data"]
            assert sorted(s["replica"] for s in listed) == ["a", "b"]
            assert all(s["key_hash"] == hash_key(USER_KEY) for s in listed)
            assert USER_KEY not in str(listed)
            target = next(s["session_id"] for s in listed if s["replica"] == "a")
            assert (await http.delete(f"/admin/sessions/{target}")).status_code == 202
            last, code = await ending_of(on_a)
            assert (last["error"]["code"], code) == ("session_terminated", 4003)
            assert (await http.delete("/admin/sessions/rs_nope")).status_code == 404
        await on_b.close()
        async with admin(pair.a, key=USER_KEY) as http:
            refused = await http.get("/admin/sessions")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


async def test_blocked_key_ends_within_a_recheck(tmp_path: Path, redis_url: str, unique: str) -> None:
    """A key blocked in LiteLLM ends its live session at the next re-check (4001), asked by hash with the master key."""
    async with replicas(tmp_path, redis_url, unique, key_recheck_s=0.5) as pair:
        ws = await open_ws(pair.a)
        pair.litellm.update_key(USER_KEY, blocked=True)
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("key_revoked", 4001)
        rechecks = [r for r in pair.litellm.requests if r.url.path == "/key/info"]
        assert rechecks[-1].url.params["key"] == hash_key(USER_KEY)
        assert rechecks[-1].headers["authorization"] == f"Bearer {MASTER_KEY}"


async def test_deleted_key_ends_and_litellm_outage_keeps_sessions(tmp_path: Path, redis_url: str, unique: str) -> None:
    """A deleted key ends with 4001; while LiteLLM is unreachable re-checks fail open and the session lives."""
    async with replicas(tmp_path, redis_url, unique, key_recheck_s=0.3) as pair:
        ws = await open_ws(pair.a)
        pair.litellm.down = True
        supervisor = pair.a.sidecar.app.state.services.supervisor
        before = len(pair.litellm.requests)
        while len(pair.litellm.requests) == before:  # a re-check has run against the outage
            await supervisor.next_poll()
        await supervisor.next_poll()
        assert len(supervisor.live) == 1
        pair.litellm.down = False
        pair.litellm.delete_key(USER_KEY)
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("key_revoked", 4001)


async def test_budget_cut_fires_when_the_cost_reaches_the_budget(
    tmp_path: Path, redis_url: str, unique: str, speech_pcm16: bytes
) -> None:
    """A budget of 2 s of audio: alive after 1 s, ended with 4002 once past 2 s; new sessions are then 403."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        pair.litellm.add_key("sk-tight", max_budget=float(PRICE * 2), spend=0.0)
        ws = await open_ws(pair.a, "sk-tight")
        supervisor = pair.a.sidecar.app.state.services.supervisor
        audio = list(chunks(speech_pcm16))

        async def send(parts: list[str]) -> None:
            for part in parts:
                await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": part}).decode())

        await send(audio[:10])  # 1.0 s
        await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
        while orjson.loads(await ws.recv())["type"] != "conversation.item.input_audio_transcription.completed":
            pass
        await supervisor.next_poll()
        await supervisor.next_poll()
        assert len(supervisor.live) == 1  # 1 s of 2 s spent: still running
        await send(audio[10:35])  # 3.5 s in all
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("budget_exceeded", 4002)
        row = await pair.a.final_row()
        assert row.close_reason == "budget_exceeded"
        assert row.audio_seconds >= Decimal(2)
        assert row.cost_usd >= PRICE * 2 - Decimal("1E-10")
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(pair.b, "sk-tight")
        assert refused.value.response.status_code == 403
        assert orjson.loads(refused.value.response.body or b"")["error"]["code"] == "budget_exceeded"


async def test_concurrency_limit_holds_across_replicas(tmp_path: Path, redis_url: str, unique: str) -> None:
    """A key with max_parallel_requests 1 holding a session on A is refused 429 on B, and admitted once it ends."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        pair.litellm.add_key("sk-one", max_parallel_requests=1)
        first = await open_ws(pair.a, "sk-one")
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(pair.b, "sk-one")
        assert refused.value.response.status_code == 429
        assert orjson.loads(refused.value.response.body or b"")["error"]["code"] == "concurrency_limit"
        await first.close()
        await pair.a.sidecar.app.state.services.supervisor.live_empty()
        second = await open_ws(pair.b, "sk-one")
        await second.close()


async def test_default_per_key_limit_and_replica_cap(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Without max_parallel_requests the configured default applies; a replica at its cap refuses with 429."""
    async with replicas(tmp_path, redis_url, unique, max_sessions_per_key=2, max_sessions=3) as pair:
        held = [await open_ws(pair.a), await open_ws(pair.b)]
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(pair.a)
        assert refused.value.response.status_code == 429
        held += [await open_ws(pair.a, MASTER_KEY), await open_ws(pair.a, MASTER_KEY)]
        with pytest.raises(InvalidStatus) as capped:
            await open_ws(pair.a, MASTER_KEY)
        assert capped.value.response.status_code == 429
        for ws in held:
            await ws.close()


async def test_dead_replica_sessions_expire_from_the_registry(redis_url: str, unique: str) -> None:
    """A replica that stops heartbeating disappears from the registry once its entries expire."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client, channel=f"test:{unique}:control", prefix=f"test:{unique}")
    info = SessionInfo("rs_dead", "gone", "h", "", "", "", "m", "2026-01-01T00:00:00+00:00", "1", "0.1")
    assert await store.acquire("h", "rs_dead", limit=1, now=1000.0)
    await store.heartbeat([info], {}, now=1000.0)
    assert [i.session_id for i in await store.sessions(now=1001.0)] == ["rs_dead"]
    assert not await store.acquire("h", "rs_new", limit=1, now=1001.0)
    assert await store.sessions(now=1100.0) == []
    assert await store.acquire("h", "rs_new", limit=1, now=1100.0)
    keys = [k async for k in client.scan_iter(match=f"test:{unique}*")]
    await client.delete(*keys)
    await client.aclose()


async def test_metrics_and_readiness(tmp_path: Path, redis_url: str, unique: str, speech_pcm16: bytes) -> None:
    """/metrics counts sessions by close reason and model, audio seconds by model and relayed frames."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        ws = await open_ws(pair.a)
        for part in list(chunks(speech_pcm16))[:5]:
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": part}).decode())
        await ws.close()
        await pair.a.sidecar.app.state.services.supervisor.live_empty()
        async with httpx.AsyncClient(base_url=pair.a.sidecar.http) as http:
            text = (await http.get("/metrics")).text
            assert 'sidecar_sessions_total{close_reason="client_close",model="gpt-realtime-whisper"} 1.0' in text
            assert 'sidecar_audio_seconds_total{model="gpt-realtime-whisper"} 0.5' in text
            assert 'sidecar_relay_frames_total{direction="in"} 5.0' in text
            assert "sidecar_live_sessions 0.0" in text
            assert "sidecar_upstream_connect_seconds_count 1.0" in text
            assert (await http.get("/readyz")).json()["status"] == "ready"


async def test_invalid_base64_in_budget_session_is_not_billed(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Appends with invalid base64 are refused and cost nothing, even for a budgeted key."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        pair.litellm.add_key("sk-tiny", max_budget=float(PRICE))
        ws = await open_ws(pair.a, "sk-tiny")
        await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "!!" * 40000}).decode())
        assert orjson.loads(await ws.recv())["error"]["code"] == "invalid_base64"
        good = base64.b64encode(b"\x00" * 4800).decode()
        await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": good}).decode())
        await ws.close()
        row = await pair.a.final_row()
        assert row.audio_seconds == Decimal("0.1")


async def test_sessions_run_concurrently_on_both_replicas(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Several sessions on both replicas at once all complete their transcripts."""
    async with replicas(tmp_path, redis_url, unique) as pair:

        async def one(s: Stack) -> str:
            ws = await open_ws(s)
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            while True:
                event = orjson.loads(await ws.recv())
                if event["type"].endswith("transcription.completed"):
                    await ws.close()
                    return str(event["transcript"])

        results = await asyncio.gather(*(one(s) for s in (pair.a, pair.b) for _ in range(4)))
        assert len(results) == 8 and all(results)


async def test_readyz_stays_ready_when_redis_is_unreachable(tmp_path: Path) -> None:
    """With Redis down /readyz answers 200 and a session is served; sidecar_redis_up 0 and an error count show it."""
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    async with stack(tmp_path, redis=dead) as s, httpx.AsyncClient(base_url=s.sidecar.http) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert (await http.get("/healthz")).status_code == 200
        ws = await open_ws(s)
        await ws.close()
        text = (await http.get("/metrics")).text
        assert "sidecar_redis_up 0.0" in text
        assert 'sidecar_redis_errors_total{operation="admission"} 1.0' in text
    await dead.aclose()


async def test_logs_are_json_with_session_and_key_hash_never_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's log line carries session_id and key_hash; no record contains the raw key."""
    import logging

    from sidecar.logs import JsonFormatter

    caplog.set_level(logging.INFO)
    async with stack(tmp_path) as s:
        ws = await open_ws(s)
        await ws.close()
        await s.sidecar.app.state.services.supervisor.live_empty()
    lines = [JsonFormatter().format(r) for r in caplog.records]
    ended = [orjson.loads(line) for line in lines if "session ended" in line]
    assert ended and ended[0]["key_hash"] == hash_key(USER_KEY) and ended[0]["session_id"].startswith("rs_")
    assert all(USER_KEY not in line for line in lines)


async def test_team_budget_ends_the_teams_sessions(
    tmp_path: Path, redis_url: str, unique: str, speech_pcm16: bytes
) -> None:
    """A team whose budget is spent by a member's live session ends it with 4002 (budget_exceeded)."""
    async with replicas(tmp_path, redis_url, unique) as pair:
        pair.litellm.add_key("sk-member", team_id="team-9")
        pair.litellm.teams["team-9"] = {"max_budget": float(PRICE), "spend": 0.0, "models": []}
        ws = await open_ws(pair.b, "sk-member")
        for part in list(chunks(speech_pcm16))[:20]:
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": part}).decode())
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("budget_exceeded", 4002)


async def test_nothing_of_a_session_is_kept_after_it_ends(tmp_path: Path) -> None:
    """After sessions end, no relay, session or upstream connection object of theirs is still alive."""
    import gc
    import weakref

    async with stack(tmp_path) as s:
        clients = [await open_ws(s) for _ in range(20)]
        supervisor = s.sidecar.app.state.services.supervisor
        refs = []
        for entry in supervisor.live.values():
            relay = entry.relay
            refs += [weakref.ref(relay), weakref.ref(relay.session), weakref.ref(relay.upstream)]
        del entry, relay
        assert len(refs) == 60
        for ws in clients:
            await ws.close()
        await supervisor.live_empty()
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        assert supervisor.principals == {}


async def test_heartbeat_in_slices_registers_every_session() -> None:
    """A heartbeat writes the registry a slice at a time (frames go through between slices) and still
    registers every live session, with its running cost under its budget scope; one that ends between
    slices is left out."""
    from dataclasses import replace
    from types import SimpleNamespace

    from sidecar.auth import KeyChecker
    from sidecar.control import MemoryStore, Supervisor
    from sidecar.metrics import Metrics
    from tests.test_session import append, make

    store = MemoryStore()
    supervisor = Supervisor(
        store=store,
        checker=KeyChecker(master_key=MASTER_KEY, client=None),
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=100,
        max_sessions_per_key=100,
        wall=lambda: 1000.0,
        heartbeat_slice=2,
    )
    relays = []
    for n in range(5):
        session = make()
        session.session_id = f"rs_{n}"
        session.principal = replace(session.principal, max_budget=Decimal(100))
        session.on_client_text(append(bytes(48_000)))  # 1 s of audio each
        relay = SimpleNamespace(
            session=session,
            figures=session.figures,
            cost=session.meter.cost,
            frames_in=1,
            frames_out=0,
            bytes_in=1,
            bytes_out=0,
        )
        supervisor.attach(relay)  # type: ignore[arg-type]
        relays.append(relay)
    original = store.heartbeat
    slices: list[list[str]] = []

    async def recording(infos: Any, costs: Any, *, now: float) -> None:
        slices.append([i.session_id for i in infos])
        if len(slices) == 1:  # rs_3 ends while the first slice is written
            supervisor.live.pop("rs_3")
        await original(infos, costs, now=now)

    store.heartbeat = recording  # type: ignore[method-assign]
    await supervisor.heartbeat()
    assert slices == [["rs_0", "rs_1"], ["rs_2"], ["rs_4"]]
    listed = sorted(info.session_id for info in await store.sessions(now=1000.0))
    assert listed == ["rs_0", "rs_1", "rs_2", "rs_4"]
    costs = await store.live_costs(f"key:{'h' * 64}", now=1000.0)
    assert sorted(costs) == ["rs_0", "rs_1", "rs_2", "rs_4"]
    assert all(cost > 0 for cost in costs.values())


def memory_supervisor() -> Any:
    """A Supervisor on a MemoryStore, one replica, no LiteLLM: for tests of its own rules."""
    from sidecar.auth import KeyChecker
    from sidecar.control import MemoryStore, Supervisor
    from sidecar.metrics import Metrics

    return Supervisor(
        store=MemoryStore(),
        checker=KeyChecker(master_key=MASTER_KEY, client=None),
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=100,
        max_sessions_per_key=100,
        wall=lambda: 1000.0,
    )


async def test_steady_churn_collects_with_sessions_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under steady churn no burst ever ends: a full collection runs once CHURN_RELEASE_SESSIONS sessions have
    ended (with sessions still live), and not again before CHURN_RELEASE_S has passed; the burst rule still
    collects after the last session ends."""
    from types import SimpleNamespace

    from sidecar import control
    from tests.test_session import make

    collected: list[int] = []
    monkeypatch.setattr(control.tuning, "release_memory", lambda: collected.append(len(supervisor.live)))
    monkeypatch.setattr(control, "CHURN_RELEASE_SESSIONS", 5)
    supervisor = memory_supervisor()

    def relay(n: int) -> Any:
        session = make()
        session.session_id = f"rs_{n}"
        stand_in = SimpleNamespace(
            session=session,
            figures=session.figures,
            cost=session.meter.cost,
            frames_in=0,
            frames_out=0,
            bytes_in=0,
            bytes_out=0,
            close_reason="client_close",
            meters_audio=True,
        )
        supervisor.attach(stand_in)  # type: ignore[arg-type]
        return stand_in

    keeper = relay(0)  # one session stays live throughout: no burst ends
    for n in range(1, 11):
        await supervisor.detach(relay(n))
    assert collected == [1]  # the 5th ended session: a collection with a session live; not again within 30 s
    supervisor._released_at -= control.CHURN_RELEASE_S  # half a minute later
    for n in range(11, 16):
        await supervisor.detach(relay(n))
    assert collected == [1, 1]
    await supervisor.detach(keeper)  # the last session: the burst rule schedules its release
    assert collected == [1, 1] and supervisor._release is not None
    supervisor._release.cancel()
    supervisor._release_memory()  # what the timer runs
    assert collected == [1, 1, 0]


async def test_a_cancellation_a_redis_read_swallowed_still_stops_the_supervisor_loops() -> None:
    """On Python 3.11 a cancellation landing as redis-py's read timeout expires comes back as a timeout, which
    the loops' Redis-failure handlers take for an outage: the loop must still stop (CI once hung on it at
    shutdown)."""
    from sidecar.control import ControlError

    supervisor = memory_supervisor()
    in_step = asyncio.Event()
    steps = 0

    async def step() -> None:  # what a swallowed cancellation looks like to the loop: a Redis failure
        nonlocal steps
        steps += 1
        in_step.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ControlError("Timeout reading from Redis") from None

    loop_task = asyncio.create_task(supervisor._periodic(0, step, "heartbeat"))
    await in_step.wait()
    loop_task.cancel()
    await asyncio.wait({loop_task}, timeout=30)  # a guard against a hang, not a speed threshold
    stopped = loop_task.done()
    if not stopped:  # without the fix: stop the stand-in step's loop so the test ends (and fails)
        loop_task.get_coro().close()
    assert stopped and loop_task.cancelled()
    assert steps == 1
