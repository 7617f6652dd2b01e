"""The one result type of raydetect: a detection, and the result for one image.

Every path (batch job, online endpoint, evaluation) produces :class:`ImageResult`
objects and converts them to Parquet rows / JSON with the helpers here, so the
output schema is defined exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


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
