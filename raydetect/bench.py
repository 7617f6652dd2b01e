"""``raydetect bench``: throughput, latency and peak memory of one detector, per batch size.

Two stages are timed for every batch size, in one process on one device:

* ``engine`` — the engine alone on letterboxed tensors already in the engine's input form (on the
  GPU for GPU engines, synchronised after every call);
* ``end_to_end`` — :meth:`Detector.detect` on encoded images: decode, letterbox, infer, NMS.

Each gives images/s (images ÷ summed call time) and the per-call latency p50/p99/mean in ms;
``peak_memory_mb`` is the process's peak resident memory while that batch size ran (Linux
``VmHWM``, reset before each batch size) and, for CUDA engines, torch's peak allocated memory.
The JSON is what ``raydetect plan --bench`` reads.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from raydetect.config import DEFAULT_IMAGE_EXTENSIONS, BenchConfig

SCHEMA = "raydetect.bench/1"


# --- memory ---------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # never reset
    except ImportError:
        return None


def _load_avg() -> float | None:
    """The 1-minute load average when the run ended (other work on the machine skews timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _torch_cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


# --- timing ---------------------------------------------------------------------------------


def latency_stats(seconds: list[float], batch: int) -> dict[str, Any]:
    a = np.asarray(seconds, dtype=np.float64)
    total = float(a.sum())
    return {
        "calls": len(a),
        "images_per_s": batch * len(a) / total if total > 0 else 0.0,
        "latency_ms": {
            "p50": float(np.percentile(a, 50) * 1e3),
            "p99": float(np.percentile(a, 99) * 1e3),
            "mean": float(a.mean() * 1e3),
        },
    }


def time_calls(fn: Callable[[], Any], iterations: int, min_seconds: float, warmup: int,
               sync: Callable[[], None] | None = None) -> list[float]:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


# --- inputs ---------------------------------------------------------------------------------


def load_images(src: str | None) -> tuple[list[bytes], str]:
    """Encoded images from a file or folder, or one synthetic 1280×720 JPEG."""
    if src is None:
        rng = np.random.default_rng(0)
        img = cv2.GaussianBlur(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8), (0, 0), 3)
        return [cv2.imencode(".jpg", img)[1].tobytes()], "synthetic 1280x720 JPEG"
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"bench images not found: {src}")
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.suffix.lower() in DEFAULT_IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(DEFAULT_IMAGE_EXTENSIONS)}) in {src}")
    return [f.read_bytes() for f in files], f"{len(files)} images from {src}"


def _batch_of(images: list[bytes], n: int) -> list[bytes]:
    return [images[i % len(images)] for i in range(n)]


# --- the benchmark --------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None, *,
              steps: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Time the engine alone and end to end per batch size. ``progress(line)``: one result line
    per batch size; ``steps(done, total)``: after each timing (2 per batch size)."""
    from raydetect.detector import Detector
    from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

    images, described = load_images(cfg.images)
    det_cfg = cfg.detector.model_copy(update={"batch_size": max(cfg.batch_sizes)})
    t0 = time.perf_counter()
    det = Detector(det_cfg)
    load_s = time.perf_counter() - t0
    engine = det.engine
    h, w = det.card.imgsz
    boxed = [letterbox(decode_image(b, det_cfg.max_pixels, det_cfg.max_bytes), h, w)[0] for b in images]
    torch = None
    if engine.input_kind == "torch":
        import torch  # noqa: F811 - the engine runs on torch tensors

    def sync() -> None:
        t = _torch_cuda()
        if t is not None:
            t.cuda.synchronize()

    results = []
    for b in cfg.batch_sizes:
        row: dict[str, Any] = {"batch_size": b}
        if b > det.chunk:
            row["note"] = f"the engine takes at most {det.chunk} images per call: timed in chunks"
        reset_ok = reset_peak_rss()
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.cuda.reset_peak_memory_stats()
        x = to_tensor([boxed[i % len(boxed)] for i in range(b)])
        if torch is not None:
            x = torch.from_numpy(x).to(getattr(engine, "dev", None) or engine.device)
        secs = time_calls(lambda x=x: engine.infer(x), cfg.iterations, cfg.min_seconds, cfg.warmup, sync)
        row["engine"] = latency_stats(secs, b)
        if steps:
            steps(2 * len(results) + 1, 2 * len(cfg.batch_sizes))
        batch = _batch_of(images, b)
        uris = [f"#{i}" for i in range(b)]
        secs = time_calls(lambda batch=batch, uris=uris: det.detect(batch, uris), cfg.iterations,
                          cfg.min_seconds, cfg.warmup, sync)
        row["end_to_end"] = latency_stats(secs, b)
        if steps:
            steps(2 * len(results) + 2, 2 * len(cfg.batch_sizes))
        cuda = _torch_cuda()
        row["peak_memory_mb"] = {
            "rss": peak_rss_mb(),
            "rss_reset_per_batch_size": reset_ok,
            "gpu": cuda.cuda.max_memory_allocated() / 2**20 if cuda is not None else None,
        }
        results.append(row)
        if progress:
            e, x2e = row["engine"], row["end_to_end"]
            progress(
                f"batch {b:4d}: engine {e['images_per_s']:8.1f} img/s (p99 {e['latency_ms']['p99']:.1f} ms), "
                f"end-to-end {x2e['images_per_s']:8.1f} img/s (p99 {x2e['latency_ms']['p99']:.1f} ms), "
                f"peak RSS {row['peak_memory_mb']['rss']:.0f} MB"
            )
    info = det.info()
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(getattr(engine, "device", "cpu")),
        "engine": {k: v for k, v in info.items() if k not in ("names",)},
        "model": {"url": det_cfg.model, "sha256": det.card.sha256, "imgsz": list(det.card.imgsz)},
        "inputs": described,
        "settings": {"iterations": cfg.iterations, "min_seconds": cfg.min_seconds, "warmup": cfg.warmup,
                     "conf": det_cfg.conf, "iou": det_cfg.iou},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg_1m_at_end": _load_avg()},
        "load_s": load_s,
        "results": results,
    }


# --- CLI ------------------------------------------------------------------------------------
