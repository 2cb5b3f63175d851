"""Is a resource flat after warm-up? The soak's verdict on its samples (pure; no I/O).

A series is `(seconds since start, value)` samples. After the warm-up, the value is fitted by least squares
as `a + slope * t + per_session * live` when the live-session count is given (churn moves file descriptors and
tasks with the sessions open at the moment; a leak is what grows with time at the same load), else as
`a + slope * t`. Its drift over the measured window (slope x window) must stay within `tolerance`:
`absolute + relative x median`. The spread (max - min) is reported beside it: churn makes a series noisy,
a leak makes it climb, and only the climb fails.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """How much a resource may drift over the window: `absolute + relative * median`."""

    absolute: float
    relative: float


@dataclass(frozen=True)
class Verdict:
    """One series after warm-up: its fit and whether it is flat."""

    name: str
    samples: int
    median: float
    low: float
    high: float
    slope_per_min: float
    drift: float  # slope x the window's length
    allowed: float
    flat: bool

    def line(self, unit: str = "") -> str:
        word = "flat" if self.flat else "NOT FLAT"
        return (
            f"{self.name}: {word}: median {self.median:.1f}{unit}, min {self.low:.1f}, max {self.high:.1f} "
            f"(max-min {self.high - self.low:.1f}), slope {self.slope_per_min:+.2f}/min, drift {self.drift:+.1f} "
            f"over the window (allowed ±{self.allowed:.1f}); {self.samples} samples"
        )


def after_warmup(series: Sequence[tuple[float, float]], warmup_s: float) -> list[tuple[float, float]]:
    """The samples taken at or after `warmup_s`."""
    return [(t, v) for t, v in series if t >= warmup_s]


def slope(series: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope (value per second); 0 with fewer than two distinct times."""
    if len(series) < 2:
        return 0.0
    ts = [t for t, _ in series]
    vs = [v for _, v in series]
    mean_t, mean_v = statistics.fmean(ts), statistics.fmean(vs)
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, vs, strict=True)) / var


def slope_at_load(series: Sequence[tuple[float, float]], live: Sequence[float]) -> float:
    """The time slope of `series` with the load (`live`, one per sample) held fixed: least squares on
    `a + b * t + c * live`, returning b. Falls back to `slope` when the load does not vary."""
    if len(series) != len(live):
        raise ValueError("one live count per sample")
    ts = [t for t, _ in series]
    vs = [v for _, v in series]
    mt, mv, ml = statistics.fmean(ts), statistics.fmean(vs), statistics.fmean(live)
    dt = [t - mt for t in ts]
    dl = [x - ml for x in live]
    dv = [v - mv for v in vs]
    stt = sum(a * a for a in dt)
    sll = sum(a * a for a in dl)
    stl = sum(a * b for a, b in zip(dt, dl, strict=True))
    det = stt * sll - stl * stl
    if sll == 0 or stt == 0 or abs(det) <= 1e-9 * stt * sll:
        return slope(series)
    stv = sum(a * b for a, b in zip(dt, dv, strict=True))
    slv = sum(a * b for a, b in zip(dl, dv, strict=True))
    return (stv * sll - slv * stl) / det


def verdict(
    name: str,
    series: Sequence[tuple[float, float]],
    *,
    warmup_s: float,
    tolerance: Tolerance,
    live: Sequence[tuple[float, float]] | None = None,
) -> Verdict:
    """Whether `series` is flat after `warmup_s` (at equal load when `live`, sampled alongside, is given).

    Raises ValueError with fewer than 3 samples after warm-up."""
    kept = after_warmup(series, warmup_s)
    if len(kept) < 3:
        raise ValueError(f"{name}: {len(kept)} samples after the warm-up; need at least 3")
    values = [v for _, v in kept]
    loads = None if live is None else [v for _, v in after_warmup(live, warmup_s)]
    per_s = slope(kept) if loads is None else slope_at_load(kept, loads)
    window = kept[-1][0] - kept[0][0]
    median = statistics.median(values)
    allowed = tolerance.absolute + tolerance.relative * abs(median)
    drift = per_s * window
    return Verdict(
        name=name,
        samples=len(kept),
        median=median,
        low=min(values),
        high=max(values),
        slope_per_min=per_s * 60,
        drift=drift,
        allowed=allowed,
        flat=abs(drift) <= allowed,
    )
