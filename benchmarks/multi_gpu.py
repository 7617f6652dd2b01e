"""Scaling across the GPUs of one host (issue 19): the Ray Data image job and the Serve load
point on 1, 2, … N GPUs, in one call.

    python benchmarks/multi_gpu.py                       # every GPU Ray sees: counts 1, 2, 4, … N
    python benchmarks/multi_gpu.py --gpus 1,2,4,8        # these counts
    python benchmarks/multi_gpu.py --smoke               # CPU, 2 fake GPUs, tiny (numbers meaningless)

For each GPU count k it starts a fresh local Ray instance that sees only the first k GPUs
(``CUDA_VISIBLE_DEVICES``, ``num_gpus=k``; every CPU of the host), then measures:

* ``job``: ``raydetect.job.run.run_job`` over ``k * --files-per-gpu`` 640x480 baseline JPEGs (made by
  ``gpu_pipeline.coco_variants`` from the photos, as ``gpu_pipeline.make_dataset`` makes its
  *coco640* set), with the settings of the best single-GPU run (``gpu_pipeline.json``
  ``summary.e2e_run`` = compiled_3actors_t2_r256: torch FP16 compiled, batch 64,
  ``--actors-per-gpu`` 3 actors per GPU x 1/3 GPU, actor_concurrency 2, rows_per_call 256).
  Images/s are steady-state (``gpu_pipeline.steady_rate``: first to last result batch of the
  job's report timeline) and over the whole detecting phase; the first count is preceded by a
  short unmeasured job that fills the compiled-kernel cache.
* ``serve``: the load point of ``serve_load_gpu.md`` scaled with k: ``--replicas-per-gpu`` (4) x
  1/4 GPU replicas, 2 CPUs each, batching on (max batch 16, wait 5 ms), ``--clients-per-gpu``
  (32) closed-loop HTTP clients over ``--client-procs-per-gpu`` processes (serve_load.py's
  ``measure``), HAProxy ingress on a private port block; the 640x480 bus image.

Alongside: GPU busy fraction per GPU (NVML via pynvml, when installed) over each measured
window, the host's CPU busy fraction and the driver process's CPU (cores) over the job's steady
window, the job's start-up, driver-side listing time, shard-writer time (``JobSummary.write_s``),
time to the first result, the object store's spill (``ray memory --stats-only``) and Ray Data's
per-operator stats. ``summary.stops_scaling`` names the first count that misses the issue's
targets (2 GPUs >= 1.9x, 4 >= 3.7x, 8 >= 7.2x; otherwise efficiency < 0.9) and what the numbers
point at.

Results: ``--out`` (default ``benchmarks/results/multi_gpu``, ``multi_gpu_cpu_smoke`` with
``--smoke``) ``.json`` and ``.md``, saved after every count; the JSON has a ``summary`` object
(``gpus``, ``img_s`` and ``efficiency`` per count = rate_k / (k * rate_1), ``speedup``,
``serve_rps``, ``serve_efficiency``, ``gpu_busy``, ``stops_scaling``); a short table is printed
last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_pipeline as gp  # noqa: E402
from serve_load import free_port, machine_info, measure, reencode  # noqa: E402

DATA = gp.DATA
log, r3 = gp.log, gp.r3
#: the issue's acceptance: images/s on k GPUs >= this many times one GPU's
TARGET_SPEEDUP = {2: 1.9, 4: 3.7, 8: 7.2}
#: a steady window (first to last result batch) shorter than this falls back to the total rate
MIN_STEADY_S = 1.0
SMOKE_NOTE = ("CPU smoke run with fake GPU resources (Ray num_gpus only; onnxruntime on 2 shared cores): "
              "the numbers are meaningless, only the code path is exercised.")


# --- GPUs ---------------------------------------------------------------------------------------


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` spells them (indices
    0..n-1 when it is unset); [] without CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def default_counts(n: int) -> list[int]:
    """1, 2, 4, … up to ``n``, and ``n`` itself."""
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    if n >= 1 and out[-1] != n:
        out.append(n)
    return out


class MultiGpuSampler(gp.GpuSampler):
    """``gpu_pipeline.GpuSampler`` for several GPUs (NVML handles by index or UUID), plus the
    host's CPU busy fraction and this (driver) process's CPU time, sampled in a thread."""

    def __init__(self, ids: list[str], period: float = 0.05) -> None:
        super().__init__(period)
        import psutil

        self.psutil, self.proc = psutil, psutil.Process()
        self.handles: list[Any] = []
        if self.ok:
            try:
                for i in ids:
                    self.handles.append(self.nv.nvmlDeviceGetHandleByIndex(int(i)) if i.isdigit()
                                        else self.nv.nvmlDeviceGetHandleByUUID(i))
            except Exception as e:  # ids NVML does not know (fake GPUs, MIG): no GPU samples
                log(f"NVML: no handles for {ids}: {e}")
                self.handles = []
        self.gpu: list[tuple[float, list[int]]] = []
        self.host: list[tuple[float, float, float]] = []  # (t, host CPU %, driver CPU seconds)

    def __enter__(self) -> MultiGpuSampler:
        self.psutil.cpu_percent(None)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            if self.handles:
                self.gpu.append((t, [int(self.nv.nvmlDeviceGetUtilizationRates(h).gpu) for h in self.handles]))
            ct = self.proc.cpu_times()
            self.host.append((t, self.psutil.cpu_percent(None), ct.user + ct.system))
            time.sleep(self.period)

    def __exit__(self, *a: Any) -> None:
        self._stop.set()
        self.t.join()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        g = [u for t, u in self.gpu if t0 <= t <= t1]
        if g:
            per = [r3(statistics.mean(s[i] for s in g) / 100) for i in range(len(g[0]))]
            out.update(gpu_busy_per_gpu=per, gpu_busy_mean=r3(statistics.mean(per)), gpu_samples=len(g))
        h = [x for x in self.host if t0 <= x[0] <= t1]
        if len(h) >= 2:
            out["host_cpu_busy"] = r3(statistics.mean(x[1] for x in h[1:]) / 100)
            out["driver_cpu_cores"] = r3((h[-1][2] - h[0][2]) / (h[-1][0] - h[0][0]))
        return out


# --- Ray per GPU count ----------------------------------------------------------------------------


def start_ray(ids: list[str], cpus: int | None, object_store_mb: int | None) -> None:
    """A fresh local Ray instance that sees only ``ids`` (real or, in the smoke run, fake GPUs)."""
    import ray

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    ray.init(address="local", num_cpus=cpus, num_gpus=len(ids), include_dashboard=False, logging_level="WARNING",
             **({"object_store_memory": object_store_mb * 2**20} if object_store_mb else {}))
    ray.data.DataContext.get_current().enable_progress_bars = False


def object_store_stats() -> dict[str, Any]:
    """Plasma usage and spill/restore totals of the running instance (``ray memory --stats-only``)."""
    try:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {}
    for key, pat in (("plasma_used_mib", r"Plasma memory usage (\d+) MiB"),
                     ("spilled_mib", r"Spilled (\d+) MiB"), ("restored_mib", r"Restored (\d+) MiB")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else 0
    out["text"] = text.strip()[-1500:]
    return out


# --- the image job ---------------------------------------------------------------------------------


def make_coco640(work: Path, n: int) -> dict[str, Any]:
    """``n`` 640x480 baseline JPEGs in ``work/coco640``: the *coco640* set of
    ``gpu_pipeline.make_dataset``, without its *photos* set."""
    return gp.make_dataset(work, n, ("coco640",))["coco640"]


@contextlib.contextmanager
def instrumented_job():
    """Time the job's listing (``scan_inputs``) and keep its Ray Dataset (for its stats) by
    wrapping two of ``raydetect.job.run``'s functions for the duration; ``gpu_pipeline`` marks the
    start of ``run_images`` (the clock of the report's timeline)."""
    import raydetect.job.run as job

    gp._mark_run_images()
    info: dict[str, Any] = {"listing_s": 0.0, "datasets": []}
    scan, build = getattr(job, "scan_inputs", None), getattr(job, "build_dataset", None)

    def timed_scan(*a: Any, **k: Any):
        t = time.perf_counter()
        try:
            return scan(*a, **k)
        finally:
            info["listing_s"] += time.perf_counter() - t

    def kept_build(*a: Any, **k: Any):
        ds = build(*a, **k)
        info["datasets"].append(ds)
        return ds

    if scan is not None:
        job.scan_inputs = timed_scan
    if build is not None:
        job.build_dataset = kept_build
    try:
        yield info
    finally:
        if scan is not None:
            job.scan_inputs = scan
        if build is not None:
            job.build_dataset = build


def dataset_stats(ds) -> dict[str, Any]:
    """Ray Data's stats of the executed dataset: per-operator wall/CPU time lines and the text."""
    try:
        text = ds.stats()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    ops = [ln.strip() for ln in text.splitlines()
           if re.match(r"\s*(Operator \d+|\* Remote wall time|\* Remote cpu time|\* Operator throughput|"
                       r"\* Total input num rows|\* Ray Data throughput|Dataset throughput)", ln)]
    return {"lines": ops[:40], "text": text[-6000:]}


def job_settings(args: argparse.Namespace, work: Path):
    from raydetect.config import DetectorConfig

    tcfg: dict[str, Any] = {}
    if args.engine == "torch":
        tcfg = {"compile": args.compile, "cache": str(work / "torch-cache"), "compile_batches": (args.batch,)}
    return DetectorConfig(model=args.model, engine=args.engine, device=args.device, precision=args.precision,
                          batch_size=args.batch, conf=0.25, threads=args.threads, **({"torch": tcfg} if tcfg else {}))


def run_image_job(k: int, args: argparse.Namespace, coco: dict[str, Any], work: Path, ids: list[str],
                  limit: int, name: str) -> dict[str, Any]:
    from raydetect.config import JobConfig
    from raydetect.job.run import run_job

    actors = args.actors_per_gpu * k
    cfg = JobConfig(input=coco["dir"], output=str(work / f"out_{name}"), detector=job_settings(args, work),
                    num_gpus=1.0 / args.actors_per_gpu, num_cpus=args.actor_cpus, concurrency=actors,
                    min_actors=actors, actor_concurrency=args.actor_concurrency, rows_per_call=args.rows_per_call,
                    limit=limit, shard_size=args.shard_size, progress=False, report=True, report_samples=0)
    row: dict[str, Any] = {"name": name, "gpus": k, "actors": actors, "gpus_per_actor": r3(cfg.num_gpus),
                           "files": limit}
    sampler = MultiGpuSampler(ids)
    with instrumented_job() as info, sampler:
        t_call = time.perf_counter()
        summary = run_job(cfg, overwrite=True)
        call_s = time.perf_counter() - t_call
    row.update(images=summary.images, errors=summary.errors, detections=summary.detections,
               call_s=r3(call_s), startup_s=r3(summary.startup_s), listing_s=r3(info["listing_s"]),
               listed_files=coco["files"], seconds=r3(summary.seconds), images_per_s_total=r3(summary.images_per_s),
               shards=summary.shards, write_s=r3(summary.write_s),
               write_fraction=r3(summary.write_s / summary.seconds) if summary.seconds else None)
    if summary.report:
        rep = json.loads(Path(summary.report).read_text())
        rate, t0, t1 = gp.steady_rate(rep.get("throughput_timeline", []))
        base = gp.RUN_IMAGES_T0[-1]
        row.update(images_per_s_steady=r3(rate), first_result_s=r3(t0), steady_window_s=r3(t1 - t0),
                   **sampler.window(base + t0, base + t1))
    row["object_store"] = object_store_stats()
    if info["datasets"]:
        row["ray_data"] = dataset_stats(info["datasets"][-1])
    shutil.rmtree(work / f"out_{name}", ignore_errors=True)
    return row


# --- the Serve load point ----------------------------------------------------------------------


def isolate_serve(max_replicas: int, private: Path) -> None:
    """A private port block and HAProxy directory (``private``: a short path, HAProxy's socket
    paths must fit 97 bytes) for every Ray instance this process starts (other Serve instances
    on the host, e.g. a test run, stay apart), and the HAProxy ingress."""
    from raydetect.serve.ingress import block_size, isolation_env, reserve_ports, use_ingress

    use_ingress("haproxy", drain_s=1.0)
    base = reserve_ports(block_size(max_replicas))
    os.environ.update(isolation_env(base, max_replicas, private))


def run_serve_point(k: int, args: argparse.Namespace, body: bytes, pool, ids: list[str]) -> dict[str, Any]:
    import urllib.request

    from ray import serve

    from raydetect.serve.app import app_builder

    replicas, clients = args.replicas_per_gpu * k, args.clients_per_gpu * k
    procs = max(1, min(args.client_procs_per_gpu * k, args.max_client_procs))
    port = free_port()
    row: dict[str, Any] = {"gpus": k, "replicas": replicas, "gpus_per_replica": r3(1.0 / args.replicas_per_gpu),
                           "clients": clients, "client_procs": procs}
    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    row["start_s"] = r3(time.perf_counter() - t0)
    try:
        app_args = {"model": args.serve_model, "engine": args.serve_engine, "precision": args.precision,
                    "replicas": str(replicas), "num_cpus": args.serve_cpus, "num_gpus": 1.0 / args.replicas_per_gpu,
                    "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                    "max_ongoing_requests": max(64, 2 * clients)}
        if args.device:
            app_args["device"] = args.device
        if args.threads:
            app_args["threads"] = args.threads
        t0 = time.perf_counter()
        serve.run(app_builder(app_args), name="scale", route_prefix="/")
        row["deploy_s"] = r3(time.perf_counter() - t0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=120) as r:
            model = json.loads(r.read())
        row["model"] = {x: model.get(x) for x in ("engine", "precision", "device")}
        sampler = MultiGpuSampler(ids)
        with sampler:
            t0 = time.perf_counter()
            point = measure(pool, f"http://127.0.0.1:{port}/v1/detect", body, "image/jpeg", clients, procs,
                            args.serve_warmup, args.serve_duration, args.serve_max_requests)
            t1 = time.perf_counter()
        # the clients' warm-up is inside [t0, t1]; its first seconds are left out of the busy window
        row.update({x: point[x] for x in ("requests", "errors", "seconds", "rps", "p50_ms", "p90_ms", "p99_ms",
                                          "replica_p50_ms", "mean_batch", "max_batch")})
        row.update(sampler.window(t0 + args.serve_warmup, t1))
    finally:
        t0 = time.perf_counter()
        serve.shutdown()
        row["shutdown_s"] = r3(time.perf_counter() - t0)
    return row


# --- report ------------------------------------------------------------------------------------


def diagnose(job: dict[str, Any]) -> list[str]:
    """What the job's numbers point at (heuristics over what was measured)."""
    out = []
    busy = job.get("gpu_busy_mean")
    if busy is not None:
        out.append(f"GPUs busy {busy:.0%}" + (" (the engine is the limit)" if busy >= 0.9 else " (GPUs wait for input)"))
    elif job:
        out.append("GPU busy not measured (no NVML)")
    drv = job.get("driver_cpu_cores")
    if drv is not None and drv >= 0.8:
        out.append(f"driver process at {drv:.2f} cores (one Python process consumes the result stream and "
                   "writes the shards: driver-bound)")
    wf = job.get("write_fraction")
    if wf is not None and wf >= 0.3:
        out.append(f"shard writer {wf:.0%} of the detecting time on the driver")
    host = job.get("host_cpu_busy")
    if host is not None and host >= 0.85:
        out.append(f"host CPUs {host:.0%} busy (CPU decode / Ray Data tasks)")
    spilled = (job.get("object_store") or {}).get("spilled_mib")
    if spilled:
        out.append(f"object store spilled {spilled} MiB")
    return out


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    counts = [r["gpus"] for r in doc["counts"]]
    by = {r["gpus"]: r for r in doc["counts"]}
    jobs = [r["job"] for r in doc["counts"] if "images_per_s_total" in (r.get("job") or {})]
    # steady rates when every count's window is long enough to mean something, else the totals
    steady = bool(jobs) and all((j.get("steady_window_s") or 0) >= MIN_STEADY_S for j in jobs)
    rate_key = "images_per_s_steady" if steady else "images_per_s_total"

    def job_rate(k: int) -> float | None:
        v = (by[k].get("job") or {}).get(rate_key)
        return v if isinstance(v, (int, float)) and v == v else None

    def serve_rate(k: int) -> float | None:
        return (by[k].get("serve") or {}).get("rps")

    s: dict[str, Any] = {"gpu": doc["machine"].get("gpu", "none (CPU)"), "smoke": doc["smoke"], "gpus": counts,
                         "img_s_basis": ("steady (first to last result batch)" if steady else
                                         f"total over the detecting phase (a steady window < {MIN_STEADY_S:g} s)")}
    for key, fn in (("img_s", job_rate), ("serve_rps", serve_rate)):
        rates = {str(k): fn(k) for k in counts}
        r1 = fn(1) if 1 in by else None
        s[key] = rates
        eff_key = "efficiency" if key == "img_s" else "serve_efficiency"
        s[eff_key] = {str(k): (r3(v / (k * r1)) if v and r1 else None) for k, v in ((int(a), b) for a, b in rates.items())}
        if key == "img_s":
            s["speedup"] = {str(k): (r3(v / r1) if v and r1 else None) for k, v in ((int(a), b) for a, b in rates.items())}
    s["gpu_busy"] = {str(k): (by[k].get("job") or {}).get("gpu_busy_per_gpu") for k in counts}
    s["serve_gpu_busy"] = {str(k): (by[k].get("serve") or {}).get("gpu_busy_per_gpu") for k in counts}
    s["targets"] = {f"{k} GPUs >= {t}x one": ("not measured" if s["speedup"].get(str(k)) is None else
                                             "MET" if s["speedup"][str(k)] >= t else "MISSED")
                    for k, t in TARGET_SPEEDUP.items() if k in by}
    stop = None
    for k in counts:
        if k == 1 or s["speedup"].get(str(k)) is None:
            continue
        sp, eff = s["speedup"][str(k)], s["efficiency"][str(k)]
        if (k in TARGET_SPEEDUP and sp < TARGET_SPEEDUP[k]) or (k not in TARGET_SPEEDUP and eff < 0.9):
            why = diagnose(by[k]["job"]) or ["nothing measured points at one cause"]
            stop = f"job stops scaling at {k} GPUs: {sp}x one GPU (efficiency {eff}); " + "; ".join(why)
            break
    if stop is None:
        measured = [k for k in counts if s["speedup"].get(str(k)) is not None]
        stop = (f"the job scales through {max(measured)} GPUs (efficiency {s['efficiency'][str(max(measured))]})"
                if len(measured) > 1 else "not enough counts measured")
    s["stops_scaling"] = stop
    if doc["smoke"]:
        s["note"] = SMOKE_NOTE
    return s


def _fmt(v: Any) -> str:
    if isinstance(v, str) and "Error" in v:  # an error: its first line
        return "error: " + v.strip().splitlines()[0][:120]
    if isinstance(v, list):
        return "/".join(f"{x:.2f}" for x in v)
    return "" if v is None else str(v)


def table_rows(doc: dict[str, Any]) -> list[str]:
    s = doc.get("summary") or {}
    lines = ["| GPUs | job img/s | speedup | efficiency | GPU busy per GPU | serve req/s | serve eff. "
             "| serve p99 ms |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["counts"]:
        k, j, sv = str(r["gpus"]), r.get("job") or {}, r.get("serve") or {}
        lines.append(f"| {k} | {_fmt(s.get('img_s', {}).get(k) or j.get('error'))} | {_fmt(s.get('speedup', {}).get(k))} "
                     f"| {_fmt(s.get('efficiency', {}).get(k))} | {_fmt(j.get('gpu_busy_per_gpu'))} "
                     f"| {_fmt(sv.get('rps', sv.get('error')))} | {_fmt(s.get('serve_efficiency', {}).get(k))} "
                     f"| {_fmt(sv.get('p99_ms'))} |")
    return lines


def to_markdown(doc: dict[str, Any]) -> str:
    a, s = doc["args"], doc.get("summary") or {}
    lines = ["# Multi-GPU scaling (benchmarks/multi_gpu.py)", ""]
    if doc["smoke"]:
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += [
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Job: `{Path(a['model']).name}` {a['engine']} {a['precision']}"
        + (f" (compile {a['compile']})" if a["engine"] == "torch" else "") + f", batch {a['batch']}, "
        f"{a['actors_per_gpu']} actors per GPU x {1 / a['actors_per_gpu']:.2f} GPU, {a['actor_cpus']} CPU each, "
        f"actor_concurrency {a['actor_concurrency']}, rows_per_call {a['rows_per_call']}, "
        f"{a['files_per_gpu']} 640x480 JPEGs per GPU ({doc.get('dataset', {}).get('mean_kb')} KB mean).  ",
        f"Serve: `{Path(a['serve_model']).name}`, {a['replicas_per_gpu']} replicas per GPU x "
        f"{1 / a['replicas_per_gpu']:.2f} GPU, {a['serve_cpus']} CPU each, max batch {a['max_batch_size']}, "
        f"wait {a['batch_wait_ms']} ms, {a['clients_per_gpu']} clients per GPU, {a['serve_duration']} s per point.",
        "",
    ]
    lines += [f"Job images/s: {s.get('img_s_basis')}; efficiency = rate_k / (k x rate_1).", ""]
    lines += table_rows(doc)
    lines += ["", "## Job details per count", "",
              "| GPUs | files | steady img/s | total img/s | call s | start-up s | listing s (all files) | first result s "
              "| steady window s | write s (fraction) | driver CPU cores | host CPU busy | spilled MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["counts"]:
        j = r.get("job") or {}
        if "error" in j:
            lines.append(f"| {r['gpus']} | {_fmt(j['error'])} |||||||||||||")
            continue
        lines.append(f"| {r['gpus']} | {j.get('files')} | {_fmt(j.get('images_per_s_steady'))} "
                     f"| {_fmt(j.get('images_per_s_total'))} | {_fmt(j.get('call_s'))} "
                     f"| {_fmt(j.get('startup_s'))} | {_fmt(j.get('listing_s'))} | {_fmt(j.get('first_result_s'))} "
                     f"| {_fmt(j.get('steady_window_s'))} | {_fmt(j.get('write_s'))} ({_fmt(j.get('write_fraction'))}) "
                     f"| {_fmt(j.get('driver_cpu_cores'))} | {_fmt(j.get('host_cpu_busy'))} "
                     f"| {_fmt((j.get('object_store') or {}).get('spilled_mib'))} |")
    lines += ["", "## Where it stops scaling", "", s.get("stops_scaling", "(not summarised yet)"), ""]
    for r in doc["counts"]:
        d = diagnose(r.get("job") or {})
        if d:
            lines.append(f"- {r['gpus']} GPUs: " + "; ".join(d))
    if s.get("targets"):
        lines += ["", "Targets (issue 19): " + ", ".join(f"{k}: {v}" for k, v in s["targets"].items())]
    if doc["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: `{v.splitlines()[0]}`" for k, v in doc["errors"].items()]
    stem = Path(a["out"]).name
    lines += ["", f"Full numbers (Ray Data operator stats, object store, per-GPU busy): {stem}.json (same folder)."]
    return "\n".join(lines) + "\n"


def save(doc: dict[str, Any], out: Path) -> None:
    doc["summary"] = summary(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(doc))


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default=None, help="GPU counts, comma-separated (default 1, 2, 4, … N)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: 2 fake GPUs (Ray resources only), onnxruntime, tiny sizes")
    p.add_argument("--files-per-gpu", type=int, default=20_000, help="JPEGs per GPU (issue: 5000+)")
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-random.onnx"), help="model of the job")
    p.add_argument("--engine", default="torch")
    p.add_argument("--device", default=None, help="detector device (default: picked; cpu with --smoke)")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--compile", default="auto", help="torch engine compile setting (auto, inductor, off)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads per actor")
    p.add_argument("--actors-per-gpu", type=int, default=3)
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--actor-concurrency", type=int, default=2)
    p.add_argument("--rows-per-call", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--warmup-files", type=int, default=None,
                   help="files of the unmeasured job before the first count (fills the kernel cache; "
                        "default 2 x actors x rows_per_call, 0: none)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs Ray gets (default: all)")
    p.add_argument("--object-store-mb", type=int, default=None)
    p.add_argument("--no-serve", action="store_true", help="skip the Serve load point")
    p.add_argument("--serve-model", default=str(DATA / "models" / "yolov8n-defects.onnx"))
    p.add_argument("--serve-engine", default="auto")
    p.add_argument("--image", default=str(DATA / "images" / "bus.jpg"), help="re-encoded 640x480 q90")
    p.add_argument("--replicas-per-gpu", type=int, default=4)
    p.add_argument("--serve-cpus", type=float, default=2.0, help="CPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--clients-per-gpu", type=int, default=32)
    p.add_argument("--client-procs-per-gpu", type=int, default=4)
    p.add_argument("--max-client-procs", type=int, default=max(1, (os.cpu_count() or 4) // 4))
    p.add_argument("--serve-duration", type=float, default=10.0)
    p.add_argument("--serve-warmup", type=float, default=2.0)
    p.add_argument("--serve-max-requests", type=int, default=10**6)
    p.add_argument("--work", default=None, help="folder for the JPEGs and outputs (default: a temp dir, removed)")
    p.add_argument("--out", default=None, help="results path without suffix")
    args = p.parse_args(argv)
    if args.smoke:
        args.engine, args.serve_engine, args.device, args.precision = "onnxruntime", "onnxruntime", "cpu", "fp32"
        args.files_per_gpu, args.batch, args.threads, args.actors_per_gpu = min(args.files_per_gpu, 16), 4, 1, 2
        args.actor_cpus, args.actor_concurrency, args.rows_per_call, args.shard_size = 0.25, 1, 8, 8
        args.warmup_files = 0 if args.warmup_files is None else args.warmup_files
        args.cpus, args.object_store_mb = 2, args.object_store_mb or 200
        args.replicas_per_gpu, args.serve_cpus, args.max_batch_size = 1, 0.25, 4
        args.clients_per_gpu, args.client_procs_per_gpu, args.max_client_procs = 1, 1, 2
        args.serve_duration, args.serve_warmup = 1.0, 0.3
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("multi_gpu_cpu_smoke" if args.smoke else "multi_gpu"))
    if args.warmup_files is None:
        args.warmup_files = 2 * args.actors_per_gpu * args.rows_per_call
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ids = visible_gpu_ids()
    if args.smoke:
        ids = ["0", "1"]  # fake: Ray resources only, the engine runs on the CPU
    if not ids:
        raise SystemExit("multi_gpu: no GPU visible (CUDA_VISIBLE_DEVICES / torch.cuda); --smoke runs on the CPU")
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else default_counts(len(ids))
    if max(counts) > len(ids) or min(counts) < 1:
        raise SystemExit(f"multi_gpu: counts {counts} need 1..{len(ids)} GPUs ({len(ids)} visible: {ids})")
    work = Path(args.work or tempfile.mkdtemp(prefix="multi_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    doc: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/multi_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "smoke": args.smoke, "args": vars(args), "gpu_ids": ids, "machine": machine_info(), "counts": [],
        "errors": {}}
    if args.smoke:
        doc["machine"]["gpu"] = "none (CPU smoke: 2 fake GPUs)"
    pool, private = None, None
    try:
        coco = make_coco640(work, max(counts) * args.files_per_gpu)
        doc["dataset"] = coco
        log("dataset", coco)
        body = reencode((Path(args.image)).read_bytes(), "640x480", 90)
        if not args.no_serve:
            private = Path(tempfile.mkdtemp(prefix="mgs-"))
            isolate_serve(sum(args.replicas_per_gpu * k for k in counts), private)
            procs = max(min(args.client_procs_per_gpu * k, args.max_client_procs) for k in counts)
            if procs > 1:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
        import ray

        env_cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        for n, k in enumerate(counts):
            row: dict[str, Any] = {"gpus": k, "gpu_ids": ids[:k]}
            doc["counts"].append(row)
            t0 = time.perf_counter()
            start_ray(ids[:k], args.cpus, args.object_store_mb)
            row["ray_start_s"] = r3(time.perf_counter() - t0)
            row["ray_resources"] = {x: ray.cluster_resources().get(x) for x in ("CPU", "GPU", "object_store_memory")}
            try:
                if n == 0 and args.warmup_files:
                    w = run_image_job(k, args, coco, work, ids[:k], min(args.warmup_files, coco["files"]), "warmup")
                    doc["warmup_job"] = {x: w.get(x) for x in ("files", "call_s", "startup_s", "first_result_s")}
                    log("warm-up job", doc["warmup_job"])
                try:
                    row["job"] = run_image_job(k, args, coco, work, ids[:k], k * args.files_per_gpu, f"job{k}")
                    j = row["job"]
                    log(f"{k} GPU(s) job: steady {j.get('images_per_s_steady')} img/s, total "
                        f"{j['images_per_s_total']} img/s, GPU busy {j.get('gpu_busy_per_gpu')}, driver CPU "
                        f"{j.get('driver_cpu_cores')}, write {j['write_s']} s, listing {j['listing_s']} s")
                except Exception as e:
                    row["job"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
                    doc["errors"][f"job{k}"] = row["job"]["error"]
                    log(f"{k} GPU(s) job FAILED: {e}")
                save(doc, out)
                if not args.no_serve:
                    try:
                        row["serve"] = run_serve_point(k, args, body, pool, ids[:k])
                        sv = row["serve"]
                        log(f"{k} GPU(s) serve: {sv['rps']} req/s p99 {sv['p99_ms']} ms, GPU busy "
                            f"{sv.get('gpu_busy_per_gpu')}, errors {sv['errors']}")
                    except Exception as e:
                        row["serve"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
                        doc["errors"][f"serve{k}"] = row["serve"]["error"]
                        log(f"{k} GPU(s) serve FAILED: {e}")
            finally:
                ray.shutdown()
                if env_cvd is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = env_cvd
            save(doc, out)
    finally:
        if pool is not None:
            pool.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    doc["wall_s"] = r3(time.perf_counter() - gp.T_START)
    save(doc, out)
    print(f"\nmulti_gpu: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}\n")
    if args.smoke:
        print(SMOKE_NOTE)
    print("\n".join(table_rows(doc)))
    print(doc["summary"]["stops_scaling"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
