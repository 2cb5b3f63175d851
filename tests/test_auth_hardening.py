"""Key checks under attack (issue 12, item 10): negative cache, single flight, separate lanes for admission
and re-checks, a bounded admission backlog, one retry on a closed keep-alive connection, the 503's cause."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.auth import KeyChecker, Principal, hash_key, litellm_client
from sidecar.control import MemoryStore, Supervisor
from sidecar.errors import InvalidApiKey, KeyCheckError
from sidecar.metrics import Metrics
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from tests.relay_stack import MASTER_KEY, USER_KEY, stack

T = TypeVar("T")
BAD_KEY = "sk-not-a-litellm-key"
#: A guard, not a measurement: what it guards is answered at once, or (on a checker whose re-checks wait
#: behind admission lookups, or go out one at a time) never, and the test then fails instead of hanging.
GUARD_S = 30.0


async def guarded(awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; TimeoutError if it never comes (see GUARD_S)."""
    async with asyncio.timeout(GUARD_S):
        return await awaitable


async def refused(checker: KeyChecker, key: str) -> None:
    """principal(key) must raise InvalidApiKey."""
    with pytest.raises(InvalidApiKey):
        await checker.principal(key)


async def test_a_bad_key_is_asked_once_per_negative_ttl() -> None:
    """200 attempts with one unknown key cost one /key/info call until negative_cache_s has passed."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    ticks = [0.0]
    async with fake.client() as client:
        checker = KeyChecker(master_key=MASTER_KEY, client=client, negative_cache_s=2.0, clock=lambda: ticks[0])
        for _ in range(200):
            await refused(checker, BAD_KEY)
        assert fake.count() == 1
        ticks[0] = 1.9
        await refused(checker, BAD_KEY)
        assert fake.count() == 1
        ticks[0] = 2.0
        await refused(checker, BAD_KEY)
        assert fake.count() == 2


async def test_a_key_created_after_a_miss_works_once_the_ttl_passes() -> None:
    """The negative cache only delays a new key by its TTL; a hit then replaces the miss."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    ticks = [0.0]
    async with fake.client() as client:
        checker = KeyChecker(master_key=MASTER_KEY, client=client, negative_cache_s=2.0, clock=lambda: ticks[0])
        await refused(checker, USER_KEY)
        fake.add_key(USER_KEY)
        await refused(checker, USER_KEY)
        ticks[0] = 2.0
        assert (await checker.principal(USER_KEY)).key_hash == hash_key(USER_KEY)


async def test_a_revoked_key_is_not_served_from_the_cache() -> None:
    """When LiteLLM stops knowing a cached key (a fresh lookup says 404), the key is refused from then on."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    async with fake.client() as client:
        checker = KeyChecker(master_key=MASTER_KEY, client=client, clock=lambda: 0.0)
        await checker.principal(USER_KEY)
        fake.delete_key(USER_KEY)
        with pytest.raises(InvalidApiKey):
            await checker.recheck(hash_key(USER_KEY))
        await refused(checker, USER_KEY)
        assert fake.count() == 2


@pytest.mark.parametrize(("key", "known"), [(USER_KEY, True), (BAD_KEY, False)])
async def test_concurrent_lookups_of_one_key_share_one_request(key: str, known: bool) -> None:
    """50 concurrent lookups of one key (known or not), all waiting on LiteLLM, make one /key/info call."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    gate = asyncio.Event()
    async with fake.client(gate=gate) as client:
        checker = KeyChecker(master_key=MASTER_KEY, client=client)
        lookups = [asyncio.create_task(checker.principal(key)) for _ in range(50)]
        await fake.requested(1)
        gate.set()
        answers = await asyncio.gather(*lookups, return_exceptions=True)
    assert fake.count() == 1
    if known:
        assert all(isinstance(a, Principal) and a.key_hash == hash_key(key) for a in answers)
    else:
        assert all(isinstance(a, InvalidApiKey) for a in answers)


async def test_a_caller_that_gives_up_does_not_cancel_the_others() -> None:
    """One of two callers sharing a lookup is cancelled (its client left); the other still gets its answer."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    gate = asyncio.Event()
    async with fake.client(gate=gate) as client:
        checker = KeyChecker(master_key=MASTER_KEY, client=client)
        leaving = asyncio.create_task(checker.principal(USER_KEY))
        staying = asyncio.create_task(checker.principal(USER_KEY))
        await fake.requested(1)
        leaving.cancel()
        gate.set()
        assert (await staying).key_hash == hash_key(USER_KEY)
        assert leaving.cancelled() and fake.count() == 1


async def test_a_flood_of_bad_keys_is_bounded_and_cannot_starve_rechecks() -> None:
    """With every admission request stuck at LiteLLM, admission lookups past lookups + backlog fail at once
    (KeyCheckError, naming the cause), while a live session's re-check is answered on its own lane."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    stuck = asyncio.Event()
    async with fake.client(gate=stuck) as admission, fake.client() as rechecks:
        checker = KeyChecker(
            master_key=MASTER_KEY, client=admission, recheck_client=rechecks, lookups=2, lookup_backlog=3
        )
        flood = [asyncio.create_task(checker.principal(f"sk-attacker-{n}")) for n in range(5)]
        await fake.requested(2)
        with pytest.raises(KeyCheckError, match="5 admission lookups already in flight or waiting"):
            await guarded(checker.principal("sk-attacker-late"))
        assert (await guarded(checker.recheck(hash_key(USER_KEY)))).key_hash == hash_key(USER_KEY)
        stuck.set()
        assert all(isinstance(a, InvalidApiKey) for a in await asyncio.gather(*flood, return_exceptions=True))
    assert fake.count() == 6  # the five of the flood and the re-check; the late one never reached LiteLLM


async def test_a_returning_key_is_not_refused_and_goes_ahead_of_the_flood() -> None:
    """With the admission backlog full of made-up keys, a key LiteLLM knew before (its cache entry expired)
    is not refused, and its request goes out before those of the made-up keys waiting ahead of it."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    ticks = [0.0]
    stuck = asyncio.Event()
    async with fake.client(gate=stuck) as admission, fake.client() as rechecks:
        checker = KeyChecker(
            master_key=MASTER_KEY,
            client=admission,
            recheck_client=rechecks,
            lookups=1,
            lookup_backlog=2,
            clock=lambda: ticks[0],
        )
        await checker.recheck(hash_key(USER_KEY))  # LiteLLM knew it
        ticks[0] = 60.0
        flood = [asyncio.create_task(checker.principal(f"sk-attacker-{n}")) for n in range(3)]
        await fake.requested(2)  # the re-check's and the first of the flood; two more wait for the slot
        with pytest.raises(KeyCheckError):
            await guarded(checker.principal("sk-attacker-late"))
        returning = asyncio.create_task(checker.principal(USER_KEY))
        # One turn of the loop, not a timed wait: the task runs to its first suspension, which is queueing for
        # the slot (there is no event to await for that); the ready queue is FIFO, so this is deterministic.
        await asyncio.sleep(0)
        stuck.set()
        assert (await returning).key_hash == hash_key(USER_KEY)
        await asyncio.gather(*flood, return_exceptions=True)
    asked = [r.url.params["key"] for r in fake.requests]
    attackers = [hash_key(f"sk-attacker-{n}") for n in range(3)]
    assert asked == [hash_key(USER_KEY), attackers[0], hash_key(USER_KEY), attackers[1], attackers[2]]


def supervising(checker: KeyChecker, *keys: str) -> tuple[Supervisor, list[str]]:
    """A Supervisor over `checker` with one live session per key; the close codes the sessions get."""
    supervisor = Supervisor(
        store=MemoryStore(),
        checker=checker,
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=10,
        max_sessions_per_key=10,
    )
    ended: list[str] = []
    for n, key in enumerate(keys):
        principal = Principal(key_hash=hash_key(key))
        session = SimpleNamespace(session_id=f"rs_{n}", principal=principal, model=SimpleNamespace(name="m"))
        supervisor.attach(SimpleNamespace(session=session, ended=False, end=ended.append))  # type: ignore[arg-type]
    return supervisor, ended


async def test_supervisor_rechecks_through_the_recheck_lane() -> None:
    """Supervisor.recheck ends a deleted key's session even while a flood holds every admission slot."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    stuck = asyncio.Event()
    async with fake.client(gate=stuck) as admission, fake.client() as rechecks:
        checker = KeyChecker(
            master_key=MASTER_KEY, client=admission, recheck_client=rechecks, lookups=1, lookup_backlog=1
        )
        supervisor, ended = supervising(checker, USER_KEY)
        flood = [asyncio.create_task(checker.principal(f"sk-attacker-{n}")) for n in range(2)]
        await fake.requested(1)
        await guarded(supervisor.recheck())
        assert ended == ["key_revoked"]
        stuck.set()
        await asyncio.gather(*flood, return_exceptions=True)


async def test_rechecks_go_out_together_and_stuck_ones_do_not_hold_connects_back() -> None:
    """The live keys are re-checked concurrently (up to `rechecks`); while those requests are stuck at
    LiteLLM, a connect's lookup is still answered on the admission lane."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    live = [f"sk-live-{n}" for n in range(3)]
    for key in [USER_KEY, *live]:
        fake.add_key(key)
    stuck = asyncio.Event()
    async with fake.client() as admission, fake.client(gate=stuck) as rechecks:
        checker = KeyChecker(master_key=MASTER_KEY, client=admission, recheck_client=rechecks, rechecks=3)
        supervisor, ended = supervising(checker, *live)
        recheck = asyncio.create_task(supervisor.recheck())
        await guarded(fake.requested(3))
        assert (await checker.principal(USER_KEY)).key_hash == hash_key(USER_KEY)
        stuck.set()
        await recheck
        assert ended == [] and sorted(supervisor.principals) == sorted(hash_key(k) for k in live)


async def test_a_pooled_connection_closed_by_litellm_is_retried_once() -> None:
    """LiteLLM closing each kept-alive connection as the next request arrives costs no lookup (one retry on a
    new connection); a lookup whose retry fails too is a KeyCheckError naming the cause, after two tries."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    keys = [f"sk-user-{n}" for n in range(20)]
    for key in keys:
        fake.add_key(key)
    async with LiteLLMServer(fake, answers_per_connection=1) as server:
        async with litellm_client(server.url, 4) as client:
            checker = KeyChecker(master_key=MASTER_KEY, client=client)
            for key in keys:
                assert (await checker.principal(key)).key_hash == hash_key(key)
    assert server.dropped == len(keys) - 1  # each lookup after the first met a closed connection
    async with LiteLLMServer(fake, answers_per_connection=0) as never:
        async with litellm_client(never.url, 4) as client:
            checker = KeyChecker(master_key=MASTER_KEY, client=client)
            with pytest.raises(KeyCheckError, match=r"unreachable for /key/info \(RemoteProtocolError\)"):
                await checker.principal(keys[0])
    assert never.dropped == 2


async def test_a_503_is_logged_with_its_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A connect refused with 503 because LiteLLM is down leaves a warning naming the cause and the key hash."""
    caplog.set_level(logging.WARNING, logger="sidecar.app")
    fake = FakeLiteLLM(master_key=MASTER_KEY, down=True)
    async with stack(tmp_path, litellm=fake) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
        with pytest.raises(InvalidStatus) as refusal:
            await connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"})
    assert refusal.value.response.status_code == 503
    [record] = [r for r in caplog.records if r.name == "sidecar.app" and "503" in r.getMessage()]
    assert record.__dict__["reason"] == "LiteLLM proxy unreachable for /key/info (ConnectError)"
    assert record.__dict__["key_hash"] == hash_key(USER_KEY)


async def test_without_a_master_key_a_lookup_by_hash_alone_is_not_remembered_as_unknown() -> None:
    """Without a master key LiteLLM cannot be asked by hash alone; that refusal does not put a valid key in
    the negative cache, so the key still connects with its raw value."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(USER_KEY)
    async with fake.client() as client:
        checker = KeyChecker(master_key=None, client=client)
        with pytest.raises(InvalidApiKey):
            await checker.recheck(hash_key(USER_KEY))
        assert (await checker.principal(USER_KEY)).key_hash == hash_key(USER_KEY)
