"""ONNX Runtime CPU engine: the embedded default and the reference for other engines."""

from __future__ import annotations

import os

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.engines.base import Engine, EngineUnavailableError
from raydetect.model_card import ModelCard


def is_quantized(onnx_bytes: bytes) -> bool:
    """True if the graph holds QDQ / integer ops (an INT8 model from ``raydetect quantize``)."""
    import onnx

    m = onnx.load_model_from_string(onnx_bytes)
    qops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"}
    return any(n.op_type in qops for n in m.graph.node)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, card: ModelCard, config: DetectorConfig) -> None:
        super().__init__(card, config)
        import onnxruntime as ort

        quantized = is_quantized(card.onnx_bytes)
        if config.precision == "fp16":
            raise EngineUnavailableError(
                "precision 'fp16' is not supported by the onnxruntime CPU engine; "
                "use fp32, int8 (a model from 'raydetect quantize'), or a GPU engine"
            )
        if config.precision == "int8" and not quantized:
            raise EngineUnavailableError(
                f"precision 'int8' needs an INT8 (QDQ) model; {card.url} is not quantized: "
                "make one with 'raydetect quantize'"
            )
        self.precision = "int8" if quantized else "fp32"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = config.threads or _default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            card.onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"]
        )
        self.threads = so.intra_op_num_threads

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.card.output_name], {self.card.input_name: x})[0]

    def metadata(self) -> dict:
        return {**super().metadata(), "threads": self.threads}


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
