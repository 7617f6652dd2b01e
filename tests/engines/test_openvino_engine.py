"""The OpenVINO CPU engine against ONNX Runtime (the reference) on the same tensors: raw head
output within FP32 tolerance, the same detections through ``Detector.detect``, batches split
over the async infer-request queue, and clear errors for precisions it cannot run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from raydetect.config import DetectorConfig  # noqa: E402
from raydetect.detector import Detector  # noqa: E402
from raydetect.engines import EngineUnavailableError, create_engine  # noqa: E402
from raydetect.model_card import ModelCard, batching_check_input  # noqa: E402
from raydetect.stages.preprocess import decode_image, letterbox, to_tensor  # noqa: E402
from tests.conftest import DEFECTS, MODELS, photo_paths  # noqa: E402

TRAINED = MODELS / "yolov8n-defects.onnx"
DYNAMIC = MODELS / "yolov8n-dynamic-random.onnx"


def engines(model):
    card = ModelCard.load(str(model))
    ov = create_engine(card, DetectorConfig(model=str(model), engine="openvino"))
    ort = create_engine(card, DetectorConfig(model=str(model), engine="onnxruntime"))
    return card, ov, ort


def real_batch(card, n):
    files = (photo_paths()[:2] + sorted((DEFECTS / "images" / "test").iterdir())[:8])[:n]
    h, w = card.imgsz
    return to_tensor([letterbox(decode_image(f.read_bytes(), 10**9, 10**9), h, w)[0] for f in files])


@pytest.mark.parametrize("model", [TRAINED, DYNAMIC], ids=["defects-static", "random-dynamic"])
def test_raw_output_matches_onnxruntime(data_dir, model):
    card, ov, ort = engines(model)
    assert ov.requests >= 1 and ov.precision == "fp32"
    for x in (real_batch(card, 5), batching_check_input(card.imgsz, n=3), real_batch(card, 1)):
        a, b = ov.infer(x), ort.infer(x)
        assert a.shape == b.shape and a.dtype == np.float32
        # boxes (rows 0-3, model-input pixels) and class scores (rows 4+, in [0, 1]) apart
        assert np.abs(a[:, :4] - b[:, :4]).max() < 1e-2, np.abs(a[:, :4] - b[:, :4]).max()
        assert np.abs(a[:, 4:] - b[:, 4:]).max() < 1e-4, np.abs(a[:, 4:] - b[:, 4:]).max()
    # the split over infer requests keeps the images in order
    x = real_batch(card, 4)
    whole = ov.infer(x)
    for i in range(4):
        np.testing.assert_allclose(ov.infer(x[i : i + 1])[0], whole[i], atol=1e-2, rtol=1e-4)


def test_detections_match_onnxruntime(data_dir):
    files = sorted((DEFECTS / "images" / "test").iterdir())[:12]
    imgs = [f.read_bytes() for f in files] + [b"not an image"]
    rows = {e: Detector({"model": str(TRAINED), "engine": e, "batch_size": 8}).detect(imgs)
            for e in ("openvino", "onnxruntime")}
    ov, ort = rows["openvino"], rows["onnxruntime"]
    assert ov[-1].error and ort[-1].error
    found = 0
    for a, b in zip(ov[:-1], ort[:-1], strict=True):
        assert a.error is None and [d.class_id for d in a.detections] == [d.class_id for d in b.detections]
        for da, db in zip(a.detections, b.detections, strict=True):
            assert abs(da.score - db.score) < 1e-4
            np.testing.assert_allclose([da.x1, da.y1, da.x2, da.y2], [db.x1, db.y1, db.x2, db.y2], atol=0.05)
        found += len(a.detections)
    assert found > 0


def test_info_and_precision_errors(data_dir):
    det = Detector({"model": str(TRAINED), "engine": "openvino"})
    info = det.info()
    assert info["engine"] == "openvino" and info["streams"] >= 1 and info["infer_requests"] >= 1
    card = ModelCard.load(str(TRAINED))
    with pytest.raises(EngineUnavailableError, match="INT8"):
        create_engine(card, DetectorConfig(model=str(TRAINED), engine="openvino", precision="int8"))
    with pytest.raises(EngineUnavailableError, match="fp16"):
        create_engine(card, DetectorConfig(model=str(TRAINED), engine="openvino", precision="fp16"))
