"""Surfaces: the WebSocket voice protocols the sidecar relays, each as a small pure session core.

OpenAI speaks three voice protocols over WebSocket, one per route: the Realtime API (`/v1/realtime`),
GPT-Live (`/v1/live/sessions`) and realtime translation (`/v1/realtime/translations`). The catalog decides
which models each route serves (sidecar/catalog.py, `_routes`). Three protocols do not mean three relays:

    client ws <-> relay driver (one; relay.py) <-> upstream ws
                     |  text in, Reply out; `now` passed in
                     v
               SurfaceCore (core.py)  <- realtime (session.py) | live.py | translation.py
                     |  Figures (metering.Figures)
                     v
               Account (account.py): usage events -> one billing path (publisher, consumer, ledger);
               one control path (control.py: revocation, budgets, limits, drain) acting on the driver,
               never on a core

- The driver does every I/O: sockets, back-pressure, timeouts, the clock, close codes (errors.py's one
  table). It knows no event names. app.py opens each route (auth, model, admission, failover) and hands the
  driver an Account holding the route's core.
- A core is sans-I/O: it takes one frame (and the time) and says what goes upstream, what goes to the client
  and whether the session must end; it meters, pins the model, rewrites it to the deployment's name and
  scrubs upstream frames through the injected scrubber. It reads no clock, no environment, no socket.
- Every core reports the same `metering.Figures`, and the Account builds every usage event from them, so
  checkpoints, finals, budgets in flight and the ledger work for all protocols unchanged; what differs is only
  how a core counts (tokens and audio bytes on /v1/realtime, input audio bytes for translation, session
  seconds by the sidecar's clock for GPT-Live, unit `session_second`).

Modules: `core` (the interface and the Reply every core returns), `account` (who pays, and the usage events),
`live` (GPT-Live), `translation` (realtime translation). The /v1/realtime core is `sidecar.session.Session`
(it predates this package and keeps its module: the hot path's imports and tests stay as they were).
"""
