"""The project's fake provider as a process that says, per client session, how much audio it decoded.

    python -m bench.chaos.provider [--host 127.0.0.1] [--port 0]

Prints its `ws://host:port` on the first line of stdout, then answers commands read from stdin, one a line:

    report   -> one JSON line {"decoded": {tag: bytes, ...}, "untagged": bytes, "sessions": n, "live": n}
    drop     -> every live upstream connection is aborted (TCP, no close frame): the provider dropping
    quit     -> stop

A client session is known by its tag: the part of its appends' `event_id` before the first `.` (the sidecar
forwards an append as the client sent it, `event_id` included). The decoded bytes are the fake provider's own
count (`FakeSession.audio_bytes`: valid base64 only). Recorded client events are cleared every half second
once a session's tag is known, so memory stays flat over a soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Final

from sidecar.testing.fake_provider import FakeProvider
from sidecar.testing.fake_wire import FakeSession

TRIM_EVERY_S: Final = 0.5


def tag_of(session: FakeSession) -> str | None:
    """The client's tag from the first recorded event with a dotted `event_id`, if any."""
    for event in session.events:
        event_id = event.get("event_id")
        if isinstance(event_id, str) and "." in event_id:
            return event_id.split(".", 1)[0]
    return None


class Tagger:
    """Tags each provider session with its client's tag and keeps its recorded events from piling up."""

    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        self.tags: dict[int, str] = {}  # id(FakeSession) -> tag
        self._done: dict[str, int] = {}  # closed sessions' decoded bytes, by tag
        self._done_untagged = 0
        self._live: list[FakeSession] = []

    def trim(self) -> None:
        """Tag new sessions, fold closed ones into the totals, clear recorded events of tagged ones."""
        sessions = self.provider.sessions
        self._live.extend(sessions)
        del sessions[:]  # the provider only appends to it; closed sessions are folded into the totals here
        still: list[FakeSession] = []
        for session in self._live:
            key = id(session)
            if key not in self.tags and (tag := tag_of(session)) is not None:
                self.tags[key] = tag
            if key in self.tags:
                session.events.clear()
            if session.closed.is_set():
                self._fold(session)
            else:
                still.append(session)
        self._live = still

    def _fold(self, session: FakeSession) -> None:
        tag = self.tags.pop(id(session), None) or tag_of(session)
        if tag is None:
            self._done_untagged += session.audio_bytes
        else:
            self._done[tag] = self._done.get(tag, 0) + session.audio_bytes

    def report(self) -> dict[str, object]:
        """Decoded bytes per tag (closed and live sessions), untagged bytes, session counts."""
        self.trim()
        decoded = dict(self._done)
        untagged = self._done_untagged
        for session in self._live:
            tag = self.tags.get(id(session))
            if tag is None:
                untagged += session.audio_bytes
            else:
                decoded[tag] = decoded.get(tag, 0) + session.audio_bytes
        return {"decoded": decoded, "untagged": untagged, "live": len(self._live)}


async def _commands(provider: FakeProvider, tagger: Tagger) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "report":
            print(json.dumps(tagger.report()), flush=True)
        elif line == "drop":
            await provider.drop_all()
            print(json.dumps({"dropped": True}), flush=True)
        elif line == "quit":
            return


async def _trim_forever(tagger: Tagger) -> None:
    while True:
        await asyncio.sleep(TRIM_EVERY_S)  # housekeeping period, not a synchronisation
        tagger.trim()


async def _run(host: str, port: int) -> None:
    async with FakeProvider(host=host, port=port) as provider:
        tagger = Tagger(provider)
        print(provider.url, flush=True)
        trimming = asyncio.create_task(_trim_forever(tagger))
        try:
            await _commands(provider, tagger)
        finally:
            trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimming


def main(argv: list[str] | None = None) -> None:
    """Run until `quit` or the end of stdin."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.provider", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.host, args.port))


if __name__ == "__main__":
    main()
