"""Local paths and object storage (s3:// via s3fs) behind one fsspec interface."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs

from raydetect.config import StorageConfig
from raydetect.errors import RaydetectError

log = logging.getLogger(__name__)


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


#: suffix of the hidden temporaries :func:`write_bytes_atomic` writes next to a local file
TMP_SUFFIX = ".tmp"


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    if is_remote_fs(fs):
        fs.pipe_file(path, data)  # one PUT (or a multipart upload, visible only once completed)
        return
    directory, name = path.rsplit("/", 1)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex}{TMP_SUFFIX}"  # hidden: readers skip it
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass(frozen=True)
class Location:
    """One place in storage: a filesystem, a path on it, and the URL a user writes for it
    (``s3://b/k``, ``gs://b/k``, or a local path). Reads, atomic writes and joins go through it, and
    the paths under it become URIs with :meth:`uri_of` (the one path → URI rule, :func:`to_uri`)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def of(cls, url: str, storage: StorageConfig | None = None) -> Location:
        return cls(*filesystem(url, storage))

    @property
    def url(self) -> str:
        return to_uri(self.fs, self.path)

    @property
    def uri_prefix(self) -> str:
        """What :meth:`uri_of` puts in front of a path of this filesystem."""
        return uri_prefix(self.fs)

    @property
    def remote(self) -> bool:
        return is_remote_fs(self.fs)

    def uri_of(self, path: str) -> str:
        return to_uri(self.fs, path)

    def join(self, *names: str) -> Location:
        return Location(self.fs, "/".join([self.path.rstrip("/"), *names]))

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open(self.path, "rb") as f:
            return f.read()

    def write_atomic(self, data: bytes) -> None:
        """Write so that the file is either absent or complete (see :func:`write_bytes_atomic`)."""
        write_bytes_atomic(self.fs, self.path, data)

    def __str__(self) -> str:
        return self.url


def is_remote_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def normalise_url(url: str) -> str:
    """The canonical spelling of an input/output location, so ``./in/``, ``in`` and
    ``file:///abs/in`` name one job: local paths absolute and normalised, ``s3a://`` as
    ``s3://``, no trailing slash."""
    if url.startswith("s3a://"):
        url = "s3://" + url[len("s3a://"):]
    if is_remote(url):
        scheme, rest = url.split("://", 1)
        rest = re.sub(r"/{2,}", "/", rest).rstrip("/")
        return f"{scheme}://{rest}"
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(path)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def show(path: str) -> str:
    """``path`` for a log line or an error row: control characters escaped (``\\n``, ``\\t``,
    ``\\x1b``), bytes that are not UTF-8 (surrogate-escaped by ``os``) as ``\\xNN``."""
    if has_surrogates(path):
        path = os.fsencode(path).decode("utf-8", "backslashreplace")
    return path.translate(_CONTROL)


def has_surrogates(path: str) -> bool:
    try:
        path.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


@dataclass
class InputListing:
    """Everything under an input location, sorted: ``files`` to run, ``errors`` (entries that
    look like inputs but cannot be read: ``{path: reason}``; they get error rows), and
    ``skipped`` (other entries, counted per extension)."""

    fs: fsspec.AbstractFileSystem
    files: list[str]
    errors: dict[str, str] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)

    def skipped_lines(self) -> list[str]:
        return [f"skipped {n} entr{'y' if n == 1 else 'ies'} with extension {ext}" for ext, n in sorted(self.skipped.items())]


def _ext_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    ext = os.path.splitext(base)[1].lower()
    return show(ext) if ext else "(none)"


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _scan_local(root: str, exts: tuple[str, ...], out: InputListing) -> None:
    """Walk ``root`` with ``lstat``/``stat`` only (a FIFO is never opened: it would block);
    directories, symlinked ones included, are listed once each (loops and second links to a
    directory are skipped and logged)."""
    st = os.stat(root)
    visited = {(st.st_dev, st.st_ino)}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError as e:
            log.warning("cannot list directory %s: %s", show(d), e.strerror or e)
            out.skipped["(unlistable directory)"] += 1
            continue
        for e in entries:
            path = e.path
            like = e.name.lower().endswith(exts)
            try:
                st = os.stat(path)  # follows links
            except OSError as err:
                reason = "broken symbolic link (its target does not exist)" if e.is_symlink() else (
                    f"cannot stat: {err.strerror or err}")
                if getattr(err, "errno", None) == 40:  # ELOOP
                    reason = "symbolic link loop"
                if like:
                    out.errors[path] = reason
                else:
                    out.skipped[_ext_key(e.name)] += 1
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                if like:
                    out.errors[path] = "a directory, not an image file (its entries are listed on their own)"
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    log.warning("not listing %s again: directory already listed (symlink loop or second link)", show(path))
                    out.skipped["(directory listed already)"] += 1
                    continue
                visited.add(key)
                stack.append(path)
            elif stat.S_ISREG(mode):
                if not like:
                    out.skipped[_ext_key(e.name)] += 1
                elif not os.access(path, os.R_OK):
                    out.errors[path] = "permission denied: cannot read the file"
                elif has_surrogates(path):
                    out.errors[path] = "file name is not valid UTF-8 (shown escaped): rename it to process it"
                else:
                    out.files.append(path)
            elif like:
                out.errors[path] = f"not a regular file: {_KINDS.get(stat.S_IFMT(mode), 'a special file')} (not opened)"
            else:
                out.skipped[_ext_key(e.name)] += 1


def scan_inputs(url: str, extensions: Iterable[str], storage: StorageConfig | None = None) -> InputListing:
    """List ``url`` (a file, a directory or prefix, recursively) without ever aborting on an
    entry: see :class:`InputListing`. Raises ``FileNotFoundError`` only when ``url`` itself
    does not exist."""
    fs, path = filesystem(url, storage)
    exts = tuple(e.lower() for e in extensions)
    out = InputListing(fs, [])
    if is_remote_fs(fs):
        if not fs.exists(path):
            raise FileNotFoundError(f"input not found: {url}")
        if fs.isfile(path):
            out.files.append(path)
            return out
        for p, info in fs.find(path, detail=True).items():
            if info.get("type", "file") != "file" or p.endswith("/"):
                continue
            if p.lower().endswith(exts):
                out.files.append(p)
            else:
                out.skipped[_ext_key(p)] += 1
    else:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"input not found: {show(url)}")
        try:
            st = os.stat(path)
        except OSError as e:
            raise FileNotFoundError(f"input not found: {show(url)} ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode):
            _scan_local(path, exts, out)
        elif stat.S_ISREG(st.st_mode) and not has_surrogates(path):
            out.files.append(path)
        else:
            raise FileNotFoundError(f"input is not a regular file or directory: {show(url)}")
    out.files.sort()
    out.errors = dict(sorted((show(p) if has_surrogates(p) else p, r) for p, r in out.errors.items()))
    for line in out.skipped_lines():
        log.info("%s under %s", line, show(url))
    return out


def list_files(
    url: str, extensions: Iterable[str], storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """All readable files under ``url`` whose extension is in ``extensions``, sorted (see
    :func:`scan_inputs`, which also reports the entries that cannot be read)."""
    listing = scan_inputs(url, extensions, storage)
    for p, reason in listing.errors.items():
        log.warning("not an input: %s: %s", show(p), reason)
    return listing.fs, listing.files


def read_files(paths: list[str], fs: fsspec.AbstractFileSystem) -> tuple[list[bytes], dict[int, str]]:
    """The bytes of ``paths`` on ``fs``, and the reasons of those that could not be read
    (``{index: reason}``; their bytes are empty). The files are fetched together: fsspec's
    ``cat_ranges`` runs the requests concurrently on s3fs and the other async filesystems
    (one GET per file, no HEAD), one after another on local disk; names are never globbed.
    Storage that cannot be reached raises instead (:func:`storage_failure`): the job stops,
    to be resumed, rather than writing error rows for files that are fine."""
    got = fs.cat_ranges(list(paths), None, None, on_error="return")
    data: list[bytes] = []
    errors: dict[int, str] = {}
    for i, g in enumerate(got):
        if isinstance(g, BaseException):
            if storage_failure(g) is not None:
                raise g
            data.append(b"")
            first = str(g).splitlines()[0] if str(g) else ""
            errors[i] = f"cannot read: {type(g).__name__}" + (f": {first}" if first else "")
        else:
            data.append(g)
    return data, errors


def read_batch(batch: dict, fs: fsspec.AbstractFileSystem, uri_prefix: str = "") -> tuple[list[bytes], list[str], dict[str, str]]:
    """A job's batch of inputs, ``{"path": [...]}``, read (:func:`read_files`): the bytes and
    URIs (``uri_prefix`` + path) of the files that could be read, and ``{uri: reason}`` for
    the others (each becomes an error row)."""
    paths = [str(p) for p in batch["path"]]
    data, errors = read_files(paths, fs)
    images = [d for i, d in enumerate(data) if i not in errors]
    uris = [uri_prefix + p for i, p in enumerate(paths) if i not in errors]
    return images, uris, {uri_prefix + paths[i]: reason for i, reason in errors.items()}


# --- storage failures ------------------------------------------------------------------------

#: botocore / aiohttp / OS messages that mean "the storage endpoint is unreachable or stalled"
_UNREACHABLE = re.compile(
    r"(Could not connect to the endpoint URL[^\n]*|Connect timeout on endpoint URL[^\n]*|"
    r"Read timeout on endpoint URL[^\n]*|Connection was closed before we received a valid response[^\n]*|"
    r"Cannot connect to host[^\n]*|Connection refused[^\n]*|Server disconnected[^\n]*)"
)


class StorageUnavailableError(RaydetectError, OSError):
    """Object storage did not answer within its deadlines; the message is one line saying
    what failed, where, and how to resume."""

    exit_code = 3


def storage_failure(exc: BaseException) -> str | None:
    """The one-line reason if ``exc`` (or what caused it, also inside a Ray task error) is
    storage being unreachable or timing out; None otherwise."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        name = type(e).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError", "FSTimeoutError"):
            return f"{name}: {str(e).splitlines()[0] if str(e) else name}"
        m = _UNREACHABLE.search(str(e))
        if m:
            return m.group(1).strip()
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
