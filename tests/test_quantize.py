"""raydetect quantize: INT8 QDQ from calibration on defects/train, the mAP gate on defects/test,
the calibration table (deterministic, round-trips, what the model is built from), the float tail,
and clear errors for bad calibration input."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from raydetect.config import ConfigError
from raydetect.model_card import ModelCard, UnsupportedModelError
from raydetect.quantize import (
    CalibrationError,
    CalibrationTable,
    calibrate,
    float_tail_nodes,
    load_table,
    quantize,
    save_table,
    select_calibration_images,
)
from tests.conftest import DEFECTS, MODELS

MODEL = str(MODELS / "yolov8n-defects.onnx")
TRAIN = str(DEFECTS / "images" / "train")
DATA_YAML = str(DEFECTS / "data.yaml")

# CI-sized gate: calibrate on 32 train images with the default method (entropy), evaluate on 100
# test images (a seeded sample covering all 8 classes). With fewer than ~100 test images a single
# box moves mAP@0.5 by about a point, so the subset would be noise. The full-size run (300
# calibration images, all 800 test images) is in benchmarks/results/quantize_defects_int8.json.
CALIB_IMAGES = 32
EVAL_IMAGES = 100
METHOD = "entropy"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, data_dir):
    """One CLI run: calibrate, quantize, evaluate FP32 vs INT8, gate at 1.0 point."""
    from raydetect.cli import main

    d = tmp_path_factory.mktemp("quant")
    out = d / "defects_int8.onnx"
    rc = main(["quantize", "--model", MODEL, "--calib", TRAIN, "--images", str(CALIB_IMAGES),
               "--method", METHOD, "--out", str(out), "--eval-data", DATA_YAML, "--eval-limit", str(EVAL_IMAGES),
               "--max-map-drop", "1.0", "--report", str(d / "report.json")])
    report = json.loads((d / "report.json").read_text())
    return rc, out, report


def test_gate_int8_within_one_point_of_fp32(quantized):
    rc, out, rep = quantized
    assert rc == 0, rep
    assert rep["fp32"]["images"] == rep["int8"]["images"] == EVAL_IMAGES
    assert rep["fp32"]["map50"] > 0.4  # the trained model, not noise
    drop = (rep["fp32"]["map50"] - rep["int8"]["map50"]) * 100
    assert drop == pytest.approx(rep["drop_points"], abs=1e-3)
    assert drop <= 1.0 and rep["passed"] is True
    assert rep["method"] == METHOD and rep["int8"]["precision"] == "int8"
    assert rep["calibration"] == {"root": TRAIN, "asked": CALIB_IMAGES, "used": CALIB_IMAGES,
                                  "available": 4700, "unreadable": [], "seed": 0}


def test_int8_artefact_smaller_source_shapes_and_float_tail(quantized):
    rc, out, rep = quantized
    assert rc == 0
    assert rep["fp32_bytes"] / out.stat().st_size >= 3.5
    assert rep["exclusion_rule"].startswith("float-tail")
    # the INT8 model declares the source's shapes (static batch 1), as tools that size batches
    # from the declaration (Ultralytics' val) expect; raydetect rewrites the batch at load
    import onnxruntime as ort

    def io(path):
        g = onnx.load(str(path)).graph
        return [[d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in [*g.input, *g.output]]

    assert io(out) == io(MODEL) == [[1, 3, 640, 640], [1, 12, 8400]]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 640, 640]
    y = sess.run(None, {"images": np.zeros((1, 3, 640, 640), np.float32)})[0]
    assert y.shape == (1, 12, 8400)
    card = ModelCard.load(str(out))
    assert card.static_batch and card.batch_rewritten and card.names[7] == "hd"  # metadata kept
    meta = json.loads(card.metadata["raydetect_quantization"])
    assert meta["method"] == METHOD and meta["exclusions"] == rep["exclusions"]
    m = onnx.load(str(out))
    inits = {t.name: t for t in m.graph.initializer}
    convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}
    # excluded convs read float weights; the others read dequantized INT8 weights
    for name in ("/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv3.2/cv3.2.2/Conv", "/model.22/dfl/conv/Conv"):
        assert name in rep["exclusions"]
        assert inits[convs[name].input[1]].data_type == onnx.TensorProto.FLOAT
    w = convs["/model.0/conv/Conv"].input[1]
    assert w not in inits  # produced by a DequantizeLinear of an INT8 initializer
    dq = next(n for n in m.graph.node if w in n.output)
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8

    from raydetect.detector import Detector

    det = Detector({"model": str(out), "engine": "onnxruntime", "batch_size": 4})
    assert det.info()["precision"] == "int8" and det.batching_verified
    img = (DEFECTS / "images" / "test").iterdir().__next__().read_bytes()
    res = det.detect([img, img, img], conf=0.25)
    assert res[0].ok and res[0].detections == res[1].detections == res[2].detections


def test_model_is_built_from_the_saved_table(quantized):
    rc, out, rep = quantized
    table = load_table(rep["table"])
    assert table.method == METHOD and len(table.images) == CALIB_IMAGES
    assert table.model_sha256 == ModelCard.load(MODEL).sha256
    m = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    checked = 0
    for n in m.graph.node:
        # (Split and MaxPool outputs reuse their input's scale by the quantizer's design)
        if n.op_type == "QuantizeLinear" and n.input[0] in table.ranges and \
                producer.get(n.input[0]) not in ("Split", "MaxPool"):
            lo, hi = table.ranges[n.input[0]]
            lo, hi = min(lo, 0.0), max(hi, 0.0)  # uint8 asymmetric: the range includes 0
            assert float(inits[n.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-5)
            checked += 1
    assert checked > 150


def test_calibration_table_byte_identical_and_round_trips(tmp_path, data_dir):
    card = ModelCard.load(MODEL)
    texts = []
    for run in range(2):
        calib = select_calibration_images(TRAIN, 6, seed=7)
        (tmp_path / f"w{run}").mkdir()
        table = calibrate(card, calib, "entropy", workdir=str(tmp_path / f"w{run}"), batch=3, seed=7)
        save_table(table, str(tmp_path / f"t{run}.json"))
        texts.append((tmp_path / f"t{run}.json").read_bytes())
    assert texts[0] == texts[1]
    loaded = load_table(str(tmp_path / "t0.json"))
    assert loaded.ranges == table.ranges and loaded.images == table.images and len(loaded.ranges) > 100
    assert loaded.to_json().encode() == texts[0]
    td = loaded.tensors_data()  # what quantize_static consumes
    name = next(iter(loaded.ranges))
    assert (float(td[name].range_value[0]), float(td[name].range_value[1])) == loaded.ranges[name]
    assert json.loads(texts[0])["ranges"] == dict(sorted(json.loads(texts[0])["ranges"].items()))
    other = select_calibration_images(TRAIN, 6, seed=8)
    assert other.files != select_calibration_images(TRAIN, 6, seed=7).files


def test_calibration_table_rejects_other_files():
    with pytest.raises(CalibrationError, match="not a calibration table"):
        CalibrationTable.from_json("{ nope", "x.json")
    with pytest.raises(CalibrationError, match="raydetect-calibration-table"):
        CalibrationTable.from_json('{"format": "something else"}', "x.json")


def test_float_tail_rule_finds_head_ends(data_dir):
    m = onnx.load(MODEL)
    tail = float_tail_nodes(m)
    final = {f"/model.22/cv{b}.{i}/cv{b}.{i}.2/Conv" for b in (2, 3) for i in range(3)}
    assert final <= set(tail)
    assert {"/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid", "/model.22/Concat_3"} <= set(tail)
    assert "/model.22/cv2.0/cv2.0.1/conv/Conv" not in tail  # the branch body is quantized
    assert sum(n.op_type == "Conv" for n in m.graph.node if n.name in tail) == 7
    assert all(n.startswith("/model.22/") for n in tail)  # all inside the Detect module
    y11 = onnx.load(str(MODELS / "yolo11n-dynamic-random.onnx"))
    t11 = float_tail_nodes(y11)  # dynamic export: anchors from Shape ops must not leak into the neck
    assert sum(n.op_type == "Conv" for n in y11.graph.node if n.name in t11) == 7
    assert all(n.startswith("/model.23/") for n in t11)


# --- bad calibration input ------------------------------------------------------------------------


def _calib_dir(tmp_path, good: int, bad: bool = True):
    d = tmp_path / "calib"
    d.mkdir()
    for p in sorted((DEFECTS / "images" / "train").iterdir())[:good]:
        shutil.copy(p, d / p.name)
    if bad:
        jpg = next((DEFECTS / "images" / "train").iterdir()).read_bytes()
        (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
        (d / "notes.jpg").write_text("this is text, not a JPEG")
        (d / "empty.png").write_bytes(b"")
    return d


def test_unreadable_images_are_counted_and_skipped(tmp_path, data_dir):
    d = _calib_dir(tmp_path, 5)
    bad = {"empty.png", "notes.jpg", "truncated.jpg"}
    cs = select_calibration_images(str(d), 5, seed=0)
    assert len(cs.files) == 5 and not {f.rsplit("/", 1)[1] for f in cs.files} & bad
    assert {b["uri"].rsplit("/", 1)[1] for b in cs.unreadable} <= bad  # those met before 5 good ones
    every = select_calibration_images(str(d), 8, allow_fewer=True, min_images=5)  # scans all files
    assert {b["uri"].rsplit("/", 1)[1] for b in every.unreadable} == bad
    errors = {b["uri"].rsplit("/", 1)[1]: b["error"] for b in every.unreadable}
    assert "truncated" in errors["truncated.jpg"] and "empty" in errors["empty.png"]


def test_fewer_usable_images_than_asked_is_an_error_unless_allowed(tmp_path, caplog, data_dir):
    d = _calib_dir(tmp_path, 5)
    with pytest.raises(CalibrationError, match=r"asked for 8 calibration images but only 5 of the 8 .*\(3 unreadable"):
        select_calibration_images(str(d), 8)
    cs = select_calibration_images(str(d), 8, allow_fewer=True, min_images=4)
    assert len(cs.files) == 5 and "proceeding with 5" in caplog.text
    with pytest.raises(CalibrationError, match="at least 6 are needed"):
        select_calibration_images(str(d), 8, allow_fewer=True, min_images=6)
    with pytest.raises(CalibrationError, match="not found"):
        select_calibration_images(str(tmp_path / "nope"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        select_calibration_images(str(tmp_path / "empty"), 8)


def test_cli_reports_bad_calibration_input(tmp_path, capsys, data_dir):
    from raydetect.cli import main

    d = _calib_dir(tmp_path, 2)
    rc = main(["quantize", "--model", MODEL, "--calib", str(d), "--images", "10", "--out", str(tmp_path / "o.onnx")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "asked for 10 calibration images but only 2" in err and "--allow-fewer" in err
    assert not (tmp_path / "o.onnx").exists()


def _tiny_onnx(path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "tiny", [x], [y])
    onnx.save(helper.make_model(g), str(path))


def test_wrong_model_gives_the_model_card_error(tmp_path, data_dir):
    d = _calib_dir(tmp_path, 2, bad=False)
    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \x00\x01")
    base = {"calib": str(d), "images": 2, "out": str(tmp_path / "o.onnx")}
    with pytest.raises(UnsupportedModelError, match="detection output"):
        quantize({**base, "model": str(tmp_path / "tiny.onnx")})
    with pytest.raises(UnsupportedModelError, match="not an ONNX model"):
        quantize({**base, "model": str(tmp_path / "junk.onnx")})
    with pytest.raises(ConfigError, match="quantize.exclude: no node named"):
        quantize({**base, "model": MODEL, "exclude": ["/model.99/nope"]})
    with pytest.raises(ConfigError, match="quantize.method"):
        quantize({**base, "model": MODEL, "method": "kl"})
    with pytest.raises(ConfigError, match="quantize.images"):
        quantize({**base, "model": MODEL, "images": 0})


def test_already_quantized_model_is_refused(quantized, tmp_path):
    rc, out, rep = quantized
    d = _calib_dir(tmp_path, 2, bad=False)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize({"model": str(out), "calib": str(d), "images": 2, "out": str(tmp_path / "o.onnx")})


def test_gate_fails_on_unrepresentative_calibration(tmp_path, capsys, data_dir):
    """Calibrating on flat black images gives ranges far too narrow for real images: the gate
    must catch the collapse, exit non-zero and write no model."""
    from raydetect.cli import main

    d = tmp_path / "black"
    d.mkdir()
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), np.zeros((144, 780, 3), np.uint8))
    out = tmp_path / "bad_int8.onnx"
    rc = main(["quantize", "--model", MODEL, "--calib", str(d), "--images", "4", "--method", "minmax",
               "--out", str(out), "--eval-data", DATA_YAML, "--eval-limit", "40",
               "--report", str(tmp_path / "r.json")])
    assert rc == 1
    assert "no model written" in capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] is False and rep["drop_points"] > 1.0 and rep["out"] is None
    assert rep["method"] == "minmax" and rep["exclusions"]
    assert not out.exists() and not (tmp_path / "bad_int8.calib.json").exists()


def test_try_methods_keeps_the_best_passing_method(tmp_path, data_dir):
    d = _calib_dir(tmp_path, 4, bad=False)
    rep = quantize({"model": MODEL, "calib": str(d), "images": 4, "out": str(tmp_path / "best.onnx"),
                    "method": "minmax", "try_methods": True, "eval_data": DATA_YAML, "eval_limit": 20,
                    "max_map_drop": 100.0})
    assert [a.method for a in rep.attempts] == ["minmax", "entropy", "percentile"]
    assert all(a.passed for a in rep.attempts)
    best = max(rep.attempts, key=lambda a: a.int8_map50)
    assert rep.method == best.method and rep.int8["map50"] == best.int8_map50
    assert rep.out == str(tmp_path / "best.onnx") and (tmp_path / "best.onnx").exists()
    assert load_table(rep.table).method == best.method
    assert json.loads(ModelCard.load(rep.out).metadata["raydetect_quantization"])["method"] == best.method
    with pytest.raises(ConfigError, match="try_methods: needs eval_data"):
        quantize({"model": MODEL, "calib": str(d), "images": 4, "out": str(tmp_path / "x.onnx"), "try_methods": True})


def test_fp32_evaluation_is_reused_from_eval_and_earlier_runs(tmp_path, caplog, data_dir):
    """The documented flow: ``raydetect eval`` then ``raydetect quantize`` on the same model,
    images and settings evaluates FP32 once; so does a second quantize run."""
    import logging

    from raydetect.cli import main

    cache = tmp_path / "cache"
    rc = main(["eval", "--model", MODEL, "--data", DATA_YAML, "--split", "test", "--limit", "8",
               "--eval-cache", str(cache), "--report", str(tmp_path / "eval.json")])
    assert rc == 0
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1
    evaluated = json.loads((tmp_path / "eval.json").read_text())

    opts = {"model": MODEL, "calib": TRAIN, "images": 4, "eval_data": DATA_YAML, "eval_limit": 8,
            "max_map_drop": 100.0, "eval_cache": str(cache)}
    caplog.set_level(logging.INFO, logger="raydetect.quantize")
    first = quantize({**opts, "out": str(tmp_path / "a.onnx")})
    assert first.fp32_reused == str(entries[0])  # eval's result, not a new FP32 evaluation
    assert "FP32: reusing the evaluation in" in caplog.text
    assert first.fp32["map50"] == evaluated["map50"] and first.fp32["images"] == 8
    assert first.int8["precision"] == "int8" and first.int8["images"] == 8  # INT8 is evaluated

    # another sample (other seed): evaluated, then cached, then reused by the next run
    caplog.clear()
    other = quantize({**opts, "out": str(tmp_path / "b.onnx"), "seed": 1})
    assert other.fp32_reused is None and "FP32: mAP@0.5" in caplog.text
    assert len(list(cache.glob("*.json"))) == 2
    caplog.clear()
    again = quantize({**opts, "out": str(tmp_path / "c.onnx"), "seed": 1})
    assert again.fp32_reused is not None and "FP32: mAP@0.5" not in caplog.text
    assert again.fp32 == other.fp32
    # --no-reuse-fp32 evaluates again
    caplog.clear()
    fresh = quantize({**opts, "out": str(tmp_path / "d.onnx"), "seed": 1, "reuse_fp32": False})
    assert fresh.fp32_reused is None and "FP32: mAP@0.5" in caplog.text
    assert fresh.fp32["map50"] == other.fp32["map50"]
