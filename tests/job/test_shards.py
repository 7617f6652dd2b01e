"""Exactly-once output without Ray: shard planning, the part-file ledger, the manifest, on a local
disk and on a real S3 server (moto)."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from raydetect.job import output as sh
from raydetect.storage import filesystem
from raydetect.types import Detection, ImageResult, ModelIdentity, results_to_table


def rows(paths, prefix=""):
    res = [
        ImageResult(uri=prefix + p, width=10, height=10, detections=[Detection(0, 0, 1, 1, 0.5, 1, "a")])
        for p in paths
    ]
    return results_to_table(res, ModelIdentity("x", engine="onnxruntime", precision="fp32"))


def read_all(fs, out):
    parts = sh.existing_parts(fs, out)
    uris = []
    for p in parts.values():
        with fs.open(p, "rb") as f:
            uris += pq.read_table(f).column("uri").to_pylist()
    return parts, uris


PATHS = [f"/in/img{i:03d}.jpg" for i in range(23)]


def test_plan_is_contiguous_sorted_and_deterministic():
    shuffled = PATHS[:]
    random.Random(0).shuffle(shuffled)
    a = sh.plan_shards(shuffled, 5)
    b = sh.plan_shards(PATHS + PATHS[:3], 5)  # duplicates in a listing count once
    assert [s.paths for s in a] == [tuple(PATHS[i : i + 5]) for i in range(0, 23, 5)]
    assert [s.id for s in a] == [s.id for s in b]
    assert len({s.id for s in a}) == 5 and [len(s.paths) for s in a] == [5, 5, 5, 5, 3]
    assert a[0].part_name == f"part-{a[0].id}.parquet"
    assert sh.plan_shards(PATHS, 6)[0].id != a[0].id
    with pytest.raises(ValueError, match="shard_size"):
        sh.plan_shards(PATHS, 0)


def test_writer_writes_each_shard_once_when_complete(tmp_path):
    fs, out = filesystem(str(tmp_path / "out"))
    fs.makedirs(out, exist_ok=True)
    shards = sh.plan_shards(PATHS, 5)
    w = sh.ShardWriter(fs, out, shards)
    order = PATHS[:]
    random.Random(1).shuffle(order)
    written = []
    for i in range(0, 20, 4):  # the first 20 rows in batches of 4, in random order
        written += w.add(rows(order[i : i + 4]))
        for sid in written:  # a completed shard is on disk with all its rows
            assert (tmp_path / "out" / sh.part_name(sid)).exists()
    w.add(rows(order[:6]))  # a retried task repeats rows: dropped
    assert w.stats.duplicates_dropped == 6
    incomplete = w.incomplete()
    assert incomplete and all(seen < n for seen, n in incomplete.values())
    with pytest.raises(RuntimeError, match="re-run the job"):
        w.close()
    parts, uris = read_all(fs, out)
    assert set(parts) == set(written)  # nothing partial was written
    sizes = {s.id: len(s.paths) for s in shards}
    assert len(uris) == len(set(uris)) == sum(sizes[i] for i in written)
    w.add(rows(order[20:]))
    w.close()
    parts, uris = read_all(fs, out)
    assert sorted(uris) == PATHS and len(parts) == 5
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries


def test_writer_rejects_rows_of_other_inputs(tmp_path):
    fs, out = filesystem(str(tmp_path))
    w = sh.ShardWriter(fs, out, sh.plan_shards(PATHS[:5], 5))
    with pytest.raises(KeyError, match="none of this run's shards"):
        w.add(rows(["/in/other.jpg"]))


def test_resume_skips_done_shards_and_reconciles_a_changed_listing(tmp_path):
    fs, out = filesystem(str(tmp_path / "out"))
    fs.makedirs(out, exist_ok=True)
    plan = sh.plan_resume(fs, out, PATHS, 5, "")
    assert len(plan.pending) == 5 and not plan.done and plan.total_inputs == 23
    w = sh.ShardWriter(fs, out, plan.pending)
    w.add(rows(PATHS[:10]))  # two shards done, then the "driver dies"
    plan = sh.plan_resume(fs, out, PATHS, 5, "")
    assert not plan.reconciled and len(plan.done) == 2
    assert plan.pending_paths == PATHS[10:]
    # same ids as the first run: the pending shards are the planned ones
    assert [s.id for s in plan.pending] == [s.id for s in sh.plan_shards(PATHS, 5)[2:]]

    grown = PATHS + ["/in/img000a.jpg", "/in/img999.jpg"]  # new files, one sorting early
    plan = sh.plan_resume(fs, out, grown, 5, "")
    assert plan.reconciled and not plan.stale_parts
    assert sorted(plan.pending_paths) == sorted(set(grown) - set(PATHS[:10]))
    w = sh.ShardWriter(fs, out, plan.pending)
    w.add(rows(plan.pending_paths))
    w.close()
    _, uris = read_all(fs, out)
    assert sorted(uris) == sorted(grown)  # every input exactly once
    assert sh.plan_resume(fs, out, grown, 5, "").pending == []
    assert sh.plan_resume(fs, out, grown, 7, "").pending == []  # another shard size: still done
    shrunk = sh.plan_resume(fs, out, PATHS[10:], 5, "")
    assert shrunk.pending == [] and len(shrunk.stale_parts) == 2  # parts of inputs no longer listed


def test_manifest_mismatch_names_the_field():
    old = sh.make_manifest(model_sha256="a" * 64, input="s3://b/in", settings={"conf": 0.25, "iou": 0.7},
                           shard_size=100)
    same = sh.make_manifest(model_sha256="a" * 64, input="s3://b/in", settings={"conf": 0.25, "iou": 0.7},
                            shard_size=10)
    sh.check_manifest(old, same, "out")  # shard size may change between runs
    assert old["fingerprint"] == same["fingerprint"]
    other = sh.make_manifest(model_sha256="b" * 64, input="s3://b/in", settings={"conf": 0.5, "iou": 0.7},
                             shard_size=100)
    with pytest.raises(sh.OutputMismatchError, match=r"conf: 0.25 then, 0.5 now") as e:
        sh.check_manifest(old, other, "out")
    assert "model_sha256" in str(e.value) and "--overwrite" in str(e.value)
    assert isinstance(e.value, FileExistsError)


def test_s3_parts_and_manifest(s3_storage, s3fs_client):
    if not s3fs_client.exists("ledger"):
        s3fs_client.mkdir("ledger")
    fs, out = filesystem("s3://ledger/run", s3_storage)
    paths = [f"archive/p/{i}.jpg" for i in range(7)]
    manifest = sh.make_manifest(model_sha256="c" * 64, input="s3://archive/p", settings={}, shard_size=3)
    sh.write_manifest(fs, out, manifest)
    assert sh.read_manifest(fs, out)["fingerprint"] == manifest["fingerprint"]
    plan = sh.plan_resume(fs, out, paths, 3, "s3://")
    w = sh.ShardWriter(fs, out, plan.pending, uri_prefix="s3://")
    w.add(rows(paths[:4], prefix="s3://"))
    assert len(sh.existing_parts(fs, out)) == 1
    plan = sh.plan_resume(fs, out, paths, 3, "s3://")
    assert plan.pending_paths == paths[3:]
    plan = sh.plan_resume(fs, out, paths, 2, "s3://")  # reconciles by reading the part's uris
    assert plan.reconciled and plan.pending_paths == paths[3:]
    w = sh.ShardWriter(fs, out, plan.pending, uri_prefix="s3://")
    w.add(rows(paths[3:], prefix="s3://"))
    w.close()
    _, uris = read_all(fs, out)
    assert sorted(uris) == ["s3://" + p for p in paths]
    assert json.loads(s3fs_client.cat("ledger/run/_job.json"))["shard_size"] == 3
