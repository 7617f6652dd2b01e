"""An independent reference decode + NMS, written plainly (loops, no shared code with
raydetect.stages.postprocess), used to check the production path."""

from __future__ import annotations

import numpy as np


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_detections(pred_v8: np.ndarray, conf: float, iou_thr: float, max_det: int,
                         orig_h: int, orig_w: int, size: int = 640):
    """pred_v8: one image's [4+nc, N] output. Returns [(x1, y1, x2, y2, score, cls)] in
    original pixels, highest score first (ties: lower anchor index first)."""
    cands = []
    n = pred_v8.shape[1]
    for j in range(n):
        col = pred_v8[:, j].astype(np.float64)
        cls_scores = col[4:]
        c = int(np.argmax(cls_scores))
        s = float(pred_v8[4 + c, j])
        if s > conf:
            cx, cy, w, h = col[:4]
            cands.append((s, j, c, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    cands.sort(key=lambda t: (-t[0], t[1]))
    kept = []
    for s, _j, c, box in cands:
        if all(not (kc == c and iou(box, kb) > iou_thr) for _, _, kc, kb in kept):
            kept.append((s, _j, c, box))
        if len(kept) == max_det:
            break
    # letterbox geometry, re-derived: scale to fit, centre, padding rounded as Ultralytics, one
    # gain per axis from the rounded resize (Ultralytics >= 8.4 scale_boxes)
    r = min(size / orig_h, size / orig_w)
    new_w, new_h = round(orig_w * r), round(orig_h * r)
    pad_x = round((size - new_w) / 2 - 0.1)
    pad_y = round((size - new_h) / 2 - 0.1)
    gx, gy = new_w / orig_w, new_h / orig_h
    out = []
    for s, _, c, (x1, y1, x2, y2) in kept:
        bx = [(x1 - pad_x) / gx, (y1 - pad_y) / gy, (x2 - pad_x) / gx, (y2 - pad_y) / gy]
        bx = [min(max(bx[0], 0), orig_w), min(max(bx[1], 0), orig_h),
              min(max(bx[2], 0), orig_w), min(max(bx[3], 0), orig_h)]
        out.append((*bx, s, c))
    return out


def as_tuples(dets) -> list[tuple]:
    """raydetect Detections → the reference's tuple form."""
    return [(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id) for d in dets]


def assert_same_detections(got: list[tuple], ref: list[tuple], box_tol: float = 1e-3) -> None:
    assert len(got) == len(ref), f"{len(got)} detections vs {len(ref)} in the reference"
    key = lambda t: (-round(t[4], 7), t[5], round(t[0], 2), round(t[1], 2))  # noqa: E731
    for g, r in zip(sorted(got, key=key), sorted(ref, key=key), strict=True):
        assert g[5] == r[5], (g, r)
        assert abs(g[4] - r[4]) <= 1e-6 * max(1.0, abs(r[4])), (g, r)
        assert max(abs(a - b) for a, b in zip(g[:4], r[:4], strict=True)) <= box_tol, (g, r)
