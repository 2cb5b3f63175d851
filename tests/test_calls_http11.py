"""sidecar/calls/http11.py: the calls' provider HTTP client against real local HTTP and HTTPS servers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.calls.http11 import (
    MAX_BODY,
    HTTP11Pool,
    HTTPError,
    HTTPTimeout,
    Origin,
    ResponseTooLarge,
    host_header,
    request_head,
    split_url,
)


def test_url_origin_target_and_host_header() -> None:
    """The origin is (scheme, host, port) with the scheme's default port; Host names the port only if not it."""
    origin, target = split_url("https://Res.example.com/openai/v1/realtime/calls?x=1")
    assert (origin, target) == (Origin("https", "res.example.com", 443), "/openai/v1/realtime/calls?x=1")
    assert host_header(origin) == "res.example.com"
    origin, target = split_url("http://gw.internal:8080")
    assert (origin, target) == (Origin("http", "gw.internal", 8080), "/")
    assert host_header(origin) == "gw.internal:8080"
    assert host_header(split_url("http://[::1]:9/x")[0]) == "[::1]:9"
    for bad in ("ftp://host/x", "wss://host/x", "http:///nohost", "http://host:99999/x"):
        with pytest.raises(HTTPError):
            split_url(bad)
    head = request_head(origin, "/v1", [("Authorization", "Bearer k")], 5)
    assert (head.method, head.target) == (b"POST", b"/v1")
    assert list(head.headers) == [
        (b"host", b"gw.internal:8080"),
        (b"content-length", b"5"),
        (b"authorization", b"Bearer k"),
    ]


@dataclass
class Seen:
    connection: int
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Closing:
    """Send these bytes, then close the connection."""

    data: bytes


#: What the server does with a request: (connection number, request number on it) -> the bytes it sends
#: (None: close the connection without answering).
Script = Callable[[int, int], Awaitable[bytes | Closing | None]]


def answer(status: int = 200, body: bytes = b"ok", *, close: bool = False, chunked: bool = False) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    headers = [("Connection", "close")] if close else []
    headers += [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
    return (
        conn.send(h11.Response(status_code=status, headers=headers))
        + conn.send(h11.Data(data=body))
        + (conn.send(h11.EndOfMessage()) or b"")
    )


@dataclass
class Server:
    url: str
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def serve(script: Script, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server_state = Server("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_state.connections += 1
        number = server_state.connections
        conn = h11.Connection(h11.SERVER)
        requests = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target.decode()
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    requests += 1
                    server_state.seen.append(Seen(number, target, headers, body))
                    out = await script(number, requests)
                    if out is None:
                        return
                    if isinstance(out, Closing):
                        writer.write(out.data)
                        await writer.drain()
                        return
                    writer.write(out)
                    await writer.drain()
                    conn = h11.Connection(h11.SERVER)  # the script wrote the bytes itself
                else:
                    return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    server_state.url = f"{'https' if tls else 'http'}://{'localhost' if tls else host}:{port}"
    async with server:
        yield server_state
        server.close()


async def always(connection: int, request: int) -> bytes | Closing | None:
    return answer(201, b"v=0\r\n")


async def test_a_connection_is_reused_while_h11_allows() -> None:
    """Two POSTs, one connection; the request carries Host, Content-Length, the caller's headers and body."""
    async with serve(always) as server, HTTP11Pool() as pool:
        first = await pool.post(
            f"{server.url}/v1/realtime/calls", headers=[("api-key", "k")], content=b"sdp", timeout_s=5
        )
        second = await pool.post(f"{server.url}/v1/realtime/calls/rtc_1/hangup", timeout_s=5)
        assert (first.status, first.content, second.status) == (201, b"v=0\r\n", 201)
        assert first.headers["content-length"] == "5"
        assert [(s.connection, s.target) for s in server.seen] == [
            (1, "/v1/realtime/calls"),
            (1, "/v1/realtime/calls/rtc_1/hangup"),
        ]
        assert server.seen[0].headers["api-key"] == "k" and server.seen[0].body == b"sdp"
        assert server.seen[0].headers["host"] == server.url.removeprefix("http://")
        assert server.seen[1].headers["content-length"] == "0"
        assert pool.idle_count() == 1


async def test_a_pooled_connection_the_server_closed_is_retried_once_on_a_fresh_one() -> None:
    """The keep-alive race: the server drops the idle connection as the second request arrives, before any byte
    of a response: sent again on a new connection, answered there."""

    async def drop_second(connection: int, request: int) -> bytes | Closing | None:
        return None if (connection, request) == (1, 2) else answer(200, f"c{connection}".encode())

    async with serve(drop_second) as server, HTTP11Pool() as pool:
        assert (await pool.post(server.url, timeout_s=5)).content == b"c1"
        again = await pool.post(server.url, content=b"offer", timeout_s=5)
        assert again.content == b"c2"
        assert [(s.connection, s.body) for s in server.seen] == [(1, b""), (1, b"offer"), (2, b"offer")]


async def test_no_retry_on_a_fresh_connection_or_after_a_response_byte() -> None:
    """A fresh connection closed before the answer, or a pooled one that sent part of an answer: HTTPError, the
    request sent once only (the provider may have processed it)."""

    async def never(connection: int, request: int) -> bytes | Closing | None:
        return None

    async with serve(never) as server, HTTP11Pool() as pool:
        with pytest.raises(HTTPError) as failed:
            await pool.post(server.url, timeout_s=5)
        assert len(server.seen) == 1 and not isinstance(failed.value, HTTPTimeout)

    async def partial(connection: int, request: int) -> bytes | Closing | None:
        return answer() if request == 1 else Closing(b"HTTP/1.1 200 OK\r\n")

    async with serve(partial) as server, HTTP11Pool() as pool:
        await pool.post(server.url, timeout_s=5)
        with pytest.raises(HTTPError) as failed:
            await pool.post(server.url, timeout_s=5)
        assert not isinstance(failed.value, HTTPTimeout)
        assert [s.connection for s in server.seen] == [1, 1]
        assert pool.idle_count() == 0


async def test_connection_close_is_not_pooled() -> None:
    """A response with `Connection: close`: the connection is dropped, the next request opens another."""

    async def closing(connection: int, request: int) -> bytes | Closing | None:
        return answer(close=True)

    async with serve(closing) as server, HTTP11Pool() as pool:
        await pool.post(server.url, timeout_s=5)
        assert pool.idle_count() == 0
        await pool.post(server.url, timeout_s=5)
        assert [s.connection for s in server.seen] == [1, 2]


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_too_large_body_is_refused(chunked: bool) -> None:
    """Above the limit (announced by Content-Length or not): ResponseTooLarge, the connection dropped."""

    async def huge(connection: int, request: int) -> bytes | Closing | None:
        return answer(body=b"x" * (MAX_BODY + 1), chunked=chunked)

    async with serve(huge) as server, HTTP11Pool() as pool:
        with pytest.raises(ResponseTooLarge):
            await pool.post(server.url, timeout_s=5)
        assert pool.idle_count() == 0


async def test_one_timeout_per_request() -> None:
    """A server that never answers: HTTPTimeout within the request's timeout, the connection dropped."""
    stop = asyncio.Event()

    async def silent(connection: int, request: int) -> bytes | Closing | None:
        await stop.wait()
        return None

    async with serve(silent) as server, HTTP11Pool() as pool:
        with pytest.raises(HTTPTimeout):
            await pool.post(server.url, timeout_s=0.2)
        assert pool.idle_count() == 0 and len(server.seen) == 1
        stop.set()


def certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA cert, leaf cert, leaf key) files: a self-signed CA and a leaf for localhost/127.0.0.1 it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def test_tls_is_verified_with_sni(tmp_path: Path) -> None:
    """HTTPS: the server's certificate is verified (a client not trusting its CA refuses it: HTTPError) and the
    TLS handshake names the host (SNI); a trusting client posts and reuses the connection."""
    ca, leaf, key = certificates(tmp_path)
    names: list[str | None] = []
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(leaf, key)

    def sni(sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        names.append(name)

    server_tls.sni_callback = sni  # type: ignore[assignment]
    trusting = ssl.create_default_context(cafile=str(ca))
    async with serve(always, tls=server_tls) as server:
        async with HTTP11Pool() as untrusting:
            with pytest.raises(HTTPError) as refused:
                await untrusting.post(server.url, timeout_s=5)
            assert "SSL" in str(refused.value)
            assert server.seen == []
        async with HTTP11Pool(ssl_context=trusting) as pool:
            first = await pool.post(f"{server.url}/v1/realtime/calls", content=b"sdp", timeout_s=5)
            await pool.post(f"{server.url}/v1/realtime/calls", timeout_s=5)
        assert first.status == 201 and first.content == b"v=0\r\n"
        assert len(server.seen) == 2 and len({s.connection for s in server.seen}) == 1
        assert names and set(names) == {"localhost"}


async def test_requests_in_flight_are_bounded() -> None:
    """With max_connections=1, a second request waits for the first (here in vain, within its own timeout)."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(connection: int, request: int) -> bytes | Closing | None:
        arrived.set()
        await release.wait()
        return answer()

    async with serve(held) as server, HTTP11Pool(max_connections=1) as pool:
        first = asyncio.create_task(pool.post(server.url, timeout_s=5))
        await arrived.wait()  # the first request holds the one slot
        with pytest.raises(HTTPTimeout):
            await pool.post(server.url, timeout_s=0.3)
        assert len(server.seen) == 1
        release.set()
        assert (await first).status == 200
        assert (await pool.post(server.url, timeout_s=5)).status == 200
        assert [s.connection for s in server.seen] == [1, 1]
