"""Decoding of the TensorRT engine's NMS outputs into :class:`NMSOutput`, and the padding of
partial batches (pure NumPy; the engine does only the device-side gathers).

* EfficientNMS_TRT returns fixed-size per-image results: ``num [B, 1]``, ``boxes [B, K, 4]``
  (always corner format), ``scores [B, K]``, ``classes [B, K]``.
* INMSLayer returns ``selected [n, 3]`` rows (batch, class, box index), sorted by batch and
  by decreasing score within a batch, plus a count; the engine gathers each row's box and
  score on the GPU and :func:`pack_selected` groups them per image.
"""

from __future__ import annotations

import numpy as np

from raydetect.engines.base import NMSOutput


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get their own CUDA graph: powers of two up to ``max_batch``, and
    ``max_batch`` itself (a partial batch is padded up to the next bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


def padded_batch_size(n: int, max_batch: int, buckets: list[int] | None = None) -> int:
    """The batch size to run ``n`` images at: ``n`` itself without buckets (dynamic shapes),
    else the smallest bucket >= n."""
    if not 1 <= n <= max_batch:
        raise ValueError(f"batch of {n} images; the engine takes 1..{max_batch}")
    if not buckets:
        return n
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"no bucket holds {n} images (buckets {buckets})")


def pad_rows(x: np.ndarray, target: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``target`` rows (``x`` itself if already there)."""
    n = x.shape[0]
    if n > target:
        raise ValueError(f"{n} rows do not fit in {target}")
    if n == target:
        return x
    pad = np.zeros((target - n, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


def drop_padding(out: NMSOutput, n: int) -> NMSOutput:
    """The results of the first ``n`` (real) images of a padded batch."""
    if n > len(out):
        raise ValueError(f"asked for {n} images of a batch of {len(out)}")
    if n == len(out):
        return out
    return NMSOutput(out.num[:n], out.boxes[:n], out.scores[:n], out.classes[:n])


def decode_efficient_nms(
    num: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> NMSOutput:
    """EfficientNMS_TRT outputs (``num_detections [B, 1]`` int32, ...) → NMSOutput."""
    b = boxes.shape[0]
    k = boxes.shape[1]
    n = np.asarray(num).reshape(b).astype(np.int64).clip(0, k)
    return NMSOutput(
        num=n,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(b, k, 4),
        scores=np.asarray(scores, dtype=np.float32).reshape(b, k),
        classes=np.asarray(classes).reshape(b, k).astype(np.int64),
    )


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    out = np.empty(b.shape, dtype=np.float32)
    half_w, half_h = b[..., 2] / 2, b[..., 3] / 2
    out[..., 0] = b[..., 0] - half_w
    out[..., 1] = b[..., 1] - half_h
    out[..., 2] = b[..., 0] + half_w
    out[..., 3] = b[..., 1] + half_h
    return out


def pack_selected(
    batch_idx: np.ndarray,
    class_idx: np.ndarray,
    boxes_cxcywh: np.ndarray,
    scores: np.ndarray,
    batch_size: int,
    max_det: int,
) -> NMSOutput:
    """INMSLayer rows (already gathered: each row's batch index, class, cx/cy/w/h box and
    score) → per-image results, highest score first, at most ``max_det`` per image.

    TensorRT documents the rows as sorted by batch and then by decreasing score; the rows are
    re-sorted here anyway (stable, so equal scores keep TensorRT's order)."""
    batch_idx = np.asarray(batch_idx).astype(np.int64).reshape(-1)
    class_idx = np.asarray(class_idx).astype(np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    boxes = np.asarray(boxes_cxcywh, dtype=np.float32).reshape(-1, 4)
    n = batch_idx.shape[0]
    if not (class_idx.shape[0] == scores.shape[0] == boxes.shape[0] == n):
        raise ValueError(
            f"selected rows disagree: {n} batch indices, {class_idx.shape[0]} classes, "
            f"{boxes.shape[0]} boxes, {scores.shape[0]} scores"
        )
    if n and (batch_idx.min() < 0 or batch_idx.max() >= batch_size):
        raise ValueError(f"batch index out of range 0..{batch_size - 1}: {batch_idx.min()}..{batch_idx.max()}")
    out_num = np.zeros(batch_size, dtype=np.int64)
    out_boxes = np.zeros((batch_size, max_det, 4), dtype=np.float32)
    out_scores = np.zeros((batch_size, max_det), dtype=np.float32)
    out_classes = np.zeros((batch_size, max_det), dtype=np.int64)
    # by batch, then by decreasing score; lexsort is stable
    order = np.lexsort((-scores, batch_idx))
    xyxy = cxcywh_to_xyxy(boxes[order])
    b_sorted, s_sorted, c_sorted = batch_idx[order], scores[order], class_idx[order]
    starts = np.searchsorted(b_sorted, np.arange(batch_size), side="left")
    ends = np.searchsorted(b_sorted, np.arange(batch_size), side="right")
    for i in range(batch_size):
        lo, hi = int(starts[i]), min(int(ends[i]), int(starts[i]) + max_det)
        k = hi - lo
        out_num[i] = k
        out_boxes[i, :k] = xyxy[lo:hi]
        out_scores[i, :k] = s_sorted[lo:hi]
        out_classes[i, :k] = c_sorted[lo:hi]
    return NMSOutput(out_num, out_boxes, out_scores, out_classes)
