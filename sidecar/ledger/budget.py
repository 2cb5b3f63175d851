"""The budget rule once realtime spend lands in LiteLLM's `spend`: each applied amount is settled, once.

The sidecar's admission and in-flight budget total for a scope (sidecar/control.py) is

    LiteLLM spend (from /key/info)  +  billed counter  +  running costs of live sessions

where the billed counter (`<prefix>:billed:<scope>:<window>`) gains each session's final cost at its
end. Once the LiteLLM sink writes that spend into LiteLLM's rows, /key/info counts it too. So the sink
settles every amount it applies: after the commit it takes the newly applied cost off the billed
counter of each of the session's budget scopes (the windows named in the event's `budget_windows`),
which keeps the counter at "realtime spend not yet in LiteLLM". While a session is live its counter
may go below zero by what its checkpoints already put into LiteLLM; the session's running cost makes
up for it, and its final cost, added at its end, brings it back.

Exactly once: one Lua script keeps, per session, the cumulative cost already settled
(`<prefix>:ledger:settled:<session_id>`, expiring with the billed counters; `{<prefix>}:...` on a Redis
Cluster, like the counters, so that every key the script touches is in one hash slot: sidecar/redis_keys.py)
and takes off only what an event's cumulative cost adds to it. A duplicate, a redelivery, an older
checkpoint settle nothing; the sink calls it for applied and skipped outcomes alike, so an event whose commit
went through but whose settle did not (a crash, Redis down) is settled when it or a later event of the session
comes again.
`settle_many` settles a batch in one round trip: one call of the script for the whole batch, in the batch's
order, so it settles exactly what the same events settled one by one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from sidecar.control import BILLED_TTL_S, billed_key
from sidecar.redis_keys import budget_prefix, is_cluster
from sidecar.usage import UsageEvent

# One call settles a batch, in its order. ARGV[1] the TTL in seconds, then per event its cumulative cost (exact
# decimal text) and how many billed counters it names; KEYS per event: its session's settled figure, then those
# counters. Returns what each event newly settled ('0' for nothing). Lua numbers are doubles (as INCRBYFLOAT's
# counters are): the difference is rounded to the 10 places costs have, which removes the double's noise, and
# that very figure is taken off and returned. A later event of the same session in the batch reads the figure an
# earlier one set, so the batch settles exactly what its events settled one by one would.
_SETTLE: Final = """
local out = {}
local k = 1
for i = 2, #ARGV, 2 do
  local n = tonumber(ARGV[i + 1])
  local settled = tonumber(redis.call('GET', KEYS[k]) or '0')
  local fresh = string.format('%.10f', tonumber(ARGV[i]) - settled)
  if tonumber(fresh) <= 0 then
    out[#out + 1] = '0'
  else
    for j = k + 1, k + n do
      redis.call('INCRBYFLOAT', KEYS[j], '-' .. fresh)
      redis.call('EXPIRE', KEYS[j], ARGV[1])
    end
    redis.call('SET', KEYS[k], ARGV[i], 'EX', ARGV[1])
    out[#out + 1] = fresh
  end
  k = k + 1 + n
end
return out
"""


def windows(budget_windows: str) -> dict[str, str]:
    """The scope -> window map of an event's `budget_windows` ({} when empty or not a JSON object of strings)."""
    if not budget_windows:
        return {}
    try:
        parsed = orjson.loads(budget_windows)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {k: v for k, v in parsed.items() if isinstance(k, str) and isinstance(v, str) and k and v}


def settled_key(prefix: str, session_id: str) -> str:
    """The Redis key holding a session's cumulative settled cost (`prefix`: the budget family's,
    sidecar/redis_keys.py `budget_prefix`)."""
    return f"{prefix}:ledger:settled:{session_id}"


class BudgetSettler:
    """Settles applied realtime spend against the sidecar's billed counters (module docstring)."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, ttl_s: int = BILLED_TTL_S) -> None:
        self._redis = redis
        # Every key the script touches is of the budget family: one hash slot on a Redis Cluster.
        self._prefix = budget_prefix(prefix, cluster=is_cluster(redis))
        self._ttl_s = ttl_s
        self._script = redis.register_script(_SETTLE)

    async def settle(self, event: UsageEvent) -> Decimal:
        """Take what `event`'s cumulative cost adds to the session's settled figure off its scopes' counters.

        Returns the amount newly settled (0 when nothing was: no budget scope, or not more than settled).
        Redis errors (sidecar.redis_conn.REDIS_ERRORS) propagate; nothing is half-done by one.
        """
        (settled,) = await self.settle_many([event])
        return settled

    async def settle_many(self, events: Sequence[UsageEvent]) -> list[Decimal]:
        """`settle` for each event, in order, in one script call (one round trip; none for events without a budget
        scope); returns what each newly settled.

        Redis errors (sidecar.redis_conn.REDIS_ERRORS) propagate; the batch's settle is whole or not done,
        and one that was done is not done again when the batch is retried (the figure is cumulative). A Redis
        without the script (restarted, flushed, failed over) gets it loaded and the call made again.
        """
        calls = {i: keys for i, e in enumerate(events) if (keys := self._keys(e))}
        settled = [Decimal(0)] * len(events)
        if not calls:
            return settled
        keys = [key for per_event in calls.values() for key in per_event]
        args: list[str | int] = [self._ttl_s]
        for i, per_event in calls.items():
            args += [format(events[i].cost_usd, "f"), len(per_event) - 1]
        replies = await self._script(keys=keys, args=args)
        for i, raw in zip(calls, replies, strict=True):
            settled[i] = _decimal(raw)
        return settled

    def _keys(self, event: UsageEvent) -> list[str]:
        """The script's keys for `event`: its settled figure, then its scopes' billed counters (none: no settle)."""
        scopes = windows(event.budget_windows)
        if not scopes or event.cost_usd <= 0:
            return []
        keys = [settled_key(self._prefix, event.session_id)]
        return keys + [billed_key(self._prefix, scope, window) for scope, window in scopes.items()]


def _decimal(raw: Any) -> Decimal:
    return Decimal(raw.decode() if isinstance(raw, bytes) else str(raw))


__all__ = ["BudgetSettler", "settled_key", "windows"]
