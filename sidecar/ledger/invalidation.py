"""LiteLLM's auth-cache invalidations after the sink charged a key: which cache keys, which channel, what message.

Pure (no I/O). LiteLLM's proxy serves the key, team, user, organization and team-membership objects from its
auth cache (`user_api_key_cache`, per worker, TTL `user_api_key_cache_ttl`, 60 s by default); their `spend`
is what its budget checks fall back to when the spend counter is cold or shows less. A worker drops one
cached object when a message `{"cache_key": "<key>"}` arrives on the Redis channel
`litellm_proxy.auth_cache_invalidation` (`<namespace>:litellm_proxy.auth_cache_invalidation` when the
proxy's Redis cache has a namespace), and reads the row again on its next request.

The cache keys, as LiteLLM writes them (litellm/proxy/auth/auth_checks.py and
common_utils/user_api_key_cache.py): the key object under its bare sha256 hex (the sidecar's `key_hash`),
the team under `team_id:<id>`, the user under its bare id, the organization under `org_id:<id>` and
`org_id:<id>:with_budget` (with its budget row), and the team member's row under both `<team>_<user>` (the
admission check) and `team_membership:<user>:<team>` (the budget reservation), the key's project under
`project_id:<id>`, and each tag (its budget) under `tag:<name>`. The organization
membership is read from the database, not cached, so it needs none; `org_id:<id>:with_budget:last_known`
is LiteLLM's fallback for when its database is down and is deliberately left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

CHANNEL: Final = "litellm_proxy.auth_cache_invalidation"


def channel(namespace: str | None) -> str:
    """The channel LiteLLM's workers listen on: `<namespace>:<CHANNEL>`, or the bare name without one.

    An empty namespace counts as none (LiteLLM's own default is no namespace).
    """
    return f"{namespace}:{CHANNEL}" if namespace else CHANNEL


def cache_keys(
    *,
    key_hash: str,
    user_id: str = "",
    team_id: str = "",
    organization_id: str = "",
    project_id: str = "",
    tags: Iterable[str] = (),
) -> list[str]:
    """The auth-cache keys holding the spend of the charged key, user, team, organization, team member, project
    and tags.

    Empty ids name nothing; the order is key, team, user, organization, team membership, project, tags, without
    repeats.
    """
    keys = [key_hash] if key_hash else []
    if team_id:
        keys.append(f"team_id:{team_id}")
    if user_id:
        keys.append(user_id)
    if organization_id:
        keys += [f"org_id:{organization_id}", f"org_id:{organization_id}:with_budget"]
    if team_id and user_id:
        keys += [f"{team_id}_{user_id}", f"team_membership:{user_id}:{team_id}"]
    if project_id:
        keys.append(f"project_id:{project_id}")
    keys += [f"tag:{tag}" for tag in tags if tag]
    return list(dict.fromkeys(keys))


def message(cache_key: str) -> str:
    """The message that drops `cache_key` from every worker's auth cache, as LiteLLM publishes it."""
    return json.dumps({"cache_key": cache_key})


__all__ = ["CHANNEL", "cache_keys", "channel", "message"]
