"""A fake LiteLLM proxy admin API (`/key/info`, `/team/info`, `/model/info`) behind an httpx MockTransport or a
real socket.

The sidecar talks to LiteLLM through an injected `httpx.AsyncClient`; tests hand it `FakeLiteLLM.client()`.
Keys are registered by their raw value and looked up, like LiteLLM, by sha256 hash. Everything is
mutable at runtime, so a test can block or delete a key mid-session, or hold every answer back (`gate`)
and wait until requests have arrived (`requested`). `LiteLLMServer` serves the same fake over HTTP/1.1 on
127.0.0.1 with keep-alive, and can close a kept-alive connection as the next request arrives on it, as
LiteLLM (uvicorn) does when its keep-alive timeout fires just then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from sidecar.auth import hash_key


@dataclass
class FakeLiteLLM:
    """Keys and teams as LiteLLM's `/key/info` and `/team/info` describe them."""

    master_key: str
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: `/model/info`'s deployments ({"model_name", "litellm_params", "model_info"}), answered to the master key.
    deployments: list[dict[str, Any]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    down: bool = False
    #: When an Event: every request is recorded at once but answered only once the Event is set.
    gate: asyncio.Event | None = None
    _arrival: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def add_key(self, key: str, **info: Any) -> str:
        """Register a key (raw); returns its hash. `info` fields follow LiteLLM's key row."""
        hashed = hash_key(key)
        self.keys[hashed] = {"key_alias": None, "spend": 0.0, "models": [], "blocked": None, **info}
        return hashed

    def update_key(self, key: str, **info: Any) -> None:
        """Change fields of a registered key (e.g. blocked=True)."""
        self.keys[hash_key(key)].update(info)

    def delete_key(self, key: str) -> None:
        """Forget a key: LiteLLM then answers 404."""
        self.keys.pop(hash_key(key), None)

    def count(self, path: str = "/key/info") -> int:
        """How many requests for `path` have arrived."""
        return sum(1 for r in self.requests if r.url.path == path)

    async def requested(self, count: int, path: str = "/key/info") -> None:
        """Wait until `count` requests for `path` have arrived (instead of sleeping)."""
        while self.count(path) < count:
            self._arrival.clear()
            await self._arrival.wait()

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Record a request and answer it."""
        self.requests.append(request)
        self._arrival.set()
        return self.answer(request)

    async def handle_async(self, request: httpx.Request, *, gate: asyncio.Event | None = None) -> httpx.Response:
        """The MockTransport handler: record a request, wait for the gate (`gate`, else `self.gate`), answer it."""
        self.requests.append(request)
        self._arrival.set()
        gate = gate or self.gate
        if gate is not None:
            await gate.wait()
        return self.answer(request)

    def answer(self, request: httpx.Request) -> httpx.Response:
        """LiteLLM's answer to a request (raises httpx.ConnectError while `down`)."""
        if self.down:
            raise httpx.ConnectError("fake LiteLLM is down", request=request)
        auth = request.headers.get("authorization", "")
        if request.url.path == "/key/info":
            return self._key_info(request, auth)
        if request.url.path == "/team/info":
            if auth != f"Bearer {self.master_key}":
                return httpx.Response(401, json={"error": {"message": "Unauthorized"}})
            team = self.teams.get(request.url.params.get("team_id", ""))
            if team is None:
                return httpx.Response(404, json={"detail": "team not found"})
            return httpx.Response(200, json={"team_id": request.url.params["team_id"], "team_info": team})
        if request.url.path == "/model/info":
            if auth != f"Bearer {self.master_key}":
                return httpx.Response(401, json={"error": {"message": "Unauthorized"}})
            return httpx.Response(200, json={"data": self.deployments})
        return httpx.Response(404, json={"detail": "not found"})

    def _key_info(self, request: httpx.Request, auth: str) -> httpx.Response:
        token = auth.removeprefix("Bearer ")
        wanted = request.url.params.get("key") or token
        # LiteLLM accepts the plaintext key or its sha256 hash.
        wanted_hash = wanted if wanted in self.keys else hash_key(wanted)
        is_master = token == self.master_key
        if not is_master and (hash_key(token) not in self.keys or hash_key(token) != wanted_hash):
            return httpx.Response(401, json={"error": {"message": "Authentication Error"}})
        info = self.keys.get(wanted_hash)
        if info is None:
            return httpx.Response(404, json={"detail": "Key not found in database"})
        return httpx.Response(200, json={"key": wanted, "info": info})

    def client(self, *, gate: asyncio.Event | None = None) -> httpx.AsyncClient:
        """An AsyncClient whose requests this fake answers (each held until `gate` is set, when given)."""
        transport = httpx.MockTransport(functools.partial(self.handle_async, gate=gate))
        return httpx.AsyncClient(transport=transport, base_url="http://litellm.test")


class LiteLLMServer:
    """`fake` served over HTTP/1.1 with keep-alive on 127.0.0.1 (a free port), until the block exits.

    With `answers_per_connection=n`, a connection that has answered n requests reads the next one and closes
    without answering it (counted in `dropped`): what a client sees when it reuses a pooled connection just
    as LiteLLM closes it.
    """

    def __init__(self, fake: FakeLiteLLM, *, answers_per_connection: int | None = None) -> None:
        self.fake = fake
        self.answers_per_connection = answers_per_connection
        self.dropped = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> LiteLLMServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        handlers = list(self._open.values())
        for writer in list(self._open):
            writer.close()  # the handler reads EOF and returns
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task
        answered = 0
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.answers_per_connection is not None and answered >= self.answers_per_connection:
                    self.dropped += 1
                    break
                response = await self._answer(head)
                if response is None:
                    break
                body = response.content
                status = f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n"
                fields = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                writer.write(status.encode() + fields.encode() + body)
                await writer.drain()
                answered += 1
        writer.close()
        self._open.pop(writer, None)

    async def _answer(self, head: bytes) -> httpx.Response | None:
        line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = [(name, value) for name, _, value in (h.partition(": ") for h in lines if h)]
        request = httpx.Request(method, f"{self.url}{target}", headers=headers)
        try:
            return await self.fake.handle_async(request)
        except httpx.ConnectError:  # `down`: the connection just closes
            return None
