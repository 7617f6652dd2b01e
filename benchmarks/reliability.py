"""Reliability figures of the batch job (issue 13, batch half of docs/reliability.md).

    python benchmarks/reliability.py [--rounds 3] [--pause-s 12]
    → benchmarks/results/reliability_job.json (and a Markdown table on stdout)

Scenarios, each on a real local Ray instance (2 CPUs) and, for S3, a real moto server run as
a subprocess (so it can be paused with SIGSTOP and killed):

* ``bad-entries``: the folder of tests/job/test_reliability.py (good images next to broken
  links, a FIFO, directories named like images, link loops, a non-UTF-8 name, newline/tab
  names, truncated/corrupt/empty files, trailing data, 10000x1 PNGs, unlisted extensions),
  run, then re-run (resume). Rows lost = image-like entries without a row; duplicated = rows
  beyond one per entry.
* ``s3-paused``: 40 images on S3 → S3, the server paused for ``--pause-s`` once the first
  part file exists; the job either recovers or fails with one line and a re-run finishes.
* ``s3-killed``: the CLI against a killed server: exit code, stderr lines, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from raydetect.config import DetectorConfig, JobConfig  # noqa: E402
from raydetect.job.run import run_job  # noqa: E402
from tests.conftest import S3_KEY, S3_SECRET  # noqa: E402
from tests.job.test_reliability import MODEL, MotoProcess, build_input, upload  # noqa: E402


def count_entries(d: Path) -> int:
    """Every directory entry under ``d`` (links not followed), the input itself excluded."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(d))


def bad_entries(tmp: Path) -> dict:
    d, good, bad, skipped = build_input(tmp)
    det = DetectorConfig(model=MODEL, conf=1e-4, batch_size=4)
    cfg = JobConfig(input=str(d), output=str(tmp / "out"), detector=det, progress=False, shard_size=5)
    t0 = time.perf_counter()
    s1 = run_job(cfg)
    secs = time.perf_counter() - t0
    s2 = run_job(cfg)
    uris = pq.read_table(tmp / "out").column("uri").to_pylist()
    expected = {f"{d}/{k}" for k in [*good, *bad]}
    return {
        "entries_tried": count_entries(d),
        "image_like_entries": len(expected),
        "rows": len(uris),
        "rows_lost": len(expected - set(uris)),
        "rows_duplicated": len(uris) - len(set(uris)),
        "error_rows": s1.errors,
        "skipped": s1.skipped,
        "seconds": round(secs, 1),
        "rerun_images_run": s2.processed,
    }


def s3_paused(pause_s: float) -> dict:
    import s3fs

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    m = MotoProcess()
    try:
        n = 40
        upload(m, n)
        storage = m.storage(connect_timeout_s=1.0, read_timeout_s=2.0, max_attempts=2)
        cfg = JobConfig(input="s3://inbox/photos", output="s3://outbox/run", progress=False, shard_size=4,
                        rows_per_call=2, detector=DetectorConfig(model=MODEL, batch_size=2, storage=storage),
                        stall_warn_s=2.0, stall_timeout_s=40.0, report=False)
        out: dict = {}
        stalls: list[str] = []

        import logging

        class Catch(logging.Handler):
            def emit(self, record):
                if "no progress for" in record.getMessage():
                    stalls.append((record.created, record.getMessage()))

        handler = Catch()
        logging.getLogger("raydetect.job.run").addHandler(handler)

        def job():
            try:
                out["summary"] = run_job(cfg)
            except Exception as e:
                out["error"] = f"{type(e).__name__}: {e}"
            out["t"] = time.monotonic()

        probe = s3fs.S3FileSystem(**m.storage().fsspec_options())
        th = threading.Thread(target=job, daemon=True)
        th.start()
        while th.is_alive():
            probe.invalidate_cache()
            if probe.exists("outbox/run") and any("part-" in p for p in probe.ls("outbox/run")):
                break
            time.sleep(0.3)
        os.kill(m.proc.pid, signal.SIGSTOP)
        t_pause, wall_pause = time.monotonic(), time.time()
        time.sleep(pause_s)
        os.kill(m.proc.pid, signal.SIGCONT)
        th.join(timeout=600)
        logging.getLogger("raydetect.job.run").removeHandler(handler)
        outcome = "recovered" if "summary" in out else "failed with one line"
        if "error" in out:
            run_job(cfg)
        during = [msg for t, msg in stalls if wall_pause < t < wall_pause + pause_s + 1]
        probe.invalidate_cache()
        uris = pq.read_table("outbox/run", filesystem=probe).column("uri").to_pylist()
        return {
            "inputs": n,
            "pause_s": pause_s,
            "outcome": outcome,
            "error": out.get("error"),
            "seconds_after_pause_to_end": round(out["t"] - t_pause, 1),
            "stall_lines_during_pause": len(during),
            "first_stall_line": during[0] if during else None,
            "rows_lost": len({f"s3://inbox/photos/{i:03d}.jpg" for i in range(n)} - set(uris)),
            "rows_duplicated": len(uris) - len(set(uris)),
        }
    finally:
        m.stop()


def s3_killed(tmp: Path) -> dict:
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    m = MotoProcess()
    upload(m, 2)
    m.stop()
    env = {**os.environ, "RAY_ADDRESS": "local", "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "detect", "--model", MODEL, "--input", "s3://inbox/photos",
         "--output", str(tmp / "o"), "--endpoint-url", m.url, "--s3-connect-timeout", "1",
         "--s3-read-timeout", "2", "--s3-max-attempts", "2", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {"exit_code": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "stderr_lines": len(lines), "traceback": "Traceback" in proc.stderr, "last_line": lines[-1] if lines else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="repeat each scenario")
    ap.add_argument("--pause-s", type=float, default=12.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability_job.json"))
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, list] = {"bad-entries": [], "s3-paused": [], "s3-killed": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as t:
            results["bad-entries"].append(bad_entries(Path(t)))
        results["s3-paused"].append(s3_paused(args.pause_s))
        with tempfile.TemporaryDirectory() as t:
            results["s3-killed"].append(s3_killed(Path(t)))
    doc = {"command": "python benchmarks/reliability.py " + " ".join(sys.argv[1:]), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("| scenario | inputs tried | rows lost | rows duplicated | outcome |")
    print("|---|---:|---:|---:|---|")
    for r in results["bad-entries"]:
        print(f"| bad entries | {r['entries_tried']} entries ({r['image_like_entries']} image-like) | "
              f"{r['rows_lost']} | {r['rows_duplicated']} | finished, {r['error_rows']} error rows, "
              f"skipped {sum(r['skipped'].values())}; re-run ran {r['rerun_images_run']} |")
    for r in results["s3-paused"]:
        print(f"| S3 paused {r['pause_s']:g} s | {r['inputs']} | {r['rows_lost']} | {r['rows_duplicated']} | "
              f"{r['outcome']} {r['seconds_after_pause_to_end']} s after the pause, {r['stall_lines_during_pause']} 'no progress' lines during the pause |")
    for r in results["s3-killed"]:
        print(f"| S3 killed | 2 | - | - | exit {r['exit_code']} after {r['seconds']} s, "
              f"{r['stderr_lines']} stderr lines, traceback: {r['traceback']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
