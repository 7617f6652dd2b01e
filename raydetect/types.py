"""The one result type of raydetect: a detection, and the result for one image.

Every path (batch job, online endpoint, evaluation) produces :class:`ImageResult`
objects and converts them to Parquet rows / JSON with the helpers here, so the
output schema is defined exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

#: Raw head layouts raydetect decodes (see :mod:`raydetect.stages.postprocess`).
HeadLayout = Literal["yolov8", "yolov5"]

#: Why an image got no detections, set where the error is caught: ``input`` (bytes that are not
#: a supported, intact image), ``too_large`` (over a byte or pixel limit), ``engine`` (inference
#: or postprocessing failed: the server's side).
ErrorKind = Literal["input", "too_large", "engine"]
#: The HTTP status of each kind (the online endpoint).
ERROR_STATUS: dict[str, int] = {"input": 400, "too_large": 413, "engine": 500}


@dataclass(frozen=True)
class NMSOutput:
    """Final detections of a batch from an engine that runs NMS inside its network
    (``Engine.nms_in_engine``). Host NumPy arrays (they are small: ``B x K``):

    * ``num`` ``[B]`` int64: valid rows per image (the first ``num[i]`` rows of image ``i``);
    * ``boxes`` ``[B, K, 4]`` float32: x1, y1, x2, y2 in letterboxed model-input pixels;
    * ``scores`` ``[B, K]`` float32, highest first within an image;
    * ``classes`` ``[B, K]`` int64 class ids.

    Rows past ``num[i]`` are padding. The detector maps rows to detections with
    :func:`raydetect.stages.postprocess.nms_output_rows` (no NMS of its own).
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


class DetectionArray(Sequence):
    """The detections of one image as arrays (boxes ``[k, 4]`` float32 in original pixels,
    scores ``[k]`` float32, class ids ``[k]`` int64) behind the ``list[Detection]`` interface:
    a :class:`Detection` is made only when one is read, and :func:`results_to_table` builds the
    Arrow columns straight from the arrays (no Python object per box on the hot path).
    Compares equal to the list of the same detections."""

    __slots__ = ("boxes", "scores", "classes", "names")

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, names: dict[int, str]) -> None:
        self.boxes = boxes
        self.scores = scores
        self.classes = classes
        self.names = names

    @classmethod
    def from_rows(cls, boxes, scores, classes, names: dict[int, str]) -> DetectionArray:
        return cls(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(scores, dtype=np.float32),
                   np.asarray(classes, dtype=np.int64), names)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def _one(self, i: int) -> Detection:
        b, c = self.boxes[i], int(self.classes[i])
        return Detection(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(self.scores[i]), c,
                         self.names.get(c, str(c)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(k) for k in range(len(self))[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._one(i % n)

    def __iter__(self):
        return (self._one(i) for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, DetectionArray)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DetectionArray({list(self)!r})"

    def class_names(self) -> list[str]:
        return [self.names.get(int(c), str(int(c))) for c in self.classes]


@dataclass(slots=True)
class ImageResult:
    """Detections for one input image (or video frame), or the error that prevented them
    (``error``, and its :data:`ErrorKind` in ``error_kind``).
    ``speed``: milliseconds per image by stage of the call that made it (preprocess,
    inference, postprocess), as Ultralytics' ``Results.speed``; neither is part of the rows."""

    uri: str
    width: int | None = None
    height: int | None = None
    detections: list[Detection] | DetectionArray = field(default_factory=list)
    error: str | None = None
    speed: dict[str, float] | None = None
    error_kind: ErrorKind | None = None

    def fail(self, message: str, kind: ErrorKind) -> None:
        self.error, self.error_kind = message, kind
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


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a row, a response or a video summary: the ONNX export's sha256 and
    where it was read from, and the engine and precision that ran it. Rows carry
    ``model_sha256``/``engine``/``precision`` (:meth:`columns`), Serve's ``/v1/model`` and the
    archive path the whole record, the job's manifest the sha256."""

    sha256: str
    url: str = ""
    engine: str | None = None
    precision: str = "fp32"

    def columns(self) -> dict[str, str | None]:
        """The identity columns of result rows (:data:`RESULT_SCHEMA`, video schemas)."""
        return {"model_sha256": self.sha256, "engine": self.engine, "precision": self.precision}

    def as_dict(self) -> dict[str, str | None]:
        return {"sha256": self.sha256, "url": self.url, "engine": self.engine, "precision": self.precision}


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


def _class_names(present: list[DetectionArray], classes: np.ndarray) -> pa.Array:
    """The ``name`` values of the concatenated ``classes`` of ``present``: one lookup of a
    table of the class names when they share one names dict (one model), no string per box."""
    present = [d for d in present if len(d)]
    names = present[0].names if present else {}
    top = int(classes.max()) if len(classes) else -1
    if top > 65535 or (len(classes) and classes.min() < 0) or any(d.names is not names for d in present):
        return pa.array([n for d in present for n in d.class_names()], type=pa.string())
    table = pa.array([names.get(i, str(i)) for i in range(top + 1)], type=pa.string())
    return table.take(pa.array(classes))


def detections_column(dets: list[list[Detection] | DetectionArray | None]) -> pa.Array:
    """The ``detections`` column (list of :data:`DETECTION_STRUCT`, null where ``None``): from
    the arrays when every entry is a :class:`DetectionArray` (or None), else from dicts."""
    if not all(d is None or isinstance(d, DetectionArray) for d in dets):
        return pa.array([None if d is None else [x.to_dict() for x in d] for d in dets],
                        type=pa.list_(DETECTION_STRUCT))
    present = [d for d in dets if d is not None]
    counts = np.array([0 if d is None else len(d) for d in dets], dtype=np.int32)
    offsets = np.zeros(len(dets) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    if present:
        boxes = np.concatenate([d.boxes for d in present]).astype(np.float32, copy=False)
        scores = np.concatenate([d.scores for d in present]).astype(np.float32, copy=False)
        classes = np.concatenate([d.classes for d in present])
        names = _class_names(present, classes)
    else:
        boxes, scores, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        names = pa.array([], type=pa.string())
    values = pa.StructArray.from_arrays(
        [pa.array(boxes[:, 0]), pa.array(boxes[:, 1]), pa.array(boxes[:, 2]), pa.array(boxes[:, 3]),
         pa.array(scores), pa.array(classes.astype(np.int32)), names],
        fields=list(DETECTION_STRUCT),
    )
    mask = pa.array([d is None for d in dets]) if any(d is None for d in dets) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask).cast(pa.list_(DETECTION_STRUCT))


def results_to_table(results: list[ImageResult], model: ModelIdentity) -> pa.Table:
    """Build the Parquet/Arrow table for ``results`` with :data:`RESULT_SCHEMA`."""
    n = len(results)
    return pa.Table.from_pydict(
        {
            "uri": [r.uri for r in results],
            "width": [r.width for r in results],
            "height": [r.height for r in results],
            "detections": detections_column([r.detections for r in results]),
            "error": [r.error for r in results],
            **{name: [value] * n for name, value in model.columns().items()},
        },
        schema=RESULT_SCHEMA,
    )


def error_rows(errors: dict[str, str], uri_prefix: str, model_sha256: str, precision: str) -> pa.Table:
    """Result rows for inputs no engine ran on (``engine`` is null): ``errors`` maps each
    input's path to its reason."""
    results = [ImageResult(uri=uri_prefix + p, error=reason) for p, reason in errors.items()]
    return results_to_table(results, ModelIdentity(sha256=model_sha256, precision=precision))


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
        ("decoder_reason", pa.string()),  # why not NVDEC (auto on a CPU actor, a fallback), or None
        ("error", pa.string()),
        ("model_sha256", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
    ]
)


def frame_results_to_table(rows: list[FrameResult], model: ModelIdentity) -> pa.Table:
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
            "detections": detections_column(
                [None if (r.skipped or r.frame is None) else r.result.detections for r in rows]
            ),
            "error": [r.result.error for r in rows],
            **{name: [value] * n for name, value in model.columns().items()},
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
