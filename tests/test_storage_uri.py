"""Paths become URIs in one place (``storage.to_uri``): a remote input keeps its own scheme.

The remote filesystem here is fsspec's real LocalFileSystem registered under the ``gs``
protocol (gcsfs is not installed here): to raydetect it is a remote filesystem named ``gs``,
exactly like gcsfs would be, while the bytes come from local files.
"""

from __future__ import annotations

import shutil

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry

from raydetect.config import DetectorConfig, JobConfig, StorageConfig
from raydetect.job.run import run_job
from raydetect.storage import filesystem, is_remote_fs, to_uri, uri_prefix
from tests.conftest import MODELS, photo_paths


class GsLocalFileSystem(LocalFileSystem):
    """Local files behind the ``gs`` protocol (what gcsfs registers)."""

    protocol = ("gs", "gcs")
    root_marker = "/"


@pytest.fixture
def gs_protocol():
    previous = _registry.get("gs")
    fsspec.register_implementation("gs", GsLocalFileSystem, clobber=True)
    yield "gs"
    if previous is None:
        _registry.pop("gs", None)
    else:
        fsspec.register_implementation("gs", previous, clobber=True)


def test_to_uri_keeps_each_filesystems_scheme(gs_protocol, tmp_path):
    import s3fs

    local = fsspec.filesystem("file")
    assert to_uri(local, "/data/a.jpg") == "/data/a.jpg" and uri_prefix(local) == ""
    s3 = s3fs.S3FileSystem(anon=True)
    assert to_uri(s3, "bucket/a.jpg") == "s3://bucket/a.jpg" and uri_prefix(s3) == "s3://"
    fs, path = filesystem(f"gs://{tmp_path}", StorageConfig())
    assert isinstance(fs, GsLocalFileSystem) and is_remote_fs(fs) and path == str(tmp_path)
    assert to_uri(fs, path) == f"gs://{tmp_path}" and uri_prefix(fs) == "gs://"


def test_gs_job_rows_carry_the_gs_scheme_and_resume(ray_local, gs_protocol, tmp_path):
    src = tmp_path / "bucket" / "photos"
    src.mkdir(parents=True)
    photos = photo_paths()[:2]
    for p in photos:
        shutil.copy(p, src / p.name)
    (src / "empty.jpg").write_bytes(b"")
    cfg = JobConfig(
        input=f"gs://{src}",
        output=str(tmp_path / "out"),
        detector=DetectorConfig(model=str(MODELS / "yolov8n-random.onnx"), conf=1e-4, batch_size=4),
        progress=False,
    )
    summary = run_job(cfg)
    assert summary.images == 3 and summary.errors == 1
    rows = pq.read_table(tmp_path / "out").to_pylist()
    uris = sorted(r["uri"] for r in rows)
    assert uris == sorted(f"gs://{src / n}" for n in [p.name for p in photos] + ["empty.jpg"])
    assert not any(u.startswith("s3://") for u in uris)
    errors = {r["uri"]: r["error"] for r in rows if r["error"]}
    assert list(errors) == [f"gs://{src / 'empty.jpg'}"]
    # the resume ledger strips the same prefix: a re-run finds every input done
    again = run_job(cfg)
    assert again.processed == 0 and again.shards_skipped == again.shards


def test_location_reads_writes_and_joins_with_its_own_scheme(gs_protocol, tmp_path):
    from raydetect.storage import Location

    root = Location.of(f"gs://{tmp_path}")
    assert root.remote and root.url == f"gs://{tmp_path}" and root.uri_prefix == "gs://"
    part = root.join("out", "part-1.bin")
    assert part.url == f"gs://{tmp_path}/out/part-1.bin" and not part.exists()
    (tmp_path / "out").mkdir()
    part.write_atomic(b"abc")
    assert part.exists() and part.read_bytes() == b"abc" and str(part) == part.url
    local = Location.of(str(tmp_path / "loc"))
    assert not local.remote and local.url == str(tmp_path / "loc") and local.uri_prefix == ""
    target = local.join("x", "y.bin")
    target.write_atomic(b"xyz")  # creates the folders; no temporary left beside it
    assert target.read_bytes() == b"xyz" and sorted(p.name for p in (tmp_path / "loc" / "x").iterdir()) == ["y.bin"]
    assert local.uri_of(target.path) == str(tmp_path / "loc" / "x" / "y.bin")
