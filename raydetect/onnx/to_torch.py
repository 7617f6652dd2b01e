"""ONNX → PyTorch (``torch.fx.GraphModule``) through onnx2torch, made CUDA-graph safe.

onnx2torch keeps shape-like operands (Split sizes, Reshape targets, Slice bounds, Resize
scales) as tensors and reads them on the host at every call (``.tolist()``, ``torch.any``,
``.cpu()``). On CUDA that is a device→host copy per op, which makes CUDA-graph capture fail
and costs a synchronisation each time. :func:`convert` first folds the shape computations of
dynamic exports into constants (:mod:`raydetect.onnx.fold`, at batch 1, then the batch is
made dynamic again exactly as for static exports), converts, then replaces those modules by
ones holding the values as Python numbers (:func:`freeze_shape_operands`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import fx, nn

from raydetect.model_card import UnsupportedModelError, make_batch_dynamic
from raydetect.onnx.fold import fold_for_shape

log = logging.getLogger(__name__)


class StaticSplit(nn.Module):
    def __init__(self, sizes: list[int], axis: int) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.axis = int(axis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.sizes, dim=self.axis)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, axis={self.axis}"


class StaticReshape(nn.Module):
    """ONNX Reshape with a constant target (0 copies the input's dimension, -1 infers)."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = [int(s) for s in shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class StaticSlice(nn.Module):
    """ONNX Slice with constant starts/ends/axes/steps."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None):
        super().__init__()
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        if any(s <= 0 for s in steps):
            raise UnsupportedModelError(
                f"torch engine: ONNX Slice with steps {steps} (non-positive steps) is not supported; "
                "use the onnxruntime engine for this model"
            )
        self.spec = [(a, int(b), int(e), s) for a, b, e, s in zip(axes, starts, ends, steps, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx: list[Any] = [slice(None)] * x.dim()
        for a, b, e, s in self.spec:
            idx[a % x.dim()] = slice(b, e, s)
        return x[tuple(idx)]

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class StaticResize(nn.Module):
    def __init__(self, mode: str, align_corners: bool | None, size: list[int] | None, scale: list[float] | None):
        super().__init__()
        self.mode = mode
        self.align_corners = align_corners
        self.size = size
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, size=self.size, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode}, size={self.size}, scale={self.scale}"


def _const(gm: fx.GraphModule, arg: Any) -> np.ndarray | None:
    """The value of a constant operand (a ``get_attr`` node), else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        t = functools.reduce(getattr, arg.target.split("."), gm)
        return t.detach().cpu().numpy()
    return None


def _bound(mod: nn.Module, node: fx.Node) -> dict[str, Any]:
    sig = inspect.signature(mod.forward)
    b = sig.bind(*node.args, **node.kwargs)
    return dict(b.arguments)


def _static_module(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> nn.Module | None:
    """A static replacement for ``mod`` at ``node``, or None if an operand is not constant."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.resize import OnnxResize
    from onnx2torch.node_converters.slice import OnnxSlice
    from onnx2torch.node_converters.split import OnnxSplit13

    args = _bound(mod, node)
    names = list(args)
    extra = {k: args[k] for k in names[1:]}

    def consts() -> dict[str, np.ndarray | None] | None:
        out = {}
        for k, v in extra.items():
            if v is None:
                out[k] = None
                continue
            c = _const(gm, v)
            if c is None:
                return None
            out[k] = c
        return out

    c = consts()
    if c is None:
        return None
    if isinstance(mod, OnnxSplit13):
        split = c.get("split")
        if split is None:
            return None  # equal split sizes, computed from the static input shape: no host read
        return StaticSplit(split.tolist(), mod.axis)
    if isinstance(mod, OnnxReshape):
        return StaticReshape(c["shape"].tolist())
    if isinstance(mod, OnnxSlice):

        def lst(v: np.ndarray | None) -> list[int] | None:
            return None if v is None else [int(x) for x in v.tolist()]

        return StaticSlice(lst(c["starts"]), lst(c["ends"]), lst(c.get("axes")), lst(c.get("steps")))
    if isinstance(mod, OnnxResize):
        from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode

        roi, scales, sizes = c.get("roi"), c.get("scales"), c.get("sizes")
        if not mod.ignore_roi and roi is not None and roi.size:
            return None
        size = scale = None
        if sizes is not None and sizes.size:
            size = [int(s) for s in sizes.tolist()[2:]]
        elif scales is not None and scales.size:
            sc = [float(s) for s in scales.tolist()]
            if sc[:2] != [1.0, 1.0]:
                return None
            scale = sc[2:]
        spatial = len(size if size is not None else scale or [])
        if spatial == 0:
            return None
        torch_mode = _onnx_mode_to_torch_mode(mod.onnx_mode, spatial)
        return StaticResize(torch_mode, mod.align_corners, size, scale)
    return None


#: onnx2torch modules that read tensor operands on the host when they are not frozen.
HOST_READING = ("OnnxSplit13", "OnnxReshape", "OnnxSlice", "OnnxResize", "OnnxResizeV10", "OnnxShape",
                "OnnxExpand", "OnnxConstantOfShape", "OnnxRange", "OnnxTile", "OnnxPad", "OnnxTopK")


def freeze_shape_operands(gm: fx.GraphModule) -> tuple[int, list[str]]:
    """Replace Split/Reshape/Slice/Resize modules whose shape operands are constants by
    static modules. Returns (number replaced, names of host-reading modules left)."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        new = _static_module(gm, node, mod)
        if new is None:
            continue
        first = next(iter(_bound(mod, node).values()))
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        node.args = (first,)
        node.kwargs = {}
        replaced += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    left = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ in HOST_READING
    ]
    return replaced, left


def convert(onnx_bytes: bytes, input_name: str, imgsz: tuple[int, int]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """ONNX bytes → (GraphModule with a dynamic batch, conversion report)."""
    import onnx2torch

    model = onnx.load_model_from_string(onnx_bytes)
    folded, n_folded = fold_for_shape(model, input_name, (1, 3, imgsz[0], imgsz[1]))
    folded = make_batch_dynamic(folded)
    gm = onnx2torch.convert(folded)
    replaced, left = freeze_shape_operands(gm)
    if left:
        log.warning("modules still reading tensors on the host (no CUDA graphs): %s", left)
    return gm, {"onnx_nodes_folded": n_folded, "modules_frozen": replaced, "host_reading_modules": left}
