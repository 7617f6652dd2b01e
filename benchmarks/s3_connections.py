"""How many of a detector call's S3 GETs run at once: botocore's connection pool.

    python benchmarks/s3_connections.py [--files 128] [--latency-ms 300] [--pools 10,64]

One ``read_files`` call (what a detector actor does per call: fsspec ``cat_ranges`` on s3fs) of
``--files`` 20 KB objects from a moto server on 127.0.0.1 that waits ``--latency-ms`` before each
answer (``benchmarks/s3_read.py``'s server), with ``StorageConfig.max_connections`` (botocore
``max_pool_connections``) set to each of ``--pools``. botocore's own default is 10. Results:
``benchmarks/results/s3_connections.json|md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--latency-ms", type=float, default=300.0)
    ap.add_argument("--pools", default="10,64")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3_connections"))
    args = ap.parse_args(argv)
    import s3_read

    os.environ.setdefault("AWS_ACCESS_KEY_ID", s3_read.KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3_read.SECRET)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from raydetect.config import StorageConfig
    from raydetect.storage import filesystem, read_files

    latency = multiprocessing.get_context("spawn").Value("d", 0.0)
    endpoint, moto = s3_read.start_moto(latency)
    storage = StorageConfig(endpoint_url=endpoint, key=s3_read.KEY, secret=s3_read.SECRET)
    fs, _ = filesystem("s3://inbox/", storage)
    fs.mkdir("inbox")
    paths = [f"inbox/{i:05d}.jpg" for i in range(args.files)]
    fs.pipe({p: os.urandom(20_000) for p in paths})
    latency.value = args.latency_ms
    rows = []
    for pool in [int(x) for x in args.pools.split(",")]:
        fs, _ = filesystem("s3://inbox/", storage.model_copy(update={"max_connections": pool}))
        read_files(paths[:2], fs)  # connect
        t0 = time.perf_counter()
        data, errors = read_files(paths, fs)
        s = time.perf_counter() - t0
        assert not errors and len(data) == args.files
        rows.append({"max_connections": pool, "seconds": round(s, 3), "files_per_s": round(args.files / s, 1)})
        print(f"max_connections {pool}: {args.files} files in {s:.2f} s", flush=True)
    moto.terminate()
    data = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
            "files": args.files, "latency_ms": args.latency_ms, "runs": rows,
            "summary": {f"max_connections_{r['max_connections']}_s": r["seconds"] for r in rows}}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# One detector call's S3 reads vs botocore's connection pool\n", f"`{data['command']}`\n",
             f"{args.files} objects of 20 KB, moto on 127.0.0.1 answering each request after "
             f"{args.latency_ms:g} ms; one `read_files` call (fsspec `cat_ranges` on s3fs).\n",
             "| max_connections | seconds | files/s |", "|---:|---:|---:|"]
    lines += [f"| {r['max_connections']} | {r['seconds']} | {r['files_per_s']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[3:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
