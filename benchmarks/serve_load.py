"""Load benchmark of the online endpoint: latency and throughput with dynamic batching on
and off, at several numbers of concurrent clients (issue 4).

    python benchmarks/serve_load.py                       # CPU here: ~2.5 min
    python benchmarks/serve_load.py     # on a GPU machine: 1 GPU per replica, serve_load_gpu.*

Starts its own local Ray instance and Serve on 127.0.0.1 (loopback only), deploys the
endpoint once with batching on (``--max-batch-size``, ``--batch-wait-ms``) and once with it
off (max batch size 1), and for each number of clients runs a closed loop: every client
sends the same image (raw body) and waits for the answer before sending the next. Each
point is bounded by ``--duration`` seconds and ``--max-requests`` requests (after
``--warmup`` seconds not counted); the whole run by ``--max-seconds``. The clients are
aiohttp tasks (Ray Serve already depends on aiohttp) spread over ``--client-procs``
processes, so that on a big machine the load generator is not what limits the endpoint; on
a small one they share the CPU with the server.

``--ingress`` picks Ray Serve's HTTP ingress for the Ray instance this script starts:
``haproxy`` (HAProxy straight to the replicas, Ray's high-throughput mode) or ``proxy``
(the classic Python proxy actor); ``--ingress haproxy,proxy`` measures both, each in its own
Ray instance (the mode is fixed when Ray starts). Besides the client-side latency the table
shows the median time the request spent inside the replica (``replica p50``), so the part
spent in the ingress and on the wire is visible.

Results: ``<out>.json`` and ``<out>.md``; the table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


async def run_point(url: str, body: bytes, ctype: str, clients: int, warmup: float, duration: float,
                    max_requests: int) -> dict:
    """Closed loop: ``clients`` tasks, each sending one request at a time."""
    import aiohttp

    lat_ms: list[float] = []
    batch: list[int] = []
    infer_ms: list[float] = []
    replica_ms: list[float] = []
    parts: dict[str, float] = {}  # sums of the replica's timings (queue, decode, ...)
    errors: dict[str, int] = {}
    measuring = False
    stop = False
    sent = 0

    async def client(session):
        nonlocal sent
        while not stop:
            if measuring:
                if sent >= max_requests:
                    return
                sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": ctype}) as r:
                    payload = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                status, payload = type(e).__name__, b""
            ms = (time.perf_counter() - t0) * 1e3
            if not measuring:
                continue
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                continue
            lat_ms.append(ms)
            t = json.loads(payload)["timings"]
            batch.append(t["batch_size"])
            infer_ms.append(t["inference_ms"])
            replica_ms.append(t["total_ms"])
            for k, v in t.items():
                if k.endswith("_ms"):
                    parts[k] = parts.get(k, 0.0) + v

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        measuring = True
        t0 = time.perf_counter()
        deadline = t0 + duration
        while time.perf_counter() < deadline and sent < max_requests:
            await asyncio.sleep(0.05)
        stop = True
        await asyncio.gather(*tasks)  # in-flight requests finish (and are counted)
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "seconds": elapsed, "errors": errors, "lat_ms": lat_ms, "batch": batch,
            "infer_ms": infer_ms, "replica_ms": replica_ms, "parts": parts}


def _point_in_process(args: tuple) -> dict:
    return asyncio.run(run_point(*args))


def summarize(procs: list[dict]) -> dict:
    """One point from the raw samples of every client process."""
    lat = [x for p in procs for x in p["lat_ms"]]
    batch = [x for p in procs for x in p["batch"]]
    infer = [x for p in procs for x in p["infer_ms"]]
    replica = [x for p in procs for x in p["replica_ms"]]
    errors: dict[str, int] = {}
    sums: dict[str, float] = {}
    for p in procs:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in p["parts"].items():
            sums[k] = sums.get(k, 0.0) + v
    elapsed = max(p["seconds"] for p in procs)
    n = len(lat)
    return {
        "clients": sum(p["clients"] for p in procs),
        "client_procs": len(procs),
        "requests": n,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(n / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "mean_ms": round(statistics.fmean(lat), 2) if lat else float("nan"),
        "replica_p50_ms": round(percentile(replica, 50), 2),
        "replica_p99_ms": round(percentile(replica, 99), 2),
        "mean_batch": round(statistics.fmean(batch), 2) if batch else float("nan"),
        "max_batch": max(batch) if batch else 0,
        "mean_inference_ms": round(statistics.fmean(infer), 2) if infer else float("nan"),
        # mean of each of the replica's timings over the requests (see TimingsOut)
        "replica_mean_ms": {k: round(v / n, 3) for k, v in sums.items()} if n else {},
    }


def measure(pool, url: str, body: bytes, ctype: str, clients: int, procs: int, warmup: float,
            duration: float, max_requests: int) -> dict:
    """One point: ``clients`` closed-loop clients over ``procs`` processes (in this one when
    ``pool`` is None)."""
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    caps = [max(1, max_requests * c // clients) for c in shares]
    jobs = [(url, body, ctype, c, warmup, duration, m) for c, m in zip(shares, caps, strict=True)]
    if pool is None or procs == 1:
        return summarize([_point_in_process(j) for j in jobs])
    return summarize(list(pool.map(_point_in_process, jobs)))


def reencode(data: bytes, size: str, quality: int) -> bytes:
    """``data`` resized to ``size`` (``WxH``) and encoded as a baseline JPEG (OpenCV)."""
    import cv2
    import numpy as np

    w, h = (int(v) for v in size.lower().split("x"))
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return enc.tobytes()


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["torch"] = torch.__version__
    except ImportError:
        pass
    import ray

    info["ray"] = ray.__version__
    return info


def to_markdown(doc: dict) -> str:
    a = doc["args"]
    lines = [
        "# Online endpoint load (benchmarks/serve_load.py)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Model: `{a['model']}` ({doc['model']['engine']}, {doc['model']['precision']}, "
        f"device {doc['model']['device']}); image `{a['image']}`"
        + (f" resized to {a['resize']} (JPEG quality {a['quality']})" if a.get("resize") else "")
        + f" ({doc['image_bytes']} bytes)  ",
        f"Machine: {doc['machine']}; 1-min load average {doc['load_average_1m'][0]} before, "
        f"{doc['load_average_1m'][1]} after  ",
        f"Closed loop per client, {a['duration']} s per point after {a['warmup']} s warm-up "
        f"(at most {a['max_requests']} requests); clients spread over up to {a['client_procs']} processes, "
        f"server on 127.0.0.1 ({a['replicas']} replica(s), {a['num_gpus']} GPU and {a['num_cpus']} CPU each). "
        "Latency is client-side (HTTP round trip); replica p50 is the median time inside the replica. "
        f"Batching on: max_batch_size {a['max_batch_size']}, batch_wait {a['batch_wait_ms']} ms; "
        "off: max_batch_size 1.",
        "",
        "| ingress | batching | clients | requests | errors | req/s | p50 ms | p90 ms | p99 ms | replica p50 ms "
        "| mean batch | max batch | engine ms/batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        errs = sum(r["errors"].values())
        lines.append(
            f"| {r.get('ingress', 'proxy')} | {r['batching']} | {r['clients']} | {r['requests']} | {errs} "
            f"| {r['rps']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r.get('replica_p50_ms', '')} "
            f"| {r['mean_batch']} | {r['max_batch']} | {r['mean_inference_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-defects.onnx"))
    p.add_argument("--engine", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--image", default=str(DATA / "images" / "bus.jpg"))
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    p.add_argument("--max-requests", type=int, default=20_000, help="cap per point")
    p.add_argument("--max-seconds", type=float, default=900.0, help="cap for the whole run")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1/replicas when Ray sees a GPU, else 0)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--resize", default=None, metavar="WxH",
                   help="re-encode the image at this size first (JPEG, --quality), in memory")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for --resize (default 90)")
    p.add_argument("--ingress", default="haproxy",
                   help="Serve HTTP ingress: haproxy, proxy, or both comma-separated (one Ray instance each)")
    p.add_argument("--client-procs", type=int, default=None,
                   help="processes the clients are spread over (default: CPUs/4, at most 8)")
    p.add_argument("--out", default=None,
                   help="results path without suffix (default benchmarks/results/serve_load_cpu|gpu)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from raydetect.serve.app import app_builder
    from raydetect.serve.ingress import use_ingress

    started = time.monotonic()
    load_start = os.getloadavg()
    image = Path(args.image)
    body = image.read_bytes()
    ctype = CONTENT_TYPES[image.suffix.lower()]
    if args.resize:
        body, ctype = reencode(body, args.resize, args.quality), "image/jpeg"
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ingresses = [m.strip() for m in args.ingress.split(",") if m.strip()]
    if args.client_procs is None:
        args.client_procs = max(1, min(8, (os.cpu_count() or 2) // 4))
    pool = None
    if args.client_procs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    results, model_info = [], {}
    try:
        for ingress in ingresses:
            if time.monotonic() - started > args.max_seconds:
                print(f"serve_load: --max-seconds {args.max_seconds} reached; skipping ingress {ingress}")
                break
            use_ingress(ingress, drain_s=1.0)  # read by the Ray processes started next
            port = free_port()
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            if args.num_gpus is None:
                args.num_gpus = 1.0 / args.replicas if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                for mode in modes:
                    if time.monotonic() - started > args.max_seconds:
                        print(f"serve_load: --max-seconds {args.max_seconds} reached; skipping batching {mode}")
                        break
                    on = mode == "on"
                    app_args = {
                        "model": args.model, "engine": args.engine, "precision": args.precision,
                        "replicas": str(args.replicas), "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                        "max_batch_size": args.max_batch_size if on else 1,
                        "batch_wait_ms": args.batch_wait_ms if on else 0.0,
                        "max_ongoing_requests": max(64, 2 * max(clients)),
                    }
                    t0 = time.monotonic()
                    serve.run(app_builder(app_args), name=f"load-{mode}", route_prefix=f"/{mode}")
                    print(f"serve_load: {ingress} batching {mode} deployed in {time.monotonic() - t0:.1f} s",
                          flush=True)
                    base = f"http://127.0.0.1:{port}/{mode}"
                    if not model_info:
                        import urllib.request

                        with urllib.request.urlopen(base + "/v1/model", timeout=60) as r:
                            model_info = json.loads(r.read())
                    for c in clients:
                        if time.monotonic() - started > args.max_seconds:
                            print(f"serve_load: --max-seconds {args.max_seconds} reached; stopping")
                            break
                        point = measure(pool, base + "/v1/detect", body, ctype, c, args.client_procs,
                                        args.warmup, args.duration, args.max_requests)
                        point["batching"] = mode
                        point["ingress"] = ingress
                        results.append(point)
                        print(f"serve_load: {ingress:7s} batching {mode:3s} clients {c:3d}: "
                              f"{point['rps']:8.1f} req/s  p50 {point['p50_ms']:8.1f} ms  "
                              f"p99 {point['p99_ms']:8.1f} ms  replica p50 {point['replica_p50_ms']:6.1f} ms  "
                              f"mean batch {point['mean_batch']}  errors {point['errors']}\n"
                              f"            replica means (ms): {point['replica_mean_ms']}", flush=True)
                    serve.delete(f"load-{mode}")
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        if pool is not None:
            pool.shutdown()

    if args.out is None:
        kind = "gpu" if args.num_gpus > 0 else "cpu"
        args.out = str(REPO / "benchmarks" / "results" / f"serve_load_{kind}")
    doc = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": machine_info(),
        "model": {k: model_info.get(k) for k in ("engine", "precision", "device", "sha256", "imgsz")},
        "image_bytes": len(body),
        # other work on the machine shows here (1-minute load average before and after)
        "load_average_1m": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = to_markdown(doc)
    out.with_suffix(".md").write_text(md)
    print(f"serve_load: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
