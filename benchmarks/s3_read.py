"""Reading a job's inputs from S3: Ray Data's binary-file reader vs the detector actors' own reads.

    python benchmarks/s3_read.py [--files 2048] [--kb 60] [--latency-ms 0,20] [--actors 2]
                                 [--rows 64] [--repeats 3] [--cpus 8]

A moto S3 server on 127.0.0.1 holds ``--files`` objects of ``--kb`` KB; each request it answers
waits ``--latency-ms`` first (a WSGI middleware in this script: simulated time to first byte,
as real object storage has; 0 = moto as it is); moto runs in a process of its own. Two ways to get every file's bytes into
``--actors`` actors that only count them, alternating, ``--repeats`` times, medians:

- *Ray Data reader* (raydetect before 2026-12-08): ``ray.data.read_binary_files`` read tasks
  (one CPU each; each task fetches its files one after another), the actors after them;
- *actor reads* (now): blocks of paths (``raydetect.job.run.read_inputs``), each actor call
  reading its ``--rows`` files with ``raydetect.storage.read_batch`` (fsspec ``cat_ranges``:
  concurrent GETs on s3fs).

Ray is started with ``--cpus`` logical CPUs (default 8, as a GPU node has spare cores for read
tasks; the counting actors take 0.5 each), so the reader gets several read tasks at once.
Nothing else of a job runs (no decode, no engine): this is the read's own ceiling. Results:
``benchmarks/results/s3_read.json|md``. Note moto itself is Python on this machine's CPUs:
with no added latency it bounds both ways at a few hundred files/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY, SECRET = "testing", "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Latency:
    """WSGI middleware: every request waits ``latency.value`` milliseconds before the app
    answers it (a shared value, changed between runs)."""

    def __init__(self, app, latency) -> None:
        self.app, self.latency = app, latency

    def __call__(self, environ, start_response):
        if self.latency.value > 0:
            time.sleep(self.latency.value / 1e3)
        return self.app(environ, start_response)


def serve_moto(port: int, latency) -> None:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    make_server("127.0.0.1", port, Latency(DomainDispatcherApplication(create_backend_app), latency),
                threaded=True).serve_forever()


def start_moto(latency) -> tuple[str, multiprocessing.Process]:
    """A threaded moto server on 127.0.0.1 behind :class:`Latency`, in its own process (not
    sharing the driver's GIL); returns its endpoint URL and the process."""
    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=serve_moto, args=(port, latency), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


class Count:
    """Stands for the detector actor: counts rows and bytes (Ray Data reader rows carry bytes)."""

    def __call__(self, batch):
        return {"n": [len(batch["path"])], "bytes": [sum(len(b) for b in batch["bytes"])]}


class ReadCount:
    """Stands for the detector actor with its own reads: ``read_batch``, then count."""

    def __init__(self, fs) -> None:
        self.fs = fs

    def __call__(self, batch):
        from raydetect.storage import read_batch

        images, _, unreadable = read_batch(batch, self.fs, "s3://")
        assert not unreadable, unreadable
        return {"n": [len(images)], "bytes": [sum(len(b) for b in images)]}


def run(kind: str, ray, fs, paths: list[str], actors: int, rows: int) -> tuple[float, int, int]:
    from raydetect.job.run import read_blocks, read_inputs

    pool = ray.data.ActorPoolStrategy(size=actors)
    t0 = time.perf_counter()
    if kind == "ray_data_reader":
        blocks = sum(b for _, b in read_blocks(len(paths), rows, actors))
        ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, override_num_blocks=blocks)
        ds = ds.map_batches(Count, batch_size=rows, batch_format="numpy", compute=pool, num_cpus=0.5)
    else:
        ds = read_inputs(paths, rows, actors)
        ds = ds.map_batches(ReadCount, fn_constructor_kwargs={"fs": fs}, batch_size=rows, batch_format="numpy",
                            compute=pool, num_cpus=0.5)
    out = ds.to_pandas()
    return time.perf_counter() - t0, int(out["n"].sum()), int(out["bytes"].sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--kb", type=int, default=60, help="object size (a 640x480 JPEG is 30-80 KB)")
    ap.add_argument("--latency-ms", default="0,20", help="added per-request latency(ies) of the S3 server")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64, help="files per actor call (rows_per_call)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the Ray instance")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3_read"))
    args = ap.parse_args(argv)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import ray
    import s3fs

    from raydetect.config import StorageConfig

    latency = multiprocessing.get_context("spawn").Value("d", 0.0)
    endpoint, moto = start_moto(latency)
    fs = s3fs.S3FileSystem(**StorageConfig(endpoint_url=endpoint, key=KEY, secret=SECRET).fsspec_options())
    fs.mkdir("inbox")
    blob = os.urandom(args.kb * 1000)
    paths = [f"inbox/img{i:06d}.jpg" for i in range(args.files)]
    for i in range(0, len(paths), 256):
        fs.pipe({p: blob for p in paths[i:i + 256]})
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    run("actor_reads", ray, fs, paths[: args.rows * args.actors], args.actors, args.rows)  # warm-up
    kinds = ["ray_data_reader", "actor_reads"]
    rows = []
    for ms in [float(x) for x in args.latency_ms.split(",")]:
        latency.value = ms
        secs: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.repeats):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                s, n, nbytes = run(k, ray, fs, paths, args.actors, args.rows)
                assert n == args.files and nbytes == args.files * len(blob), (k, n, nbytes)
                secs[k].append(s)
                print(f"latency {ms:g} ms, {k}: {n} files in {s:.2f} s ({n / s:.0f} files/s)", flush=True)
        med = {k: statistics.median(v) for k, v in secs.items()}
        rows.append({"latency_ms": ms, "seconds": secs,
                     "files_per_s": {k: round(args.files / med[k], 1) for k in kinds},
                     "speedup": round(med["ray_data_reader"] / med["actor_reads"], 2)})
    ray.shutdown()
    moto.terminate()
    data = {
        "command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "ray": ray.__version__, "s3fs": s3fs.__version__},
        "files": args.files, "kb": args.kb, "actors": args.actors, "ray_cpus": args.cpus, "rows_per_call": args.rows,
        "repeats": args.repeats, "runs": rows,
        "summary": {f"{r['latency_ms']:g}ms": {"ray_data_reader_files_s": r["files_per_s"]["ray_data_reader"],
                                               "actor_reads_files_s": r["files_per_s"]["actor_reads"],
                                               "speedup": r["speedup"]} for r in rows},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# S3 reads: Ray Data's reader vs the actors' own reads\n",
             f"`{data['command']}`\n",
             f"{args.files} objects of {args.kb} KB on moto (127.0.0.1), {args.actors} actors, "
             f"{args.rows} files per call, Ray with {args.cpus} logical CPUs, median of {args.repeats}; "
             f"{data['machine']}\n",
             "| added latency per request | Ray Data reader files/s | actor reads files/s | speed-up |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['latency_ms']:g} ms | {r['files_per_s']['ray_data_reader']} | {r['files_per_s']['actor_reads']} "
              f"| {r['speedup']}x |" for r in rows]
    lines += ["", "moto is Python on this machine's CPUs: how many files/s it answers bounds both ways. "
              "The actor reads keep their rate when each request waits longer (their GETs overlap); "
              "the reader's tasks, which fetch one file after another, lose theirs."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[3:-2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
