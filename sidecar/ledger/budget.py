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
(`<prefix>:ledger:settled:<session_id>`, expiring with the billed counters) and takes off only what an
event's cumulative cost adds to it. A duplicate, a redelivery, an older checkpoint settle nothing; the
sink calls it for applied and skipped outcomes alike, so an event whose commit went through but whose
settle did not (a crash, Redis down) is settled when it or a later event of the session comes again.
`settle_many` settles a batch in one round trip: the script's calls pipelined (EVALSHA), in the batch's order,
so it settles exactly what the same events settled one by one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from sidecar.control import BILLED_TTL_S, billed_key
from sidecar.usage import UsageEvent

# KEYS[1] the session's settled figure, KEYS[2..] the billed counters; ARGV[1] the event's cumulative cost
# (exact decimal text), ARGV[2] the TTL in seconds. Returns what was newly settled ('0' for nothing).
# Lua numbers are doubles (as INCRBYFLOAT's counters are): the difference is rounded to the 10 places
# costs have, which removes the double's noise, and that very figure is taken off and returned.
_SETTLE: Final = """
local settled = tonumber(redis.call('GET', KEYS[1]) or '0')
local fresh = string.format('%.10f', tonumber(ARGV[1]) - settled)
if tonumber(fresh) <= 0 then return '0' end
for i = 2, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], '-' .. fresh)
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return fresh
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
    """The Redis key holding a session's cumulative settled cost."""
    return f"{prefix}:ledger:settled:{session_id}"


class BudgetSettler:
    """Settles applied realtime spend against the sidecar's billed counters (module docstring)."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, ttl_s: int = BILLED_TTL_S) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._script = redis.register_script(_SETTLE)

    async def settle(self, event: UsageEvent) -> Decimal:
        """Take what `event`'s cumulative cost adds to the session's settled figure off its scopes' counters.

        Returns the amount newly settled (0 when nothing was: no budget scope, or not more than settled).
        Redis errors (redis.exceptions.RedisError, OSError) propagate; nothing is half-done by one.
        """
        (settled,) = await self.settle_many([event])
        return settled

    async def settle_many(self, events: Sequence[UsageEvent]) -> list[Decimal]:
        """`settle` for each event, in order, in one round trip (none for events without a budget scope); returns
        what each newly settled.

        Redis errors (redis.exceptions.RedisError, OSError) propagate; each event's settle is whole or not done,
        and one that was done is not done again when the batch is retried (the figure is cumulative).
        """
        calls = {i: keys for i, e in enumerate(events) if (keys := self._keys(e))}
        settled = [Decimal(0)] * len(events)
        if not calls:
            return settled
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for i, keys in calls.items():
                pipe.evalsha(self._script.sha, len(keys), *keys, format(events[i].cost_usd, "f"), self._ttl_s)
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                await self._redis.script_load(_SETTLE)  # a restarted or flushed Redis: load, then all again
                continue
            if failed := next((r for r in replies if isinstance(r, Exception)), None):
                raise failed
            for i, raw in zip(calls, replies, strict=True):
                settled[i] = _decimal(raw)
            break
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
