"""Building TensorRT engines: ONNX → network with NMS appended → serialized engine, through
the engine cache; and the ``raydetect build`` command.

TensorRT and PyTorch are imported inside functions only, so this module (and the CLI that
registers ``build``) imports on machines without them. The decisions live in the pure
:mod:`raydetect.tensorrt.rules`; this module is the thin layer that calls TensorRT
(Python API of TensorRT 10.x / 11.x).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from raydetect.config import ConfigError, DetectorConfig
from raydetect.engine_cache import (
    CacheResult,
    EngineCache,
    EngineKey,
    cache_dir_for,
    make_key,
    timing_cache_name,
)
from raydetect.engines.base import EngineUnavailableError
from raydetect.model_card import ModelCard, UnsupportedModelError
from raydetect.tensorrt.rules import (
    CONF_INPUT,
    IOU_INPUT,
    NMS_OUTPUTS,
    BuildPlan,
    NMSCapabilities,
    ParserError,
    ProfileShapes,
    choose_nms,
    format_parser_errors,
    layer_precision_summary,
    nms_indices_type_arg,
    nms_params,
    nms_topk_limit,
    parse_version,
    precision_plan,
    probe_availability,
    profile_shapes,
    qdq_problems,
    to_fp16_onnx,
    unsupported_nodes,
)

log = logging.getLogger(__name__)

EFFICIENT_NMS_PLUGIN = ("EfficientNMS_TRT", "1")


class TensorRTBuildError(EngineUnavailableError):
    """TensorRT failed to build an engine (its error messages are included)."""


# --- TensorRT plumbing ---------------------------------------------------------------------

_LOGGER = None


def trt_logger():
    """The process-wide TensorRT logger: forwards to Python logging and keeps the recent
    errors so exceptions can quote them."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        class RecordingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: deque[str] = deque(maxlen=64)

            def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's callback name
                S = trt.ILogger.Severity
                if severity in (S.INTERNAL_ERROR, S.ERROR):
                    self.errors.append(str(msg))
                    log.error("TensorRT: %s", msg)
                elif severity == S.WARNING:
                    log.warning("TensorRT: %s", msg)
                elif severity == S.INFO:
                    log.debug("TensorRT: %s", msg)

            def recent_errors(self) -> str:
                return " | ".join(self.errors) if self.errors else "(no TensorRT error logged)"

        _LOGGER = RecordingLogger()
        trt.init_libnvinfer_plugins(_LOGGER, "")
    return _LOGGER


def _plugin_creator(trt, name: str, version: str):
    registry = trt.get_plugin_registry()
    for getter in ("get_creator", "get_plugin_creator"):  # TensorRT >= 10 / legacy
        fn = getattr(registry, getter, None)
        if fn is None:
            continue
        try:
            creator = fn(name, version, "")
        except Exception:
            creator = None
        if creator is not None:
            return creator
    return None


def nms_capabilities(trt) -> NMSCapabilities:
    trt_logger()  # registers the plugin library
    return NMSCapabilities(
        trt_version=parse_version(trt.__version__),
        has_add_nms=hasattr(trt.INetworkDefinition, "add_nms"),
        has_efficient_nms=_plugin_creator(trt, *EFFICIENT_NMS_PLUGIN) is not None,
    )


def device_index(config: DetectorConfig) -> int:
    import torch

    if config.device == "cpu":
        raise EngineUnavailableError("engine 'tensorrt' needs a CUDA device, but device 'cpu' was asked for")
    if config.device and config.device.startswith("cuda:"):
        idx = int(config.device[5:])
        if idx >= torch.cuda.device_count():
            raise EngineUnavailableError(f"device {config.device}: only {torch.cuda.device_count()} CUDA device(s)")
        return idx
    return torch.cuda.current_device()


def gpu_identity(idx: int) -> tuple[str, tuple[int, int]]:
    import torch

    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), (int(major), int(minor))


# --- the network -------------------------------------------------------------------------


def _const(network, array: np.ndarray, keep: list, shape: tuple[int, ...] | None = None) -> Any:
    keep.append(array)  # TensorRT reads constant weights at build time: keep them alive
    return network.add_constant(array.shape if shape is None else shape, array).get_output(0)


def _gather(trt, network, x, axis: int, indices: list[int], keep: list):
    idx = _const(network, np.asarray(indices, dtype=np.int32), keep)
    return network.add_gather(x, idx, axis).get_output(0)


def append_nms(
    trt,
    network,
    head,
    *,
    layout: str,
    num_classes: int,
    nms: str,
    max_det: int,
    topk: int,
    conf: float,
    iou: float,
    trt_version: tuple[int, ...],
) -> list:
    """Replace the network output ``head`` (YOLOv8 ``[B, 4+nc, N]`` or YOLOv5
    ``[B, N, 5+nc]``) by NMS results; returns the constants to keep alive until the build.

    Boxes stay centre/size (both NMS implementations accept that coding); scores are masked
    to each anchor's best class (others -1) so class-aware NMS equals Ultralytics'
    single-label NMS."""
    keep: list = []
    network.unmark_output(head)
    if head.dtype != trt.float32:
        head = network.add_cast(head, trt.float32).get_output(0)
    if layout == "yolov8":
        t = network.add_shuffle(head)
        t.first_transpose = trt.Permutation([0, 2, 1])
        x = t.get_output(0)  # [B, N, 4 + nc]
        boxes = _gather(trt, network, x, 2, [0, 1, 2, 3], keep)
        scores = _gather(trt, network, x, 2, list(range(4, 4 + num_classes)), keep)
    elif layout == "yolov5":
        x = head  # [B, N, 5 + nc]
        boxes = _gather(trt, network, x, 2, [0, 1, 2, 3], keep)
        obj = _gather(trt, network, x, 2, [4], keep)
        cls = _gather(trt, network, x, 2, list(range(5, 5 + num_classes)), keep)
        scores = network.add_elementwise(cls, obj, trt.ElementWiseOperation.PROD).get_output(0)
    else:
        raise ValueError(f"unknown head layout {layout!r}")
    best = network.add_reduce(scores, trt.ReduceOperation.MAX, 1 << 2, True).get_output(0)  # [B, N, 1]
    is_best = network.add_elementwise(scores, best, trt.ElementWiseOperation.EQUAL).get_output(0)
    minus_one = _const(network, np.full((1, 1, 1), -1.0, dtype=np.float32), keep)
    masked = network.add_select(is_best, scores, minus_one).get_output(0)

    names = NMS_OUTPUTS[nms]
    if nms == "inms":
        # a 0-D int32 constant (one value, shape ()): the layer's MaxOutputBoxesPerClass
        max_out = _const(network, np.asarray([max_det], dtype=np.int32), keep, shape=())
        if nms_indices_type_arg(trt_version):
            layer = network.add_nms(boxes, masked, max_out, trt.int32)
        else:
            layer = network.add_nms(boxes, masked, max_out)
        layer.name = "raydetect_nms"
        layer.bounding_box_format = trt.BoundingBoxFormat.CENTER_SIZES
        layer.topk_box_limit = int(topk)
        conf_in = network.add_input(CONF_INPUT, trt.float32, ())
        iou_in = network.add_input(IOU_INPUT, trt.float32, ())
        layer.set_input(3, iou_in)
        layer.set_input(4, conf_in)
        outputs = [layer.get_output(0), layer.get_output(1), boxes, best]
    else:
        creator = _plugin_creator(trt, *EFFICIENT_NMS_PLUGIN)
        if creator is None:
            raise TensorRTBuildError("the EfficientNMS_TRT plugin is not registered in this TensorRT")

        def field(name: str, value, kind):
            arr = np.asarray([value], dtype=np.int32 if kind == trt.PluginFieldType.INT32 else np.float32)
            keep.append(arr)
            return trt.PluginField(name, arr, kind)

        i32, f32 = trt.PluginFieldType.INT32, trt.PluginFieldType.FLOAT32
        fields = trt.PluginFieldCollection(
            [
                field("background_class", -1, i32),
                field("max_output_boxes", int(max_det), i32),
                field("score_threshold", float(conf), f32),
                field("iou_threshold", float(iou), f32),
                field("box_coding", 1, i32),  # centre/size in; corners out
                field("score_activation", 0, i32),  # scores are already sigmoid-ed
                field("class_agnostic", 0, i32),
            ]
        )
        v3 = getattr(trt, "IPluginCreatorV3One", None)
        if v3 is not None and isinstance(creator, v3):
            plugin = creator.create_plugin("raydetect_efficient_nms", fields, trt.TensorRTPhase.BUILD)
            layer = network.add_plugin_v3([boxes, masked], [], plugin)
        else:
            plugin = creator.create_plugin("raydetect_efficient_nms", fields)
            layer = network.add_plugin_v2([boxes, masked], plugin)
        if layer is None:
            raise TensorRTBuildError("could not add the EfficientNMS_TRT plugin layer")
        layer.name = "raydetect_nms"
        outputs = [layer.get_output(i) for i in range(4)]
    for tensor, name in zip(outputs, names, strict=True):
        tensor.name = name
        network.mark_output(tensor)
    return keep


def build_serialized_engine(
    card: ModelCard,
    *,
    onnx_bytes: bytes,
    plan: BuildPlan,
    nms: str,
    params: dict[str, float | int],
    shapes: ProfileShapes,
    workspace_gb: float,
    timing_cache: bytes,
) -> tuple[bytes, bytes]:
    """Parse, append NMS, build. Returns (serialized engine, updated timing cache)."""
    import tensorrt as trt

    logger = trt_logger()
    version = parse_version(trt.__version__)
    if plan.convert_fp16:
        onnx_bytes = to_fp16_onnx(onnx_bytes)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.strongly_typed and strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(
                ParserError(
                    desc=str(e.desc()),
                    node_index=int(e.node()),
                    node_name=str(_call(e, "node_name")),
                    node_operator=str(_call(e, "node_operator")),
                    code=str(e.code()),
                )
            )
        message = format_parser_errors(card.url, errors)
        missing = unsupported_nodes(onnx_bytes, parser.supports_operator)
        if missing:
            shown = ", ".join(f"{n} ({op})" for n, op in missing[:10])
            message += f"\nnodes whose operator this TensorRT does not support: {shown}"
        raise UnsupportedModelError(message)
    head = next(
        (network.get_output(i) for i in range(network.num_outputs) if network.get_output(i).name == card.output_name),
        None,
    )
    if head is None:
        raise UnsupportedModelError(f"{card.url}: output {card.output_name!r} not found after parsing")
    keep = append_nms(
        trt,
        network,
        head,
        layout=card.layout,
        num_classes=card.num_classes,
        nms=nms,
        max_det=int(params["max_det"]),
        topk=int(params.get("topk", 4096)),
        conf=float(params.get("conf", 0.0)),
        iou=float(params.get("iou", 0.0)),
        trt_version=version,
    )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profile.set_shape(card.input_name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        try:
            cache = config.create_timing_cache(timing_cache)
        except Exception as e:
            log.warning("ignoring unusable timing cache (%s); starting a new one", e)
    if cache is None:
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    del keep
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build {card.url}: {logger.recent_errors()}")
    new_timing = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), new_timing


def _call(obj, name: str) -> Any:
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else ""
    except Exception:
        return ""


# --- load or build through the cache ------------------------------------------------------


@dataclass
class PreparedEngine:
    engine: Any  # tensorrt.ICudaEngine
    runtime: Any  # tensorrt.Runtime (must outlive the engine)
    key: EngineKey
    result: CacheResult
    plan: BuildPlan
    nms: str
    nms_params: dict[str, float | int]
    shapes: ProfileShapes
    device_index: int

    def precision_summary(self) -> dict[str, int]:
        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        return layer_precision_summary(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


@dataclass(frozen=True)
class EngineTarget:
    """The engine a config asks for on one GPU: its cache key and the build decisions."""

    key: EngineKey
    plan: BuildPlan
    nms: str
    nms_params: dict[str, float | int]
    shapes: ProfileShapes


def engine_target(
    card: ModelCard,
    config: DetectorConfig,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    caps: NMSCapabilities,
    quantized: bool,
) -> EngineTarget:
    """Pure: the cache key (and precision plan, NMS choice, batch profile) of the engine for
    ``card`` + ``config`` on a GPU with this TensorRT. ``raydetect build`` and every engine
    load compute it here, so the same options always name the same cached engine."""
    plan = precision_plan(parse_version(tensorrt_version), config.precision, quantized)
    try:
        nms = choose_nms(caps, config.tensorrt.nms)
        shapes = profile_shapes(config.batch_size, config.tensorrt.opt_batch, card.imgsz)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    params = nms_params(nms, max_det=config.max_det, topk=nms_topk_limit(compute_capability),
                        conf=config.conf, iou=config.iou)
    key = make_key(
        onnx_sha256=hashlib.sha256(card.onnx_bytes).hexdigest(),
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=plan.precision,
        imgsz=card.imgsz,
        batch_profile=shapes.batches,
        nms=nms,
        nms_params=params,
    )
    return EngineTarget(key, plan, nms, params, shapes)


def prepare_engine(card: ModelCard, config: DetectorConfig, *, force: bool = False) -> PreparedEngine:
    """The engine for ``card`` and ``config`` on this GPU: from the cache, or built once."""
    why = probe_availability()
    if why is not None:
        raise EngineUnavailableError(f"engine 'tensorrt' cannot run here: {why}")
    import tensorrt as trt
    import torch

    from raydetect.engines.onnxruntime import is_quantized

    idx = device_index(config)
    gpu_name, cc = gpu_identity(idx)
    target = engine_target(card, config, tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
                           compute_capability=cc, caps=nms_capabilities(trt),
                           quantized=is_quantized(card.onnx_bytes))
    key, plan, nms, params, shapes = target.key, target.plan, target.nms, target.nms_params, target.shapes
    if plan.precision == "int8":
        problems = qdq_problems(card.onnx_bytes)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            raise UnsupportedModelError(
                f"{card.url}: INT8 model TensorRT cannot build by explicit quantization: {shown}. "
                "Quantize with symmetric INT8 activations and weights (QDQ, int8 zero points = 0)"
            )
    cache = EngineCache(
        cache_dir_for(card.url, config.tensorrt.cache), config.storage, lock_timeout_s=config.tensorrt.lock_timeout_s
    )
    logger = trt_logger()
    runtime = trt.Runtime(logger)
    tname = timing_cache_name(key.tensorrt_version, key.gpu_name, key.compute_capability)

    def load(blob: bytes):
        logger.errors.clear()
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:  # e.g. a plan from another TensorRT version: say what TensorRT said
            raise RuntimeError(f"TensorRT could not deserialize it: {logger.recent_errors()}")
        return engine

    def build():
        timing = cache.read_timing_cache(tname)
        blob, new_timing = build_serialized_engine(
            card,
            onnx_bytes=card.onnx_bytes,
            plan=plan,
            nms=nms,
            params=params,
            shapes=shapes,
            workspace_gb=config.tensorrt.workspace_gb,
            timing_cache=timing,
        )
        cache.write_timing_cache(tname, new_timing)
        return blob, {"model_url": card.url, "timing_cache": tname, "timing_cache_reused": bool(timing)}

    with torch.cuda.device(idx):
        result = cache.load_or_build(key, build, load, allow_build=config.tensorrt.build, force=force)
    return PreparedEngine(result.value, runtime, key, result, plan, nms, params, shapes, idx)
