"""raydetect: YOLO object detection over archived images and video with Ray, on CPUs and GPUs."""

from raydetect.config import DetectorConfig, JobConfig, StorageConfig
from raydetect.results import Results, read_results
from raydetect.types import Detection, ImageResult

__version__ = "0.1.0"

__all__ = [
    "Detection", "DetectorConfig", "ImageResult", "JobConfig", "Results", "StorageConfig", "__version__",
    "read_results",
]
