"""What the provider created for one WebRTC call (shared by the create, hangup and sideband modules)."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.catalog import Deployment
from sidecar.catalog import Route as SessionRoute


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One provider call: the route it speaks (/v1/realtime or /v1/live/sessions), the deployment that
    answered the offer, and the provider's call id (realtime `rtc_...`, GPT-Live session id). The id and the
    deployment never reach the client: the client sees the sidecar's session id only."""

    route: SessionRoute
    deployment: Deployment
    call_id: str
