"""The Detector against a direct ONNX Runtime run + the independent reference decode/NMS."""

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from raydetect.detector import Detector
from raydetect.stages.preprocess import letterbox, to_tensor
from tests.conftest import DEFECTS, MODELS, photo_paths
from tests.reference import as_tuples, assert_same_detections, reference_detections


def direct_reference(model_path, img_bytes, conf, iou, max_det=300):
    """Static-batch model straight from disk, on the letterboxed tensor, reference decode."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    img = cv2.imdecode(np.frombuffer(img_bytes, np.uint8), cv2.IMREAD_COLOR)
    boxed, _ = letterbox(img, 640, 640)
    pred = sess.run(None, {"images": to_tensor([boxed])})[0][0]
    return reference_detections(pred, conf, iou, max_det, img.shape[0], img.shape[1])


@pytest.fixture(scope="module")
def random_detector():
    return Detector({"model": str(MODELS / "yolov8n-random.onnx"), "conf": 1e-4, "batch_size": 4})


def test_random_model_matches_reference(random_detector):
    paths = photo_paths()
    blobs = [p.read_bytes() for p in paths]
    results = random_detector.detect(blobs, [str(p) for p in paths])
    total = 0
    for blob, res in zip(blobs, results, strict=True):
        h, w = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert res.error is None and (res.width, res.height) == (w, h)
        ref = direct_reference(MODELS / "yolov8n-random.onnx", blob, 1e-4, 0.7)
        assert_same_detections(as_tuples(res.detections), ref)
        total += len(ref)
    assert total > 100  # the random model does give boxes at conf=1e-4


def test_trained_model_matches_reference():
    det = Detector({"model": str(MODELS / "yolov8n-defects.onnx"), "conf": 0.001, "iou": 0.6})
    paths = sorted((DEFECTS / "images" / "test").glob("*.jpg"))[:6]
    blobs = [p.read_bytes() for p in paths]
    for blob, res in zip(blobs, det.detect(blobs), strict=True):
        ref = direct_reference(MODELS / "yolov8n-defects.onnx", blob, 0.001, 0.6)
        assert len(ref) >= 1
        assert_same_detections(as_tuples(res.detections), ref)
        assert {d.class_name for d in res.detections} <= set(det.names.values())


def test_alone_vs_inside_batch_of_16(random_detector):
    defects = sorted((DEFECTS / "images" / "test").glob("*.jpg"))[:9]
    blobs = [p.read_bytes() for p in photo_paths() + defects]
    assert len(blobs) == 16
    det16 = Detector({"model": str(MODELS / "yolov8n-random.onnx"), "conf": 1e-4, "batch_size": 16})
    batched, timings = det16.detect_timed(blobs)
    assert timings.batches == 1 and timings.images == 16 and timings.decoders == {"cpu": 16}
    assert batched[0].speed is not None and set(batched[0].speed) == {"preprocess", "inference", "postprocess"}
    for i in (0, 6, 15):
        alone = det16.detect([blobs[i]])[0]
        assert_same_detections(as_tuples(batched[i].detections), as_tuples(alone.detections))


def test_arrays_and_bad_inputs_in_one_batch(random_detector):
    good = photo_paths()[0].read_bytes()
    arr = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    res = random_detector.detect([good, b"", arr, b"not an image", good[: len(good) // 2]])
    assert [r.error is None for r in res] == [True, False, True, False, False]
    assert as_tuples(res[0].detections) == as_tuples(res[2].detections)
    assert res[1].error == "empty file"
    assert "truncated JPEG" in res[4].error


def test_per_call_thresholds(random_detector):
    blob = photo_paths()[1].read_bytes()
    assert random_detector.detect([blob], conf=0.5)[0].detections == []
    assert len(random_detector.detect([blob], max_det=5)[0].detections) == 5


def test_info_names_engine():
    det = Detector({"model": str(MODELS / "yolov8n-defects.onnx"), "threads": 1})
    info = det.info()
    assert info["engine"] == "onnxruntime" and info["precision"] == "fp32" and info["threads"] == 1
    assert info["batching_verified"] is True
