"""Per-job metrics from inside the detector actors, through Ray's metrics API.

Ray exports them with the node's other metrics on its Prometheus endpoint (``ray start
--metrics-export-port``; names get Ray's ``ray_`` prefix, counters a ``_total`` suffix), which is
what ``deploy/grafana-dashboard.json`` charts:

=================================  =========  =================================================
name                               kind       meaning
=================================  =========  =================================================
raydetect_job_images                   counter    image rows produced
raydetect_job_frames                   counter    video frame rows produced
raydetect_job_detections               counter    boxes produced
raydetect_job_errors                   counter    rows with ``error`` set
raydetect_job_batch_latency_s          histogram  seconds per detector call (read+decode+infer+NMS)
raydetect_job_batch_images             histogram  rows per detector call
raydetect_job_gpu_memory_bytes         gauge      peak CUDA memory allocated by torch in the actor
=================================  =========  =================================================

Every series carries the tag ``job`` (the job's output URL), so one dashboard shows many jobs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raydetect.detector import Detector
from raydetect.storage import read_batch
from raydetect.types import ImageResult

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _gpu_memory_bytes() -> int | None:
    """Peak CUDA memory torch allocated in this process, if torch is in use here."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.max_memory_allocated())
    except Exception:
        return None


def batch_counts(table: pa.Table) -> dict[str, int]:
    """Rows, frames, detections and errors in one result batch."""
    rows = table.num_rows
    frames = 0
    for col in ("frame", "frame_index"):
        if col in table.column_names:
            frames = rows - table.column(col).null_count
            break
    dets = 0
    if "detections" in table.column_names and rows:
        dets = int(pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0)
    errors = 0
    if "error" in table.column_names:
        errors = rows - table.column("error").null_count
    return {"images": rows - frames, "frames": frames, "detections": dets, "errors": errors}


class JobMetrics:
    """The metric objects of one actor (created once; Ray aggregates them per node)."""

    def __init__(self, job: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("job",)
        self.tags = {"job": job}
        self.counters = {
            "images": Counter("raydetect_job_images", "Image rows produced", tag_keys=tags),
            "frames": Counter("raydetect_job_frames", "Video frame rows produced", tag_keys=tags),
            "detections": Counter("raydetect_job_detections", "Boxes produced", tag_keys=tags),
            "errors": Counter("raydetect_job_errors", "Rows with an error", tag_keys=tags),
        }
        self.latency = Histogram(
            "raydetect_job_batch_latency_s", "Seconds per detector call", LATENCY_BOUNDARIES, tag_keys=tags
        )
        self.batch = Histogram("raydetect_job_batch_images", "Rows per detector call", SIZE_BOUNDARIES, tag_keys=tags)
        self.gpu_memory = Gauge("raydetect_job_gpu_memory_bytes", "Peak CUDA memory allocated by torch", tag_keys=tags)

    def record(self, table: pa.Table, seconds: float | None = None) -> dict[str, int]:
        """Count the rows of ``table``; ``seconds`` (one detector call) feeds the latency and
        batch-size histograms (None: counters only, e.g. a whole video segment)."""
        counts = batch_counts(table)
        for name, value in counts.items():
            if value:
                self.counters[name].inc(value, tags=self.tags)
        if seconds is not None:
            self.latency.observe(seconds, tags=self.tags)
            self.batch.observe(table.num_rows, tags=self.tags)
        mem = _gpu_memory_bytes()
        if mem is not None:
            self.gpu_memory.set(mem, tags=self.tags)
        return counts


class MeteredDetector(Detector):
    """The job's ``map_batches`` callable: a :class:`Detector` that reads its batch's files
    from ``fs`` (:func:`~raydetect.storage.read_batch`: concurrent GETs on object storage, an
    error row for a file that cannot be read) and records :class:`JobMetrics` for every call."""

    def __init__(self, config: Any, fs: Any, uri_prefix: str = "", job: str = "raydetect") -> None:
        super().__init__(config, uri_prefix=uri_prefix)
        self.fs = fs
        self.metrics = JobMetrics(job)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        t0 = time.perf_counter()
        images, uris, unreadable = read_batch(batch, self.fs, self.uri_prefix)
        results = self.detect(images, uris) if images else []
        results += [ImageResult(uri=u, error=reason, error_kind="input") for u, reason in unreadable.items()]
        table = self.to_table(results)
        self.metrics.record(table, time.perf_counter() - t0)
        return table
