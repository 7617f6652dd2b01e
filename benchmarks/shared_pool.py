"""One GPU pool for online and archive work (issue 16): online latency and archive throughput
when a batch job runs through the Serve replicas (``raydetect detect --via-serve``).

    python benchmarks/shared_pool.py                 # GPU: 4 replicas x 0.25 GPU, torch FP16
    python benchmarks/shared_pool.py --smoke         # CPU smoke run of the same code (tiny)

Self-contained: makes ``--files`` 640x480 baseline JPEGs (crops/flips of the photos in
``--data``, default ../shared/data/images; ``--unique`` distinct encodings, the rest copies
under other names) in a temporary folder, starts its own local Ray + Serve on 127.0.0.1 and
measures, in this order:

* ``standalone``: the ordinary job (its own detector actor, ``--standalone-gpus`` GPU,
  ``--standalone-actor-concurrency`` threads, ``--rows-per-call`` rows per call);
* the Serve app: ``--replicas`` replicas x ``--num-gpus`` GPU, ``--engine``/``--precision``,
  ``--max-batch-size``, ``--batch-wait-ms`` (the online settings of serve_load.py);
* ``online_alone``: ``--clients`` closed-loop HTTP clients (benchmarks/serve_load.py's client
  code), ``--duration`` s;
* ``job_via_serve_alone``: the job through the app (``--callers`` handle callers);
* ``online_with_job``: the same clients while the job runs through the same replicas (a fresh
  output; the online window is kept inside the job's run).

Job rates: ``img_s`` over the whole call (startup included) and ``steady_img_s`` between the
first and the last part file written (``--shard-size`` images each). Results:
``benchmarks/results/shared_pool_gpu|cpu.json|md`` with a ``summary`` object; the table is
printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import get_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))

from serve_load import free_port, machine_info, measure  # noqa: E402

from raydetect.config import ServeConfig  # noqa: E402

APP = "pool"


def make_jpegs(src: Path, dst: Path, files: int, unique: int, seed: int = 0) -> int:
    """``files`` 640x480 baseline JPEGs in ``dst`` from the photos in ``src``; returns bytes."""
    import cv2
    import numpy as np

    photos = [p for p in sorted(src.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")]
    if not photos:
        raise SystemExit(f"shared_pool: no photos in {src}")
    rng = np.random.default_rng(seed)
    encoded = []
    for k in range(min(unique, files)):
        img = cv2.imread(str(photos[k % len(photos)]), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y : y + ch, x : x + cw]
        if k % 2:
            crop = crop[:, ::-1]
        crop = cv2.resize(np.ascontiguousarray(crop), (640, 480), interpolation=cv2.INTER_AREA)
        encoded.append(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        data = encoded[i % len(encoded)]
        (dst / f"img{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


class PartClock:
    """Polls the output for part files: when the first and the last appeared."""

    def __init__(self, out: Path) -> None:
        self.out, self.times, self._stop = out, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            n = len(list(self.out.glob("part-*.parquet"))) if self.out.exists() else 0
            if n > seen:
                self.times.extend([time.perf_counter()] * (n - seen))
                seen = n
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def run_job_timed(cfg, out: Path, shard_size: int) -> dict:
    from raydetect.job.run import run_job

    clock = PartClock(out)
    t0 = time.perf_counter()
    s = run_job(cfg)
    seconds = time.perf_counter() - t0
    clock.stop()
    steady = None
    if len(clock.times) >= 3 and clock.times[-1] > clock.times[0]:
        steady = (len(clock.times) - 1) * shard_size / (clock.times[-1] - clock.times[0])
    return {"images": s.images, "errors": s.errors, "seconds": round(seconds, 2),
            "img_s": round(s.images / seconds, 1),
            "steady_img_s": None if steady is None else round(steady, 1),
            "duplicates_dropped": s.duplicates_dropped, "t_start": t0, "t_end": t0 + seconds}


def job_rate(r: dict) -> float:
    return r["steady_img_s"] if r.get("steady_img_s") else r["img_s"]


def to_markdown(doc: dict) -> str:
    s, a = doc["summary"], doc["args"]
    lines = [
        "# Shared pool: online + archive through the same Serve replicas (benchmarks/shared_pool.py)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Model `{a['model']}` ({doc['model'].get('engine')}, {doc['model'].get('precision')}, "
        f"{doc['model'].get('device')}); {a['files']} JPEGs 640x480; {a['replicas']} replicas x "
        f"{a['num_gpus']} GPU, max_batch_size {a['max_batch_size']}, archive engine batch "
        f"{a.get('serve_batch_size', a['max_batch_size'])}, batch_wait {a['batch_wait_ms']} ms, "
        f"archive_max_batches {a['archive_max_batches']}, archive_overlap {a.get('archive_overlap', 'auto')}; "
        f"{a['clients']} online clients; job via serve: "
        f"{a['callers']} callers x {a['rows_per_call']} rows/call; standalone: 1 actor x "
        f"{a['standalone_gpus']} GPU, {a['standalone_actor_concurrency']} threads, {a['rows_per_call']} rows/call, "
        f"batch {a['standalone_batch_size']}.",
        "",
        "| run | online p50 ms | online p99 ms | online req/s | job img/s (steady) | job img/s (whole call) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    r = doc["results"]
    sa = r["standalone"]
    lines.append(f"| standalone job | | | | {sa['steady_img_s']} | {sa['img_s']} |")
    oa = r["online_alone"]
    lines.append(f"| (a) online alone | {oa['p50_ms']} | {oa['p99_ms']} | {oa['rps']} | | |")
    ja = r["job_via_serve_alone"]
    lines.append(f"| (c) job via serve alone | | | | {ja['steady_img_s']} | {ja['img_s']} |")
    ow, jw = r["online_with_job"], r["job_with_online"]
    lines.append(f"| (b) online + job via serve | {ow['p50_ms']} | {ow['p99_ms']} | {ow['rps']} "
                 f"| {jw['steady_img_s']} | {jw['img_s']} |")
    lines += [
        "",
        f"Online errors: alone {oa['errors']}, with job {ow['errors']}; online window inside the job: "
        f"{r['online_window_inside_job']}.  ",
        f"(b) online p99 {s['online_p99_ms_with_job']} ms (target <= 40); job with online "
        f"{s['job_with_online_vs_standalone']:.0%} of standalone (target >= 50 %); (c) job via serve alone "
        f"{s['job_via_serve_alone_vs_standalone']:.0%} of standalone (target >= 80 %). Job rates compare the "
        "steady rates (first to last part file).",
    ]
    parts = ("queue_ms", "decode_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms")
    if all(x.get("replica_mean_ms") for x in (oa, ow)):
        lines += [
            "",
            "Inside the replica, mean ms per online request (queue: waiting for the engine and the batch):",
            "",
            "| run | " + " | ".join(k[:-3] for k in parts) + " | images per batch |",
            "|---|" + "---:|" * (len(parts) + 1),
        ]
        for name, x in (("(a) online alone", oa), ("(b) online + job", ow)):
            vals = " | ".join(str(round(x["replica_mean_ms"].get(k, float("nan")), 2)) for k in parts)
            lines.append(f"| {name} | {vals} | {x.get('mean_batch')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-defects.onnx"))
    p.add_argument("--data", default=str(DATA / "images"), help="photos the JPEGs are made from")
    p.add_argument("--engine", default="torch")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--unique", type=int, default=256, help="distinct encodings among the files")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--num-gpus", type=float, default=None, help="GPU per replica (default 1/replicas, 0 on CPU)")
    p.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--serve-batch-size", type=int, default=None,
                   help="the replicas' engine batch, i.e. images per archive-only engine call (default: "
                   "--standalone-batch-size; --max-batch-size gives the archive the online batch size)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--archive-max-batches", type=int, default=4)
    overlap = ServeConfig.model_fields["archive_overlap"]
    p.add_argument("--archive-overlap", choices=get_args(overlap.annotation), default=overlap.default,
                   help="ServeConfig.archive_overlap of the replicas")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="online seconds per point (at most)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--callers", type=int, default=4, help="handle callers of the job via serve")
    p.add_argument("--caller-cpus", type=float, default=1.0)
    p.add_argument("--rows-per-call", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--standalone-gpus", type=float, default=None, help="default 1 (0 on CPU)")
    p.add_argument("--standalone-actor-concurrency", type=int, default=2)
    p.add_argument("--standalone-batch-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings (numbers meaningless)")
    p.add_argument("--work", default=None, help="folder for the JPEGs and outputs (default: a temp dir)")
    p.add_argument("--out", default=None, help="results path without suffix")
    args = p.parse_args(argv)
    if args.smoke:
        args.engine, args.precision = "onnxruntime", "fp32"
        args.files, args.unique, args.replicas, args.num_cpus = 96, 16, 1, 0.5
        args.clients, args.client_procs, args.duration, args.warmup = 2, 1, 4.0, 1.0
        args.callers, args.caller_cpus, args.rows_per_call, args.shard_size = 1, 0.25, 16, 16
        args.max_batch_size, args.standalone_batch_size, args.standalone_actor_concurrency = 8, 8, 1
    if args.serve_batch_size is None:
        args.serve_batch_size = max(args.standalone_batch_size, args.max_batch_size)

    import ray
    from ray import serve

    from raydetect.config import DetectorConfig, JobConfig
    from raydetect.serve.app import app_builder
    from raydetect.serve.ingress import use_ingress

    started = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="shared_pool_"))
    inp = work / "in"
    t0 = time.perf_counter()
    nbytes = make_jpegs(Path(args.data), inp, args.files, args.unique)
    print(f"shared_pool: {args.files} JPEGs ({nbytes / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    body = (inp / "img000000.jpg").read_bytes()

    use_ingress("haproxy", drain_s=1.0)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             **({"num_cpus": 2} if args.smoke else {}))
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    if args.num_gpus is None:
        args.num_gpus = 1.0 / args.replicas if gpu else 0.0
    if args.standalone_gpus is None:
        args.standalone_gpus = 1.0 if gpu else 0.0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    det = {"model": args.model, "engine": args.engine, "precision": args.precision}
    results: dict = {}

    def job_cfg(out: Path, **extra) -> JobConfig:
        return JobConfig(input=str(inp), output=str(out), progress=False, report=False,
                         shard_size=args.shard_size, rows_per_call=args.rows_per_call, **extra)

    try:
        # standalone first: the replicas would otherwise hold the GPU
        cfg = job_cfg(work / "standalone", detector=DetectorConfig(**det, batch_size=args.standalone_batch_size),
                      num_gpus=args.standalone_gpus, actor_concurrency=args.standalone_actor_concurrency,
                      num_cpus=1.0 if not args.smoke else 0.5)
        results["standalone"] = run_job_timed(cfg, work / "standalone", args.shard_size)
        print(f"shared_pool: standalone job {results['standalone']}", flush=True)

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {**det, "replicas": str(args.replicas), "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                    "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                    "batch_size": args.serve_batch_size,
                    "archive_max_batches": args.archive_max_batches,
                    "archive_overlap": args.archive_overlap,
                    "max_ongoing_requests": max(64, 2 * args.clients + args.archive_max_batches)}
        serve.run(app_builder(app_args), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/detect"
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=60) as r:
            model = json.loads(r.read())

        pool = None
        if args.client_procs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
        try:
            # (a) online alone
            results["online_alone"] = measure(pool, url, body, "image/jpeg", args.clients, args.client_procs,
                                              args.warmup, args.duration, 10**7)
            print(f"shared_pool: (a) online alone p50 {results['online_alone']['p50_ms']} ms "
                  f"p99 {results['online_alone']['p99_ms']} ms", flush=True)
            serve_det = DetectorConfig(**det)
            # (c) the job alone through the app
            c = run_job_timed(job_cfg(work / "via_alone", detector=serve_det, via_serve=APP,
                                      concurrency=args.callers, min_actors=args.callers,
                                      num_cpus=args.caller_cpus), work / "via_alone", args.shard_size)
            results["job_via_serve_alone"] = c
            print(f"shared_pool: (c) job via serve alone {c}", flush=True)
            # (b) both: the online window must end before the (slower) job does
            window = max(1.0, min(args.duration, 0.8 * c["seconds"] - args.warmup))
            box: dict = {}
            cfg_b = job_cfg(work / "via_online", detector=serve_det, via_serve=APP, concurrency=args.callers,
                            min_actors=args.callers, num_cpus=args.caller_cpus)
            th = threading.Thread(target=lambda: box.update(r=run_job_timed(cfg_b, work / "via_online",
                                                                            args.shard_size)))
            th.start()
            time.sleep(min(2.0, 0.1 * c["seconds"]))
            o0 = time.perf_counter()
            results["online_with_job"] = measure(pool, url, body, "image/jpeg", args.clients, args.client_procs,
                                                 args.warmup, window, 10**7)
            o1 = time.perf_counter()
            th.join()
            results["job_with_online"] = box["r"]
            results["online_window_inside_job"] = bool(box["r"]["t_end"] >= o1 and box["r"]["t_start"] <= o0)
            print(f"shared_pool: (b) online p99 {results['online_with_job']['p99_ms']} ms, job {box['r']}", flush=True)
        finally:
            if pool is not None:
                pool.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    for r in results.values():
        if isinstance(r, dict):
            r.pop("t_start", None)
            r.pop("t_end", None)
    sa = job_rate(results["standalone"])
    summary = {
        "gpu": machine_info().get("gpu", "none (CPU)"),
        "online_p99_ms_alone": results["online_alone"]["p99_ms"],
        "online_p99_ms_with_job": results["online_with_job"]["p99_ms"],
        "job_img_s_standalone": sa,
        "job_img_s_with_online": job_rate(results["job_with_online"]),
        "job_img_s_via_serve_alone": job_rate(results["job_via_serve_alone"]),
    }
    summary["job_with_online_vs_standalone"] = summary["job_img_s_with_online"] / sa if sa else 0.0
    summary["job_via_serve_alone_vs_standalone"] = summary["job_img_s_via_serve_alone"] / sa if sa else 0.0
    doc = {
        "command": " ".join(["python", "benchmarks/shared_pool.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": machine_info(),
        "model": {k: model.get(k) for k in ("engine", "precision", "device", "sha256")},
        "summary": summary,
        "results": results,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / f"shared_pool_{'gpu' if gpu else 'cpu'}")
        doc["args"]["out"] = args.out
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = to_markdown(doc)
    out.with_suffix(".md").write_text(md)
    print(f"shared_pool: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
          f"({doc['wall_seconds']} s)\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
