"""The LiteLLM sink: realtime spend written into LiteLLM's own PostgreSQL ledger (issue 14).

`schema`: what the sink finds in LiteLLM's database before it writes anything; `delta`: what one
usage event adds after the session's last applied one (pure).
"""

from sidecar.ledger.delta import Applied, DeadLetter, Delta, Skip, delta
from sidecar.ledger.schema import LedgerSchema, missing_required, probe

__all__ = ["Applied", "DeadLetter", "Delta", "LedgerSchema", "Skip", "delta", "missing_required", "probe"]
