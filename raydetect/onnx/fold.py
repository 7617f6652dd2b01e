"""Constant folding of an ONNX graph for one fixed input shape.

Dynamic exports (``dynamic=True``) compute reshape targets, anchor grids and strides at run
time from ``Shape`` nodes. Runtimes that record a static graph (CUDA graphs, TensorRT
builders without dynamic profiles) want those as constants. :func:`fold_for_shape` fixes the
input shape, infers every intermediate shape, turns ``Shape`` of a static tensor into a
constant and evaluates every node whose inputs are all constant (with ONNX's reference
evaluator), so only the data path remains. Folding at batch 1 and then applying
:func:`raydetect.model_card.make_batch_dynamic` gives the same graph an Ultralytics static
export has, with a dynamic batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

#: Nodes never folded, even when their inputs are constant.
_NOT_FOLDABLE = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Name → fully static shape, for every value shape inference could pin down."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    g = inferred.graph
    out: dict[str, list[int]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [int(d.dim_value) for d in dims]
    return out


def _set_input_shape(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> None:
    for vi in model.graph.input:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != len(shape):
                raise ValueError(f"input {name!r} has rank {len(dims)}, got shape {shape}")
            for d, v in zip(dims, shape, strict=True):
                d.Clear()
                d.dim_value = int(v)
            return
    raise ValueError(f"no graph input named {name!r}")


def _shape_value(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return np.asarray(shape[start:end], dtype=np.int64)


def fold_for_shape(model: onnx.ModelProto, input_name: str, shape: tuple[int, ...]) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with ``input_name`` fixed to ``shape`` and every shape-only
    computation folded into initializers. Returns (model, number of folded nodes)."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _set_input_shape(model, input_name, shape)
    del model.graph.value_info[:]
    shapes = _static_shapes(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    g = model.graph

    known: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    folded: dict[str, np.ndarray] = {}
    kept: list[onnx.NodeProto] = []
    for node in g.node:
        ins = [i for i in node.input if i]
        values: list[np.ndarray] | None = None
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE:
            values = None
        elif node.op_type == "Shape" and node.input[0] in shapes:
            values = [_shape_value(node, shapes[node.input[0]])]
        elif node.op_type == "Size" and node.input[0] in shapes:
            values = [np.asarray(int(np.prod(shapes[node.input[0]])), dtype=np.int64)]
        elif all(i in known for i in ins):
            ev = ReferenceEvaluator(node, opsets=opsets)
            values = [np.asarray(v) for v in ev.run(None, {i: known[i] for i in ins})]
        if values is None:
            kept.append(node)
            continue
        for name, v in zip(node.output, values, strict=False):
            if name:
                known[name] = v
                folded[name] = v

    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    new_inits = [t for t in g.initializer if t.name in used]
    have = {t.name for t in new_inits}
    for name, v in folded.items():
        if name in used and name not in have:
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(v), name))
    n_folded = len(g.node) - len(kept)
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    return model, n_folded
