"""OpenVINO CPU engine: the same ONNX exports as ONNX Runtime (FP32, or an INT8 QDQ model from
``raydetect quantize`` or from NNCF post-training quantization, see :mod:`raydetect.ov_quantize`).

The model is compiled for the CPU in throughput mode (``PERFORMANCE_HINT=THROUGHPUT``: the
plugin splits the cores into streams) and a batch is split over an ``AsyncInferQueue`` with one
infer request per stream, so every stream runs its share of the batch at once. FP32 models run
with ``INFERENCE_PRECISION_HINT=f32`` (no silent bf16 on CPUs that have it); a QDQ model runs
its INT8 kernels.
"""

from __future__ import annotations

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.engines.base import Engine, EngineUnavailableError
from raydetect.engines.onnxruntime import _default_threads, is_quantized
from raydetect.model_card import ModelCard


class OpenVINOEngine(Engine):
    name = "openvino"

    @classmethod
    def availability(cls) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"openvino is not installed ({e}); pip install 'raydetect[openvino]'"
        return None

    @classmethod
    def availability_for(cls, config: DetectorConfig) -> str | None:
        if config.device not in (None, "cpu"):
            return f"the openvino engine runs on the CPU (device {config.device!r} was asked for)"
        if config.precision == "fp16":
            return "precision 'fp16' is not supported by the openvino CPU engine"
        return cls.availability()

    def __init__(self, card: ModelCard, config: DetectorConfig) -> None:
        super().__init__(card, config)
        import openvino as ov

        quantized = is_quantized(card.onnx_bytes)
        if config.precision == "fp16":
            raise EngineUnavailableError(
                "precision 'fp16' is not supported by the openvino CPU engine; use fp32 or int8 "
                "(a QDQ model from 'raydetect quantize' or NNCF)"
            )
        if config.precision == "int8" and not quantized:
            raise EngineUnavailableError(
                f"precision 'int8' needs an INT8 (QDQ) model; {card.url} is not quantized: "
                "make one with 'raydetect quantize'"
            )
        self.precision = "int8" if quantized else "fp32"
        self.threads = config.threads or _default_threads()
        core = ov.Core()
        model = core.read_model(card.onnx_bytes)
        props = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(model, "CPU", props)
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._out = self.compiled.output(card.output_name)
        self._results: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._done)

    def _done(self, request, part: int) -> None:
        # The callback runs on OpenVINO's thread; copy out before the request is reused.
        self._results[part] = request.get_tensor(self._out).data.copy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n = x.shape[0]
        parts = min(self.requests, n)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        self._results = {}
        for i in range(parts):
            self.queue.start_async({0: x[bounds[i] : bounds[i + 1]]}, userdata=i)
        self.queue.wait_all()
        if len(self._results) != parts:
            raise RuntimeError(f"openvino: {parts - len(self._results)} of {parts} infer requests returned nothing")
        return np.concatenate([self._results[i] for i in range(parts)], axis=0)

    def metadata(self) -> dict:
        return {**super().metadata(), "threads": self.threads, "streams": self.streams,
                "infer_requests": self.requests}
