"""Auth: key extraction, LiteLLM semantics, and the key checker against a fake LiteLLM admin API."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from sidecar.auth import KeyChecker, Principal, authorize, credentials, hash_key
from sidecar.errors import BudgetExceeded, InvalidApiKey, KeyBlocked, KeyCheckError, ModelNotAllowed
from sidecar.testing.fake_litellm import FakeLiteLLM

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_credentials_in_contract_order() -> None:
    """Bearer wins over api-key, which wins over the browser subprotocol form."""
    protos = ["realtime", "openai-insecure-api-key.sk-browser"]
    assert credentials({"authorization": "Bearer sk-a", "api-key": "sk-b"}, []) is not None
    assert credentials({"authorization": "Bearer sk-a", "api-key": "sk-b"}, []).key == "sk-a"  # type: ignore[union-attr]
    assert credentials({"api-key": "sk-b"}, protos).key == "sk-b"  # type: ignore[union-attr]
    browser = credentials({}, protos)
    assert browser is not None and browser.key == "sk-browser" and browser.subprotocol == "realtime"
    assert credentials({}, []) is None
    assert credentials({"authorization": "Basic abc"}, []) is None


def test_hash_is_sha256_hex() -> None:
    """key_hash is the sha256 hex digest, LiteLLM's token hash."""
    import hashlib

    assert hash_key("sk-1234") == hashlib.sha256(b"sk-1234").hexdigest()
    assert len(hash_key("sk-1234")) == 64


@pytest.mark.parametrize(
    ("principal", "error"),
    [
        (Principal(key_hash="h", status="expired"), InvalidApiKey),
        (Principal(key_hash="h", expires=datetime(2025, 1, 1, tzinfo=UTC)), InvalidApiKey),
        (Principal(key_hash="h", status="deleted"), InvalidApiKey),
        (Principal(key_hash="h", blocked=True), KeyBlocked),
        (Principal(key_hash="h", team_blocked=True), KeyBlocked),
        (Principal(key_hash="h", models=("other",)), ModelNotAllowed),
        (Principal(key_hash="h", max_budget=Decimal(1), spend=Decimal(1)), BudgetExceeded),
        (Principal(key_hash="h", team_max_budget=Decimal(5), team_spend=Decimal(6)), BudgetExceeded),
    ],
)
def test_authorize_refusals(principal: Principal, error: type[Exception]) -> None:
    """Each LiteLLM refusal rule raises its own error."""
    with pytest.raises(error):
        authorize(principal, "m", now=NOW)


def test_authorize_allows() -> None:
    """Empty model lists, all-proxy-models, listed models, team models and the master key pass."""
    for p in (
        Principal(key_hash="h"),
        Principal(key_hash="h", models=("all-proxy-models",)),
        Principal(key_hash="h", models=("m",)),
        Principal(key_hash="h", models=("all-team-models",), team_models=("m",)),
        Principal(key_hash="h", max_budget=Decimal(2), spend=Decimal(1)),
        Principal(key_hash="h", blocked=True, is_master=True),
    ):
        authorize(p, "m", now=NOW)


async def test_checker_asks_litellm_by_hash_with_master_key_and_caches() -> None:
    """A key is looked up by hash with the master key, then served from the cache."""
    fake = FakeLiteLLM(master_key="sk-master")
    fake.add_key("sk-user", key_alias="a", user_id="u", team_id="t", max_budget=10.0, spend=2.5)
    fake.teams["t"] = {"models": ["m"], "max_budget": 100, "spend": 1}
    ticks = [0.0]
    async with fake.client() as client:
        checker = KeyChecker(master_key="sk-master", client=client, cache_s=5, clock=lambda: ticks[0])
        p = await checker.principal("sk-user")
        assert (p.key_alias, p.user_id, p.team_id, p.max_budget, p.spend) == (
            "a",
            "u",
            "t",
            Decimal("10.0"),
            Decimal("2.5"),
        )
        assert p.team_models == ("m",) and p.team_max_budget == Decimal(100)
        first = fake.requests[0]
        assert first.url.params["key"] == hash_key("sk-user")
        assert "sk-user" not in str(first.url)
        assert first.headers["authorization"] == "Bearer sk-master"
        seen = len(fake.requests)
        await checker.principal("sk-user")
        assert len(fake.requests) == seen
        ticks[0] = 6.0
        await checker.principal("sk-user")
        assert len(fake.requests) > seen


async def test_checker_unknown_key_and_outage() -> None:
    """An unknown key is InvalidApiKey; LiteLLM down is KeyCheckError; the master key needs no LiteLLM."""
    fake = FakeLiteLLM(master_key="sk-master")
    async with fake.client() as client:
        checker = KeyChecker(master_key="sk-master", client=client)
        with pytest.raises(InvalidApiKey):
            await checker.principal("sk-nope")
        fake.down = True
        with pytest.raises(KeyCheckError):
            await checker.principal("sk-other")
        assert (await checker.principal("sk-master")).is_master


async def test_without_litellm_only_the_master_key_works() -> None:
    """With no LiteLLM URL, any key but the master key is refused."""
    checker = KeyChecker(master_key="sk-master", client=None)
    assert (await checker.principal("sk-master")).is_master
    with pytest.raises(InvalidApiKey):
        await checker.principal("sk-user")
