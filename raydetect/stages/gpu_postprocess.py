"""Decode raw YOLO head outputs and run class-aware NMS on the GPU, for a whole batch.

Same semantics as :func:`raydetect.stages.postprocess.postprocess` (Ultralytics'): score > conf, best
class per anchor (YOLOv5: objectness > conf first, score = objectness × class score), at most
``max_nms`` highest-scoring candidates per image, class-aware greedy NMS (IoU > iou
suppresses), at most ``max_det`` per image. The kernel is ``torchvision.ops.nms`` with the
coordinate-offset trick that ``torchvision.ops.batched_nms`` uses, applied here with the CPU
path's offsets (class × 7680, as Ultralytics) plus an offset per image, so a batch of images is
suppressed in a few launches and never across classes or images. Results come back to the host
in one copy per batch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torchvision

from raydetect.stages.postprocess import MAX_NMS, MAX_WH, HeadLayout

log = logging.getLogger(__name__)

#: Candidates per NMS launch (its IoU mask is quadratic in the count).
NMS_CHUNK = 30_000

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _xywh2xyxy(b: torch.Tensor) -> torch.Tensor:
    half = b[:, 2:4] / 2
    return torch.cat([b[:, :2] - half, b[:, :2] + half], dim=1)


#: per device type: whether ``torch.nonzero_static`` runs there (torch >= 2.4 has it, but not on
#: every device in every build); decided at the first call, so later calls catch nothing
_NONZERO_STATIC: dict[str, bool] = {}


def _nonzero(mask: torch.Tensor, total: int) -> torch.Tensor:
    """``mask.nonzero()`` when the count is known: ``nonzero_static`` needs no synchronisation
    to size its output (plain ``nonzero`` on a device where it does not run)."""
    kind = mask.device.type
    if _NONZERO_STATIC.get(kind) is None:
        try:
            out = torch.nonzero_static(mask, size=total)
        except (NotImplementedError, RuntimeError) as e:  # no kernel for this device
            log.warning("torch.nonzero_static does not run on %s (%s): NMS uses nonzero, one more "
                        "synchronisation per chunk", kind, e)
            _NONZERO_STATIC[kind] = False
        else:
            _NONZERO_STATIC[kind] = True
            return out
    return torch.nonzero_static(mask, size=total) if _NONZERO_STATIC[kind] else mask.nonzero()


def _candidates(pred: torch.Tensor, layout: HeadLayout, conf: float):
    """(image index, boxes xyxy, scores, class ids) of every anchor with score > conf, and the
    number per image (a host list: the one synchronisation before NMS)."""
    pred = pred.to(torch.float32)
    if layout == "yolov8":
        p = pred.transpose(1, 2)  # [B, N, 4 + nc]
        scores, cls = p[..., 4:].max(dim=-1)
        mask = scores > conf
    elif layout == "yolov5":
        p = pred  # [B, N, 5 + nc]
        scores, cls = (p[..., 5:] * p[..., 4:5]).max(dim=-1)
        mask = (p[..., 4] > conf) & (scores > conf)
    else:
        raise ValueError(f"unknown head layout {layout!r}")
    counts = mask.sum(dim=1).tolist()
    nz = _nonzero(mask, sum(counts))  # row-major: grouped by image, anchors ascending
    img, anchor = nz[:, 0], nz[:, 1]
    boxes = _xywh2xyxy(p[img, anchor, :4])
    return img, boxes, scores[img, anchor], cls[img, anchor], counts


def batched_postprocess(
    pred: torch.Tensor,
    layout: HeadLayout,
    conf: float,
    iou: float,
    max_det: int,
    max_nms: int = MAX_NMS,
) -> list[Rows]:
    """Raw head output ``[B, ...]`` (on any device) → per image (boxes xyxy [k, 4] float32,
    scores [k] float32, class ids [k] int64) on the host, letterboxed model coordinates."""
    b = int(pred.shape[0])
    img, boxes, scores, cls, counts = _candidates(pred, layout, conf)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    if max(counts, default=0) > max_nms:  # rare: keep each image's max_nms best (stable, as CPU)
        keep_parts = []
        for i in range(b):
            s, e = int(starts[i]), int(starts[i + 1])
            idx = torch.arange(s, e, device=scores.device)
            if e - s > max_nms:
                order = torch.sort(scores[s:e], descending=True, stable=True).indices[:max_nms]
                idx = idx[order.sort().values]
            keep_parts.append(idx)
        sel = torch.cat(keep_parts)
        img, boxes, scores, cls = img[sel], boxes[sel], scores[sel], cls[sel]
        counts = [min(c, max_nms) for c in counts]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    if len(scores) == 0:
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        return [empty for _ in range(b)]

    # Offsets: class × MAX_WH in float32 exactly like the CPU path, then one image offset in
    # float64 (exact), so no box meets a box of another class or image.
    cls_off = boxes + cls.to(torch.float32)[:, None] * MAX_WH
    # the class count from the head's shape, not cls.max() (a device-to-host synchronisation)
    nc = int(pred.shape[1]) - 4 if layout == "yolov8" else int(pred.shape[2]) - 5
    img_span = (max(nc, 1) + 1.0) * MAX_WH
    off = cls_off.to(torch.float64) + img.to(torch.float64)[:, None] * img_span
    sc64 = scores.to(torch.float64)

    kept = []
    i = 0
    while i < b:  # images in chunks of at most NMS_CHUNK candidates (at least one image)
        j = i + 1
        while j < b and starts[j + 1] - starts[i] <= NMS_CHUNK:
            j += 1
        s, e = int(starts[i]), int(starts[j])
        if e > s:
            kept.append(torchvision.ops.nms(off[s:e], sc64[s:e], iou) + s)
        i = j
    keep = torch.cat(kept)
    # Group by image, keeping NMS's score order inside each image, then cut at max_det.
    k_img = img[keep]
    order = torch.sort(k_img, stable=True).indices
    keep, k_img = keep[order], k_img[order]
    # kept boxes per image by scatter_add (torch.bincount waits for the GPU to size its output)
    per_img = torch.zeros(b, dtype=torch.long, device=keep.device).scatter_add_(0, k_img, torch.ones_like(k_img))
    first = torch.zeros(b + 1, dtype=torch.long, device=keep.device)
    first[1:] = torch.cumsum(per_img, 0)
    rank = torch.arange(len(keep), device=keep.device) - first[k_img]
    packed = torch.cat(
        [boxes[keep], scores[keep, None], cls[keep, None].to(torch.float32), img[keep, None].to(torch.float32),
         rank[:, None].to(torch.float32)],
        dim=1,
    ).cpu().numpy()  # the one device→host copy of results
    # the max_det cut on the host: a boolean index on the device would wait for the GPU once more
    packed = packed[packed[:, 7] < max_det]
    bounds = np.searchsorted(packed[:, 6], np.arange(b + 1) - 0.5)
    out: list[Rows] = []
    for i in range(b):
        r = packed[bounds[i] : bounds[i + 1]]
        out.append((np.ascontiguousarray(r[:, :4]), np.ascontiguousarray(r[:, 4]), r[:, 5].astype(np.int64)))
    return out
