"""realtime-sidecar: relay, meter and bill OpenAI Realtime sessions beside a LiteLLM proxy."""

__version__ = "0.1.0"
