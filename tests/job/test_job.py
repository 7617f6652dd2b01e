"""The batch job end to end with real Ray Data, local files and a local S3 server."""

import os
import re
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydetect.config import DetectorConfig, JobConfig
from raydetect.job.run import run_job
from raydetect.types import RESULT_SCHEMA, table_to_results
from tests.conftest import MODELS, REPO, photo_paths
from tests.reference import as_tuples, assert_same_detections, reference_detections
from tests.test_detector import direct_reference

MODEL = str(MODELS / "yolov8n-random.onnx")


def read_rows(path, fs=None):
    table = pq.read_table(path, filesystem=fs)
    return table, {r.uri: r for r in table_to_results(table)}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """The real photos plus one file of each kind of bad input."""
    d = tmp_path_factory.mktemp("images")
    for p in photo_paths():
        shutil.copy(p, d / p.name)
    good = photo_paths()[0].read_bytes()
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 20)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    big = np.full((2500, 2500, 3), 90, np.uint8)
    (d / "huge.jpg").write_bytes(cv2.imencode(".jpg", big)[1].tobytes())
    (d / "README.txt").write_text("not an image extension: not listed")
    return d


BAD = {
    "empty.jpg": "empty file",
    "notes.jpg": "cannot decode: not an image or corrupt data",
    "truncated.jpg": "truncated JPEG: no end-of-image marker",
    "huge.jpg": "image too large: 2500x2500 = 6250000 pixels > max_pixels 5000000",
}


def job_config(inp, out, **det):
    det = {"model": MODEL, "conf": 1e-4, "batch_size": 4, "max_pixels": 5_000_000, **det}
    return JobConfig(input=str(inp), output=str(out), detector=DetectorConfig(**det), progress=False)


def test_local_job_matches_reference_and_keeps_bad_rows(ray_local, image_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_job(job_config(image_dir, out))
    table, rows = read_rows(out)
    assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
    files = sorted(p for p in image_dir.iterdir() if p.suffix != ".txt")
    assert sorted(rows) == sorted(str(p) for p in files) and table.num_rows == len(files)
    assert summary.images == len(files) and summary.errors == len(BAD)
    assert summary.detections == sum(len(r.detections) for r in rows.values()) > 0
    for p in files:
        row = rows[str(p)]
        if p.name in BAD:
            assert row.error == BAD[p.name] and row.detections == []
            continue
        assert row.error is None
        ref = direct_reference(MODEL, p.read_bytes(), 1e-4, 0.7)
        assert_same_detections(as_tuples(row.detections), ref)
    assert set(table.column("engine").to_pylist()) == {"onnxruntime"}
    assert set(table.column("precision").to_pylist()) == {"fp32"}
    assert len(set(table.column("model_sha256").to_pylist())) == 1


def test_read_blocks_hold_whole_detector_calls(ray_local, tmp_path):
    """With Ray Data's own read blocks (12 files each for 240 files) calls of 8 came out 8 and
    4; the job's blocks hold whole calls, so every call but the last is full."""
    from raydetect.job.run import read_blocks, read_inputs

    assert read_blocks(240, 8, 2) == [(slice(0, 240), 10)]
    assert read_blocks(243, 8, 2) == [(slice(0, 240), 10), (slice(240, 243), 1)]
    assert read_blocks(5, 8, 1) == [(slice(0, 5), 1)]
    assert read_blocks(0, 8, 1) == []
    assert read_blocks(40_000, 64, 4) == [(slice(0, 39_936), 156), (slice(39_936, 40_000), 1)]  # 256 a block
    files = [f"/in/{i:04d}.jpg" for i in range(243)]
    ds = read_inputs(files, 8, 2)
    sizes = ds.map_batches(lambda b: {"n": [len(b["path"])]}, batch_size=8, batch_format="numpy")
    sizes = sorted(int(n) for n in sizes.to_pandas()["n"])
    assert sum(sizes) == 243 and sizes.count(8) == 30  # + the 3 left over


def test_read_batch_reads_every_name_and_reports_what_it_cannot(s3fs_client, tmp_path):
    """The actors read their calls' files themselves: names with control or glob characters
    are read as they are (never globbed), a file gone since the listing is an error row's
    reason, the rest are unaffected; on S3 too (moto on 127.0.0.1)."""
    import fsspec

    from raydetect.storage import read_batch

    names = ["a.jpg", "tab\there.jpg", "glob[1]*.jpg", "gone.jpg", "z.jpg"]
    (tmp_path / "glob1x.jpg").write_bytes(b"decoy")  # what "glob[1]*.jpg" would match as a pattern
    for i, n in enumerate(names):
        if n != "gone.jpg":
            (tmp_path / n).write_bytes(bytes([i]) * (i + 1))
    local = [str(tmp_path / n) for n in names]
    images, uris, unreadable = read_batch({"path": local}, fsspec.filesystem("file"), "file://")
    assert uris == ["file://" + p for p in local if not p.endswith("gone.jpg")]
    assert images == [bytes([i]) * (i + 1) for i, n in enumerate(names) if n != "gone.jpg"]
    assert list(unreadable) == ["file://" + str(tmp_path / "gone.jpg")]
    assert unreadable["file://" + str(tmp_path / "gone.jpg")].startswith("cannot read: FileNotFoundError")

    bucket = "readbatch"
    if not s3fs_client.exists(bucket):
        s3fs_client.mkdir(bucket)
    for i, n in enumerate(names):
        if n != "gone.jpg":
            s3fs_client.pipe(f"{bucket}/{n}", bytes([i]) * (i + 1))
    s3fs_client.pipe(f"{bucket}/glob1x.jpg", b"decoy")
    images, uris, unreadable = read_batch({"path": [f"{bucket}/{n}" for n in names]}, s3fs_client, "s3://")
    assert uris == [f"s3://{bucket}/{n}" for n in names if n != "gone.jpg"]
    assert images == [bytes([i]) * (i + 1) for i, n in enumerate(names) if n != "gone.jpg"]
    assert list(unreadable) == [f"s3://{bucket}/gone.jpg"]
    assert unreadable[f"s3://{bucket}/gone.jpg"].startswith("cannot read: FileNotFoundError")


def test_s3_connections_follow_the_config(s3_storage):
    """botocore opens 10 connections per client unless told otherwise, which capped a call's
    concurrent GETs at 10 (128 files at 300 ms each: 8.2 s, against 1.7 s with 64;
    benchmarks/results/s3_connections.md). ``max_connections`` (--s3-max-connections) sets it."""
    import argparse

    from raydetect.cli.common import add_storage_args, config_values
    from raydetect.config import StorageConfig
    from raydetect.storage import filesystem

    fs, _ = filesystem("s3://any/x.jpg", s3_storage)
    assert fs.s3.meta.config.max_pool_connections == StorageConfig().max_connections == 64
    fs, _ = filesystem("s3://any/x.jpg", s3_storage.model_copy(update={"max_connections": 7}))
    assert fs.s3.meta.config.max_pool_connections == 7
    p = argparse.ArgumentParser()
    add_storage_args(p)
    assert StorageConfig(**config_values(p.parse_args(["--s3-max-connections", "12"]))["storage"]).max_connections == 12


def test_a_file_gone_since_the_listing_is_an_error_row(ray_local, image_dir, tmp_path):
    """The dataset of a job whose listing saw a file that is gone when its call reads it: that
    file is an error row, the others of its call are detected."""
    import fsspec

    from raydetect.job.run import build_dataset

    cfg = job_config(image_dir, tmp_path / "out", batch_size=4)
    good = sorted(str(p) for p in image_dir.iterdir() if p.suffix != ".txt" and p.name not in BAD)[:3]
    gone = str(tmp_path / "gone.jpg")
    table = pa.concat_tables(build_dataset(cfg, [*good, gone], fsspec.filesystem("file")).iter_batches(
        batch_size=None, batch_format="pyarrow"))
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*good, gone])
    assert rows[gone]["error"].startswith("cannot read: FileNotFoundError")
    assert all(rows[p]["error"] is None and rows[p]["width"] for p in good)


def test_initial_actors():
    from raydetect.resources import initial_actors

    cfg = job_config("/in", "/out", batch_size=8).model_copy(update={"concurrency": 4})
    assert initial_actors(cfg, 240, free_cpus=16) == 4  # all at once where they fit
    assert initial_actors(cfg, 16, free_cpus=16) == 2  # no more than the input keeps busy
    assert initial_actors(cfg, 240, free_cpus=2) == 2  # the actors read their own files: no read tasks
    assert initial_actors(cfg, 240, free_cpus=0) == 1  # min_actors; the pool grows as CPUs come
    assert initial_actors(cfg.model_copy(update={"num_cpus": 0.5}), 240, free_cpus=1.5) == 3
    # a video job: one call = video.sessions segments, and every video has one segment or more;
    # a CPU stays for the tasks that plan the segments
    assert initial_actors(cfg, 3, free_cpus=16, rows_per_call=1, spare_cpus=1) == 3
    assert initial_actors(cfg, 3, free_cpus=16, rows_per_call=2, spare_cpus=1) == 2
    assert initial_actors(cfg, 240, free_cpus=2, rows_per_call=1, spare_cpus=1) == 1


def test_a_job_with_an_actor_per_cpu(ray_local, image_dir, tmp_path):
    """As many actors as the 2-CPU test cluster has CPUs, started at once: the job must not
    wait on anything that needs a CPU (when Ray Data's read tasks fed the actors, actors
    started at once took both CPUs, and this job hung)."""
    cfg = job_config(image_dir, tmp_path / "out", threads=1).model_copy(update={"concurrency": 2})
    summary = run_job(cfg)
    files = sorted(str(p) for p in image_dir.iterdir() if p.suffix != ".txt")
    _, rows = read_rows(tmp_path / "out")
    assert sorted(rows) == files and summary.errors == len(BAD)


def test_existing_output_is_refused(ray_local, image_dir, tmp_path):
    out = tmp_path / "out"
    run_job(job_config(image_dir, out, model=str(MODELS / "yolov8n-defects.onnx")), overwrite=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_job(job_config(image_dir, out))


def test_s3_job_writes_identical_detections(ray_local, s3_storage, s3fs_client, tmp_path):
    bucket = "archive"
    if not s3fs_client.exists(bucket):
        s3fs_client.mkdir(bucket)
    for p in photo_paths():
        s3fs_client.put(str(p), f"{bucket}/photos/{p.name}")
    cfg = JobConfig(
        input=f"s3://{bucket}/photos",
        output=f"s3://{bucket}/results/run1",
        detector=DetectorConfig(model=MODEL, conf=1e-4, batch_size=4, storage=s3_storage),
        progress=False,
    )
    summary = run_job(cfg)
    assert summary.images == len(photo_paths()) and summary.errors == 0
    s3_table, s3_rows = read_rows(f"{bucket}/results/run1", fs=s3fs_client)
    assert s3_table.num_rows == len(photo_paths())
    local_dir = tmp_path / "photos"
    shutil.copytree(photo_paths()[0].parent, local_dir, ignore=shutil.ignore_patterns("SHA256SUMS"))
    run_job(job_config(local_dir, tmp_path / "local"))
    _, local_rows = read_rows(tmp_path / "local")
    for p in photo_paths():
        s3_row = s3_rows[f"s3://{bucket}/photos/{p.name}"]
        local_row = local_rows[str(local_dir / p.name)]
        assert s3_row.detections == local_row.detections  # identical, not just close
        assert (s3_row.width, s3_row.height) == (local_row.width, local_row.height)


def test_model_from_s3(ray_local, s3_storage, s3fs_client, image_dir, tmp_path):
    if not s3fs_client.exists("models"):
        s3fs_client.mkdir("models")
    s3fs_client.put(str(MODELS / "yolov8n-defects.onnx"), "models/defects.onnx")
    cfg = JobConfig(
        input=str(image_dir / "bus.jpg"),
        output=str(tmp_path / "o"),
        detector=DetectorConfig(model="s3://models/defects.onnx", storage=s3_storage),
        progress=False,
    )
    summary = run_job(cfg)
    assert summary.images == 1 and summary.errors == 0
    _, rows = read_rows(tmp_path / "o")
    assert len(rows) == 1


def test_cli_detect_end_to_end(tmp_path):
    """The README command, as a user runs it (its own Ray instance)."""
    out = tmp_path / "cli-out"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "detect", "--model", MODEL,
         "--input", str(photo_paths()[0].parent), "--output", str(out), "--conf", "0.0001",
         "--limit", "3", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raydetect: 3 images in" in proc.stdout and "0 errors" in proc.stdout
    # the summary's time is the command's (start-up included) and says how much start-up was
    m = re.search(r"3 images in ([\d.]+) s \(([\d.]+) s start-up, ([\d.]+) s detecting: [\d.]+ images/s\)",
                  proc.stdout)
    assert m, proc.stdout
    total, startup, detecting = map(float, m.groups())
    assert startup > 0.5 and startup + detecting <= total + 0.1 and total <= wall
    assert total >= 0.6 * wall  # only Ray's shutdown at exit is left out
    table, rows = read_rows(out)
    assert table.num_rows == 3
    # --limit takes the first files in sorted order
    assert sorted(rows) == [str(p) for p in photo_paths()[:3]]


def test_cli_reports_bad_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "detect", "--model", MODEL, "--input", str(tmp_path),
         "--output", str(tmp_path / "o"), "--conf", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "detector.conf: Input should be less than or equal to 1 (got 2.0)" in proc.stderr


def test_reference_self_check():
    """The reference decode is itself right on a hand-built tensor (guards the guard)."""
    pred = np.zeros((84, 3), np.float32)
    pred[:4, 0] = [320, 320, 64, 64]
    pred[4 + 5, 0] = 0.9
    pred[:4, 1] = [322, 320, 64, 64]
    pred[4 + 5, 1] = 0.8
    dets = reference_detections(pred, 0.25, 0.7, 300, 640, 640)
    assert dets == [(288.0, 288.0, 352.0, 352.0, pytest.approx(0.9), 5)]


def test_read_results_of_a_job_with_images_and_a_video(ray_local, tmp_path):
    """A small real job (two photos and the traffic clip, pretrained COCO model) read back with
    raydetect.read_results; pyarrow.dataset.dataset(OUTPUT) as the README has it reads the image
    rows alone, whatever else the job wrote (video folders, manifest, report)."""
    import pyarrow.dataset as pads

    import raydetect
    from raydetect.config import VideoConfig
    from tests.conftest import DATA, IMAGES

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("bus.jpg", "cat22.jpg"):
        shutil.copy(IMAGES / name, inp / name)
    shutil.copy(DATA / "video" / "traffic-highway-2s.mp4", inp / "traffic.mp4")
    out = tmp_path / "out"
    cfg = JobConfig(input=str(inp), output=str(out), progress=False, num_cpus=1,
                    detector=DetectorConfig(model=str(MODELS / "yolov5n-coco.onnx"), batch_size=4),
                    video=VideoConfig(fps=2))
    summary = run_job(cfg)
    assert summary.images == 2 and summary.video.videos == 1

    res = raydetect.read_results(str(out))
    assert "2 images" in repr(res) and "1 videos" in repr(res)
    assert res.images.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert res.images.column("uri").to_pylist() == [str(inp / "bus.jpg"), str(inp / "cat22.jpg")]
    names = {r["uri"].rsplit("/", 1)[-1]: {d["class_name"] for d in r["detections"]} for r in res.images.to_pylist()}
    assert {"bus", "car"} <= names["bus.jpg"] and "cat" in names["cat22.jpg"]
    # the clip at 2 frames/s: 4 or 5 sampled frames (its first PTS is hidden by the edit list)
    frames = res.frames.to_pylist()
    assert 4 <= len(frames) <= 5 and all(f["uri"] == str(inp / "traffic.mp4") for f in frames)
    assert [f["frame"] for f in frames] == sorted(f["frame"] for f in frames)
    assert all({"car"} <= {d["class_name"] for d in f["detections"]} for f in frames)
    summ = res.video_summary.to_pylist()
    assert len(summ) == 1 and summ[0]["frames_decoded"] == 49 and summ[0]["frames_processed"] == len(frames)
    df = res.images.to_pandas()  # pandas, as the README says
    assert list(df["uri"]) == [str(inp / "bus.jpg"), str(inp / "cat22.jpg")]

    # the README's reader: the image rows alone
    plain = pads.dataset(str(out)).to_table()
    assert plain.sort_by("uri").equals(res.images)
    # a folder that is not a job output is a clear error
    with pytest.raises(FileNotFoundError, match="no job output"):
        raydetect.read_results(str(tmp_path / "missing"))
