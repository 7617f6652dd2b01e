"""Decode + NMS on hand-built prediction tensors with known answers."""

import numpy as np
import pytest

from raydetect.stages.postprocess import candidates, nms, postprocess


def v8_pred(rows, nc=3, n_pad=5):
    """rows: (cx, cy, w, h, class_id, score) → [4+nc, N] with N = len(rows) + n_pad."""
    n = len(rows) + n_pad
    p = np.zeros((4 + nc, n), dtype=np.float32)
    p[:4, len(rows):] = [[10], [10], [4], [4]]  # padding anchors with zero scores
    for j, (cx, cy, w, h, c, s) in enumerate(rows):
        p[:4, j] = [cx, cy, w, h]
        p[4 + c, j] = s
    return p


def test_v8_decode_and_class_aware_nms():
    rows = [
        (100, 100, 50, 50, 0, 0.9),  # A
        (105, 100, 50, 50, 0, 0.8),  # overlaps A (IoU 0.82) same class → suppressed
        (105, 100, 50, 50, 1, 0.7),  # same place, other class → kept
        (300, 300, 20, 40, 2, 0.6),  # alone → kept
        (500, 500, 10, 10, 0, 0.2),  # below conf → dropped
    ]
    boxes, scores, cls = postprocess(v8_pred(rows), "yolov8", conf=0.25, iou=0.7, max_det=300)
    assert cls.tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(
        boxes, [[75, 75, 125, 125], [80, 75, 130, 125], [290, 280, 310, 320]], atol=1e-4
    )


def test_iou_threshold_is_strict_and_max_det_truncates():
    # Two boxes with IoU exactly 0.5: width 40 overlap 2/3 → IoU = (40*?)... build explicitly.
    # Box A [0,0,30,10] area 300; box B [10,0,40,10] area 300; inter 200; union 400 → IoU 0.5
    rows = [(15, 5, 30, 10, 0, 0.9), (25, 5, 30, 10, 0, 0.8)]
    _, s, _ = postprocess(v8_pred(rows), "yolov8", conf=0.1, iou=0.5, max_det=10)
    assert len(s) == 2  # IoU == threshold is not "> iou": both kept
    _, s, _ = postprocess(v8_pred(rows), "yolov8", conf=0.1, iou=0.49, max_det=10)
    assert len(s) == 1
    many = [(i * 100 + 50, 50, 20, 20, 0, 0.5 + i * 0.01) for i in range(10)]
    _, s, _ = postprocess(v8_pred(many), "yolov8", conf=0.1, iou=0.5, max_det=3)
    np.testing.assert_allclose(s, [0.59, 0.58, 0.57], rtol=1e-6)


def test_v5_layout_uses_objectness_times_class():
    nc = 2
    p = np.zeros((4, 5 + nc), dtype=np.float32)
    p[0] = [50, 50, 20, 20, 0.9, 0.1, 0.8]  # score 0.72 class 1
    p[1] = [52, 50, 20, 20, 0.5, 0.9, 0.1]  # score 0.45 class 0 (other class: kept)
    p[2] = [200, 200, 20, 20, 0.2, 1.0, 0.0]  # obj 0.2 < conf
    p[3] = [300, 300, 20, 20, 0.6, 0.3, 0.3]  # score 0.18 < conf
    boxes, scores, cls = postprocess(p, "yolov5", conf=0.25, iou=0.7, max_det=10)
    assert cls.tolist() == [1, 0]
    np.testing.assert_allclose(scores, [0.72, 0.45], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])


def test_candidates_empty_and_nms_empty():
    p = np.zeros((84, 100), dtype=np.float32)
    b, s, c = candidates(p, "yolov8", 0.25)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown head layout"):
        candidates(np.zeros((5, 5)), "yolox", 0.1)  # type: ignore[arg-type]
