"""What the LiteLLM sink does after an event's transaction commits and before it acknowledges the entry.

Two nudges, both best effort: the budget settle on the sidecar's own Redis (sidecar/ledger/budget.py),
for applied and skipped outcomes, so the sidecar's budget total counts the spend once; and, for an
applied outcome whose key LiteLLM knows, LiteLLM's auth-cache invalidations on the proxy's Redis
(sidecar/ledger/invalidation.py), so its budget checks read the new spend at once instead of after
their cache TTL. A Redis error is logged as a warning (its type only: no URL, no secret) and never
raised: the ledger is already committed, and acknowledging must not wait on either nudge. A settle
that failed is repaired when a later event of the session is settled (the figure is cumulative); one
that failed on the session's last event leaves that spend counted twice in the sidecar's own budget
total (never less) until the counter's window ends.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.ledger import invalidation
from sidecar.ledger.budget import BudgetSettler
from sidecar.ledger.writer import Outcome
from sidecar.usage import UsageEvent

log = logging.getLogger("sidecar.ledger")


class AfterCommit:
    """The post-commit step of the LiteLLM sink: `await after_commit(event, outcome)`; never raises for Redis.

    `redis` is the sidecar's own Redis (its budget counters, under `prefix`, the control prefix);
    `proxy_redis` the LiteLLM proxy's Redis, None when the proxy has none (then nothing is published);
    `namespace` the proxy's Redis cache namespace (None or '': the bare channel name).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        proxy_redis: aioredis.Redis | None,
        namespace: str | None,
    ) -> None:
        self._settler = BudgetSettler(redis, prefix=prefix)
        self._proxy = proxy_redis
        self._channel = invalidation.channel(namespace)

    async def __call__(self, event: UsageEvent, outcome: Outcome) -> None:
        """Settle the budget (applied, skipped), then publish the invalidations (applied, key known)."""
        if outcome.kind in ("applied", "skipped"):
            try:
                await self._settler.settle(event)
            except (RedisError, OSError) as exc:
                self._failed("budget settle", event, exc)
        if outcome.kind == "applied" and outcome.key_exists and self._proxy is not None:
            try:
                await self._publish(outcome)
            except (RedisError, OSError) as exc:
                self._failed("cache invalidation", event, exc)

    async def _publish(self, outcome: Outcome) -> None:
        keys = invalidation.cache_keys(
            key_hash=outcome.key_hash,
            user_id=outcome.user_id,
            team_id=outcome.team_id,
            organization_id=outcome.organization_id,
            project_id=outcome.project_id,
            tags=outcome.tags,
        )
        assert self._proxy is not None
        pipe = self._proxy.pipeline(transaction=False)
        for key in keys:
            pipe.publish(self._channel, invalidation.message(key))
        await pipe.execute()

    @staticmethod
    def _failed(what: str, event: UsageEvent, exc: BaseException) -> None:
        log.warning(
            "LiteLLM sink: %s failed after commit (%s); the entry is acknowledged anyway",
            what,
            type(exc).__name__,
            extra={"session_id": event.session_id, "key_hash": event.key_hash},
        )


__all__ = ["AfterCommit"]
