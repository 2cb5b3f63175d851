"""HTTP request bodies are capped while they stream in: 413 with an OpenAI error body, never read whole."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from sidecar.bodies import BodyLimit
from sidecar.config import DEFAULT_MAX_BODY_BYTES
from tests.billing_support import DEADLINE_S
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, stack

CAP = 1024
CHUNK = 16 * 1024
DECLARED = 200 * 1024 * 1024
ROUTES = {
    "client_secrets": ("/v1/realtime/client_secrets", USER_KEY),
    "admin": ("/admin/revocations", MASTER_KEY),
    "captions": ("/captions/token", USER_KEY),
}


class Reply:
    """An HTTP response read off a raw socket."""

    def __init__(self, raw: bytes, sent: int) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.sent = sent

    def error(self) -> Any:
        """The OpenAI error object of the body."""
        return orjson.loads(self.body)["error"]


def _head(port: int, path: str, key: str, framing: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def _read_reply(sock: socket.socket, sent: int) -> Reply:
    """Read until the server closes (every 413 closes the connection)."""
    sock.settimeout(DEADLINE_S)
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    return Reply(raw, sent)


def post_declared(port: int, path: str, key: str, length: int) -> Reply:
    """Send only the head of a POST that declares `length` bytes of body, then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(_head(port, path, key, f"Content-Length: {length}"))
        return _read_reply(sock, 0)


def post_chunked(port: int, path: str, key: str, size: int) -> Reply:
    """POST `size` bytes of body in 512-byte chunks (no Content-Length), in one write, and read the answer.

    One write keeps the whole request in one loopback segment, which the server takes off the socket at
    once: closing after its 413 then ends the connection cleanly (unread bytes in the kernel would make it
    a reset, which can discard the answer before the client reads it).
    """
    piece = b"%x\r\n" % 512 + b" " * 512 + b"\r\n"
    body = piece * (size // 512) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(_head(port, path, key, "Transfer-Encoding: chunked") + body)
        return _read_reply(sock, size)


def assert_too_large(reply: Reply, cap: int) -> None:
    """413, the connection closed, and the OpenAI-shaped error."""
    assert reply.status == 413, reply.body
    assert reply.headers.get("connection") == "close"
    assert reply.error() == {
        "message": f"The request body is larger than the limit of {cap} bytes.",
        "type": "invalid_request_error",
        "code": "request_too_large",
        "param": None,
    }


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Stack]:
    """The contract-test sidecar with a 1 KiB body cap, client secrets and the captions page on."""
    async with stack(
        tmp_path, max_body_bytes=CAP, client_secret_key="k" * 40, captions_page=True, captions_key=USER_KEY
    ) as s:
        yield s


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_declared_oversized_body_is_refused_before_it_is_read(route: str, sidecar: Stack) -> None:
    """A Content-Length above the cap is answered 413 at once: the server waits for none of the 200 MB."""
    path, key = ROUTES[route]
    reply = await _in_thread(post_declared, sidecar.sidecar.port, path, key, DECLARED)
    assert_too_large(reply, CAP)


@pytest.mark.parametrize("route", ["client_secrets", "admin"])
async def test_chunked_body_over_the_cap_is_refused(route: str, sidecar: Stack) -> None:
    """A chunked body (no Content-Length) is counted as it is read: 4 KiB against a 1 KiB cap gets 413."""
    path, key = ROUTES[route]
    reply = await _in_thread(post_chunked, sidecar.sidecar.port, path, key, 4 * CAP)
    assert_too_large(reply, CAP)


async def test_body_at_the_cap_is_accepted(sidecar: Stack) -> None:
    """A body of exactly the cap mints a client secret as usual."""
    body = orjson.dumps({"session": {"type": "transcription"}})
    body += b" " * (CAP - len(body))
    headers = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=sidecar.sidecar.http) as http:
        answer = await http.post("/v1/realtime/client_secrets", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["value"].startswith("ek_")


async def test_default_cap_refuses_a_200_mb_declared_body(tmp_path: Path) -> None:
    """Without SIDECAR_MAX_BODY_BYTES the cap is 64 KiB: 200 MB to the client-secrets route gets 413."""
    async with stack(tmp_path, client_secret_key="k" * 40) as s:
        reply = await _in_thread(post_declared, s.sidecar.port, "/v1/realtime/client_secrets", USER_KEY, DECLARED)
    assert_too_large(reply, DEFAULT_MAX_BODY_BYTES)


async def test_middleware_reads_at_most_the_cap_plus_one_chunk() -> None:
    """Behind BodyLimit a route that reads its whole body pulls at most cap + one chunk of an endless one."""
    pulled = 0

    async def endless() -> Message:
        nonlocal pulled
        pulled += CHUNK
        return {"type": "http.request", "body": b" " * CHUNK, "more_body": True}

    async def read_all(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = BodyLimit(read_all, max_bytes=4 * CHUNK)
    await app({"type": "http", "method": "POST", "path": "/", "headers": []}, endless, send)
    assert pulled == 5 * CHUNK
    assert sent[0]["status"] == 413


async def test_websocket_scopes_pass_through_untouched() -> None:
    """WebSocket connections get the server's own receive and send: the relay's frames see no wrapper."""
    seen: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((receive, send))

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    await BodyLimit(app, max_bytes=1)({"type": "websocket", "headers": []}, receive, send)
    assert seen == [(receive, send)]


async def _in_thread(fn: Any, *args: Any) -> Reply:
    """Run a blocking raw-socket client off the loop that serves the sidecar."""
    reply: Reply = await asyncio.to_thread(fn, *args)
    return reply
