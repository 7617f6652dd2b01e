"""Model card: metadata, head layouts, the dynamic-batch rewrite and unsupported graphs."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from raydetect.config import ConfigError, DetectorConfig, validate
from raydetect.detector import Detector
from raydetect.model_card import ModelCard, UnsupportedModelError
from tests.conftest import DATA, MODELS


def tiny_model(*, layout="yolov8", mix_batch=False, names="{0: 'a', 1: 'b'}", in_ch=3,
               extra_output=False, head_output=True, meta=None) -> bytes:
    """A small real ONNX graph with a YOLO-shaped output, static batch 1, imgsz 32."""
    nc = 2
    c_out = 4 + nc if layout == "yolov8" else 5 + nc
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((c_out, in_ch, 1, 1)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, c_out, -1], np.int64), "shape")
    nodes = []
    x = "images"
    if mix_batch:  # averages over the batch: an image's output depends on its neighbours
        nodes.append(helper.make_node("ReduceMean", ["images"], ["m"], axes=[0], keepdims=1))
        nodes.append(helper.make_node("Add", ["images", "m"], ["xm"]))
        x = "xm"
    nodes.append(helper.make_node("Conv", [x, "w"], ["c"]))
    nodes.append(helper.make_node("Sigmoid", ["c"], ["cs"]))
    nodes.append(helper.make_node("Reshape", ["cs", "shape"], ["r" if layout == "yolov5" else "output0"]))
    out_shape = [1, c_out, 1024]
    if layout == "yolov5":
        nodes.append(helper.make_node("Transpose", ["r"], ["output0"], perm=[0, 2, 1]))
        out_shape = [1, 1024, c_out]
    outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)] if head_output else []
    if extra_output:
        nodes.append(helper.make_node("Identity", ["c"], ["protos"]))
        outputs.append(helper.make_tensor_value_info("protos", TensorProto.FLOAT, [1, c_out, 32, 32]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, in_ch, 32, 32])],
        outputs, initializer=[w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    props = {"names": names, "imgsz": "[32, 32]", "stride": "32", "task": "detect", **(meta or {})}
    for k, v in props.items():
        if v is not None:
            model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_real_export_metadata():
    card = ModelCard.load(str(MODELS / "yolov8n-defects.onnx"))
    assert card.names == {0: "fi", 1: "ke", 2: "ka", 3: "ib", 4: "kb", 5: "hc", 6: "hb", 7: "hd"}
    assert card.imgsz == (640, 640) and card.stride == 32 and card.layout == "yolov8"
    assert card.static_batch and card.batch_rewritten
    assert card.sha256 == "f737ca602fa980a21c6af75202253b0e3fa1c8d6220be64ff8591bbb1f68c941"
    dyn = ModelCard.load(str(MODELS / "yolo11n-dynamic-random.onnx"))
    assert not dyn.static_batch and not dyn.batch_rewritten and dyn.num_classes == 80


@pytest.mark.parametrize("name", ["yolov8n-random.onnx", "yolov8n-defects.onnx"])
def test_rewritten_graph_same_output_alone_and_in_batch_of_16(name):
    card = ModelCard.load(str(MODELS / name))
    rewritten = ort.InferenceSession(card.onnx_bytes, providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((16, 3, 640, 640), dtype=np.float32)
    batch = rewritten.run(None, {"images": x})[0]
    assert batch.shape[0] == 16
    for i in (0, 7, 15):
        alone = original.run(None, {"images": x[i : i + 1]})[0]
        np.testing.assert_allclose(batch[i : i + 1], alone, rtol=1e-4, atol=1e-3)


def test_yolov5_layout_and_names():
    card = ModelCard.from_bytes(tiny_model(layout="yolov5"))
    assert card.layout == "yolov5" and card.names == {0: "a", 1: "b"}
    card = ModelCard.from_bytes(tiny_model(layout="yolov8", names=None))
    assert card.layout == "yolov8" and card.names == {0: "class0", 1: "class1"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_ch": 1}, r"expected one NCHW input with 3 channels; found inputs \[\('images', \[1, 1, 32, 32\]\)\]"),
        ({"extra_output": True, "head_output": False},
         r"found no such outputs; inputs .* outputs \[\('protos', \[1, 6, 32, 32\]\)\]"),
        ({"meta": {"task": "segment"}}, "task 'segment' is not supported"),
        ({"meta": {"end2end": "True"}}, "end-to-end export with NMS inside"),
        ({"names": "{0: 'a', 1: 'b', 2: 'c'}"}, r"matches neither a YOLOv8/YOLO11 head \[B, 4\+3, N\]"),
    ],
)
def test_unsupported_graphs_clear_errors(kwargs, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelCard.from_bytes(tiny_model(**kwargs), "tiny.onnx")


def with_raw_head_outputs(path) -> bytes:
    """``path`` (the YOLOv5 COCO export, detection output only) with the three raw head maps
    ``[1, 3, H, W, 85]`` added as outputs, as YOLOv5's own export emits them."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    maps = [v for v in model.graph.value_info
            if v.name.startswith("onnx::Sigmoid_") and len(v.type.tensor_type.shape.dim) == 5]
    assert len(maps) == 3
    model.graph.output.extend(maps)
    return model.SerializeToString()


def test_extra_output_export_picks_the_detection_output(tmp_path, caplog):
    src = MODELS / "yolov5n-coco.onnx"
    extra = tmp_path / "yolov5n-coco-extra.onnx"
    extra.write_bytes(with_raw_head_outputs(src))
    assert len(onnx.load(str(extra)).graph.output) == 4
    with caplog.at_level(logging.INFO, logger="raydetect.model_card"):
        card = ModelCard.load(str(extra))
    assert "using detection output 'output0' [1, 25200, 85]; ignoring the other outputs" in caplog.text
    assert card.output_name == "output0" and card.layout == "yolov5" and card.num_classes == 80
    assert [o.name for o in onnx.load_model_from_string(card.onnx_bytes).graph.output] == ["output0"]
    bus = (DATA / "images" / "bus.jpg").read_bytes()
    a = Detector({"model": str(src), "conf": 0.25}).detect([bus])[0]
    b = Detector({"model": str(extra), "conf": 0.25}).detect([bus])[0]
    assert {"bus", "car"} <= {d.class_name for d in a.detections}
    assert a.detections == b.detections


def test_not_onnx():
    with pytest.raises(UnsupportedModelError, match="not an ONNX model"):
        ModelCard.from_bytes(b"\x00garbage" * 10, "x.onnx")


def test_batching_check_falls_back_to_single_images(tmp_path, caplog):
    path = tmp_path / "mix.onnx"
    path.write_bytes(tiny_model(mix_batch=True))
    with caplog.at_level(logging.WARNING):
        det = Detector({"model": str(path), "batch_size": 8})
    assert det.batching_verified is False and det.chunk == 1
    assert "running images one at a time" in caplog.text
    ok = tmp_path / "ok.onnx"
    ok.write_bytes(tiny_model())
    det = Detector({"model": str(ok), "batch_size": 8})
    assert det.batching_verified is True and det.chunk == 8


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"detector\.conf: Input should be less than or equal to 1 \(got 3\.0\)"):
        validate(DetectorConfig, {"model": "m.onnx", "conf": 3.0}, "detector")
    with pytest.raises(ConfigError, match=r"detector\.engine: Input should be 'auto', 'onnxruntime'"):
        validate(DetectorConfig, {"model": "m.onnx", "engine": "tensorflow"}, "detector")
    with pytest.raises(ConfigError, match=r"detector\.device: Value error, must be 'cpu', 'cuda' or 'cuda:N'"):
        validate(DetectorConfig, {"model": "m.onnx", "device": "gpu0"}, "detector")
    with pytest.raises(ConfigError, match=r"detector\.batchsize: Extra inputs are not permitted"):
        validate(DetectorConfig, {"model": "m.onnx", "batchsize": 4}, "detector")
