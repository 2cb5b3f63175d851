"""Prometheus metrics on `/metrics`, one registry per app (so tests can run several apps in one process).

Per-frame figures are counted in plain integers on each relay and folded into these counters at each
checkpoint and at the end of a session, never per frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


@dataclass
class _Folded:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class Metrics:
    """The sidecar's metrics. Gauges that mirror live state read it through callbacks at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.live_sessions = Gauge("sidecar_live_sessions", "Live relayed sessions on this replica", registry=r)
        self.sessions = Counter("sidecar_sessions", "Sessions ended, by close reason", ["close_reason"], registry=r)
        self.refusals = Counter(
            "sidecar_refusals", "Sessions refused before the upgrade, by code", ["code"], registry=r
        )
        self.audio_seconds = Counter("sidecar_audio_seconds", "Audio seconds metered from client appends", registry=r)
        self.reported_over_metered = Counter(
            "sidecar_reported_over_metered_sessions",
            "Sessions whose provider-reported transcription seconds exceeded the metered seconds (billed reported)",
            registry=r,
        )
        self.transcription_unpriced = Counter(
            "sidecar_transcription_unpriced",
            "Input transcription usages on conversation sessions that the transcription model's price cannot price",
            registry=r,
        )
        self.frames = Counter("sidecar_relay_frames", "Frames relayed", ["direction"], registry=r)
        self.bytes = Counter("sidecar_relay_bytes", "Bytes relayed", ["direction"], registry=r)
        self.connect_seconds = Histogram(
            "sidecar_upstream_connect_seconds",
            "Upstream connect latency (handshake done)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.connect_failures = Counter(
            "sidecar_upstream_connect_failures", "Upstream connect failures, per deployment attempt", registry=r
        )
        self.revocations = Counter(
            "sidecar_revocations", "Sessions ended by control, by reason", ["reason"], registry=r
        )
        self.key_check_failures = Counter(
            "sidecar_key_check_failures", "Key re-checks that could not reach LiteLLM", registry=r
        )
        self.publish_failures = Gauge(
            "sidecar_usage_publish_failures", "Usage publish attempts that failed (cumulative)", registry=r
        )
        self.spool_depth = Gauge("sidecar_usage_spool_depth", "Usage events waiting in the local spool", registry=r)
        self.draining = Gauge("sidecar_draining", "1 while the replica drains", registry=r)

    def watch(self, *, live: Callable[[], int], failures: Callable[[], int], spool: Callable[[], int]) -> None:
        """Read live state at scrape time."""
        self.live_sessions.set_function(live)
        self.publish_failures.set_function(failures)
        self.spool_depth.set_function(spool)

    def fold(self, relay_counts: _Folded | object, folded: _Folded) -> None:
        """Add a relay's counters since the last fold (`folded` remembers what was already added)."""
        for name, direction in (("frames_in", "in"), ("frames_out", "out")):
            delta = getattr(relay_counts, name) - getattr(folded, name)
            if delta:
                self.frames.labels(direction).inc(delta)
                setattr(folded, name, getattr(relay_counts, name))
        for name, direction in (("bytes_in", "in"), ("bytes_out", "out")):
            delta = getattr(relay_counts, name) - getattr(folded, name)
            if delta:
                self.bytes.labels(direction).inc(delta)
                setattr(folded, name, getattr(relay_counts, name))

    @staticmethod
    def new_fold() -> _Folded:
        """A fresh record of what was folded for one relay."""
        return _Folded()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
