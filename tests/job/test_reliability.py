"""Issue 13, batch side: one bad entry never stops a job; storage stalls get deadlines.

Real Ray, real files (broken links, FIFOs, loops, odd names), a real moto server run as a
subprocess so that it can be paused (SIGSTOP) and killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from raydetect.config import DetectorConfig, JobConfig, StorageConfig
from raydetect.job.run import JobStalledError, run_job
from raydetect.stages.preprocess import decode_image, letterbox
from raydetect.storage import StorageUnavailableError, scan_inputs, show
from raydetect.types import table_to_results
from tests.conftest import MODELS, REPO, S3_KEY, S3_SECRET, free_port, photo_paths

MODEL = str(MODELS / "yolov8n-random.onnx")
BIG = 10**9


def jpgs(n: int) -> list[Path]:
    return [p for p in photo_paths() if p.suffix == ".jpg"][:n]


def write_good(d: Path) -> dict[str, bytes]:
    """The valid images (relative name → bytes), odd names and awkward-but-valid files included."""
    a, b, c = (p.read_bytes() for p in jpgs(3))
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    wide = cv2.imencode(".png", np.full((1, 10000, 3), 200, np.uint8))[1].tobytes()
    tall = cv2.imencode(".png", np.full((10000, 1, 3), 60, np.uint8))[1].tobytes()
    good = {
        "a.jpg": a,
        "sub/b.jpg": b,
        "new\nline.jpg": c,
        "tab\there.JPG": a,
        "trailing.jpg": b + b"\x00trailer" * 300,  # > 1 KB after EOI: valid
        "trailing.png": png + b"\x00" * 2048,  # > 1 KB after IEND: valid
        "wide.png": wide,
        "tall.png": tall,
        "other/linked.jpg": c,  # reached through in/link -> ../other as well: listed once
    }
    for name, data in good.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return good


def build_input(root: Path) -> tuple[Path, dict[str, bytes], dict[str, str], dict[str, int]]:
    """``root/in``: good images next to every kind of bad entry. Returns (input dir, good
    files, {relative path of a bad input-like entry: expected error substring}, skipped)."""
    d = root / "in"
    d.mkdir()
    good = write_good(d)
    # "other" lives outside the input; "in/link" points at it (followed once)
    shutil.move(str(d / "other"), str(root / "other"))
    os.symlink("../other", d / "link")
    good = {("link/linked.jpg" if k == "other/linked.jpg" else k): v for k, v in good.items()}
    photo = jpgs(1)[0].read_bytes()
    bad = {}
    os.symlink("does-not-exist.jpg", d / "broken.jpg")
    bad["broken.jpg"] = "broken symbolic link"
    os.mkfifo(d / "pipe.jpg")
    bad["pipe.jpg"] = "not a regular file: a FIFO"
    (d / "folder.jpg").mkdir()
    bad["folder.jpg"] = "a directory, not an image file"
    (d / "folder.jpg" / "inside.jpg").write_bytes(photo)
    good["folder.jpg/inside.jpg"] = photo
    os.symlink("../other", d / "dirlink.png")  # a link to an already listed directory, named like an image
    bad["dirlink.png"] = "a directory, not an image file"
    os.symlink(".", d / "loop")  # a loop: not listed twice
    os.symlink("loop2b.jpg", d / "loop2a")  # a link loop (ELOOP) named like nothing
    os.symlink("loop2a", d / "loop2b.jpg")
    bad["loop2b.jpg"] = "symbolic link loop"
    (d / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    (d / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    bad["truncated.jpg"] = "truncated JPEG"
    corrupt = bytearray(photo)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 200] = bytes(200)
    (d / "corrupt.jpg").write_bytes(bytes(corrupt))
    bad["corrupt.jpg"] = "corrupt image data: Corrupt JPEG data"
    (d / "text.png").write_text("not an image")
    bad["text.png"] = "cannot decode"
    os.close(os.open(os.fsencode(d) + b"/latin-\xe9.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    bad["latin-\\xe9.jpg"] = "not valid UTF-8"
    if os.geteuid() != 0:  # root reads anything
        (d / "secret.jpg").write_bytes(photo)
        os.chmod(d / "secret.jpg", 0)
        bad["secret.jpg"] = "permission denied"
    (d / "README.txt").write_text("notes")
    (d / "sub" / "labels.TXT").write_text("0 0.5 0.5 0.1 0.1")
    (d / "data.csv").write_text("a,b")
    (d / "Makefile").write_text("all:")
    skipped = {".txt": 2, ".csv": 1, "(none)": 2, "(directory listed already)": 2}  # Makefile, loop2a
    return d, good, bad, skipped


#: bad entries that are readable files: the decoder gives their error rows
DECODE_ERRORS = {"empty.jpg", "truncated.jpg", "corrupt.jpg", "text.png"}


def rows_by_rel(out: Path, base: Path) -> dict[str, object]:
    table = pq.read_table(out)
    rows = table_to_results(table)
    rel = {}
    for r in rows:
        assert r.uri.startswith(str(base) + "/"), r.uri
        rel.setdefault(r.uri[len(str(base)) + 1 :], []).append(r)
    return rel


def test_listing_reports_every_entry(tmp_path):
    d, good, bad, skipped = build_input(tmp_path)
    listing = scan_inputs(str(d), (".jpg", ".png"))
    rel = lambda p: p[len(str(d)) + 1 :]  # noqa: E731
    assert sorted(rel(p) for p in listing.files) == sorted([*good, *DECODE_ERRORS])
    assert sorted(rel(p) for p in listing.errors) == sorted(set(bad) - DECODE_ERRORS)
    for p, reason in listing.errors.items():
        assert bad[rel(p)] in reason, (p, reason)
    assert dict(listing.skipped) == skipped
    assert show("a\nb\tc") == "a\\nb\\tc"


def test_job_survives_every_bad_entry_and_resumes(ray_local, tmp_path, monkeypatch):
    d, good, bad, skipped = build_input(tmp_path)
    det = DetectorConfig(model=MODEL, conf=1e-4, batch_size=4)
    out = tmp_path / "out"
    cfg = JobConfig(input=str(d), output=str(out), detector=det, progress=False, shard_size=5)
    summary = run_job(cfg)
    rows = rows_by_rel(out, d)
    assert sorted(rows) == sorted([*good, *bad])  # exactly the image-like entries...
    assert all(len(v) == 1 for v in rows.values())  # ...one row each
    assert summary.images == len(good) + len(bad) and summary.unreadable == len(bad) - len(DECODE_ERRORS)
    assert summary.errors == len(bad) and summary.skipped == skipped
    assert "skipped (not inputs): " in summary.line()
    for name, reason in bad.items():
        (r,) = rows[name]
        assert r.error is not None and reason in r.error and r.detections == [], (name, r.error)
    for name in good:
        assert rows[name][0].error is None, (name, rows[name][0].error)
    assert (rows["wide.png"][0].width, rows["wide.png"][0].height) == (10000, 1)

    # the good rows equal a run over only the good files (same relative names)
    only = tmp_path / "only"
    only.mkdir()
    for name, data in good.items():
        (only / name).parent.mkdir(parents=True, exist_ok=True)
        (only / name).write_bytes(data)
    run_job(JobConfig(input=str(only), output=str(tmp_path / "out-good"), detector=det, progress=False))
    ref = rows_by_rel(tmp_path / "out-good", only)
    assert sorted(k for k, v in ref.items() if v[0].error is None) == sorted(good)
    for name in good:
        assert rows[name][0].detections == ref[name][0].detections, name
        assert (rows[name][0].width, rows[name][0].height) == (ref[name][0].width, ref[name][0].height)

    # re-running resumes: nothing is run again, nothing duplicated
    again = run_job(cfg)
    assert again.processed == 0 and again.shards_skipped == again.shards == summary.shards
    assert rows_by_rel(out, d) == rows

    # ./in/ and in are the same job
    monkeypatch.chdir(tmp_path)
    rel_cfg = JobConfig(input="in", output="out", detector=det, progress=False, shard_size=5)
    assert run_job(rel_cfg).processed == 0
    dot_cfg = JobConfig(input="./in/", output="./out/", detector=det, progress=False, shard_size=5)
    assert run_job(dot_cfg).processed == 0


def test_extreme_aspect_ratios_letterbox():
    for shape in [(1, 10000, 3), (10000, 1, 3), (1, 1, 3), (3, 4000, 3)]:
        data = cv2.imencode(".png", np.full(shape, 90, np.uint8))[1].tobytes()
        img = decode_image(data, BIG, BIG)
        boxed, g = letterbox(img, 640, 640)
        assert boxed.shape == (640, 640, 3) and g.new_w >= 1 and g.new_h >= 1


# --- storage deadlines: a moto server in a subprocess ----------------------------------------


class MotoProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def storage(self, **kw) -> StorageConfig:
        return StorageConfig(endpoint_url=self.url, key=S3_KEY, secret=S3_SECRET, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def moto_proc(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    m = MotoProcess()
    yield m
    m.stop()


def upload(moto: MotoProcess, n: int) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**moto.storage().fsspec_options())
    fs.mkdir("inbox")
    fs.mkdir("outbox")
    photos = jpgs(3)
    for i in range(n):
        fs.pipe_file(f"inbox/photos/{i:03d}.jpg", photos[i % len(photos)].read_bytes())


def test_paused_s3_is_reported_and_bounded(ray_local, moto_proc, caplog):
    """SIGSTOP the S3 server mid-job for 12 s: the job logs the stall while it waits and then
    either recovers (every input exactly once) or fails within its deadlines with one line."""
    n = 40
    upload(moto_proc, n)
    storage = moto_proc.storage(connect_timeout_s=1.0, read_timeout_s=2.0, max_attempts=2)
    cfg = JobConfig(
        input="s3://inbox/photos", output="s3://outbox/run", progress=False, shard_size=4, rows_per_call=2,
        detector=DetectorConfig(model=MODEL, batch_size=2, storage=storage),
        stall_warn_s=2.0, stall_timeout_s=40.0, report=False,
    )
    outcome: dict = {}

    def job():
        try:
            outcome["summary"] = run_job(cfg)
        except Exception as e:  # judged below
            outcome["error"] = e
        outcome["t"] = time.monotonic()

    import s3fs

    probe = s3fs.S3FileSystem(**moto_proc.storage().fsspec_options())
    caplog.set_level(logging.WARNING, logger="raydetect.job.run")
    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and worker.is_alive():
        probe.invalidate_cache()
        if probe.exists("outbox/run") and any("part-" in p for p in probe.ls("outbox/run")):
            break
        time.sleep(0.3)
    assert worker.is_alive(), f"the job ended before the pause: {outcome}"
    pause_s = 12.0
    os.kill(moto_proc.proc.pid, signal.SIGSTOP)
    t_pause, wall_pause = time.monotonic(), time.time()
    time.sleep(pause_s)
    os.kill(moto_proc.proc.pid, signal.SIGCONT)
    bound = pause_s + cfg.stall_timeout_s + 60  # the stall deadline, plus Ray Data's retry slack
    worker.join(timeout=bound)
    assert not worker.is_alive(), f"the job neither finished nor failed {bound:.0f} s after the pause"
    stalls = [r.getMessage() for r in caplog.records
              if "no progress for" in r.getMessage() and wall_pause < r.created < wall_pause + pause_s + 1]
    assert len(stalls) >= 2, "the stall was silent"  # stall_warn_s 2: one line every 2 s
    if "error" in outcome:
        err = outcome["error"]
        assert isinstance(err, (StorageUnavailableError, JobStalledError)), repr(err)
        assert "\n" not in str(err) and "re-run" in str(err)
        assert outcome["t"] - t_pause <= bound
        summary = run_job(cfg)  # the server is back: the re-run finishes the job
    else:
        summary = outcome["summary"]
    probe.invalidate_cache()
    table = pq.read_table("outbox/run", filesystem=probe)
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == [f"s3://inbox/photos/{i:03d}.jpg" for i in range(n)]  # none lost, none twice
    assert table.column("error").null_count == n
    assert summary.images == n


def test_killed_s3_is_one_line(moto_proc, tmp_path):
    upload(moto_proc, 2)
    moto_proc.stop()
    env = {**os.environ, "RAY_ADDRESS": "local", "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "detect", "--model", MODEL, "--input", "s3://inbox/photos",
         "--output", str(tmp_path / "o"), "--endpoint-url", moto_proc.url, "--s3-connect-timeout", "1",
         "--s3-read-timeout", "2", "--s3-max-attempts", "2", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("raydetect detect: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    line = errors[0]
    assert "storage unavailable while listing s3://inbox/photos" in line and "re-run" in line, line
    assert moto_proc.url in line and len(line) < 600, line
    assert took < 60, took
