"""TensorRT engine: the model's network with NMS appended, built once per GPU type and cached
(:mod:`raydetect.tensorrt.build`, :mod:`raydetect.engine_cache`), run with
``execute_async_v3`` on PyTorch CUDA tensors.

* Inputs are PyTorch CUDA tensors (or NumPy arrays, copied to the GPU); they are copied into
  one engine-owned input buffer sized for the largest batch, whose address never changes.
* The engine runs on the caller's current CUDA stream when it is not the legacy default
  stream (TensorRT adds synchronisations on that one), else on an engine stream ordered
  after the caller's work.
* ``infer`` returns :class:`NMSOutput` (host arrays, ``B x max_det``): the detector maps it
  to detections without an NMS of its own.
* With the EfficientNMS_TRT plugin (fixed-size outputs) each batch size of
  :func:`batch_buckets` gets its own execution context and CUDA graph, captured on first use;
  a partial batch is padded to the next bucket and the padding dropped from the results.
  INMSLayer outputs have a data-dependent shape, which CUDA graphs cannot capture: that path
  runs ``execute_async_v3`` directly at the exact batch size.

TensorRT could not be installed where this was written; its GPU tests
(``tests/engines/test_tensorrt_gpu.py``) have not been run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.engines.base import Engine, EngineUnavailableError, NMSOutput
from raydetect.model_card import ModelCard
from raydetect.tensorrt.outputs import (
    batch_buckets,
    decode_efficient_nms,
    drop_padding,
    pack_selected,
    padded_batch_size,
)
from raydetect.tensorrt.rules import (
    CONF_INPUT,
    IOU_INPUT,
    NMS_OUTPUTS,
    cuda_graph_allowed,
    nms_request_problem,
    probe_availability,
)

log = logging.getLogger(__name__)


class TensorRTEngine(Engine):
    name = "tensorrt"
    input_kind = "torch"
    nms_in_engine = True

    @classmethod
    def availability(cls) -> str | None:
        return probe_availability()

    def __init__(self, card: ModelCard, config: DetectorConfig) -> None:
        super().__init__(card, config)
        why = probe_availability()
        if why is not None:
            raise EngineUnavailableError(f"engine 'tensorrt' cannot run here: {why}")
        import tensorrt as trt
        import torch

        from raydetect.tensorrt.build import prepare_engine, trt_logger

        self._trt, self._torch = trt, torch
        self._logger = trt_logger()
        self.prepared = prepare_engine(card, config)
        p = self.prepared
        self._engine = p.engine
        self.dev = torch.device("cuda", p.device_index)
        self.device = str(self.dev)
        self.precision = p.plan.precision
        self.nms = p.nms
        self.max_batch = p.shapes.max[0]
        self.imgsz = card.imgsz
        self.input_name = card.input_name
        self.out_names = NMS_OUTPUTS[self.nms]
        self.conf, self.iou, self.max_det = config.conf, config.iou, config.max_det
        self.use_graphs = bool(config.tensorrt.cuda_graph) and cuda_graph_allowed(self.nms)
        self.buckets = batch_buckets(self.max_batch) if self.use_graphs else None
        self.set_nms_params(config.conf, config.iou, config.max_det)
        with torch.cuda.device(self.dev):
            self._own_stream = torch.cuda.Stream(self.dev)
            self._setup_buffers()

    # --- buffers --------------------------------------------------------------------------
    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int8: torch.int8,
            trt.bool: torch.bool,
        }
        for attr, tdt in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
            if hasattr(trt, attr):
                table[getattr(trt, attr)] = tdt
        dt = self._engine.get_tensor_dtype(name)
        if dt not in table:
            raise EngineUnavailableError(f"tensor {name!r} has a TensorRT type ({dt}) raydetect does not map")
        return table[dt]

    def _setup_buffers(self) -> None:
        """One set of device buffers sized for the largest batch; every batch uses prefixes
        of them (a prefix along dim 0 of a contiguous tensor is contiguous)."""
        torch = self._torch
        h, w = self.imgsz
        b = self.max_batch
        self._shared_memory = None
        self.context = self._new_context()
        self.context.set_input_shape(self.input_name, (b, 3, h, w))
        self._input = torch.zeros((b, 3, h, w), dtype=self._torch_dtype(self.input_name), device=self.dev)
        self._outputs: dict[str, Any] = {}
        for name in self.out_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                continue  # data-dependent shape (INMSLayer's selected rows): output allocator
            self._outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.dev)
        self._allocator = None
        if self.nms == "inms":
            self._conf_t = torch.full((), float(self.conf), dtype=torch.float32, device=self.dev)
            self._iou_t = torch.full((), float(self.iou), dtype=torch.float32, device=self.dev)
            sel = self.out_names[0]
            self._allocator = _output_allocator(self._trt, torch, self.dev)
            size = int(self.context.get_max_output_size(sel))
            if size > 0:
                self._allocator.reserve(sel, size)  # worst case up front: no growth mid-run
            self.context.set_output_allocator(sel, self._allocator)
        self._contexts: dict[int, Any] = {}
        self._graphs: dict[int, Any] = {}

    def _new_context(self):
        """An execution context; with CUDA graphs, the bucket contexts share one block of
        device memory (they only ever run one after another on one stream)."""
        trt, torch = self._trt, self._torch
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if not self.use_graphs or strategy is None:
            return self._engine.create_execution_context()
        if self._shared_memory is None:
            size = int(getattr(self._engine, "device_memory_size_v2", 0) or self._engine.device_memory_size)
            self._shared_memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.dev)
        ctx = self._engine.create_execution_context(strategy.USER_MANAGED)
        mem = self._shared_memory
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(mem.data_ptr(), mem.numel())
        else:
            ctx.device_memory = mem.data_ptr()
        return ctx

    def _bind(self, ctx, b: int) -> None:
        h, w = self.imgsz
        if not ctx.set_input_shape(self.input_name, (b, 3, h, w)):
            raise RuntimeError(f"TensorRT rejected input shape {(b, 3, h, w)}: {self._logger.recent_errors()}")
        ctx.set_tensor_address(self.input_name, self._input.data_ptr())
        for name, t in self._outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if self.nms == "inms":
            ctx.set_tensor_address(CONF_INPUT, self._conf_t.data_ptr())
            ctx.set_tensor_address(IOU_INPUT, self._iou_t.data_ptr())

    # --- NMS settings ------------------------------------------------------------------------
    def set_nms_params(self, conf: float, iou: float, max_det: int) -> None:
        problem = nms_request_problem(self.nms, self.prepared.nms_params, conf=conf, iou=iou, max_det=max_det)
        if problem is not None:
            raise ValueError(f"engine 'tensorrt': {problem}")
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)

    # --- execution -----------------------------------------------------------------------
    def _stream(self):
        cur = self._torch.cuda.current_stream(self.dev)
        if cur.cuda_stream != 0:
            return cur, False
        return self._own_stream, True

    def _execute(self, ctx, stream) -> None:
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed: {self._logger.recent_errors()}")

    def _graph_for(self, b: int, stream):
        """Context and CUDA graph of bucket ``b`` (captured on first use; None if capture
        fails, then this bucket runs without a graph)."""
        torch = self._torch
        if b not in self._contexts:
            ctx = self._new_context()
            self._bind(ctx, b)
            self._execute(ctx, stream)  # first run after a shape change does deferred setup
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream):
                    self._execute(ctx, torch.cuda.current_stream(self.dev))
            except Exception as e:
                log.warning("CUDA graph capture failed for batch %d (%s); running it without a graph", b, e)
                graph = None
            self._contexts[b], self._graphs[b] = ctx, graph
        return self._contexts[b], self._graphs[b]

    def _as_tensor(self, batch: Any):
        torch = self._torch
        if isinstance(batch, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(batch))
        return batch

    def infer(self, batch: Any) -> NMSOutput:
        """Letterboxed ``[n, 3, H, W]`` float batch (torch CUDA tensor or NumPy) → NMSOutput."""
        torch = self._torch
        x = self._as_tensor(batch)
        n = int(x.shape[0])
        h, w = self.imgsz
        if tuple(x.shape[1:]) != (3, h, w):
            raise ValueError(f"input batch must be [n, 3, {h}, {w}], got {tuple(x.shape)}")
        b = padded_batch_size(n, self.max_batch, self.buckets)
        stream, own = self._stream()
        caller = torch.cuda.current_stream(self.dev)
        if own:
            stream.wait_stream(caller)
        with torch.cuda.device(self.dev), torch.cuda.stream(stream):
            self._input[:n].copy_(x, non_blocking=True)
            if b > n:
                self._input[n:b].zero_()  # padding rows; their results are dropped
            if self.nms == "inms":
                out = self._run_inms(n, stream)
            else:
                out = self._run_efficient(n, b, stream)
        if own:
            caller.wait_stream(stream)
        return out

    def _run_efficient(self, n: int, b: int, stream) -> NMSOutput:
        if self.use_graphs:
            ctx, graph = self._graph_for(b, stream)
            if graph is not None:
                graph.replay()
            else:
                self._bind(ctx, b)
                self._execute(ctx, stream)
        else:
            self._bind(self.context, b)
            self._execute(self.context, stream)
        num, boxes, scores, classes = (self._outputs[k][:b] for k in self.out_names)
        host = [t.to("cpu") for t in (num, boxes, scores, classes)]  # syncs the stream
        out = decode_efficient_nms(*(t.numpy() for t in host))
        return drop_padding(out, n)

    def _run_inms(self, n: int, stream) -> NMSOutput:
        torch = self._torch
        sel_name, count_name, boxes_name, best_name = self.out_names
        self._conf_t.fill_(self.conf)
        self._iou_t.fill_(self.iou)
        self._bind(self.context, n)
        self._execute(self.context, stream)
        count = int(self._outputs[count_name].item())  # syncs the stream
        if count == 0:
            return pack_selected(np.empty(0), np.empty(0), np.empty((0, 4)), np.empty(0), n, self.max_det)
        raw = self._allocator.buffer(sel_name)
        sel = raw[: count * 3 * 4].view(torch.int32).view(count, 3).long()
        bi, ci, ai = sel[:, 0], sel[:, 1], sel[:, 2]
        boxes = self._outputs[boxes_name][:n][bi, ai]  # [count, 4] centre/size
        scores = self._outputs[best_name][:n][bi, ai, 0]  # [count]
        host = [t.to("cpu").numpy() for t in (bi, ci, boxes.float(), scores.float())]
        return pack_selected(host[0], host[1], host[2], host[3], n, self.max_det)

    # --- identity --------------------------------------------------------------------------
    def metadata(self) -> dict:
        k = self.prepared.key
        return {
            **super().metadata(),
            "nms": self.nms,
            "nms_params": self.prepared.nms_params,
            "cuda_graphs": self.use_graphs,
            "engine_url": self.prepared.result.engine_url,
            "engine_cache": self.prepared.result.status,
            "tensorrt_version": k.tensorrt_version,
            "gpu": k.gpu_name,
            "compute_capability": k.compute_capability,
            "batch_profile": list(k.batch_profile),
        }

    def close(self) -> None:
        self._graphs.clear()
        self._contexts.clear()
        self.context = None
        self._engine = None


def _output_allocator(trt, torch, device):
    """An IOutputAllocator backed by PyTorch memory, grow-only, for data-dependent outputs."""

    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reserve(self, name: str, size: int):
            buf = self.buffers.get(name)
            if buf is None or buf.numel() < size:
                buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
                self.buffers[name] = buf
            return buf

        def buffer(self, name: str):
            return self.buffers[name]

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self.reserve(tensor_name, size).data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reserve(tensor_name, size).data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return TorchOutputAllocator()
