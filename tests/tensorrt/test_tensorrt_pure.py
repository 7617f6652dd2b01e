"""Everything of the TensorRT engine that runs without TensorRT: cache keys and the engine
cache (local and S3, with its lock), profile shapes, the choice of NMS implementation and
precision handling, NMS output decoding and its mapping to detections, padding of partial
batches, error messages, and the ``raydetect build`` / ``engine=auto`` behaviour when
TensorRT is missing (as on this machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from raydetect.config import ConfigError, DetectorConfig, validate
from raydetect.engine_cache import (
    EngineCache,
    EngineCacheError,
    EngineKey,
    cache_dir_for,
    describe_mismatch,
    lock_path_for,
    make_key,
    timing_cache_name,
)
from raydetect.engines import EngineUnavailableError, create_engine, resolve_engine_name
from raydetect.engines.base import Engine, NMSOutput
from raydetect.engines.onnxruntime import OnnxRuntimeEngine
from raydetect.model_card import ModelCard
from raydetect.stages.postprocess import candidates, nms, nms_output_rows, nms_outputs_close, postprocess
from raydetect.tensorrt.outputs import (
    batch_buckets,
    cxcywh_to_xyxy,
    decode_efficient_nms,
    drop_padding,
    pack_selected,
    pad_rows,
    padded_batch_size,
)
from raydetect.tensorrt.rules import (
    NMSCapabilities,
    ParserError,
    choose_nms,
    cuda_graph_allowed,
    format_parser_errors,
    format_precision_summary,
    layer_precision_summary,
    nms_indices_type_arg,
    nms_params,
    nms_request_problem,
    nms_topk_limit,
    parse_version,
    precision_plan,
    probe_availability,
    profile_shapes,
    qdq_problems,
    to_fp16_onnx,
    unavailable_reason,
    unsupported_nodes,
)
from tests.conftest import MODELS, REPO, photo_paths

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT paths do not apply")

DYN = MODELS / "yolov8n-dynamic-random.onnx"


def key(**over) -> EngineKey:
    base = dict(
        onnx_sha256="ab" * 32,
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        precision="fp16",
        imgsz=(640, 640),
        batch_profile=(1, 16, 32),
        nms="inms",
        nms_params={"max_det": 300, "topk": 5000},
    )
    base.update(over)
    return make_key(**base)


# --- cache keys ---------------------------------------------------------------------------


def test_key_is_stable_and_round_trips():
    a, b = key(), key()
    assert a == b and a.digest() == b.digest() and a.file_stem() == b.file_stem()
    assert len(a.digest()) == 64
    stem = a.file_stem()
    assert stem.startswith("abababababab_fp16_640x640_b32_sm90_trt10.3.0_")
    assert EngineKey.from_fields(json.loads(json.dumps(a.fields()))) == a


@pytest.mark.parametrize(
    "field,value",
    [
        ("onnx_sha256", "cd" * 32),
        ("tensorrt_version", "10.4.0"),
        ("gpu_name", "NVIDIA A10"),
        ("compute_capability", (8, 6)),
        ("precision", "int8"),
        ("imgsz", (640, 480)),
        ("batch_profile", (1, 8, 32)),
        ("batch_profile", (1, 16, 64)),
        ("nms", "efficient_nms"),
        ("nms_params", {"max_det": 100, "topk": 5000}),
    ],
)
def test_key_is_sensitive_to_each_field(field, value):
    a, b = key(), key(**{field: value})
    assert a.digest() != b.digest()
    assert a.file_stem() != b.file_stem()
    diffs = describe_mismatch(a.fields(), b)
    assert len(diffs) == 1 and diffs[0].startswith(field.split("_")[0])


def test_recipe_version_is_part_of_the_key():
    a = key()
    assert replace(a, recipe=a.recipe + 1).digest() != a.digest()


def test_mismatch_message_names_environment():
    msgs = describe_mismatch(key(gpu_name="NVIDIA A10", compute_capability=(8, 6)).fields(), key())
    assert any("gpu_name: entry built for 'NVIDIA A10'" in m for m in msgs)
    assert any("compute_capability: entry built for '8.6', this run needs '9.0'" in m for m in msgs)


def test_cache_locations(tmp_path):
    model = tmp_path / "models" / "m.onnx"
    assert cache_dir_for(str(model), None) == str(tmp_path / "models")
    assert cache_dir_for("s3://bucket/models/m.onnx", None) == "s3://bucket/models"
    assert cache_dir_for(str(model), "s3://b/engines/") == "s3://b/engines"
    assert lock_path_for("/c", "stem") == "/c/stem.lock"
    remote = lock_path_for("s3://b/engines", "stem", lock_dir=str(tmp_path))
    assert remote.startswith(str(tmp_path) + "/stem.") and remote.endswith(".lock")
    assert lock_path_for("s3://other/engines", "stem", lock_dir=str(tmp_path)) != remote
    assert timing_cache_name("10.3.0", "NVIDIA H100 80GB HBM3", "9.0") == "timing_NVIDIA-H100-80GB-HBM3_sm90_trt10.3.0.cache"


# --- the engine cache -----------------------------------------------------------------------


class Builder:
    """A build function that records its calls (the engine bytes are just labelled bytes:
    the cache stores opaque blobs)."""

    def __init__(self, payload: bytes = b"engine-bytes") -> None:
        self.payload, self.calls = payload, 0

    def __call__(self):
        self.calls += 1
        return self.payload + str(self.calls).encode(), {"note": "test"}


def loads(blob: bytes):
    return blob if blob.startswith(b"engine-bytes") else None


def test_cache_builds_once_then_hits(tmp_path):
    cache = EngineCache(str(tmp_path / "cache"))
    k, build = key(), Builder()
    r1 = cache.load_or_build(k, build, loads)
    assert (r1.status, r1.value, build.calls) == ("built", b"engine-bytes1", 1)
    assert r1.engine_url.endswith(k.file_stem() + ".engine") and r1.build_seconds >= 0
    side = json.loads((tmp_path / "cache" / (k.file_stem() + ".json")).read_text())
    assert side["key"] == k.fields() and side["digest"] == k.digest() and side["note"] == "test"
    r2 = cache.load_or_build(k, build, loads)
    assert (r2.status, r2.value, build.calls) == ("hit", b"engine-bytes1", 1)
    # another GPU: another entry, built separately
    r3 = cache.load_or_build(key(gpu_name="NVIDIA A10", compute_capability=(8, 6)), build, loads)
    assert r3.status == "built" and build.calls == 2
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 2


def test_corrupt_entries_are_rebuilt(tmp_path):
    cache = EngineCache(str(tmp_path))
    k, build = key(), Builder()
    cache.load_or_build(k, build, loads)
    engine_file = tmp_path / (k.file_stem() + ".engine")
    engine_file.write_bytes(b"engine-bytes-truncated")  # sha256 no longer matches the sidecar
    r = cache.load_or_build(k, build, loads)
    assert r.status == "rebuilt" and "sha256" in r.reason and build.calls == 2
    # bytes that match the sidecar but do not deserialize (e.g. TensorRT version tag mismatch)
    cache.write_entry(k, b"not an engine")
    r = cache.load_or_build(k, build, loads)
    assert r.status == "rebuilt" and "failed to deserialize" in r.reason and build.calls == 3
    # a sidecar whose key disagrees (copied from another machine)
    side = tmp_path / (k.file_stem() + ".json")
    meta = json.loads(side.read_text())
    meta["key"]["gpu_name"] = "NVIDIA A10"
    side.write_text(json.dumps(meta))
    r = cache.load_or_build(k, build, loads)
    assert r.status == "rebuilt" and "stale entry: gpu_name" in r.reason
    # engine without sidecar (interrupted write)
    side.unlink()
    r = cache.load_or_build(k, build, loads)
    assert r.status == "rebuilt" and "without sidecar" in r.reason
    assert cache.load_or_build(k, build, loads).status == "hit"


def test_forced_rebuild(tmp_path):
    cache, k, build = EngineCache(str(tmp_path)), key(), Builder()
    cache.load_or_build(k, build, loads)
    r = cache.load_or_build(k, build, loads, force=True)
    assert r.status == "rebuilt" and r.value == b"engine-bytes2"


def test_no_build_allowed_explains_what_is_there(tmp_path):
    cache = EngineCache(str(tmp_path))
    a10 = key(gpu_name="NVIDIA A10", compute_capability=(8, 6), tensorrt_version="10.1.0")
    cache.load_or_build(a10, Builder(), loads)
    with pytest.raises(EngineCacheError) as e:
        cache.load_or_build(key(), Builder(), loads, allow_build=False)
    msg = str(e.value)
    assert "building is disabled" in msg
    assert "'NVIDIA A10' sm8.6 TensorRT 10.1.0" in msg
    assert "gpu_name: entry built for 'NVIDIA A10', this run needs 'NVIDIA H100 80GB HBM3'" in msg
    assert "raydetect build" in msg


def test_unusable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "models.onnx"  # a file where the cache directory would go
    blocker.write_bytes(b"x")
    with pytest.raises(EngineCacheError, match="writable local directory or an s3:// prefix"):
        EngineCache(str(blocker / "engines")).load_or_build(key(), Builder(), loads)


def _build_in_process(cache_dir: str, marker_dir: str) -> str:
    def build():
        with open(os.path.join(marker_dir, f"built-{os.getpid()}"), "w"):
            pass
        time.sleep(1.0)  # long enough for the others to find the lock held
        return b"engine-bytes-shared"

    return EngineCache(cache_dir).load_or_build(key(), build, loads).status


def test_lock_makes_concurrent_processes_build_once(tmp_path):
    cache_dir, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    with ProcessPoolExecutor(3, mp_context=get_context("fork")) as pool:
        statuses = list(pool.map(_build_in_process, [str(cache_dir)] * 3, [str(markers)] * 3))
    assert sorted(statuses) == ["built", "hit", "hit"]
    assert len(list(markers.iterdir())) == 1


def test_cache_on_s3(s3_storage, s3fs_client, tmp_path):
    s3fs_client.mkdir("trt-cache")
    url = "s3://trt-cache/engines"
    cache = EngineCache(url, s3_storage, lock_dir=str(tmp_path / "locks"))
    k, build = key(), Builder()
    r = cache.load_or_build(k, build, loads)
    assert r.status == "built" and r.engine_url == f"{url}/{k.file_stem()}.engine"
    assert s3fs_client.cat_file(f"trt-cache/engines/{k.file_stem()}.engine") == b"engine-bytes1"
    assert list((tmp_path / "locks").glob("*.lock"))  # the lock is local to the node
    fresh = EngineCache(url, s3_storage, lock_dir=str(tmp_path / "locks"))
    assert fresh.load_or_build(k, build, loads).status == "hit" and build.calls == 1
    assert [c["gpu_name"] for c in fresh.candidates(k)] == [k.gpu_name]
    # an instance that listed the prefix before another one wrote there still sees the entry
    k2, early = key(precision="fp32"), EngineCache(url, s3_storage, lock_dir=str(tmp_path / "locks"))
    assert early.candidates(k2) == []
    EngineCache(url, s3_storage, lock_dir=str(tmp_path / "locks")).load_or_build(k2, build, loads)
    assert early.load_or_build(k2, build, loads).status == "hit" and build.calls == 2
    fresh.write_timing_cache("timing.cache", b"\x01\x02")
    assert fresh.read_timing_cache("timing.cache") == b"\x01\x02"
    assert fresh.read_timing_cache("absent.cache") == b""


# --- profile, NMS and precision choices -----------------------------------------------------


def test_profile_shapes():
    p = profile_shapes(32, 8, (640, 480))
    assert (p.min, p.opt, p.max) == ((1, 3, 640, 480), (8, 3, 640, 480), (32, 3, 640, 480))
    assert profile_shapes(16, None, (640, 640)).batches == (1, 16, 16)
    assert profile_shapes(1, None, (320, 320)).batches == (1, 1, 1)
    with pytest.raises(ValueError, match="tensorrt.opt_batch must be between 1 and the max batch 8"):
        profile_shapes(8, 9, (640, 640))
    with pytest.raises(ValueError, match="max batch must be >= 1"):
        profile_shapes(0, None, (640, 640))


def caps(version="10.3.0", add_nms=True, efficient=True) -> NMSCapabilities:
    return NMSCapabilities(parse_version(version), add_nms, efficient)


def test_choose_nms():
    assert choose_nms(caps()) == "inms"
    assert choose_nms(caps("11.2.0")) == "inms"
    assert choose_nms(caps(add_nms=False)) == "efficient_nms"
    assert choose_nms(caps("8.6.1")) == "efficient_nms"  # INMSLayer is used on TensorRT >= 10 only
    assert choose_nms(caps(), "efficient_nms") == "efficient_nms"
    with pytest.raises(ValueError, match="EfficientNMS_TRT plugin"):
        choose_nms(caps(efficient=False), "efficient_nms")
    with pytest.raises(ValueError, match="needs INetworkDefinition.add_nms"):
        choose_nms(caps(add_nms=False), "inms")
    with pytest.raises(ValueError, match="neither add_nms"):
        choose_nms(caps(add_nms=False, efficient=False))
    with pytest.raises(ValueError, match="tensorrt.nms must be"):
        choose_nms(caps(), "batched")


def test_nms_details():
    assert not nms_indices_type_arg((10, 13, 0)) and nms_indices_type_arg((10, 14)) and nms_indices_type_arg((11, 0))
    assert nms_topk_limit((6, 2)) == 2000 and nms_topk_limit((5, 3)) == 2000 and nms_topk_limit((9, 0)) == 5000
    assert cuda_graph_allowed("efficient_nms") and not cuda_graph_allowed("inms")
    assert nms_params("inms", max_det=300, topk=5000, conf=0.25, iou=0.7) == {"max_det": 300, "topk": 5000}
    assert nms_params("efficient_nms", max_det=100, topk=5000, conf=0.25, iou=0.7) == {
        "max_det": 100, "conf": 0.25, "iou": 0.7,
    }


def test_nms_request_problems():
    inms = {"max_det": 300, "topk": 5000}
    assert nms_request_problem("inms", inms, conf=0.001, iou=0.45, max_det=300) is None
    assert "max_det=500 is more than" in nms_request_problem("inms", inms, conf=0.25, iou=0.7, max_det=500)
    eff = {"max_det": 300, "conf": 0.25, "iou": 0.7}
    assert nms_request_problem("efficient_nms", eff, conf=0.5, iou=0.7, max_det=10) is None
    assert "iou=0.5 differs" in nms_request_problem("efficient_nms", eff, conf=0.25, iou=0.5, max_det=300)
    assert "conf=0.1 is below" in nms_request_problem("efficient_nms", eff, conf=0.1, iou=0.7, max_det=300)


def test_precision_plan():
    p = precision_plan((10, 3), "fp16", quantized=False)
    assert (p.precision, p.strongly_typed, p.fp16_flag, p.convert_fp16) == ("fp16", False, True, False)
    p = precision_plan((11, 0), "fp16", quantized=False)
    assert (p.precision, p.strongly_typed, p.fp16_flag, p.convert_fp16) == ("fp16", True, False, True)
    p = precision_plan((10, 3), "fp32", quantized=False)
    assert (p.strongly_typed, p.fp16_flag, p.convert_fp16) == (False, False, False)
    assert precision_plan((11, 0), "fp32", quantized=False).strongly_typed
    for version in ((10, 0), (11, 1)):
        p = precision_plan(version, "int8", quantized=True)
        assert (p.precision, p.strongly_typed, p.fp16_flag, p.convert_fp16) == ("int8", True, False, False)
    assert precision_plan((10, 3), "fp16", quantized=True).precision == "int8"
    with pytest.raises(ValueError, match="needs an INT8 \\(QDQ\\) model: make one with 'raydetect quantize'"):
        precision_plan((10, 3), "int8", quantized=False)
    with pytest.raises(ValueError, match="fp32, fp16 or int8"):
        precision_plan((10, 3), "int4", quantized=False)


def test_fp16_conversion_keeps_float_io():
    m = onnx.load_model_from_string(to_fp16_onnx(DYN.read_bytes()))
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [f32]
    kinds = {t.data_type for t in m.graph.initializer if t.dims and np.prod(t.dims) > 16}
    assert kinds == {f16}


def _tiny_conv_model() -> bytes:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w, b],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _quantize(tmp_path, symmetric: bool) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.data = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    src, dst = tmp_path / "f32.onnx", tmp_path / f"q-{symmetric}.onnx"
    src.write_bytes(_tiny_conv_model())
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} if symmetric else {}
    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8, extra_options=extra,
    )
    return dst.read_bytes()


def test_qdq_checks_for_tensorrt(tmp_path):
    asym = qdq_problems(_quantize(tmp_path, symmetric=False))
    assert any("zero point of type uint8" in p for p in asym)
    assert any("int32 quantized tensor (a quantized bias?)" in p for p in asym)
    assert qdq_problems(_quantize(tmp_path, symmetric=True)) == []
    assert qdq_problems(_tiny_conv_model()) == []


# --- availability and errors ----------------------------------------------------------------


def test_unavailable_reasons():
    msg = unavailable_reason(trt_version=None, trt_error="ModuleNotFoundError: No module named 'tensorrt'")
    assert 'pip install "raydetect[tensorrt]" --extra-index-url https://pypi.nvidia.com' in msg
    assert "No module named 'tensorrt'" in msg
    assert "too old (raydetect needs >= 10.0)" in unavailable_reason(trt_version="8.6.1")
    assert 'pip install "raydetect[gpu]"' in unavailable_reason(trt_version="10.3.0", torch_error="ImportError: x")
    assert "no CUDA GPU" in unavailable_reason(trt_version="10.3.0", cuda_available=False)
    assert unavailable_reason(trt_version="10.3.0.26", cuda_available=True) is None
    assert parse_version("10.3.0.26") == (10, 3, 0, 26) and parse_version("11.0.0rc1") == (11, 0, 0)
    with pytest.raises(ValueError):
        parse_version("dev")


@no_trt
def test_engine_auto_skips_tensorrt_with_the_reason():
    from raydetect.engines.tensorrt import TensorRTEngine

    why = TensorRTEngine.availability()
    assert why == probe_availability()
    assert "TensorRT is not installed" in why and "https://pypi.nvidia.com" in why
    cfg = DetectorConfig(model=str(DYN))
    assert resolve_engine_name(cfg) != "tensorrt"
    card = ModelCard.load(str(DYN))
    with pytest.raises(EngineUnavailableError, match=r"engine 'tensorrt' cannot run here: TensorRT is not installed"):
        create_engine(card, DetectorConfig(model=str(DYN), engine="tensorrt"))


@no_trt
def test_raydetect_build_without_tensorrt_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "build", "--model", str(DYN), "--precision", "fp16",
         "--max-batch", "8", "--cache", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "raydetect build: error: cannot build a TensorRT engine here: TensorRT is not installed" in proc.stderr
    assert 'pip install "raydetect[tensorrt]" --extra-index-url https://pypi.nvidia.com' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="detector.tensorrt.nms"):
        validate(DetectorConfig, {"model": "m.onnx", "tensorrt": {"nms": "batched"}}, "detector")
    with pytest.raises(ConfigError, match="detector.tensorrt.workspace_gb"):
        validate(DetectorConfig, {"model": "m.onnx", "tensorrt": {"workspace_gb": 0}}, "detector")
    cfg = validate(DetectorConfig, {"model": "m.onnx", "tensorrt": {"cache": "s3://b/e", "opt_batch": 8}}, "d")
    assert cfg.tensorrt.cache == "s3://b/e" and cfg.tensorrt.opt_batch == 8


def test_parser_error_report():
    msg = format_parser_errors(
        "m.onnx",
        [ParserError("No importer registered for op: Foo", 12, "/model.22/Foo", "Foo", "UNSUPPORTED_NODE"),
         ParserError("Assertion failed: shape", 3)],
    )
    assert "TensorRT's ONNX parser rejected m.onnx (2 error(s))" in msg
    assert "node '/model.22/Foo', op Foo: No importer registered for op: Foo [UNSUPPORTED_NODE]" in msg
    assert "node #3: Assertion failed: shape" in msg
    assert "unsupported or failing operators: Foo" in msg
    nodes = unsupported_nodes(DYN.read_bytes(), lambda op: op != "Resize")
    assert nodes and all(op == "Resize" for _, op in nodes)
    assert all(name.startswith("/model.") for name, _ in nodes)


def test_layer_precision_summary_reads_tensorrt_10_and_11_json():
    trt10 = {"Layers": [
        {"Name": "conv1", "Outputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "conv2", "Outputs": [{"Name": "b", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}]},
        {"Name": "conv3", "Outputs": [{"Name": "c", "Format/Datatype": "Half"}]},
        {"Name": "nms", "Outputs": [{"Name": "d", "Format/Datatype": "Int32"}]},
        {"Name": "head", "Outputs": [{"Name": "e", "Format/Datatype": "Row major linear FP32"}]},
    ], "Bindings": ["images", "raydetect_num"]}
    assert layer_precision_summary(json.dumps(trt10)) == {"fp16": 2, "fp32": 1, "int32": 1, "int8": 1}
    trt11 = {"Layers": [
        {"Name": "c", "Outputs": [{"Name": "a", "DataType": "BFloat16", "Format": "Row major linear"}]},
        {"Name": "d", "Outputs": [{"Name": "b", "DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}]},
    ], "I/O Tensors": []}
    assert layer_precision_summary(json.dumps(trt11)) == {"bf16": 1, "fp32": 1}
    names_only = {"Layers": ["conv1 + relu", "conv2"]}
    assert layer_precision_summary(json.dumps(names_only)) == {"unknown": 2}
    text = format_precision_summary({"fp16": 3, "fp32": 1})
    assert text == "layer precisions (4 layers): fp16 3 (75%), fp32 1 (25%)"


# --- NMS output decoding, padding -----------------------------------------------------------


def test_buckets_and_padding():
    assert batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert padded_batch_size(5, 16, batch_buckets(16)) == 8
    assert padded_batch_size(16, 16, batch_buckets(16)) == 16
    assert padded_batch_size(11, 12, batch_buckets(12)) == 12
    assert padded_batch_size(5, 16, None) == 5  # no CUDA graphs: run the exact batch
    with pytest.raises(ValueError, match="takes 1..16"):
        padded_batch_size(17, 16, batch_buckets(16))
    x = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    p = pad_rows(x, 4)
    assert p.shape == (4, 3) and (p[:2] == x).all() and (p[2:] == 0).all() and pad_rows(x, 2) is x
    out = NMSOutput(np.array([1, 2, 0, 0]), np.ones((4, 5, 4), np.float32), np.ones((4, 5), np.float32),
                    np.zeros((4, 5), np.int64))
    d = drop_padding(out, 2)
    assert len(d) == 2 and d.boxes.shape == (2, 5, 4) and list(d.num) == [1, 2]
    assert drop_padding(out, 4) is out


def test_nms_output_validates_shapes():
    with pytest.raises(ValueError, match="boxes must be"):
        NMSOutput(np.zeros(2), np.zeros((2, 5, 3)), np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="scores must be"):
        NMSOutput(np.zeros(2), np.zeros((2, 5, 4)), np.zeros((2, 4)), np.zeros((2, 5)))


def test_decode_efficient_nms():
    num = np.array([[2], [0], [9]], dtype=np.int32)  # counts beyond K are clipped
    boxes = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    scores = np.array([[0.9, 0.8, 0, 0], [0, 0, 0, 0], [0.7, 0.6, 0.5, 0.4]], np.float32)
    classes = np.array([[1, 2, 0, 0], [0, 0, 0, 0], [3, 3, 3, 3]], np.int32)
    out = decode_efficient_nms(num, boxes, scores, classes)
    assert list(out.num) == [2, 0, 4] and out.classes.dtype == np.int64
    b, s, c = nms_output_rows(out, 0, conf=0.85, max_det=10)
    assert s.tolist() == pytest.approx([0.9]) and c.tolist() == [1] and (b == boxes[0, :1]).all()
    assert nms_output_rows(out, 1, 0.0, 10)[0].shape == (0, 4)
    assert nms_output_rows(out, 2, 0.0, 2)[1].tolist() == pytest.approx([0.7, 0.6])


def test_nms_output_rows_rejects_bad_counts():
    out = NMSOutput(np.array([6]), np.zeros((1, 5, 4), np.float32), np.zeros((1, 5), np.float32), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="6 detections reported"):
        nms_output_rows(out, 0, 0.1, 10)


def emulate_inms(preds: np.ndarray, layout: str, conf: float, iou: float, max_det: int, topk: int = 5000):
    """What TensorRT's INMSLayer returns for our network (per its documentation): scores
    masked to each anchor's best class, per batch item the top-``topk`` candidates above
    ``conf``, greedy NMS per class, at most ``max_det`` per class, rows (batch, class, box)
    sorted by batch and decreasing score; plus the tensors the rows index."""
    rows, all_boxes, all_scores = [], [], []
    for b, pred in enumerate(preds):
        p = pred.T if layout == "yolov8" else pred
        cls = p[:, 4:] if layout == "yolov8" else p[:, 5:] * p[:, 4:5]
        best = cls.max(axis=1)
        all_boxes.append(p[:, :4].astype(np.float32))
        all_scores.append(best.astype(np.float32))
        best_cls = cls.argmax(axis=1)
        cand = np.flatnonzero(best > conf)
        cand = cand[np.argsort(-best[cand], kind="stable")][:topk]
        kept = []
        for c in np.unique(best_cls[cand]):
            idx = cand[best_cls[cand] == c]
            keep = nms(cxcywh_to_xyxy(p[idx, :4]), best[idx], iou, max_keep=max_det)
            kept += [(b, int(c), int(i)) for i in idx[keep]]
        kept.sort(key=lambda r: -best[r[2]])
        rows += kept
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3), np.stack(all_boxes), np.stack(all_scores)


def inms_output(preds, layout, conf, iou, max_det) -> NMSOutput:
    sel, boxes, scores = emulate_inms(preds, layout, conf, iou, max_det)
    rng = np.random.default_rng(0)
    sel = sel[rng.permutation(len(sel))]  # pack_selected must not rely on TensorRT's order
    b, c, a = sel[:, 0], sel[:, 1], sel[:, 2]
    return pack_selected(b, c, boxes[b, a], scores[b, a], len(preds), max_det)


TRAINED = MODELS / "yolov8n-defects.onnx"


@pytest.fixture(scope="module")
def real_heads():
    """Real head outputs of the trained YOLOv8n on the real photos (ONNX Runtime): at low conf
    hundreds of candidates with distinct scores and many overlaps."""
    from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

    card = ModelCard.load(str(TRAINED))
    eng = OnnxRuntimeEngine(card, DetectorConfig(model=str(TRAINED), threads=2))
    imgs = [letterbox(decode_image(p.read_bytes(), 10**8, 10**8), 640, 640)[0] for p in photo_paths()[:4]]
    return eng.infer(to_tensor(imgs))


def canonical(b, s, c):
    """Rows in a canonical order (equal scores may come out in either order)."""
    order = np.lexsort((b[:, 1], b[:, 0], c, -s))
    return b[order], s[order], c[order]


@pytest.mark.parametrize("conf,iou,max_det", [(1e-3, 0.7, 300), (1e-4, 0.45, 300), (1e-3, 0.5, 30), (0.01, 0.7, 5)])
def test_inms_decoding_matches_postprocess(real_heads, conf, iou, max_det):
    out = inms_output(real_heads, "yolov8", conf, iou, max_det)
    total = 0
    for i, pred in enumerate(real_heads):
        ref_b, ref_s, ref_c = canonical(*postprocess(pred, "yolov8", conf, iou, max_det))
        b, s, c = canonical(*nms_output_rows(out, i, conf, max_det))
        assert len(s) == len(ref_s) and (c == ref_c).all()
        np.testing.assert_allclose(s, ref_s, rtol=0, atol=0)
        np.testing.assert_allclose(b, ref_b, rtol=0, atol=1e-4)
        total += len(s)
    assert total > 15  # the model gives many boxes at these thresholds


def test_post_nms_filtering_equals_nms_at_those_settings(real_heads):
    """Why one engine call may serve requests with higher conf / lower max_det."""
    out = inms_output(real_heads, "yolov8", 1e-4, 0.7, 300)
    for i, pred in enumerate(real_heads):
        for conf, max_det in ((0.005, 300), (1e-3, 7), (0.05, 3)):
            ref_b, ref_s, ref_c = canonical(*postprocess(pred, "yolov8", conf, 0.7, max_det))
            b, s, c = canonical(*nms_output_rows(out, i, conf, max_det))
            assert len(s) == len(ref_s) > 0
            assert (c == ref_c).all() and np.array_equal(s, ref_s) and np.allclose(b, ref_b, atol=1e-4)


def test_inms_decoding_yolov5_layout():
    rng = np.random.default_rng(3)
    n, nc = 500, 3
    xy = rng.uniform(0, 600, (2, n, 2))
    wh = rng.uniform(10, 120, (2, n, 2))
    obj = rng.uniform(0, 1, (2, n, 1))
    cls = rng.uniform(0, 1, (2, n, nc))
    preds = np.concatenate([xy, wh, obj, cls], axis=2).astype(np.float32)  # [B, N, 5 + nc]
    out = inms_output(preds, "yolov5", 0.3, 0.5, 100)
    for i in range(2):
        ref = canonical(*postprocess(preds[i], "yolov5", 0.3, 0.5, 100))
        got = canonical(*nms_output_rows(out, i, 0.3, 100))
        assert len(got[1]) == len(ref[1]) > 10
        assert (got[2] == ref[2]).all() and np.allclose(got[1], ref[1]) and np.allclose(got[0], ref[0], atol=1e-4)


def test_pack_selected_groups_and_caps_per_image():
    b = np.array([1, 0, 1, 1, 0])
    c = np.array([2, 0, 1, 2, 5])
    boxes = np.array([[10, 10, 4, 4]] * 5, dtype=np.float32)
    s = np.array([0.5, 0.9, 0.8, 0.7, 0.95], dtype=np.float32)
    out = pack_selected(b, c, boxes, s, batch_size=3, max_det=2)
    assert list(out.num) == [2, 2, 0]
    assert out.scores[0].tolist() == pytest.approx([0.95, 0.9]) and out.classes[0].tolist() == [5, 0]
    assert out.scores[1].tolist() == pytest.approx([0.8, 0.7]) and out.classes[1].tolist() == [1, 2]
    assert out.boxes[0, 0].tolist() == [8, 8, 12, 12]  # centre/size → corners
    empty = pack_selected(np.empty(0), np.empty(0), np.empty((0, 4)), np.empty(0), 2, 10)
    assert list(empty.num) == [0, 0] and empty.boxes.shape == (2, 10, 4)
    with pytest.raises(ValueError, match="batch index out of range"):
        pack_selected(np.array([3]), np.array([0]), boxes[:1], s[:1], 2, 10)
    with pytest.raises(ValueError, match="selected rows disagree"):
        pack_selected(b, c[:2], boxes, s, 3, 10)


def test_candidates_and_emulation_agree_on_thresholds(real_heads):
    """The emulated INMS uses strict 'score > conf' like candidates()."""
    pred = real_heads[0]
    _, scores, _ = candidates(pred, "yolov8", 1e-4)
    sel, _, best = emulate_inms(real_heads[:1], "yolov8", 1e-4, 1.0, 100000)
    assert len(sel) == len(scores) > 300
    assert len(emulate_inms(real_heads[:1], "yolov8", 1e-4, 1.0, 100000, topk=100)[0]) == 100


# --- the detector with an engine that runs NMS inside ---------------------------------------


class InNetworkNMSOnnxEngine(Engine):
    """A real engine with NMS inside its output: ONNX Runtime runs the model and the
    documented INMSLayer computation follows (:func:`emulate_inms` + :func:`pack_selected`),
    so the detector's NMSOutput branch runs here exactly as with TensorRT's INMS path."""

    name = "onnxruntime"
    nms_in_engine = True

    def __init__(self, card, config):
        super().__init__(card, config)
        self.ort = OnnxRuntimeEngine(card, config)
        self.conf, self.iou, self.max_det = config.conf, config.iou, config.max_det
        self.calls: list[tuple[int, float, float, int]] = []

    def set_nms_params(self, conf, iou, max_det):
        self.conf, self.iou, self.max_det = conf, iou, max_det

    def infer(self, batch):
        self.calls.append((len(batch), self.conf, self.iou, self.max_det))
        return inms_output(self.ort.infer(batch), self.card.layout, self.conf, self.iou, self.max_det)


def test_detector_maps_in_engine_nms_like_its_own_nms():
    from raydetect.detector import Detector

    cfg = {"model": str(TRAINED), "conf": 1e-3, "batch_size": 4, "threads": 2}
    plain = Detector(cfg)
    inside = Detector(cfg)
    inside.engine = InNetworkNMSOnnxEngine(inside.card, inside.config)
    assert inside._verify_batching() is True
    paths = photo_paths()
    blobs = [p.read_bytes() for p in paths]
    confs = [1e-3, 0.01, 1e-3, 0.05, 1e-3, 1e-3, 0.02][: len(blobs)]
    ious = [0.7, 0.5, 0.7, 0.7, 0.5, 0.7, 0.7][: len(blobs)]
    dets = [300, 300, 20, 300, 300, 5, 300][: len(blobs)]
    want = plain.detect(blobs, conf=confs, iou=ious, max_det=dets)
    inside.engine.calls.clear()
    got = inside.detect(blobs, conf=confs, iou=ious, max_det=dets)
    assert sum(len(r.detections) for r in want) > 100
    def ordered(dets):
        return sorted(dets, key=lambda d: (-d.score, d.class_id, d.x1, d.y1))

    for w, g in zip(want, got, strict=True):
        assert g.error is None and (g.width, g.height) == (w.width, w.height)
        assert len(g.detections) == len(w.detections)
        for a, b in zip(ordered(g.detections), ordered(w.detections), strict=True):
            assert (a.class_id, a.class_name) == (b.class_id, b.class_name) and a.score == b.score
            assert np.allclose([a.x1, a.y1, a.x2, a.y2], [b.x1, b.y1, b.x2, b.y2], atol=1e-3)
    # chunks of 4 (7 photos): one engine call per (chunk, IoU), at the lowest conf of its images
    assert len(blobs) == 7
    assert inside.engine.calls == [(3, 1e-3, 0.7, 300), (1, 0.01, 0.5, 300), (1, 1e-3, 0.5, 300), (2, 1e-3, 0.7, 300)]


def test_nms_outputs_close():
    a = NMSOutput(np.array([1]), np.array([[[0, 0, 10, 10]]], np.float32), np.array([[0.5]], np.float32), np.array([[2]]))
    b = NMSOutput(np.array([1, 1]), np.array([[[0, 0, 10.2, 10]]] * 2, np.float32),
                  np.array([[0.5]] * 2, np.float32), np.array([[2]] * 2))
    assert nms_outputs_close(a, 0, b, 1)
    c = NMSOutput(np.array([1]), a.boxes + 3, a.scores, a.classes)
    assert not nms_outputs_close(a, 0, c, 0)


def test_detect_cli_takes_the_engine_cache():
    import argparse

    from raydetect.cli.common import add_detector_args, config_values
    from raydetect.config import DetectorConfig, validate

    parser = argparse.ArgumentParser()
    add_detector_args(parser)

    def detector_config(argv):
        return validate(DetectorConfig, config_values(parser.parse_args(argv))["detector"], "detector")

    cfg = detector_config(["--model", "m.onnx", "--engine", "tensorrt", "--trt-cache", "s3://b/e"])
    assert cfg.engine == "tensorrt" and cfg.tensorrt.cache == "s3://b/e"
    assert detector_config(["--model", "m.onnx"]).tensorrt.cache is None


def _target(argv):
    """The engine a command line asks for, on one GPU/TensorRT identity (the inputs a real GPU
    would report), through the same function the engine load and ``raydetect build`` use."""
    from raydetect.cli import build_parser
    from raydetect.cli.build import build_config
    from raydetect.cli.detect import job_config
    from raydetect.tensorrt.build import engine_target

    args = build_parser().parse_args(argv)
    cfg = build_config(args) if args.command == "build" else job_config(args).detector
    card = ModelCard.load(cfg.model, cfg.storage)
    caps = NMSCapabilities(trt_version=(10, 13, 0), has_add_nms=True, has_efficient_nms=True)
    target = engine_target(card, cfg, tensorrt_version="10.13.0", gpu_name="NVIDIA H100 80GB HBM3",
                           compute_capability=(9, 0), caps=caps, quantized=False)
    return target.key, cache_dir_for(card.url, cfg.tensorrt.cache)


def test_build_then_detect_with_the_same_options_use_the_same_engine(tmp_path, capsys):
    cache = str(tmp_path / "engines")
    trt = ["--precision", "fp16", "--batch-size", "32", "--opt-batch", "16", "--nms", "efficient_nms",
           "--conf", "0.3", "--trt-cache", cache]
    detect = ["detect", "--model", str(DYN), "--engine", "tensorrt", "--input", "in", "--output", "out", *trt]
    built = _target(["build", "--model", str(DYN), *trt])
    assert built == _target(detect)
    assert built[0].batch_profile == (1, 16, 32) and built[0].precision == "fp16" and built[1] == cache
    # the README's old build spellings name the same engine (with a note on stderr)
    old = ["build", "--model", str(DYN), "--precision", "fp16", "--max-batch", "32", "--opt-batch", "16",
           "--nms", "efficient_nms", "--conf", "0.3", "--cache", cache]
    assert _target(old) == built
    err = capsys.readouterr().err
    assert "--max-batch is deprecated, use --batch-size" in err and "--cache is deprecated, use --trt-cache" in err
    # the defaults agree too (fp32, batch 16, auto NMS, next to the model)
    assert _target(["build", "--model", str(DYN)]) == _target(["detect", "--model", str(DYN), "--engine",
                                                               "tensorrt", "--input", "i", "--output", "o"])
    # and any option that changes the engine changes the key
    assert _target([*detect, "--opt-batch", "8"])[0] != built[0]
    assert _target([*detect, "--conf", "0.25"])[0] != built[0]  # EfficientNMS bakes conf in


def test_every_engine_command_takes_the_tensorrt_options():
    """build, detect, serve, eval and bench: the same TensorRT flags with the same defaults,
    each reaching TensorRTConfig."""
    import argparse

    from raydetect.cli import build_parser
    from raydetect.cli.common import TENSORRT_FLAGS
    from raydetect.config import TensorRTConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("build", "detect", "serve", "eval", "bench"):
        p = sub.choices[command]
        flags = {o: a for a in p._actions for o in a.option_strings}
        for name, flag in TENSORRT_FLAGS.items():
            assert flag in flags, (command, flag)
            assert flags[flag].default == TensorRTConfig.model_fields[name].default, (command, flag)
        assert flags["--precision"].default == "fp32" and flags["--batch-size"].default == 16, command
