"""Capacity planning: how many GPUs for N streams at F frames/s, from measured throughput.

    GPUs = ceil(streams × fps ÷ per-GPU frames/s × headroom)

The per-GPU rate comes from ``raydetect bench`` JSON (end-to-end images/s of one device, by batch
size) or is given directly. With a latency bound, the largest batch size whose measured p99
latency of one batch is within it is used, with that batch size's throughput. The arithmetic is
pure and kept here so it can be checked by hand; ``raydetect plan`` prints every step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from raydetect.config import PlanConfig
from raydetect.errors import RaydetectError

STAGES = ("end_to_end", "engine")


class PlanError(RaydetectError, ValueError):
    """The inputs of a plan cannot give an answer (e.g. no batch size meets the latency)."""


@dataclass(frozen=True)
class BenchPoint:
    batch_size: int
    images_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class CapacityPlan:
    streams: int
    fps: float
    headroom: float
    per_gpu_fps: float
    demand_fps: float  # streams × fps
    gpus_exact: float  # demand ÷ per-GPU × headroom
    gpus: int
    batch_size: int | None = None
    p99_ms: float | None = None
    latency_ms: float | None = None
    source: str = "given"

    def lines(self) -> list[str]:
        out = [f"demand    = {self.streams} streams × {_num(self.fps)} fps = {_num(self.demand_fps)} frames/s"]
        cap = f"capacity  = {_num(self.per_gpu_fps)} frames/s per GPU ({self.source}"
        if self.batch_size is not None:
            cap += f", batch {self.batch_size}, p99 {_num(self.p99_ms)} ms"
            if self.latency_ms is not None:
                cap += f" ≤ {_num(self.latency_ms)} ms"
        out.append(cap + ")")
        out.append(
            f"GPUs      = ceil({_num(self.demand_fps)} ÷ {_num(self.per_gpu_fps)} × {_num(self.headroom)}) "
            f"= ceil({self.gpus_exact:.3f}) = {self.gpus}"
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:g}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.4g}"


def gpus_needed(streams: int, fps: float, per_gpu_fps: float, headroom: float = 1.5) -> tuple[float, int]:
    """``(exact, rounded up)`` GPU count. The exact value is rounded to 9 decimals before the
    ceiling so that 640 ÷ 80 × 1.5 is 12, not 13 through a floating-point crumb."""
    if streams < 1 or fps <= 0 or per_gpu_fps <= 0 or headroom < 1:
        raise PlanError(
            f"need streams >= 1, fps > 0, per-GPU fps > 0, headroom >= 1 "
            f"(got {streams}, {fps}, {per_gpu_fps}, {headroom})"
        )
    exact = streams * fps / per_gpu_fps * headroom
    return exact, math.ceil(round(exact, 9))


def bench_points(bench: dict[str, Any], stage: str = "end_to_end") -> list[BenchPoint]:
    """The measured points of a ``raydetect bench`` JSON for ``stage``."""
    if stage not in STAGES:
        raise PlanError(f"stage must be one of {STAGES} (got {stage!r})")
    try:
        results = bench["results"]
        pts = [
            BenchPoint(
                batch_size=int(r["batch_size"]),
                images_per_s=float(r[stage]["images_per_s"]),
                p50_ms=float(r[stage]["latency_ms"]["p50"]),
                p99_ms=float(r[stage]["latency_ms"]["p99"]),
            )
            for r in results
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"not a raydetect bench result (missing or bad field: {e})") from None
    if not pts:
        raise PlanError("the bench result holds no measurements")
    return sorted(pts, key=lambda p: p.batch_size)


def choose_point(points: list[BenchPoint], latency_ms: float | None = None) -> BenchPoint:
    """Without a bound: the point with the highest throughput. With one: the largest batch size
    whose p99 latency is within it."""
    if latency_ms is None:
        return max(points, key=lambda p: (p.images_per_s, -p.batch_size))
    ok = [p for p in points if p.p99_ms <= latency_ms]
    if not ok:
        best = min(points, key=lambda p: p.p99_ms)
        raise PlanError(
            f"no measured batch size has p99 latency <= {latency_ms:g} ms (the lowest is "
            f"{best.p99_ms:.1f} ms at batch {best.batch_size}): relax --latency-ms or use a faster GPU"
        )
    return max(ok, key=lambda p: p.batch_size)


def make_plan(cfg: PlanConfig, bench: dict[str, Any] | None = None, stage: str = "end_to_end") -> CapacityPlan:
    if cfg.per_gpu_fps is not None:
        if cfg.latency_ms is not None:
            raise PlanError("--latency-ms needs --bench (latencies by batch size), not --per-gpu-fps")
        exact, n = gpus_needed(cfg.streams, cfg.fps, cfg.per_gpu_fps, cfg.headroom)
        return CapacityPlan(cfg.streams, cfg.fps, cfg.headroom, cfg.per_gpu_fps, cfg.streams * cfg.fps, exact, n)
    if bench is None:
        raise PlanError("give --bench results.json (from raydetect bench) or --per-gpu-fps")
    point = choose_point(bench_points(bench, stage), cfg.latency_ms)
    exact, n = gpus_needed(cfg.streams, cfg.fps, point.images_per_s, cfg.headroom)
    device = bench.get("device", "?")
    return CapacityPlan(
        cfg.streams, cfg.fps, cfg.headroom, point.images_per_s, cfg.streams * cfg.fps, exact, n,
        batch_size=point.batch_size, p99_ms=point.p99_ms, latency_ms=cfg.latency_ms,
        source=f"measured {stage.replace('_', '-')} on {device}",
    )
