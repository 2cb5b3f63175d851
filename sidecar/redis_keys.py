"""The Redis names whose hash slot matters, and the one rule that keeps every multi-key operation in one slot.

docs/operations.md ("Redis keys") lists every key, stream and channel. Most are touched one at a time (a
command, a single-key Lua script, or a pipeline without MULTI whose commands are each single-key), so on a
Redis Cluster each lives wherever its own name hashes: leases, registry and costs spread over the masters.
Two families are touched together and need one slot:

- the budget family: the settle script (sidecar/ledger/budget.py) changes a session's settled figure and the
  billed counters of its key *and* its team in one step, and a team's counter is shared by every key of the
  team; only one tag for the whole family keeps every combination in one slot. On a cluster its names start
  `{<prefix>}:` (the slot of `<prefix>`), e.g. `{realtime}:billed:key:<hash>:<window>`;
- the usage stream and its dead letters: an entry is dead-lettered and acknowledged in one MULTI
  (sidecar/billing/consumer.py). The stream keeps its documented name `realtime:usage`; on a cluster the dead
  letters go to `{realtime:usage}:dead`, whose tag hashes exactly as the bare `realtime:usage` does. The
  consumer groups live inside the stream key.

On a single Redis (or a Sentinel-managed master) the names are unchanged, so an upgrade keeps every counter
and dead letter; only a Redis Cluster client (redis.asyncio.cluster.RedisCluster) gets the tagged names.
"""

from __future__ import annotations

from sidecar.redis_conn import is_cluster


def tagged(name: str) -> str:
    """`name` as a hash tag: `{name}` hashes to the slot of the bare `name` (both hash the text `name`)."""
    return f"{{{name}}}"


def budget_prefix(prefix: str, *, cluster: bool) -> str:
    """The prefix of the budget family (billed counters, settled figures): `{<prefix>}` on a cluster."""
    return tagged(prefix) if cluster else prefix


def dead_stream(stream: str, *, cluster: bool) -> str:
    """The dead-letter stream of `stream`: `<stream>:dead`, on a cluster `{<stream>}:dead` (the stream's slot;
    a stream name with its own hash tag keeps it: `<stream>:dead` is then in its slot already)."""
    return f"{tagged(stream) if cluster and not has_tag(stream) else stream}:dead"


def has_tag(name: str) -> bool:
    """Whether Redis hashes only part of `name`: a `{` followed later by a `}` with something between."""
    start = name.find("{")
    return start >= 0 and name.find("}", start + 1) > start + 1


__all__ = ["budget_prefix", "dead_stream", "has_tag", "is_cluster", "tagged"]
