"""The TensorRT engine on a GPU: builds engines from the shared models, compares detections
with ONNX Runtime FP32, checks the engine cache is reused, partial batches, the CLI.

Skipped without TensorRT (``import tensorrt``) or without a CUDA GPU. NOT RUN in this
project so far: TensorRT cannot be installed on the machines it was developed on (its wheels
come only from NVIDIA's index), so these tests are written against the documented API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

trt = pytest.importorskip(
    "tensorrt",
    reason='TensorRT is not installed (pip install "raydetect[tensorrt]" --extra-index-url https://pypi.nvidia.com)',
)
torch = pytest.importorskip("torch", reason="PyTorch is needed for the TensorRT engine")

from raydetect.config import DetectorConfig  # noqa: E402
from raydetect.detector import Detector  # noqa: E402
from raydetect.model_card import ModelCard  # noqa: E402
from raydetect.tensorrt.build import prepare_engine  # noqa: E402
from raydetect.tensorrt.rules import probe_availability  # noqa: E402
from tests.conftest import MODELS, REPO, photo_paths  # noqa: E402

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch"),
]

DYN = MODELS / "yolov8n-dynamic-random.onnx"
TRAINED = MODELS / "yolov8n-defects.onnx"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    assert probe_availability() is None, probe_availability()
    return tmp_path_factory.mktemp("trt-engines")


def _iou(a, b) -> float:
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def matched_fraction(got, ref, min_score: float, min_iou: float, score_tol: float) -> float:
    """Share of ``ref`` detections with score >= min_score that ``got`` has (same class,
    IoU >= min_iou, score within score_tol)."""
    want = [d for d in ref if d.score >= min_score]
    if not want:
        return 1.0
    hits = 0
    for r in want:
        if any(g.class_id == r.class_id and abs(g.score - r.score) <= score_tol and _iou(g, r) >= min_iou for g in got):
            hits += 1
    return hits / len(want)


def test_build_then_cache_hit(cache_dir):
    cfg = DetectorConfig(
        model=str(DYN), engine="tensorrt", precision="fp32", batch_size=4, tensorrt={"cache": str(cache_dir)}
    )
    card = ModelCard.load(cfg.model)
    first = prepare_engine(card, cfg)
    assert first.result.status == "built" and first.result.build_seconds > 0
    stem = first.key.file_stem()
    side = json.loads((cache_dir / f"{stem}.json").read_text())
    assert side["key"] == first.key.fields() and side["engine_bytes"] > 1_000_000
    assert list(cache_dir.glob("timing_*.cache")), "the timing cache is kept next to the engines"
    t0 = time.perf_counter()
    second = prepare_engine(card, cfg)
    assert second.result.status == "hit" and time.perf_counter() - t0 < first.result.build_seconds
    summary = second.precision_summary()
    assert summary.get("fp32", 0) > 10, summary
    # a different batch profile is a different engine; its build reuses the timing cache
    other = prepare_engine(card, cfg.model_copy(update={"batch_size": 2}))
    assert other.result.status == "built" and other.key.file_stem() != stem
    assert other.result.meta["timing_cache_reused"] is True


@pytest.mark.parametrize("nms", ["inms", "efficient_nms"])
def test_fp32_detections_match_onnxruntime(cache_dir, nms):
    blobs = [p.read_bytes() for p in photo_paths()]
    common = {"model": str(TRAINED), "conf": 0.01, "iou": 0.7, "batch_size": 4}
    ref = Detector({**common, "engine": "onnxruntime"}).detect(blobs)
    det = Detector({**common, "engine": "tensorrt", "precision": "fp32", "tensorrt": {"cache": str(cache_dir), "nms": nms}})
    assert det.info()["nms"] == nms and det.batching_verified
    got = det.detect(blobs)
    n_ref = sum(len(r.detections) for r in ref)
    assert n_ref > 20
    for g, r in zip(got, ref, strict=True):
        assert g.error is None
        assert abs(len(g.detections) - len(r.detections)) <= max(2, len(r.detections) // 20)
        assert matched_fraction(g.detections, r.detections, 0.05, 0.95, 0.01) >= 0.95
        assert matched_fraction(r.detections, g.detections, 0.05, 0.95, 0.01) >= 0.95


def test_fp16_detections_close_to_onnxruntime(cache_dir):
    blobs = [p.read_bytes() for p in photo_paths()]
    common = {"model": str(TRAINED), "conf": 0.01, "iou": 0.7, "batch_size": 4}
    ref = Detector({**common, "engine": "onnxruntime"}).detect(blobs)
    det = Detector({**common, "engine": "tensorrt", "precision": "fp16", "tensorrt": {"cache": str(cache_dir)}})
    assert det.engine.precision == "fp16"
    got = det.detect(blobs)
    for g, r in zip(got, ref, strict=True):
        assert matched_fraction(g.detections, r.detections, 0.1, 0.9, 0.05) >= 0.9


def test_partial_batches_equal_single_images(cache_dir):
    """7 images at batch 4: a full batch and a partial one (padded to a CUDA-graph bucket with
    EfficientNMS) give what each image gives alone."""
    blobs = [p.read_bytes() for p in photo_paths()]
    det = Detector(
        {"model": str(TRAINED), "engine": "tensorrt", "conf": 0.01, "batch_size": 4,
         "tensorrt": {"cache": str(cache_dir), "nms": "efficient_nms"}}
    )
    batched = det.detect(blobs)
    for blob, b in zip(blobs, batched, strict=True):
        alone = det.detect([blob])[0]
        assert len(alone.detections) == len(b.detections)
        for x, y in zip(alone.detections, b.detections, strict=True):
            assert x.class_id == y.class_id and abs(x.score - y.score) < 1e-4
            assert np.allclose([x.x1, x.y1, x.x2, x.y2], [y.x1, y.y1, y.x2, y.y2], atol=0.05)


def test_per_call_thresholds_with_inms(cache_dir):
    """INMSLayer takes conf/IoU as engine inputs: another conf per call needs no rebuild."""
    blobs = [p.read_bytes() for p in photo_paths()[:3]]
    common = {"model": str(TRAINED), "conf": 0.01, "batch_size": 4}
    det = Detector({**common, "engine": "tensorrt", "tensorrt": {"cache": str(cache_dir), "nms": "inms"}})
    ref = Detector({**common, "engine": "onnxruntime"})
    for conf, iou in ((0.001, 0.5), (0.2, 0.7)):
        got, want = det.detect(blobs, conf=conf, iou=iou), ref.detect(blobs, conf=conf, iou=iou)
        for g, r in zip(got, want, strict=True):
            assert matched_fraction(g.detections, r.detections, max(conf, 0.05), 0.95, 0.01) >= 0.95


def test_raydetect_build_cli(tmp_path):
    cmd = [sys.executable, "-m", "raydetect.cli", "build", "--model", str(DYN), "--precision", "fp16",
           "--max-batch", "2", "--cache", str(tmp_path)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    assert "build time" in first.stdout and "layer precisions" in first.stdout and "fp16" in first.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "cache hit" in again.stdout
