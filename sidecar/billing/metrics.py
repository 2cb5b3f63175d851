"""Prometheus metrics of `sidecar consume` (served when SIDECAR_CONSUME_METRICS_PORT is set).

One registry per process, served by prometheus_client's own HTTP server: the consumer has no app. The
LiteLLM sink reports each applied event and each schema probe (`LedgerObserver`); every consumer reports
its group's lag and pending count at its progress line (`ProgressObserver`), so those gauges are as fresh
as the last report (a minute by default).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sidecar.ledger.writer import Outcome

# From a millisecond (a warm local apply) to the 15 s database timeout.
APPLY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class ConsumeMetrics:
    """The consumer's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ledger_events = Counter(
            "sidecar_ledger_events_total",
            "Usage events the LiteLLM sink handled, by outcome (applied, skipped, dead_letter)",
            ["outcome"],
            registry=r,
        )
        self.ledger_spend = Counter(
            "sidecar_ledger_spend_usd_total", "Spend (USD) the LiteLLM sink added to LiteLLM's ledger", registry=r
        )
        self.ledger_apply_seconds = Histogram(
            "sidecar_ledger_apply_seconds",
            "Time to apply a usage event to LiteLLM's ledger: its share of its batch's transaction, retries included",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.ledger_schema_ready = Gauge(
            "sidecar_ledger_schema_ready",
            "1 when the last probe of LiteLLM's schema found every required table and column, else 0",
            registry=r,
        )
        self.consumer_pending = Gauge(
            "sidecar_consumer_pending",
            "Usage stream entries delivered to the group and not yet acknowledged (at the last progress report)",
            ["group"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sidecar_consumer_lag",
            "Usage stream entries not yet delivered to the group (at the last progress report; Redis 7)",
            ["group"],
            registry=r,
        )
        for outcome in ("applied", "skipped", "dead_letter"):
            self.ledger_events.labels(outcome)

    def applied(self, outcome: Outcome, seconds: float) -> None:
        """One event went through the LiteLLM sink (called from its worker thread)."""
        self.ledger_events.labels(outcome.kind).inc()
        self.ledger_apply_seconds.observe(seconds)
        if outcome.kind == "applied" and outcome.delta is not None:
            self.ledger_spend.inc(float(outcome.delta.cost_usd))

    def schema_ready(self, ready: bool) -> None:
        """The last schema probe's verdict."""
        self.ledger_schema_ready.set(1 if ready else 0)

    def progress(self, group: str, *, lag: int | None, pending: int) -> None:
        """A consumer group's figures at its progress report (lag unknown before Redis 7: left as it was)."""
        self.consumer_pending.labels(group).set(pending)
        if lag is not None:
            self.consumer_lag.labels(group).set(lag)

    def serve(self, *, host: str, port: int) -> None:
        """Serve GET /metrics on host:port from a daemon thread. Raises OSError if the port is taken."""
        start_http_server(port, addr=host, registry=self.registry)
