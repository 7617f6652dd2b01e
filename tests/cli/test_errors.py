"""One base class for user-facing errors: the CLI prints the message and exits 2 (3 when
storage did not answer); each error keeps the builtin base its callers already catch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raydetect.config import ConfigError
from raydetect.engine_cache import EngineCacheError
from raydetect.engines.base import EngineUnavailableError
from raydetect.errors import RaydetectError
from raydetect.evaluate import DatasetError
from raydetect.job.run import JobStalledError
from raydetect.model_card import UnsupportedModelError
from raydetect.plan import PlanError
from raydetect.quantize import CalibrationError
from raydetect.resources import InsufficientResourcesError
from raydetect.stages.preprocess import ImageError
from raydetect.storage import StorageUnavailableError
from raydetect.tensorrt.build import TensorRTBuildError
from raydetect.video.probe import VideoError
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("cls", "builtin", "code"),
    [
        (ConfigError, ValueError, 2),
        (UnsupportedModelError, ValueError, 2),
        (EngineUnavailableError, RuntimeError, 2),
        (EngineCacheError, RuntimeError, 2),
        (TensorRTBuildError, RuntimeError, 2),
        (DatasetError, ValueError, 2),
        (CalibrationError, ValueError, 2),
        (PlanError, ValueError, 2),
        (InsufficientResourcesError, RuntimeError, 2),
        (StorageUnavailableError, OSError, 3),
        (JobStalledError, TimeoutError, 3),
    ],
)
def test_user_facing_errors_share_one_base(cls, builtin, code):
    e = cls("what went wrong")
    assert isinstance(e, RaydetectError) and isinstance(e, builtin)
    assert e.exit_code == code and str(e) == "what went wrong"


def test_row_level_errors_are_not_user_facing_exceptions():
    """Bad images and videos become error rows, never a failed command."""
    assert not issubclass(ImageError, RaydetectError) and not issubclass(VideoError, RaydetectError)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "raydetect.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_exits_2_with_the_message(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not an ONNX file")
    r = _cli("bench", "--model", str(bad), "--iterations", "1")  # UnsupportedModelError
    assert r.returncode == 2, r.stderr
    assert f"raydetect bench: error: {bad}: not an ONNX model" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", "--model", str(bad), "--conf", "2")  # ConfigError, naming the field
    assert r.returncode == 2 and "raydetect bench: error: bench.detector.conf" in r.stderr
    assert "Traceback" not in r.stderr
