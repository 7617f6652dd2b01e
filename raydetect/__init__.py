"""raydetect: YOLO object detection over archived images and video with Ray, on CPUs and GPUs."""

from raydetect.config import (
    DetectorConfig,
    JobConfig,
    ServeConfig,
    StorageConfig,
    TensorRTConfig,
    TorchConfig,
    VideoConfig,
)
from raydetect.job.results import Results, read_results
from raydetect.types import Detection, ImageResult, ModelIdentity
from raydetect.version import __version__


def __getattr__(name: str):
    """``Detector``, ``run_job`` and ``app_builder`` are exported lazily (PEP 562), so that
    ``import raydetect`` stays light (no Ray, torch or ONNX Runtime until one is used)."""
    if name == "Detector":
        from raydetect.detector import Detector

        return Detector
    if name == "run_job":
        from raydetect.job.run import run_job

        return run_job
    if name == "app_builder":
        from raydetect.serve.app import app_builder

        return app_builder
    raise AttributeError(f"module 'raydetect' has no attribute {name!r}")

__all__ = [
    "Detection", "Detector", "DetectorConfig", "ImageResult", "JobConfig", "ModelIdentity", "Results", "ServeConfig",
    "StorageConfig", "TensorRTConfig", "TorchConfig", "VideoConfig", "__version__", "app_builder",
    "read_results", "run_job",
]
