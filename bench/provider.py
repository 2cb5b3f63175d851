"""The fake provider in benchmark mode, as its own process: `python -m bench.provider [--port 0]`.

`Faults(reply_each_append=True, record_events=False)`: every append is answered with a transcription
delta whose `delta` is the append's event_id, and no client event is kept, so memory stays flat.
Prints its `ws://host:port` URL on stdout once listening; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from bench.procs import quiet_gc, raise_fd_limit
from sidecar.testing.fake_provider import DEFAULT_API_KEY, FakeProvider, Faults


async def serve(*, host: str, port: int, api_key: str) -> None:
    """Listen until a stop signal, printing the URL first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    faults = Faults(reply_each_append=True, record_events=False)
    async with FakeProvider(host=host, port=port, api_key=api_key, faults=faults) as provider:
        print(provider.url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark provider (uvloop when installed, like the sidecar under uvicorn)."""
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args(argv)
    raise_fd_limit()
    quiet_gc()
    coro = serve(host=args.host, port=args.port, api_key=args.api_key)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
