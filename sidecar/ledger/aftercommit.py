"""What the LiteLLM sink does after a batch's transaction commits and before it acknowledges the entries.

Two nudges, both best effort: the budget settle on the sidecar's own Redis (sidecar/ledger/budget.py),
for applied and skipped outcomes, so the sidecar's budget total counts the spend once; and, for an
applied outcome whose key LiteLLM knows, LiteLLM's auth-cache invalidations on the proxy's Redis
(sidecar/ledger/invalidation.py), so its budget checks read the new spend at once instead of after
their cache TTL. A Redis error is logged as a warning (its type only: no URL, no secret) and never
raised: the ledger is already committed, and acknowledging must not wait on either nudge. A settle
that failed is repaired when a later event of the session is settled (the figure is cumulative); one
that failed on the session's last event leaves that spend counted twice in the sidecar's own budget
total (never less) until the counter's window ends.

A batch costs at most two round trips, one per Redis: one call of the settle script for the batch, in its order,
and the invalidations of every charged key, user, team, ... published once each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as aioredis

from sidecar.ledger import invalidation
from sidecar.ledger.budget import BudgetSettler
from sidecar.ledger.writer import Outcome
from sidecar.redis_conn import REDIS_ERRORS
from sidecar.usage import UsageEvent

log = logging.getLogger("sidecar.ledger")


class AfterCommit:
    """The post-commit step of the LiteLLM sink: `await after_commit.batch(events, outcomes)` (what the consumer
    calls), or `await after_commit(event, outcome)` for one; never raises for Redis.

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
        await self.batch([event], [outcome])

    async def batch(self, events: Sequence[UsageEvent], outcomes: Sequence[Outcome]) -> None:
        """Settle the budget of the applied and skipped events (one round trip), then publish the invalidations
        of the applied ones whose key LiteLLM knows, each cache key once (one round trip)."""
        pairs = list(zip(events, outcomes, strict=True))
        settled = [e for e, o in pairs if o.kind in ("applied", "skipped")]
        if settled:
            try:
                await self._settler.settle_many(settled)
            except REDIS_ERRORS as exc:
                self._failed("budget settle", settled, exc)
        charged = [(e, o) for e, o in pairs if o.kind == "applied" and o.key_exists]
        if charged and self._proxy is not None:
            try:
                await self._publish([o for _, o in charged])
            except REDIS_ERRORS as exc:
                self._failed("cache invalidation", [e for e, _ in charged], exc)

    async def _publish(self, outcomes: Sequence[Outcome]) -> None:
        keys = dict.fromkeys(
            key
            for o in outcomes
            for key in invalidation.cache_keys(
                key_hash=o.key_hash,
                user_id=o.user_id,
                team_id=o.team_id,
                organization_id=o.organization_id,
                project_id=o.project_id,
                tags=o.tags,
            )
        )
        assert self._proxy is not None
        pipe = self._proxy.pipeline(transaction=False)
        for key in keys:
            pipe.publish(self._channel, invalidation.message(key))
        await pipe.execute()

    @staticmethod
    def _failed(what: str, events: Sequence[UsageEvent], exc: BaseException) -> None:
        log.warning(
            "LiteLLM sink: %s failed after commit (%s) for %d events; the entries are acknowledged anyway",
            what,
            type(exc).__name__,
            len(events),
            extra={"session_id": events[0].session_id, "key_hash": events[0].key_hash},
        )


__all__ = ["AfterCommit"]
