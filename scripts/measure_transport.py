"""Measure the client-facing transport of a real `sidecar serve` (issue 12, items 8 and 9), bounded.

    .venv/bin/python scripts/measure_transport.py [--requests 5000] [--idle 1100] [--src DIR]

Starts `sidecar serve` (embedded billing, no provider needed) with a soft open-file limit of 1024, then:

1. leak: sends `--requests` malformed WebSocket upgrades over raw sockets (each kind in turn: non-ASCII bytes
   in Sec-WebSocket-Protocol, -Key, -Version, other headers, the target; bad keys and versions; a line over
   8 KiB; over 128 headers) and reports the answers, how many connections the server closed, and the
   server's RSS after a warm-up and at the end (kB per request);
2. held: opens `--idle` connections that never send, plus 20 that send one byte a second, and reports
   whether GET /readyz is still answered and how many of them the server has closed after the handshake
   timeout (default 10 s) and a margin;
3. shutdown: SIGTERM, and the exit status.

`--src DIR` runs the sidecar from another checkout (e.g. `git archive HEAD` of an older commit) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from sidecar.testing.upgrades import malformed

MASTER = "sk-measure-master"
MALFORMED = malformed(b"/v1/realtime?model=m")


def rss_kb(pid: int) -> int:
    """The resident set size of `pid`, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def ask(port: int, data: bytes, *, wait_s: float = 2.0) -> tuple[str, bool]:
    """Send `data` on a new connection: the status line answered (or '-') and whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got, closed = b"", False
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                got += chunk
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    writer.close()
    return (got.split(b"\r\n", 1)[0].decode("latin-1") or "-"), closed


async def ready(port: int) -> bool:
    """True when GET /readyz is answered 200 within 2 s."""
    try:
        status, _ = await ask(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    except OSError:
        return False
    return status.startswith("HTTP/1.1 200")


async def measure_leak(pid: int, port: int, requests: int) -> None:
    example = MALFORMED["non-ASCII Sec-WebSocket-Protocol"]  # the example
    for _ in range(300):  # warm-up: allocator pools, caches
        await ask(port, example)
    start = rss_kb(pid)
    answers: Counter[str] = Counter()
    closed = 0
    started = time.monotonic()
    marks = []  # RSS after each quarter: a leak grows with every one, garbage awaiting collection does not
    for batch in range(0, requests, 50):
        for status, was_closed in await asyncio.gather(*(ask(port, example) for _ in range(min(50, requests - batch)))):
            answers[status] += 1
            closed += was_closed
        if (batch + 50) * 4 // requests > len(marks):
            marks.append(rss_kb(pid))
    end = rss_kb(pid)
    took = time.monotonic() - started
    print(f"leak: {requests} upgrades with a non-ASCII byte in Sec-WebSocket-Protocol in {took:.1f} s")
    print(f"  answers: {dict(answers)}; closed by the server: {closed}/{requests}")
    print(f"  RSS {start / 1024:.1f} MB -> {end / 1024:.1f} MB: {(end - start) / requests:+.2f} kB per request")
    print("  RSS after each quarter: " + ", ".join(f"{mark / 1024:.1f}" for mark in marks) + " MB")
    print("  one of each kind of malformed upgrade:")
    for name, data in MALFORMED.items():
        status, was_closed = await ask(port, data)
        print(f"    {name:34s} -> {status!r}, {'closed' if was_closed else 'HELD OPEN (2 s)'}")


async def measure_held(port: int, idle: int, timeout_s: float) -> None:
    quiet = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    print(f"held: {idle} connections that never send, 20 sending a byte a second")
    print(f"  GET /readyz answered 200 with them open: {await ready(port)}")
    request = b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 100 + b"\r\n\r\n"
    deadline = time.monotonic() + timeout_s + 3
    sent = 0
    while time.monotonic() < deadline:
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.send(request[sent : sent + 1])
        sent += 1
        await asyncio.sleep(1)
    print(f"  after {timeout_s + 3:.0f} s: closed by the server: {sum(map(_closed, quiet))}/{idle} quiet, ", end="")
    print(f"{sum(map(_closed, slow))}/20 slow")
    print(f"  GET /readyz answered 200 afterwards: {await ready(port)}")
    for sock in quiet + slow:
        sock.close()


def _closed(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (after an answer or not): EOF or a reset."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def file_limit(pid: int) -> str:
    """The "Max open files" line of /proc/PID/limits."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return " ".join(next(line for line in lines if line.startswith("Max open files")).split())


def serve_env(tmp: Path, port: int, src: Path | None) -> dict[str, str]:
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n- model_name: m\n  litellm_params: {model: openai/m, api_base: 'http://127.0.0.1:9', "
        f"api_key: sk-x}}\ngeneral_settings: {{master_key: {MASTER}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env |= {
        "SIDECAR_LITELLM_CONFIG": str(config),
        "SIDECAR_PORT": str(port),
        "SIDECAR_SPOOL_DIR": str(tmp / "spool"),
        "SIDECAR_DATABASE_URL": f"sqlite:///{tmp / 'billing.db'}",
    }
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def low_file_limit() -> None:
    """The usual default soft limit (1024) under the current hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


async def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--timeout", type=float, default=10.0, help="the handshake timeout the server runs with")
    parser.add_argument("--src", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        env = serve_env(Path(tmp), port, args.src)
        env["SIDECAR_HANDSHAKE_TIMEOUT_S"] = str(args.timeout)
        log = os.open(Path(tmp) / "sidecar.log", os.O_WRONLY | os.O_CREAT, 0o600)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=log,
            preexec_fn=low_file_limit,
        )
        try:
            for _ in range(200):
                if await ready(port):
                    break
                await asyncio.sleep(0.05)
            print("server:", file_limit(proc.pid))
            await measure_leak(proc.pid, port, args.requests)
            await measure_held(port, args.idle, args.timeout)
            proc.send_signal(signal.SIGTERM)
            print("shutdown: SIGTERM -> exit status", await asyncio.wait_for(proc.wait(), 60))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(log)


if __name__ == "__main__":
    asyncio.run(main())
