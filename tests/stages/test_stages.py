"""The detector's stages (raydetect.stages.base): which preprocessor and postprocessor each engine gets
(TensorRT included, whose runtime cannot be installed here), array-backed detections and their
Arrow columns, and the compiled torch engine on the CPU (inductor's C++ backend: the same
compile, cache and fallback code as on CUDA, without the CUDA graphs)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from raydetect.config import ConfigError, DetectorConfig, TorchConfig, validate
from raydetect.detector import Detector
from raydetect.engines.onnxruntime import OnnxRuntimeEngine
from raydetect.engines.openvino import OpenVINOEngine
from raydetect.engines.tensorrt import TensorRTEngine
from raydetect.engines.torch import TorchEngine, compile_buckets, compile_mode
from raydetect.stages.base import CpuPreprocessor, EngineRows, NumpyNMS, choose_stages
from raydetect.types import (
    RESULT_SCHEMA,
    Detection,
    DetectionArray,
    ImageResult,
    ModelIdentity,
    detections_column,
    results_to_table,
)
from tests.conftest import MODELS, REPO, photo_paths

TRAINED = MODELS / "yolov8n-defects.onnx"


def test_stage_choice_follows_the_engine():
    """The GPU data path for every engine that takes device tensors, whatever its output: the
    TensorRT engine (NMS in the network) gets GPU decode and letterbox and keeps its own rows."""
    assert choose_stages(TensorRTEngine.input_kind, TensorRTEngine.nms_in_engine) == ("gpu", "engine")
    assert choose_stages(TorchEngine.input_kind, TorchEngine.nms_in_engine) == ("gpu", "torch")
    assert choose_stages(OnnxRuntimeEngine.input_kind, OnnxRuntimeEngine.nms_in_engine) == ("cpu", "numpy")
    assert choose_stages(OpenVINOEngine.input_kind, OpenVINOEngine.nms_in_engine) == ("cpu", "numpy")
    assert choose_stages("numpy", True) == ("cpu", "engine")


def test_detector_uses_public_stages():
    det = Detector({"model": str(TRAINED), "conf": 0.25, "batch_size": 4, "threads": 2})
    assert det.stages == ("cpu", "numpy") and det.gpu is None
    assert isinstance(det.preprocessor, CpuPreprocessor) and isinstance(det.postprocessor, NumpyNMS)
    assert det.info()["stages"] == {"preprocess": "cpu", "postprocess": "numpy", "image_decoder": "cpu"}
    blobs = [p.read_bytes() for p in photo_paths()]
    want, t = det.detect_timed(blobs + [b"not an image"])
    assert t.batches == 2 and t.images == 8 and t.decoders == {"cpu": 7}
    assert want[-1].error and want[0].speed == want[-1].speed
    # the same rows through the three public stages
    p = det.prepare(blobs[:4])
    n = len(p.rows)
    conf, iou, max_det = [0.25] * n, [0.7] * n, [300] * n
    rows = det.rows(det.infer(p, conf, iou, max_det), conf, iou, max_det)
    dets = det.to_detections(rows, p.geoms, [p.sizes[i] for i in p.rows])
    assert dets == [want[i].detections for i in p.rows] and len(dets) == n


def test_error_kinds_are_set_where_the_error_is_caught():
    """input / too_large / engine: what Serve maps to 400 / 413 / 500 (not the message text)."""
    import onnxruntime as ort

    from raydetect.types import ERROR_STATUS
    from tests.test_model_card import tiny_model

    det = Detector({"model": str(TRAINED), "max_pixels": 200_000, "threads": 2})
    big = (MODELS.parent / "images" / "bus.jpg").read_bytes()  # 810x1080
    ok = sorted((MODELS.parent / "defects" / "images" / "test").iterdir())[0].read_bytes()  # 780x144
    res = det.detect([ok, b"\xff\xd8\xff garbage", big])
    assert res[0].error is None and res[0].error_kind is None
    assert res[1].error_kind == "input" and ERROR_STATUS[res[1].error_kind] == 400
    assert res[2].error_kind == "too_large" and ERROR_STATUS[res[2].error_kind] == 413, res[2].error

    # the runtime itself fails: ONNX Runtime given a session whose graph takes 32x32 inputs
    det.engine.session = ort.InferenceSession(tiny_model(), providers=["CPUExecutionProvider"])
    res = det.detect([ok])
    assert res[0].error_kind == "engine" and ERROR_STATUS["engine"] == 500
    assert res[0].error.startswith("inference failed: "), res[0].error


def test_engine_rows_postprocessor_keeps_conf_and_max_det():
    from raydetect.types import NMSOutput

    out = NMSOutput(np.array([3]), np.arange(12, dtype=np.float32).reshape(1, 3, 4),
                    np.array([[0.9, 0.5, 0.2]], np.float32), np.array([[1, 2, 3]]))
    (boxes, scores, cls), = EngineRows()(out, [0.3], [0.7], [1])
    assert scores.tolist() == [pytest.approx(0.9)] and cls.tolist() == [1] and boxes.shape == (1, 4)


def test_detection_array_is_the_list_of_detections():
    boxes = np.array([[1.5, 2, 30, 40], [5, 6, 7, 8]], np.float32)
    arr = DetectionArray.from_rows(boxes, [0.9, 0.25], [0, 7], {0: "fi"})
    as_list = [Detection(1.5, 2.0, 30.0, 40.0, float(np.float32(0.9)), 0, "fi"),
               Detection(5.0, 6.0, 7.0, 8.0, 0.25, 7, "7")]
    assert arr == as_list and as_list == arr and len(arr) == 2 and arr[-1] == as_list[1] and arr[:1] == as_list[:1]
    assert [d.to_dict() for d in arr] == [d.to_dict() for d in as_list]
    assert pickle.loads(pickle.dumps(arr)) == as_list
    empty = DetectionArray.from_rows(np.zeros((0, 4)), [], [], {})
    results = [ImageResult("a", 40, 30, arr), ImageResult("b", 1, 1, empty), ImageResult("c", error="bad")]
    model = ModelIdentity("s", engine="e", precision="fp32")
    fast = results_to_table(results, model)
    slow = results_to_table([ImageResult("a", 40, 30, as_list), ImageResult("b", 1, 1, []),
                             ImageResult("c", error="bad")], model)
    assert fast.schema == RESULT_SCHEMA and fast.equals(slow)
    assert fast.column("detections").type == pa.list_(RESULT_SCHEMA.field("detections").type.value_type)
    # one model's names (the fast lookup) and two models' names give the same column
    names = {0: "fi", 3: "kb"}
    two = [DetectionArray.from_rows(boxes, [0.9, 0.25], [3, 7], names), DetectionArray.from_rows(boxes[:1], [0.5], [0], names)]
    mixed = [two[0], DetectionArray.from_rows(boxes[:1], [0.5], [0], {0: "fi"})]
    columns = [detections_column(d).to_pylist() for d in (two, mixed, [list(x) for x in two])]
    assert columns[0] == columns[1] == columns[2]
    assert [d["class_name"] for d in columns[0][0]] == ["kb", "7"] and columns[0][1][0]["class_name"] == "fi"


# --- the compiled torch engine --------------------------------------------------------------------


def test_compile_settings():
    assert compile_buckets(64) == [1, 8, 64] and compile_buckets(8) == [1, 8] and compile_buckets(1) == [1]
    assert compile_buckets(64, (16, 128)) == [16, 64]
    assert compile_mode("auto", True) == "inductor" and compile_mode("auto", False) == "off"
    assert compile_mode("off", True) == "off"
    assert validate(TorchConfig, {"compile_batches": [64, 1, 1]}, "torch").compile_batches == (1, 64)
    with pytest.raises(ConfigError, match=r"torch\.compile_batches"):
        validate(TorchConfig, {"compile_batches": [0]}, "torch")


torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")

_WARM = """
import json, sys, time
t0 = time.perf_counter()
from raydetect.config import DetectorConfig
from raydetect.model_card import ModelCard
from raydetect.engines.torch import TorchEngine
cfg = DetectorConfig(model=sys.argv[1], engine="torch", device="cpu", batch_size=2,
                     torch={"compile": "inductor", "compile_batches": [2], "cache": sys.argv[2]})
eng = TorchEngine(ModelCard.load(sys.argv[1]), cfg)
print(json.dumps({**eng.compile_cache, "error": eng.compile_error, "ready_s": time.perf_counter() - t0}))
"""


def test_compiled_engine_on_the_cpu_builds_caches_and_loads(tmp_path):
    """inductor on the CPU: the compiled graph equals the eager one; the cache entry it writes is
    loaded by a fresh process with an empty inductor cache (status 'hit')."""
    from raydetect.model_card import ModelCard
    from tests.test_model_card import tiny_model

    model = tmp_path / "tiny.onnx"  # a YOLO-shaped graph small enough for the CPU's C++ compile
    model.write_bytes(tiny_model())
    card = ModelCard.load(str(model))
    cfg = DetectorConfig(model=str(model), engine="torch", device="cpu", batch_size=2,
                         torch={"compile": "inductor", "compile_batches": (2,), "cache": str(tmp_path)})
    eng = TorchEngine(card, cfg)
    meta = eng.metadata()
    assert meta["compile"] == "inductor" and meta["compile_error"] is None, meta["compile_error"]
    assert meta["compile_cache"]["status"] == "built" and eng.buckets == [2]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".engine") and "_torch-" in n for n in entries), entries
    x = np.random.default_rng(0).random((2, 3, *card.imgsz), dtype=np.float32)
    ref = eng.infer_eager(x)
    assert np.abs(eng.infer(x) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(eng.infer(x[:1]) - ref[:1]).max() <= 1e-4 * np.abs(ref).max()  # padded to the bucket
    # a fresh process with an empty inductor cache of its own: what it loads comes from our entry
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-fresh")}
    out = subprocess.run([sys.executable, "-c", _WARM, str(model), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    warm = json.loads(out.stdout.strip().splitlines()[-1])
    print("cold compile", meta["compile_cache"]["seconds"], "s; fresh process with the cache:", warm)
    assert warm["status"] == "hit" and warm["error"] is None


def test_compile_failure_falls_back_to_the_eager_graph(tmp_path):
    """A compile that cannot happen (here: an unusable cache) leaves the eager engine running,
    with the reason in its metadata."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = DetectorConfig(model=str(TRAINED), engine="torch", device="cpu", batch_size=2, conf=0.25,
                         torch={"compile": "inductor", "cache": str(blocker / "cache")})
    det = Detector(cfg)
    info = det.info()
    assert info["compile"] == "off (failed)" and "compiled torch engine cache" in info["compile_error"]
    assert det.engine.buckets == [] and det.stages == ("gpu", "torch")
    blobs = [p.read_bytes() for p in photo_paths()[:2]]
    ref = Detector({"model": str(TRAINED), "conf": 0.25, "threads": 2}).detect(blobs)
    got = det.detect(blobs)
    for g, r in zip(got, ref, strict=True):
        assert len(g.detections) == len(r.detections)
