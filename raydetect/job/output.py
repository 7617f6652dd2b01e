"""Exactly-once output of the batch job: shards, part files (the ledger) and the job manifest.

* The sorted input list is cut into contiguous **shards** of ``shard_size`` files. A shard's id is
  a hash of its file list, so the same inputs always give the same shards and names.
* Each shard's rows are written once, as ``OUTPUT/part-<id>.parquet``, atomically: on an object
  store one PUT (s3fs ``pipe_file``: a single PUT, or a multipart upload that only appears when
  completed); on a local disk a hidden temporary file next to it, renamed into place. A
  part file is therefore complete or absent, and **the part files are the ledger**: a shard is
  done exactly when its part file exists.
* Re-running the job skips done shards. If the listing changed (files added or removed, another
  ``--limit`` or ``shard_size``), the done files are read from the part files' ``uri`` column and
  only the others are cut into new shards — no input is ever written twice.
* ``OUTPUT/_job.json`` (the manifest) records what produced the output (model sha256, the
  detector settings that change results, input, shard size); resuming with different settings
  is refused with :class:`OutputMismatchError` unless the caller overwrites.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydetect.storage import TMP_SUFFIX, Location, is_remote_fs, normalise_url, write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST = "_job.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
MANIFEST_VERSION = 1
#: manifest fields that must match for a re-run to resume into an existing output
IDENTITY_FIELDS = ("model_sha256", "input", "settings")


class OutputMismatchError(FileExistsError):
    """The output already holds results of a different job (model, settings or input)."""


@dataclass(frozen=True)
class Shard:
    """A contiguous run of the sorted input paths, written as one part file."""

    id: str
    paths: tuple[str, ...]

    @property
    def part_name(self) -> str:
        return part_name(self.id)


def part_name(shard_id: str) -> str:
    return f"{PART_PREFIX}{shard_id}{PART_SUFFIX}"


def shard_id(paths: Sequence[str]) -> str:
    """Deterministic id of a shard: the first 20 hex digits of sha256 over its paths."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:20]


def plan_shards(paths: Iterable[str], shard_size: int) -> list[Shard]:
    """Cut the sorted, de-duplicated ``paths`` into shards of ``shard_size`` (the last may be
    shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    ordered = sorted(set(paths))
    out = []
    for start in range(0, len(ordered), shard_size):
        chunk = tuple(ordered[start : start + shard_size])
        out.append(Shard(shard_id(chunk), chunk))
    return out


# --- what the output already holds -------------------------------------------------------------


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def existing_parts(fs, out_path: str) -> dict[str, str]:
    """``{shard id: path}`` of the part files directly under ``out_path``."""
    if not fs.exists(out_path):
        return {}
    out = {}
    for p in fs.ls(out_path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
            out[name[len(PART_PREFIX) : -len(PART_SUFFIX)]] = p
    return out


def done_paths(fs, part_paths: Iterable[str], uri_prefix: str) -> set[str]:
    """Input paths recorded in ``part_paths`` (their ``uri`` column, ``uri_prefix`` removed)."""
    done: set[str] = set()
    n = len(uri_prefix)
    for p in part_paths:
        with fs.open(p, "rb") as f:
            uris = pq.read_table(f, columns=["uri"]).column("uri").to_pylist()
        done.update(u[n:] if uri_prefix and u.startswith(uri_prefix) else u for u in uris)
    return done


@dataclass
class ShardPlan:
    """What a (re-)run has to do: ``pending`` shards to run, ``done`` shard ids found."""

    pending: list[Shard]
    done: list[str]
    total_inputs: int
    #: True when the listing no longer matched the part files and done inputs were read back
    reconciled: bool = False
    stale_parts: list[str] = field(default_factory=list)

    @property
    def pending_paths(self) -> list[str]:
        return [p for s in self.pending for p in s.paths]


def plan_resume(fs, out_path: str, paths: Sequence[str], shard_size: int, uri_prefix: str) -> ShardPlan:
    """Shards still to run for ``paths`` given the part files under ``out_path``.

    Fast path: every existing part is one of the planned shards (same listing and shard size):
    the pending shards are the planned ones without a part file. Otherwise the part files that
    are not planned shards are read back and their inputs removed before planning.
    """
    planned = plan_shards(paths, shard_size)
    parts = existing_parts(fs, out_path)
    planned_ids = {s.id for s in planned}
    wanted = {p for s in planned for p in s.paths}
    foreign = {i: p for i, p in parts.items() if i not in planned_ids}
    if not foreign:
        pending = [s for s in planned if s.id not in parts]
        return ShardPlan(pending, sorted(parts), len(wanted))
    done = {p for s in planned if s.id in parts for p in s.paths}
    stale = []
    for i, p in sorted(foreign.items()):
        inputs = done_paths(fs, [p], uri_prefix)
        if not inputs & wanted:
            stale.append(i)
        done |= inputs
    pending = plan_shards((p for p in wanted if p not in done), shard_size)
    return ShardPlan(pending, sorted(parts), len(wanted), reconciled=True, stale_parts=stale)


# --- the manifest ------------------------------------------------------------------------------


def make_manifest(*, model_sha256: str, input: str, settings: dict[str, Any], shard_size: int) -> dict:
    from raydetect.version import __version__

    return {
        "manifest_version": MANIFEST_VERSION,
        "raydetect_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_sha256": model_sha256,
        "input": input,
        "settings": settings,
        "shard_size": shard_size,
        "fingerprint": fingerprint(model_sha256, input, settings),
    }


def fingerprint(model_sha256: str, input: str, settings: dict[str, Any]) -> str:
    blob = json.dumps([model_sha256, input, settings], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(fs, out_path: str) -> dict | None:
    path = _join(out_path, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def check_manifest(old: dict, new: dict, output: str) -> None:
    """Raise :class:`OutputMismatchError` naming what differs between two manifests."""
    diffs = []
    for key in IDENTITY_FIELDS:
        a, b = old.get(key), new.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now")
        elif a != b:
            diffs.append(f"{key}: {a!r} then, {b!r} now")
    if diffs:
        raise OutputMismatchError(
            f"output {output} holds results of a different job ({'; '.join(diffs)}); "
            "use another output or pass --overwrite to replace it"
        )


def write_manifest(fs, out_path: str, manifest: dict) -> None:
    fs.makedirs(out_path, exist_ok=True)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_bytes_atomic(fs, _join(out_path, MANIFEST), data)


def clean_tmp(fs, out_path: str) -> int:
    """Remove temporaries a killed run left next to the part files (local outputs only)."""
    if is_remote_fs(fs) or not os.path.isdir(out_path):
        return 0
    n = 0
    for name in os.listdir(out_path):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            os.remove(os.path.join(out_path, name))
            n += 1
    return n


# --- the writer --------------------------------------------------------------------------------


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass
class WriteStats:
    shards_written: int = 0
    rows_written: int = 0
    duplicates_dropped: int = 0
    write_s: float = 0.0


class ShardWriter:
    """Collects result rows (in any order, from any number of batches) and writes each shard's
    part file once all of its inputs have a row. Rows repeated by a retried task are dropped, so
    every input gets exactly one row.

    ``key`` maps a row's ``uri`` to the input path it belongs to (the inverse of the detector's
    ``uri_prefix``).
    """

    def __init__(self, fs, out_path: str, shards: Sequence[Shard], uri_prefix: str = "") -> None:
        self.fs = fs
        self.out_path = out_path
        self.shards = list(shards)
        self.uri_prefix = uri_prefix
        self._starts = [s.paths[0] for s in self.shards]
        self._members = [set(s.paths) for s in self.shards]
        self._rows: dict[int, list[pa.Table]] = {}
        self._seen: dict[int, set[str]] = {}
        self._written: set[int] = set()
        self.stats = WriteStats()
        for i, s in enumerate(self.shards[:-1]):
            if s.paths[-1] >= self.shards[i + 1].paths[0]:
                raise ValueError("shards must be sorted and disjoint")

    def _path_of(self, uri: str) -> str:
        n = len(self.uri_prefix)
        return uri[n:] if n and uri.startswith(self.uri_prefix) else uri

    def _shard_of(self, path: str) -> int:
        i = bisect.bisect_right(self._starts, path) - 1
        if i < 0 or path not in self._members[i]:
            raise KeyError(f"row for {path!r}, which is in none of this run's shards")
        return i

    def add(self, table: pa.Table) -> list[str]:
        """Take a batch of result rows; return the ids of the shards it completed (written)."""
        groups: dict[int, list[int]] = {}
        for row, uri in enumerate(table.column("uri").to_pylist()):
            path = self._path_of(uri)
            i = self._shard_of(path)
            seen = self._seen.setdefault(i, set())
            if i in self._written or path in seen:
                self.stats.duplicates_dropped += 1
                continue
            seen.add(path)
            groups.setdefault(i, []).append(row)
        completed = []
        if len(groups) == 1 and len(next(iter(groups.values()))) == table.num_rows:
            parts = {next(iter(groups)): table}  # the usual case: the whole batch is one shard's
        else:  # one take puts the rows in shard order; each shard gets a zero-copy slice
            order = [r for rows in groups.values() for r in rows]
            reordered = table.take(pa.array(order, type=pa.int64()))
            parts, offset = {}, 0
            for i, rows in groups.items():
                parts[i] = reordered.slice(offset, len(rows))
                offset += len(rows)
        for i, part in parts.items():
            self._rows.setdefault(i, []).append(part)
            if len(self._seen[i]) == len(self.shards[i].paths):
                self._flush(i)
                completed.append(self.shards[i].id)
        return completed

    def _flush(self, i: int) -> None:
        import time

        t0 = time.perf_counter()
        table = pa.concat_tables(self._rows.pop(i)).sort_by("uri")
        write_bytes_atomic(self.fs, _join(self.out_path, self.shards[i].part_name), table_to_parquet_bytes(table))
        self._written.add(i)
        self.stats.shards_written += 1
        self.stats.rows_written += table.num_rows
        self.stats.write_s += time.perf_counter() - t0

    def incomplete(self) -> dict[str, tuple[int, int]]:
        """``{shard id: (rows seen, inputs)}`` for shards not written yet."""
        return {
            s.id: (len(self._seen.get(i, ())), len(s.paths))
            for i, s in enumerate(self.shards)
            if i not in self._written
        }

    def close(self) -> None:
        """Check that every shard was written; a missing row is an error (nothing partial is
        written, so a re-run redoes exactly the incomplete shards)."""
        missing = self.incomplete()
        if missing:
            sample = ", ".join(f"{k} ({a}/{b} rows)" for k, a, b in ((k, *v) for k, v in list(missing.items())[:5]))
            raise RuntimeError(
                f"{len(missing)} shard(s) did not receive a row for every input: {sample}; "
                "re-run the job to finish them"
            )


# --- the output as one object ------------------------------------------------------------------


class JobOutput:
    """The resumable output of one job at ``location``: the manifest that says which job wrote
    it, the plan of the shards still to run, the shard writer and the totals over its part files.
    :meth:`open` checks an existing output against this job's manifest (or empties it with
    ``overwrite``) before anything is written."""

    def __init__(self, location: Location, manifest: dict) -> None:
        self.location = location
        self.manifest = manifest

    @property
    def fs(self):
        return self.location.fs

    @property
    def path(self) -> str:
        return self.location.path

    @classmethod
    def open(cls, location: Location, manifest: dict, *, overwrite: bool = False, name: str | None = None) -> JobOutput:
        """Record ``manifest`` at ``location`` and return the output. An existing output is
        resumed when its manifest matches (an older manifest's input re-spelled by ``normalise_url``),
        replaced with ``overwrite``, and otherwise refused: :class:`OutputMismatchError` for
        another job's results, ``FileExistsError`` for Parquet files without a manifest."""
        fs, out_path, name = location.fs, location.path, name or location.url
        if fs.exists(out_path):
            if overwrite:
                fs.rm(out_path, recursive=True)
            else:
                old = read_manifest(fs, out_path)
                if old is None:
                    existing = [p for p in fs.find(out_path) if p.endswith(".parquet")]
                    if existing:
                        raise FileExistsError(
                            f"output {name} already holds {len(existing)} Parquet files but no "
                            f"{MANIFEST} (not a resumable raydetect output); choose an empty output "
                            "or pass --overwrite"
                        )
                else:
                    if isinstance(old.get("input"), str):
                        old = {**old, "input": normalise_url(old["input"])}  # written before inputs were normalised
                    check_manifest(old, manifest, name)
                    manifest = {**old, "shard_size": manifest["shard_size"], "resumed": manifest["created"]}
                clean_tmp(fs, out_path)
        write_manifest(fs, out_path, manifest)
        return cls(location, manifest)

    def plan(self, paths: Sequence[str], shard_size: int, uri_prefix: str) -> ShardPlan:
        """The shards still to run for ``paths`` (see :func:`plan_resume`)."""
        return plan_resume(self.fs, self.path, paths, shard_size, uri_prefix)

    def writer(self, shards: Sequence[Shard], uri_prefix: str) -> ShardWriter:
        return ShardWriter(self.fs, self.path, shards, uri_prefix)

    def parts(self) -> list[str]:
        """Paths of the image part files, sorted."""
        return sorted(existing_parts(self.fs, self.path).values())

    def totals(self) -> tuple[int, int]:
        """``(detections, error rows)`` over all image part files."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        parts = self.parts()
        if not parts:
            return 0, 0
        table = pads.dataset(parts, filesystem=self.fs, format="parquet").to_table(columns=["detections", "error"])
        dets = int(pc.sum(pc.list_value_length(table["detections"])).as_py() or 0)
        errors = int(table["error"].is_valid().to_numpy(zero_copy_only=False).sum())
        return dets, errors
