"""Prometheus metrics on `/metrics`: one registry per app, or one view of every worker of `sidecar serve`.

Per-frame figures are counted in plain integers on each relay and folded into these counters at each
checkpoint and at the end of a session, never per frame; audio seconds and cost are folded the same way,
per model, from the figures of each checkpoint usage event and of the final one.

With `sidecar serve --workers N` the parent sets `PROMETHEUS_MULTIPROC_DIR` to a fresh directory before it
forks (sidecar/server.py): prometheus_client then keeps each worker's values in files there, and a scrape
of any worker reads them all (`MultiProcessCollector`): counters add up over every worker that ever ran,
the live gauges over the workers alive. Callback gauges cannot work so, so every gauge is set: at attach and
detach, each second by the supervisor (`refresh`), and before each scrape. Process and GC figures are read
by prometheus_client's own collectors; with several workers each worker copies its own into counters and
gauges of the same names, so they add up too. Without that variable (tests run several apps in one process)
each `Metrics` has a registry of its own.
"""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics", "multiprocess_dir"]

#: prometheus_client's switch for its multiprocess mode (it reads it when first imported).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# How the workers' gauges combine in multiprocess mode (live*: a dead worker's value is dropped).
_GaugeMode = Literal["livesum", "livemax", "livemin"]
_GAUGE_MODES: Final[dict[str, _GaugeMode]] = {
    "process_max_fds": "livemax",
    "process_start_time_seconds": "livemin",
}


def multiprocess_dir() -> str | None:
    """The directory prometheus_client's multiprocess mode writes to, or None when it is off.

    `sidecar serve --workers N` sets the variable before any worker imports prometheus_client; the mode is
    on only when the library saw it (it chooses its value class once, at import)."""
    path = os.environ.get(MULTIPROC_ENV)  # the library's own switch, not a sidecar setting
    multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
    return path if path and multiprocess else None


def _version() -> str:
    try:
        return version("realtime-sidecar")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass
class _Folded:
    """What was already added to the counters for one relay."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    audio_seconds: Decimal = Decimal(0)
    cost_usd: Decimal = Decimal(0)


@dataclass
class _Accrued:
    """One model's audio seconds and cost in this process, exact, and what its counters show (floats)."""

    audio_seconds: Decimal = Decimal(0)
    cost_usd: Decimal = Decimal(0)
    shown: list[float] = field(default_factory=lambda: [0.0, 0.0])


def _running_tasks() -> int:
    """The running event loop's live asyncio tasks (0 when called outside a loop)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def _advance(child: Counter, shown: float, total: Decimal) -> float:
    """Bring a counter from `shown` to `float(total)`; returns what it shows now.

    The step aims at the exact running total each time, so rounding never accumulates across folds."""
    step = float(total) - shown
    if step <= 0:
        return shown
    child.inc(step)
    return shown + step  # the same float addition the counter made


class _ProcessCopy:
    """This worker's process and GC figures copied into multiprocess counters and gauges of the same names."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._source = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._source)
        GCCollector(registry=self._source)
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}
        for family in self._source.collect():
            labels = sorted({k for s in family.samples for k in s.labels})
            if family.type == "counter":
                self._counters[family.name] = Counter(family.name, family.documentation, labels, registry=registry)
            else:
                mode = _GAUGE_MODES.get(family.name, "livesum")
                self._gauges[family.name] = Gauge(
                    family.name,
                    family.documentation,
                    labels,
                    multiprocess_mode=mode,
                    registry=registry,
                )

    def copy(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                values_ = tuple(sample.labels[k] for k in sorted(sample.labels))
                if family.name in self._gauges and sample.name == family.name:
                    gauge = self._gauges[family.name]
                    (gauge.labels(*values_) if values_ else gauge).set(sample.value)
                elif family.name in self._counters and sample.name == family.name + "_total":
                    key = (family.name, values_)
                    step = sample.value - self._seen.get(key, 0.0)
                    if step > 0:
                        counter = self._counters[family.name]
                        (counter.labels(*values_) if values_ else counter).inc(step)
                        self._seen[key] = sample.value


class Metrics:
    """The sidecar's metrics. Gauges are set (never read through callbacks) so that workers can add up."""

    def __init__(self, *, multiprocess: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.live_sessions = Gauge(
            "sidecar_live_sessions", "Live relayed sessions on this replica", multiprocess_mode="livesum", registry=r
        )
        self.sessions = Counter(
            "sidecar_sessions_total", "Sessions ended, by close reason and model", ["close_reason", "model"], registry=r
        )
        self.refusals = Counter(
            "sidecar_refusals_total",
            'Sessions refused before the upgrade, by code and model ("" when no model of the config was named)',
            ["code", "model"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "sidecar_audio_seconds_total",
            "Audio seconds metered, by model, as they accrue (each checkpoint, then the session end)",
            ["model"],
            registry=r,
        )
        self.cost_usd = Counter(
            "sidecar_cost_usd_total",
            "Cost in USD of the sessions, by model, as it accrues (the usage events' cost_usd)",
            ["model"],
            registry=r,
        )
        self.reported_over_metered = Counter(
            "sidecar_reported_over_metered_sessions_total",
            "Sessions whose provider-reported transcription seconds exceeded the metered seconds (billed reported)",
            registry=r,
        )
        self.transcription_unpriced = Counter(
            "sidecar_transcription_unpriced_total",
            "Input transcription usages on conversation sessions that the transcription model's price cannot price",
            registry=r,
        )
        self.frames = Counter("sidecar_relay_frames_total", "Frames relayed", ["direction"], registry=r)
        self.bytes = Counter("sidecar_relay_bytes_total", "Bytes relayed", ["direction"], registry=r)
        self.connect_seconds = Histogram(
            "sidecar_upstream_connect_seconds",
            "Upstream connect latency (handshake done)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.connect_failures = Counter(
            "sidecar_upstream_connect_failures_total",
            "Upstream connect failures, per deployment attempt, by model and deployment",
            ["model", "deployment"],
            registry=r,
        )
        self.revocations = Counter(
            "sidecar_revocations_total", "Sessions ended by control, by reason", ["reason"], registry=r
        )
        self.key_check_failures = Counter(
            "sidecar_key_check_failures_total", "Key re-checks that could not reach LiteLLM", registry=r
        )
        self.publish_failures = Counter(
            "sidecar_usage_publish_failures_total", "Usage publish attempts that failed", registry=r
        )
        self.spool_depth = Gauge(
            "sidecar_usage_spool_depth",
            "Usage events waiting in the local spool",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.spool_foreign_files = Gauge(
            "sidecar_usage_spool_foreign_files",
            "Dead processes' usage spool files of another sink, found at start and left in place",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.draining = Gauge("sidecar_draining", "1 while the replica drains", multiprocess_mode="livemax", registry=r)
        self.redis_up = Gauge(
            "sidecar_redis_up",
            "1 while the shared Redis answers this replica's heartbeat (always 1 in embedded mode)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.redis_errors = Counter(
            "sidecar_redis_errors_total",
            "Operations on the shared Redis that failed, by operation",
            ["operation"],
            registry=r,
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "The sidecar's version and Python",
            ["version", "python"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.price_source = Gauge(
            "sidecar_model_price_source",
            "1 per model, labelled with where its price came from (proxy, model_info, remote_map, bundled_map, none)",
            ["model", "source"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.asyncio_tasks = Gauge(
            "sidecar_asyncio_tasks",
            "asyncio tasks alive in the event loop (set each second and at each scrape)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.redis_up.set(1)
        self._live: Callable[[], int] = lambda: 0
        self._failures: Callable[[], int] = lambda: 0
        self._spool: Callable[[], int] = lambda: 0
        self._failures_seen = 0
        self._accrued: dict[str, _Accrued] = {}
        self._copy: _ProcessCopy | None = None
        if multiprocess is None:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
            self._exposed = r
        else:
            self._copy = _ProcessCopy(r)
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=multiprocess)  # type: ignore[no-untyped-call]  # untyped upstream

    def watch(self, *, live: Callable[[], int], failures: Callable[[], int], spool: Callable[[], int]) -> None:
        """Where `refresh` reads live state: live sessions, cumulative publish failures, spool depth."""
        self._live, self._failures, self._spool = live, failures, spool
        self.refresh()

    def refresh(self) -> None:
        """Set the gauges from live state and add new publish failures (each second, and before a scrape)."""
        self.live_sessions.set(self._live())
        self.spool_depth.set(self._spool())
        self.asyncio_tasks.set(_running_tasks())
        failures = self._failures()
        if failures > self._failures_seen:
            self.publish_failures.inc(failures - self._failures_seen)
            self._failures_seen = failures
        if self._copy is not None:
            self._copy.copy()

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

    def accrue(self, model: str, folded: _Folded, *, audio_seconds: Decimal, cost_usd: Decimal) -> None:
        """Add a session's audio seconds and cost (cumulative figures of a usage event) since its last fold.

        Each model's counters follow its exact running total in this process, so after the last session
        they show the billed sums (as floats)."""
        d_audio, d_cost = audio_seconds - folded.audio_seconds, cost_usd - folded.cost_usd
        if not (d_audio or d_cost):
            return
        folded.audio_seconds, folded.cost_usd = audio_seconds, cost_usd
        acc = self._accrued.setdefault(model, _Accrued())
        acc.audio_seconds += d_audio
        acc.cost_usd += d_cost
        acc.shown[0] = _advance(self.audio_seconds.labels(model), acc.shown[0], acc.audio_seconds)
        acc.shown[1] = _advance(self.cost_usd.labels(model), acc.shown[1], acc.cost_usd)

    def show_price_sources(self, sources: Mapping[str, str]) -> None:
        """Set `sidecar_model_price_source` to one series per model (model -> source), dropping the others."""
        self.price_source.clear()
        for model, source in sources.items():
            self.price_source.labels(model, source).set(1)

    @staticmethod
    def new_fold() -> _Folded:
        """A fresh record of what was folded for one relay."""
        return _Folded()

    def render(self) -> bytes:
        """The exposition text (every worker's, in multiprocess mode)."""
        self.refresh()
        return generate_latest(self._exposed)
