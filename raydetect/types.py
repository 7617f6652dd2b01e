"""The one result type of raydetect: a detection, and the result for one image.

Every path (batch job, online endpoint, evaluation) produces :class:`ImageResult`
objects and converts them to Parquet rows / JSON with the helpers here, so the
output schema is defined exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

#: Raw head layouts raydetect decodes (see :mod:`raydetect.postprocess`).
HeadLayout = Literal["yolov8", "yolov5"]


@dataclass(frozen=True)
class NMSOutput:
    """Final detections of a batch from an engine that runs NMS inside its network
    (``Engine.nms_in_engine``). Host NumPy arrays (they are small: ``B x K``):

    * ``num`` ``[B]`` int64: valid rows per image (the first ``num[i]`` rows of image ``i``);
    * ``boxes`` ``[B, K, 4]`` float32: x1, y1, x2, y2 in letterboxed model-input pixels;
    * ``scores`` ``[B, K]`` float32, highest first within an image;
    * ``classes`` ``[B, K]`` int64 class ids.

    Rows past ``num[i]`` are padding. The detector maps rows to detections with
    :func:`raydetect.postprocess.nms_output_rows` (no NMS of its own).
    """

    num: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        b = self.num.shape[0]
        if self.boxes.ndim != 3 or self.boxes.shape[0] != b or self.boxes.shape[2] != 4:
            raise ValueError(f"NMSOutput.boxes must be [{b}, K, 4], got {self.boxes.shape}")
        k = self.boxes.shape[1]
        for name in ("scores", "classes"):
            shape = getattr(self, name).shape
            if shape != (b, k):
                raise ValueError(f"NMSOutput.{name} must be [{b}, {k}], got {shape}")

    def __len__(self) -> int:
        return int(self.num.shape[0])


@dataclass(frozen=True, slots=True)
class Detection:
    """One box in original-image pixel coordinates (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "x1": self.x1,
            "y1": self.y1,
            "x2": self.x2,
            "y2": self.y2,
            "score": self.score,
            "class_id": self.class_id,
            "class_name": self.class_name,
        }


@dataclass(slots=True)
class ImageResult:
    """Detections for one input image (or video frame), or the error that prevented them."""

    uri: str
    width: int | None = None
    height: int | None = None
    detections: list[Detection] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "width": self.width,
            "height": self.height,
            "detections": [d.to_dict() for d in self.detections],
            "error": self.error,
        }


DETECTION_STRUCT = pa.struct(
    [
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
    ]
)

#: Schema of the batch job's Parquet output: one row per image.
RESULT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("detections", pa.list_(DETECTION_STRUCT)),
        ("error", pa.string()),
        ("model_sha256", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
    ]
)


def results_to_table(
    results: list[ImageResult], *, model_sha256: str, engine: str, precision: str
) -> pa.Table:
    """Build the Parquet/Arrow table for ``results`` with :data:`RESULT_SCHEMA`."""
    n = len(results)
    return pa.Table.from_pydict(
        {
            "uri": [r.uri for r in results],
            "width": [r.width for r in results],
            "height": [r.height for r in results],
            "detections": [[d.to_dict() for d in r.detections] for r in results],
            "error": [r.error for r in results],
            "model_sha256": [model_sha256] * n,
            "engine": [engine] * n,
            "precision": [precision] * n,
        },
        schema=RESULT_SCHEMA,
    )


def table_to_results(table: pa.Table) -> list[ImageResult]:
    """Inverse of :func:`results_to_table` (used by tests, reports and evaluation)."""
    out = []
    for row in table.select(["uri", "width", "height", "detections", "error"]).to_pylist():
        dets = [Detection(**d) for d in (row["detections"] or [])]
        out.append(
            ImageResult(
                uri=row["uri"],
                width=row["width"],
                height=row["height"],
                detections=dets,
                error=row["error"],
            )
        )
    return out


# --- video -----------------------------------------------------------------------------------


@dataclass(slots=True)
class FrameResult:
    """One row of the video output: a decoded frame (processed or skipped by the motion gate)
    or an error of the video/segment (``frame`` is None then).

    ``result`` is the same :class:`ImageResult` the detector returns for an image; a skipped
    frame has ``skipped=True``, no detections (written as null: not run, rather than "nothing
    found") and ``ref_frame`` = the processed frame whose detections stand in for it."""

    result: ImageResult
    segment: int
    frame: int | None = None
    pts: int | None = None
    pts_s: float | None = None
    skipped: bool = False
    ref_frame: int | None = None
    motion: float | None = None

    @property
    def uri(self) -> str:
        return self.result.uri

    @property
    def error(self) -> str | None:
        return self.result.error

    @property
    def detections(self) -> list[Detection]:
        return self.result.detections


#: Schema of the video frames output (``OUTPUT/videos/``): one row per sampled frame, processed
#: or skipped by the motion gate, plus error rows (``frame`` null) for damaged data.
VIDEO_RESULT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("segment", pa.int32()),
        ("frame", pa.int64()),
        ("pts", pa.int64()),
        ("pts_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("skipped", pa.bool_()),
        ("ref_frame", pa.int64()),
        ("motion", pa.float32()),
        ("detections", pa.list_(DETECTION_STRUCT)),
        ("error", pa.string()),
        ("model_sha256", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
    ]
)

#: Schema of the per-video summary (``OUTPUT/video_summary/``): one row per input video.
VIDEO_SUMMARY_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("codec", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("segments", pa.int32()),
        ("frames_decoded", pa.int64()),
        ("frames_sampled", pa.int64()),
        ("frames_processed", pa.int64()),
        ("frames_skipped", pa.int64()),
        ("detections", pa.int64()),
        ("errors", pa.int64()),
        ("decode_s", pa.float64()),
        ("infer_s", pa.float64()),
        ("decode_fps", pa.float64()),
        ("decoder", pa.string()),
        ("error", pa.string()),
        ("model_sha256", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
    ]
)


def frame_results_to_table(
    rows: list[FrameResult], *, model_sha256: str, engine: str, precision: str
) -> pa.Table:
    """Build the Arrow table for ``rows`` with :data:`VIDEO_RESULT_SCHEMA`."""
    n = len(rows)
    return pa.Table.from_pydict(
        {
            "uri": [r.result.uri for r in rows],
            "segment": [r.segment for r in rows],
            "frame": [r.frame for r in rows],
            "pts": [r.pts for r in rows],
            "pts_s": [r.pts_s for r in rows],
            "width": [r.result.width for r in rows],
            "height": [r.result.height for r in rows],
            "skipped": [r.skipped for r in rows],
            "ref_frame": [r.ref_frame for r in rows],
            "motion": [r.motion for r in rows],
            "detections": [
                None if (r.skipped or r.frame is None) else [d.to_dict() for d in r.result.detections]
                for r in rows
            ],
            "error": [r.result.error for r in rows],
            "model_sha256": [model_sha256] * n,
            "engine": [engine] * n,
            "precision": [precision] * n,
        },
        schema=VIDEO_RESULT_SCHEMA,
    )


def table_to_frame_results(table: pa.Table) -> list[FrameResult]:
    """Inverse of :func:`frame_results_to_table`."""
    out = []
    cols = ["uri", "segment", "frame", "pts", "pts_s", "width", "height", "skipped", "ref_frame",
            "motion", "detections", "error"]
    for row in table.select(cols).to_pylist():
        dets = [Detection(**d) for d in (row["detections"] or [])]
        res = ImageResult(
            uri=row["uri"], width=row["width"], height=row["height"], detections=dets, error=row["error"]
        )
        out.append(
            FrameResult(
                result=res,
                segment=row["segment"],
                frame=row["frame"],
                pts=row["pts"],
                pts_s=row["pts_s"],
                skipped=bool(row["skipped"]),
                ref_frame=row["ref_frame"],
                motion=row["motion"],
            )
        )
    return out
