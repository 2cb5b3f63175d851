"""The provider HTTP client of WebRTC calls: HTTP/1.1 with `h11` over asyncio streams, a small keep-alive pool.

Why not httpx: one create-like POST costs ~2.1 ms of client CPU through httpx and ~0.7 ms through h11 on an
asyncio stream (bench/postcost.py, docs/performance.md "WebRTC calls beside /v1/realtime"); the calls' create
has to stay within 10 % of a /v1/realtime session's CPU.

Rules:
- at most `max_connections` requests in flight (more wait for one to end, within their timeout); one pool of
  idle connections per origin (scheme, host, port), at most `max_idle` each; a connection goes
  back only when h11 lets another request follow (both sides DONE, `start_next_cycle` back to IDLE); it is
  dropped on any error, on `Connection: close`, or when the server closed it while idle;
- TLS with verification (`ssl.create_default_context()`, SNI = the host);
- one overall timeout per request around connect, write and read: HTTPTimeout;
- a response body above `max_body` bytes is refused (ResponseTooLarge) and its connection dropped;
- retry: a *pooled* connection that fails on write, or ends (EOF or reset) before any byte of the response,
  is the keep-alive race (the server closed it while idle): the request is sent once more on a fresh
  connection, as httpx does. Never otherwise: a fresh connection's failure, or a failure after a response byte
  arrived, may follow a request the provider processed, and is raised (HTTPError).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, NamedTuple, Self
from urllib.parse import urlsplit

import h11

MAX_BODY: Final = 256 * 1024
MAX_IDLE: Final = 8
#: Requests in flight at once (httpx's default pool limit): more wait, within their own timeout.
MAX_CONNECTIONS: Final = 100
_READ: Final = 65536
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class HTTPError(Exception):
    """The request failed before a whole response arrived (connect, TLS, reset, protocol, too large)."""


class HTTPTimeout(HTTPError):
    """No whole response within the request's timeout."""


class ResponseTooLarge(HTTPError):
    """The response body is larger than the client accepts."""


class _Stale(Exception):
    """A pooled connection the server had closed: the request was not processed (module docstring)."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    #: Header names in lower case; a repeated header keeps its last value.
    headers: Mapping[str, str]
    content: bytes = field(repr=False)


def split_url(url: str) -> tuple[Origin, str]:
    """(the origin, the request target) of an http(s) URL. Pure; raises HTTPError for any other URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise HTTPError("not an http(s) URL")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise HTTPError("bad port in URL") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(scheme, parts.hostname, port), target


def host_header(origin: Origin) -> str:
    """The Host header of `origin` (the port only when not the scheme's default). Pure."""
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return host if origin.port == _DEFAULT_PORTS[origin.scheme] else f"{host}:{origin.port}"


def request_head(origin: Origin, target: str, headers: Sequence[tuple[str, str]], length: int) -> h11.Request:
    """The request line and headers: Host and Content-Length set here, the caller's headers after. Pure."""
    fixed = [("Host", host_header(origin)), ("Content-Length", str(length))]
    return h11.Request(method="POST", target=target, headers=[*fixed, *headers])


def reusable(conn: h11.Connection) -> bool:
    """Whether another request may follow on `conn` (after start_next_cycle). Pure."""
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def close(self) -> None:
        self.writer.close()


class HTTP11Pool:
    """POST over HTTP/1.1 with keep-alive (module docstring). Close with `aclose` (or `async with`)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = MAX_IDLE,
        max_body: int = MAX_BODY,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._max_body = max_body
        self._idle: dict[Origin, list[_Conn]] = {}
        self._closed = False
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def idle_count(self, origin: Origin | None = None) -> int:
        """Idle pooled connections (of `origin`, or all)."""
        if origin is not None:
            return len(self._idle.get(origin, ()))
        return sum(len(conns) for conns in self._idle.values())

    async def post(
        self, url: str, *, headers: Sequence[tuple[str, str]] = (), content: bytes = b"", timeout_s: float
    ) -> Response:
        """POST `content` to `url`. Raises HTTPTimeout, ResponseTooLarge or HTTPError."""
        if self._closed:
            raise HTTPError("client closed")
        origin, target = split_url(url)
        head = request_head(origin, target, headers, len(content))
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                pooled = self._take(origin)
                if pooled is not None:
                    try:
                        return await self._exchange(origin, pooled, head, content, pooled=True)
                    except _Stale:
                        pass  # the keep-alive race: once more on a fresh connection
                fresh = await self._open(origin)
                return await self._exchange(origin, fresh, head, content, pooled=False)
        except TimeoutError as exc:
            raise HTTPTimeout("timed out") from exc

    def _take(self, origin: Origin) -> _Conn | None:
        conns = self._idle.get(origin)
        while conns:
            conn = conns.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()  # the server closed it while idle (seen already)
        return None

    def _put(self, origin: Origin, conn: _Conn) -> None:
        conns = self._idle.setdefault(origin, [])
        if self._closed or len(conns) >= self._max_idle:
            conn.close()
        else:
            conns.append(conn)

    async def _open(self, origin: Origin) -> _Conn:
        tls: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            reader, writer = await asyncio.open_connection(
                origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None, limit=_READ
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS verification (ssl.SSLError is an OSError)
            raise HTTPError(f"connect failed ({type(exc).__name__})") from exc
        return _Conn(reader, writer)

    async def _exchange(
        self, origin: Origin, conn: _Conn, head: h11.Request, content: bytes, *, pooled: bool
    ) -> Response:
        keep = False
        try:
            response = await self._roundtrip(conn, head, content, pooled=pooled)
            if reusable(conn.h11):
                conn.h11.start_next_cycle()
                keep = True
            return response
        finally:
            if keep:
                self._put(origin, conn)
            else:
                conn.close()

    async def _roundtrip(self, conn: _Conn, head: h11.Request, content: bytes, *, pooled: bool) -> Response:
        h = conn.h11
        try:
            conn.writer.write(h.send(head) + h.send(h11.Data(data=content)) + h.send(h11.EndOfMessage()))
            await conn.writer.drain()
        except OSError as exc:
            if pooled:
                raise _Stale from exc
            raise HTTPError(f"write failed ({type(exc).__name__})") from exc
        except h11.LocalProtocolError as exc:
            raise HTTPError("bad request") from exc
        received = False
        status = 0
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise HTTPError("bad response") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await conn.reader.read(_READ)
                except OSError as exc:
                    if pooled and not received:
                        raise _Stale from exc
                    raise HTTPError(f"read failed ({type(exc).__name__})") from exc
                if not data and pooled and not received:
                    raise _Stale
                received = received or bool(data)
                h.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
                if int(headers.get("content-length", "0") or "0") > self._max_body:
                    raise ResponseTooLarge("response too large")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise ResponseTooLarge("response too large")
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise HTTPError("connection closed before the response ended")
            # h11.InformationalResponse (1xx): the final response follows
