"""Engine registry: engines are chosen by name or ``auto`` (tensorrt > torch > onnxruntime)."""

from __future__ import annotations

import importlib

from raydetect.config import DetectorConfig
from raydetect.engines.base import Engine, EngineUnavailableError
from raydetect.model_card import ModelCard

#: name → "module:Class", imported only when used so optional runtimes stay optional.
ENGINES: dict[str, str] = {
    "tensorrt": "raydetect.engines.tensorrt:TensorRTEngine",
    "torch": "raydetect.engines.torch:TorchEngine",
    "onnxruntime": "raydetect.engines.onnxruntime:OnnxRuntimeEngine",
    "openvino": "raydetect.engines.openvino:OpenVINOEngine",
}
#: ``auto`` keeps ONNX Runtime on the CPU, also with openvino installed (issue 18 measured it here:
#: 2-core Xeon with AVX-512 VNNI, benchmarks/results/precision_table.md, interleaved rounds,
#: medians): OpenVINO FP32 is faster at batch 8 (1.20x images/s end to end, 1.17x inference alone)
#: but slower at batch 1 (97.5 vs 62.6 ms: its throughput mode splits the cores into streams, one
#: image uses one), and ``auto`` also serves single-image requests. Ask for ``--engine openvino``
#: for batch work (INT8 QDQ models on it: 1.7x ORT FP32 end to end for the unpruned ORT-PTQ model, 2.7x
#: for the pruned + QAT one, see the table).
AUTO_ORDER = ("tensorrt", "torch", "onnxruntime")

__all__ = ["ENGINES", "Engine", "EngineUnavailableError", "create_engine", "engine_class", "resolve_engine_name"]


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)} or 'auto'")
    module, cls = ENGINES[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailableError(f"engine {name!r} is not available: {e}") from None
    return getattr(mod, cls)


def _why_unavailable(name: str, config: DetectorConfig) -> str | None:
    try:
        cls = engine_class(name)
    except EngineUnavailableError as e:
        return str(e)
    if config.device == "cpu" and cls.input_kind != "numpy":
        return "device 'cpu' was asked for"
    return cls.availability_for(config)


def resolve_engine_name(config: DetectorConfig) -> str:
    """The engine ``config.engine`` means here (``auto`` picks the first that can run)."""
    if config.engine != "auto":
        return config.engine
    reasons = []
    for name in AUTO_ORDER:
        why = _why_unavailable(name, config)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise EngineUnavailableError("no engine can run here: " + "; ".join(reasons))


def create_engine(card: ModelCard, config: DetectorConfig) -> Engine:
    name = resolve_engine_name(config)
    cls = engine_class(name)
    why = cls.availability_for(config)
    if why is not None:
        raise EngineUnavailableError(f"engine {name!r} cannot run here: {why}")
    return cls(card, config)
