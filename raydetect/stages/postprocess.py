"""Decode raw YOLO head outputs and run class-aware NMS (CPU, NumPy).

Two head layouts are supported, both as exported by their projects:

* ``yolov8`` (Ultralytics YOLOv8 / YOLO11 / …): ``[B, 4 + nc, N]``, rows cx, cy, w, h, then
  one score per class (already sigmoid-ed, no objectness);
* ``yolov5``: ``[B, N, 5 + nc]``, columns cx, cy, w, h, objectness, class scores; the
  score is objectness × class score.

Semantics follow Ultralytics' ``non_max_suppression``: a candidate needs score > conf,
at most ``max_nms`` candidates (highest scores) enter NMS, boxes of different classes
never suppress each other, a box is suppressed when its IoU with a kept box is > iou.
"""

from __future__ import annotations

import numpy as np

from raydetect.types import HeadLayout, NMSOutput

MAX_WH = 7680.0  # class offset for class-aware NMS (as Ultralytics)
MAX_NMS = 30000


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    out = np.empty_like(b)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    out[:, 0] = b[:, 0] - half_w
    out[:, 1] = b[:, 1] - half_h
    out[:, 2] = b[:, 0] + half_w
    out[:, 3] = b[:, 1] + half_h
    return out


def candidates(
    pred: np.ndarray, layout: HeadLayout, conf: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw head output → (boxes xyxy [k, 4], scores [k], class ids [k]) with
    score > conf, best class per anchor."""
    if layout == "yolov8":
        p = pred.T  # [N, 4 + nc]
        cls = p[:, 4:]
        class_ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(cls)), class_ids]
    elif layout == "yolov5":
        p = pred  # [N, 5 + nc]
        obj = p[:, 4]
        p = p[obj > conf]
        cls = p[:, 5:] * p[:, 4:5]
        class_ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(cls)), class_ids]
    else:
        raise ValueError(f"unknown head layout {layout!r}")
    keep = scores > conf
    boxes = xywh2xyxy(p[keep, :4].astype(np.float32, copy=False))
    return boxes, scores[keep].astype(np.float32, copy=False), class_ids[keep].astype(np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS; returns indices of kept boxes, highest score first."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        ious = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(ious > iou)]  # NaN IoU (degenerate boxes) keeps the box
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    pred: np.ndarray,
    layout: HeadLayout,
    conf: float,
    iou: float,
    max_det: int,
    max_nms: int = MAX_NMS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates + class-aware NMS for one image, in letterboxed model coordinates."""
    boxes, scores, class_ids = candidates(pred, layout, conf)
    if len(scores) > max_nms:
        top = np.argsort(-scores, kind="stable")[:max_nms]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    offset = class_ids.astype(np.float32)[:, None] * np.float32(MAX_WH)
    keep = nms(boxes + offset, scores, iou, max_keep=max_det)
    return boxes[keep], scores[keep], class_ids[keep]


def nms_output_rows(
    out: NMSOutput, i: int, conf: float, max_det: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``i`` of an engine's in-network NMS result → (boxes xyxy [k, 4] float32, scores
    [k] float32, class ids [k] int64) in letterboxed model coordinates, like
    :func:`postprocess`: score > conf, highest first, at most ``max_det``.

    Filtering by a higher ``conf`` or cutting to a smaller ``max_det`` after NMS gives exactly
    what NMS with those settings gives (a box is only ever suppressed by a higher-scoring one)."""
    n = int(out.num[i])
    k = out.boxes.shape[1]
    if not 0 <= n <= k:
        raise ValueError(f"image {i}: {n} detections reported but the engine returns at most {k}")
    boxes = np.asarray(out.boxes[i, :n], dtype=np.float32)
    scores = np.asarray(out.scores[i, :n], dtype=np.float32)
    classes = np.asarray(out.classes[i, :n]).astype(np.int64)
    keep = scores > conf
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")[:max_det]
    return boxes[order], scores[order], classes[order]


def nms_outputs_close(
    a: NMSOutput, i: int, b: NMSOutput, j: int, atol: float = 0.5, rtol: float = 1e-3
) -> bool:
    """Whether image ``i`` of ``a`` and image ``j`` of ``b`` hold the same detections
    (same count and classes, boxes within ``atol`` pixels, scores within ``rtol``)."""
    if int(a.num[i]) != int(b.num[j]):
        return False
    n = int(a.num[i])
    if not np.array_equal(np.asarray(a.classes[i, :n]), np.asarray(b.classes[j, :n])):
        return False
    if not np.allclose(a.boxes[i, :n], b.boxes[j, :n], atol=atol, rtol=0):
        return False
    return bool(np.allclose(a.scores[i, :n], b.scores[j, :n], rtol=rtol, atol=1e-6))
