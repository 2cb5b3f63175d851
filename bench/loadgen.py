"""The load generator: N realtime sessions, each streaming 100 ms PCM16 chunks in real time.

    python -m bench.loadgen --url ws://127.0.0.1:8787/v1/realtime?intent=transcription \
        --sessions 1000 --connect-at T --rate 200 --window W0 W1 --deadline TD --rtt-out rtt.bin
    python -m bench.loadgen --surface live --model gpt-live-1 --url ws://127.0.0.1:8787/v1/live/sessions ...
    python -m bench.loadgen --surface translation --url ws://.../v1/realtime/translations?model=... ...

`--surface` picks the protocol (`SURFACES`): /v1/realtime (the default), GPT-Live or realtime translation.
The load is the same on each: the same chunks at the same pace, one reply per chunk matched the same way;
only the event names differ, and a GPT-Live session opens with the client's `session.start` (naming
`--model`) answered by `session.started` where the others wait for the server's `session.created`.

Headers to send (the key) come from the environment variable `BENCH_HEADERS` (a JSON object), so no key
shows in a process listing. All times are `time.monotonic()` seconds, which every process on the machine
shares (CLOCK_MONOTONIC), so the orchestrator can place the measurement window for every process at once.

Per session (one task, plus the reader task it starts): connect at `connect_at + i / rate`, wait for
the opening event (`session.created`, or GPT-Live's `session.started`: the setup time), then send one
append every 100 ms until the window ends, each with `event_id` `e<n>`. The fake provider answers every
append with a transcript delta whose `delta` is that event_id, so a reply is matched to its append by
index; the round trip is from the send to the reply's arrival. Round trips are recorded for appends sent
inside the window `[W0, W1]`; appends and replies are counted inside it too. Sessions stay open until the window ends,
then wait (at most `--drain` s) for their outstanding replies, close with 1000 and record the close code.

One process on one core has to drive ~1000 sessions (20,000 frames a second) and leave room for the fake
provider, so the per-frame path is lean: the append frame is encoded once, as bytes around the event_id,
and sent as a text frame without re-encoding; replies are received undecoded and parsed with orjson;
frame masks come from a PRNG (`use_cheap_masks`); garbage is collected rarely (`quiet_gc`); uvloop when
installed. What remains is mostly the kernel's loopback TCP work (write/read system calls): a version
on websockets' sans-I/O protocol with timer callbacks instead of tasks measured the same CPU at 800
sessions, so this simpler one stays.

Output: one JSON line on stdout (`Report.to_json`), the round trips as float64 seconds in `--rtt-out`.
Everything stops by `--deadline` at the latest: unfinished sessions are then counted as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from picows import WSCloseCode, WSError, WSFrame, WSHandshakeError, WSListener, WSMsgType, WSTransport, ws_connect

from bench.procs import quiet_gc, raise_fd_limit

CHUNK_BYTES: Final = 4800  # 100 ms of 24 kHz 16-bit mono PCM
CHUNK_S: Final = 0.1
DELTA_TYPE: Final = "conversation.item.input_audio_transcription.delta"
CREATED_TYPE: Final = "session.created"
SETUP_TIMEOUT_S: Final = 15.0
CLOSE_TIMEOUT_S: Final = 3.0


@dataclass(frozen=True)
class Surface:
    """One protocol's event names: what an append is, the reply matched to it, the session's opening."""

    name: str
    append: str  # the client's append event
    delta: str  # the provider's reply to each append (its `delta` is the append's event_id)
    opened: str  # the server event that opens the session (the setup time ends there)
    starts: bool = False  # the client speaks first (GPT-Live's session.start naming the model)
    pushed: tuple[str, ...] = ()  # server events counted as replies; the client then sends no appends


SURFACES: Final = {
    "realtime": Surface("realtime", "input_audio_buffer.append", DELTA_TYPE, CREATED_TYPE),
    # GPT-Live (openai types/live): session.start -> session.started; input_transcript.delta per append.
    "live": Surface(
        "live", "session.input_audio.append", "session.input_transcript.delta", "session.started", starts=True
    ),
    # Realtime translation (openai types/realtime/realtime_translation_*).
    "translation": Surface(
        "translation", "session.input_audio_buffer.append", "session.output_transcript.delta", CREATED_TYPE
    ),
    # /v1/realtime relaying what the provider pushes by itself (bench/callprovider.py), one event per 100 ms:
    # what a WebRTC call's sideband carries (issue 17), here relayed to a client. Nothing is sent upstream.
    "push": Surface(
        "push",
        "input_audio_buffer.append",
        DELTA_TYPE,
        CREATED_TYPE,
        pushed=("response.done", "conversation.item.input_audio_transcription.completed"),
    ),
}


def append_frame_parts(*, chunk_bytes: int = CHUNK_BYTES, surface: str = "realtime") -> tuple[bytes, bytes]:
    """The append event's JSON as bytes before and after its event_id (the audio is a low-level tone)."""
    samples = bytes((n * 7) & 0x0F for n in range(chunk_bytes))
    audio = base64.b64encode(samples).decode()
    placeholder = "\x00EVENT_ID\x00"
    append = SURFACES[surface].append
    text = orjson.dumps({"type": append, "event_id": placeholder, "audio": audio}).decode()
    before, after = text.split(orjson.dumps(placeholder).decode()[1:-1])
    return before.encode(), after.encode()


def start_frame(model: str) -> bytes:
    """GPT-Live's first client message: `session.start` naming the model (PCM16 24 kHz, the default)."""
    return orjson.dumps({"type": "session.start", "event_id": "start", "session": {"model": model}})


@dataclass
class Plan:
    """What to run: where, how many, and when (monotonic seconds)."""

    url: str
    headers: dict[str, str]
    sessions: list[int]  # global session indexes this process runs
    connect_at: float
    rate: float  # sessions connected per second (across all load generator processes)
    window: tuple[float, float]
    drain_s: float
    deadline: float
    surface: Surface = SURFACES["realtime"]
    model: str = ""  # named by GPT-Live's session.start (the other surfaces carry it in the URL)
    stream_at: float | None = None  # appends begin at this time (spread over one chunk), not once opened


@dataclass
class Report:
    """What this process saw. Counters are over all its sessions."""

    sessions: int = 0
    connected: int = 0
    completed: int = 0  # streamed to the end of the window and closed cleanly by us
    setup_s: list[float] = field(default_factory=list)
    connect_failures: Counter[str] = field(default_factory=Counter)
    ended_early: Counter[str] = field(default_factory=Counter)  # server closed before the window ended
    close_codes: Counter[str] = field(default_factory=Counter)
    error_events: int = 0
    unmatched_replies: int = 0
    appends_sent: int = 0
    replies_received: int = 0
    appends_in_window: int = 0
    replies_in_window: int = 0
    missing_replies: int = 0  # appends never answered by the time the session closed
    max_send_lag_s: float = 0.0  # how far behind schedule a send went (the generator's own saturation)
    unfinished: int = 0  # still running at the deadline
    rtt_s: array[float] = field(default_factory=lambda: array("d"))

    def to_json(self) -> dict[str, Any]:
        """Everything but the round trips, JSON-ready."""
        out = {k: v for k, v in self.__dict__.items() if k != "rtt_s"}
        out["rtt_count"] = len(self.rtt_s)
        return out


class Session(WSListener):
    """One session's connection: its opening event, its paced appends, and the replies matched to them.

    Everything per frame runs in picows callbacks (`on_ws_frame`) and loop timers (`_send`), no task.
    """

    def __init__(self, plan: Plan, report: Report, parts: tuple[bytes, bytes]) -> None:
        loop = asyncio.get_running_loop()
        self.plan, self.report = plan, report
        self.before, self.after = parts
        self.delta_type, self.opened_type = plan.surface.delta, plan.surface.opened
        self.transport: WSTransport | None = None
        self.created: asyncio.Future[bool] = loop.create_future()  # opened (True) or closed (False)
        self.streamed: asyncio.Future[bool] = loop.create_future()  # the window ended (True) or closed (False)
        self.quiet = asyncio.Event()  # set when no append waits for its reply
        self.quiet.set()
        self.gone = asyncio.Event()  # the connection is closed
        self.sent_at: array[float] = array("d")
        self.outstanding = 0
        self.start = 0.0
        self._loop = loop

    # ---- picows callbacks -----------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.plan.surface.starts:
            transport.send(WSMsgType.TEXT, start_frame(self.plan.model))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is not WSMsgType.TEXT:
            if kind is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            return
        now = time.monotonic()
        event = orjson.loads(frame.get_payload_as_bytes())
        kind_ = event.get("type") if isinstance(event, dict) else None
        if kind_ == self.delta_type:
            self._reply(event.get("delta", ""), now)
        elif kind_ in self.plan.surface.pushed:
            self.report.replies_received += 1
            w0, w1 = self.plan.window
            if w0 <= now <= w1:
                self.report.replies_in_window += 1
        elif kind_ == self.opened_type:
            if not self.created.done():
                self.created.set_result(True)
        elif kind_ == "error":
            self.report.error_events += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for future in (self.created, self.streamed):
            if not future.done():
                future.set_result(False)
        self.gone.set()

    # ---- the stream -----------------------------------------------------------------------------

    def _reply(self, delta: Any, now: float) -> None:
        report = self.report
        try:
            sent = self.sent_at[int(delta[1:])]
        except (ValueError, IndexError, TypeError):
            report.unmatched_replies += 1
            return
        report.replies_received += 1
        w0, w1 = self.plan.window
        if w0 <= now <= w1:
            report.replies_in_window += 1
        if w0 <= sent <= w1:
            report.rtt_s.append(now - sent)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.quiet.set()

    def begin(self) -> None:
        """Start sending an append every 100 ms, the first now."""
        self.start = time.monotonic()
        self._send()

    def _send(self) -> None:
        transport = self.transport
        if self.streamed.done() or transport is None:
            return
        if self.plan.surface.pushed:  # nothing to send: wait for the window's end
            self._loop.call_later(max(0.0, self.plan.window[1] - time.monotonic()), self._end_push)
            return
        n = len(self.sent_at)
        due = self.start + n * CHUNK_S
        w0, w1 = self.plan.window
        if due > w1:
            self.streamed.set_result(True)
            return
        now = time.monotonic()
        report = self.report
        if now - due > report.max_send_lag_s:
            report.max_send_lag_s = now - due
        self.sent_at.append(now)
        self.outstanding += 1
        self.quiet.clear()
        transport.send(WSMsgType.TEXT, b"".join((self.before, b"e%d" % n, self.after)))
        report.appends_sent += 1
        if w0 <= now <= w1:
            report.appends_in_window += 1
        self._loop.call_later(due + CHUNK_S - time.monotonic(), self._send)

    def _end_push(self) -> None:
        if not self.streamed.done():
            self.streamed.set_result(True)

    def close_code(self) -> str:
        """The close code the server sent (its echo of ours when we closed first); 1006 if none came."""
        received = self.transport.close_handshake.recv if self.transport is not None else None
        if received is None:
            return "1006"
        code = received.code
        return str(code.value if isinstance(code, WSCloseCode) else code)


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _open(plan: Plan, report: Report, parts: tuple[bytes, bytes]) -> Session | None:
    """Connect and wait for the session's opening event; None (counted) on failure."""
    started = time.monotonic()
    made: list[Session] = []

    def factory() -> Session:
        made.append(Session(plan, report, parts))
        return made[-1]

    try:
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await ws_connect(
                factory,
                plan.url,
                extra_headers=plan.headers,
                websocket_handshake_timeout=SETUP_TIMEOUT_S,
                max_frame_size=2**24,
            )
            created = await made[0].created
    except WSHandshakeError as exc:
        status = exc.response.status if exc.response is not None else None
        report.connect_failures[f"http_{int(status)}" if status is not None else type(exc).__name__] += 1
        return None
    except TimeoutError:
        report.connect_failures["timeout"] += 1
        if made and made[0].transport is not None:
            made[0].transport.disconnect(graceful=False)
        return None
    except (OSError, WSError) as exc:
        report.connect_failures[type(exc).__name__] += 1
        return None
    session = made[0]
    if not created:
        report.connect_failures[f"closed_{session.close_code()}"] += 1
        return None
    report.setup_s.append(time.monotonic() - started)
    report.connected += 1
    return session


async def _session(index: int, plan: Plan, report: Report, parts: tuple[bytes, bytes]) -> None:
    await _sleep_until(plan.connect_at + index / plan.rate)
    session = await _open(plan, report, parts)
    if session is None:
        return
    transport = session.transport
    assert transport is not None
    try:
        if plan.stream_at is not None:
            await _sleep_until(plan.stream_at + (index / plan.rate) % CHUNK_S)
        session.begin()
        if await session.streamed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(plan.drain_s):
                    await session.quiet.wait()
            report.missing_replies += session.outstanding
            await _sleep_until(plan.window[1])  # every session stays open for the whole window
            transport.send_close(WSCloseCode.OK)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await session.gone.wait()
            report.completed += 1
        else:
            report.ended_early[session.close_code()] += 1
            report.missing_replies += session.outstanding
    finally:
        if not session.gone.is_set():
            transport.disconnect(graceful=False)
        report.close_codes[session.close_code()] += 1


async def run(plan: Plan) -> Report:
    """Run every session of `plan`, stopping at its deadline; return the report."""
    report = Report(sessions=len(plan.sessions))
    parts = append_frame_parts(surface=plan.surface.name)
    tasks = [asyncio.create_task(_session(i, plan, report, parts)) for i in plan.sessions]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, plan.deadline - time.monotonic()))
    report.unfinished = len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            report.connect_failures[f"crash:{type(task.exception()).__name__}"] += 1
    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--surface", choices=sorted(SURFACES), default="realtime", help="the protocol spoken")
    parser.add_argument("--model", default="gpt-live-1", help="the model GPT-Live's session.start names")
    parser.add_argument("--sessions", type=int, required=True, help="sessions across all shards")
    parser.add_argument("--shard", type=int, default=0, help="this process runs sessions shard, shard+shards, ...")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--connect-at", type=float, required=True, help="monotonic time of the first connect")
    parser.add_argument("--rate", type=float, default=200.0, help="sessions connected per second")
    parser.add_argument("--window", type=float, nargs=2, required=True, metavar=("W0", "W1"))
    parser.add_argument("--drain", type=float, default=2.0, help="seconds to wait for outstanding replies")
    parser.add_argument("--deadline", type=float, required=True, help="monotonic time to stop by, whatever happens")
    parser.add_argument("--rtt-out", required=True, help="file for the round trips (float64 seconds)")
    parser.add_argument("--stream-at", type=float, help="monotonic time the appends begin (default: once opened)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run one load generator process (see the module docstring)."""
    args = _parse_args(argv)
    raise_fd_limit()
    quiet_gc()
    headers = json.loads(os.environ.get("BENCH_HEADERS", "{}"))
    plan = Plan(
        url=args.url,
        headers=headers,
        sessions=list(range(args.shard, args.sessions, args.shards)),
        connect_at=args.connect_at,
        rate=args.rate,
        window=(args.window[0], args.window[1]),
        drain_s=args.drain,
        deadline=args.deadline,
        surface=SURFACES[args.surface],
        model=args.model,
        stream_at=args.stream_at,
    )
    import uvloop

    report = uvloop.run(run(plan))
    with open(args.rtt_out, "wb") as out:
        report.rtt_s.tofile(out)
    sys.stdout.write(json.dumps(report.to_json()) + "\n")


if __name__ == "__main__":
    main()
