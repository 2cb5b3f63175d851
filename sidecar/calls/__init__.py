"""WebRTC calls through the sidecar: the media goes between the client and the provider, never through here.

    client --POST offer--> endpoints --provider.create (failover)--> provider --SDP answer--> client
    watch.CallWatch --sideband WebSocket (sideband.py)--> provider: usage, checkpoints, one final event
    control (revocation, budget, limits, admin) --> CallWatch.end --> provider.hangup --> billed once

`call.ProviderCall` is what the provider created: the deployment and the provider's own call id (never shown
to a client). The sidecar's call id is the session id (`Location: /v1/realtime/calls/{session_id}`).
"""
