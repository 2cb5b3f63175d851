"""The app's running WebRTC call watches (`Services.calls`): one background task per call, owned by the app.

    endpoints (HA) --Calls.start(watch)--> Supervisor.attach + register --> CallWatch.run --> Supervisor.detach

`start` puts the call among the live sessions at once (synchronously: there is no moment when a call the
provider answered is neither watched nor counted), then runs it in a task. At shutdown the lifespan drains the
Supervisor (every call hung up and billed `server_shutdown`), then `aclose` cancels what is left: a cancelled
watch still hangs up and bills once.
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.calls.watch import CallWatch
from sidecar.control import Supervisor

log = logging.getLogger("sidecar.calls")


class Calls:
    """The background tasks of this process's call watches."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
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
        try:
            await self.supervisor.register(watch)
            reason = await watch.run()
            session = watch.session
            extra = {"session_id": session.session_id, "key_hash": session.principal.key_hash, "close_reason": reason}
            log.info("call ended", extra=extra)
        finally:
            await watch.abandon("server_shutdown")  # no-op unless cancelled before `run` started
            await self.supervisor.detach(watch)

    async def aclose(self) -> None:
        """Cancel every watch still running (each hangs up and bills once), and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
