"""A fake LiteLLM proxy admin API (`/key/info`, `/team/info`) behind an httpx MockTransport.

The sidecar talks to LiteLLM through an injected `httpx.AsyncClient`; tests hand it `FakeLiteLLM.client()`.
Keys are registered by their raw value and looked up, like LiteLLM, by sha256 hash. Everything is
mutable at runtime, so a test can block or delete a key mid-session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar.auth import hash_key


@dataclass
class FakeLiteLLM:
    """Keys and teams as LiteLLM's `/key/info` and `/team/info` describe them."""

    master_key: str
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    down: bool = False

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

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler."""
        self.requests.append(request)
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

    def client(self) -> httpx.AsyncClient:
        """An AsyncClient whose requests this fake answers."""
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), base_url="http://litellm.test")
