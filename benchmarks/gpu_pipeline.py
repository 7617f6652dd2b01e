"""The GPU pipeline, measured in one call (issue 3): bytes → nvJPEG → letterbox → FP16 batched
inference (CUDA graphs) → NMS → rows, on one GPU.

    python benchmarks/gpu_pipeline.py [--model M.onnx] [--images DIR] [--files 5000]

Sections (each saved as soon as it is done, to ``--out``/gpu_pipeline.json and .md):

* ``dataset``: ``--files`` JPEG files on local disk for each of two sets: *coco640* (640x480
  baseline JPEGs re-encoded from crops/flips of the real photos, COCO-sized) and *photos* (the
  real JPEG photos replicated as they are: 408x612 to 1104x736, all progressive);
* ``engine``: engine-only images/s (inputs already letterboxed on the GPU) at each batch size,
  FP32 and FP16, CUDA-graph replay and eager; p50/p99 latency per call; peak GPU memory;
* ``decode``: decode-only images/s: nvJPEG (torchvision, batched), the raydetect GPU decoder
  (header checks + nvJPEG + fallbacks), decode + GPU letterbox; OpenCV on 1 core and on N
  processes;
* ``h2d``: bytes host→device per image, counted by the CUDA profiler (every memcpy, the
  libraries' own included) for the GPU-decode path, CPU decode + GPU letterbox, and the CPU
  path (letterboxed float32 tensors uploaded);
* ``detector``: ``Detector.detect`` in-process (bytes → result rows): p50/p99 latency per batch,
  images/s with and without decode/inference overlap (CUDA streams), and a per-stage breakdown;
* ``e2e``: the Ray Data job (``raydetect.job.run_job``, engine torch FP16, one actor with
  ``num_gpus=1``) over the files: total and steady-state images/s, GPU busy fraction (NVML),
  peak GPU memory, for ``actor_concurrency`` 1/2 and ``rows_per_call``.

A table of the main numbers is printed last. ``--device cpu --quick`` runs a small smoke test
of the same code without a GPU (numbers meaningless).
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
    def __init__(self, out: Path, argv: list[str]) -> None:
        self.out = out
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
        (self.out / "gpu_pipeline.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_pipeline.md").write_text(to_markdown(self.data))


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


def make_dataset(work: Path, n: int) -> dict[str, Any]:
    photos = sorted(p for p in (DATA / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    blobs = [p.read_bytes() for p in photos]
    sets = {"coco640": coco_variants(blobs), "photos": blobs}
    info = {}
    for name, distinct in sets.items():
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
        info[name] = {
            "dir": str(d),
            "files": n,
            "distinct": len(distinct),
            "mean_kb": r3(total / n / 1024),
            "progressive_fraction": r3(sum(is_progressive(distinct[i % len(distinct)]) for i in range(n)) / n),
            "approx_sizes": sorted({(s[0] * 8, s[1] * 8) for s in sizes}),
        }
    return info


def load_bytes(d: str, limit: int | None = None) -> list[bytes]:
    files = sorted(Path(d).iterdir())[:limit]
    return [f.read_bytes() for f in files]


# --- engine only ----------------------------------------------------------------------------


def bench_engine(model: str, device: str, batches: list[int], precisions: list[str], coco_dir: str,
                 seconds: float) -> dict[str, Any]:
    import torch

    from raydetect.config import DetectorConfig
    from raydetect.engines.torch import TorchEngine
    from raydetect.model_card import ModelCard
    from raydetect.preprocess import decode_image, letterbox, to_tensor

    card = ModelCard.load(model)
    imgs = [decode_image(b, 10**9, 10**9) for b in load_bytes(coco_dir, 48)]
    base = torch.from_numpy(to_tensor([letterbox(im, *card.imgsz)[0] for im in imgs]))
    out: dict[str, Any] = {}
    for prec in precisions:
        if device == "cpu" and prec == "fp16":
            continue
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        eng = TorchEngine(card, DetectorConfig(model=model, engine="torch", device=device, precision=prec,
                                               batch_size=max(batches)))
        init_s = time.perf_counter() - t0
        # 4 rotating input sets, so repeated calls do not re-read one buffer from cache
        g = torch.Generator().manual_seed(0)
        pool = [base[torch.randint(len(base), (max(batches),), generator=g)].to(device, eng.dtype) for _ in range(4)]
        res: dict[str, Any] = {"init_s": r3(init_s), "cuda_graph_batches": sorted(eng.graphs),
                               "cuda_graph_error": eng.graph_error, "by_batch": {}}
        for b in batches:
            row = {}
            for mode, fn in (("graph", eng.infer), ("eager", eng.infer_eager)):
                if mode == "graph" and not eng.graphs:
                    continue
                for k in range(3):
                    fn(pool[k % 4][:b])
                sync(device)
                # throughput: back-to-back calls, one sync at the end
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
                row[mode] = {"images_per_s": r3(iters * b / el), "p50_ms": r3(pct(lat, 50)), "p99_ms": r3(pct(lat, 99))}
            res["by_batch"][str(b)] = row
            log(f"engine {prec} b={b}: {row}")
        if device.startswith("cuda"):
            res["peak_gpu_mem_mb"] = r3(torch.cuda.max_memory_allocated() / 2**20)
        out[prec] = res
        del eng, pool
    return out


# --- decode only ----------------------------------------------------------------------------


def _cv_worker(args: tuple[list[str], bool]) -> tuple[int, float]:
    paths, with_letterbox = args
    cv2.setNumThreads(1)
    from raydetect.preprocess import letterbox

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

    from raydetect.gpu_preprocess import GpuPreprocessor

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
            pp = GpuPreprocessor((640, 640), device=device, dtype=torch.float16)
            for what, fn in (("raydetect_gpu_decode", pp.decode), ("raydetect_gpu_decode_letterbox", pp.prepare)):
                fn(blobs[:batch])
                sync(device)
                t0 = time.perf_counter()
                n_nv = 0
                for s in range(0, len(blobs), batch):
                    r = fn(blobs[s : s + batch])
                    n_nv += (r[1] if isinstance(r, tuple) else r).nvjpeg
                sync(device)
                row[what] = r3(len(blobs) / (time.perf_counter() - t0))
                row[what + "_nvjpeg_fraction"] = r3(n_nv / len(blobs))
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
        if "raydetect_gpu_decode" in row:
            row["gpu_decode_vs_1core"] = r3(row["raydetect_gpu_decode"] / row["opencv_1core"])
            row["nvjpeg_vs_1core"] = r3(row["nvjpeg_torchvision"] / row["opencv_1core"])
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
    from raydetect.gpu_preprocess import GpuPreprocessor
    from raydetect.model_card import ModelCard

    card = ModelCard.load(model)
    eng = TorchEngine(card, DetectorConfig(model=model, engine="torch", device=device, batch_size=64,
                                           precision="fp16" if device.startswith("cuda") else "fp32"))
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
    from raydetect.gpu_preprocess import GpuPreprocessor
    from raydetect.preprocess import decode_image, letterbox, to_tensor

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


def bench_detector(model: str, sets: dict[str, Any], device: str, batch: int, n: int) -> dict[str, Any]:

    from raydetect.detector import Detector
    from raydetect.gpu_postprocess import batched_postprocess
    from raydetect.gpu_preprocess import letterbox_tensors, probe_jpeg
    from raydetect.preprocess import check_encoded

    prec = "fp16" if device.startswith("cuda") else "fp32"
    det = Detector({"model": model, "engine": "torch", "device": device, "precision": prec,
                    "batch_size": batch, "conf": 0.25})
    out: dict[str, Any] = {"precision": prec, "batch": batch, "info": {k: v for k, v in det.info().items()
                                                                        if k not in ("names",)}}
    for name, info in sets.items():
        blobs = load_bytes(info["dir"], n)
        row: dict[str, Any] = {}
        det.detect(blobs[:batch])
        lat = []
        for s in range(0, min(len(blobs), 40 * batch), batch):  # one batch per call: per-batch latency
            t0 = time.perf_counter()
            res = det.detect(blobs[s : s + batch])
            det.to_table(res)
            lat.append((time.perf_counter() - t0) * 1e3)
        row["per_batch_latency_ms"] = {"p50": r3(pct(lat, 50)), "p99": r3(pct(lat, 99)), "calls": len(lat)}
        for overlap in (False, True):  # several chunks per call: decode k+1 while k runs
            det.overlap = overlap
            call = 4 * batch
            t0 = time.perf_counter()
            for s in range(0, len(blobs), call):
                det.to_table(det.detect(blobs[s : s + call]))
            row[f"images_per_s_calls_of_{call}_overlap_{overlap}"] = r3(len(blobs) / (time.perf_counter() - t0))
        det.overlap = True
        # stage breakdown, synchronised after each stage (so stages do not overlap here)
        stages = {k: 0.0 for k in ("header_checks", "gpu_decode_incl_checks", "letterbox", "infer", "nms_d2h",
                                   "rows_and_table")}
        nb = 0
        for s in range(0, min(len(blobs), 20 * batch), batch):
            part = blobs[s : s + batch]
            t = time.perf_counter()
            for b in part:
                check_encoded(b, 1 << 26)
                probe_jpeg(b)
            stages["header_checks"] += time.perf_counter() - t
            t = time.perf_counter()
            decoded, _ = det.gpu.decode(part)
            sync(device)
            stages["gpu_decode_incl_checks"] += time.perf_counter() - t
            t = time.perf_counter()
            good = [d for d in decoded if d is not None]
            x, geoms = letterbox_tensors(good, 640, 640, det.gpu.dtype)
            sync(device)
            stages["letterbox"] += time.perf_counter() - t
            t = time.perf_counter()
            pred = det.engine.infer(x)
            sync(device)
            stages["infer"] += time.perf_counter() - t
            t = time.perf_counter()
            rows = batched_postprocess(pred, det.card.layout, 0.25, 0.7, 300)
            stages["nms_d2h"] += time.perf_counter() - t
            t = time.perf_counter()
            from raydetect.types import ImageResult

            results = []
            for i, (r, g, d) in enumerate(zip(rows, geoms, good, strict=True)):
                h, w = int(d.shape[1]), int(d.shape[2])
                results.append(ImageResult(uri=str(i), height=h, width=w, detections=det._gpu_detections(*r, g, h, w)))
            det.to_table(results)
            stages["rows_and_table"] += time.perf_counter() - t
            nb += len(part)
        row["stage_ms_per_image"] = {k: r3(v / nb * 1e3) for k, v in stages.items()}
        row["stage_note"] = "gpu_decode_incl_checks repeats the header checks; stages synchronised one by one"
        out[name] = row
        log(f"detector {name}: {row}")
    return out


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


#: perf_counter() at each start of raydetect.job.run_images (the clock of the job's timeline)
RUN_IMAGES_T0: list[float] = [0.0]


def _mark_run_images() -> None:
    import raydetect.job as job

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
    from raydetect.job import run_job

    _mark_run_images()
    gpus = 1 if device.startswith("cuda") else 0
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, logging_level="WARNING")
    out: dict[str, Any] = {"ray_cpus": os.cpu_count(), "ray_gpus": gpus, "runs": []}
    for v in variants:
        name, set_name = v["name"], v.get("set", "coco640")
        prec = v.get("precision", "fp16" if gpus else "fp32")
        det = DetectorConfig(model=model, engine="torch", device=None if gpus else "cpu", precision=prec,
                             batch_size=v.get("batch", batch), conf=0.25)
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


def summary_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    s = data["sections"]
    rows: list[tuple[str, str]] = []
    eng = s.get("engine", {})
    for prec, res in eng.items():
        for b, row in res.get("by_batch", {}).items():
            g = row.get("graph") or row.get("eager")
            e = row.get("eager", {})
            rows.append((f"engine {prec} b={b} img/s (graph | eager)",
                         f"{g.get('images_per_s')} | {e.get('images_per_s')}  p50 {g.get('p50_ms')} ms p99 {g.get('p99_ms')} ms"))
        if "peak_gpu_mem_mb" in res:
            rows.append((f"engine {prec} peak GPU memory", f"{res['peak_gpu_mem_mb']} MB"))
    for name, row in s.get("decode", {}).items():
        if isinstance(row, dict):
            keys = [k for k in row if not k.endswith("fraction") and k != "images"]
            rows.append((f"decode {name} img/s", ", ".join(f"{k}={row[k]}" for k in keys)))
    for name, row in s.get("h2d", {}).items():
        for k, v in row.items():
            if isinstance(v, dict) and "bytes_per_image" in v:
                rows.append((f"H2D {name} {k}", f"{v['bytes_per_image']} B/image"))
    for name, row in s.get("detector", {}).items():
        if isinstance(row, dict) and "per_batch_latency_ms" in row:
            lat = row["per_batch_latency_ms"]
            ov = {k: v for k, v in row.items() if k.startswith("images_per_s")}
            rows.append((f"detector {name} per batch", f"p50 {lat['p50']} ms p99 {lat['p99']} ms; {ov}"))
            rows.append((f"detector {name} ms/image by stage", str(row.get("stage_ms_per_image"))))
    for run in s.get("e2e", {}).get("runs", []):
        if "error" in run:
            rows.append((f"e2e {run['name']}", run["error"]))
            continue
        rows.append((f"e2e {run['name']} ({run['set']}, {run['precision']}, b={run['batch']}, "
                     f"actors={run.get('actors', 1)}x{run.get('gpus_per_actor')} GPU, "
                     f"threads={run['actor_concurrency']}, rows/call={run['rows_per_call']})",
                     f"steady {run.get('images_per_s_steady')} img/s, total {run['images_per_s_total']} img/s "
                     f"({run['images']} in {run['seconds']} s), GPU busy {run.get('gpu_busy_fraction')}, "
                     f"peak mem {run.get('peak_gpu_mem_mb_all_processes')} MB"))
    if "targets" in s:
        for k, v in s["targets"].items():
            rows.append((f"target {k}", str(v)))
    return rows


def to_markdown(data: dict[str, Any]) -> str:
    lines = ["# GPU pipeline benchmark (issue 3)", "", f"Command: `{data['command']}`", ""]
    meta = data["sections"].get("meta")
    if meta:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    lines += ["| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(data)]
    if data["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: `{v.splitlines()[0]}`" for k, v in data["errors"].items()]
    lines += ["", "Full numbers: gpu_pipeline.json (same folder)."]
    return "\n".join(lines) + "\n"


def targets(s: dict[str, Any], batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [r for r in s.get("e2e", {}).get("runs", []) if "images_per_s_steady" in r and r["set"] == "coco640"]
    eng = s.get("engine", {}).get("fp16", {}).get("by_batch", {}).get(str(batch), {})
    eng_rate = (eng.get("graph") or eng.get("eager") or {}).get("images_per_s")
    if runs:
        best = max(runs, key=lambda r: r["images_per_s_steady"])
        out["e2e >= 3000 img/s (best coco640 run, steady)"] = f"{best['images_per_s_steady']} ({best['name']}): " + (
            "MET" if best["images_per_s_steady"] >= 3000 else "MISSED")
        if eng_rate:
            ratio = best["images_per_s_steady"] / eng_rate
            out[f"e2e >= 85% of engine-only FP16 b={batch}"] = f"{ratio:.0%} of {eng_rate}: " + (
                "MET" if ratio >= 0.85 else "MISSED")
    dec = s.get("decode", {}).get("coco640", {})
    if "gpu_decode_vs_1core" in dec:
        out["GPU decode >= 10x one CPU core (coco640)"] = f"{dec['gpu_decode_vs_1core']}x: " + (
            "MET" if dec["gpu_decode_vs_1core"] >= 10 else "MISSED")
    return out


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DATA / "models" / "yolov8n-random.onnx"))
    ap.add_argument("--work", default="/tmp/raydetect-gpu-bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--files", type=int, default=5000, help="files per set on local disk")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--batch", type=int, default=64, help="batch of the decode, detector and e2e runs")
    ap.add_argument("--seconds", type=float, default=2.0, help="per engine-throughput measurement")
    ap.add_argument("--cpu-workers", type=int, default=os.cpu_count())
    ap.add_argument("--sections", default="engine,decode,h2d,detector,e2e")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.batches, args.batch, args.seconds = min(args.files, 40), "1,2", 4, 0.2
        args.cpu_workers = min(args.cpu_workers, 2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(Path(args.out), sys.argv)
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

    steps = {
        "engine": lambda: bench_engine(args.model, args.device, batches, ["fp32", "fp16"], sets["coco640"]["dir"],
                                       args.seconds),
        "decode": lambda: bench_decode(sets, args.device, args.batch, args.cpu_workers,
                                       n_gpu=min(args.files, 2000), n_cpu=min(args.files, 800)),
        "h2d": lambda: bench_h2d(args.model, sets, args.device, work, n=min(args.files, 256)),
        "detector": lambda: bench_detector(args.model, sets, args.device, args.batch, n=min(args.files, 2048)),
        "e2e": lambda: bench_e2e(args.model, sets, args.device, args.batch, E2E_VARIANTS if not args.quick else
                                 [{"name": "base"}, {"name": "threads2", "actor_concurrency": 2}], work),
    }
    for name in sections:
        log(f"--- {name}")
        try:
            res.put(name, steps[name]())
        except Exception as e:
            res.error(name, e)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    res.put("targets", targets(res.data["sections"], args.batch))
    print("\n" + to_markdown(res.data), flush=True)
    return 0


E2E_VARIANTS = [
    {"name": "base"},  # one call at a time, one engine batch per call
    {"name": "threads2", "actor_concurrency": 2},  # Ray: two calls at once in the actor
    {"name": "rows256", "rows_per_call": 256},  # CUDA streams: 4 chunks per call, decode k+1 during k
    {"name": "threads2_rows256", "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "2actors_threads2_rows256", "actors": 2, "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "photos_threads2_rows256", "set": "photos", "actor_concurrency": 2, "rows_per_call": 256},
    {"name": "photos_2actors_threads2_rows256", "set": "photos", "actors": 2, "actor_concurrency": 2,
     "rows_per_call": 256},
]

if __name__ == "__main__":
    sys.exit(main())
