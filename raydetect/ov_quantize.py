"""INT8 post-training quantization with NNCF (``raydetect nncf-quantize``): the OpenVINO path.

NNCF quantizes the ONNX export itself (its ONNX backend) into a QDQ ONNX model, so the same
file runs on ``--engine openvino`` (INT8 kernels; what NNCF tunes for: symmetric INT8
activations, per-channel weights, OpenVINO's CPU fusion patterns) and on ONNX Runtime, and
:class:`~raydetect.model_card.ModelCard` reads it like any other export. Calibration images go
through the production decode + letterbox (:func:`raydetect.quantize.select_calibration_images`)
and must come from training or validation images, never the test split. The head's float tail
(:func:`raydetect.quantize.float_tail_nodes`: the last conv of each head branch, the DFL and the
box decode) stays in float, as in ``raydetect quantize``.

Known problem (issue 18, OpenVINO 2026.4.1, NNCF 3.4.0): ONNX Runtime runs the model this writes
accurately, but OpenVINO computes wrong scores from it (mAP@0.5 23.8 instead of 56.8 on the defect
test split); it matches ONNX Runtime once the activation Q/DQ pairs on the SiLU outputs are removed.
Check a model with ``raydetect eval --engine openvino`` before deploying it there.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raydetect.config import validate
from raydetect.errors import RaydetectError

log = logging.getLogger(__name__)


class NNCFQuantizeError(RaydetectError, ValueError):
    """The model or the calibration images cannot be quantized; the message says why."""


class NNCFQuantizeConfig(BaseModel):
    """Options of :func:`nncf_quantize` (the CLI flags are derived from these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="FP32 YOLO ONNX export (path)")
    calib: str = Field(min_length=1, description="folder of calibration images (training or validation images)")
    out: str = Field(min_length=1, description="INT8 QDQ ONNX model to write")
    images: int = Field(300, ge=1, le=100_000, description="calibration images")
    preset: Literal["performance", "mixed"] = Field(
        "mixed", description="performance: symmetric activations; mixed: asymmetric activations (NNCF presets)")
    float_tail: bool = Field(True, description="keep the head's final convs and the decode in float")
    fast_bias_correction: bool = Field(True, description="NNCF's bias correction after quantization")
    seed: int = Field(0, ge=0, description="seed of the calibration image choice")
    calib_batch: int = Field(1, ge=1, le=64, description="images per calibration run")


def nncf_quantize(cfg: NNCFQuantizeConfig | dict[str, Any]) -> dict[str, Any]:
    """Quantize ``cfg.model`` and write ``cfg.out``; returns a small report."""
    import nncf
    import onnx

    from raydetect.config import StorageConfig
    from raydetect.model_card import ModelCard
    from raydetect.quantize import (
        declared_io,
        float_tail_nodes,
        restore_declared_io,
        select_calibration_images,
    )

    if not isinstance(cfg, NNCFQuantizeConfig):
        cfg = validate(NNCFQuantizeConfig, cfg, "nncf-quantize")
    parts = os.path.normpath(os.path.abspath(cfg.calib)).split(os.sep)
    if "test" in parts:
        raise NNCFQuantizeError(f"{cfg.calib}: calibration images must not come from a test split")
    t0 = time.perf_counter()
    raw = open(cfg.model, "rb").read()
    card = ModelCard.from_bytes(raw, cfg.model)
    model = onnx.load_model_from_string(card.onnx_bytes)  # dynamic batch
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    calib = select_calibration_images(cfg.calib, cfg.images, seed=cfg.seed, storage=StorageConfig())
    if not calib.encoded:
        raise NNCFQuantizeError(f"{cfg.calib}: no readable calibration images")
    tensors = list(calib.tensors(card.imgsz, cfg.calib_batch, 10**9, 10**9))
    ignored = float_tail_nodes(model) if cfg.float_tail else []
    preset = nncf.QuantizationPreset.MIXED if cfg.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    q = nncf.quantize(
        model, nncf.Dataset(tensors, lambda x: {card.input_name: x}), subset_size=len(tensors) * cfg.calib_batch,
        preset=preset, target_device=nncf.TargetDevice.CPU, fast_bias_correction=cfg.fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
    )
    restore_declared_io(q, declared_io(card.onnx_bytes, card))
    meta = {p.key: p.value for p in q.metadata_props}
    meta.update({"raydetect_quantized_by": f"nncf {nncf.__version__} post-training ({cfg.preset})",
                 "raydetect_calibration": f"{len(calib.encoded)} images from {cfg.calib} (seed {cfg.seed})"})
    del q.metadata_props[:]
    for k, v in meta.items():
        q.metadata_props.add(key=k, value=v)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    onnx.save(q, cfg.out)
    return {"model": cfg.model, "out": cfg.out, "calibration_images": len(calib.encoded),
            "unreadable": len(calib.unreadable), "float_tail": ignored, "preset": cfg.preset,
            "fp32_bytes": len(raw), "int8_bytes": os.path.getsize(cfg.out), "seconds": time.perf_counter() - t0,
            "nncf": nncf.__version__}
