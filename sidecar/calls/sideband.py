"""The provider's sideband of one WebRTC call: a server-side WebSocket that sees the call's server events.

URL forms (the `openai` SDK's `realtime.connect(call_id=)` and `live.sideband.connect(session_id=)`; Azure the
same paths under `<api_base>/openai/v1/...`), with the credential in a header as on the WebSocket routes
(upstream.py: `Authorization: Bearer <key>`, Azure `api-key: <key>`), never in the URL:

- realtime: `<api_base>/v1/realtime?call_id=<call id>` (Azure `<api_base>/openai/v1/realtime?call_id=...`);
- GPT-Live: `<api_base>/v1/live/sessions/<session id>/attach` (Azure `<api_base>/openai/v1/live/sessions/...`).

A base ending in `/v1` is not given a second one (upstream.py's rule). Pure but for `attach`, which dials.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from sidecar.calls.call import ProviderCall
from sidecar.catalog import LIVE_ENDPOINT
from sidecar.upstream import OPENAI_API_BASE, Dialer, Target, Upstream, _api_key_headers, _v1, _ws_base


def sideband_target(call: ProviderCall) -> Target:
    """The URL and headers of the call's sideband (module docstring). Pure."""
    deployment = call.deployment
    if deployment.provider == "azure":
        base = f"{_ws_base(deployment.api_base or '')}/openai/v1"
    else:
        base = _v1(_ws_base(deployment.api_base or OPENAI_API_BASE))
    if call.route == LIVE_ENDPOINT:
        url = f"{base}/live/sessions/{quote(call.call_id, safe='')}/attach"
    else:
        url = f"{base}/realtime?{urlencode({'call_id': call.call_id})}"
    return Target(url, _api_key_headers(deployment), False, deployment, call.route)


async def attach(call: ProviderCall, dialer: Dialer) -> Upstream:
    """Open the call's sideband with `dialer` (upstream.websocket_dialer). Raises UpstreamError (no secrets;
    its `status` is the provider's HTTP answer to the upgrade, e.g. 404 for a call that has ended)."""
    return await dialer(sideband_target(call))
