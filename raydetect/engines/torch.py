"""PyTorch engine: the ONNX graph converted with onnx2torch, on CUDA (or the CPU for tests).

* FP16 (``precision='fp16'``: weights and activations half, cuDNN accumulates convolutions in
  FP32) or FP32 (TF32 switched off so FP32 stays FP32);
* channels-last memory format;
* CUDA-graph replay for a fixed set of batch sizes (1, 8, 16, 32, 64, … up to the configured
  ``batch_size``): a batch is padded to the next captured size and the padding is dropped;
* warm-up and capture in the constructor, i.e. once per Ray actor.

``infer`` takes a ``[B, 3, H, W]`` float tensor on the engine's device (or a NumPy array, then
the result is NumPy too) and returns the raw head output as float32 on the same device.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.engines.base import Engine, EngineUnavailableError
from raydetect.model_card import ModelCard, batching_check_input

log = logging.getLogger(__name__)

#: Batch sizes captured as CUDA graphs (those <= batch_size, plus batch_size itself).
GRAPH_BATCHES = (1, 8, 16, 32, 64, 128, 256, 512, 1024)


def graph_batch_sizes(batch_size: int) -> list[int]:
    return sorted({b for b in GRAPH_BATCHES if b < batch_size} | {batch_size})


def _imports() -> str | None:
    try:
        import onnx2torch  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        return f"needs torch, torchvision and onnx2torch ({e}); pip install 'raydetect[gpu]'"
    return None


class TorchEngine(Engine):
    name = "torch"
    input_kind = "torch"

    @classmethod
    def availability(cls) -> str | None:
        why = _imports()
        if why is not None:
            return why
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device visible (device='cpu' runs it on the CPU, for tests)"
        return None

    @classmethod
    def availability_for(cls, config: DetectorConfig) -> str | None:
        if config.device == "cpu":
            return _imports()
        return cls.availability()

    def __init__(self, card: ModelCard, config: DetectorConfig) -> None:
        super().__init__(card, config)
        why = self.availability_for(config)
        if why is not None:
            raise EngineUnavailableError(f"engine 'torch' cannot run here: {why}")
        import torch

        from raydetect.engines.onnx_to_torch import convert

        if config.precision == "int8":
            raise EngineUnavailableError(
                "precision 'int8' is not supported by the torch engine; use fp16/fp32 (or tensorrt)"
            )
        dev = torch.device(config.device or "cuda")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cpu" and config.precision == "fp16":
            raise EngineUnavailableError("precision 'fp16' of the torch engine needs CUDA (use fp32 on the CPU)")
        self.torch = torch
        self.dev = dev
        self.device = str(dev)
        self.is_cuda = dev.type == "cuda"
        self.dtype = torch.float16 if config.precision == "fp16" else torch.float32
        t0 = time.perf_counter()
        gm, self.convert_report = convert(card.onnx_bytes, card.input_name, card.imgsz)
        self.convert_s = time.perf_counter() - t0
        if self.is_cuda:
            torch.cuda.set_device(dev)
            torch.backends.cudnn.benchmark = True
            if self.dtype == torch.float32:  # keep FP32 exact: no TF32 in convolutions/matmuls
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self.model = gm.eval().to(dev, self.dtype).to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_batch = config.batch_size
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.graph_error: str | None = None
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(dev) if self.is_cuda else None
        self.batch_consistent = self._check_batching()
        if not self.batch_consistent:
            self.max_batch = 1
        t0 = time.perf_counter()
        if self.is_cuda:
            self._capture(graph_batch_sizes(self.max_batch))
        self.warmup_s = time.perf_counter() - t0

    # --- construction helpers -------------------------------------------------------------
    def _prep(self, x: Any) -> Any:
        return x.to(self.dev, self.dtype).contiguous(memory_format=self.torch.channels_last)

    def _check_batching(self) -> bool:
        """One image alone vs inside a batch of 2 (eager); also the first warm-up."""
        torch = self.torch
        x = torch.from_numpy(batching_check_input(self.card.imgsz, n=2))
        alone = self.infer_eager(x[:1])
        both = self.infer_eager(x)
        ref = float(alone.abs().max())
        err = float((both[:1] - alone).abs().max()) / max(ref, 1e-6)
        tol = 1e-3 if self.dtype == torch.float32 else 2e-2
        if not np.isfinite(err) or err > tol:
            log.warning("%s: converted graph differs inside a batch (rel. error %.3g); batch 1 only",
                        self.card.url, err)
            return False
        return True

    def _capture(self, sizes: list[int]) -> None:
        torch = self.torch
        if self.convert_report["host_reading_modules"]:
            self.graph_error = f"modules read tensors on the host: {self.convert_report['host_reading_modules']}"
            log.warning("CUDA graphs off: %s", self.graph_error)
            return
        h, w = self.card.imgsz
        pool = torch.cuda.graph_pool_handle()
        cur = torch.cuda.current_stream(self.dev)
        try:
            for b in sorted(sizes, reverse=True):  # largest first: smaller graphs reuse its pool
                static_in = self._prep(torch.full((b, 3, h, w), 0.5))
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(cur)
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        self.model(static_in)
                cur.wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(g, pool=pool):
                    static_out = self.model(static_in)
                self.graphs[b] = (g, static_in, static_out)
            torch.cuda.synchronize(self.dev)
        except Exception as e:  # capture is an optimisation: fall back to eager, say why
            self.graphs.clear()
            self.graph_error = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed, running eagerly: %s", self.graph_error)

    # --- inference ------------------------------------------------------------------------
    def infer_eager(self, batch: Any) -> Any:
        """Raw head output without CUDA graphs (reference for the graph path)."""
        torch = self.torch
        if isinstance(batch, np.ndarray):
            return self.infer_eager(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).cpu().numpy()
        with torch.no_grad():
            return self.model(self._prep(batch)).to(torch.float32)

    def infer(self, batch: Any) -> Any:
        torch = self.torch
        if isinstance(batch, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return self.infer(t.to(self.dev)).cpu().numpy()
        n = int(batch.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        step = self.max_batch or n
        outs = [self._infer_chunk(batch[s : s + step]) for s in range(0, n, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _infer_chunk(self, x: Any) -> Any:
        torch = self.torch
        n = int(x.shape[0])
        if not self.graphs:
            return self.infer_eager(x)
        b = min(s for s in self.graphs if s >= n)
        g, static_in, static_out = self.graphs[b]
        cur = torch.cuda.current_stream(self.dev)
        # One engine stream, under a lock: the graphs' static buffers are shared, so calls
        # from several threads (Ray actors with concurrent calls) are serialised on the GPU.
        with self._lock:
            self._stream.wait_stream(cur)
            with torch.cuda.stream(self._stream):
                static_in[:n].copy_(x)
                g.replay()
                out = static_out[:n].to(torch.float32, copy=True)
            cur.wait_stream(self._stream)
        out.record_stream(cur)
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "cuda_graph_batches": sorted(self.graphs),
            "cuda_graph_error": self.graph_error,
            "channels_last": True,
            "convert_s": round(self.convert_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            **self.convert_report,
        }
