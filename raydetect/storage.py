"""Local paths and object storage (s3:// via s3fs) behind one fsspec interface."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import fsspec
from fsspec.core import url_to_fs

from raydetect.config import StorageConfig


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``url``; s3:// URLs get the options of ``storage``."""
    storage = storage or StorageConfig()
    if url.startswith("s3://") or url.startswith("s3a://"):
        fs, path = url_to_fs(url, **storage.fsspec_options())
        return fs, path
    if is_remote(url):
        return url_to_fs(url)
    fs = fsspec.filesystem("file")
    path = url[len("file://"):] if url.startswith("file://") else url
    return fs, os.path.abspath(path)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would write for ``path`` on ``fs``: the filesystem's own scheme
    (``s3://bucket/key``, ``gs://bucket/key``, …) for remote filesystems, the plain path for
    local files. The one place where paths become the ``uri`` of result rows, reports and
    error messages."""
    return fs.unstrip_protocol(path) if is_remote_fs(fs) else path


#: Former name of :func:`to_uri`.
full_url = to_uri


def uri_prefix(fs: fsspec.AbstractFileSystem) -> str:
    """What :func:`to_uri` puts in front of a path on ``fs`` (``"s3://"``, ``"gs://"``, or
    ``""`` for local files): handed to Ray actors that build row URIs from the paths Ray Data
    reads, and stripped again to find an input's path from its row."""
    probe = "/bucket/key"
    uri = to_uri(fs, probe)
    if not uri.endswith(probe):  # to_uri is not scheme + path on this filesystem
        raise ValueError(f"{type(fs).__name__}: URIs are not a prefix + the path ({uri!r} for {probe!r})")
    return uri[: len(uri) - len(probe)]


def is_remote_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def list_files(
    url: str, extensions: Iterable[str], storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """All files under ``url`` (a file, a directory or prefix, recursively) whose
    extension is in ``extensions``, sorted by path. A single file is returned as is."""
    fs, path = filesystem(url, storage)
    exts = tuple(e.lower() for e in extensions)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {url}")
    if fs.isfile(path):
        return fs, [path]
    files = [p for p in fs.find(path) if p.lower().endswith(exts)]
    return fs, sorted(files)


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
