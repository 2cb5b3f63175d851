"""LiteLLM's auth-cache invalidations after a charge: the keys, the channel, the message; a real subscriber."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from sidecar.ledger import invalidation
from sidecar.ledger.invalidation import CHANNEL, cache_keys, channel, message


def test_the_channel_is_namespaced_as_litellm_names_it() -> None:
    """With a namespace `<ns>:litellm_proxy.auth_cache_invalidation`; without one (None or ''), the bare name."""
    assert channel("prod") == "prod:litellm_proxy.auth_cache_invalidation"
    assert channel(None) == channel("") == CHANNEL == "litellm_proxy.auth_cache_invalidation"


def test_every_charged_object_has_its_cache_keys() -> None:
    """Key (bare hash), team, user, organization (plain and with budget), the member under both of its keys."""
    assert cache_keys(key_hash="ab12", user_id="u1", team_id="t1", organization_id="o1") == [
        "ab12",
        "team_id:t1",
        "u1",
        "org_id:o1",
        "org_id:o1:with_budget",
        "t1_u1",
        "team_membership:u1:t1",
    ]


def test_the_project_and_each_tag_have_their_cache_keys() -> None:
    """The key's project as `project_id:<id>`, then the session's tags as `tag:<name>` (their budgets are cached
    objects too); empty ones name nothing."""
    assert cache_keys(key_hash="ab12", project_id="p1", tags=("prod", "", "voice")) == [
        "ab12",
        "project_id:p1",
        "tag:prod",
        "tag:voice",
    ]


def test_missing_ids_name_nothing() -> None:
    """A key alone gives its hash only; a user without a team has no membership keys."""
    assert cache_keys(key_hash="ab12") == ["ab12"]
    assert cache_keys(key_hash="ab12", user_id="u1") == ["ab12", "u1"]
    assert cache_keys(key_hash="ab12", team_id="t1") == ["ab12", "team_id:t1"]


def test_the_message_is_litellms_json() -> None:
    """`{"cache_key": ...}`, nothing else: LiteLLM's subscriber reads a delete from it."""
    assert json.loads(message("team_id:t1")) == {"cache_key": "team_id:t1"}
    assert message("x") == '{"cache_key": "x"}'


async def test_a_subscriber_on_the_namespaced_channel_receives_every_key(redis_url: str, unique: str) -> None:
    """Published on `<ns>:litellm_proxy.auth_cache_invalidation`, a real subscriber gets each message in order."""
    namespace = f"test-{unique}"
    keys = cache_keys(key_hash="ab12", user_id="u1", team_id="t1", organization_id="o1")
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(invalidation.channel(namespace))
        for key in keys:
            assert await client.publish(invalidation.channel(namespace), message(key)) == 1
        got: list[str] = []
        async with asyncio.timeout(5):  # a bound on a failure, not a wait: the messages are already sent
            async for item in pubsub.listen():
                got.append(json.loads(item["data"])["cache_key"])
                if len(got) == len(keys):
                    break
        assert got == keys
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
