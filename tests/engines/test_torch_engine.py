"""The torch engine and the GPU data path, run on the CPU (device 'cpu') so CI checks them:
conversion vs ONNX Runtime, the torch letterbox vs the CPU one, batched torch NMS vs the NumPy
NMS, same errors and the same Parquet schema as the CPU path. CUDA-only behaviour (FP16,
nvJPEG, CUDA graphs) is in tests/test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnx2torch")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raydetect.config import ConfigError, DetectorConfig, JobConfig, validate  # noqa: E402
from raydetect.detector import Detector  # noqa: E402
from raydetect.engines import EngineUnavailableError, create_engine, resolve_engine_name  # noqa: E402
from raydetect.engines.torch import TorchEngine, graph_batch_sizes  # noqa: E402
from raydetect.model_card import ModelCard, batching_check_input  # noqa: E402
from raydetect.onnx.fold import fold_for_shape  # noqa: E402
from raydetect.onnx.to_torch import convert  # noqa: E402
from raydetect.stages.gpu_postprocess import batched_postprocess  # noqa: E402
from raydetect.stages.gpu_preprocess import GpuPreprocessor, letterbox_tensors, parse_jpeg_header, probe_jpeg  # noqa: E402
from raydetect.stages.postprocess import postprocess  # noqa: E402
from raydetect.stages.preprocess import decode_image, letterbox, letterbox_geometry, to_tensor  # noqa: E402
from tests.conftest import DEFECTS, MODELS, photo_paths  # noqa: E402
from tests.gpu_helpers import (  # noqa: E402
    BIG,
    assert_rows_equal,
    bad_inputs,
    expected_error,
    huge_jpeg,
    letterboxed_photos,
    photo_bytes,
    rel_err,
    synthetic_head,
    variant_jpegs,
)

STATIC = MODELS / "yolov8n-random.onnx"  # Ultralytics static export (batch 1)
DYNAMIC = MODELS / "yolov8n-dynamic-random.onnx"  # dynamic batch/H/W: shape ops in the graph
TRAINED = MODELS / "yolov8n-defects.onnx"
HAS_CUDA = torch.cuda.is_available()


def cpu_config(model=STATIC, **kw) -> DetectorConfig:
    kw = {"conf": 1e-4, "batch_size": 2, **kw}
    return DetectorConfig(model=str(model), engine="torch", device="cpu", **kw)


@pytest.fixture(scope="module")
def card():
    return ModelCard.load(str(STATIC))


@pytest.fixture(scope="module")
def engine(card):
    return TorchEngine(card, cpu_config())


@pytest.fixture(scope="module")
def ort_session(card):
    return ort.InferenceSession(card.onnx_bytes, providers=["CPUExecutionProvider"])


# --- conversion ---------------------------------------------------------------------------


def test_fold_turns_a_dynamic_export_into_the_static_graph():
    model = onnx.load(str(DYNAMIC))
    name = model.graph.input[0].name
    folded, n = fold_for_shape(model, name, (2, 3, 640, 640))
    ops = {node.op_type for node in folded.graph.node}
    assert n > 50
    assert not ops & {"Shape", "Gather", "Range", "Expand", "ConstantOfShape", "Cast", "Unsqueeze"}, ops
    x = batching_check_input((640, 640), n=2)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {name: x})[0]
    got = ort.InferenceSession(folded.SerializeToString()).run(None, {name: x})[0]
    np.testing.assert_array_equal(got, ref)


def test_converted_graph_reads_no_tensor_on_the_host():
    """CUDA-graph capture fails on any device→host read (.tolist(), .item(), .cpu()). On the
    'meta' device every such read raises, so a forward pass there proves there are none."""
    import onnx2torch

    card = ModelCard.load(str(DYNAMIC))
    gm, report = convert(card.onnx_bytes, card.input_name, card.imgsz)
    assert report["host_reading_modules"] == [] and report["modules_frozen"] >= 20
    with torch.no_grad():
        out = gm.to("meta")(torch.empty(3, 3, 640, 640, device="meta"))
    assert tuple(out.shape) == (3, 84, 8400)
    # onnx2torch alone (Split sizes, Reshape targets... read at run time) cannot do that:
    plain = onnx2torch.convert(onnx.load_model_from_string(card.onnx_bytes)).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)), torch.no_grad():
        plain(torch.empty(1, 3, 640, 640, device="meta"))


@pytest.mark.parametrize("model", [STATIC, DYNAMIC], ids=["static-export", "dynamic-export"])
def test_fp32_raw_head_matches_onnxruntime(model, request):
    card = ModelCard.load(str(model))
    eng = request.getfixturevalue("engine") if model == STATIC else TorchEngine(card, cpu_config(model))
    x = letterboxed_photos(2)
    ref = ort.InferenceSession(card.onnx_bytes).run(None, {card.input_name: x})[0]
    out = eng.infer(x)  # NumPy in → NumPy out
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= 1e-4
    assert eng.batch_consistent and eng.max_batch == 2
    # torch tensors in → torch tensor out; a batch larger than max_batch is chunked
    out_t = eng.infer(torch.from_numpy(np.concatenate([x, x[:1]])))
    assert isinstance(out_t, torch.Tensor) and tuple(out_t.shape) == (3, 84, 8400)
    assert rel_err(out_t[2:].numpy(), ref[:1]) <= 1e-4


def test_yolov5_export_runs_and_matches_onnxruntime():
    """A YOLOv5 export holds a 5-D buffer (the anchor grid): the engine's channels-last layout
    applies to the 4-D weights only (``Module.to(memory_format=...)`` refused the module)."""
    model = MODELS / "yolov5n-coco.onnx"
    card = ModelCard.load(str(model))
    x = letterboxed_photos(2)
    ref = ort.InferenceSession(card.onnx_bytes).run(None, {card.input_name: x})[0]
    eng = TorchEngine(card, cpu_config(model))
    assert any(b.dim() == 5 for b in eng.model.buffers())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in eng.model.parameters() if p.dim() == 4)
    assert rel_err(eng.infer(x), ref) <= 1e-4


def test_trained_model_fp32_matches_onnxruntime():
    """Random weights give almost input-independent outputs; the trained model does not."""
    card = ModelCard.load(str(TRAINED))
    paths = sorted((DEFECTS / "images" / "test").glob("*.jpg"))[:2]
    x = to_tensor([letterbox(decode_image(p.read_bytes(), BIG, BIG), 640, 640)[0] for p in paths])
    ref = ort.InferenceSession(card.onnx_bytes).run(None, {card.input_name: x})[0]
    out = TorchEngine(card, cpu_config(TRAINED)).infer(x)
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out[:, 4:], ref[:, 4:]) <= 1e-4  # the class scores alone
    assert np.abs(ref[0] - ref[1]).max() > 0.1  # outputs do depend on the image


def test_jpeg_header_parser_agrees_with_pillow():
    import io

    from PIL import Image

    blobs = photo_bytes() + list(variant_jpegs(photo_bytes()[1]).values())
    blobs += [p.read_bytes() for p in sorted((DEFECTS / "images" / "test").glob("*.jpg"))[:20]]
    checked = 0
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            size, fmt, mode = im.size, im.format, im.mode
            orient = im.getexif().get(0x0112, 1)
            prog = bool(im.info.get("progressive") or im.info.get("progression"))
        info = parse_jpeg_header(b) if fmt == "JPEG" else None
        if fmt != "JPEG":
            assert probe_jpeg(b) is None or not probe_jpeg(b).gpu_ok
            continue
        assert info is not None
        assert (info.width, info.height) == size and info.progressive == prog
        assert info.gpu_ok == (mode in ("RGB", "L") and orient == 1), (mode, orient)
        checked += 1
    assert checked >= 25
    assert parse_jpeg_header(b"\xff\xd8\xff\xe0\x00") is None  # cut inside the header
    assert parse_jpeg_header(bad_inputs(photo_bytes()[0])["jpeg_header_garbage"]) is None


def test_engine_selection_and_refusals(card):
    if not HAS_CUDA:
        assert resolve_engine_name(DetectorConfig(model=str(STATIC))) in ("onnxruntime",)
        with pytest.raises(EngineUnavailableError, match="CUDA"):
            create_engine(card, DetectorConfig(model=str(STATIC), engine="torch"))
    assert resolve_engine_name(DetectorConfig(model=str(STATIC), device="cpu")) == "onnxruntime"
    with pytest.raises(EngineUnavailableError, match="fp16"):
        TorchEngine(card, cpu_config(precision="fp16"))
    with pytest.raises(EngineUnavailableError, match="int8"):
        TorchEngine(card, cpu_config(precision="int8"))
    assert graph_batch_sizes(64) == [1, 8, 16, 32, 64]
    assert graph_batch_sizes(20) == [1, 8, 16, 20]
    assert graph_batch_sizes(1) == [1]


def test_engine_metadata(engine):
    md = engine.metadata()
    assert md["engine"] == "torch" and md["device"] == "cpu" and md["precision"] == "fp32"
    assert md["cuda_graph_batches"] == [] and md["host_reading_modules"] == []


# --- letterbox ----------------------------------------------------------------------------


def _rgb_tensor(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_letterbox_matches_cpu_letterbox(dtype):
    rng = np.random.default_rng(0)
    imgs = [decode_image(b, BIG, BIG) for b in photo_bytes()]  # downscales, several sizes
    for h, w in [(100, 37), (300, 200), (33, 640), (640, 640), (479, 641), (1000, 1)]:  # upscales, edges
        noise = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        imgs.append(np.ascontiguousarray(np.maximum(noise, 0)))
    imgs.append(imgs[0].copy())  # two images of one size are resized together
    out, geoms = letterbox_tensors([_rgb_tensor(im) for im in imgs], 640, 640, getattr(torch, dtype))
    assert out.dtype == getattr(torch, dtype) and tuple(out.shape) == (len(imgs), 3, 640, 640)
    tol = 1 / 255 + (1e-6 if dtype == "float32" else 2e-3)  # one grey level (+ fp16 rounding)
    for k, im in enumerate(imgs):
        boxed, g = letterbox(im, 640, 640)
        assert geoms[k] == g == letterbox_geometry(im.shape[0], im.shape[1], 640, 640)
        diff = np.abs(out[k].float().numpy() - to_tensor([boxed])[0])
        assert diff.max() <= tol, (im.shape, diff.max() * 255)


# --- NMS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
@pytest.mark.parametrize(
    "conf,iou,max_det,max_nms", [(0.1, 0.5, 300, 30000), (0.05, 0.7, 20, 500), (0.3, 0.45, 1000, 100)]
)
def test_batched_nms_equals_numpy_postprocess(layout, conf, iou, max_det, max_nms):
    pred = synthetic_head(layout, np.random.default_rng(int(conf * 100) + len(layout)))
    got = batched_postprocess(torch.from_numpy(pred), layout, conf, iou, max_det, max_nms=max_nms)
    assert len(got) == len(pred)
    for i in range(len(pred)):
        assert_rows_equal(got[i], postprocess(pred[i], layout, conf, iou, max_det, max_nms=max_nms))


def test_batched_nms_on_model_output(ort_session, card):
    pred = ort_session.run(None, {card.input_name: letterboxed_photos(3)})[0]
    for conf, max_det in [(1e-4, 300), (1e-4, 7), (0.9, 300)]:
        got = batched_postprocess(torch.from_numpy(pred), card.layout, conf, 0.7, max_det)
        for i in range(len(pred)):
            assert_rows_equal(got[i], postprocess(pred[i], card.layout, conf, 0.7, max_det))
    assert sum(len(r[0]) for r in batched_postprocess(torch.from_numpy(pred), card.layout, 1e-4, 0.7, 300)) > 0


# --- the data path on the CPU -------------------------------------------------------------


def test_preprocessor_gives_the_cpu_paths_errors():
    good = photo_bytes()[0]
    inputs = {"good": good, **bad_inputs(good), "huge": huge_jpeg(), "png_too_big": good}
    max_pixels, max_bytes = 5_000_000, len(good) - 1  # the good photo itself is over max_bytes
    items = list(inputs.values())
    pp = GpuPreprocessor((640, 640), device="cpu", max_pixels=max_pixels, max_bytes=max_bytes)
    res = pp.prepare(items)
    for k, (name, img) in enumerate(inputs.items()):
        assert res.errors[k] == expected_error(img, max_pixels, max_bytes), name
    assert all(e is not None for e in res.errors)
    assert res.tensor is None and res.rows == []


def test_detector_on_torch_cpu_matches_onnxruntime_detector():
    blobs = photo_bytes()[:2]
    arr = decode_image(blobs[0], BIG, BIG)
    images = [*blobs, b"", arr, blobs[1][:2000], np.zeros((4, 4), np.float64)]
    torch_det = Detector(cpu_config(batch_size=2))
    ort_det = Detector({"model": str(STATIC), "engine": "onnxruntime", "conf": 1e-4, "batch_size": 2})
    assert torch_det.gpu is not None and ort_det.gpu is None
    got, ref = torch_det.detect(images), ort_det.detect(images)
    assert torch_det.gpu_counters["cpu_decoded"] == 3 and torch_det.gpu_counters["nvjpeg"] == 0
    for g, r in zip(got, ref, strict=True):
        assert (g.error, g.height, g.width) == (r.error, r.height, r.width)
        assert len(g.detections) == len(r.detections)
        for a, b in zip(g.detections, r.detections, strict=True):
            assert a.class_id == b.class_id and a.class_name == b.class_name
            assert max(abs(a.x1 - b.x1), abs(a.y1 - b.y1), abs(a.x2 - b.x2), abs(a.y2 - b.y2)) <= 1.0
            assert abs(a.score - b.score) <= 1e-3 * max(b.score, 1e-6) + 1e-6
    assert sum(len(r.detections) for r in got) > 0
    assert torch_det.to_table(got).schema == ort_det.to_table(ref).schema


def test_job_config_new_fields_are_validated():
    base = {"input": "x", "output": "y", "detector": {"model": "m.onnx"}}
    cfg = validate(JobConfig, {**base, "actor_concurrency": 2, "rows_per_call": 256}, "job")
    assert cfg.actor_concurrency == 2 and cfg.rows_per_call == 256
    with pytest.raises(ConfigError, match=r"job\.actor_concurrency"):
        validate(JobConfig, {**base, "actor_concurrency": 0}, "job")
    with pytest.raises(ConfigError, match=r"job\.rows_per_call"):
        validate(JobConfig, {**base, "rows_per_call": 0}, "job")
    import argparse

    from raydetect.cli.detect import add_job_args, job_config

    p = argparse.ArgumentParser()
    add_job_args(p)
    args = p.parse_args(["--input", "x", "--output", "y", "--model", "m.onnx", "--actor-concurrency", "2",
                         "--rows-per-call", "256"])
    assert (job_config(args).actor_concurrency, job_config(args).rows_per_call) == (2, 256)


def test_job_parquet_schema_is_the_same_on_both_paths(ray_local, tmp_path):
    """The Ray Data job with the torch engine (GPU data path, here on the CPU; threaded actor,
    several chunks per call) writes the same columns as the ONNX Runtime job."""
    from raydetect.job.run import run_job

    src = tmp_path / "in"
    src.mkdir()
    for p in photo_paths()[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"")
    runs = {}
    for name, det, extra in [
        ("torch", {"engine": "torch", "device": "cpu"}, {"actor_concurrency": 2, "rows_per_call": 3}),
        ("onnxruntime", {"engine": "onnxruntime"}, {}),
    ]:
        cfg = JobConfig(
            input=str(src),
            output=str(tmp_path / name),
            detector=DetectorConfig(model=str(STATIC), conf=1e-4, batch_size=1, **det),
            num_cpus=0.5,
            progress=False,
            **extra,
        )
        summary = run_job(cfg)
        assert summary.images == 3 and summary.errors == 1
        runs[name] = pq.read_table(tmp_path / name)
    a, b = runs["torch"], runs["onnxruntime"]
    assert a.schema == b.schema
    assert set(a.column("engine").to_pylist()) == {"torch"}

    def counts(t):
        return {u: len(d or []) for u, d in zip(t.column("uri").to_pylist(), t.column("detections").to_pylist(), strict=True)}

    assert counts(a) == counts(b)
