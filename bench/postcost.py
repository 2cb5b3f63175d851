"""The client CPU of one provider POST (a call's create) by HTTP client layer (issue 17, docs/performance.md).

`python -m bench.postcost [--rounds 3] [--posts 500]`: a 201 server (SDP answer, `Location`, 5 ms think time) on
CPU 1; on CPU 0, in interleaved rounds, one client process per layer posting a 1000-byte offer every 10 ms after 20
concurrent ones filled its pool: `httpx` (an AsyncClient, default pool, and `max_keepalive_connections=2`),
`httpcore` (an AsyncConnectionPool, keep-alive 2), `h11` (one h11.Connection on an asyncio stream), `raw` (bytes
on an asyncio stream: the floor). Prints each client process's CPU per POST (user + system) in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import h11
import httpcore
import httpx

PORT = 18999
URL = f"http://127.0.0.1:{PORT}/v1/realtime/calls"
OFFER = b"v=0\r\n" * 200
ANSWER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"
HEADERS = [("Authorization", "Bearer sk-bench"), ("Content-Type", "application/sdp")]
CLIENTS = ("httpx-20", "httpx-2", "httpcore-2", "h11", "raw")


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(0.005)
            writer.write(
                b"HTTP/1.1 201 Created\r\nLocation: /v1/realtime/calls/rtc_1\r\nContent-Type: application/sdp\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", PORT)
    await server.serve_forever()


async def _stream_post(kind: str) -> Callable[[], Awaitable[None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    lock = asyncio.Lock()
    conn = h11.Connection(h11.CLIENT)
    fixed = [("Host", f"127.0.0.1:{PORT}"), *HEADERS, ("Content-Length", str(len(OFFER)))]

    async def raw() -> None:
        async with lock:
            head = "".join(f"{k}: {v}\r\n" for k, v in fixed).encode()
            writer.write(b"POST /v1/realtime/calls HTTP/1.1\r\n" + head + b"\r\n" + OFFER)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(ANSWER))

    async def with_h11() -> None:
        async with lock:
            request = h11.Request(method="POST", target="/v1/realtime/calls", headers=fixed)
            writer.write(conn.send(request) + conn.send(h11.Data(data=OFFER)) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.EndOfMessage):
                    break
            conn.start_next_cycle()

    return raw if kind == "raw" else with_h11


async def client(kind: str, posts: int) -> float:
    """CPU ms per POST of this process for `posts` POSTs at 100 a second, after 20 concurrent ones."""
    post: Callable[[], Awaitable[None]]
    timeout = {"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}
    if kind.startswith("httpx"):
        limits = httpx.Limits(max_keepalive_connections=int(kind.split("-")[1]))
        hx = httpx.AsyncClient(limits=limits)

        async def post_httpx() -> None:
            await hx.post(URL, content=OFFER, headers=HEADERS, timeout=10.0)

        post = post_httpx

    elif kind == "httpcore-2":
        pool = httpcore.AsyncConnectionPool(max_connections=100, max_keepalive_connections=2)
        headers = [*HEADERS, ("Content-Length", str(len(OFFER)))]

        async def post_httpcore() -> None:
            await pool.request("POST", URL, headers=headers, content=OFFER, extensions={"timeout": timeout})

        post = post_httpcore

    else:
        post = await _stream_post(kind)

    await asyncio.gather(*(post() for _ in range(20)))
    start = os.times()
    tasks = []
    for _ in range(posts):
        tasks.append(asyncio.ensure_future(post()))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    end = os.times()
    return ((end.user - start.user) + (end.system - start.system)) / posts * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--client", choices=CLIENTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--posts", type=int, default=500)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    if args.client:
        print(f"{asyncio.run(client(args.client, args.posts)):.3f}")
        return
    server = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "bench.postcost", "--serve"])
    try:
        time.sleep(1.0)  # the server process starting; nothing to await across processes
        results: dict[str, list[float]] = {kind: [] for kind in CLIENTS}
        for round_ in range(args.rounds):
            order = CLIENTS[round_ % len(CLIENTS) :] + CLIENTS[: round_ % len(CLIENTS)]
            for kind in order:
                cmd = ["taskset", "-c", "0", sys.executable, "-m", "bench.postcost", "--client", kind]
                out = subprocess.run([*cmd, "--posts", str(args.posts)], capture_output=True, text=True, check=True)
                results[kind].append(float(out.stdout))
        for kind, values in results.items():
            print(f"{kind:11} median {statistics.median(values):.2f} ms ({min(values):.2f} to {max(values):.2f})")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
