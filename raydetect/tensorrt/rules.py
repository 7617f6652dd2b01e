"""Pure decisions behind the TensorRT engine, kept apart from TensorRT so they are unit-tested
on machines without it: availability messages, optimisation-profile shapes, which NMS
implementation to append, precision handling per TensorRT major version, INT8 (QDQ) model
checks, parser-error reports and the layer-precision summary of a built engine.

Written against the TensorRT 10.x / 11.x Python API documentation (TensorRT cannot be
installed on the machines this project was developed on).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

MIN_TENSORRT = (10, 0)
NVIDIA_INDEX = "https://pypi.nvidia.com"
INSTALL_HINT = (
    f'install it with: pip install "raydetect[tensorrt]" --extra-index-url {NVIDIA_INDEX} '
    f"(TensorRT's wheels come from NVIDIA's package index {NVIDIA_INDEX}, not from PyPI)"
)
TORCH_HINT = 'the TensorRT engine runs on PyTorch CUDA tensors: pip install "raydetect[gpu]"'

NMSImpl = Literal["inms", "efficient_nms"]

# Tensor names the engine's network uses on top of the model's own input.
CONF_INPUT = "raydetect_conf_threshold"
IOU_INPUT = "raydetect_iou_threshold"
#: outputs per NMS implementation (see raydetect.tensorrt.outputs for their decoding)
NMS_OUTPUTS: dict[str, tuple[str, ...]] = {
    # INMSLayer: selected (batch, class, box) rows (data-dependent shape) + the tensors they index
    "inms": ("raydetect_selected", "raydetect_num_selected", "raydetect_boxes_cxcywh", "raydetect_best_score"),
    # EfficientNMS_TRT: fixed-size per-image results
    "efficient_nms": ("raydetect_num", "raydetect_boxes", "raydetect_scores", "raydetect_classes"),
}


# --- versions and availability ------------------------------------------------------------


def parse_version(v: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` → ``(10, 3, 0, 26)``; trailing non-numeric parts (``"11.0.0rc1"``) are
    cut at the first non-digit."""
    parts: list[int] = []
    for piece in str(v).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"cannot parse a version from {v!r}")
    return tuple(parts)


def unavailable_reason(
    *,
    trt_version: str | None,
    trt_error: str | None = None,
    torch_error: str | None = None,
    cuda_available: bool = False,
) -> str | None:
    """Why the TensorRT engine cannot run here (None if it can). ``trt_version`` is
    ``tensorrt.__version__`` or None when ``import tensorrt`` failed with ``trt_error``."""
    if trt_version is None:
        why = f" ({trt_error})" if trt_error else ""
        return f"TensorRT is not installed{why}; {INSTALL_HINT}"
    try:
        ver = parse_version(trt_version)
    except ValueError:
        return f"cannot tell the TensorRT version from {trt_version!r}"
    if ver[:2] < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return f"TensorRT {trt_version} is too old (raydetect needs >= {need}); {INSTALL_HINT}"
    if torch_error is not None:
        return f"PyTorch is not importable ({torch_error}); {TORCH_HINT}"
    if not cuda_available:
        return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


def probe_availability() -> str | None:
    """Import TensorRT and PyTorch (only here, lazily) and report why the engine cannot run."""
    try:
        import tensorrt as trt

        trt_version, trt_error = str(trt.__version__), None
    except Exception as e:  # ImportError, or OSError from missing libnvinfer
        trt_version, trt_error = None, f"{type(e).__name__}: {e}"
    if trt_version is None:
        return unavailable_reason(trt_version=None, trt_error=trt_error)
    try:
        import torch

        torch_error, cuda = None, bool(torch.cuda.is_available())
    except Exception as e:
        torch_error, cuda = f"{type(e).__name__}: {e}", False
    return unavailable_reason(trt_version=trt_version, torch_error=torch_error, cuda_available=cuda)


# --- optimisation profile -----------------------------------------------------------------


@dataclass(frozen=True)
class ProfileShapes:
    """min / opt / max NCHW shapes of the one optimisation profile (dynamic batch only)."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    @property
    def batches(self) -> tuple[int, int, int]:
        return (self.min[0], self.opt[0], self.max[0])


def profile_shapes(max_batch: int, opt_batch: int | None, imgsz: Sequence[int]) -> ProfileShapes:
    """The profile for batches 1..max_batch at the model's input size; ``opt_batch`` (default
    ``max_batch``) is the size TensorRT tunes kernels for."""
    if int(max_batch) < 1:
        raise ValueError(f"max batch must be >= 1 (got {max_batch})")
    opt = int(max_batch if opt_batch is None else opt_batch)
    if not 1 <= opt <= max_batch:
        raise ValueError(f"tensorrt.opt_batch must be between 1 and the max batch {max_batch} (got {opt})")
    if len(imgsz) != 2 or min(int(imgsz[0]), int(imgsz[1])) < 1:
        raise ValueError(f"imgsz must be (h, w) > 0 (got {tuple(imgsz)})")
    h, w = int(imgsz[0]), int(imgsz[1])
    return ProfileShapes((1, 3, h, w), (opt, 3, h, w), (int(max_batch), 3, h, w))


# --- NMS inside the network ---------------------------------------------------------------


@dataclass(frozen=True)
class NMSCapabilities:
    """What the installed TensorRT offers for NMS."""

    trt_version: tuple[int, ...]
    has_add_nms: bool  # INetworkDefinition.add_nms (INMSLayer)
    has_efficient_nms: bool  # the EfficientNMS_TRT plugin creator is registered


def choose_nms(caps: NMSCapabilities, requested: str = "auto") -> NMSImpl:
    """``auto``: the built-in INMSLayer on TensorRT >= 10, else the EfficientNMS_TRT plugin.

    Both are configured class-aware (boxes of different classes never suppress each other)
    on scores masked to each anchor's best class, which is Ultralytics' single-label NMS.
    EfficientNMS has fixed-size outputs (CUDA-graph replay possible, thresholds fixed at
    build time); INMSLayer outputs a data-dependent number of rows (no CUDA graph, but
    confidence and IoU thresholds are engine inputs that can change per call)."""
    if requested not in ("auto", "inms", "efficient_nms"):
        raise ValueError(f"tensorrt.nms must be 'auto', 'inms' or 'efficient_nms' (got {requested!r})")
    inms_ok = caps.has_add_nms and caps.trt_version[:2] >= (10, 0)
    version = ".".join(map(str, caps.trt_version))
    if requested == "inms":
        if not inms_ok:
            raise ValueError(f"tensorrt.nms='inms' needs INetworkDefinition.add_nms (TensorRT >= 10); {version} has none")
        return "inms"
    if requested == "efficient_nms":
        if not caps.has_efficient_nms:
            raise ValueError(
                f"tensorrt.nms='efficient_nms' needs the EfficientNMS_TRT plugin, which TensorRT {version} "
                "does not register"
            )
        return "efficient_nms"
    if inms_ok:
        return "inms"
    if caps.has_efficient_nms:
        return "efficient_nms"
    raise ValueError(f"TensorRT {version} offers neither add_nms (INMSLayer) nor the EfficientNMS_TRT plugin")


def nms_indices_type_arg(trt_version: Sequence[int]) -> bool:
    """TensorRT 10.14 deprecated the three-argument ``add_nms`` for a four-argument form that
    also takes the indices' data type; use it where it exists."""
    return tuple(trt_version[:2]) >= (10, 14)


def nms_topk_limit(compute_capability: Sequence[int]) -> int:
    """Largest INMSLayer TopK (candidates per image entering NMS): 2000 on SM 5.3 / 6.2,
    5000 elsewhere (TensorRT's documented bounds). Ultralytics lets 30000 in; with the usual
    conf=0.25 an image has far fewer candidates. EfficientNMS keeps its own top 4096."""
    return 2000 if tuple(compute_capability[:2]) in ((5, 3), (6, 2)) else 5000


def cuda_graph_allowed(nms: NMSImpl) -> bool:
    """CUDA-graph capture is impossible for engines with data-dependent output shapes
    (INMSLayer's selected indices)."""
    return nms == "efficient_nms"


def nms_params(nms: NMSImpl, *, max_det: int, topk: int, conf: float, iou: float) -> dict[str, float | int]:
    """Build-time NMS parameters (they go into the engine-cache key). INMSLayer takes conf and
    IoU as runtime inputs, so only EfficientNMS bakes them in."""
    if nms == "inms":
        return {"max_det": int(max_det), "topk": int(topk)}
    return {"max_det": int(max_det), "conf": float(conf), "iou": float(iou)}


def nms_request_problem(
    nms: NMSImpl, built: dict[str, float | int], *, conf: float, iou: float, max_det: int
) -> str | None:
    """Why an engine built with ``built`` NMS parameters cannot serve a call asking for
    conf/iou/max_det (None if it can). A higher conf or lower max_det than built is applied
    exactly afterwards (NMS is greedy by score); a lower conf or another IoU is not."""
    if max_det > int(built["max_det"]):
        return (
            f"max_det={max_det} is more than the engine was built for ({built['max_det']}); "
            f"rebuild with max_det >= {max_det}"
        )
    if nms == "efficient_nms":
        if abs(float(iou) - float(built["iou"])) > 1e-6:
            return (
                f"iou={iou} differs from the IoU threshold built into this EfficientNMS engine "
                f"({built['iou']}); rebuild with iou={iou} or use tensorrt.nms='inms'"
            )
        if float(conf) < float(built["conf"]) - 1e-9:
            return (
                f"conf={conf} is below the confidence threshold built into this EfficientNMS engine "
                f"({built['conf']}); rebuild with conf <= {conf} or use tensorrt.nms='inms'"
            )
    return None


# --- precision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """How to get the asked precision out of the installed TensorRT."""

    precision: str  # effective precision of the engine: fp32 | fp16 | int8
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    fp16_flag: bool  # BuilderFlag.FP16 (weak typing; removed in TensorRT 11)
    convert_fp16: bool  # convert the ONNX to FP16 first (TensorRT 11 has no precision flags)


def precision_plan(trt_version: Sequence[int], precision: str, quantized: bool) -> BuildPlan:
    """TensorRT 10: FP16 by the builder flag on a weakly typed network; INT8 by explicit
    quantization (the QDQ model from ``raydetect quantize``) on a strongly typed network,
    no calibrator, no precision flags. TensorRT 11 removed weak typing (networks are always
    strongly typed, BuilderFlag.FP16/INT8 are gone): FP16 comes from converting the ONNX
    graph to FP16 (inputs/outputs stay FP32)."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8 (got {precision!r})")
    major = int(trt_version[0])
    if quantized:
        # a QDQ graph fixes its own precisions; asking for fp32/fp16 would be a mislabel
        return BuildPlan("int8", strongly_typed=True, fp16_flag=False, convert_fp16=False)
    if precision == "int8":
        raise ValueError(
            "precision 'int8' needs an INT8 (QDQ) model: make one with 'raydetect quantize' "
            "(TensorRT builds it by explicit quantization, without a calibrator)"
        )
    if major >= 11:
        return BuildPlan(precision, strongly_typed=True, fp16_flag=False, convert_fp16=precision == "fp16")
    return BuildPlan(precision, strongly_typed=False, fp16_flag=precision == "fp16", convert_fp16=False)


def to_fp16_onnx(onnx_bytes: bytes) -> bytes:
    """The graph with FP16 weights and compute, FP32 inputs/outputs (for TensorRT 11's
    strongly typed networks). Uses ONNX Runtime's float16 converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_model_from_string(onnx_bytes)
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    return converted.SerializeToString()


def qdq_problems(onnx_bytes: bytes) -> list[str]:
    """Why TensorRT would reject this QDQ graph: it supports only symmetric INT8
    quantization (int8 zero points, all zero). ONNX Runtime's default QDQ output uses uint8
    activations with non-zero zero points."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(onnx_bytes)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    problems: list[str] = []
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zp_name = node.input[2]
        if zp_name in inits:
            arr = numpy_helper.to_array(inits[zp_name])
        elif zp_name in consts:
            attr = next((a for a in consts[zp_name].attribute if a.name == "value"), None)
            if attr is None:
                continue
            arr = numpy_helper.to_array(attr.t)
        else:
            continue
        label = node.name or f"{node.op_type}({node.input[0]})"
        kind = arr.dtype.name
        if kind == "int32":
            problems.append(
                f"{label}: int32 quantized tensor (a quantized bias?): TensorRT dequantizes int8 only; "
                "keep biases in float (ONNX Runtime quantize_static: extra_options QuantizeBias=False)"
            )
        elif kind != "int8" and not kind.startswith(("float8", "int4", "float4")):
            problems.append(f"{label}: zero point of type {kind} (TensorRT needs int8)")
        elif arr.size and (arr != 0).any():
            problems.append(f"{label}: non-zero zero point (TensorRT supports symmetric quantization only)")
    return problems


# --- parser errors ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParserError:
    desc: str
    node_index: int = -1
    node_name: str = ""
    node_operator: str = ""
    code: str = ""


def format_parser_errors(model: str, errors: Iterable[ParserError]) -> str:
    """One clear message for ONNX-parser failures, naming the nodes and operators."""
    errors = list(errors)
    lines = [f"TensorRT's ONNX parser rejected {model} ({len(errors)} error(s)):"]
    for e in errors:
        where = []
        if e.node_name:
            where.append(f"node {e.node_name!r}")
        elif e.node_index >= 0:
            where.append(f"node #{e.node_index}")
        if e.node_operator:
            where.append(f"op {e.node_operator}")
        prefix = f"{', '.join(where)}: " if where else ""
        code = f" [{e.code}]" if e.code else ""
        lines.append(f"  - {prefix}{e.desc}{code}")
    ops = sorted({e.node_operator for e in errors if e.node_operator})
    if ops:
        lines.append(
            f"unsupported or failing operators: {', '.join(ops)}; re-export the model (e.g. another "
            "opset, simplify=True) or run it with engine=torch / engine=onnxruntime"
        )
    return "\n".join(lines)


def unsupported_nodes(onnx_bytes: bytes, supports: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(node name, op type) of every node whose operator ``supports`` (e.g. TensorRT's
    ``OnnxParser.supports_operator``) rejects, in graph order."""
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    return [(n.name or f"#{i}", n.op_type) for i, n in enumerate(model.graph.node) if not supports(n.op_type)]


# --- built-engine summary -----------------------------------------------------------------

_DTYPE_TOKENS = (
    (re.compile(r"\bBFloat16\b|\bBF16\b", re.I), "bf16"),
    (re.compile(r"\bFP8\b|\bFloat8\b|\bE4M3\b", re.I), "fp8"),
    (re.compile(r"\bFP16\b|\bHalf\b", re.I), "fp16"),
    (re.compile(r"\bFP32\b|\bFloat\b|\bTF32\b", re.I), "fp32"),
    (re.compile(r"\bInt8\b", re.I), "int8"),
    (re.compile(r"\bInt32\b", re.I), "int32"),
    (re.compile(r"\bInt64\b", re.I), "int64"),
    (re.compile(r"\bBool\b", re.I), "bool"),
    (re.compile(r"\bUInt8\b", re.I), "uint8"),
)


def _dtype_of(tensor: dict) -> str:
    # TensorRT 10: "Format/Datatype": "Row major linear FP16 format" (or just "Half");
    # TensorRT 11 split it into "Format" and "DataType".
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or "")
    for pattern, name in _DTYPE_TOKENS:
        if pattern.search(text):
            return name
    return "unknown"


def layer_precision_summary(inspector_json: str) -> dict[str, int]:
    """Count engine layers by the data type of their first output, from
    ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` of an engine
    built with ``ProfilingVerbosity.DETAILED``. Layers listed by name only (other
    verbosities) count as ``unknown``."""
    info = json.loads(inspector_json)
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    counts: Counter[str] = Counter()
    for layer in layers:
        if not isinstance(layer, dict):
            counts["unknown"] += 1
            continue
        outputs = layer.get("Outputs") or []
        counts[_dtype_of(outputs[0]) if outputs and isinstance(outputs[0], dict) else "unknown"] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_precision_summary(summary: dict[str, int]) -> str:
    total = sum(summary.values())
    if not total:
        return "layer precisions: (no layer information)"
    parts = [f"{k} {v} ({100.0 * v / total:.0f}%)" for k, v in summary.items()]
    return f"layer precisions ({total} layers): " + ", ".join(parts)
