"""Cheap answers to "can this process see a CUDA device?", before paying for ``import torch``.

Importing torch (and onnx2torch, torchvision) takes seconds, and ``engine='auto'`` asks the GPU
engines first: on a CPU-only machine every detector actor paid that before ONNX Runtime was
chosen. :func:`no_cuda_reason` answers from the environment and the driver's device nodes only;
when it returns None a device may exist and the caller asks torch."""

from __future__ import annotations

import os
import sys

#: Present whenever an NVIDIA driver is loaded (bare metal and containers given a GPU); /dev/dxg
#: is the GPU of WSL 2.
DRIVER_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/gpus", "/dev/dxg")


def no_cuda_reason(environ=os.environ, platform: str = sys.platform, exists=os.path.exists) -> str | None:
    """Why no CUDA device can be visible here, or None when one may be (torch decides then)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):  # NoDevFiles: Slurm, no GPU
        return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
    if platform.startswith("linux") and not any(exists(p) for p in DRIVER_NODES):
        return "no CUDA device visible (no NVIDIA driver here: /dev/nvidiactl is missing)"
    return None
