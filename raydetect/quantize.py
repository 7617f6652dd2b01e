"""INT8 post-training static quantization of a YOLO ONNX export, with an mAP gate.

``quantize`` turns the dynamic-batch graph of a :class:`~raydetect.model_card.ModelCard` into one
QDQ ONNX model (INT8 weights per channel, INT8 activations per tensor): ONNX Runtime runs it on
the CPU and TensorRT can build its INT8 engine from it. Steps:

1. pick calibration images deterministically (``seed``) and run them through the production
   decode + letterbox (:mod:`raydetect.stages.preprocess`); unreadable ones are counted and skipped;
2. collect per-tensor ranges with ONNX Runtime's calibrators (``entropy``, ``percentile`` or
   ``minmax``) in small chunks (bounded memory) and save them as a JSON calibration table,
   byte-identical for the same inputs and seed;
3. quantize with ``onnxruntime.quantization.quantize_static`` from exactly that table, keeping
   the detection head's float tail (:func:`float_tail_nodes`) and ``--exclude`` nodes in float;
4. optionally evaluate FP32 vs INT8 on a held-out labelled set and fail when mAP@0.5 drops by
   more than ``max_map_drop`` points (``try_methods`` tries each calibration method in turn and
   keeps the best one that passes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from raydetect.config import DEFAULT_IMAGE_EXTENSIONS, ConfigError, DetectorConfig, StorageConfig, validate
from raydetect.errors import RaydetectError
from raydetect.model_card import ModelCard
from raydetect.stages.preprocess import ImageError, decode_image, letterbox, to_tensor
from raydetect.storage import filesystem, is_remote_fs, list_files, to_uri

log = logging.getLogger(__name__)

Method = Literal["entropy", "percentile", "minmax"]
METHODS: tuple[str, ...] = ("entropy", "percentile", "minmax")
TABLE_FORMAT = "raydetect-calibration-table/1"
#: Name of the default exclusion rule (see :func:`float_tail_nodes`).
FLOAT_TAIL_RULE = (
    "float-tail: walking back from the graph output, every node up to and including the first "
    "Conv on each path (the last Conv of each head branch) stays float; a Conv fed by a Softmax "
    "(the DFL integral) is walked through, so the DFL Softmax/Conv and the box/class decode "
    "arithmetic stay float too; Shape/Size nodes end a path (they read shapes, not values)"
)


class CalibrationError(RaydetectError, ValueError):
    """The calibration input cannot produce a trustworthy table; the message says why."""


class QuantizeConfig(BaseModel):
    """Options of :func:`quantize` (validated at the edge; errors name the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="FP32 YOLO ONNX export (path or s3:// URL)")
    calib: str = Field(min_length=1, description="Folder / prefix of calibration images")
    out: str = Field(min_length=1, description="Where to write the INT8 QDQ model")
    images: int = Field(300, ge=1, le=100_000, description="Calibration images to use")
    method: Method = "entropy"
    exclude: tuple[str, ...] = Field((), description="Extra node names kept in float")
    float_tail: bool = Field(True, description="Keep the head's final convs and the decode in float")
    per_channel: bool = True
    activations: Literal["uint8", "int8"] = Field(
        "uint8",
        description="uint8: asymmetric activations, what ONNX Runtime's x86 CPU kernels fuse into "
        "QLinearConv (u8s8); int8: symmetric activations, the QDQ form TensorRT builds INT8 engines "
        "from (ONNX Runtime 1.32 on x86 runs it unfused, slower than FP32)",
    )
    reduce_range: bool = Field(
        True, description="7-bit weights: avoids u8s8 saturation on x86 CPUs without VNNI (AVX2)"
    )
    compact_names: bool = Field(True, description="Short names for the inserted Q/DQ nodes (smaller file)")
    seed: int = Field(0, ge=0, description="Seed of the calibration image selection")
    allow_fewer: bool = Field(False, description="Proceed (with a warning) when fewer images are usable")
    min_images: int = Field(8, ge=1, description="Fewest usable images allow_fewer accepts")
    calib_batch: int = Field(4, ge=1, le=256, description="Images per calibration run (memory bound)")
    table: str | None = Field(None, description="Calibration table path (default: <out>.calib.json)")
    eval_data: str | None = Field(None, description="Held-out labelled set for the mAP gate")
    eval_split: str | None = "test"
    eval_limit: int | None = Field(None, ge=1, description="Evaluate N images of eval_data (seeded)")
    max_map_drop: float = Field(1.0, ge=0.0, le=100.0, description="Max mAP@0.5 drop in points")
    try_methods: bool = False
    eval_cache: str | None = Field(
        None, description="Directory of cached evaluations (default $RAYDETECT_EVAL_CACHE or ~/.cache/raydetect/eval)"
    )
    reuse_fp32: bool = Field(
        True, description="Reuse a cached FP32 evaluation of the same model, images and settings (and cache a new one)"
    )
    threads: int | None = Field(None, ge=1, le=512)
    extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS
    storage: StorageConfig = StorageConfig()


# --- calibration images -------------------------------------------------------------------------


@dataclass
class CalibrationSet:
    root: str
    files: list[str]  # chosen files (URLs / paths), in feeding order
    encoded: list[bytes] = field(repr=False)
    unreadable: list[dict[str, str]]  # {"uri", "error"} of skipped files
    asked: int
    available: int  # image files found under root

    def tensors(self, imgsz: tuple[int, int], batch: int, max_pixels: int, max_bytes: int) -> Iterator[np.ndarray]:
        """Letterboxed NCHW float32 batches, exactly as the detector prepares images."""
        h, w = imgsz
        for start in range(0, len(self.encoded), batch):
            boxed = [
                letterbox(decode_image(b, max_pixels, max_bytes), h, w)[0]
                for b in self.encoded[start : start + batch]
            ]
            yield to_tensor(boxed)


def select_calibration_images(
    root: str,
    images: int,
    *,
    seed: int = 0,
    allow_fewer: bool = False,
    min_images: int = 8,
    storage: StorageConfig | None = None,
    extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
    max_pixels: int = 40_000_000,
    max_bytes: int = 64 * 1024 * 1024,
) -> CalibrationSet:
    """Choose ``images`` decodable images under ``root`` in a seeded random order; undecodable
    files are skipped and counted. Fewer usable images than asked is an error unless
    ``allow_fewer`` (then at least ``min_images``)."""
    try:
        fs, files = list_files(root, extensions, storage)
    except FileNotFoundError:
        raise CalibrationError(f"calibration input not found: {root}") from None
    if not files:
        raise CalibrationError(f"no images ({', '.join(extensions)}) under {root}")
    order = np.random.default_rng(seed).permutation(len(files))
    chosen: list[str] = []
    encoded: list[bytes] = []
    bad: list[dict[str, str]] = []
    for i in order:
        if len(chosen) == images:
            break
        path = files[int(i)]
        uri = to_uri(fs, path)
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
            decode_image(data, max_pixels, max_bytes)
        except (ImageError, OSError) as e:
            bad.append({"uri": uri, "error": str(e)})
            continue
        chosen.append(uri)
        encoded.append(data)
    if bad:
        log.warning("%d unreadable calibration images skipped (first: %s: %s)", len(bad), bad[0]["uri"], bad[0]["error"])
    if len(chosen) < images:
        found = (
            f"asked for {images} calibration images but only {len(chosen)} of the {len(files)} image "
            f"files under {root} are usable ({len(bad)} unreadable"
            + (f", e.g. {bad[0]['uri']}: {bad[0]['error']}" if bad else "")
            + ")"
        )
        if not allow_fewer:
            raise CalibrationError(f"{found}; ask for fewer with --images or pass --allow-fewer")
        if len(chosen) < min_images:
            raise CalibrationError(f"{found}; at least {min_images} are needed")
        log.warning("%s; proceeding with %d (--allow-fewer)", found, len(chosen))
    return CalibrationSet(root, chosen, encoded, bad, images, len(files))


# --- the float tail -------------------------------------------------------------------------------


def _ensure_node_names(model: onnx.ModelProto) -> None:
    """Name unnamed nodes (the quantizer excludes nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def float_tail_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes of the default exclusion rule :data:`FLOAT_TAIL_RULE`, in graph order.

    For a YOLOv8/YOLO11 ``Detect`` head these are the final 1x1 Conv of every cv2/cv3 branch,
    the Reshape/Concat that gather them, the DFL (Reshape, Transpose, Softmax, Conv), the
    anchor/stride box decode (Slice, Sub, Add, Div, Mul) and the class Sigmoid; for a YOLOv5
    head the final Convs and the grid decode."""
    producer = {o: n for n in model.graph.node for o in n.output}
    tail: set[str] = set()
    stack = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        tail.add(node.name)
        if node.op_type == "Conv":
            src = producer.get(node.input[0])
            if src is None or src.op_type != "Softmax":
                continue  # the last conv of a branch: stop here
        if node.op_type in ("Shape", "Size"):
            continue  # reads only the shape (dynamic-shape anchor grids), not the values
        stack.extend(i for i in node.input if i)
    return [n.name for n in model.graph.node if n.name in tail]


# --- the calibration table --------------------------------------------------------------------------


@dataclass
class CalibrationTable:
    """Per-tensor activation ranges (float32) and how they were made."""

    method: str
    ranges: dict[str, tuple[float, float]]
    model_sha256: str
    seed: int
    images: list[str]  # calibration images, relative to ``root`` where possible
    image_sha256: str  # over the encoded bytes of all images, in feeding order
    root: str
    imgsz: tuple[int, int]
    onnxruntime: str

    def to_json(self) -> str:
        """Deterministic text: sorted keys, float32 values written as the shortest decimal that
        round-trips (``repr`` of the float32 value as a float64)."""
        doc = {
            "format": TABLE_FORMAT,
            "method": self.method,
            "model_sha256": self.model_sha256,
            "seed": self.seed,
            "root": self.root,
            "images": list(self.images),
            "image_sha256": self.image_sha256,
            "imgsz": list(self.imgsz),
            "onnxruntime": self.onnxruntime,
            "ranges": {k: [_f32(lo), _f32(hi)] for k, (lo, hi) in self.ranges.items()},
        }
        return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "<table>") -> CalibrationTable:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not a calibration table ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
            raise CalibrationError(f"{where}: not a {TABLE_FORMAT} file")
        ranges = {k: (_f32(v[0]), _f32(v[1])) for k, v in doc["ranges"].items()}
        return cls(
            method=doc["method"],
            ranges=ranges,
            model_sha256=doc["model_sha256"],
            seed=doc["seed"],
            images=list(doc["images"]),
            image_sha256=doc["image_sha256"],
            root=doc["root"],
            imgsz=tuple(doc["imgsz"]),
            onnxruntime=doc["onnxruntime"],
        )

    def tensors_data(self):
        """The ranges as ONNX Runtime's ``TensorsData`` (what ``quantize_static`` consumes)."""
        from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData

        method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                  "minmax": CalibrationMethod.MinMax}[self.method]
        return TensorsData(
            method,
            {
                k: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
                for k, (lo, hi) in self.ranges.items()
            },
        )


def _f32(v: Any) -> float:
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size != 1:
        raise CalibrationError(f"expected one value per tensor (per-tensor ranges), got shape {np.shape(v)}")
    return float(a[0])


def save_table(table: CalibrationTable, path: str, storage: StorageConfig | None = None) -> None:
    _write_bytes(path, table.to_json().encode(), storage)


def load_table(path: str, storage: StorageConfig | None = None) -> CalibrationTable:
    fs, p = filesystem(path, storage)
    if not fs.exists(p):
        raise FileNotFoundError(f"calibration table not found: {path}")
    with fs.open(p, "rb") as f:
        return CalibrationTable.from_json(f.read().decode(), path)


def _write_bytes(path: str, data: bytes, storage: StorageConfig | None) -> None:
    fs, p = filesystem(path, storage)
    parent = posixpath.dirname(p)
    if parent and not is_remote_fs(fs):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "wb") as f:
        f.write(data)


class _ListReader:
    """ONNX Runtime calibration data reader over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def calibrate(
    card: ModelCard,
    calib: CalibrationSet,
    method: str,
    *,
    workdir: str,
    batch: int = 4,
    seed: int = 0,
    max_pixels: int = 40_000_000,
    max_bytes: int = 64 * 1024 * 1024,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationTable:
    """Run the calibration images through ONNX Runtime's calibrator for ``method`` (chunk by
    chunk, so memory stays bounded) and return the per-tensor ranges."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if method not in METHODS:
        raise ConfigError(f"quantize.method: must be one of {list(METHODS)} (got {method!r})")
    model_path = os.path.join(workdir, "fp32.onnx")
    if not os.path.exists(model_path):
        onnx.save_model(_named_model(card), model_path)
    cm = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
          "minmax": CalibrationMethod.MinMax}[method]
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    calibrator = create_calibrator(
        model_path,
        op_types,
        augmented_model_path=os.path.join(workdir, f"augmented-{method}.onnx"),
        calibrate_method=cm,
        providers=["CPUExecutionProvider"],
        extra_options={},
    )
    n = 0
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector print()s progress
        for x in calib.tensors(card.imgsz, batch, max_pixels, max_bytes):
            calibrator.collect_data(_ListReader([{card.input_name: x}]))
            n += len(x)
            log.debug("calibrated %d/%d images", n, len(calib.files))
            if progress is not None:
                progress(n, len(calib.files))
        tensors = calibrator.compute_data()
    log.info("calibration (%s) on %d images took %.1f s", method, n, time.perf_counter() - t0)
    ranges = {k: (_f32(v.range_value[0]), _f32(v.range_value[1])) for k, v in tensors.items()}
    digest = hashlib.sha256()
    for b in calib.encoded:
        digest.update(hashlib.sha256(b).digest())
    return CalibrationTable(
        method=method,
        ranges=dict(sorted(ranges.items())),
        model_sha256=card.sha256,
        seed=seed,
        images=[_relative(u, calib.root) for u in calib.files],
        image_sha256=digest.hexdigest(),
        root=calib.root,
        imgsz=tuple(card.imgsz),
        onnxruntime=ort.__version__,
    )


def _relative(uri: str, root: str) -> str:
    r = root.rstrip("/")
    if uri.startswith(r + "/"):
        return uri[len(r) + 1 :]
    ra = os.path.abspath(root) if "://" not in root else r
    if uri.startswith(ra.rstrip("/") + "/"):
        return uri[len(ra.rstrip("/")) + 1 :]
    return uri


def _named_model(card: ModelCard) -> onnx.ModelProto:
    model = onnx.load_model_from_string(card.onnx_bytes)
    _ensure_node_names(model)
    return model


# --- quantization -------------------------------------------------------------------------------------


def quantize_from_table(
    card: ModelCard,
    table: CalibrationTable,
    out_path: str,
    *,
    exclude: Sequence[str],
    per_channel: bool = True,
    activations: str = "uint8",
    reduce_range: bool = True,
    compact_names: bool = True,
    workdir: str,
    metadata: dict[str, str] | None = None,
    quant_format: str = "QDQ",
    op_types: Sequence[str] | None = None,
    declared_io: dict[str, list[int | str]] | None = None,
) -> None:
    """Write the QDQ model for ``card`` quantized with the ranges of ``table`` to the local
    file ``out_path``; ``exclude`` nodes stay float. ``declared_io`` (:func:`declared_io`):
    the input/output shapes the source export declares, written back into the QDQ model (the
    quantizer works on the card's dynamic-batch graph). ``quant_format`` "QOperator" and a
    restricted ``op_types`` exist for comparisons (benchmarks/int8_variants.py)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static, save_tensors_data

    if table.model_sha256 != card.sha256:
        raise CalibrationError(
            f"calibration table was made for model {table.model_sha256[:12]}…, not {card.sha256[:12]}…"
        )
    model_path = os.path.join(workdir, "fp32.onnx")
    if not os.path.exists(model_path):
        onnx.save_model(_named_model(card), model_path)
    cache = os.path.join(workdir, f"ort-cache-{table.method}.json")
    if os.path.exists(cache):
        os.remove(cache)
    save_tensors_data(table.tensors_data(), cache)
    act = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
    with _quiet_preprocess_advice():
        quantize_static(
            model_path,
            out_path,
            calibration_data_reader=None,
            calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=act,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=table.tensors_data().calibration_method,
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True},
        )
    m = onnx.load_model(out_path)
    if declared_io:
        restore_declared_io(m, declared_io)
    if compact_names:
        compact_qdq_names(m)
    if metadata:
        props = {p.key: p.value for p in m.metadata_props}
        props.update(metadata)
        del m.metadata_props[:]
        for k, v in props.items():
            m.metadata_props.add(key=k, value=v)
    onnx.save_model(m, out_path)


def declared_io(raw: bytes, card: ModelCard) -> dict[str, list[int | str]]:
    """The shapes the source export declares for the card's input and detection output
    (``[1, 3, 640, 640]`` for a static Ultralytics export; names for dynamic dims)."""
    from raydetect.model_card import _dims

    g = onnx.load_model_from_string(raw).graph
    return {vi.name: _dims(vi) for vi in [*g.input, *g.output] if vi.name in (card.input_name, card.output_name)}


def restore_declared_io(model: onnx.ModelProto, declared: dict[str, list[int | str]]) -> None:
    """Give the graph inputs/outputs named in ``declared`` those shapes again, so the INT8 model
    declares what the source declared (a static batch of 1 stays 1: tools that size their
    batches from the declaration, such as Ultralytics' ``val``, read it as they read the source;
    raydetect rewrites the batch dimension at load, as for the source). The intermediate shape
    annotations (``value_info``) of the dynamic graph are dropped; ONNX Runtime infers them."""
    for vi in [*model.graph.input, *model.graph.output]:
        dims = declared.get(vi.name)
        if dims is None:
            continue
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif d != "?":  # "?": declared without a value or a name
                dim.dim_param = d
    del model.graph.value_info[:]


@contextlib.contextmanager
def _quiet_preprocess_advice():
    """quantize_static logs "consider pre-processing" twice on the root logger; the YOLO exports
    are already simplified (onnxsim), so keep that advice out of the user's output."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def compact_qdq_names(model: onnx.ModelProto) -> int:
    """Give the QuantizeLinear/DequantizeLinear nodes the quantizer inserted, their outputs and the
    initializers only they read (scales, zero points, quantized weights) short names (``q12``,
    ``q12_s``…). The computation is unchanged, original tensor names stay (the calibration table
    refers to them); the names alone are ~4 % of a YOLOv8n INT8 file. Returns bytes saved."""
    g = model.graph
    before = model.ByteSize()
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    qdq_ids = {id(n) for n in qdq}
    protected = {o.name for o in g.output} | {i.name for i in g.input}
    readers: dict[str, set[int]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, set()).add(id(n))
    inits = {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    for k, n in enumerate(qdq):
        n.name = f"q{k}"
        for j, o in enumerate(n.output):
            if o not in protected:
                rename[o] = f"q{k}" if j == 0 else f"q{k}_{j}"
        for j, i in enumerate(n.input):
            if i in inits and i not in rename and i not in protected and readers.get(i, set()) <= qdq_ids:
                rename[i] = f"q{k}_" + "wsz"[j] if j < 3 else f"q{k}_i{j}"
    for n in g.node:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]
        for j, o in enumerate(n.output):
            if o in rename:
                n.output[j] = rename[o]
    for t in g.initializer:
        if t.name in rename:
            t.name = rename[t.name]
    for v in g.value_info:
        if v.name in rename:
            v.name = rename[v.name]
    return before - model.ByteSize()


@dataclass
class Attempt:
    method: str
    table: str | None
    int8_map50: float | None = None
    int8_map50_95: float | None = None
    drop_points: float | None = None
    passed: bool | None = None  # None: no gate
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    model: str
    model_sha256: str
    out: str | None  # None when nothing passed the gate
    method: str | None
    table: str | None
    exclusions: list[str]
    exclusion_rule: str | None
    user_exclusions: list[str]
    per_channel: bool
    activations: str
    reduce_range: bool
    quant_format: str
    calibration: dict[str, Any]
    attempts: list[Attempt]
    fp32: dict[str, Any] | None
    int8: dict[str, Any] | None
    max_map_drop: float | None
    drop_points: float | None
    passed: bool | None
    fp32_bytes: int
    int8_bytes: int | None
    seconds: float
    fp32_reused: str | None = None  # the cached FP32 evaluation used instead of evaluating again

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eval_summary(report) -> dict[str, Any]:
    return {
        "map50": report.map50,
        "map50_95": report.map50_95,
        "images": report.images_evaluated,
        "engine": report.engine,
        "precision": report.precision,
        "per_class": [asdict(c) for c in report.per_class],
        "data": report.data,
        "split": report.split,
    }


def quantize(cfg: QuantizeConfig | dict[str, Any], *, progress: bool = False) -> QuantizeReport:
    """Calibrate, quantize and (with ``eval_data``) gate; see the module docstring.
    ``progress``: show the progress of the calibration and of each evaluation on stderr
    (:class:`raydetect.progress.Progress`; the CLI sets it)."""
    from raydetect.progress import Progress

    def step(desc: str) -> Progress | contextlib.nullcontext:
        return Progress(desc, unit="images") if progress else contextlib.nullcontext()

    if not isinstance(cfg, QuantizeConfig):
        cfg = validate(QuantizeConfig, cfg, "quantize")
    t_start = time.perf_counter()
    storage = cfg.storage
    raw = read_model_bytes(cfg.model, storage)
    card = ModelCard.from_bytes(raw, cfg.model)  # not a YOLO export → UnsupportedModelError
    declared = declared_io(raw, card)
    from raydetect.engines.onnxruntime import is_quantized

    if is_quantized(card.onnx_bytes):
        raise ConfigError(f"quantize.model: {cfg.model} is already quantized (it has QDQ / integer ops)")
    if cfg.try_methods and not cfg.eval_data:
        raise ConfigError("quantize.try_methods: needs eval_data to compare the methods")
    named = _named_model(card)
    all_nodes = {n.name for n in named.graph.node}
    unknown = [n for n in cfg.exclude if n not in all_nodes]
    if unknown:
        raise ConfigError(f"quantize.exclude: no node named {unknown} in {cfg.model}")
    tail = float_tail_nodes(named) if cfg.float_tail else []
    exclusions = list(dict.fromkeys([*tail, *cfg.exclude]))
    log.info("kept in float (%d nodes): %s", len(exclusions), ", ".join(exclusions))

    calib = select_calibration_images(
        cfg.calib, cfg.images, seed=cfg.seed, allow_fewer=cfg.allow_fewer, min_images=cfg.min_images,
        storage=storage, extensions=cfg.extensions,
    )
    log.info("calibrating on %d images from %s (seed %d)", len(calib.files), cfg.calib, cfg.seed)

    dataset = None
    fp32 = None
    fp32_reused = None
    if cfg.eval_data:
        from raydetect.evaluate import load_dataset

        dataset = load_dataset(cfg.eval_data, cfg.eval_split, storage)  # fail early on a bad set

    methods = [cfg.method] + [m for m in METHODS if m != cfg.method] if cfg.try_methods else [cfg.method]
    table_path = cfg.table or _sibling(cfg.out, ".calib.json")
    attempts: list[Attempt] = []
    best: tuple[Attempt, str, Any, CalibrationTable] | None = None
    with tempfile.TemporaryDirectory(prefix="raydetect-quant-") as work:
        onnx.save_model(named, os.path.join(work, "fp32.onnx"))
        for method in methods:
            t0 = time.perf_counter()
            with step(f"calibration ({method})") as bar:
                table = calibrate(card, calib, method, workdir=work, batch=cfg.calib_batch, seed=cfg.seed,
                                  progress=bar)
            # quantize from the table as saved, so the artefact is reproducible from the JSON
            table = CalibrationTable.from_json(table.to_json())
            out_local = os.path.join(work, f"int8-{method}.onnx")
            quantize_from_table(
                card, table, out_local, exclude=exclusions, per_channel=cfg.per_channel,
                activations=cfg.activations, reduce_range=cfg.reduce_range, workdir=work,
                compact_names=cfg.compact_names,
                metadata=_provenance(cfg, method, exclusions, table), declared_io=declared,
            )
            att = Attempt(method=method, table=None)
            int8 = None
            if dataset is not None:
                from raydetect.evaluate import evaluate_model

                if fp32 is None:
                    fp32, fp32_reused = _fp32_evaluation(cfg, card, dataset, step)
                with step(f"INT8 evaluation ({method})") as bar:
                    int8 = evaluate_model(out_local, dataset, engine="onnxruntime", limit=cfg.eval_limit,
                                          seed=cfg.seed, threads=cfg.threads, storage=storage, progress=bar)
                att.int8_map50, att.int8_map50_95 = int8.map50, int8.map50_95
                att.drop_points = round((fp32.map50 - int8.map50) * 100, 4)
                att.passed = att.drop_points <= cfg.max_map_drop
                log.info("INT8 (%s): %s; mAP@0.5 drop %.2f points: %s", method, int8.line(),
                         att.drop_points, "pass" if att.passed else "FAIL")
            att.seconds = time.perf_counter() - t0
            attempts.append(att)
            if best is None or _rank(att) > _rank(best[0]):
                best = (att, out_local, int8, table)
            if att.passed is not False and not cfg.try_methods:
                break
        att, out_local, int8, table = best
        ok = att.passed is not False
        out = None
        int8_bytes = os.path.getsize(out_local)
        if ok:
            with open(out_local, "rb") as f:
                _write_bytes(cfg.out, f.read(), storage)
            save_table(table, table_path, storage)
            att.table = table_path
            out = cfg.out
    return QuantizeReport(
        model=cfg.model,
        model_sha256=card.sha256,
        out=out,
        method=att.method,
        table=table_path if ok else None,
        exclusions=exclusions,
        exclusion_rule=FLOAT_TAIL_RULE if cfg.float_tail else None,
        user_exclusions=list(cfg.exclude),
        per_channel=cfg.per_channel,
        activations=cfg.activations,
        reduce_range=cfg.reduce_range,
        quant_format="QDQ",
        calibration={
            "root": cfg.calib,
            "asked": cfg.images,
            "used": len(calib.files),
            "available": calib.available,
            "unreadable": calib.unreadable,
            "seed": cfg.seed,
        },
        attempts=attempts,
        fp32=_eval_summary(fp32) if fp32 else None,
        int8=_eval_summary(int8) if int8 else None,
        max_map_drop=cfg.max_map_drop if dataset is not None else None,
        drop_points=att.drop_points,
        passed=att.passed,
        fp32_bytes=len(raw),
        int8_bytes=int8_bytes,
        seconds=time.perf_counter() - t_start,
        fp32_reused=fp32_reused,
    )


def _fp32_evaluation(cfg: QuantizeConfig, card: ModelCard, dataset, step) -> tuple[Any, str | None]:
    """The FP32 evaluation of the gate: from the evaluation cache when it holds one of the same
    model (sha256), images (sample, ground truth) and settings (``raydetect eval`` and earlier
    ``quantize`` runs write it), else evaluated now and cached. Returns (report, cache path if
    reused)."""
    from raydetect.evaluate import (
        VAL_CONF,
        VAL_IOU,
        VAL_MAX_DET,
        default_eval_cache,
        eval_key,
        evaluate_model,
        load_cached_eval,
        store_eval,
    )

    cache = cfg.eval_cache or default_eval_cache()
    key = fields = None
    if cfg.reuse_fp32:
        key, fields = eval_key(card.sha256, dataset, engine="onnxruntime", precision="fp32", conf=VAL_CONF,
                               iou=VAL_IOU, max_det=VAL_MAX_DET, limit=cfg.eval_limit, seed=cfg.seed,
                               max_pixels=DetectorConfig.model_fields["max_pixels"].default, storage=cfg.storage)
        hit = load_cached_eval(cache, key)
        if hit is not None:
            fp32, path = hit
            log.info("FP32: reusing the evaluation in %s (model %s…, same %d images and settings; "
                     "--no-reuse-fp32 evaluates again): %s", path, card.sha256[:12], fp32.images, fp32.line())
            return fp32, path
    with step("FP32 evaluation") as bar:
        fp32 = evaluate_model(cfg.model, dataset, engine="onnxruntime", limit=cfg.eval_limit, seed=cfg.seed,
                              threads=cfg.threads, storage=cfg.storage, progress=bar)
    log.info("FP32: %s", fp32.line())
    if key is not None and not fp32.errors:
        try:
            store_eval(cache, key, fields, fp32)
        except OSError as e:
            log.warning("could not cache the FP32 evaluation in %s: %s", cache, e)
    return fp32, None


def _rank(a: Attempt) -> tuple[bool, float]:
    """Passing attempts first, then the higher INT8 mAP@0.5 (ties: the earlier attempt)."""
    return (a.passed is not False, a.int8_map50 or 0.0)


def read_model_bytes(url: str, storage: StorageConfig | None) -> bytes:
    from raydetect.storage import read_bytes

    return read_bytes(url, storage)


def _sibling(path: str, suffix: str) -> str:
    base = path[: -len(".onnx")] if path.endswith(".onnx") else path
    return base + suffix


def _provenance(cfg: QuantizeConfig, method: str, exclusions: list[str], table: CalibrationTable) -> dict[str, str]:
    return {
        "raydetect_quantization": json.dumps(
            {
                "method": method,
                "format": "QDQ",
                "per_channel": cfg.per_channel,
                "activations": cfg.activations,
                "reduce_range": cfg.reduce_range,
                "compact_names": cfg.compact_names,
                "exclusions": exclusions,
                "calibration_images": len(table.images),
                "calibration_seed": cfg.seed,
                "calibration_sha256": hashlib.sha256(table.to_json().encode()).hexdigest(),
                "fp32_sha256": table.model_sha256,
            },
            sort_keys=True,
        )
    }
