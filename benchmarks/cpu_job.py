"""Whole batch job vs engine alone on this CPU machine (issue 2's benchmark).

    python benchmarks/cpu_job.py [--images 240] [--repeats 3] [--batch-size 8] [--variants 2x1,1x2]
                                 [--process-cpu] [--no-warmup]

Both are measured on the same files, alternating, ``--repeats`` times; medians are
reported. ``--variants`` lists job layouts ACTORSxTHREADS (detector actors x engine threads
each, one CPU per actor in Ray's accounting), each run in every round; the first is the
headline row (default: an actor per core, one engine thread each, as the README recommends).
*Engine only* = ONNX Runtime on already letterboxed tensors (no reading, decoding,
letterboxing, NMS or writing). *Job* = ``raydetect.job.run.run_job`` from file listing to
Parquet written, with Ray already started (the actor start, model load and warm-up are inside
the job's time). Ray Data starts its own actors (stats, autoscaling coordinator) at the first
dataset of a Ray session, once per cluster; a warm-up job of one batch runs first so that no
measured job pays for them (``--no-warmup``: the first measured job does). Results:
``benchmarks/results/cpu_job.json|md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydetect.config import DetectorConfig, JobConfig  # noqa: E402
from raydetect.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from raydetect.job.run import run_job  # noqa: E402
from raydetect.model_card import ModelCard  # noqa: E402
from raydetect.stages.preprocess import letterbox, to_tensor  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def make_images(d: Path, n: int) -> list[Path]:
    photos = sorted(p for p in (DATA / "images").iterdir() if p.suffix in (".jpg", ".webp"))
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        dst = d / f"img{i:05d}{src.suffix}"
        shutil.copy(src, dst)
        out.append(dst)
    return out


def engine_only(engine: OnnxRuntimeEngine, tensors: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    n = 0
    for x in tensors:
        engine.infer(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


class ProcessCPU:
    """CPU seconds used by each kind of process while a job runs (``--process-cpu``): this
    process (the driver), Ray's workers (named ``ray::...``: actors and tasks), raylet, GCS and
    the rest, from psutil samples every ``interval`` s (a process that ends between two samples
    loses its last interval)."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        import psutil

        self.psutil, self.interval = psutil, interval
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.sample(initial=True)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def group(self, proc) -> str:
        if proc.pid == os.getpid():
            return "driver (run_job)"
        name = proc.name()
        cmd = " ".join(proc.cmdline()[:2])
        if name.startswith("ray::") or "ray::" in cmd:
            kind = name.split("::", 1)[-1] if name.startswith("ray::") else cmd
            return "ray worker: " + ("actor (detector)" if "Detector" in kind or "MapWorker" in kind else
                                     "idle / other" if kind in ("IDLE", "") else kind[:40])
        if "default_worker.py" in cmd:
            return "ray worker: starting"
        for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
            if k in name or k in cmd:
                return k
        return "other: " + name[:30]

    def sample(self, initial: bool = False) -> None:
        for proc in self.psutil.process_iter():
            try:
                t = proc.cpu_times()
                cpu = t.user + t.system
                key = proc.pid
                if key not in self.first:  # a process started during the job: all of its time
                    self.first[key] = cpu if initial else 0.0
                self.last[key] = (self.group(proc), cpu)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def result(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        self.sample()
        out: dict[str, float] = {}
        for pid, (group, cpu) in self.last.items():
            out[group] = out.get(group, 0.0) + cpu - self.first.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DATA / "models" / "yolov8n-random.onnx"))
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default=f"{os.cpu_count()}x1",
                    help="job layouts ACTORSxTHREADS, comma-separated (first = headline)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="no warm-up job before the measured ones")
    ap.add_argument("--process-cpu", action="store_true",
                    help="also account the CPU seconds of each kind of process during each job")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_job"))
    args = ap.parse_args()
    names = args.variants.split(",")
    variants = [tuple(int(x) for x in v.split("x")) for v in names]

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="raydetect-bench-"))
    (tmp / "in").mkdir()
    files = make_images(tmp / "in", args.images)
    det_cfg = DetectorConfig(model=args.model, batch_size=args.batch_size)
    card = ModelCard.load(args.model)
    engine = OnnxRuntimeEngine(card, det_cfg)
    boxed = [letterbox(cv2.imread(str(p)), *card.imgsz)[0] for p in files]
    tensors = [to_tensor(boxed[i : i + args.batch_size]) for i in range(0, len(boxed), args.batch_size)]
    engine.infer(tensors[0])  # warm-up

    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    if args.warmup:
        (tmp / "warm").mkdir()
        for p in files[: args.batch_size]:
            shutil.copy(p, tmp / "warm" / p.name)
        run_job(JobConfig(input=str(tmp / "warm"), output=str(tmp / "warm-out"), detector=det_cfg, progress=False))
    runs = []
    for r in range(args.repeats):
        for name, (actors, threads) in zip(names, variants, strict=True):
            eng = engine_only(engine, tensors)
            cfg = JobConfig(input=str(tmp / "in"), output=str(tmp / f"out{r}-{name}"),
                            detector=det_cfg.model_copy(update={"threads": threads}), progress=False,
                            concurrency=actors)
            prof = ProcessCPU() if args.process_cpu else None
            s = run_job(cfg)
            assert s.images == len(files) and s.errors == 0, s
            runs.append({"variant": name, "engine_images_per_s": eng,
                         "job_images_per_s": s.images_per_s, "job_s": s.seconds})
            if prof is not None:
                runs[-1]["process_cpu_s"] = prof.result()
            print(f"run {r} {name}: engine {eng:.2f} img/s, job {s.images_per_s:.2f} img/s "
                  f"({s.seconds:.1f} s)" + (f" CPU s by process: {runs[-1]['process_cpu_s']}" if prof else ""),
                  flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    per = {}
    for name in names:
        mine = [x for x in runs if x["variant"] == name]
        per[name] = {
            "engine_images_per_s_median": statistics.median(x["engine_images_per_s"] for x in mine),
            "job_images_per_s_median": statistics.median(x["job_images_per_s"] for x in mine),
            "job_over_engine_median": statistics.median(x["job_images_per_s"] / x["engine_images_per_s"] for x in mine),
        }
    head = per[names[0]]
    eng_med, job_med = head["engine_images_per_s_median"], head["job_images_per_s_median"]
    result = {
        "command": "python benchmarks/cpu_job.py " + " ".join(sys.argv[1:]),
        "model": Path(args.model).name,
        "images": len(files),
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "engine_threads": engine.threads,
        "warmup_job": args.warmup,
        "runs": runs,
        "engine_images_per_s_median": eng_med,
        "job_images_per_s_median": job_med,
        "job_over_engine": job_med / eng_med,
        "variants": per,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"| measure ({len(files)} images, batch {args.batch_size}, {os.cpu_count()} CPUs, median of "
        f"{args.repeats}; job layout {names[0]}) | images/s |\n|---|---|\n"
        f"| engine only (ONNX Runtime, {engine.threads} threads) | {eng_med:.2f} |\n"
        f"| whole job (read → decode → letterbox → infer → NMS → Parquet) | {job_med:.2f} |\n"
        f"| job / engine | {100 * job_med / eng_med:.1f} % |\n"
    )
    if len(variants) > 1:
        table += ("\n| job layout (actors x engine threads) | job images/s | job / engine (median of per-round ratios) |\n"
                  "|---|---|---|\n")
        for v, m in per.items():
            table += f"| {v} | {m['job_images_per_s_median']:.2f} | {100 * m['job_over_engine_median']:.1f} % |\n"
    if args.process_cpu:
        groups = sorted({g for x in runs for g in x["process_cpu_s"]},
                        key=lambda g: -statistics.median(x["process_cpu_s"].get(g, 0.0) for x in runs))
        table += ("\n| process (CPU seconds during the job, median of the rounds) | "
                  + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
        for g in groups:
            meds = [statistics.median(x["process_cpu_s"].get(g, 0.0) for x in runs if x["variant"] == n) for n in names]
            if max(meds) >= 0.2:
                table += f"| {g} | " + " | ".join(f"{m:.1f}" for m in meds) + " |\n"
        job_s = [statistics.median(x["job_s"] for x in runs if x["variant"] == n) for n in names]
        table += ("| (CPU seconds available: CPUs x job time) | "
                  + " | ".join(f"{(os.cpu_count() or 1) * t:.1f}" for t in job_s) + " |\n")
    Path(args.out + ".md").write_text(f"# CPU job vs engine\n\n`{result['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
