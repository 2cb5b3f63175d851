"""CallWatch against an in-test sideband: checkpoints, one final, limits, drops and re-attaches, hangups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from sidecar.auth import KeyChecker, Principal
from sidecar.calls.call import ProviderCall
from sidecar.calls.sideband import sideband_target
from sidecar.calls.tasks import Calls
from sidecar.calls.watch import CallWatch
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, Deployment, RealtimeModel
from sidecar.control import MemoryStore, Supervisor
from sidecar.errors import UpstreamError
from sidecar.metering import SessionMeter
from sidecar.metrics import Metrics
from sidecar.pricing import Price
from sidecar.scrub import Scrubber
from sidecar.session import Session
from sidecar.surfaces.account import Account
from sidecar.surfaces.live import LiveSession, LiveStart
from sidecar.usage import UsageEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOKENS = Price(unit="token", input_token=Decimal("0.000004"), output_token=Decimal("0.000016"))
LIVE_PRICE = Price(unit="second", per_unit=Decimal("0.000833333333333"))
DEPLOYMENT = Deployment(provider="openai", model="gpt-realtime", api_base="http://127.0.0.1:9", api_key="sk-up")
PRINCIPAL = Principal(key_hash="h" * 64, key_alias="alias", max_budget=Decimal(10))
NS = 1_000_000_000


# ---- the in-test provider side ----------------------------------------------------------------------


class Sideband:
    """One sideband connection: server events in order, then a close or an abort."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | Exception] = asyncio.Queue()
        self._holding = False  # the watch holds a frame it got and has not finished with
        self.closed_by_us = False

    def emit(self, event: dict[str, Any]) -> None:
        self._queue.put_nowait(orjson.dumps(event).decode())

    def close(self, code: int = 1000) -> None:
        """The provider closes it (with a close frame)."""
        self._queue.put_nowait(ConnectionClosedOK(Close(code, ""), None) if code == 1000 else self._error(code))

    @staticmethod
    def _error(code: int) -> Exception:
        return ConnectionClosedError(Close(code, ""), None)

    async def consumed(self) -> None:
        """Wait until the watch has read and handled every event emitted so far."""
        await self._queue.join()

    def drop(self) -> None:
        """The TCP connection is gone: no close frame."""
        self._queue.put_nowait(ConnectionClosedError(None, None))

    async def recv(self) -> str | bytes:
        if self._holding:  # asking for the next frame: the watch is done with the last one
            self._queue.task_done()
        item = await self._queue.get()
        self._holding = True
        if isinstance(item, Exception):
            raise item
        return item


class Provider:
    """Sidebands handed out by `attach` (or failures), and a hangup that closes the current one with 1000 after
    its `on_hangup` events."""

    def __init__(self) -> None:
        self.sidebands: list[Sideband] = []
        self.hangups = 0
        self.refuse: int | None = None  # the status of a refused attach, None to accept
        self.on_hangup: list[dict[str, Any]] = []
        self.attached = asyncio.Event()

    async def attach(self) -> Any:
        if self.refuse is not None:
            raise UpstreamError("refused", status=self.refuse)
        sideband = Sideband()
        self.sidebands.append(sideband)
        self.attached.set()
        return _AsUpstream(sideband)

    async def wait_attached(self, n: int) -> Sideband:
        while len(self.sidebands) < n:
            self.attached.clear()
            await self.attached.wait()
        return self.sidebands[n - 1]

    async def hangup(self) -> None:
        self.hangups += 1
        if self.sidebands:
            current = self.sidebands[-1]
            for event in self.on_hangup:
                current.emit(event)
            current.close(1000)


class _AsUpstream:
    """The sidecar's view of a Sideband (sidecar.upstream.Upstream)."""

    def __init__(self, sideband: Sideband) -> None:
        self.sideband = sideband

    async def send(self, message: str | bytes) -> None:
        """Nothing is sent on a watched call's sideband."""

    async def recv(self) -> str | bytes:
        return await self.sideband.recv()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.sideband.closed_by_us = True


class Publisher:
    """Remembers submitted events; tests await the final one."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self._final = asyncio.Event()

    def submit(self, event: UsageEvent) -> None:
        self.events.append(event)
        if event.type == "final":
            self._final.set()

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...

    @property
    def spool_depth(self) -> int:
        return 0

    @property
    def publish_failures(self) -> int:
        return 0

    async def final(self) -> UsageEvent:
        await self._final.wait()
        return next(e for e in self.events if e.type == "final")

    @property
    def finals(self) -> list[UsageEvent]:
        return [e for e in self.events if e.type == "final"]


# ---- building watches -------------------------------------------------------------------------------


def realtime_account(session_id: str = "rs_call") -> Account:
    model = RealtimeModel(
        name="gpt-realtime",
        kind="realtime-conversation",
        price=TOKENS,
        price_key="gpt-realtime",
        deployments=(DEPLOYMENT,),
    )
    core = Session(
        session_id=session_id,
        model=model,
        deployment=DEPLOYMENT,
        principal=PRINCIPAL,
        meter=SessionMeter(TOKENS),
        started_at=T0,
        transcription=False,
    )
    return Account(
        core,
        session_id=session_id,
        model=model,
        deployment=DEPLOYMENT,
        principal=PRINCIPAL,
        started_at=T0,
        scrubber=lambda: core.scrubber,
        meter=core.meter,
    )


def live_account() -> Account:
    model = RealtimeModel(
        name="gpt-live-1", kind="live-session", price=LIVE_PRICE, price_key="gpt-live-1", deployments=(DEPLOYMENT,)
    )
    start = LiveStart(model="gpt-live-1", event={"type": "session.start", "session": {"model": "gpt-live-1"}})
    core = LiveSession(start, upstream_model="gpt-live-1", price=LIVE_PRICE)
    scrubber = Scrubber.for_deployment(DEPLOYMENT, public_model="gpt-live-1")
    return Account(
        core,
        session_id="rs_live",
        model=model,
        deployment=DEPLOYMENT,
        principal=PRINCIPAL,
        started_at=T0,
        scrubber=lambda: scrubber,
    )


class Clock:
    """A monotonic clock the test moves by hand (nanoseconds)."""

    def __init__(self) -> None:
        self.now = 5 * NS

    def __call__(self) -> int:
        return self.now


def watch(
    provider: Provider,
    publisher: Publisher,
    *,
    account: Account | None = None,
    clock_ns: Callable[[], int] | None = None,
    reattach_s: float = 5.0,
    idle_timeout_s: float = 300.0,
    max_session_s: float = 3600.0,
) -> CallWatch:
    call = ProviderCall(route=REALTIME_ENDPOINT, deployment=DEPLOYMENT, call_id="rtc_provider")
    return CallWatch(
        session=account or realtime_account(),
        call=call,
        hangup=provider.hangup,
        attach=provider.attach,
        publisher=publisher,
        checkpoint_s=5.0,
        idle_timeout_s=idle_timeout_s,
        max_session_s=max_session_s,
        reattach_s=reattach_s,
        **({"clock_ns": clock_ns} if clock_ns is not None else {}),
    )


def response_done(response_id: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
    return {"type": "response.done", "response": {"id": response_id, "usage": usage}}


def token_cost(input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * Decimal("0.000004") + output_tokens * Decimal("0.000016")).quantize(Decimal("1e-10"))


# ---- tests ------------------------------------------------------------------------------------------


async def test_first_checkpoint_at_once_then_periodic_and_exactly_one_final() -> None:
    """seq 1 at once, a checkpoint per interval with the usage so far, one final after end()."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher)
    task = asyncio.create_task(w.run())
    sideband = await provider.wait_attached(1)
    assert [e.type for e in publisher.events] == ["checkpoint"]
    sideband.emit(response_done("r1", 100, 50))
    await sideband.consumed()
    loop = asyncio.get_running_loop()
    assert w.poll(loop.time()) is None  # not due yet
    checkpoint = w.poll(loop.time() + 5.0)
    assert checkpoint is not None and checkpoint.seq == 2 and checkpoint.cost_usd == token_cost(100, 50)
    w.end("session_terminated")
    assert await task == "session_terminated"
    w.end("key_revoked")  # too late: nothing more
    assert w.poll(loop.time() + 100) is None
    assert [(e.type, e.seq) for e in publisher.events] == [("checkpoint", 1), ("checkpoint", 2), ("final", 3)]
    final = publisher.finals[0]
    assert (final.close_reason, final.input_tokens, final.output_tokens) == ("session_terminated", 100, 50)
    assert provider.hangups == 1 and w.done.result() == "session_terminated"


async def test_end_hangs_up_waits_for_the_sideband_and_bills_what_came_meanwhile() -> None:
    """end(): the provider's hangup, then usage sent before the sideband closes is billed, then one final."""
    provider, publisher = Provider(), Publisher()
    provider.on_hangup = [response_done("r2", 10, 20)]  # a response cut short by the hangup reports its usage
    w = watch(provider, publisher)
    task = asyncio.create_task(w.run())
    sideband = await provider.wait_attached(1)
    sideband.emit(response_done("r1", 100, 50))
    await sideband.consumed()
    w.end("key_revoked")
    assert await task == "key_revoked"
    final = await publisher.final()
    assert (final.input_tokens, final.output_tokens, final.cost_usd) == (110, 70, token_cost(110, 70))
    assert provider.hangups == 1 and len(publisher.finals) == 1
    assert w.events == 2


async def test_idle_sideband_ends_the_call_as_idle_timeout() -> None:
    """No server event for the idle timeout: hung up, billed `idle_timeout`."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher, idle_timeout_s=30.0)
    task = asyncio.create_task(w.run())
    sideband = await provider.wait_attached(1)
    sideband.emit({"type": "session.created", "session": {}})
    await sideband.consumed()
    now = asyncio.get_running_loop().time()
    w.poll(now + 29.0)
    assert not w.ended  # an event came less than 30 s before
    w.poll(now + 30.0)
    assert await task == "idle_timeout"
    assert provider.hangups == 1 and publisher.finals[0].close_reason == "idle_timeout"


async def test_max_duration_from_the_answer() -> None:
    """The call reaches SIDECAR_MAX_SESSION_S after its answer: hung up, `max_duration`."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher, idle_timeout_s=1e9, max_session_s=60.0)
    task = asyncio.create_task(w.run())
    await provider.wait_attached(1)
    w.poll(asyncio.get_running_loop().time() + 60.0)
    assert await task == "max_duration"
    assert provider.hangups == 1 and publisher.finals[0].close_reason == "max_duration"


@pytest.mark.parametrize("how", ["abort", "close_1000", "close_1011", "close_1001"])
async def test_a_dropped_sideband_is_reattached_and_the_call_billed_once(how: str) -> None:
    """Usage before and after a drop is billed once, in one final; the call is not hung up by the drop."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher)
    task = asyncio.create_task(w.run())
    first = await provider.wait_attached(1)
    first.emit(response_done("r1", 100, 50))
    if how == "abort":
        first.drop()
    else:
        first.close(int(how.removeprefix("close_")))
    second = await provider.wait_attached(2)
    assert provider.hangups == 0 and not w.ended
    second.emit(response_done("r2", 7, 3))
    await second.consumed()
    w.end("session_terminated")
    assert await task == "session_terminated"
    final = publisher.finals[0]
    assert (final.input_tokens, final.output_tokens, final.cost_usd) == (107, 53, token_cost(107, 53))
    assert (w.attaches, w.drops, provider.hangups, len(publisher.finals)) == (2, 1, 1, 1)


async def test_a_drop_that_cannot_be_reattached_within_the_bound_hangs_up_and_bills_what_was_seen() -> None:
    """Re-attach refused until the bound passes: the call is hung up and billed `sideband_lost`."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher, reattach_s=0.3)
    task = asyncio.create_task(w.run())
    first = await provider.wait_attached(1)
    first.emit(response_done("r1", 100, 50))
    await first.consumed()
    provider.refuse = 503
    first.drop()
    assert await task == "sideband_lost"
    final = publisher.finals[0]
    assert (final.close_reason, final.input_tokens, final.output_tokens) == ("sideband_lost", 100, 50)
    assert (provider.hangups, len(publisher.finals), w.attaches) == (1, 1, 1)


async def test_a_call_never_watched_is_hung_up() -> None:
    """The first attach is refused for the whole bound: hung up, `sideband_lost`, billed (nothing seen)."""
    provider, publisher = Provider(), Publisher()
    provider.refuse = 401
    w = watch(provider, publisher, reattach_s=0.2)
    assert await w.run() == "sideband_lost"
    assert provider.hangups == 1 and [e.type for e in publisher.events] == ["checkpoint", "final"]
    assert publisher.finals[0].cost_usd == 0


async def test_the_provider_ending_the_call_is_upstream_close() -> None:
    """The provider ends the call (its sideband closes, a re-attach is answered 404): `upstream_close`, billed
    once, no hangup sent."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher)
    task = asyncio.create_task(w.run())
    sideband = await provider.wait_attached(1)
    sideband.emit(response_done("r1", 1, 2))
    provider.refuse = 404
    sideband.close(1000)
    assert await task == "upstream_close"
    assert publisher.finals[0].output_tokens == 2 and len(publisher.finals) == 1
    assert provider.hangups == 0


async def test_a_reattach_answered_404_means_the_call_is_gone() -> None:
    """After a drop the provider answers 404 (the call ended meanwhile): `upstream_close`, not a retry loop."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher, reattach_s=60.0)
    task = asyncio.create_task(w.run())
    sideband = await provider.wait_attached(1)
    provider.refuse = 404
    sideband.drop()
    assert await task == "upstream_close"
    assert len(publisher.finals) == 1


async def test_cancelled_watch_hangs_up_and_bills_server_shutdown_once() -> None:
    """A watch task cancelled at shutdown still hangs the call up and bills it once."""
    provider, publisher = Provider(), Publisher()
    w = watch(provider, publisher)
    task = asyncio.create_task(w.run())
    await provider.wait_attached(1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert provider.hangups == 1
    assert [e.close_reason for e in publisher.finals] == ["server_shutdown"]
    await w.abandon("client_abort")  # no second bill
    assert len(publisher.finals) == 1


async def test_gpt_live_call_bills_wall_clock_from_answer_to_hangup() -> None:
    """GPT-Live: session seconds from the answer to the hangup on the sidecar's clock; the provider's
    session.usage.updated is recorded, not billed; a re-attach's session.started does not restart the clock."""
    provider, publisher, clock = Provider(), Publisher(), Clock()
    w = watch(provider, publisher, account=live_account(), clock_ns=clock)  # answered at 5 s
    task = asyncio.create_task(w.run())
    first = await provider.wait_attached(1)
    clock.now = 7 * NS
    first.emit({"type": "session.started", "session": {"id": "sess_p"}})
    clock.now = 20 * NS
    first.emit({"type": "session.usage.updated", "usage": {"seconds": 14}})
    await first.consumed()
    first.drop()
    second = await provider.wait_attached(2)
    clock.now = 30 * NS
    second.emit({"type": "session.started", "session": {"id": "sess_p"}})
    await second.consumed()
    clock.now = 65 * NS + 250_000  # the hangup: 60.00025 s after the answer
    w.end("session_terminated")
    await task
    final = publisher.finals[0]
    assert (final.unit, final.quantity) == ("session_second", Decimal("60.00025"))
    assert final.cost_usd == (Decimal("60.00025") * LIVE_PRICE.per_unit).quantize(Decimal("1e-10"))  # type: ignore[operator]
    assert orjson.loads(final.upstream_usage)["duration_seconds"] == 14


async def test_supervisor_sees_the_call_as_a_live_session_and_controls_it() -> None:
    """Calls.start: listed at once, limits polled, a terminate message ends it through the hangup, lease and
    registry released on detach, no reconciliation warning for audio the sidecar never saw."""
    store = MemoryStore()
    supervisor = Supervisor(
        store=store,
        checker=KeyChecker(master_key="sk-master", client=None),
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=10,
        max_sessions_per_key=10,
        wall=lambda: 1000.0,
    )
    await supervisor.admit(PRINCIPAL, "rs_call")
    provider, publisher = Provider(), Publisher()
    calls = Calls(supervisor)
    w = watch(provider, publisher)
    calls.start(w)
    assert "rs_call" in supervisor.live and len(calls) == 1
    sideband = await provider.wait_attached(1)
    sideband.emit(
        {"type": "conversation.item.input_audio_transcription.completed", "usage": {"type": "duration", "seconds": 3}}
    )
    await sideband.consumed()
    assert [i.session_id for i in await store.sessions(now=1000.0)] == ["rs_call"]
    supervisor.poll(asyncio.get_running_loop().time())
    assert supervisor.apply({"action": "terminate", "session_id": "rs_call", "reason": "client_hangup"}) == 1
    await supervisor.live_empty()
    assert provider.hangups == 1 and publisher.finals[0].close_reason == "client_hangup"
    assert await store.sessions(now=1000.0) == []
    assert await store.acquire(PRINCIPAL.key_hash, "next", limit=1, now=1000.0)  # the lease was released
    assert supervisor.metrics.reported_over_metered._value.get() == 0  # type: ignore[attr-defined]
    await calls.aclose()


async def test_calls_aclose_hangs_up_and_bills_running_watches() -> None:
    """At shutdown the app cancels what is left: each call hung up, billed once, detached."""
    supervisor = Supervisor(
        store=MemoryStore(),
        checker=KeyChecker(master_key="sk-master", client=None),
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=10,
        max_sessions_per_key=10,
    )
    provider, publisher = Provider(), Publisher()
    calls = Calls(supervisor)
    calls.start(watch(provider, publisher))
    await provider.wait_attached(1)
    await calls.aclose()
    assert (provider.hangups, [e.close_reason for e in publisher.finals]) == (1, ["server_shutdown"])
    assert supervisor.live == {} and len(calls) == 0


def test_sideband_urls_per_provider_and_route() -> None:
    """The sideband URL and credential header of each deployment kind; the credential never in the URL."""
    openai = Deployment(provider="openai", model="gpt-realtime", api_base=None, api_key="sk-o")
    azure = Deployment(provider="azure", model="dep", api_base="https://res.openai.azure.com", api_key="az-k")
    gateway = Deployment(provider="openai", model="m", api_base="http://gw:4000/v1", api_key="sk-g")
    cases = [
        (REALTIME_ENDPOINT, openai, "wss://api.openai.com/v1/realtime?call_id=rtc_1", ("Authorization", "Bearer sk-o")),
        (REALTIME_ENDPOINT, azure, "wss://res.openai.azure.com/openai/v1/realtime?call_id=rtc_1", ("api-key", "az-k")),
        (REALTIME_ENDPOINT, gateway, "ws://gw:4000/v1/realtime?call_id=rtc_1", ("Authorization", "Bearer sk-g")),
        (LIVE_ENDPOINT, openai, "wss://api.openai.com/v1/live/sessions/rtc_1/attach", ("Authorization", "Bearer sk-o")),
        (LIVE_ENDPOINT, azure, "wss://res.openai.azure.com/openai/v1/live/sessions/rtc_1/attach", ("api-key", "az-k")),
    ]
    for route, deployment, url, header in cases:
        target = sideband_target(ProviderCall(route=route, deployment=deployment, call_id="rtc_1"))
        assert (target.url, target.headers) == (url, (header,))


async def test_sweep_hangs_up_only_calls_whose_replica_died_and_only_once() -> None:
    """A recorded call whose session left the registry is hung up by exactly one of two sweeping replicas; a
    call still in the registry, and one this replica watches, are left alone; a call of a model no longer
    served is dropped without a hangup."""
    from sidecar.calls.orphans import CallRecord, MemoryCallRecords, sweep
    from sidecar.control import SessionInfo
    from tests.relay_stack import catalog_for, entry

    catalog = catalog_for([entry("gpt-realtime", "openai/gpt-realtime", "http://127.0.0.1:9", "sk-up")])
    deployment = catalog.resolve("gpt-realtime").deployments[0]
    store, records = MemoryStore(), MemoryCallRecords()

    def record(session_id: str, model: str = "gpt-realtime") -> CallRecord:
        call = ProviderCall(route=REALTIME_ENDPOINT, deployment=deployment, call_id=f"rtc_{session_id}")
        return CallRecord.of(session_id, "dead", model, call)

    for session_id in ("rs_alive", "rs_mine", "rs_orphan"):
        await records.put(record(session_id))
    await records.put(record("rs_gone_model", model="removed-model"))
    info = SessionInfo("rs_alive", "other", "h", "", "", "", "gpt-realtime", "", "0", "0")
    await store.heartbeat([info], {}, now=100.0)
    hung_up: list[ProviderCall] = []

    async def hangup(call: ProviderCall) -> None:
        hung_up.append(call)

    first = await sweep(records, store, catalog, hangup, watching={"rs_mine"}, now=101.0)
    second = await sweep(records, store, catalog, hangup, watching={"rs_mine"}, now=101.0)  # the other replica
    assert (first, second) == (["rs_orphan"], [])
    assert [(c.call_id, c.deployment.api_key) for c in hung_up].count(("rtc_rs_orphan", "sk-up")) == 1
    assert "rtc_rs_gone_model" not in [c.call_id for c in hung_up]
    assert "rtc_rs_alive" not in [c.call_id for c in hung_up]
