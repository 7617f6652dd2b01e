"""Reliability figures of `raydetect serve` (issue 13, serve side) for docs/reliability.md.

    python benchmarks/serve_reliability.py                        # this checkout: ~3 min on 2 cores
    python benchmarks/serve_reliability.py --before /path/to/old  # and an older checkout, same runs

For each checkout it starts two `raydetect serve` processes on this host (own Ray each,
different API keys; the older one's second instance gets free HAProxy stats/metrics ports
through Ray's environment variables, without which it cannot start) and measures:

* isolation: both are probed with /v1/model (each with its own key, 8 closed loops each
  during the restart) while a replica of the
  first is killed (SIGKILL) until a new one has served for 8 s; an answer by the other
  instance (its key refused, or its marker) counts as *cross-answered*;
* slow clients: 32 clients trickling their headers, 32 their (buffered) body and 8 a body
  larger than HAProxy's buffer, one byte every 2 s, against the first instance; the statuses
  they got and when, and the median latency of valid requests before and during;
* memory: 16 concurrent 39.7 MP PNGs (20 MB each) to the first instance (the second stopped):
  the replica's RSS before, its peak (VmHWM) and 10 s after.

Writes ``<out>.json`` and ``<out>.md`` (default benchmarks/results/serve_reliability).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.conftest import DEFECTS, free_port  # noqa: E402
from tests.serve_harness import probe, slow_client, start_instance, stop_instance, wait_ready  # noqa: E402

READ_TIMEOUT_S = 5.0
BIG = (7300, 5440)  # 39.7 MP


def rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024  # MiB
    return out


def big_png(cache: Path) -> bytes:
    if not cache.exists():
        import cv2
        import numpy as np

        w, h = BIG
        y, x = np.mgrid[0:h, 0:w]
        img = np.dstack([(x % 256), (y % 256), ((x + y) % 256)]).astype(np.uint8)
        cache.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    return cache.read_bytes()


def isolation(a, b) -> dict:
    replicas = a.replica_pids()
    before = asyncio.run(probe([a, b], 3))
    os.kill(replicas[0], 9)
    t_kill = time.monotonic()

    def back() -> bool:
        return time.monotonic() - t_kill > 8 and bool(set(a.replica_pids()) - set(replicas))

    during = asyncio.run(probe([a, b], 120, stop_when=back, loops=8))
    after = asyncio.run(probe([a, b], 3))
    total: dict[str, dict[str, int]] = {a.name: {}, b.name: {}}
    for phase in (before, during, after):
        for name, counts in phase.items():
            for k, v in counts.items():
                total[name][k] = total[name].get(k, 0) + v
    return {"recovery_s": round(time.monotonic() - t_kill, 1), "by_instance": total,
            "during_restart": during}


def slow(a) -> dict:
    image = sorted((DEFECTS / "images" / "test").iterdir())[0].read_bytes()
    headers = {**a.auth, "Content-Type": "image/jpeg"}
    give_up = 40.0

    async def run():
        async with httpx.AsyncClient(base_url=a.url, timeout=give_up + 30) as c:
            async def valid(n):
                out = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = await c.post("/v1/detect", content=image, headers=headers)
                    out.append((r.status_code, time.perf_counter() - t0))
                return out

            await valid(3)
            idle = await valid(20)
            kinds = ["headers"] * 32 + ["body"] * 32 + ["fast-body"] * 8
            tasks = [asyncio.ensure_future(slow_client(a.port, k, a.key, 2.0, give_up)) for k in kinds]
            await asyncio.sleep(1.0)
            loaded = await valid(20)
            return idle, loaded, kinds, await asyncio.gather(*tasks)

    idle, loaded, kinds, results = asyncio.run(run())
    by_kind: dict[str, dict] = {}
    for kind, (status, seconds) in zip(kinds, results, strict=True):
        d = by_kind.setdefault(kind, {"statuses": {}, "max_s": 0.0})
        d["statuses"][str(status)] = d["statuses"].get(str(status), 0) + 1
        d["max_s"] = round(max(d["max_s"], seconds), 1)
    return {
        "slow_clients": len(kinds), "give_up_s": give_up, "by_kind": by_kind,
        "valid_idle_p50_ms": round(statistics.median(t for _, t in idle) * 1e3, 1),
        "valid_loaded_p50_ms": round(statistics.median(t for _, t in loaded) * 1e3, 1),
        "valid_loaded_max_ms": round(max(t for _, t in loaded) * 1e3, 1),
        "valid_idle_statuses": sorted({s for s, _ in idle}),
        "valid_loaded_statuses": sorted({s for s, _ in loaded}),
    }


def memory(a, png: bytes, n: int = 16) -> dict:
    (pid,) = a.replica_pids()
    start = rss(pid)

    async def fire():
        async with httpx.AsyncClient(base_url=a.url, timeout=600) as c:
            return await asyncio.gather(*(
                c.post("/v1/detect", content=png, headers={**a.auth, "Content-Type": "image/png"})
                for _ in range(n)))

    t0 = time.monotonic()
    responses = asyncio.run(fire())
    wall = time.monotonic() - t0
    peak = rss(pid)
    time.sleep(10)
    end = rss(pid)
    codes: dict[str, int] = {}
    for r in responses:
        codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
    return {"requests": n, "image": f"{BIG[0]}x{BIG[1]} PNG, {len(png) / 1e6:.1f} MB", "statuses": codes,
            "wall_s": round(wall, 1), "rss_before_mib": round(start["VmRSS"]), "rss_peak_mib": round(peak["VmHWM"]),
            "rss_after_10s_mib": round(end["VmRSS"])}


def measure(repo: Path, label: str, tmp: Path, png: bytes) -> dict:
    old = repo.resolve() != REPO
    extra = [] if old else ["--read-timeout-s", str(READ_TIMEOUT_S)]
    env_b = ({"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
             if old else {})
    a = start_instance("alpha", tmp, "key-a-" + secrets.token_hex(8), 4, extra, repo=repo)
    b = start_instance("beta", tmp, "key-b-" + secrets.token_hex(8), 8, extra, repo=repo, env=env_b)
    out: dict = {"checkout": label}
    try:
        wait_ready(a)
        wait_ready(b)
        print(f"[{label}] isolation", flush=True)
        out["isolation"] = isolation(a, b)
        print(f"[{label}] slow clients", flush=True)
        out["slow"] = slow(a)
        stop_instance(b)
        print(f"[{label}] memory", flush=True)
        out["memory"] = memory(a, png)
    finally:
        stop_instance(a)
        stop_instance(b)
    return out


def markdown(runs: list[dict], cmd: str) -> str:
    lines = [f"Command: `{cmd}` ({platform.node()}, {os.cpu_count()} cores). Two `raydetect serve` instances on "
             "one host, a replica of `alpha` killed with SIGKILL while both are probed.", "",
             "| checkout | requests tried | answered by own instance | cross-answered | 5xx | other | recovery s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        tot: dict[str, int] = {}
        for counts in r["isolation"]["by_instance"].values():
            for k, v in counts.items():
                tot[k] = tot.get(k, 0) + v
        tried = sum(tot.values())
        other = tried - tot.get("own", 0) - tot.get("cross", 0) - tot.get("5xx", 0)
        lines.append(f"| {r['checkout']} | {tried} | {tot.get('own', 0)} | {tot.get('cross', 0)} | "
                     f"{tot.get('5xx', 0)} | {other} | {r['isolation']['recovery_s']} |")
    lines += ["", "Slow clients (one byte every 2 s; statuses they got, slowest answer; valid requests' p50):", "",
              "| checkout | headers | body (buffered) | body > HAProxy buffer | valid p50 idle ms | valid p50 during ms "
              "| valid statuses |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["slow"]

        def cell(kind, s=s):
            d = s["by_kind"][kind]
            st = ", ".join(f"{n}x {'none' if k == 'None' else k}" for k, n in sorted(d["statuses"].items()))
            return f"{st} (≤ {d['max_s']} s)"
        lines.append(f"| {r['checkout']} | {cell('headers')} | {cell('body')} | {cell('fast-body')} | "
                     f"{s['valid_idle_p50_ms']} | {s['valid_loaded_p50_ms']} | "
                     f"{', '.join(map(str, sorted(set(s.get('valid_idle_statuses', [])) | set(s['valid_loaded_statuses']))))} |")
    lines += ["", "Memory (16 concurrent 39.7 MP PNGs, replica RSS in MiB):", "",
              "| checkout | statuses | wall s | RSS before | peak (VmHWM) | 10 s after |", "|---|---|---|---|---|---|"]
    for r in runs:
        m = r["memory"]
        st = ", ".join(f"{n}x {k}" for k, n in sorted(m["statuses"].items()))
        lines.append(f"| {r['checkout']} | {st} | {m['wall_s']} | {m['rss_before_mib']} | {m['rss_peak_mib']} | "
                     f"{m['rss_after_10s_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, default=None, help="an older checkout to measure the same way "
                    "(e.g. `git archive <commit> | tar -x -C DIR`)")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_reliability"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        png = big_png(Path(tmp) / "big.png")
        runs = []
        if args.before:
            runs.append(measure(args.before, args.before_label, Path(tmp), png))
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        runs.append(measure(REPO, f"this ({head})", Path(tmp), png))
    cmd = "python benchmarks/serve_reliability.py" + (
        f" --before {args.before} --before-label '{args.before_label}'" if args.before else "")
    Path(args.out + ".json").write_text(json.dumps({"command": cmd, "runs": runs}, indent=2) + "\n")
    md = markdown(runs, cmd)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
