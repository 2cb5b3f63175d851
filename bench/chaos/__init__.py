"""`make chaos` and `make soak`: faults and churn against real processes, with the billing checked per session.

| module | what |
|---|---|
| `tally.py` | pure: per-session figures (sent, decoded, billed) -> a fault's row, its invariants, the table |
| `flat.py` | pure: the soak's series and the flatness verdict after warm-up |
| `provider.py` | the fake provider as a process that reports, per client session, the audio it decoded |
| `stack.py` | the real processes (redis-server, `sidecar serve`, `sidecar consume`, the provider), TCP proxies, netns |
| `clients.py` | openai SDK sessions streaming the test speech at real-time pace, each with its own key |
| `run.py` | `python -m bench.chaos.run`: the fault matrix (`make chaos`) |
| `soak.py` | `python -m bench.chaos.soak`: churning sessions, RSS / fds / tasks sampled (`make soak`) |

Method and latest results: docs/reliability.md.
"""
