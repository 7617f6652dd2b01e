"""Open a YOLO ONNX export: metadata, head layout and a dynamic-batch graph.

Ultralytics exports carry their metadata (``names``, ``imgsz``, ``stride``, ``task``…)
as ONNX ``metadata_props``; YOLOv5 exports carry ``names`` and ``stride``. Most exports
have a static batch of 1; :func:`make_batch_dynamic` rewrites such graphs so that real
batches run (the rewrite is verified per model when a detector loads it).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from raydetect.config import StorageConfig
from raydetect.errors import RaydetectError
from raydetect.storage import read_bytes, sha256_bytes
from raydetect.types import HeadLayout

log = logging.getLogger(__name__)


class UnsupportedModelError(RaydetectError, ValueError):
    """The ONNX graph is not a YOLO detection export raydetect can run."""


@dataclass
class ModelCard:
    url: str
    sha256: str
    names: dict[int, str]
    imgsz: tuple[int, int]  # (h, w)
    stride: int
    layout: HeadLayout
    input_name: str
    output_name: str
    static_batch: bool  # the export had a fixed batch dimension
    batch_rewritten: bool  # we rewrote it to a symbolic one
    onnx_bytes: bytes = field(repr=False)  # the graph engines should load (dynamic batch)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "sha256": self.sha256,
            "names": self.names,
            "imgsz": list(self.imgsz),
            "stride": self.stride,
            "layout": self.layout,
            "static_batch": self.static_batch,
        }

    @classmethod
    def load(cls, url: str, storage: StorageConfig | None = None) -> ModelCard:
        raw = read_bytes(url, storage)
        return cls.from_bytes(raw, url)

    @classmethod
    def from_bytes(cls, raw: bytes, url: str = "<bytes>") -> ModelCard:
        try:
            model = onnx.load_model_from_string(raw)
        except Exception as e:  # protobuf DecodeError and friends
            raise UnsupportedModelError(f"{url}: not an ONNX model ({e})") from None
        meta = {p.key: p.value for p in model.metadata_props}
        meta_names = _parse_names(meta.get("names"))
        in_name, in_shape, out_name, out_shape = _io_shapes(model, url, len(meta_names) or None)
        extra_outputs = len(model.graph.output) > 1
        if extra_outputs:
            others = [o.name for o in model.graph.output if o.name != out_name]
            log.info("%s: using detection output %r %s; ignoring the other outputs %s",
                     url, out_name, out_shape, others)
            model = keep_only_output(model, out_name)
        task = meta.get("task", "detect")
        if task != "detect":
            raise UnsupportedModelError(f"{url}: task {task!r} is not supported (only 'detect')")
        if meta.get("end2end", "False") == "True" or meta.get("nms", "False") == "True":
            raise UnsupportedModelError(
                f"{url}: found an end-to-end export with NMS inside (output {out_shape}); "
                "export without nms/end2end so raydetect can run its own NMS"
            )
        names = meta_names
        layout, nc = _layout(out_shape, len(names) if names else None, url)
        if not names:
            names = {i: f"class{i}" for i in range(nc)}
        imgsz = _parse_imgsz(meta.get("imgsz"), in_shape, url)
        stride = int(meta.get("stride", 32))
        if imgsz[0] % stride or imgsz[1] % stride:
            raise UnsupportedModelError(f"{url}: imgsz {imgsz} is not a multiple of stride {stride}")
        static = isinstance(in_shape[0], int)
        rewritten = False
        if static:
            if in_shape[0] != 1:
                log.warning("%s: static batch %d; rewriting to dynamic", url, in_shape[0])
            model = make_batch_dynamic(model)
            rewritten = True
        return cls(
            url=url,
            sha256=sha256_bytes(raw),
            names=names,
            imgsz=imgsz,
            stride=stride,
            layout=layout,
            input_name=in_name,
            output_name=out_name,
            static_batch=static,
            batch_rewritten=rewritten,
            onnx_bytes=model.SerializeToString() if rewritten or extra_outputs else raw,
            metadata=meta,
        )


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _io_shapes(model: onnx.ModelProto, url: str, nc: int | None = None):
    """(input name, input dims, detection output name, its dims). Exports that also emit the raw
    head maps (YOLOv5, some YOLOv8 exports: 4-D/5-D outputs next to the decoded ``[B, C, N]``
    one) are accepted: the one 3-D output whose shape is a YOLOv8/YOLOv5 head is picked."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    outs = list(model.graph.output)
    found = (
        f"inputs {[(i.name, _dims(i)) for i in inputs]}, outputs {[(o.name, _dims(o)) for o in outs]}"
    )
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4 or _dims(inputs[0])[1] != 3:
        raise UnsupportedModelError(
            f"{url}: unsupported graph, expected one NCHW input with 3 channels; found {found}"
        )
    heads = []
    for o in outs:
        if len(_dims(o)) != 3:
            continue
        try:
            _layout(_dims(o), nc, url)
        except UnsupportedModelError:
            continue
        heads.append(o)
    three_d = [o for o in outs if len(_dims(o)) == 3]
    if not heads and len(three_d) == 1:
        _layout(_dims(three_d[0]), nc, url)  # raises, saying why this output is not a YOLO head
    if len(heads) != 1:
        what = "no" if not heads else f"{len(heads)} candidate"
        raise UnsupportedModelError(
            f"{url}: unsupported graph, expected one [batch, C, N] or [batch, N, C] detection "
            f"output (YOLOv8/YOLO11 or YOLOv5 head), found {what} such outputs; {found}"
        )
    return inputs[0].name, _dims(inputs[0]), heads[0].name, _dims(heads[0])


def keep_only_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose only graph output is ``name``, without the nodes that fed only
    the outputs dropped (raw head maps of YOLOv5-style exports)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    keep_out = [o for o in g.output if o.name == name]
    del g.output[:]
    g.output.extend(keep_out)
    producer = {out: i for i, n in enumerate(g.node) for out in n.output}
    needed: set[int] = set()
    stack = [name]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(x for x in g.node[i].input if x)
        for a in g.node[i].attribute:  # subgraphs (If/Loop) read outer tensors by name
            if a.type == onnx.AttributeProto.GRAPH:
                stack.extend(x for n in a.g.node for x in n.input if x)
    nodes = [n for i, n in enumerate(g.node) if i in needed]
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input} | {name}
    for a in [n for n in g.node]:
        for att in a.attribute:
            if att.type == onnx.AttributeProto.GRAPH:
                used |= {x for n in att.g.node for x in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in used]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def _parse_names(s: str | None) -> dict[int, str]:
    if not s:
        return {}
    try:
        v = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return {}
    if isinstance(v, dict):
        return {int(k): str(n) for k, n in v.items()}
    if isinstance(v, list):
        return {i: str(n) for i, n in enumerate(v)}
    return {}


def _parse_imgsz(s: str | None, in_shape: list, url: str) -> tuple[int, int]:
    if s:
        try:
            v = ast.literal_eval(s)
            if isinstance(v, int):
                return (v, v)
            if isinstance(v, (list, tuple)) and len(v) == 2:
                return (int(v[0]), int(v[1]))
        except (ValueError, SyntaxError):
            pass
    h, w = in_shape[2], in_shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return (h, w)
    raise UnsupportedModelError(
        f"{url}: cannot tell the input size: no 'imgsz' metadata and dynamic input {in_shape}"
    )


def _layout(out_shape: list, nc: int | None, url: str) -> tuple[HeadLayout, int]:
    a, b = out_shape[1], out_shape[2]
    ai = a if isinstance(a, int) and a > 0 else None
    bi = b if isinstance(b, int) and b > 0 else None
    if nc is not None:
        if ai == 4 + nc:
            return "yolov8", nc
        if bi == 5 + nc:
            return "yolov5", nc
        raise UnsupportedModelError(
            f"{url}: output {out_shape} matches neither a YOLOv8/YOLO11 head [B, 4+{nc}, N] nor a "
            f"YOLOv5 head [B, N, 5+{nc}] for the {nc} class names in the metadata"
        )
    if ai is not None and ai > 4 and (bi is None or bi > ai):
        return "yolov8", ai - 4
    if bi is not None and bi > 5 and (ai is None or ai > bi):
        return "yolov5", bi - 5
    raise UnsupportedModelError(f"{url}: cannot tell the head layout of output {out_shape}")


def make_batch_dynamic(model: onnx.ModelProto, dim_name: str = "batch") -> onnx.ModelProto:
    """Rewrite a static-batch graph: symbolic dim 0 on inputs/outputs, and a leading 1 of
    constant Reshape target shapes → 0 (copy the input's batch dimension)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = dim_name
    del g.value_info[:]  # stale batch-1 shapes would contradict the new inputs
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            continue
        name = node.input[1]
        if name in inits:
            t = inits[name]
            arr = numpy_helper.to_array(t)
            if arr.ndim == 1 and arr.size > 1 and arr[0] == 1:
                arr = arr.copy()
                arr[0] = 0
                t.CopyFrom(numpy_helper.from_array(arr, name))
        elif name in consts:
            for attr in consts[name].attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    if arr.ndim == 1 and arr.size > 1 and arr[0] == 1:
                        arr = arr.copy()
                        arr[0] = 0
                        attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
    return model


#: Largest relative difference (max |Δ| / max |output|) between an image run alone and inside a
#: batch that still counts as "the graph batches correctly". Reduced precisions legitimately
#: differ between batch sizes (other kernels, other accumulation order): FP16 by ~1.5e-3 of the
#: output range on the H200. The one table for every engine's self-check.
BATCH_CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-2}


def batch_check_error(alone: np.ndarray, both: np.ndarray, precision: str) -> tuple[bool, float, float]:
    """(agree, relative error, tolerance) of the first image run alone vs inside a batch."""
    alone, both = np.asarray(alone, dtype=np.float32), np.asarray(both, dtype=np.float32)
    err = float(np.abs(both[:1] - alone).max()) / max(float(np.abs(alone).max()), 1e-6)
    tol = BATCH_CHECK_TOLERANCE.get(precision, 1e-2)
    return bool(np.isfinite(err) and err <= tol), err, tol


def batching_check_input(imgsz: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """Deterministic, image-like batch used to verify a rewritten graph at load."""
    rng = np.random.default_rng(seed)
    h, w = imgsz
    base = np.linspace(0, 1, h * w, dtype=np.float32).reshape(1, 1, h, w)
    x = np.repeat(base, 3, axis=1).repeat(n, axis=0)
    x += rng.random((n, 3, h, w), dtype=np.float32) * 0.3
    return np.clip(x, 0, 1)
