"""The LiteLLM sink: realtime spend written into LiteLLM's own PostgreSQL ledger (issue 14).

`schema`: what the sink finds in LiteLLM's database before it writes anything; `delta`: what one
usage event adds after the session's last applied one (pure); `writer`: a batch of events applied in one
transaction, each exactly once; after the commit, `aftercommit.AfterCommit` settles the sidecar's own budget
counters (`budget`: each applied amount once) and publishes LiteLLM's auth-cache invalidations
(`invalidation`, pure), best effort, before the entry is acknowledged.
"""

from sidecar.ledger.delta import Applied, DeadLetter, Delta, Skip, delta
from sidecar.ledger.schema import LedgerSchema, missing_required, probe
from sidecar.ledger.writer import Outcome, apply, apply_many, ensure_sink_tables

__all__ = [
    "Applied",
    "DeadLetter",
    "Delta",
    "LedgerSchema",
    "Outcome",
    "Skip",
    "apply",
    "apply_many",
    "delta",
    "ensure_sink_tables",
    "missing_required",
    "probe",
]
