"""Read a job's output back: :func:`read_results`.

Layout of ``OUTPUT`` (local folder or ``s3://`` prefix) as the batch job writes it:

* ``part-<shard id>.parquet`` — image rows (:data:`raydetect.types.RESULT_SCHEMA`), one file per
  shard, at the top level;
* ``_videos/<name>-<hash>-s<segment>.parquet`` — video frame rows
  (:data:`raydetect.types.VIDEO_RESULT_SCHEMA`), one file per (video, segment);
* ``_video_summary/summary.parquet`` — one row per video
  (:data:`raydetect.types.VIDEO_SUMMARY_SCHEMA`);
* ``_job.json`` (manifest), ``_report/`` (report, samples) and hidden temporaries.

Everything but the image rows starts with ``_`` or ``.``, which ``pyarrow.dataset`` skips by
default, so ``pyarrow.dataset.dataset(OUTPUT)`` reads the image rows whatever else the job held.
Outputs written before the video folders were renamed (``videos/``, ``video_summary/``) are
read too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raydetect.config import StorageConfig
from raydetect.types import RESULT_SCHEMA, VIDEO_RESULT_SCHEMA, VIDEO_SUMMARY_SCHEMA

#: folders of the video output under OUTPUT (current name first, then the name before 2026-12)
FRAMES_DIRS = ("_videos", "videos")
SUMMARY_DIRS = ("_video_summary", "video_summary")
SUMMARY_FILE = "summary.parquet"


@dataclass
class Results:
    """The rows of one job output as Arrow tables (``.to_pandas()`` on each for pandas).
    A table the job did not write (no images, no videos) is empty, with its schema."""

    output: str
    images: pa.Table  # one row per input image, sorted by uri
    frames: pa.Table  # one row per sampled video frame (and per error), sorted by uri, segment, pts
    video_summary: pa.Table  # one row per video, sorted by uri

    def __repr__(self) -> str:
        return (f"Results({self.output!r}: {self.images.num_rows} images, {self.frames.num_rows} video frame rows, "
                f"{self.video_summary.num_rows} videos)")


def _parquet_files(fs, folder: str) -> list[str]:
    if not fs.isdir(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")
                  and not p.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")))


def _read(fs, files: list[str], schema: pa.Schema) -> pa.Table:
    if not files:
        return schema.empty_table()
    return pads.dataset(files, schema=schema, format="parquet", filesystem=fs).to_table()


def read_results(output: str, storage: StorageConfig | None = None) -> Results:
    """Read the image rows, video frame rows and video summary of the job output ``output``
    (a local folder or ``s3://`` URL; ``storage`` for the S3 options).

    >>> r = read_results("/tmp/raydetect-out")           # doctest: +SKIP
    >>> r.images.to_pandas()[["uri", "detections"]]      # doctest: +SKIP
    """
    from raydetect.storage import filesystem

    fs, path = filesystem(output, storage)
    path = path.rstrip("/")
    if not fs.isdir(path):
        raise FileNotFoundError(f"no job output at {output}")
    # the shard files (raydetect.job.output.part_name; that module is not imported here: it imports
    # the package for its version)
    parts = [p for p in _parquet_files(fs, path) if p.rstrip("/").rsplit("/", 1)[-1].startswith("part-")]
    images = _read(fs, parts, RESULT_SCHEMA)
    frame_files = [f for d in FRAMES_DIRS for f in _parquet_files(fs, f"{path}/{d}")]
    frames = _read(fs, frame_files, VIDEO_RESULT_SCHEMA)
    summary = VIDEO_SUMMARY_SCHEMA.empty_table()
    for d in SUMMARY_DIRS:
        f = f"{path}/{d}/{SUMMARY_FILE}"
        if fs.isfile(f):
            with fs.open(f, "rb") as fh:
                summary = pq.read_table(fh, schema=VIDEO_SUMMARY_SCHEMA)
            break
    return Results(
        output=output,
        images=images.sort_by([("uri", "ascending")]) if images.num_rows else images,
        frames=frames.sort_by([("uri", "ascending"), ("segment", "ascending"), ("pts", "ascending")])
        if frames.num_rows else frames,
        video_summary=summary.sort_by([("uri", "ascending")]) if summary.num_rows else summary,
    )
