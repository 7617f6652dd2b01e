"""Shared fixtures: the data in ../shared/data, a local Ray instance, a local S3 server."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
MODELS = DATA / "models"
IMAGES = DATA / "images"
DEFECTS = DATA / "defects"

# Evaluations that `eval`/`quantize` cache for reuse go to this session's own folder, so tests
# neither read nor fill the user's ~/.cache/raydetect/eval (subprocesses inherit it).
os.environ.setdefault("RAYDETECT_EVAL_CACHE", tempfile.mkdtemp(prefix="rdt-eval-cache-"))

S3_KEY = "testing"
S3_SECRET = "testing"
#: Read deadline of the session's Serve instance (HAProxy) and of the test apps (replicas).
SERVE_READ_TIMEOUT_S = 4.0


def photo_paths() -> list[Path]:
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"test data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray instance for the session (never an existing cluster), with
    the Serve ingress ``raydetect serve`` uses by default (HAProxy to the replicas)."""
    import tempfile

    import ray

    from raydetect.serve.ingress import block_size, isolation_env, reserve_ports, use_ingress

    if not ray.is_initialized():
        use_ingress("haproxy", drain_s=1.0)
        # Private ports and HAProxy files, as `raydetect serve` has: the suite never meets
        # another Serve instance on this host (HAProxy's read deadline: SERVE_READ_TIMEOUT_S).
        private = Path(tempfile.mkdtemp(prefix="rdt-"))
        os.environ.update(isolation_env(reserve_ports(block_size(4)), 4, private,
                                        read_timeout_s=SERVE_READ_TIMEOUT_S))
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server):
    from raydetect.config import StorageConfig

    return StorageConfig(endpoint_url=s3_server, key=S3_KEY, secret=S3_SECRET)


@pytest.fixture
def s3fs_client(s3_storage):
    import s3fs

    return s3fs.S3FileSystem(**s3_storage.fsspec_options())
