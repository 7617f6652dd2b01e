"""The GPU pipeline, measured in one call (issues 3 and 12): bytes → GPU JPEG decode (nvImageCodec
or nvJPEG) → letterbox → FP16 batched inference (compiled, CUDA graphs) → NMS → rows, on one GPU.

    python benchmarks/gpu_pipeline.py [--model M.onnx] [--models A.onnx,B.onnx] [--files 20000]
    python benchmarks/gpu_pipeline.py --device cpu --quick      # smoke test, numbers meaningless

Sections (each saved as soon as it is done, to ``--out``/``--name``.json and .md; ``--merge``
keeps the sections of an earlier results file that this run does not measure again):

* ``dataset``: ``--files`` JPEG files on local disk for each of two sets: *coco640* (640x480
  baseline JPEGs re-encoded from crops/flips of the real photos, COCO-sized) and *photos* (the
  real JPEG photos replicated as they are: 408x612 to 1104x736, all progressive);
* ``engine``: engine-only images/s (inputs already letterboxed on the GPU), FP16: the first of
  ``--models`` at every ``--batches`` size eager (the converted module as CUDA graphs) and
  compiled (torch.compile, inductor, frozen weights, one CUDA graph per batch); the other
  models compiled at ``--other-batches``; p50/p99 latency per call, compile time, peak memory;
* ``decode``: decode-only images/s: nvImageCodec alone, torchvision's nvJPEG alone, the raydetect
  GPU decoder with each (header checks + GPU decode + CPU fallbacks), decode + GPU letterbox;
  OpenCV on 1 core and on N processes;
* ``h2d`` (not run by default): bytes host→device per image, counted by the CUDA profiler;
* ``detector``: ``Detector.detect`` in-process (bytes → result rows → Arrow), compiled engine,
  per GPU decoder: p50/p99 latency per batch, images/s with and without the overlap of chunk
  k+1's preparation with chunk k, and a per-stage profile through the public stages;
* ``ready``: seconds from a fresh process to a ready detector (an actor's constructor) with an
  empty compiled-kernel cache and then with the cache the first filled;
* ``e2e``: the Ray Data job (``raydetect.job.run.run_job``, torch FP16) over the files, for the
  variants in ``E2E_VARIANTS`` (compiled or eager, batch, actors, threads, rows per call): total
  and steady-state images/s, time to the first result, GPU busy fraction (NVML).

The JSON gets a ``summary`` object (gpu, engine_fp16_img_s, engine_batch, e2e_steady_img_s,
e2e_fraction_of_engine, actor_ready_s, targets); a table of the main numbers is printed last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
T_START = time.perf_counter()


# --- small helpers --------------------------------------------------------------------------


def log(*a: Any) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s]", *a, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def r3(x: float) -> float:
    return float(f"{x:.4g}")


class Results:
    def __init__(self, out: Path, argv: list[str], name: str = "gpu_pipeline") -> None:
        self.out = out
        self.name = name
        self.data: dict[str, Any] = {"command": "python " + " ".join(argv), "sections": {}, "errors": {}}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, value: Any) -> None:
        self.data["sections"][section] = value
        self.save()

    def error(self, section: str, e: BaseException) -> None:
        import traceback

        self.data["errors"][section] = f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-2000:]
        log(f"section {section} FAILED: {type(e).__name__}: {e}")
        self.save()

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / f"{self.name}.md").write_text(to_markdown(self.data))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --- data -----------------------------------------------------------------------------------


def coco_variants(photos: list[bytes], per_photo: int = 8, seed: int = 0) -> list[bytes]:
    """640x480 baseline JPEGs (quality 90) from random crops / flips of the photos."""
    rng = np.random.default_rng(seed)
    out = []
    for b in photos:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        for _ in range(per_photo):
            h, w = img.shape[:2]
            s = rng.uniform(0.6, 1.0)
            ch, cw = int(h * s), int(min(w, h * s * 4 / 3))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = cv2.resize(img[y : y + ch, x : x + cw], (640, 480), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append(cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def is_progressive(b: bytes) -> bool:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        return bool(im.info.get("progressive") or im.info.get("progression"))


def make_dataset(work: Path, n: int, names: tuple[str, ...] = ("coco640", "photos")) -> dict[str, Any]:
    """``n`` files under ``work/NAME`` for each set in ``names`` (the distinct images repeated
    under other names): *coco640* and/or *photos*."""
    photos = sorted(p for p in (DATA / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    blobs = [p.read_bytes() for p in photos]
    makers = {"coco640": lambda: coco_variants(blobs), "photos": lambda: blobs}
    info = {}
    for name in names:
        distinct = makers[name]()
        d = work / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        total = 0
        for i in range(n):
            b = distinct[i % len(distinct)]
            (d / f"{name}_{i:06d}.jpg").write_bytes(b)
            total += len(b)
        sizes = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape for b in distinct]
        progressive = [is_progressive(b) for b in distinct]  # once per distinct image, not per file
        info[name] = {
            "dir": str(d),
            "files": n,
            "distinct": len(distinct),
            "mean_kb": r3(total / n / 1024),
            "progressive_fraction": r3(sum(progressive[i % len(distinct)] for i in range(n)) / n),
            "approx_sizes": sorted({(s[0] * 8, s[1] * 8) for s in sizes}),
        }
    return info


def load_bytes(d: str, limit: int | None = None) -> list[bytes]:
    files = sorted(Path(d).iterdir())[:limit]
    return [f.read_bytes() for f in files]


# --- engine only ----------------------------------------------------------------------------


def bench_engine(model: str, device: str, batches: list[int], precisions: list[str], coco_dir: str,
                 seconds: float, modes: tuple[str, ...] = ("eager", "compiled"), cache: str | None = None) -> dict[str, Any]:
    """Engine-only images/s (inputs already letterboxed on the device) per batch size:
    ``eager`` = the converted module replayed as CUDA graphs (the engine before torch.compile),
    ``compiled`` = torch.compile (inductor, frozen weights) replayed as one CUDA graph per batch."""
    import torch

    from raydetect.config import DetectorConfig
    from raydetect.engines.torch import TorchEngine
    from raydetect.model_card import ModelCard
    from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

    card = ModelCard.load(model)
    imgs = [decode_image(b, 10**9, 10**9) for b in load_bytes(coco_dir, 48)]
    base = torch.from_numpy(to_tensor([letterbox(im, *card.imgsz)[0] for im in imgs]))
    out: dict[str, Any] = {"model": Path(model).name}
    for prec in precisions:
        if device == "cpu" and prec == "fp16":
            continue
        for mode in modes:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            tcfg = {"compile": "off"} if mode == "eager" else {
                "compile": "inductor", "compile_batches": tuple(batches), **({"cache": cache} if cache else {})}
            t0 = time.perf_counter()
            eng = TorchEngine(card, DetectorConfig(model=model, engine="torch", device=device, precision=prec,
                                                   batch_size=max(batches), torch=tcfg))
            init_s = time.perf_counter() - t0
            # 4 rotating input sets, so repeated calls do not re-read one buffer from cache
            g = torch.Generator().manual_seed(0)
            pool = [base[torch.randint(len(base), (max(batches),), generator=g)].to(device, eng.dtype)
                    for _ in range(4)]
            meta = eng.metadata()
            res: dict[str, Any] = {"init_s": r3(init_s), "cuda_graph_batches": sorted(eng.graphs),
                                   "cuda_graph_error": eng.graph_error, "compile": meta["compile"],
                                   "compile_error": meta["compile_error"], "compile_cache": meta["compile_cache"],
                                   "by_batch": {}}
            for b in batches:
                fn = eng.infer
                for k in range(3):
                    fn(pool[k % 4][:b])
                sync(device)
                # throughput: back-to-back calls, one sync every 8
                iters, t0 = 0, time.perf_counter()
                while True:
                    fn(pool[iters % 4][:b])
                    iters += 1
                    if iters % 8 == 0:
                        sync(device)
                        if time.perf_counter() - t0 >= seconds:
                            break
                el = time.perf_counter() - t0
                lat = []
                for k in range(min(50, max(10, iters // 2))):  # latency: synchronised calls
                    t1 = time.perf_counter()
                    fn(pool[k % 4][:b])
                    sync(device)
                    lat.append((time.perf_counter() - t1) * 1e3)
                res["by_batch"][str(b)] = {"images_per_s": r3(iters * b / el), "p50_ms": r3(pct(lat, 50)),
                                           "p99_ms": r3(pct(lat, 99))}
                log(f"engine {Path(model).name} {prec} {mode} b={b}: {res['by_batch'][str(b)]}")
            if device.startswith("cuda"):
                res["peak_gpu_mem_mb"] = r3(torch.cuda.max_memory_allocated() / 2**20)
            out[f"{prec}_{mode}"] = res
            del eng, pool
    return out


def bench_engines(models: list[str], device: str, batches: list[int], other_batches: list[int], coco_dir: str,
                  seconds: float, work: Path) -> dict[str, Any]:
    """The first model at every batch size, eager and compiled; the others compiled at
    ``other_batches``."""
    out: dict[str, Any] = {}
    for k, m in enumerate(models):
        try:
            out[Path(m).stem] = bench_engine(
                m, device, batches if k == 0 else other_batches, ["fp16"] if device.startswith("cuda") else ["fp32"],
                coco_dir, seconds, ("eager", "compiled") if k == 0 else ("compiled",), cache=str(work / "torch-cache"))
        except Exception as e:
            import traceback

            out[Path(m).stem] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"engine {m} FAILED: {e}")
    return out


def ready_times(model: str, device: str, batch: int, work: Path) -> dict[str, Any]:
    """Seconds from a fresh process to a ready Detector (what an actor spends in its
    constructor), with the compiled engine: an empty kernel cache, then the cache the first
    filled (a new inductor temp dir each time, so only raydetect's cache carries over)."""
    import subprocess

    code = ("import sys,time,json;t=time.perf_counter();from raydetect.detector import Detector;"
            "d=Detector({'model':sys.argv[1],'engine':'torch','device':sys.argv[2],"
            "'precision':'fp16' if sys.argv[2].startswith('cuda') else 'fp32',"
            "'batch_size':int(sys.argv[3]),'torch':{'compile':'inductor','compile_batches':[int(sys.argv[3])],"
            "'cache':sys.argv[4]}});"
            "i=d.info();print(json.dumps({'ready_s':time.perf_counter()-t,'compile':i['compile'],"
            "'compile_cache':i['compile_cache'],'compile_error':i['compile_error']}))")
    cache = work / "ready-cache"
    shutil.rmtree(cache, ignore_errors=True)
    out: dict[str, Any] = {"batch": batch}
    for name in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}")}
        shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code, model, device, str(batch), str(cache)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        row: dict[str, Any] = {"wall_s": r3(time.perf_counter() - t0)}
        if p.returncode == 0:
            row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            row["ready_s"] = r3(row["ready_s"])
        else:
            row["error"] = p.stderr[-2000:]
        out[name] = row
        log(f"ready {name}: {row}")
    return out


# --- decode only ----------------------------------------------------------------------------


def _cv_worker(args: tuple[list[str], bool]) -> tuple[int, float]:
    paths, with_letterbox = args
    cv2.setNumThreads(1)
    from raydetect.stages.preprocess import letterbox

    blobs = [Path(p).read_bytes() for p in paths]
    t0 = time.perf_counter()
    for b in blobs:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        if with_letterbox:
            letterbox(img, 640, 640)
    return len(blobs), time.perf_counter() - t0


def bench_decode(sets: dict[str, Any], device: str, batch: int, cpu_workers: int, n_gpu: int,
                 n_cpu: int) -> dict[str, Any]:
    import torch

    from raydetect.stages.gpu_preprocess import GpuPreprocessor

    out: dict[str, Any] = {"cpu_workers": cpu_workers, "batch": batch}
    for name, info in sets.items():
        blobs = load_bytes(info["dir"], n_gpu if info["progressive_fraction"] < 0.5 else n_gpu // 3)
        row: dict[str, Any] = {"images": len(blobs)}
        if device.startswith("cuda"):
            from torchvision.io import ImageReadMode, decode_jpeg

            tens = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
            decode_jpeg(tens[:batch], mode=ImageReadMode.RGB, device=device)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for s in range(0, len(tens), batch):
                decode_jpeg(tens[s : s + batch], mode=ImageReadMode.RGB, device=device)
            sync(device)
            row["nvjpeg_torchvision"] = r3(len(tens) / (time.perf_counter() - t0))
            from raydetect.stages.gpu_preprocess import nvimgcodec_status

            why = nvimgcodec_status()
            decoders = ["nvjpeg"] + (["nvimgcodec"] if why is None else [])
            if why is None:  # the library alone: hardware JPEG engines, then its CUDA decoder
                from nvidia import nvimgcodec

                dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                                                   nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)])
                streams = [nvimgcodec.CodeStream(b) for b in blobs]
                dec.decode(streams[:batch])
                sync(device)
                t0 = time.perf_counter()
                for s in range(0, len(streams), batch):
                    dec.decode(streams[s : s + batch])
                sync(device)
                row["nvimgcodec"] = r3(len(streams) / (time.perf_counter() - t0))
            else:
                row["nvimgcodec_unavailable"] = why
            for decoder in decoders:
                pp = GpuPreprocessor((640, 640), device=device, dtype=torch.float16, decoder=decoder)
                for what, fn in ((f"raydetect_{decoder}_decode", pp.decode),
                                 (f"raydetect_{decoder}_decode_letterbox", pp.prepare)):
                    fn(blobs[:batch])
                    sync(device)
                    t0 = time.perf_counter()
                    n_nv = 0
                    for s in range(0, len(blobs), batch):
                        r = fn(blobs[s : s + batch])
                        n_nv += (r[1] if isinstance(r, tuple) else r).nvjpeg
                    sync(device)
                    row[what] = r3(len(blobs) / (time.perf_counter() - t0))
                    row[what + "_gpu_fraction"] = r3(n_nv / len(blobs))
        paths = [str(p) for p in sorted(Path(info["dir"]).iterdir())[:n_cpu]]
        n1, s1 = _cv_worker((paths[: max(50, n_cpu // 4)], False))
        row["opencv_1core"] = r3(n1 / s1)
        n1, s1 = _cv_worker((paths[: max(50, n_cpu // 4)], True))
        row["opencv_letterbox_1core"] = r3(n1 / s1)
        shards = [paths[i::cpu_workers] for i in range(cpu_workers)]
        with mp.get_context("spawn").Pool(cpu_workers) as pool:
            pool.map(_cv_worker, [(s[:5], False) for s in shards])  # start + import
            t0 = time.perf_counter()
            parts = pool.map(_cv_worker, [(s, False) for s in shards])
            wall = time.perf_counter() - t0
        row[f"opencv_{cpu_workers}proc"] = r3(sum(n / s for n, s in parts))
        row[f"opencv_{cpu_workers}proc_wall_incl_file_reads"] = r3(sum(n for n, _ in parts) / wall)
        for d in ("nvjpeg", "nvimgcodec"):
            if f"raydetect_{d}_decode" in row:
                row[f"raydetect_{d}_decode_vs_1core"] = r3(row[f"raydetect_{d}_decode"] / row["opencv_1core"])
        out[name] = row
        log(f"decode {name}: {row}")
    return out


# --- bytes host→device ------------------------------------------------------------------------


def h2d_bytes_profiled(fn, device: str, work: Path) -> dict[str, Any]:
    """Run ``fn`` under the CUDA profiler; sum the bytes of every host→device memcpy."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    trace = work / "h2d_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    total, count, kinds = 0, 0, {}
    for ev in events:
        name = str(ev.get("name", ""))
        if ev.get("cat") in ("gpu_memcpy", "Memcpy", "gpu_memset") and "HtoD" in name:
            b = int((ev.get("args") or {}).get("bytes", 0))
            total += b
            count += 1
            kinds[name] = kinds.get(name, 0) + b
    trace.unlink()
    return {"bytes": total, "copies": count, "by_kind": kinds}


def bench_h2d(model: str, sets: dict[str, Any], device: str, work: Path, n: int) -> dict[str, Any]:

    from raydetect.config import DetectorConfig
    from raydetect.engines.torch import TorchEngine
    from raydetect.model_card import ModelCard
    from raydetect.stages.gpu_preprocess import GpuPreprocessor

    card = ModelCard.load(model)
    eng = TorchEngine(card, DetectorConfig(model=model, engine="torch", device=device, batch_size=64,
                                           precision="fp16" if device.startswith("cuda") else "fp32",
                                           torch={"compile": "off"}))
    out: dict[str, Any] = {}
    for name, info in sets.items():
        blobs = load_bytes(info["dir"], n)
        row: dict[str, Any] = {"images": len(blobs), "mean_file_bytes": r3(sum(map(len, blobs)) / len(blobs))}
        for vname, fn in _h2d_variants(eng, card, blobs, device).items():
            fn()  # warm-up (allocations, nvJPEG buffers)
            if device.startswith("cuda"):
                try:
                    p = h2d_bytes_profiled(fn, device, work)
                    row[vname] = {"bytes_per_image": r3(p["bytes"] / len(blobs)), "copies": p["copies"],
                                  "by_kind": {k: r3(v / len(blobs)) for k, v in p["by_kind"].items()}}
                except Exception as e:  # the profiler is a measurement aid, not the pipeline
                    row[vname] = {"error": f"{type(e).__name__}: {e}"}
        if device.startswith("cuda"):  # what raydetect itself uploads (its own accounting)
            r = GpuPreprocessor(card.imgsz, device=device, dtype=eng.dtype).prepare(blobs[:64])
            row["accounted_gpu_decode_bytes_per_image"] = r3(r.h2d_bytes / len(r.rows))
        out[name] = row
        log(f"h2d {name}: {row}")
    return out


def _h2d_variants(eng, card, blobs: list[bytes], device: str) -> dict[str, Any]:
    from raydetect.stages.gpu_preprocess import GpuPreprocessor
    from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

    def through(pp) -> None:
        for s in range(0, len(blobs), 64):
            eng.infer(pp.prepare(blobs[s : s + 64]).tensor)

    def cpu_path() -> None:
        for s in range(0, len(blobs), 64):
            x = to_tensor([letterbox(decode_image(b, 10**9, 10**9), *card.imgsz)[0] for b in blobs[s : s + 64]])
            eng.infer(x)  # NumPy float32 → uploaded by the engine

    variants: dict[str, Any] = {}
    if device.startswith("cuda"):
        gpu_pp = GpuPreprocessor(card.imgsz, device=device, dtype=eng.dtype)
        variants["gpu_decode (nvJPEG)"] = lambda: through(gpu_pp)
    cpu_pp = GpuPreprocessor(card.imgsz, device=device, dtype=eng.dtype, nvjpeg=False)
    variants["cpu_decode + gpu_letterbox (uint8 pixels)"] = lambda: through(cpu_pp)
    variants["cpu_decode + cpu_letterbox (float32 tensor)"] = cpu_path
    return variants


# --- the Detector in-process --------------------------------------------------------------------


def bench_detector(model: str, sets: dict[str, Any], device: str, batch: int, n: int, work: Path,
                   decoders: list[str] | None = None) -> dict[str, Any]:
    """``Detector.detect`` in-process (bytes → result rows → Arrow table), the compiled engine:
    per-batch latency, images/s with and without the overlap of chunk k+1's preparation with
    chunk k's GPU work, and the per-stage profile through the public stages (synchronised after
    each stage, so stages do not overlap there)."""
    from raydetect.detector import Detector

    prec = "fp16" if device.startswith("cuda") else "fp32"
    out: dict[str, Any] = {"precision": prec, "batch": batch}
    for decoder in ((decoders or ["nvimgcodec", "nvjpeg"]) if device.startswith("cuda") else ["cpu"]):
        try:
            det = Detector({"model": model, "engine": "torch", "device": device, "precision": prec,
                            "batch_size": batch, "conf": 0.25, "image_decoder": decoder,
                            "torch": {"cache": str(work / "torch-cache")}})
        except ValueError as e:  # this decoder is not installed
            out[decoder] = {"error": str(e)}
            continue
        out[f"{decoder}_info"] = {k: v for k, v in det.info().items() if k not in ("names",)}
        for name, info in sets.items():
            blobs = load_bytes(info["dir"], n)
            row: dict[str, Any] = {}
            det.detect(blobs[:batch])
            lat = []
            for s in range(0, min(len(blobs), 40 * batch), batch):  # one batch per call: per-batch latency
                t0 = time.perf_counter()
                det.to_table(det.detect(blobs[s : s + batch]))
                lat.append((time.perf_counter() - t0) * 1e3)
            row["per_batch_latency_ms"] = {"p50": r3(pct(lat, 50)), "p99": r3(pct(lat, 99)), "calls": len(lat)}
            for overlap in (False, True):  # several chunks per call: prepare k+1 while k runs
                det.overlap = overlap
                call = 4 * batch
                t0 = time.perf_counter()
                for s in range(0, len(blobs), call):
                    det.to_table(det.detect(blobs[s : s + call]))
                row[f"images_per_s_calls_of_{call}_overlap_{overlap}"] = r3(len(blobs) / (time.perf_counter() - t0))
            det.overlap = True
            stages = {k: 0.0 for k in ("prepare", "infer", "rows_nms_d2h", "to_detections", "to_table")}
            nb = 0
            for s in range(0, min(len(blobs), 20 * batch), batch):
                part = blobs[s : s + batch]
                t = time.perf_counter()
                p = det.prepare(part)
                sync(device)
                stages["prepare"] += time.perf_counter() - t
                k = len(p.rows)
                c, u, m = [0.25] * k, [0.7] * k, [300] * k
                t = time.perf_counter()
                preds = det.infer(p, c, u, m)
                sync(device)
                stages["infer"] += time.perf_counter() - t
                t = time.perf_counter()
                rows = det.rows(preds, c, u, m)
                stages["rows_nms_d2h"] += time.perf_counter() - t
                t = time.perf_counter()
                from raydetect.types import ImageResult

                sizes = [p.sizes[i] for i in p.rows]
                results = [ImageResult(uri=str(i), height=h, width=w, detections=d) for i, (h, w), d in
                           zip(p.rows, sizes, det.to_detections(rows, p.geoms, sizes), strict=True)]
                stages["to_detections"] += time.perf_counter() - t
                t = time.perf_counter()
                det.to_table(results)
                stages["to_table"] += time.perf_counter() - t
                nb += len(part)
            row["stage_ms_per_image"] = {k: r3(v / nb * 1e3) for k, v in stages.items()}
            if device.startswith("cuda"):
                try:
                    row["gpu_kernels"] = stage_kernel_times(det, blobs[: 10 * batch], batch, device, work)
                except Exception as e:  # the profiler is a measurement aid, not the pipeline
                    row["gpu_kernels"] = {"error": f"{type(e).__name__}: {e}"}
            out[f"{decoder}_{name}"] = row
            log(f"detector {decoder} {name}: {row}")
        del det
    return out


def stage_kernel_times(det, blobs: list[bytes], batch: int, device: str, work: Path) -> dict[str, Any]:
    """GPU time per image of each public stage (the kernels and copies its calls launched, by
    CUPTI correlation to the launching call inside the stage's range) and the top kernels:
    where the GPU's time goes besides the engine."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def one_pass() -> int:
        n = 0
        for s in range(0, len(blobs), batch):
            with record_function("stage:prepare"):
                p = det.prepare(blobs[s : s + batch])
            k = len(p.rows)
            c, u, m = [0.25] * k, [0.7] * k, [300] * k
            with record_function("stage:infer"):
                preds = det.infer(p, c, u, m)
            with record_function("stage:nms"):
                det.rows(preds, c, u, m)
            n += k
        return n

    one_pass()  # warm
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        n = one_pass()
        sync(device)
        wall = time.perf_counter() - t0
    trace = work / "kernels_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    trace.unlink()
    ranges = [(e["name"][6:], e["ts"], e["ts"] + e.get("dur", 0), e.get("tid")) for e in events
              if str(e.get("name", "")).startswith("stage:") and e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    launches = {}  # correlation id -> (ts, tid) of the runtime call that launched it
    for e in events:
        if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver":
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = (e["ts"], e.get("tid"))
    per_stage: dict[str, float] = {}
    kernels: dict[str, float] = {}
    busy: list[tuple[float, float]] = []
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or e.get("ph") != "X":
            continue
        dur = float(e.get("dur", 0))
        busy.append((e["ts"], e["ts"] + dur))
        name = str(e.get("name", ""))[:80]
        kernels[name] = kernels.get(name, 0.0) + dur
        ts, tid = launches.get((e.get("args") or {}).get("correlation"), (None, None))
        stage = "other"
        if ts is not None:
            for rname, a, b, rtid in ranges:
                if a <= ts <= b and rtid == tid:
                    stage = rname
                    break
        per_stage[stage] = per_stage.get(stage, 0.0) + dur
    busy.sort()
    covered, end = 0.0, float("-inf")
    for a, b in busy:  # union of the kernel intervals: the time the GPU had work
        if b > end:
            covered += b - max(a, end)
            end = b
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {
        "images": n,
        "gpu_ms_per_image_by_stage": {k: r3(v / 1e3 / n) for k, v in sorted(per_stage.items())},
        "gpu_busy_ms_per_image": r3(covered / 1e3 / n),
        "wall_ms_per_image": r3(wall * 1e3 / n),
        "top_kernels_ms_per_image": {k: r3(v / 1e3 / n) for k, v in top},
    }


# --- end to end: the Ray Data job --------------------------------------------------------------


class GpuSampler:
    """NVML utilisation and memory, sampled in a thread."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.ok = True
        except Exception:
            self.nv = None

    def __enter__(self) -> GpuSampler:
        if self.ok:
            self.t = threading.Thread(target=self._run, daemon=True)
            self.t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self.nv.nvmlDeviceGetUtilizationRates(self.h)
            m = self.nv.nvmlDeviceGetMemoryInfo(self.h)
            self.samples.append((time.perf_counter(), int(u.gpu), int(m.used)))
            time.sleep(self.period)

    def __exit__(self, *a: Any) -> None:
        self._stop.set()
        if self.ok:
            self.t.join()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {}
        return {"gpu_busy_fraction": r3(statistics.mean(x[1] for x in s) / 100), "samples": len(s)}

    def peak_mem_mb(self, baseline: int) -> float:
        return r3((max(x[2] for x in self.samples) - baseline) / 2**20) if self.samples else float("nan")


def steady_rate(timeline: list[list[float]]) -> tuple[float, float, float]:
    """(images/s between the first and the last result batch, t_first, t_last)."""
    pts = [(t, n) for t, n in timeline if n > 0]
    if len(pts) < 2:
        return float("nan"), 0.0, 0.0
    (t0, n0), (t1, n1) = pts[0], pts[-1]
    return ((n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")), t0, t1


#: perf_counter() at each start of raydetect.job.run.run_images (the clock of the job's timeline)
RUN_IMAGES_T0: list[float] = [0.0]


def _mark_run_images() -> None:
    import raydetect.job.run as job

    if getattr(job.run_images, "_marked", False):
        return
    orig = job.run_images

    def marked(*a: Any, **k: Any):
        RUN_IMAGES_T0.append(time.perf_counter())
        return orig(*a, **k)

    marked._marked = True  # type: ignore[attr-defined]
    job.run_images = marked


def bench_e2e(model: str, sets: dict[str, Any], device: str, batch: int, variants: list[dict[str, Any]],
              work: Path) -> dict[str, Any]:
    import ray

    from raydetect.config import DetectorConfig, JobConfig
    from raydetect.job.run import run_job

    _mark_run_images()
    gpus = 1 if device.startswith("cuda") else 0
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, logging_level="WARNING")
    out: dict[str, Any] = {"ray_cpus": os.cpu_count(), "ray_gpus": gpus, "runs": []}
    for v in variants:
        name, set_name = v["name"], v.get("set", "coco640")
        prec = v.get("precision", "fp16" if gpus else "fp32")
        b = v.get("batch", batch)
        tcfg = {"compile": v.get("compile", "auto"), "cache": str(work / "torch-cache"),
                "compile_batches": tuple(v.get("buckets", (b,)))}
        det = DetectorConfig(model=model, engine="torch", device=None if gpus else "cpu", precision=prec,
                             batch_size=b, conf=0.25, image_decoder=v.get("decoder", "auto"), torch=tcfg)
        actors = v.get("actors", 1)
        cfg = JobConfig(input=sets[set_name]["dir"], output=str(work / f"out_{name}"), detector=det,
                        num_gpus=gpus / actors, num_cpus=1, concurrency=actors, min_actors=actors,
                        actor_concurrency=v.get("actor_concurrency", 1), rows_per_call=v.get("rows_per_call"),
                        progress=False, report=True, report_samples=0)
        sampler = GpuSampler()
        base = sampler.nv.nvmlDeviceGetMemoryInfo(sampler.h).used if sampler.ok else 0
        try:
            with sampler:
                summary = run_job(cfg, overwrite=True)
        except Exception as e:
            out["runs"].append({"name": name, "error": f"{type(e).__name__}: {e}"})
            log(f"e2e {name} FAILED: {e}")
            continue
        row: dict[str, Any] = {"name": name, "set": set_name, "precision": prec, "batch": det.batch_size,
                               "compile": tcfg["compile"], "decoder": det.image_decoder,
                               "actors": actors, "gpus_per_actor": cfg.num_gpus,
                               "actor_concurrency": cfg.actor_concurrency, "rows_per_call": cfg.rows_per_call,
                               "images": summary.images, "errors": summary.errors,
                               "detections": summary.detections, "seconds": r3(summary.seconds),
                               "images_per_s_total": r3(summary.images_per_s)}
        if summary.report:
            rep = json.loads(Path(summary.report).read_text())
            rate, t0, t1 = steady_rate(rep.get("throughput_timeline", []))
            row["images_per_s_steady"] = r3(rate)
            row["first_result_s"] = r3(t0)
            row.update(sampler.window(RUN_IMAGES_T0[-1] + t0, RUN_IMAGES_T0[-1] + t1))
        row["peak_gpu_mem_mb_all_processes"] = sampler.peak_mem_mb(base)
        out["runs"].append(row)
        log(f"e2e {name}: {row}")
    return out


# --- report -------------------------------------------------------------------------------------


def _engine_rate(s: dict[str, Any], model: str, mode: str, batch: int) -> float | None:
    res = s.get("engine", {}).get(Path(model).stem, {})
    for prec in ("fp16", "fp32"):
        row = res.get(f"{prec}_{mode}", {}).get("by_batch", {}).get(str(batch))
        if row:
            return row["images_per_s"]
    return None


def summary(data: dict[str, Any], model: str) -> dict[str, Any]:
    """The issue's ``summary`` object: best compiled engine-only rate of the first engine model,
    the best steady Ray Data job rate (coco640) and its fraction of the engine-only rate of the
    job's model at the job's batch, the warm-cache ready time."""
    s = data["sections"]
    out: dict[str, Any] = {"gpu": s.get("meta", {}).get("gpu")}
    engines = s.get("engine", {})
    first = next(iter(engines), None)
    if first and "error" not in engines[first]:
        res = engines[first]
        comp = res.get("fp16_compiled") or res.get("fp32_compiled") or {}
        rates = {int(b): r["images_per_s"] for b, r in comp.get("by_batch", {}).items()}
        if rates:
            b = max(rates, key=rates.get)
            out.update(engine_model=res.get("model"), engine_fp16_img_s=rates[b], engine_batch=b)
            eager = (res.get("fp16_eager") or {}).get("by_batch", {}).get(str(b))
            if eager:
                out["engine_eager_img_s_same_batch"] = eager["images_per_s"]
    runs = [r for r in s.get("e2e", {}).get("runs", []) if r.get("images_per_s_steady") and r["set"] == "coco640"]
    if runs:
        best = max(runs, key=lambda r: r["images_per_s_steady"])
        out.update(e2e_run=best["name"], e2e_steady_img_s=best["images_per_s_steady"], e2e_batch=best["batch"])
        mode = "compiled" if best.get("compile") != "off" else "eager"
        eng = _engine_rate(s, model, mode, best["batch"])
        if eng:
            out["e2e_engine_img_s_same_batch"] = eng
            out["e2e_fraction_of_engine"] = r3(best["images_per_s_steady"] / eng)
    ready = s.get("ready", {}).get("warm", {})
    if "ready_s" in ready:
        out["actor_ready_s"] = ready["ready_s"]
        out["actor_ready_s_cold"] = s["ready"].get("cold", {}).get("ready_s")
    out["targets"] = {
        "compiled engine-only >= 13000 img/s": _met(out.get("engine_fp16_img_s"), 13000),
        "e2e steady >= 8000 img/s": _met(out.get("e2e_steady_img_s"), 8000),
        "e2e >= 85% of engine-only, same batch": _met(out.get("e2e_fraction_of_engine"), 0.85),
        "actor ready (warm cache) <= 30 s": _met(-out["actor_ready_s"] if "actor_ready_s" in out else None, -30),
    }
    return out


def _met(value, target) -> str:
    if value is None:
        return "not measured"
    return "MET" if value >= target else "MISSED"


def summary_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    s = data["sections"]
    rows: list[tuple[str, str]] = []
    for model, res in s.get("engine", {}).items():
        if "error" in res:
            rows.append((f"engine {model}", res["error"]))
            continue
        for key, r in res.items():
            if not isinstance(r, dict) or "by_batch" not in r:
                continue
            rates = ", ".join(f"b{b} {x['images_per_s']}" for b, x in r["by_batch"].items())
            extra = f"; compile error: {r['compile_error'][:120]}" if r.get("compile_error") else ""
            rows.append((f"engine {model} {key} img/s", f"{rates} (init {r['init_s']} s){extra}"))
    for name, row in s.get("decode", {}).items():
        if isinstance(row, dict):
            keys = [k for k in row if not k.endswith("fraction") and k != "images" and not k.endswith("unavailable")]
            rows.append((f"decode {name} img/s", ", ".join(f"{k}={row[k]}" for k in keys)))
    for name, row in s.get("detector", {}).items():
        if isinstance(row, dict) and "per_batch_latency_ms" in row:
            lat = row["per_batch_latency_ms"]
            ov = {k: v for k, v in row.items() if k.startswith("images_per_s")}
            rows.append((f"detector {name} per batch", f"p50 {lat['p50']} ms p99 {lat['p99']} ms; {ov}"))
            rows.append((f"detector {name} ms/image by stage", str(row.get("stage_ms_per_image"))))
            k = row.get("gpu_kernels") or {}
            if "gpu_ms_per_image_by_stage" in k:
                rows.append((f"detector {name} GPU ms/image by stage (busy {k['gpu_busy_ms_per_image']}, "
                             f"wall {k['wall_ms_per_image']})", str(k["gpu_ms_per_image_by_stage"])))
                rows.append((f"detector {name} top kernels, GPU ms/image", str(k["top_kernels_ms_per_image"])))
    for name, row in s.get("ready", {}).items():
        if isinstance(row, dict):
            rows.append((f"detector ready in a fresh process ({name} cache)",
                         f"{row.get('ready_s')} s ({(row.get('compile_cache') or {}).get('status')})"))
    for run in s.get("e2e", {}).get("runs", []):
        if "error" in run:
            rows.append((f"e2e {run['name']}", run["error"]))
            continue
        rows.append((f"e2e {run['name']} ({run['set']}, {run['precision']}, {run.get('compile')}, b={run['batch']}, "
                     f"actors={run.get('actors', 1)}x{run.get('gpus_per_actor')} GPU, "
                     f"threads={run['actor_concurrency']}, rows/call={run['rows_per_call']})",
                     f"steady {run.get('images_per_s_steady')} img/s, total {run['images_per_s_total']} img/s "
                     f"({run['images']} in {run['seconds']} s, first result {run.get('first_result_s')} s), "
                     f"GPU busy {run.get('gpu_busy_fraction')}"))
    for k, v in data.get("summary", {}).items():
        rows.append((f"summary {k}", str(v)))
    return rows


def to_markdown(data: dict[str, Any]) -> str:
    lines = ["# GPU pipeline benchmark", "", f"Command: `{data['command']}`", ""]
    meta = data["sections"].get("meta")
    if meta:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    lines += ["| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(data)]
    if data["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: `{v.splitlines()[0]}`" for k, v in data["errors"].items()]
    lines += ["", "Full numbers: gpu_pipeline.json (same folder)."]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DATA / "models" / "yolov8n-random.onnx"),
                    help="model of the detector, ready and e2e sections")
    ap.add_argument("--models", default=None,
                    help="engine-only models, comma-separated (default: --model, then yolo11n); the first at "
                    "--batches eager and compiled, the others compiled at --other-batches")
    ap.add_argument("--work", default="/tmp/raydetect-gpu-bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="gpu_pipeline", help="results file stem")
    ap.add_argument("--merge", default=None, help="a previous results JSON whose sections are kept (per model "
                    "for engine) unless this run measures them again")
    ap.add_argument("--files", type=int, default=20000, help="files per set on local disk")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--other-batches", default="64,256")
    ap.add_argument("--batch", type=int, default=64, help="batch of the decode, detector, ready and e2e runs")
    ap.add_argument("--seconds", type=float, default=2.0, help="per engine-throughput measurement")
    ap.add_argument("--cpu-workers", type=int, default=os.cpu_count())
    ap.add_argument("--sections", default="engine,decode,detector,ready,e2e")
    ap.add_argument("--e2e", default=None, help="names of the E2E_VARIANTS to run (default all)")
    ap.add_argument("--detector-decoders", default="nvimgcodec,nvjpeg", help="GPU decoders of the detector section")
    ap.add_argument("--detector-sets", default="coco640,photos", help="datasets of the detector section")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.batches, args.other_batches, args.batch, args.seconds = min(args.files, 40), "1,2", "2", 4, 0.2
        args.cpu_workers = min(args.cpu_workers, 2)
    models = args.models.split(",") if args.models else [
        args.model, str(DATA / "models" / "yolo11n-dynamic-random.onnx")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(Path(args.out), sys.argv, args.name)
    if args.merge:
        prev = json.loads(Path(args.merge).read_text())
        res.data["merged_from"] = {"file": Path(args.merge).name, "command": prev.get("command")}
        res.data["sections"].update({k: v for k, v in prev["sections"].items() if k != "meta"})
    batches = [int(b) for b in args.batches.split(",")]
    sections = args.sections.split(",")

    import torch
    import torchvision

    meta = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpus": os.cpu_count(), "model": Path(args.model).name}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("onnx2torch", "ray", "onnxruntime", "opencv-python-headless"):
        try:
            meta[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            meta["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    res.put("meta", meta)
    log("meta", meta)
    sets = make_dataset(work, args.files)
    res.put("dataset", sets)
    log("dataset", sets)

    variants = E2E_VARIANTS if not args.quick else [{"name": "base", "compile": "off"}]
    if args.e2e:
        wanted = args.e2e.split(",")
        unknown = sorted(set(wanted) - {v["name"] for v in variants})
        if unknown:
            ap.error(f"unknown --e2e variants {unknown}; known: {[v['name'] for v in variants]}")
        variants = [v for v in variants if v["name"] in wanted]
    steps = {
        "engine": lambda: {**res.data["sections"].get("engine", {}),
                           **bench_engines(models, args.device, batches, [int(b) for b in args.other_batches.split(",")],
                                           sets["coco640"]["dir"], args.seconds, work)},
        "decode": lambda: bench_decode(sets, args.device, args.batch, args.cpu_workers,
                                       n_gpu=min(args.files, 2000), n_cpu=min(args.files, 800)),
        "h2d": lambda: bench_h2d(args.model, sets, args.device, work, n=min(args.files, 256)),
        "detector": lambda: bench_detector(args.model, {k: v for k, v in sets.items() if k in args.detector_sets.split(",")},
                                           args.device, args.batch, min(args.files, 2048), work,
                                           args.detector_decoders.split(",")),
        "ready": lambda: ready_times(args.model, args.device, args.batch, work),
        "e2e": lambda: bench_e2e(args.model, sets, args.device, args.batch, variants, work),
    }
    for name in sections:
        log(f"--- {name}")
        try:
            res.put(name, steps[name]())
        except Exception as e:
            res.error(name, e)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    res.data["summary"] = summary(res.data, args.model)
    res.save()
    print("\n" + to_markdown(res.data), flush=True)
    return 0


#: The Ray Data job runs (coco640 unless named): compiled engine (auto) unless ``compile`` says
#: otherwise, one compiled bucket (the batch); rows_per_call > batch: several chunks per call,
#: chunk k+1 prepared while chunk k runs; actor_concurrency: calls in threads of one actor. The
#: decoder is ``auto`` unless named (nvImageCodec where installed since 2026-12-07, nvJPEG before
#: and elsewhere): the nvjpeg_* and nvimg_* runs name theirs.
E2E_VARIANTS = [
    {"name": "compiled_t2_r256", "actor_concurrency": 2, "rows_per_call": 256},  # first: compiles (cold)
    {"name": "compiled_t2_r256_again", "actor_concurrency": 2, "rows_per_call": 256},  # warm cache
    {"name": "compiled_t3_r512", "actor_concurrency": 3, "rows_per_call": 512},
    {"name": "compiled_2actors_t2_r256", "actors": 2, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "compiled_3actors_t2_r256", "actors": 3, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "compiled_4actors_t2_r256", "actors": 4, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "compiled_6actors_t2_r256", "actors": 6, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "compiled_8actors_t2_r256", "actors": 8, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "nvjpeg_3actors_t2_r256", "decoder": "nvjpeg", "actors": 3, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "nvjpeg_4actors_t2_r256", "decoder": "nvjpeg", "actors": 4, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "nvimg_3actors_t2_r256", "decoder": "nvimgcodec", "actors": 3, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "nvimg_4actors_t2_r256", "decoder": "nvimgcodec", "actors": 4, "actor_concurrency": 2, "rows_per_call": 256},
    # one CUDA context per GPU, calls on a stream per thread (kernels of one context overlap;
    # those of several processes are time-sliced)
    {"name": "nvjpeg_1actor_t4_r256", "decoder": "nvjpeg", "actors": 1, "actor_concurrency": 4, "rows_per_call": 256},
    {"name": "nvjpeg_2actors_t4_r256", "decoder": "nvjpeg", "actors": 2, "actor_concurrency": 4, "rows_per_call": 256},
    {"name": "nvimg_2actors_t4_r256", "decoder": "nvimgcodec", "actors": 2, "actor_concurrency": 4, "rows_per_call": 256},
    {"name": "compiled_b128_t2_r512", "batch": 128, "actor_concurrency": 2, "rows_per_call": 512},
    {"name": "eager_t2_r256", "compile": "off", "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "photos_compiled_t2_r256", "set": "photos", "actor_concurrency": 2, "rows_per_call": 256},
]

if __name__ == "__main__":
    sys.exit(main())
