"""Surfaces: the WebSocket voice protocols the sidecar relays, each as a small pure session core.

OpenAI speaks three voice protocols over WebSocket, one per route: the Realtime API (`/v1/realtime`),
GPT-Live (`/v1/live/sessions`) and realtime translation (`/v1/realtime/translations`). The catalog decides
which models each route serves (sidecar/catalog.py, `_routes`). Three protocols must not mean three relays,
so the intended architecture is:

    client ws <-> relay driver (one; relay.py) <-> upstream ws
                     |  text in, Reply out; `now` passed in
                     v
               SurfaceCore (core.py)  <- realtime (session.py, today) | live.py | translation.py
                     |  Figures (metering.Figures)
                     v
               usage events -> one billing path (publisher, consumer, ledger) ; one control path
               (revocation, budgets, limits, drain) acting on the driver, never on a core

- The driver does every I/O: sockets, back-pressure, timeouts, the clock, close codes (errors.py's one
  table). It knows no event names.
- A core is sans-I/O: it takes one frame (and the time) and says what goes upstream, what goes to the client
  and whether the session must end; it meters, pins the model, rewrites it to the deployment's name and
  scrubs upstream frames through the injected scrubber. It reads no clock, no environment, no socket.
- Every core reports the same `metering.Figures`, so checkpoints, finals, budgets in flight and the ledger
  work for all protocols unchanged; what differs is only how a core counts (tokens and audio bytes on
  /v1/realtime, input audio bytes for translation, session seconds by the sidecar's clock for GPT-Live).

Modules: `core` (the interface and the Reply every core returns), `live` (GPT-Live), `translation`
(realtime translation). The /v1/realtime core (session.py) predates this package; it is to implement
`core.SurfaceCore` and move here when the relay driver is generalised (issue 15). Nothing here is wired
into the app yet.
"""
