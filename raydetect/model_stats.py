"""Compute cost of an ONNX detector: GFLOPs of its convolutions at one image, read from the graph
(shape inference), so FP32, pruned and QDQ INT8 exports are counted the same way."""

from __future__ import annotations

import math

import onnx
from onnx import shape_inference


def _dims(vi) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def onnx_gflops(raw: bytes, imgsz: tuple[int, int]) -> float:
    """2 × multiply-accumulates of every Conv / ConvTranspose / MatMul / Gemm for one image at
    ``imgsz`` (the input's batch is fixed to 1 for the count), in units of 1e9. Element-wise
    operations (activations, adds, the box decode) are left out, as Ultralytics' GFLOPs do."""
    model = onnx.load_model_from_string(raw)
    inp = model.graph.input[0]
    shape = inp.type.tensor_type.shape
    for d, v in zip(shape.dim, (1, 3, *imgsz), strict=False):
        d.ClearField("dim_param")
        d.dim_value = v
    del model.graph.value_info[:]  # an exporter's stale (symbolic) shapes would win over the inferred ones
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = _dims(vi)
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    macs = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            w, y = shapes.get(n.input[1]), shapes.get(n.output[0])
            if not w or not y or None in w or None in y[1:]:
                raise ValueError(f"cannot infer the shapes of {n.op_type} {n.name!r}")
            if n.op_type == "Conv":  # W: [Cout, Cin/group, kh, kw] (groups are in W); Y: [N, Cout, H, W]
                macs += math.prod(y[1:]) * math.prod(w[1:])
            else:  # W: [Cin, Cout/group, kh, kw]; X: [N, Cin, H, W]
                x = shapes.get(n.input[0])
                macs += math.prod(x[1:]) * math.prod(w[1:])
        elif n.op_type in ("MatMul", "Gemm"):
            a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and y and None not in a[1:] and None not in y[1:]:
                macs += math.prod(y[1:]) * a[-1]
    return 2 * macs / 1e9
