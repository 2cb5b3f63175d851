"""The calls load generator (issue 17): N WebRTC calls created through the sidecar, held, then hung up.

    python -m bench.callgen --url http://127.0.0.1:8787/v1/realtime/calls?model=gpt-realtime \
        --sessions 1000 --connect-at T --rate 200 --window W0 W1 --deadline TD

It plays the browsers' part that touches the sidecar: call i posts its SDP offer (`application/sdp`, as the
SDK's `client.realtime.calls.create` and a browser do) at `connect_at + i / rate`, and once the window has
ended hangs up through the sidecar (`POST <Location>/hangup`) at `W1 + i / rate`. The media never touches
the sidecar, so nothing else is sent: the per-event load is the provider's (bench/callprovider.py pushes
server events on each call's sideband inside the window). Headers (the key) come from `BENCH_HEADERS`.

Output: one JSON line on stdout in bench/loadgen.py's Report shape (`setup_s` is the create's round trip;
no appends or replies), plus `hangup_failures`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from bench.loadgen import Report
from bench.procs import quiet_gc, raise_fd_limit

OFFER_SDP: Final = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\na=rtpmap:111 opus/48000/2\r\n"
)
TIMEOUT_S: Final = 15.0


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _call(
    index: int, args: argparse.Namespace, client: httpx.AsyncClient, report: Report, hangups: Counter[str]
) -> None:
    await _sleep_until(args.connect_at + index / args.rate)
    started = time.monotonic()
    try:
        response = await client.post(args.url, content=OFFER_SDP, headers={"Content-Type": "application/sdp"})
    except httpx.HTTPError as exc:
        report.connect_failures[type(exc).__name__] += 1
        return
    if response.status_code != 201 or not response.text.startswith("v=0"):
        report.connect_failures[f"http_{response.status_code}"] += 1
        return
    report.setup_s.append(time.monotonic() - started)
    report.connected += 1
    location = response.headers.get("location", "")
    origin = urlsplit(args.url)
    await _sleep_until(args.window[1] + index / args.rate)
    try:
        done = await client.post(f"{origin.scheme}://{origin.netloc}{location}/hangup")
    except httpx.HTTPError as exc:
        hangups[type(exc).__name__] += 1
        return
    if done.status_code == 200:
        report.completed += 1
        report.close_codes["hangup_200"] += 1
    else:
        hangups[f"http_{done.status_code}"] += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every call of this shard, stopped at the deadline; the report as a dict."""
    sessions = list(range(args.shard, args.sessions, args.shards))
    report = Report(sessions=len(sessions))
    hangups: Counter[str] = Counter()
    headers = json.loads(os.environ.get("BENCH_HEADERS", "{}"))
    limits = httpx.Limits(max_connections=len(sessions) + 10, max_keepalive_connections=len(sessions) + 10)
    async with httpx.AsyncClient(headers=headers, timeout=TIMEOUT_S, limits=limits) as client:
        tasks = [asyncio.create_task(_call(i, args, client, report, hangups)) for i in sessions]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, args.deadline - time.monotonic()))
        report.unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    out = report.to_json()
    out["hangup_failures"] = dict(hangups)
    if hangups:
        report.ended_early.update({f"hangup_{k}": v for k, v in hangups.items()})
        out["ended_early"] = dict(report.ended_early)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run one calls load generator process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.callgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the sidecar's create URL (with ?model=)")
    parser.add_argument("--sessions", type=int, required=True, help="calls across all shards")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--connect-at", type=float, required=True, help="monotonic time of the first create")
    parser.add_argument("--rate", type=float, default=200.0, help="calls created (and hung up) per second")
    parser.add_argument("--window", type=float, nargs=2, required=True, metavar=("W0", "W1"))
    parser.add_argument("--deadline", type=float, required=True, help="monotonic time to stop by, whatever happens")
    parser.add_argument("--rtt-out", help="ignored (bench/loadgen.py's option; calls have no round trips)")
    args, _ = parser.parse_known_args(argv)
    raise_fd_limit()
    quiet_gc()
    import uvloop

    result = uvloop.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
