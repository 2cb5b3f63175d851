"""Billing: the usage tables, the idempotent DB writer and the Redis stream consumer.

docs/api.md, "Metering and billing": `tables` defines `realtime_usage_event` and `realtime_usage`,
`writer` stores events idempotently (`BillingWriter`, also used in embedded mode), `consumer` reads the
`realtime:usage` stream in a consumer group (`UsageConsumer`, `sidecar consume`): `billing` through a
BillingWriter, `litellm` through sidecar.ledger.sink.LedgerSink; `metrics` are the consumer's own.
"""

from sidecar.billing.consumer import GROUP, BillingStreamError, UsageConsumer
from sidecar.billing.tables import RealtimeUsage, RealtimeUsageDead, RealtimeUsageEvent
from sidecar.billing.writer import (
    BillingDatabaseError,
    BillingDataError,
    BillingError,
    BillingWriter,
    check_storable,
    make_engine,
    upgrade,
)

__all__ = [
    "GROUP",
    "BillingDataError",
    "BillingDatabaseError",
    "BillingError",
    "BillingStreamError",
    "BillingWriter",
    "RealtimeUsage",
    "RealtimeUsageDead",
    "RealtimeUsageEvent",
    "UsageConsumer",
    "check_storable",
    "make_engine",
    "upgrade",
]
