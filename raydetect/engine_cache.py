"""The engine cache: TensorRT engines built once per (model, GPU type, TensorRT version,
precision, input size, batch profile, NMS settings) and reused.

An entry is two files in the cache directory (local or s3://, through fsspec): the serialized
engine ``<stem>.engine`` and a JSON sidecar ``<stem>.json`` holding the key fields, the
engine's sha256 and build facts. The file name embeds a digest of all key fields, so an
engine for another GPU or TensorRT version never collides with this one; the sidecar lets a
mismatch be explained in words. A local file lock (``filelock``) makes several actors on one
node build an entry once: the first builds, the others wait and then load it. A stale or
corrupt entry (sidecar disagrees, sha256 differs, TensorRT cannot deserialize it) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from raydetect.config import StorageConfig
from raydetect.engines.base import EngineUnavailableError
from raydetect.storage import filesystem, is_remote

log = logging.getLogger(__name__)

#: Bump when the network recipe (the NMS tail, builder flags) changes: old entries then miss.
RECIPE_VERSION = 1
SIDECAR_FORMAT = 1
#: Fields that depend on the machine rather than on the model or the settings.
ENVIRONMENT_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability")

T = TypeVar("T")


class EngineCacheError(EngineUnavailableError):
    """No usable engine in the cache and building is not allowed, or the cache is unusable."""


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    imgsz: tuple[int, int]
    batch_profile: tuple[int, int, int]  # min, opt, max
    nms: str
    nms_params: tuple[tuple[str, float | int], ...] = ()
    recipe: int = RECIPE_VERSION

    def fields(self) -> dict[str, Any]:
        d = asdict(self)
        d["imgsz"] = list(self.imgsz)
        d["batch_profile"] = list(self.batch_profile)
        d["nms_params"] = {k: v for k, v in self.nms_params}
        return d

    @classmethod
    def from_fields(cls, d: dict[str, Any]) -> EngineKey:
        return cls(
            onnx_sha256=str(d["onnx_sha256"]),
            tensorrt_version=str(d["tensorrt_version"]),
            gpu_name=str(d["gpu_name"]),
            compute_capability=str(d["compute_capability"]),
            precision=str(d["precision"]),
            imgsz=(int(d["imgsz"][0]), int(d["imgsz"][1])),
            batch_profile=tuple(int(x) for x in d["batch_profile"]),  # type: ignore[arg-type]
            nms=str(d["nms"]),
            nms_params=tuple(sorted(dict(d.get("nms_params") or {}).items())),
            recipe=int(d.get("recipe", 0)),
        )

    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def file_stem(self) -> str:
        """Readable and unique: model hash, precision, size, max batch, GPU arch, TensorRT
        version, and a digest of every field."""
        h, w = self.imgsz
        return (
            f"{self.onnx_sha256[:12]}_{self.precision}_{h}x{w}_b{self.batch_profile[2]}"
            f"_sm{self.compute_capability.replace('.', '')}_trt{_slug(self.tensorrt_version)}"
            f"_{self.digest()[:16]}"
        )


def make_key(
    *,
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int] | str,
    precision: str,
    imgsz: tuple[int, int],
    batch_profile: tuple[int, int, int],
    nms: str,
    nms_params: dict[str, float | int] | None = None,
) -> EngineKey:
    cc = compute_capability if isinstance(compute_capability, str) else f"{compute_capability[0]}.{compute_capability[1]}"
    return EngineKey(
        onnx_sha256=onnx_sha256,
        tensorrt_version=str(tensorrt_version),
        gpu_name=str(gpu_name),
        compute_capability=cc,
        precision=precision,
        imgsz=(int(imgsz[0]), int(imgsz[1])),
        batch_profile=(int(batch_profile[0]), int(batch_profile[1]), int(batch_profile[2])),
        nms=nms,
        nms_params=tuple(sorted((nms_params or {}).items())),
    )


def describe_mismatch(found: dict[str, Any], wanted: EngineKey) -> list[str]:
    """Human-readable differences between a cached entry's key fields and the key needed."""
    want = wanted.fields()
    out = []
    for name, value in want.items():
        have = found.get(name)
        if have != value:
            what = "built for" if name in ENVIRONMENT_FIELDS else "has"
            out.append(f"{name}: entry {what} {have!r}, this run needs {value!r}")
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-") or "x"


def cache_dir_for(model_url: str, cache_url: str | None) -> str:
    """The cache directory: ``cache_url`` when given, else the directory holding the model
    (local or s3://)."""
    if cache_url:
        return cache_url.rstrip("/") or cache_url
    if is_remote(model_url):
        head, _, _ = model_url.rstrip("/").rpartition("/")
        return head
    return str(Path(model_url).expanduser().resolve().parent)


def local_lock_dir() -> str:
    return os.environ.get("RAYDETECT_LOCK_DIR") or str(Path.home() / ".cache" / "raydetect" / "locks")


def lock_path_for(cache_dir: str, stem: str, lock_dir: str | None = None) -> str:
    """Where the build lock of ``stem`` lives: beside the entry for a local cache, in a local
    lock directory for a remote one (the lock only has to serialise actors of one node;
    different nodes may each build, and their identical uploads do not conflict)."""
    if is_remote(cache_dir):
        digest = hashlib.sha256(f"{cache_dir}/{stem}".encode()).hexdigest()[:16]
        return str(Path(lock_dir or local_lock_dir()) / f"{stem}.{digest}.lock")
    return str(Path(cache_dir) / f"{stem}.lock")


def timing_cache_name(tensorrt_version: str, gpu_name: str, compute_capability: str) -> str:
    """Timing caches are specific to a GPU and TensorRT version (not to a model)."""
    return f"timing_{_slug(gpu_name)}_sm{compute_capability.replace('.', '')}_trt{_slug(tensorrt_version)}.cache"


@dataclass
class CacheResult(Generic[T]):
    value: T
    status: str  # "hit" | "built" | "rebuilt"
    engine_url: str
    reason: str = ""
    build_seconds: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class EngineCache:
    """Engine entries under one directory (local path or s3:// prefix)."""

    def __init__(
        self,
        directory: str,
        storage: StorageConfig | None = None,
        lock_dir: str | None = None,
        lock_timeout_s: float = 3600.0,
        what: str = "TensorRT engine",
    ) -> None:
        self.what = what  # what an entry is, in log lines and errors
        self.url = directory
        self.storage = storage
        self.fs, self.path = filesystem(directory, storage)
        self.remote = is_remote(directory)
        self.lock_dir = lock_dir
        self.lock_timeout_s = lock_timeout_s

    # --- paths --------------------------------------------------------------------------
    def _join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def _url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def engine_url(self, key: EngineKey) -> str:
        return self._url(key.file_stem() + ".engine")

    def _ensure_dir(self) -> None:
        if self.remote:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"not writable: {self.path}")
        except OSError as e:
            raise EngineCacheError(
                f"cannot use {self.url} as the {self.what} cache ({e}); set "
                f"{'tensorrt.cache (--trt-cache)' if self.what == 'TensorRT engine' else 'its cache setting'} "
                "to a writable local directory or an s3:// prefix"
            ) from None

    def _lock(self, stem: str):
        from filelock import FileLock

        path = lock_path_for(self.url if self.remote else self.path, stem, self.lock_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return FileLock(path, timeout=self.lock_timeout_s)

    # --- entries ------------------------------------------------------------------------
    def read_entry(self, key: EngineKey) -> tuple[bytes | None, dict | None]:
        stem = key.file_stem()
        eng, side = self._join(stem + ".engine"), self._join(stem + ".json")
        self._fresh()
        meta = None
        if self.fs.exists(side):
            try:
                meta = json.loads(self.fs.cat_file(side))
            except (ValueError, OSError) as e:
                log.warning("unreadable engine sidecar %s: %s", self._url(stem + ".json"), e)
                meta = {}
        blob = self.fs.cat_file(eng) if self.fs.exists(eng) else None
        return blob, meta

    def write_entry(self, key: EngineKey, blob: bytes, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        stem = key.file_stem()
        meta = {
            "format": SIDECAR_FORMAT,
            "key": key.fields(),
            "digest": key.digest(),
            "engine_sha256": hashlib.sha256(blob).hexdigest(),
            "engine_bytes": len(blob),
            "created_unix": time.time(),
            **(extra or {}),
        }
        self._put(stem + ".engine", blob)
        # the sidecar goes last: its presence marks a complete entry
        self._put(stem + ".json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return meta

    def _fresh(self) -> None:
        """Forget cached listings (s3fs keeps them): another process may have just written."""
        if self.remote:
            self.fs.invalidate_cache(self.path)

    def _put(self, name: str, data: bytes) -> None:
        path = self._join(name)
        if self.remote:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def entry_problem(self, key: EngineKey, blob: bytes | None, meta: dict | None) -> str | None:
        """Why an entry cannot be used (None if it can, as far as files tell)."""
        if blob is None and meta is None:
            return "no cached engine"
        if blob is None:
            return "sidecar without engine file"
        if meta is None:
            return "engine file without sidecar (incomplete write?)"
        if meta.get("format") != SIDECAR_FORMAT or "key" not in meta:
            return "unreadable or old-format sidecar"
        diffs = describe_mismatch(meta["key"], key)
        if diffs:
            return "stale entry: " + "; ".join(diffs)
        if meta.get("engine_sha256") != hashlib.sha256(blob).hexdigest():
            return "corrupt entry: engine sha256 differs from its sidecar"
        return None

    def candidates(self, key: EngineKey) -> list[dict[str, Any]]:
        """Key fields of other entries for the same model and precision (to explain why none
        fits this machine)."""
        self._fresh()
        try:
            names = self.fs.ls(self.path, detail=False)
        except (FileNotFoundError, OSError):
            return []
        prefix = f"{key.onnx_sha256[:12]}_{key.precision}_"
        out = []
        for p in sorted(names):
            base = p.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(prefix) and base.endswith(".json"):
                try:
                    meta = json.loads(self.fs.cat_file(p))
                    out.append(meta.get("key", {}))
                except (ValueError, OSError):
                    continue
        return out

    def no_engine_message(self, key: EngineKey, reason: str) -> str:
        lines = [
            f"no usable TensorRT engine in {self.url} for this machine ({reason}) and building is "
            "disabled (tensorrt.build=false)."
        ]
        others = [c for c in self.candidates(key) if c and c != key.fields()]
        if others:
            lines.append("Engines there for this model and precision were built for:")
            for c in others:
                diffs = describe_mismatch(c, key)
                lines.append(
                    f"  - {c.get('gpu_name')!r} sm{c.get('compute_capability')} TensorRT "
                    f"{c.get('tensorrt_version')}: " + "; ".join(diffs)
                )
        lines.append(
            f"Build one on a machine with this GPU ({key.gpu_name}, sm{key.compute_capability}) and "
            f"TensorRT {key.tensorrt_version}: raydetect build --model ... --cache {self.url}"
        )
        return "\n".join(lines)

    def load_or_build(
        self,
        key: EngineKey,
        build: Callable[[], bytes | tuple[bytes, dict[str, Any]]],
        load: Callable[[bytes], T | None],
        *,
        allow_build: bool = True,
        force: bool = False,
    ) -> CacheResult[T]:
        """The deserialized engine for ``key``: from the cache, or built (under the lock) and
        stored. ``load`` returns None or raises when it cannot deserialize the bytes."""
        self._ensure_dir()
        stem = key.file_stem()
        url = self._url(stem + ".engine")
        # fast path without the lock: a complete, valid entry
        if not force:
            hit = self._try_load(key, load)
            if isinstance(hit, CacheResult):
                return hit
        with self._lock(stem):
            reason = "forced rebuild"
            if not force:
                hit = self._try_load(key, load)  # another process may have built it meanwhile
                if isinstance(hit, CacheResult):
                    return hit
                reason = hit
            if not allow_build:
                raise EngineCacheError(self.no_engine_message(key, reason))
            status = "built" if reason == "no cached engine" else "rebuilt"
            if status == "rebuilt":
                log.warning("rebuilding %s %s: %s", self.what, url, reason)
            else:
                log.info("building %s %s (this takes minutes, once per GPU type)", self.what, url)
            t0 = time.perf_counter()
            built = build()
            seconds = time.perf_counter() - t0
            blob, extra = built if isinstance(built, tuple) else (built, {})
            meta = self.write_entry(key, blob, {"build_seconds": seconds, **extra})
            value = load(blob)
            if value is None:
                raise EngineCacheError(f"the engine just built for {url} could not be deserialized")
            return CacheResult(value, status, url, reason, seconds, meta)

    def _try_load(self, key: EngineKey, load: Callable[[bytes], T | None]) -> CacheResult[T] | str:
        blob, meta = self.read_entry(key)
        problem = self.entry_problem(key, blob, meta)
        if problem is not None:
            return problem
        assert blob is not None and meta is not None
        try:
            value = load(blob)
        except Exception as e:
            return f"cached engine failed to deserialize ({type(e).__name__}: {e})"
        if value is None:
            return "cached engine failed to deserialize (TensorRT returned no engine)"
        return CacheResult(value, "hit", self._url(key.file_stem() + ".engine"), "", None, meta)

    # --- timing cache -------------------------------------------------------------------
    def read_timing_cache(self, name: str) -> bytes:
        path = self._join(name)
        try:
            return self.fs.cat_file(path) if self.fs.exists(path) else b""
        except OSError as e:
            log.warning("ignoring unreadable timing cache %s: %s", self._url(name), e)
            return b""

    def write_timing_cache(self, name: str, data: bytes) -> None:
        if data:
            self._put(name, data)
