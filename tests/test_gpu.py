"""GPU path on a real CUDA device: FP32/FP16 torch engine vs ONNX Runtime, CUDA-graph replay vs
eager, nvJPEG decode vs the CPU decoder (and the per-image CPU fallbacks), letterbox and NMS on
the GPU, end-to-end detections vs the CPU path, and Ray actors that each see one GPU.

Skipped without torch or without a CUDA device."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnx2torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import onnxruntime as ort  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raydetect.config import DetectorConfig, JobConfig  # noqa: E402
from raydetect.detector import Detector  # noqa: E402
from raydetect.engines import resolve_engine_name  # noqa: E402
from raydetect.engines.torch import TorchEngine  # noqa: E402
from raydetect.job.run import run_job  # noqa: E402
from raydetect.model_card import ModelCard  # noqa: E402
from raydetect.stages.gpu_postprocess import batched_postprocess  # noqa: E402
from raydetect.stages.gpu_preprocess import GpuPreprocessor, letterbox_tensors  # noqa: E402
from raydetect.stages.postprocess import postprocess  # noqa: E402
from raydetect.stages.preprocess import decode_image, letterbox, to_tensor  # noqa: E402
from tests.conftest import DEFECTS, MODELS, photo_paths  # noqa: E402
from tests.gpu_helpers import (  # noqa: E402
    BIG,
    assert_rows_equal,
    bad_inputs,
    expected_error,
    letterboxed_photos,
    photo_bytes,
    rel_err,
    synthetic_head,
    variant_jpegs,
)


def defect_jpegs(n: int) -> list:
    """The first ``n`` defect test JPEGs (grey, baseline): decode inputs only; skips where the
    set is absent (a device run that did not carry it)."""
    paths = sorted((DEFECTS / "images" / "test").glob("*.jpg"))[:n]
    if not paths:
        pytest.skip(f"no defect test images under {DEFECTS}")
    return paths


STATIC = MODELS / "yolov8n-random.onnx"
TRAINED = MODELS / "yolov8n-defects.onnx"


def gpu_config(model=STATIC, **kw) -> DetectorConfig:
    """The eager engine (CUDA graphs of the converted module); the compiled one has its own tests."""
    kw = {"engine": "torch", "device": "cuda", "batch_size": 16, "torch": {"compile": "off"}, **kw}
    return DetectorConfig(model=str(model), **kw)


@pytest.fixture(scope="module")
def card():
    if not STATIC.exists():  # a device run that carried only the trained model
        pytest.skip(f"{STATIC.name} is not under {MODELS}")
    return ModelCard.load(str(STATIC))


@pytest.fixture(scope="module")
def engines(card):
    return {p: TorchEngine(card, gpu_config(precision=p)) for p in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def photos_ref(card):
    x = letterboxed_photos()
    ref = ort.InferenceSession(card.onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {card.input_name: x})[0]
    return x, ref


def test_raw_head_fp32_and_fp16_vs_onnxruntime(engines, photos_ref):
    x, ref = photos_ref
    errs = {}
    for p, eng in engines.items():
        out = eng.infer(torch.from_numpy(x).cuda())
        assert out.is_cuda and out.dtype == torch.float32
        errs[p] = rel_err(out.cpu().numpy(), ref)
    print("relative error vs ONNX Runtime FP32:", errs)
    assert errs["fp32"] <= 1e-4
    assert errs["fp16"] <= 1e-2


def test_trained_model_raw_head_vs_onnxruntime():
    """The trained model (random weights give almost input-independent outputs, which hide
    precision loss): defect images and photos, FP32 and FP16."""
    card = ModelCard.load(str(TRAINED))
    paths = defect_jpegs(12) + photo_paths()
    imgs = [decode_image(p.read_bytes(), BIG, BIG) for p in paths]
    x = to_tensor([letterbox(im, 640, 640)[0] for im in imgs])
    ref = ort.InferenceSession(card.onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {card.input_name: x})[0]
    errs = {}
    for p in ("fp32", "fp16"):
        eng = TorchEngine(card, gpu_config(TRAINED, precision=p))
        errs[p] = rel_err(eng.infer(torch.from_numpy(x).cuda()).cpu().numpy(), ref)
        errs[p + "_scores"] = rel_err(eng.infer(torch.from_numpy(x).cuda())[:, 4:].cpu().numpy(), ref[:, 4:])
    print("trained model, relative error vs ONNX Runtime FP32:", errs)
    assert errs["fp32"] <= 1e-4 and errs["fp32_scores"] <= 1e-4
    assert errs["fp16"] <= 1e-2 and errs["fp16_scores"] <= 1e-2


def test_cuda_graph_replay_equals_eager(engines, photos_ref):
    x, _ = photos_ref
    xs = torch.from_numpy(np.concatenate([x, x, x])).cuda()  # 21 images
    for p, eng in engines.items():
        assert eng.graph_error is None, eng.graph_error
        assert sorted(eng.graphs) == [1, 8, 16]
        tol = 1e-5 if p == "fp32" else 5e-3
        for n in (1, 5, 8, 13, 16, 21):  # exact sizes, padded sizes, and more than max_batch
            got = eng.infer(xs[:n])
            ref = eng.infer_eager(xs[:n])
            assert tuple(got.shape) == (n, 84, 8400)
            assert rel_err(got.cpu().numpy(), ref.cpu().numpy()) <= tol, (p, n)


def test_engine_is_safe_from_several_threads(engines, photos_ref):
    """Static graph buffers + one engine stream + a lock: concurrent callers get their own
    results (as with a threaded Ray actor)."""
    x, _ = photos_ref
    eng = engines["fp16"]
    inputs = [torch.from_numpy(x[i : i + 3]).cuda() for i in range(4)]
    expected = [eng.infer(t).cpu() for t in inputs]
    results: dict[int, list] = {}

    def work(k: int) -> None:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            outs = [eng.infer(inputs[(k + j) % 4]) for j in range(20)]
            results[k] = [o.cpu() for o in outs]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for j, o in enumerate(results[k]):
            torch.testing.assert_close(o, expected[(k + j) % 4], rtol=0, atol=0)


def test_nvjpeg_decode_vs_cpu_decode_and_fallbacks():
    jpegs = [p.read_bytes() for p in photo_paths() if p.suffix == ".jpg"]  # all 6 are progressive
    webp = [p.read_bytes() for p in photo_paths() if p.suffix == ".webp"]
    variants = variant_jpegs(jpegs[1])  # 800x445: baseline, progressive, grey | cmyk, exif_rotated, png
    items = [*jpegs, *variants.values(), *webp]
    # default: progressive JPEGs to the CPU; then everything nvJPEG can take on nvJPEG
    for progressive_on_gpu in (False, True):
        pp = GpuPreprocessor((640, 640), device="cuda", progressive_on_gpu=progressive_on_gpu, decoder="nvjpeg")
        decoded, rep = pp.decode(items)
        print("progressive_on_gpu", progressive_on_gpu, rep.decoder, rep.notes)
        assert all(e is None for e in rep.errors), rep.errors
        # baseline and grey JPEGs on nvJPEG; CMYK, EXIF-rotated, PNG and WebP never
        assert rep.decoder[len(jpegs)] == rep.decoder[len(jpegs) + 2] == "nvjpeg"
        assert rep.decoder[len(jpegs) + 3 :] == ["cpu"] * 4
        progressive = [*range(len(jpegs)), len(jpegs) + 1]
        assert {rep.decoder[k] for k in progressive} == {"nvjpeg" if progressive_on_gpu else "cpu"}
        assert rep.nvjpeg + rep.cpu_decoded == len(items)
        _compare_with_cpu_decoder(items, decoded, rep)


def _compare_with_cpu_decoder(items, decoded, rep) -> None:
    stats = []
    for data, t, kind in zip(items, decoded, rep.decoder, strict=True):
        ref = decode_image(data, BIG, BIG)[..., ::-1].transpose(2, 0, 1)  # the CPU path, as RGB CHW
        got = t.cpu().numpy()
        assert got.shape == ref.shape
        d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        if kind == "cpu":
            assert d.max() == 0  # the CPU path's own decoder
        stats.append((kind, round(float(d.mean()), 3), float(np.percentile(d, 99))))
    print("decoder vs OpenCV (mean |diff|, p99 |diff|) per image:", stats)
    assert max(m for _, m, _ in stats) <= 2.0
    # the accounting: compressed bytes for nvJPEG, pixels for the CPU decodes
    expect = sum(len(b) if k in ("nvjpeg", "nvimgcodec") else t.numel()
                 for b, t, k in zip(items, decoded, rep.decoder, strict=True))
    assert rep.h2d_bytes == expect


def test_gpu_errors_are_the_cpu_paths():
    good = photo_bytes()[0]
    bad = bad_inputs(good)
    pp = GpuPreprocessor((640, 640), device="cuda", max_pixels=5_000_000)
    res = pp.prepare([good, *bad.values(), good])
    assert res.rows == [0, len(bad) + 1]
    for k, img in enumerate(bad.values(), start=1):
        assert res.errors[k] == expected_error(img, 5_000_000, 64 * 1024 * 1024), k


def test_letterbox_on_cuda_matches_cpu():
    imgs = [decode_image(b, BIG, BIG) for b in photo_bytes()]
    tens = [torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).cuda() for im in imgs]
    out, geoms = letterbox_tensors(tens, 640, 640)
    for k, im in enumerate(imgs):
        boxed, g = letterbox(im, 640, 640)
        assert geoms[k] == g
        assert np.abs(out[k].cpu().numpy() - to_tensor([boxed])[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_nms_on_cuda_equals_numpy(layout):
    pred = synthetic_head(layout, np.random.default_rng(3), b=8)
    for conf, iou, max_det in [(0.1, 0.5, 300), (0.3, 0.7, 10)]:
        got = batched_postprocess(torch.from_numpy(pred).cuda(), layout, conf, iou, max_det)
        for i in range(len(pred)):
            assert_rows_equal(got[i], postprocess(pred[i], layout, conf, iou, max_det))


def _iou(a, b) -> float:
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def _matched(got, ref, min_score: float, min_iou: float) -> tuple[int, int]:
    """(confident reference detections, of those matched by a same-class detection)."""
    n = m = 0
    for r in ref:
        if r.score < min_score:
            continue
        n += 1
        m += any(g.class_id == r.class_id and _iou(g, r) >= min_iou for g in got)
    return n, m


def test_end_to_end_detections_vs_cpu_path():
    """The trained model on defect images and photos: the GPU path (nvJPEG, GPU letterbox,
    FP32 and FP16, GPU NMS) finds what the ONNX Runtime CPU path finds."""
    paths = defect_jpegs(24) + photo_paths()
    blobs = [p.read_bytes() for p in paths]
    cfg = {"model": str(TRAINED), "conf": 0.25, "batch_size": 16}
    ref = Detector({**cfg, "engine": "onnxruntime"}).detect(blobs)
    cfg["torch"] = {"compile": "off"}  # the compiled engine: test_compiled_engine_*
    assert sum(len(r.detections) for r in ref) >= 10

    # FP32 with the CPU decoder: only the letterbox rounding (<= 1 grey level) differs
    exact = Detector({**cfg, "engine": "torch", "device": "cuda"})
    exact.gpu.nvjpeg = False
    got = exact.detect(blobs)
    for g, r in zip(got, ref, strict=True):
        assert (g.error, g.height, g.width) == (r.error, r.height, r.width)
        n, m = _matched(g.detections, r.detections, 0.3, 0.9)
        assert m == n, (g.uri, g.detections, r.detections)

    for precision in ("fp32", "fp16"):
        det = Detector({**cfg, "engine": "torch", "device": "cuda", "precision": precision})
        got = det.detect(blobs)
        assert det.gpu_counters["nvjpeg"] >= 24
        total = hit = 0
        for g, r in zip(got, ref, strict=True):
            assert (g.error, g.height, g.width) == (r.error, r.height, r.width)
            n, m = _matched(g.detections, r.detections, 0.5, 0.9)
            total, hit = total + n, hit + m
        print(f"{precision} + nvJPEG: {hit}/{total} confident CPU-path detections matched (IoU >= 0.9)")
        assert total > 0 and hit >= 0.95 * total


def test_detector_calls_from_several_threads_equal_one_at_a_time():
    """Each calling thread runs its data path on a CUDA stream of its own (the engine joins it):
    four threads at once give exactly the rows of one call at a time, device-tensor inputs
    queued by the caller on its stream included."""
    paths = defect_jpegs(24) + photo_paths()
    blobs = [p.read_bytes() for p in paths]
    det = Detector(gpu_config(TRAINED, conf=0.25, batch_size=8))
    want = {k: det.detect(blobs[k::2]) for k in (0, 1)}  # the same calls, one at a time
    assert sum(len(r.detections) for k in want for r in want[k]) >= 10
    got: dict[int, list] = {}

    def work(i: int) -> None:
        k = i % 2
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # the caller's own stream: its frames are queued there
            frames = [torch.from_numpy(np.ascontiguousarray(decode_image(b, BIG, BIG)[..., ::-1].transpose(2, 0, 1)))
                      .to("cuda", non_blocking=True) for b in blobs[:6]]
            got[i] = [det.detect(blobs[k::2]) for _ in range(5)] + [det.detect(frames)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref_frames = Detector(gpu_config(TRAINED, conf=0.25, batch_size=8, image_decoder="cpu")).detect(blobs[:6])
    assert sorted(got) == [0, 1, 2, 3]  # every thread finished (an exception would leave a gap)
    for i, calls in got.items():
        k = i % 2
        for rows in calls[:-1]:
            assert [(r.height, r.width, r.detections) for r in rows] == [(r.height, r.width, r.detections)
                                                                          for r in want[k]]
        assert [r.detections for r in calls[-1]] == [r.detections for r in ref_frames]


# --- the compiled engine, nvImageCodec, device-tensor inputs -------------------------------------


def _defect_batch(n: int = 16) -> np.ndarray:
    paths = defect_jpegs(n - len(photo_paths())) + photo_paths()
    return to_tensor([letterbox(decode_image(p.read_bytes(), BIG, BIG), 640, 640)[0] for p in paths])


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One compiled-engine cache for this module's compiled tests (batch 8: buckets 1 and 8)."""
    return str(tmp_path_factory.mktemp("torch-cache"))


def test_compiled_engine_fp16_vs_onnxruntime_and_its_cache(compile_cache):
    """torch.compile (inductor, frozen weights) + one CUDA graph per bucket on the trained model:
    raw head within 1e-2 of ONNX Runtime FP32 (FP16) and 1e-4 (FP32), in full, padded and
    multi-chunk batches; a second engine on the same cache loads the compiled kernels ('hit')."""
    card = ModelCard.load(str(TRAINED))
    x = _defect_batch(16)
    ref = ort.InferenceSession(card.onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {card.input_name: x})[0]
    xs = torch.from_numpy(x).cuda()
    errs = {}
    for p in ("fp16", "fp32"):
        cfg = gpu_config(TRAINED, precision=p, batch_size=8, torch={"compile": "inductor", "cache": compile_cache})
        eng = TorchEngine(card, cfg)
        meta = eng.metadata()
        print(p, {k: meta[k] for k in ("compile", "compile_error", "compile_cache", "cuda_graph_batches", "warmup_s")})
        assert meta["compile"] == "inductor" and meta["compile_error"] is None
        assert eng.buckets == [1, 8] and sorted(eng.graphs) == [1, 8]
        assert meta["compile_cache"]["status"] == "built"
        for n in (16, 8, 5, 1):
            errs[(p, n)] = rel_err(eng.infer(xs[:n]).cpu().numpy(), ref[:n])
        eager = eng.infer_eager(xs).cpu().numpy()
        errs[(p, "vs_eager")] = rel_err(eng.infer(xs).cpu().numpy(), eager)
    print("compiled engine, relative error vs ONNX Runtime FP32:", errs)
    assert all(v <= 1e-2 for (p, _), v in errs.items() if p == "fp16")
    assert all(v <= 1e-4 for (p, _), v in errs.items() if p == "fp32")
    again = TorchEngine(card, gpu_config(TRAINED, precision="fp16", batch_size=8,
                                         torch={"compile": "inductor", "cache": compile_cache}))
    assert again.metadata()["compile_cache"]["status"] == "hit"
    assert rel_err(again.infer(xs).cpu().numpy(), ref) <= 1e-2


def test_compiled_detector_detections_vs_cpu_path(compile_cache):
    """Bytes to detections with the compiled FP16 engine and the default GPU decoder."""
    paths = defect_jpegs(24) + photo_paths()
    blobs = [p.read_bytes() for p in paths]
    cfg = {"model": str(TRAINED), "conf": 0.25, "batch_size": 8}
    ref = Detector({**cfg, "engine": "onnxruntime"}).detect(blobs)
    det = Detector({**cfg, "engine": "torch", "device": "cuda", "precision": "fp16",
                    "torch": {"compile": "inductor", "cache": compile_cache}})
    assert det.info()["compile"] == "inductor" and det.stages == ("gpu", "torch")
    got, t = det.detect_timed(blobs)
    print("decoders:", t.decoders, "speed ms/image:", got[0].speed)
    from raydetect.stages.gpu_preprocess import nvimgcodec_status

    default = "nvimgcodec" if nvimgcodec_status() is None else "nvjpeg"  # auto's choice
    assert t.decoders.get(default, 0) >= 24
    total = hit = 0
    for g, r in zip(got, ref, strict=True):
        assert (g.error, g.height, g.width) == (r.error, r.height, r.width)
        n, m = _matched(g.detections, r.detections, 0.5, 0.9)
        total, hit = total + n, hit + m
    assert total > 0 and hit >= 0.95 * total, (hit, total)
    # the same rows from device tensors (decoded video frames never go back to the host)
    frames = [torch.from_numpy(np.ascontiguousarray(decode_image(b, BIG, BIG)[..., ::-1].transpose(2, 0, 1))).cuda()
              for b in blobs[:8]]
    from_frames = det.detect(frames)
    exact = Detector({**cfg, "engine": "torch", "device": "cuda", "precision": "fp16",
                      "torch": {"compile": "inductor", "cache": compile_cache}, "image_decoder": "cpu"})
    from_bytes = exact.detect(blobs[:8])
    for a, b in zip(from_frames, from_bytes, strict=True):
        assert a.error is None and (a.height, a.width) == (b.height, b.width)
        assert a.detections == b.detections


def test_nvimgcodec_decode_vs_cpu_decode():
    from raydetect.stages.gpu_preprocess import nvimgcodec_status

    why = nvimgcodec_status()
    if why is not None:
        pytest.skip(why)
    jpegs = [p.read_bytes() for p in photo_paths() if p.suffix == ".jpg"]
    variants = variant_jpegs(jpegs[1])
    defects = [p.read_bytes() for p in defect_jpegs(16)]  # grey baseline
    items = [*jpegs, *variants.values(), *defects]
    assert GpuPreprocessor((640, 640), device="cuda").decoder == "nvimgcodec"  # auto, where installed
    pp = GpuPreprocessor((640, 640), device="cuda", decoder="nvimgcodec")
    decoded, rep = pp.decode(items)
    print("nvimgcodec:", rep.decoder_counts(), rep.notes)
    assert all(e is None for e in rep.errors), rep.errors
    assert rep.decoder[len(jpegs)] == "nvimgcodec" and rep.decoder[len(jpegs) + len(variants):] == ["nvimgcodec"] * 16
    assert rep.decoder[len(jpegs) + 3 : len(jpegs) + len(variants)] == ["cpu"] * (len(variants) - 3)
    _compare_with_cpu_decoder(items, decoded, rep)


def test_nvimgcodec_threads_decode_at_once():
    """The threads of an actor (actor_concurrency) share one preprocessor; each gets a decoder of
    its own, so they decode at the same time and get what one thread gets."""
    from concurrent.futures import ThreadPoolExecutor

    from raydetect.stages.gpu_preprocess import nvimgcodec_status

    why = nvimgcodec_status()
    if why is not None:
        pytest.skip(why)
    items = [p.read_bytes() for p in defect_jpegs(32)]
    pp = GpuPreprocessor((640, 640), device="cuda", decoder="nvimgcodec")
    ref = pp.prepare(items).tensor.cpu()

    def run(_):
        p = pp.prepare(items)
        torch.cuda.current_stream().synchronize()
        return p.decoder_counts(), p.tensor.cpu()

    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(run, range(16)))
    for counts, t in outs:
        assert counts == {"nvimgcodec": len(items)}, counts
        assert torch.equal(t, ref)


def test_auto_picks_torch_on_cuda():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: auto picks it")
    except ImportError:
        pass
    assert resolve_engine_name(DetectorConfig(model=str(STATIC))) == "torch"
    assert resolve_engine_name(DetectorConfig(model=str(STATIC), device="cpu")) == "onnxruntime"


@pytest.fixture(scope="module")
def ray_gpu():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def test_ray_actor_sees_only_its_gpu(ray_gpu):
    @ray_gpu.remote(num_gpus=1)
    class Probe:
        def visible(self):
            import torch as t

            return os.environ.get("CUDA_VISIBLE_DEVICES"), t.cuda.device_count()

    cvd, count = ray_gpu.get(Probe.remote().visible.remote())
    assert cvd is not None and len(cvd.split(",")) == 1 and count == 1


def test_gpu_job_matches_cpu_job(ray_gpu, tmp_path):
    """engine=auto in actors with half a GPU each (two actors share the one GPU), threaded
    calls: same rows and schema as the ONNX Runtime job."""
    src = tmp_path / "in"
    src.mkdir()
    for p in defect_jpegs(40):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    tables = {}
    for name, det, extra in [
        ("gpu", {"engine": "auto"}, {"num_gpus": 0.5, "concurrency": 2, "actor_concurrency": 2}),
        ("cpu", {"engine": "onnxruntime"}, {}),
    ]:
        cfg = JobConfig(
            input=str(src),
            output=str(tmp_path / name),
            detector=DetectorConfig(model=str(TRAINED), conf=0.25, batch_size=8, **det),
            num_cpus=1,
            progress=False,
            report=False,
            **extra,
        )
        summary = run_job(cfg)
        assert summary.images == 41 and summary.errors == 1
        tables[name] = pq.read_table(tmp_path / name).sort_by("uri")
    gpu, cpu = tables["gpu"], tables["cpu"]
    assert gpu.schema == cpu.schema
    assert set(gpu.column("engine").to_pylist()) == {"torch"}
    assert gpu.column("error").to_pylist() == cpu.column("error").to_pylist()
    for g, c in zip(gpu.column("detections").to_pylist(), cpu.column("detections").to_pylist(), strict=True):
        strong = [d for d in (c or []) if d["score"] >= 0.5]
        assert all(any(x["class_id"] == d["class_id"] for x in (g or [])) for d in strong)
