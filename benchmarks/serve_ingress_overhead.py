"""What Ray Serve's HTTP ingress alone costs: an empty FastAPI handler (reads the body, answers
its length) behind each ingress, closed-loop clients POSTing one image, on 127.0.0.1.

    python benchmarks/serve_ingress_overhead.py      # ~2 min on 2 cores

Ingresses (each in its own Ray instance, since Ray reads them when it starts):
``proxy`` (the classic Python proxy actor), ``haproxy`` (``RAY_SERVE_ENABLE_HA_PROXY=1``
alone) and ``haproxy+throughput`` (plus ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: what
``raydetect serve --ingress haproxy`` sets). Clients run in the driver process, so on a small
machine they share its cores with the server. Writes ``<out>.json|md``; the table is last.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
from raydetect.serve.ingress import ingress_env  # noqa: E402

VARIANTS = {
    "proxy": ingress_env("proxy", drain_s=1.0),
    "haproxy": {**ingress_env("haproxy", drain_s=1.0), "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "haproxy+throughput": ingress_env("haproxy", drain_s=1.0),
}


def echo_deployment():
    """The deployment, built at module level (Serve pickles the FastAPI app by value)."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    api.add_api_route("/echo", echo, methods=["POST"])

    @serve.deployment
    @serve.ingress(api)
    class Echo:
        pass

    return Echo


def child(variant: str, image: str, clients: list[int], duration: float) -> list[dict]:
    """Runs in a fresh process whose environment selects ``variant``."""
    import aiohttp
    import ray
    from ray import serve

    from benchmarks.serve_load import free_port, percentile

    Echo = echo_deployment()
    body = Path(image).read_bytes()
    port = free_port()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Echo.bind(), name="echo", route_prefix="/")
        url = f"http://127.0.0.1:{port}/echo"

        async def point(c: int) -> dict:
            lat: list[float] = []
            measuring, stop = False, False

            async def client(session):
                while not stop:
                    t0 = time.perf_counter()
                    async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                        await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"HTTP {r.status}")
                    if measuring:
                        lat.append((time.perf_counter() - t0) * 1e3)

            async with aiohttp.ClientSession() as session:
                tasks = [asyncio.create_task(client(session)) for _ in range(c)]
                await asyncio.sleep(1.0)
                measuring = True
                t0 = time.perf_counter()
                await asyncio.sleep(duration)
                stop = True
                elapsed = time.perf_counter() - t0
                await asyncio.gather(*tasks)
            return {"ingress": variant, "clients": c, "requests": len(lat), "rps": round(len(lat) / elapsed, 1),
                    "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2)}

        for c in clients:
            rows.append(asyncio.run(point(c)))
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(DATA / "images" / "bus.jpg"))
    p.add_argument("--clients", default="1,8")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_ingress_overhead"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if args.child:
        print("ROWS " + json.dumps(child(args.child, args.image, clients, args.duration)), flush=True)
        return 0

    rows = []
    for variant in args.variants.split(","):
        env = {**os.environ, **VARIANTS[variant],
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--image", args.image, "--clients", args.clients,
             "--duration", str(args.duration)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        found = [line for line in out.stdout.splitlines() if line.startswith("ROWS ")]
        if out.returncode != 0 or not found:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"serve_ingress_overhead: {variant} failed (exit {out.returncode})")
        for row in json.loads(found[-1][5:]):
            rows.append(row)
            print(f"{row['ingress']:20s} clients {row['clients']:3d}: {row['rps']:8.1f} req/s  "
                  f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms", flush=True)

    import ray

    md = ["# Ray Serve ingress alone (benchmarks/serve_ingress_overhead.py)", "",
          f"Command: `python benchmarks/serve_ingress_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          f"An empty FastAPI handler (reads the body) behind each ingress; `{args.image}` "
          f"({Path(args.image).stat().st_size} bytes) POSTed by closed-loop aiohttp clients in the driver "
          f"process, {args.duration} s per point; Ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"1-min load average {os.getloadavg()[0]:.2f} at the end.", "",
          "| ingress | clients | requests | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['ingress']} | {r['clients']} | {r['requests']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} |"
           for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
