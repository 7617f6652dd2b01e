"""PyTorch engine: the ONNX graph converted with onnx2torch, on CUDA (or the CPU for tests).

* FP16 (``precision='fp16'``: weights and activations half, cuDNN accumulates convolutions in
  FP32) or FP32 (TF32 switched off so FP32 stays FP32);
* channels-last memory format;
* CUDA-graph replay for a fixed set of batch sizes (1, 8, 16, 32, 64, … up to the configured
  ``batch_size``): a batch is padded to the next captured size and the padding is dropped;
* warm-up and capture in the constructor, i.e. once per Ray actor;
* ``torch.compile`` (``torch.compile='auto'`` on CUDA, or ``'inductor'``): the graph compiled
  by inductor with frozen weights (``freezing``: constants folded, conv+bn fused) and
  ``dynamic=False``, one compiled graph and one CUDA graph per batch bucket
  (``torch.compile_batches``, default 1, 8 and ``batch_size``). Compiling takes ~10-20 s per
  bucket; the compiled kernels are cached (:func:`compile_key`: model sha256, torch and triton
  versions, GPU name and compute capability, precision, input size, buckets) in
  ``torch.cache`` (local dir or s3://) as one ``torch.compiler.save_cache_artifacts`` blob, under
  a node-local lock so the actors of a node compile once. When compiling fails the engine runs
  the eager CUDA graphs and says why (``compile_error`` in its metadata).

``infer`` takes a ``[B, 3, H, W]`` float tensor on the engine's device (or a NumPy array, then
the result is NumPy too) and returns the raw head output as float32 on the same device.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.engine_cache import EngineCache, EngineKey, _slug
from raydetect.engines.base import Engine, EngineUnavailableError
from raydetect.model_card import ModelCard, batch_check_error, batching_check_input

log = logging.getLogger(__name__)

#: Batch sizes captured as CUDA graphs (those <= batch_size, plus batch_size itself).
GRAPH_BATCHES = (1, 8, 16, 32, 64, 128, 256, 512, 1024)


def graph_batch_sizes(batch_size: int) -> list[int]:
    return sorted({b for b in GRAPH_BATCHES if b < batch_size} | {batch_size})


def compile_buckets(batch_size: int, requested: tuple[int, ...] | None = None) -> list[int]:
    """The batch sizes compiled (each is one inductor graph and one CUDA graph): the
    requested ones up to ``batch_size``, or 1, 8 and ``batch_size``; ``batch_size`` always
    (a call's batch is padded to the next bucket)."""
    wanted = requested if requested else (1, 8)
    return sorted({b for b in wanted if b < batch_size} | {batch_size})


def compile_mode(setting: str, is_cuda: bool) -> str:
    """``'inductor'`` or ``'off'`` for a ``torch.compile`` setting on this device (auto:
    compile on CUDA, where the CUDA graphs it feeds pay; on the CPU only when asked)."""
    if setting == "auto":
        return "inductor" if is_cuda else "off"
    return setting


#: Bump when the compile recipe (options, freezing, layout) changes: old cache entries then miss.
COMPILE_RECIPE = "inductor-freezing-cl-1"


def channels_last(module):
    """``module`` with its 4-D parameters and buffers (convolution weights) in channels-last
    layout. ``Module.to(memory_format=channels_last)`` refuses modules that also hold 5-D
    tensors (YOLOv5's anchor grid, ``[1, 3, H, W, 2]``); those and all others stay as they are."""
    import torch

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


@dataclass(frozen=True)
class CompiledKey(EngineKey):
    """The cache key of a compiled engine: an :class:`EngineKey` whose runtime field names torch
    and triton, and whose file names say so."""

    def file_stem(self) -> str:
        h, w = self.imgsz
        return (f"{self.onnx_sha256[:12]}_{self.precision}_{h}x{w}_b{self.batch_profile[2]}"
                f"_{_slug(self.gpu_name)}_{_slug(self.tensorrt_version)}_{self.digest()[:16]}")


def compile_key(card: ModelCard, precision: str, buckets: list[int], device_name: str,
                capability: str, versions: str) -> CompiledKey:
    """Model sha256, torch/triton versions, GPU name and compute capability, precision, input
    size and batch buckets."""
    return CompiledKey(
        onnx_sha256=card.sha256,
        tensorrt_version=versions,
        gpu_name=device_name,
        compute_capability=capability,
        precision=precision,
        imgsz=(int(card.imgsz[0]), int(card.imgsz[1])),
        batch_profile=(min(buckets), min(buckets), max(buckets)),
        nms="none",
        nms_params=tuple(sorted({"buckets": ",".join(map(str, buckets)), "recipe": COMPILE_RECIPE}.items())),
    )


def default_compile_cache() -> str:
    import os
    from pathlib import Path

    return os.environ.get("RAYDETECT_TORCH_CACHE") or str(Path.home() / ".cache" / "raydetect" / "torch")


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
        from raydetect.gpu_probe import no_cuda_reason

        why = no_cuda_reason()  # before importing torch: seconds, for auto's choice on a CPU machine
        if why is not None:
            return why + " (device='cpu' runs it on the CPU, for tests)"
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

        from raydetect.onnx.to_torch import convert

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
        self.model = channels_last(gm.eval().to(dev, self.dtype))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_batch = config.batch_size
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.graph_error: str | None = None
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(dev) if self.is_cuda else None
        #: what runs a batch: the converted module, or its compiled form
        self.run = self.model
        self.buckets: list[int] = []  # compiled batch sizes (empty: not compiled)
        self.compile_mode = compile_mode(config.torch.compile, self.is_cuda)
        self.compile_error: str | None = None
        self.compile_cache: dict[str, Any] = {}
        self.batch_consistent = self._check_batching()
        if not self.batch_consistent:
            self.max_batch = 1
        t0 = time.perf_counter()
        if self.compile_mode == "inductor":
            try:
                self._compile(compile_buckets(self.max_batch, config.torch.compile_batches))
            except Exception as e:  # an optimisation: fall back to eager CUDA graphs, say why
                self.compile_error = f"{type(e).__name__}: {e}"[:2000]
                log.warning("torch.compile failed, running the eager graph: %s", self.compile_error)
                self.run, self.buckets = self.model, []
                self.graphs.clear()
        if self.is_cuda and not self.graphs:
            self._capture(graph_batch_sizes(self.max_batch))
        self.warmup_s = time.perf_counter() - t0

    # --- construction helpers -------------------------------------------------------------
    def _prep(self, x: Any) -> Any:
        return x.to(self.dev, self.dtype).contiguous(memory_format=self.torch.channels_last)

    def _check_batching(self) -> bool:
        """One image alone vs inside a batch of 2 (eager); also the first warm-up. The
        tolerance is the detector's (:data:`~raydetect.model_card.BATCH_CHECK_TOLERANCE`)."""
        torch = self.torch
        x = torch.from_numpy(batching_check_input(self.card.imgsz, n=2))
        alone = self.infer_eager(x[:1]).cpu().numpy()
        both = self.infer_eager(x).cpu().numpy()
        ok, err, tol = batch_check_error(alone, both, self.precision)
        if not ok:
            log.warning("%s: converted graph differs inside a batch (rel. error %.3g > %g); batch 1 only",
                        self.card.url, err, tol)
        return ok

    def _compile(self, buckets: list[int]) -> None:
        """torch.compile the module for each bucket (from the cache when it has them) and, on
        CUDA, capture each as a CUDA graph. Raises when compiling fails."""
        torch = self.torch
        if self.convert_report["host_reading_modules"]:
            raise RuntimeError(f"modules read tensors on the host: {self.convert_report['host_reading_modules']}")
        dyn = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per bucket
            if hasattr(dyn, name):
                setattr(dyn, name, max(getattr(dyn, name), len(buckets) + 4))
        compiled = torch.compile(self.model, backend="inductor", dynamic=False, options={"freezing": True})
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.dev)
            name, cc = props.name, f"{props.major}.{props.minor}"
        else:
            import platform

            name, cc = f"cpu-{platform.machine()}", "0.0"
        try:
            import triton

            versions = f"torch-{torch.__version__}-triton-{triton.__version__}"
        except ImportError:
            versions = f"torch-{torch.__version__}"
        key = compile_key(self.card, self.precision, buckets, name, cc, versions)
        cfg = self.config.torch
        cache = EngineCache(cfg.cache or default_compile_cache(), self.config.storage,
                            lock_timeout_s=cfg.lock_timeout_s, what="compiled torch engine")
        built = False

        def warm() -> None:
            self.run, self.buckets = compiled, list(buckets)
            if self.is_cuda:
                self._capture(buckets, strict=True)
            else:
                h, w = self.card.imgsz
                with torch.no_grad():
                    for b in buckets:
                        self.run(self._prep(torch.full((b, 3, h, w), 0.5)))

        def build():
            nonlocal built
            warm()
            built = True
            art = torch.compiler.save_cache_artifacts()
            return (art[0] if art else b""), {"buckets": list(buckets), "compile": "inductor"}

        def load(blob: bytes):
            if not built:  # a cache hit: kernels from the blob, then the same warm-up
                if blob:
                    torch.compiler.load_cache_artifacts(blob)
                warm()
            return True

        t0 = time.perf_counter()
        res = cache.load_or_build(key, build, load)
        self.compile_cache = {"status": res.status, "url": res.engine_url,
                              "seconds": round(time.perf_counter() - t0, 2), "buckets": list(buckets)}
        log.info("torch.compile: %s (%s, %.1f s)", res.engine_url, res.status, self.compile_cache["seconds"])

    def _capture(self, sizes: list[int], strict: bool = False) -> None:
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
                        self.run(static_in)
                cur.wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(g, pool=pool):
                    static_out = self.run(static_in)
                self.graphs[b] = (g, static_in, static_out)
            torch.cuda.synchronize(self.dev)
        except Exception as e:  # capture is an optimisation: fall back to eager, say why
            self.graphs.clear()
            if strict:
                raise
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
        if not self.graphs and self.buckets:  # compiled without CUDA graphs (the CPU)
            b = min(s for s in self.buckets if s >= n)
            xp = self._prep(x)
            if b > n:
                xp = torch.cat([xp, xp[:1].expand(b - n, -1, -1, -1)])
            with torch.no_grad():
                return self.run(xp.contiguous(memory_format=torch.channels_last))[:n].to(torch.float32)
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
            "compile": self.compile_mode if not self.compile_error else "off (failed)",
            "compile_error": self.compile_error,
            "compile_buckets": self.buckets,
            "compile_cache": self.compile_cache,
            "channels_last": True,
            "convert_s": round(self.convert_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            **self.convert_report,
        }
