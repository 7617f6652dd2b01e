"""The cheap CUDA probe that lets ``engine='auto'`` pick ONNX Runtime on a CPU machine without
importing torch (seconds per detector actor before it was added)."""

from __future__ import annotations

import subprocess
import sys

from raydetect.gpu_probe import DRIVER_NODES, no_cuda_reason
from tests.conftest import MODELS, REPO


def test_reasons_from_the_environment_and_the_driver_nodes():
    none = lambda p: False  # noqa: E731
    every = lambda p: True  # noqa: E731
    assert "CUDA_VISIBLE_DEVICES=''" in no_cuda_reason({"CUDA_VISIBLE_DEVICES": ""}, "linux", every)
    assert "'-1'" in no_cuda_reason({"CUDA_VISIBLE_DEVICES": "-1"}, "linux", every)
    assert "NoDevFiles" in no_cuda_reason({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "linux", every)
    assert "no NVIDIA driver" in no_cuda_reason({}, "linux", none)
    assert no_cuda_reason({}, "linux", every) is None  # a driver: torch decides
    assert no_cuda_reason({"CUDA_VISIBLE_DEVICES": "0,1"}, "linux", lambda p: p == "/dev/nvidiactl") is None
    assert no_cuda_reason({}, "win32", none) is None  # no device nodes to look at elsewhere
    assert "/dev/dxg" in DRIVER_NODES  # WSL 2


def test_auto_on_a_machine_without_cuda_does_not_import_torch():
    code = (
        "import sys\n"
        "from raydetect.config import DetectorConfig\n"
        "from raydetect.detector import Detector\n"
        f"d = Detector(DetectorConfig(model={str(MODELS / 'yolov8n-random.onnx')!r}))\n"
        "print(d.info()['engine'], 'torch' in sys.modules, 'onnx2torch' in sys.modules)\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["onnxruntime", "False", "False"], out.stdout
