"""How fast the job's driver-side shard writer takes result rows (is it ever the bottleneck?).

    python benchmarks/shard_writer.py [--rows 100000] [--s3]
    → benchmarks/results/shard_writer.json

The batch job streams result rows to the driver (``iter_batches``), which groups them by shard
and writes each ``part-<id>.parquet`` once complete (:class:`raydetect.job.output.ShardWriter`). This
feeds the writer realistic rows (5 boxes each) in shuffled batches of 256, as an actor pool
returns them, and reports rows/s for a local disk and, with ``--s3``, a local moto S3 server —
to compare with the detector's images/s (hundreds to a few thousand per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydetect.job import output as sh  # noqa: E402
from raydetect.storage import filesystem  # noqa: E402
from raydetect.types import Detection, ImageResult, ModelIdentity, results_to_table  # noqa: E402


def batches(paths: list[str], prefix: str, batch: int, seed: int = 0):
    order = paths[:]
    random.Random(seed).shuffle(order)
    dets = [Detection(10.0 * k, 20.0, 10.0 * k + 50, 90.0, 0.5 + k / 20, k, f"class{k}") for k in range(5)]
    for i in range(0, len(order), batch):
        res = [ImageResult(uri=prefix + p, width=1920, height=1080, detections=dets) for p in order[i : i + batch]]
        yield results_to_table(res, ModelIdentity("0" * 64, engine="onnxruntime", precision="fp32"))


def run(fs, out: str, rows: int, shard_size: int, prefix: str) -> dict:
    paths = [f"archive/cam{i % 50:02d}/{i:08d}.jpg" for i in range(rows)]
    plan = sh.plan_resume(fs, out, paths, shard_size, prefix)
    tables = list(batches(paths, prefix, 256))  # built before timing: the detector makes them
    w = sh.ShardWriter(fs, out, plan.pending, uri_prefix=prefix)
    t0 = time.perf_counter()
    for t in tables:
        w.add(t)
    w.close()
    seconds = time.perf_counter() - t0
    return {
        "rows": rows, "shard_size": shard_size, "shards": len(plan.pending), "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1), "write_s": round(w.stats.write_s, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--s3", action="store_true", help="also write to a local moto S3 server")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shard_writer.json"))
    args = ap.parse_args()
    result = {"command": "python benchmarks/shard_writer.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        fs, out = filesystem(os.path.join(d, "out"))
        fs.makedirs(out, exist_ok=True)
        result["local"] = run(fs, out, args.rows, args.shard_size, "")
        print("local:", result["local"], flush=True)
    if args.s3:
        from moto.server import ThreadedMotoServer

        from raydetect.config import StorageConfig

        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", key="bench", secret="bench")
            fs, out = filesystem("s3://bench/out", storage)
            fs.mkdir("bench")
            result["s3_moto"] = run(fs, out, args.rows, args.shard_size, "s3://")
            print("s3 (moto):", result["s3_moto"], flush=True)
        finally:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
