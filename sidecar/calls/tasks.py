"""The app's running WebRTC call watches (`Services.calls`): one background task per call, owned by the app.

    endpoints (HA) --Calls.start(watch)--> Supervisor.attach + register --> CallWatch.run --> Supervisor.detach

`start` puts the call among the live sessions at once (synchronously: there is no moment when a call the
provider answered is neither watched nor counted), then runs it in a task. At shutdown the lifespan drains the
Supervisor (every call hung up and billed `server_shutdown`), then `aclose` cancels what is left: a cancelled
watch still hangs up and bills once.

Each watched call is also recorded in the shared store (orphans.py) from its registration to its bill, and
`sweep_forever` hangs up the calls of replicas that died without draining.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sidecar.calls.call import ProviderCall
from sidecar.calls.orphans import SWEEP_S, CallRecord, CallRecords, MemoryCallRecords, sweep
from sidecar.calls.watch import CallWatch
from sidecar.catalog import Catalog
from sidecar.control import ControlError, Supervisor

log = logging.getLogger("sidecar.calls")


class Calls:
    """The background tasks of this process's call watches."""

    def __init__(self, supervisor: Supervisor, *, records: CallRecords | None = None) -> None:
        """`records`: where every replica's calls are recorded (orphans.RedisCallRecords when replicas share a
        Redis; in memory by default)."""
        self.supervisor = supervisor
        self.records: CallRecords = records if records is not None else MemoryCallRecords()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Calls being watched by this process."""
        return len(self._tasks)

    def start(self, watch: CallWatch) -> asyncio.Task[None]:
        """Watch a call the provider has answered (its lease already taken by Supervisor.admit): counted as a
        live session now, watched, billed and detached in a background task, which is returned."""
        self.supervisor.attach(watch)
        task = asyncio.create_task(self._run(watch), name=f"call {watch.session.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, watch: CallWatch) -> None:
        session = watch.session
        recorded = False
        try:
            await self.supervisor.register(watch)
            recorded = await self._record(watch)  # after the registration: orphans.py
            reason = await watch.run()
            extra = {"session_id": session.session_id, "key_hash": session.principal.key_hash, "close_reason": reason}
            log.info("call ended", extra=extra)
        finally:
            await watch.abandon("server_shutdown")  # no-op unless cancelled before `run` started
            if recorded:  # before the registry forgets the session
                await self._forget(session.session_id)
            await self.supervisor.detach(watch)

    async def _record(self, watch: CallWatch) -> bool:
        record = CallRecord.of(watch.session.session_id, self.supervisor.replica, watch.session.model.name, watch.call)
        try:
            await self.records.put(record)
        except ControlError as exc:  # the call is watched all the same; only a takeover after a crash is lost
            log.warning(
                "call not recorded in the shared store", extra={"session_id": record.session_id, "reason": str(exc)}
            )
            return False
        return True

    async def _forget(self, session_id: str) -> None:
        try:
            await self.records.drop(session_id)
        except ControlError as exc:  # a sweep may then hang up a call that is over already: harmless
            log.warning("call record not dropped", extra={"session_id": session_id, "reason": str(exc)})

    async def sweep_forever(
        self,
        catalog: Callable[[], Catalog],
        hangup: Callable[[ProviderCall], Awaitable[None]],
        *,
        every_s: float = SWEEP_S,
    ) -> None:
        """Every `every_s`, hang up the calls of replicas that died (orphans.sweep) until cancelled."""
        supervisor = self.supervisor
        while True:
            await asyncio.sleep(every_s)
            try:
                await sweep(
                    self.records,
                    supervisor.store,
                    catalog(),
                    hangup,
                    watching=set(supervisor.live),
                    now=supervisor.wall(),
                )
            except ControlError as exc:
                log.warning("sweep for the calls of dead replicas failed", extra={"reason": str(exc)})

    async def aclose(self) -> None:
        """Cancel every watch still running (each hangs up and bills once), and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
