"""Typed configuration, validated once at the edge (CLI, job entrypoint, Serve app).

Errors name the offending field, e.g. ``detector.conf: Input should be less than or
equal to 1 (got 3.0)``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydetect.errors import RaydetectError

EngineName = Literal["auto", "onnxruntime", "openvino", "torch", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8"]

#: bounds of the per-request detection settings, shared by the configs and Serve's query parameters
CONF_BOUNDS: dict[str, float] = {"ge": 0.0, "le": 1.0}
IOU_BOUNDS: dict[str, float] = {"ge": 0.0, "le": 1.0}
MAX_DET_BOUNDS: dict[str, int] = {"ge": 1, "le": 100_000}
Confidence = Annotated[float, Field(**CONF_BOUNDS)]
IoU = Annotated[float, Field(**IOU_BOUNDS)]
MaxDet = Annotated[int, Field(**MAX_DET_BOUNDS)]

DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ConfigError(RaydetectError, ValueError):
    """A configuration value is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: attempts s3fs makes itself for a timed-out call (``s3fs.S3FileSystem.retries``)
S3FS_RETRIES = 5


class StorageConfig(_Strict):
    """How to reach object storage (S3 through s3fs). Empty means the library defaults
    (environment credentials, AWS endpoints)."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    anon: bool = False
    region: str | None = None
    connect_timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="S3: seconds to open a connection")
    read_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="S3: seconds to wait for data on a connection")
    max_attempts: int = Field(3, ge=1, le=50, description="S3: attempts per request (botocore retries, standard mode)")
    max_connections: int = Field(
        64, ge=1, le=1024,
        description="S3: connections per process (botocore max_pool_connections, default 10 there): "
                    "how many GETs of a detector call's files run at once",
    )

    def fsspec_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``."""
        opts: dict[str, Any] = {"anon": self.anon}
        if self.key is not None:
            opts["key"] = self.key
        if self.secret is not None:
            opts["secret"] = self.secret
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        opts["config_kwargs"] = {  # botocore.config.Config: every read and write has a deadline
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
            "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
            "max_pool_connections": self.max_connections,
        }
        return opts

    def request_deadline_s(self) -> float:
        """Upper bound on the time one S3 call can wait on an unresponsive server: s3fs tries a
        timed-out call :data:`S3FS_RETRIES` times, each of up to ``max_attempts`` botocore
        attempts of ``connect_timeout_s + read_timeout_s`` (plus s3fs' back-off, < 2 s)."""
        return S3FS_RETRIES * self.max_attempts * (self.connect_timeout_s + self.read_timeout_s) + 2.0


class TensorRTConfig(_Strict):
    """TensorRT engine options (see :mod:`raydetect.engines.tensorrt`). The batch profile's
    maximum is the detector's ``batch_size``."""

    cache: str | None = Field(
        None, description="Engine cache: local dir or s3:// prefix; None = next to the model"
    )
    workspace_gb: float = Field(4.0, gt=0.0, le=1024.0, description="Builder workspace limit (GiB)")
    opt_batch: int | None = Field(None, ge=1, le=4096, description="Batch size to optimise for; None = max")
    nms: Literal["auto", "inms", "efficient_nms"] = Field(
        "auto", description="NMS inside the network: INMSLayer, EfficientNMS_TRT plugin, or auto"
    )
    cuda_graph: bool = Field(True, description="Replay CUDA graphs where the engine allows it")
    build: bool = Field(True, description="Build the engine when no cached one matches (else: error)")
    lock_timeout_s: float = Field(3600.0, gt=0.0, description="Wait this long for another builder")


class TorchConfig(_Strict):
    """Options of the PyTorch engine (see :mod:`raydetect.engines.torch`)."""

    compile: Literal["auto", "inductor", "off"] = Field(
        "auto",
        description="torch.compile the converted graph (inductor, frozen weights, one CUDA graph per batch "
        "bucket); auto: on CUDA; off: eager CUDA graphs. A failed compile falls back to eager, with the reason",
    )
    compile_batches: tuple[int, ...] | None = Field(
        None,
        description="Batch buckets compiled and captured (a batch is padded to the next); None: 1, 8 and "
        "batch_size",
    )
    cache: str | None = Field(
        None,
        description="Compiled-kernel cache: local dir or s3:// prefix; None = ~/.cache/raydetect/torch",
    )
    lock_timeout_s: float = Field(1800.0, gt=0.0, description="Wait this long for another process compiling")

    @field_validator("compile_batches")
    @classmethod
    def _check_batches(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if not v or any(b < 1 or b > 4096 for b in v):
            raise ValueError(f"must be batch sizes between 1 and 4096 (got {v})")
        return tuple(sorted(set(v)))


class DetectorConfig(_Strict):
    """Everything one :class:`raydetect.detector.Detector` needs."""

    model: str = Field(min_length=1, description="Path or s3:// URL of a YOLO ONNX export")
    engine: EngineName = "auto"
    precision: Precision = "fp32"
    conf: Confidence = Field(0.25, description="Minimum confidence")
    iou: IoU = Field(0.7, description="NMS IoU threshold")
    max_det: MaxDet = Field(300, description="Max detections per image")
    batch_size: int = Field(16, ge=1, le=4096, description="Images per engine call")
    max_pixels: int = Field(40_000_000, ge=1, description="Larger images become error rows")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Larger files become error rows")
    threads: int | None = Field(None, ge=1, le=512, description="CPU engine threads")
    image_decoder: Literal["auto", "nvimgcodec", "nvjpeg", "cpu"] = Field(
        "auto",
        description="JPEG decoder of the GPU data path: nvjpeg (torchvision), nvimgcodec (hardware JPEG "
        "engines, an extra), cpu; auto: nvimgcodec where installed (it leaves the SMs to the engine), else nvjpeg",
    )
    device: str | None = Field(None, description="'cpu', 'cuda' or 'cuda:N'; None picks")
    storage: StorageConfig = StorageConfig()
    tensorrt: TensorRTConfig = TensorRTConfig()
    torch: TorchConfig = TorchConfig()

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str | None) -> str | None:
        if v is None or v == "cpu" or v == "cuda":
            return v
        if v.startswith("cuda:") and v[5:].isdigit():
            return v
        raise ValueError(f"must be 'cpu', 'cuda' or 'cuda:N' (got {v!r})")


DEFAULT_VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm")


def _normalise_extensions(v: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in v)


class VideoConfig(_Strict):
    """Video inputs of the batch job (see :mod:`raydetect.video`): segmenting, sampling and
    motion gating."""

    segment_s: float = Field(
        60.0, gt=0.0, le=86_400.0,
        description="Seconds of video per Ray Data row (a remainder under a quarter of it joins the last segment)",
    )
    fps: float | None = Field(None, gt=0.0, le=1000.0, description="Sample at most F frames per second")
    every: int | None = Field(None, ge=1, description="Keep every N-th frame (index from PTS)")
    gate: bool = Field(False, description="Skip frames that barely differ from the last processed one")
    gate_threshold: float = Field(
        1.0, ge=0.0, le=255.0, description="Mean absolute grey difference (0-255) below which a frame is skipped"
    )
    gate_refresh: int = Field(25, ge=1, le=1_000_000, description="Process at least every K-th sampled frame")
    gate_width: int = Field(64, ge=8, le=1024, description="Width of the grey thumbnail the gate compares")
    decoder: Literal["auto", "cpu", "nvdec"] = Field(
        "auto",
        description="cpu: PyAV on the CPU; nvdec: NVDEC through PyNvVideoCodec, frames stay on the GPU "
        "(CPU when unusable, per segment on failure, the reason in the video summary); auto: nvdec in "
        "actors with a GPU",
    )
    sessions: int = Field(
        4, ge=1, le=32,
        description="Segments one actor decodes at once (one thread and NVDEC session each), their frames "
        "batched together",
    )
    extensions: tuple[str, ...] = DEFAULT_VIDEO_EXTENSIONS

    @field_validator("extensions")
    @classmethod
    def _lower_ext(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _normalise_extensions(v)

    @model_validator(mode="after")
    def _one_sampling(self) -> VideoConfig:
        if self.fps is not None and self.every is not None:
            raise ValueError(f"set fps ({self.fps}) or every ({self.every}), not both")
        return self


class JobConfig(_Strict):
    """The batch job: read images from ``input``, write Parquet to ``output``."""

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    detector: DetectorConfig
    concurrency: int = Field(1, ge=1, le=10_000, description="Max detector actors")
    min_actors: int = Field(1, ge=1, description="Actors kept when idle")
    num_gpus: float = Field(0.0, ge=0.0, le=8.0, description="GPUs per detector actor")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per detector actor")
    actor_concurrency: int = Field(
        1, ge=1, le=16, description="Detector calls running at once in one actor (threads; GPU: overlaps batches)"
    )
    rows_per_call: int | None = Field(
        None, ge=1, le=65_536, description="Rows per detector call; None = detector.batch_size"
    )
    limit: int | None = Field(None, ge=1, description="Process at most N input files")
    extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS
    progress: bool = True
    video: VideoConfig = VideoConfig()
    shard_size: int = Field(
        1000, ge=1, le=1_000_000, description="Input files per output part file (the unit of resume)"
    )
    report: bool = Field(True, description="Write OUTPUT/_report (JSON, Markdown, plot, samples)")
    report_samples: int = Field(4, ge=0, le=100, description="Annotated sample images in the report")
    resource_wait_s: float = Field(
        300.0, ge=0.0, le=86_400.0,
        description="How long to wait for an autoscaler to add nodes that fit the detector actors before "
        "failing (a Ray instance the job started itself cannot grow: no wait)",
    )
    stall_warn_s: float = Field(
        30.0, gt=0.0, le=86_400.0, description="Log 'no progress for N s' every this many seconds without a result"
    )
    stall_timeout_s: float | None = Field(
        None, gt=0.0, le=604_800.0,
        description="Fail the job (resumable) after this long without a result; None: no limit beyond the storage deadlines",
    )
    via_serve: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Send the batches to this running raydetect Serve application (its replicas run "
        "them between online requests) instead of starting detector actors; concurrency, num_cpus "
        "and actor_concurrency then size the pool of handle callers",
    )

    @model_validator(mode="after")
    def _check_via_serve(self) -> JobConfig:
        if self.via_serve is not None and self.num_gpus > 0:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) must be 0 with via_serve: the Serve replicas hold the GPUs"
            )
        return self

    @field_validator("extensions")
    @classmethod
    def _lower_ext(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for e in v:
            e = e.lower()
            out.append(e if e.startswith(".") else "." + e)
        return tuple(out)


class ServeConfig(_Strict):
    """The online endpoint: one Ray Serve deployment (FastAPI ingress) holding a Detector.
    ``host``/``port`` are used by ``raydetect serve`` only; ``serve run``/``serve deploy``
    take them from their own ``http_options``."""

    detector: DetectorConfig
    name: str = Field(
        "raydetect", pattern=r"^[A-Za-z0-9_.-]+$", description="Serve application name (raydetect serve)"
    )
    route_prefix: str = Field("/", pattern=r"^/")
    min_replicas: int = Field(1, ge=0, le=1000, description="Replicas kept when idle")
    max_replicas: int = Field(1, ge=1, le=1000, description="Autoscaling upper bound")
    target_ongoing_requests: float = Field(16.0, gt=0.0, description="Autoscaling target per replica")
    max_ongoing_requests: int = Field(64, ge=1, le=100_000, description="Queue limit per replica")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0.0, le=8.0, description="GPUs per replica; fractions share a GPU")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests merged into one engine call")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="Wait to fill a batch")
    max_files: int = Field(32, ge=1, le=1024, description="Images per /v1/detect/batch request")
    timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="Per request; then 504")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Env var holding the API key"
    )
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    archive_max_batches: int = Field(
        4, ge=1, le=1024,
        description="Archive batches (from jobs run --via-serve) one replica holds at once, queued or "
        "running; more are answered 'busy' and the job retries them (backpressure)",
    )
    archive_fill: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Archive images fill the rest of each online engine batch: 'auto' = where the "
        "engine runs on a GPU (a batch costs about one image there); on a CPU every image adds its "
        "own time, so filling would slow the online request by up to one batch",
    )
    archive_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="An online batch runs beside a running archive-only engine call instead of "
        "waiting for it: 'auto' = where the engine runs on a GPU (the online call's data path on "
        "the highest-priority CUDA stream, so the GPU runs its kernels first); on a CPU both "
        "calls would share the cores",
    )
    archive_max_replicas: int | None = Field(
        None, ge=0, le=1000,
        description="Most replicas archive work alone may keep alive when autoscaling (online load "
        "scales beyond it); None = max_replicas",
    )
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="HTTP ingress of a Ray instance raydetect serve starts: HAProxy with direct "
        "ingress to replicas (Ray's high-throughput mode) or the classic Python proxy",
    )
    ports_base: int | None = Field(
        None, ge=1024, le=65000,
        description="First of this instance's private ports (Serve's fallback proxy, replica ports) "
        "when raydetect serve starts Ray; None: a free block, so instances on one host never share one",
    )
    haproxy_stats_port: int | None = Field(
        None, ge=1, le=65535, description="HAProxy's stats page on host:PORT (HAProxy ingress); None: off"
    )
    haproxy_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="HAProxy's Prometheus exporter on host:PORT; None: off"
    )
    read_timeout_s: float = Field(
        15.0, gt=0.0, le=3600.0,
        description="A client must send its request headers and body within this; else 408",
    )
    max_pixels_in_flight: int = Field(
        160_000_000, ge=1,
        description="Decoded pixels per replica at once (bounds its memory); more wait for room",
    )
    admission_timeout_s: float = Field(
        5.0, ge=0.0, le=3600.0,
        description="How long a request waits for max_pixels_in_flight room; then 503 + Retry-After",
    )

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        """The builder's and the CLI's spellings: detector fields given flat (``model=...``),
        ``replicas`` as ``N`` or ``MIN:MAX``, ``batch_wait_ms`` for ``batch_wait_timeout_s``; a
        relative local model path is resolved against the current directory (replicas run
        elsewhere)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        det = data.pop("detector", None)
        detector = det.model_dump() if isinstance(det, DetectorConfig) else dict(det or {})
        for name in DetectorConfig.model_fields:
            if name in data:
                detector[name] = data.pop(name)
        if "replicas" in data:
            data["min_replicas"], data["max_replicas"] = parse_replicas(data.pop("replicas"))
        if "batch_wait_ms" in data:
            try:
                data["batch_wait_timeout_s"] = float(data.pop("batch_wait_ms")) / 1e3
            except (TypeError, ValueError):
                raise ValueError("batch_wait_ms: expected a number of milliseconds") from None
        model = detector.get("model")
        if isinstance(model, str) and model and "://" not in model and not os.path.isabs(model):
            detector["model"] = os.path.abspath(model)
        data["detector"] = detector
        return data

    @model_validator(mode="after")
    def _check_limits(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        if self.max_pixels_in_flight < self.detector.max_pixels:
            raise ValueError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) must be >= detector.max_pixels "
                f"({self.detector.max_pixels}), or the largest allowed image is never admitted"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if self.max_ongoing_requests < self.max_batch_size + self.archive_max_batches:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}) + archive_max_batches ({self.archive_max_batches}), or "
                "archive batches could keep online requests from filling a batch"
            )
        if self.archive_max_replicas is not None and self.archive_max_replicas > self.max_replicas:
            raise ValueError(
                f"archive_max_replicas ({self.archive_max_replicas}) must not exceed max_replicas "
                f"({self.max_replicas})"
            )
        return self


def parse_replicas(value: str | int) -> tuple[int, int]:
    """``"2"`` → (2, 2); ``"1:4"`` → (1, 4) (autoscaling between them): the ``replicas``
    spelling of :class:`ServeConfig`'s ``min_replicas``/``max_replicas`` (CLI and builder)."""
    text = str(value).strip()
    lo, sep, hi = text.partition(":")
    try:
        low = int(lo)
        high = int(hi) if sep else low
    except ValueError:
        raise ValueError(f"replicas: expected N or MIN:MAX (got {text!r})") from None
    return low, high


class EvalConfig(_Strict):
    """``raydetect eval``: mAP of a detector on a labelled set (YOLO txt or COCO json)."""

    detector: DetectorConfig
    data: str = Field(
        min_length=1, description="YOLO dataset root, images folder or data.yaml; or a COCO .json (path or s3://)"
    )
    split: str = Field("test", min_length=1, description="split of a data.yaml / dataset root")
    images: str | None = Field(None, description="image root for a COCO json (default: its folder)")
    limit: int | None = Field(None, ge=1, description="evaluate N images drawn at random with seed (default: all)")
    seed: int = Field(0, ge=0, description="seed of the limit sample")
    eval_cache: str | None = Field(
        None,
        description="also keep the result in this directory, keyed by model sha256, images and settings, for "
        "raydetect quantize to reuse (default $RAYDETECT_EVAL_CACHE or ~/.cache/raydetect/eval)",
    )
    write_cache: bool = Field(True, description="write the evaluation cache")


class BenchConfig(_Strict):
    """``raydetect bench``: engine-only and end-to-end throughput per batch size."""

    detector: DetectorConfig
    images: str | None = Field(None, description="Image file or folder used as input; None: a synthetic image")
    batch_sizes: tuple[int, ...] = Field((1, 2, 4, 8), min_length=1)
    iterations: int = Field(10, ge=1, le=100_000, description="Timed calls per batch size (at least)")
    min_seconds: float = Field(0.0, ge=0.0, le=3600.0, description="...and at least this long")
    warmup: int = Field(2, ge=0, le=1000, description="Untimed calls per batch size first")

    @field_validator("batch_sizes")
    @classmethod
    def _check_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in v if b < 1 or b > 4096]
        if bad:
            raise ValueError(f"batch sizes must be in 1..4096 (got {bad})")
        return tuple(sorted(set(v)))


class PlanConfig(_Strict):
    """``raydetect plan``: GPUs for ``streams`` × ``fps`` from a measured per-GPU rate."""

    streams: int = Field(ge=1, le=10_000_000, description="Concurrent video streams")
    fps: float = Field(gt=0.0, le=10_000.0, description="Frames per second analysed per stream")
    headroom: float = Field(1.5, ge=1.0, le=100.0, description="Capacity multiplier for peaks and failures")
    latency_ms: float | None = Field(None, gt=0.0, description="Max p99 latency of one batch")
    per_gpu_fps: float | None = Field(None, gt=0.0, description="Measured frames/s of one GPU (else from --bench)")


def _format(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        field, sep, rest = msg.removeprefix("Value error, ").partition(": ")
        if not loc and sep and field.isidentifier():  # a model validator naming its field ("replicas: ...")
            loc, msg = field, rest
        name = f"{prefix}.{loc}" if prefix and loc else (loc or prefix)
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or "(got " in msg else f" (got {got!r})"
        parts.append(f"{name}: {msg}{got_s}")
    return "; ".join(parts)


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``model`` from ``data``; raise :class:`ConfigError` naming the bad fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, prefix)) from None
