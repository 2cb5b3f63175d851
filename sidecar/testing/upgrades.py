"""Malformed WebSocket upgrade requests, as raw bytes: every kind the client transport must answer with 400
and a close (docs/api.md, "Refused before the upgrade"). Used by tests/test_transport_hardening.py and
scripts/measure_transport.py."""

from __future__ import annotations

from typing import Final

KEY: Final = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def upgrade(*, path: bytes, extra: bytes = b"", key: bytes = KEY, version: bytes = b"13") -> bytes:
    """A WebSocket upgrade request for `path`, altered as asked."""
    head = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    return head + key + b"Sec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n"


def malformed(path: bytes) -> dict[str, bytes]:
    """Every kind of malformed upgrade of `path`, by name; the first three made uvicorn's protocol raise."""
    return {
        "non-ASCII Sec-WebSocket-Protocol": upgrade(path=path, extra=b"Sec-WebSocket-Protocol: r\xe9altime\r\n"),
        "non-ASCII Sec-WebSocket-Version": upgrade(path=path, version=b"1\xe9"),
        "non-ASCII Connection": upgrade(path=path).replace(b"Connection: Upgrade", b"Connection: Upgrade, \xe9"),
        "non-ASCII Sec-WebSocket-Key": upgrade(path=path, key=b"Sec-WebSocket-Key: \xff\xfe==\r\n"),
        "non-ASCII Authorization": upgrade(path=path, extra=b"Authorization: Bearer sk-\xe9\r\n"),
        "non-ASCII other header": upgrade(path=path, extra=b"X-Thing: \xe9\r\n"),
        "non-ASCII query": upgrade(path=b"/v1/realtime?model=\xe9"),
        "bad Sec-WebSocket-Key": upgrade(path=path, key=b"Sec-WebSocket-Key: nope\r\n"),
        "no Sec-WebSocket-Key": upgrade(path=path, key=b""),
        "two Sec-WebSocket-Keys": upgrade(path=path, extra=KEY),
        "bad Sec-WebSocket-Version": upgrade(path=path, version=b"14"),
        "bad Sec-WebSocket-Protocol": upgrade(path=path, extra=b"Sec-WebSocket-Protocol: a b\r\n"),
        "header line over 8 KiB": upgrade(path=path, extra=b"X-Long: " + b"a" * 9000 + b"\r\n"),
        "over 128 headers": upgrade(path=path, extra=b"".join(b"X-H%d: v\r\n" % i for i in range(130))),
    }
