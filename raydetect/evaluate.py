"""Accuracy of a detector on a labelled set: COCO-style mAP computed by pycocotools.

Labelled sets come in two formats:

* YOLO txt: ``images/<split>/x.jpg`` with ``labels/<split>/x.txt`` (one ``class cx cy w h`` line per
  object, normalised to the image size), given as the dataset root, an images directory, or a
  ``data.yaml`` (Ultralytics' dataset description: ``path``, split entries, ``names``);
* COCO json: an ``instances.json`` (``images``, ``annotations`` with pixel ``bbox``, ``categories``)
  whose ``file_name`` entries are relative to an image root (``images=``, default the json's folder).

Images run through :meth:`raydetect.detector.Detector.detect`, the same code path as the batch
job and the online endpoint, on whatever engine the detector uses. YOLO boxes are converted to
pixel COCO boxes with the size of the decoded image; the ground truth and the detections then
go to ``pycocotools.cocoeval.COCOeval`` (mAP@0.5 and mAP@0.5:0.95 averaged over the classes that
have ground truth, 101-point interpolation). Differences to Ultralytics' ``val`` are listed in
:data:`CONVENTIONS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from raydetect.config import DEFAULT_IMAGE_EXTENSIONS, DetectorConfig, EvalConfig, StorageConfig
from raydetect.errors import RaydetectError
from raydetect.storage import filesystem, is_remote_fs, to_uri
from raydetect.types import ImageResult

log = logging.getLogger(__name__)

#: Ultralytics' validation defaults, which ``raydetect eval`` uses too.
VAL_CONF = 0.001
VAL_IOU = 0.7
VAL_MAX_DET = 300

CONVENTIONS = (
    "pycocotools COCOeval (bbox): AP averaged over IoU 0.50:0.05:0.95 and over classes with ground "
    "truth, 101-point interpolated precision, maxDets = max_det (not COCO's 100), area range 'all'. "
    "Detections: conf 0.001, NMS IoU 0.7, max_det 300 as Ultralytics val. Remaining differences to "
    "Ultralytics val: images are letterboxed to the full model input (e.g. 640x640) instead of "
    "Ultralytics' rectangular minimal-padding batches; one label per box (the best class) instead of "
    "Ultralytics val's multi-label NMS; COCO matching (greedy by score) instead of Ultralytics' own "
    "matcher and AP integration."
)


class DatasetError(RaydetectError, ValueError):
    """The labelled set cannot be read: the message names the file and the problem."""


# --- labelled sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruth:
    """One box in pixel COCO form: top-left x, y, width, height."""

    class_id: int
    x: float
    y: float
    w: float
    h: float


@dataclass
class LabelledImage:
    uri: str  # what the detector reads (path or URL)
    label_uri: str | None = None  # YOLO txt; None with boxes set for COCO input
    boxes: list[GroundTruth] | None = None  # pixel boxes (COCO input)
    width: int | None = None  # from the COCO json, checked against the decoded image
    height: int | None = None


@dataclass
class LabelledSet:
    images: list[LabelledImage]
    names: dict[int, str]  # class id (model index) → name; may be empty for YOLO dirs without yaml
    format: str  # "yolo" or "coco"
    source: str
    split: str | None = None
    #: COCO input: model class index → COCO category id (identity for YOLO input)
    category_ids: dict[int, int] = field(default_factory=dict)


def yolo_to_coco_box(cx: float, cy: float, w: float, h: float, width: int, height: int) -> tuple[float, ...]:
    """Normalised YOLO centre box → pixel COCO (x, y, w, h) for an image of width x height."""
    return ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)


def parse_yolo_labels(text: str, where: str) -> list[tuple[int, float, float, float, float]]:
    """Lines ``class cx cy w h`` (normalised) → tuples. Polygon lines (``class x1 y1 x2 y2 …``,
    Ultralytics segment labels) become their bounding box, as Ultralytics does."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls_f = float(parts[0])
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{where}:{n}: not numbers: {line.strip()!r}") from None
        if cls_f != int(cls_f) or cls_f < 0:
            raise DatasetError(f"{where}:{n}: class id must be a non-negative integer, got {parts[0]!r}")
        if len(vals) == 4:
            cx, cy, w, h = vals
        elif len(vals) >= 6 and len(vals) % 2 == 0:
            xs, ys = vals[0::2], vals[1::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise DatasetError(
                f"{where}:{n}: expected 'class cx cy w h' (or a polygon), got {len(parts)} values"
            )
        if w < 0 or h < 0 or not all(np.isfinite([cx, cy, w, h])):
            raise DatasetError(f"{where}:{n}: invalid box {line.strip()!r}")
        if max(cx, cy, w, h) > 1.5:
            raise DatasetError(f"{where}:{n}: coordinates must be normalised to [0, 1]: {line.strip()!r}")
        out.append((int(cls_f), cx, cy, w, h))
    return out


def _img2label(path: str) -> str:
    """Ultralytics' rule: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
    if "/images/" not in path:
        raise DatasetError(f"{path}: cannot find the labels of an image outside an 'images/' folder")
    head, tail = path.rsplit("/images/", 1)
    return posixpath.splitext(head + "/labels/" + tail)[0] + ".txt"


def _names(v: Any, where: str) -> dict[int, str]:
    if v is None:
        return {}
    if isinstance(v, dict):
        return {int(k): str(n) for k, n in v.items()}
    if isinstance(v, list):
        return dict(enumerate(str(n) for n in v))
    raise DatasetError(f"{where}: 'names' must be a list or a mapping, got {type(v).__name__}")


def _image_files(fs, path: str, exts: Sequence[str]) -> list[str]:
    exts = tuple(e.lower() for e in exts)
    return sorted(p for p in fs.find(path) if p.lower().endswith(exts))


def load_dataset(
    data: str,
    split: str | None = "test",
    storage: StorageConfig | None = None,
    images: str | None = None,
    extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
) -> LabelledSet:
    """Open a labelled set: a YOLO ``data.yaml``, a YOLO dataset root (``images/``,
    ``labels/``), a YOLO images folder, or a COCO json (``images`` = its image root)."""
    fs, path = filesystem(data, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"labelled set not found: {data}")
    low = path.lower()
    if fs.isfile(path) and low.endswith((".yaml", ".yml")):
        return _load_yaml(fs, path, data, split, extensions)
    if fs.isfile(path) and low.endswith(".json"):
        return _load_coco(fs, path, data, images, storage, extensions)
    if fs.isfile(path):
        raise DatasetError(f"{data}: expected a directory, a data.yaml or a COCO .json file")
    for name in ("data.yaml", "data.yml"):
        if fs.isfile(posixpath.join(path, name)):
            return _load_yaml(fs, posixpath.join(path, name), data, split, extensions)
    img_root = posixpath.join(path, "images")
    if fs.isdir(img_root):
        if split and fs.isdir(posixpath.join(img_root, split)):
            return _yolo_set(fs, posixpath.join(img_root, split), data, split, {}, extensions)
        if split and any(fs.isdir(p) for p in fs.ls(img_root, detail=False)):
            raise DatasetError(f"{data}: no split {split!r} under images/ (found {_subdirs(fs, img_root)})")
        return _yolo_set(fs, img_root, data, None, {}, extensions)
    return _yolo_set(fs, path, data, None, {}, extensions)


def _subdirs(fs, path: str) -> list[str]:
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _yolo_set(fs, img_dir: str, source: str, split, names, extensions) -> LabelledSet:
    files = _image_files(fs, img_dir, extensions)
    if not files:
        raise DatasetError(f"{source}: no images ({', '.join(extensions)}) under {to_uri(fs, img_dir)}")
    items = [LabelledImage(uri=to_uri(fs, f), label_uri=to_uri(fs, _img2label(f))) for f in files]
    return LabelledSet(items, names, "yolo", source, split)


def _load_yaml(fs, path: str, source: str, split: str | None, extensions) -> LabelledSet:
    import yaml

    with fs.open(path, "rb") as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise DatasetError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise DatasetError(f"{source}: expected a mapping with 'names' and split entries")
    names = _names(cfg.get("names"), source)
    base = posixpath.dirname(path)
    root = cfg.get("path") or "."
    root = root if posixpath.isabs(root) else posixpath.normpath(posixpath.join(base, root))
    if split is None:
        split = "test" if cfg.get("test") else "val"
    entry = cfg.get(split)
    if not entry:
        found = [k for k in ("train", "val", "test") if cfg.get(k)]
        raise DatasetError(f"{source}: no {split!r} split (it has {found})")
    entries = entry if isinstance(entry, list) else [entry]
    files: list[str] = []
    for e in entries:
        p = e if posixpath.isabs(str(e)) else posixpath.join(root, str(e))
        if fs.isdir(p):
            files += _image_files(fs, p, extensions)
        elif fs.isfile(p) and p.endswith(".txt"):  # a list of image paths, relative to root
            with fs.open(p, "r") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        files.append(line if posixpath.isabs(line) else posixpath.normpath(posixpath.join(root, line)))
        else:
            raise DatasetError(f"{source}: split {split!r} entry {e!r} not found at {to_uri(fs, p)}")
    if not files:
        raise DatasetError(f"{source}: split {split!r} has no images")
    items = [LabelledImage(uri=to_uri(fs, f), label_uri=to_uri(fs, _img2label(f))) for f in sorted(files)]
    return LabelledSet(items, names, "yolo", source, split)


def _load_coco(fs, path: str, source: str, images: str | None, storage, extensions) -> LabelledSet:
    with fs.open(path, "rb") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{source}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{source}: a COCO file needs a list {key!r}")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    names = {i: str(c["name"]) for i, c in enumerate(cats)}
    category_ids = {i: int(c["id"]) for i, c in enumerate(cats)}
    cat_to_idx = {v: k for k, v in category_ids.items()}
    if images is not None:
        img_fs, img_root = filesystem(images, storage)
    else:
        img_fs, img_root = fs, posixpath.dirname(path)
    by_image: dict[int, list[GroundTruth]] = {}
    for a in doc["annotations"]:
        if a.get("iscrowd", 0):
            continue  # crowd regions are ignored (as for detections that match them)
        if a["category_id"] not in cat_to_idx:
            raise DatasetError(f"{source}: annotation {a.get('id')} has unknown category {a['category_id']}")
        x, y, w, h = (float(v) for v in a["bbox"])
        by_image.setdefault(a["image_id"], []).append(GroundTruth(cat_to_idx[a["category_id"]], x, y, w, h))
    items = []
    for im in sorted(doc["images"], key=lambda i: i["file_name"]):
        uri = to_uri(img_fs, posixpath.join(img_root, im["file_name"]))
        items.append(
            LabelledImage(
                uri=uri, boxes=by_image.get(im["id"], []), width=im.get("width"), height=im.get("height")
            )
        )
    if not items:
        raise DatasetError(f"{source}: no images")
    return LabelledSet(items, names, "coco", source, None, category_ids)


# --- mAP --------------------------------------------------------------------------------------


@dataclass
class ClassAP:
    class_id: int
    name: str
    instances: int
    ap50: float | None  # None: the class has no ground truth in the set
    ap50_95: float | None


@dataclass
class MapResult:
    map50: float
    map50_95: float
    per_class: list[ClassAP]


def coco_map(
    gt_images: list[dict],
    gt_boxes: list[dict],
    detections: list[dict],
    names: dict[int, str],
    max_det: int = VAL_MAX_DET,
) -> MapResult:
    """mAP with pycocotools. ``gt_images``: ``{"id", "width", "height"}``; ``gt_boxes``:
    ``{"image_id", "category_id", "bbox": [x, y, w, h]}``; ``detections``: the same plus
    ``score``. Category ids are the keys of ``names``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = sorted(names)
    gt = {
        "images": [dict(im) for im in gt_images],
        "annotations": [
            {**b, "id": i + 1, "iscrowd": 0, "area": float(b["bbox"][2] * b["bbox"][3])}
            for i, b in enumerate(gt_boxes)
        ],
        "categories": [{"id": c, "name": names[c]} for c in cat_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(list(detections)) if detections else COCO()
        if not detections:
            coco_dt.dataset = {"images": gt["images"], "annotations": [], "categories": gt["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = [im["id"] for im in gt_images]
        ev.params.catIds = cat_ids
        ev.params.maxDets = [1, 10, max_det]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T iou thresholds, R recall points, K classes, A areas, M maxDets]
    instances = {c: 0 for c in cat_ids}
    for b in gt_boxes:
        instances[b["category_id"]] = instances.get(b["category_id"], 0) + 1
    per_class = []
    for k, c in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        if instances.get(c, 0) == 0:
            ap50 = ap = None
        else:
            p50 = p[0][p[0] > -1]
            pall = p[p > -1]
            ap50 = float(p50.mean()) if p50.size else 0.0
            ap = float(pall.mean()) if pall.size else 0.0
        per_class.append(ClassAP(c, names[c], instances.get(c, 0), ap50, ap))
    # COCOeval.summarize() reads AP at maxDets=100 only (stats[0] is -1 for other maxDets), so
    # average its precision array here exactly as summarize() does, at maxDets = max_det.
    p_all = precision[:, :, :, 0, -1]
    p_50 = precision[0, :, :, 0, -1]
    return MapResult(
        map50=float(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else 0.0,
        map50_95=float(p_all[p_all > -1].mean()) if (p_all > -1).any() else 0.0,
        per_class=per_class,
    )


# --- evaluation -------------------------------------------------------------------------------


@dataclass
class EvalReport:
    model: str
    model_sha256: str
    engine: str
    precision: str
    data: str
    split: str | None
    format: str
    images: int
    images_evaluated: int
    instances: int
    detections: int
    map50: float
    map50_95: float
    per_class: list[ClassAP]
    errors: list[dict[str, str]]
    conf: float
    iou: float
    max_det: int
    seconds: float
    images_per_s: float
    evaluator: str
    conventions: str = CONVENTIONS
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"mAP@0.5 {self.map50:.4f}  mAP@0.5:0.95 {self.map50_95:.4f}  "
            f"({self.images_evaluated}/{self.images} images, {self.instances} boxes, "
            f"{self.engine} {self.precision}, {self.seconds:.1f} s)"
        )

    def table(self) -> str:
        rows = [f"{'class':>12} {'boxes':>6} {'AP@0.5':>8} {'AP@.5:.95':>9}"]
        for c in self.per_class:
            a50 = "-" if c.ap50 is None else f"{c.ap50:.4f}"
            a = "-" if c.ap50_95 is None else f"{c.ap50_95:.4f}"
            rows.append(f"{c.name:>12} {c.instances:>6} {a50:>8} {a:>9}")
        return "\n".join(rows)


def subset(items: list, limit: int | None, seed: int = 0) -> list:
    """``limit`` items drawn at random with ``seed`` (kept in their sorted order), or all.
    Labelled sets are often sorted by class, so the first N would not be representative."""
    if not limit or limit >= len(items):
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in idx]


def _read(uri: str, storage: StorageConfig | None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def class_counts(items: Sequence[LabelledImage], storage: StorageConfig | None = None) -> dict[int, int]:
    """Labelled instances per class id over ``items`` (YOLO label files or COCO boxes); an image
    without a label file is a background image and counts nothing."""
    counts: dict[int, int] = {}
    for item in items:
        if item.boxes is not None:
            ids = [b.class_id for b in item.boxes]
        else:
            try:
                text = _read(item.label_uri, storage).decode("utf-8", errors="replace")
            except FileNotFoundError:
                continue
            ids = [c for c, *_ in parse_yolo_labels(text, item.label_uri)]
        for c in ids:
            counts[c] = counts.get(c, 0) + 1
    return counts


def _gt_boxes(item: LabelledImage, result: ImageResult, storage) -> list[GroundTruth]:
    if item.boxes is not None:
        return item.boxes
    fs, path = filesystem(item.label_uri, storage)
    if not fs.exists(path):
        return []  # no label file: a background image (Ultralytics' convention)
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    out = []
    for cls, cx, cy, w, h in parse_yolo_labels(text, item.label_uri):
        out.append(GroundTruth(cls, *yolo_to_coco_box(cx, cy, w, h, result.width, result.height)))
    return out


def evaluate(
    detector,
    dataset: LabelledSet,
    *,
    conf: float = VAL_CONF,
    iou: float = VAL_IOU,
    max_det: int = VAL_MAX_DET,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    storage: StorageConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Run ``detector`` (a :class:`raydetect.detector.Detector`) over ``dataset`` and compute
    mAP. Unreadable images are reported in ``errors`` and left out of the mAP."""
    import pycocotools

    items = subset(dataset.images, limit, seed)
    names = dict(detector.names)
    warnings = []
    if dataset.names and dataset.names != names:
        warnings.append(f"class names differ: model {names}, data {dataset.names}")
        log.warning("%s", warnings[-1])
    for c, n in dataset.names.items():
        names.setdefault(c, n)
    cat_id = dataset.category_ids or {c: c for c in names}
    gt_images: list[dict] = []
    gt_boxes: list[dict] = []
    dets: list[dict] = []
    errors: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        blobs: list[bytes] = []
        for it in part:
            try:
                blobs.append(_read(it.uri, storage))
            except OSError as e:
                blobs.append(b"")
                log.warning("%s: cannot read: %s", it.uri, e)
        results = detector.detect(blobs, [it.uri for it in part], conf=conf, iou=iou, max_det=max_det)
        for n, (it, res) in enumerate(zip(part, results, strict=True)):
            if not res.ok:
                errors.append({"uri": it.uri, "error": res.error or ""})
                continue
            if it.width is not None and (it.width, it.height) != (res.width, res.height):
                warnings.append(f"{it.uri}: size {res.width}x{res.height}, annotation says {it.width}x{it.height}")
            image_id = start + n + 1
            gt_images.append({"id": image_id, "width": res.width, "height": res.height, "file_name": it.uri})
            for g in _gt_boxes(it, res, storage):
                if g.class_id not in cat_id:
                    raise DatasetError(f"{it.label_uri or it.uri}: class {g.class_id} is not a class of the model")
                gt_boxes.append({"image_id": image_id, "category_id": cat_id[g.class_id], "bbox": [g.x, g.y, g.w, g.h]})
            for d in res.detections:
                if d.class_id not in cat_id:
                    continue
                dets.append(
                    {
                        "image_id": image_id,
                        "category_id": cat_id[d.class_id],
                        "bbox": [d.x1, d.y1, d.x2 - d.x1, d.y2 - d.y1],
                        "score": d.score,
                    }
                )
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    seconds = time.perf_counter() - t0
    if errors:
        log.warning("%d of %d images could not be evaluated (first: %s)", len(errors), len(items), errors[0])
    if not gt_images:
        first = f" (first: {errors[0]['uri']}: {errors[0]['error']})" if errors else ""
        raise DatasetError(f"{dataset.source}: none of the {len(items)} images could be evaluated{first}")
    by_cat = {cat_id[c]: n for c, n in names.items()}
    result = coco_map(gt_images, gt_boxes, dets, by_cat, max_det)
    idx = {v: k for k, v in cat_id.items()}
    per_class = [
        ClassAP(idx[c.class_id], c.name, c.instances, c.ap50, c.ap50_95) for c in result.per_class
    ]
    info = detector.info()
    return EvalReport(
        model=info.get("url", ""),
        model_sha256=info.get("sha256", info.get("model_sha256", "")),
        engine=info.get("engine", ""),
        precision=info.get("precision", ""),
        data=dataset.source,
        split=dataset.split,
        format=dataset.format,
        images=len(items),
        images_evaluated=len(gt_images),
        instances=len(gt_boxes),
        detections=len(dets),
        map50=result.map50,
        map50_95=result.map50_95,
        per_class=per_class,
        errors=errors,
        conf=conf,
        iou=iou,
        max_det=max_det,
        seconds=seconds,
        images_per_s=len(items) / seconds if seconds > 0 else 0.0,
        evaluator=f"pycocotools {getattr(pycocotools, '__version__', '?')}",
        warnings=warnings,
    )


def evaluate_model(
    model: str,
    data: str | LabelledSet,
    *,
    split: str | None = "test",
    engine: str = "auto",
    precision: str = "fp32",
    conf: float = VAL_CONF,
    iou: float = VAL_IOU,
    max_det: int = VAL_MAX_DET,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str | None = None,
    storage: StorageConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Build a detector for ``model`` and :func:`evaluate` it on ``data`` (the common
    settings as keywords; :func:`evaluate_config` takes a whole :class:`DetectorConfig`)."""
    from raydetect.config import validate

    cfg = validate(
        DetectorConfig,
        {
            "model": model,
            "engine": engine,
            "precision": precision,
            "conf": conf,
            "iou": iou,
            "max_det": max_det,
            "batch_size": batch_size,
            "threads": threads,
            "device": device,
            "storage": storage or StorageConfig(),
        },
        "detector",
    )
    return evaluate_config(cfg, data, split=split, limit=limit, seed=seed, progress=progress)


def evaluate_config(
    cfg: DetectorConfig,
    data: str | LabelledSet,
    *,
    split: str | None = "test",
    limit: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Build a detector from ``cfg`` (every setting: thresholds, batch size, ``max_pixels``,
    ``max_bytes``, the TensorRT options, storage) and :func:`evaluate` it on ``data``."""
    from raydetect.detector import Detector

    dataset = data if isinstance(data, LabelledSet) else load_dataset(data, split, cfg.storage)
    detector = Detector(cfg)
    try:
        return evaluate(
            detector,
            dataset,
            conf=cfg.conf,
            iou=cfg.iou,
            max_det=cfg.max_det,
            batch_size=cfg.batch_size,
            limit=limit,
            seed=seed,
            storage=cfg.storage,
            progress=progress,
        )
    finally:
        detector.engine.close()


# --- cache of evaluations (quantize reuses an FP32 evaluation it already has) -----------------

#: environment variable naming the evaluation cache directory (default ~/.cache/raydetect/eval)
EVAL_CACHE_ENV = "RAYDETECT_EVAL_CACHE"
EVAL_CACHE_FORMAT = "raydetect-eval-cache/1"


def default_eval_cache() -> str:
    return os.environ.get(EVAL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "raydetect", "eval")


def eval_key(
    model_sha256: str,
    dataset: LabelledSet,
    *,
    engine: str,
    precision: str,
    conf: float,
    iou: float,
    max_det: int,
    limit: int | None,
    seed: int,
    max_pixels: int | None = None,
    storage: StorageConfig | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(key, fields)`` naming one evaluation: the model's sha256, the images evaluated (the
    seeded ``limit`` sample: their URIs and ground truth, i.e. the label files' bytes or the
    COCO boxes), the engine and precision, and the settings that change the result (conf, NMS
    IoU, max_det, max_pixels). Batch size and threads are left out (same boxes)."""
    items = subset(dataset.images, limit, seed)
    h = hashlib.sha256()
    for it in items:
        h.update(it.uri.encode() + b"\0")
        if it.boxes is not None:
            h.update(json.dumps([asdict(b) for b in it.boxes]).encode())
        elif it.label_uri:
            fs, path = filesystem(it.label_uri, storage)
            try:
                with fs.open(path, "rb") as f:
                    h.update(f.read())
            except FileNotFoundError:
                h.update(b"<no label file>")
        h.update(b"\1")
    fields = {
        "model_sha256": model_sha256,
        "data": dataset.source,
        "split": dataset.split,
        "images": len(items),
        "images_sha256": h.hexdigest(),
        "engine": engine,
        "precision": precision,
        "conf": float(conf),
        "iou": float(iou),
        "max_det": int(max_det),
        "max_pixels": max_pixels,
    }
    key_fields = {k: v for k, v in fields.items() if k not in ("data", "split")}  # content, not names
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    return key, fields


def _report_from_dict(d: dict[str, Any]) -> EvalReport:
    d = dict(d)
    d["per_class"] = [ClassAP(**c) for c in d["per_class"]]
    return EvalReport(**d)


def load_cached_eval(cache_dir: str, key: str) -> tuple[EvalReport, str] | None:
    """The cached report for ``key`` and its path, or None (missing or unreadable entry)."""
    path = os.path.join(cache_dir, f"{key}.json")
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != EVAL_CACHE_FORMAT or doc.get("key") != key:
            return None
        return _report_from_dict(doc["report"]), path
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not isinstance(e, FileNotFoundError):
            log.warning("evaluation cache %s unreadable (%s); evaluating again", path, e)
        return None


def store_eval(cache_dir: str, key: str, fields: dict[str, Any], report: EvalReport) -> str:
    """Write ``report`` under ``key`` (atomically); returns the path."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.json")
    doc = {"format": EVAL_CACHE_FORMAT, "key": key, "fields": fields, "report": report.as_dict()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_report(report: EvalReport | dict, path: str, storage: StorageConfig | None = None) -> None:
    data = report.as_dict() if isinstance(report, EvalReport) else report
    fs, p = filesystem(path, storage)
    parent = posixpath.dirname(p)
    if parent and not is_remote_fs(fs):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_eval(cfg: EvalConfig, progress=None) -> EvalReport:
    """Evaluate ``cfg.detector`` (the whole config: max_pixels, max_bytes, the engine caches take
    effect) on ``cfg.data``; keep the result in the evaluation cache unless ``write_cache`` is off
    or an image failed."""
    det = cfg.detector
    dataset = load_dataset(cfg.data, cfg.split, det.storage, images=cfg.images)
    report = evaluate_config(det, dataset, limit=cfg.limit, seed=cfg.seed, progress=progress)
    if cfg.write_cache and not report.errors:
        key, fields = eval_key(report.model_sha256, dataset, engine=report.engine, precision=report.precision,
                               conf=det.conf, iou=det.iou, max_det=det.max_det, limit=cfg.limit, seed=cfg.seed,
                               max_pixels=det.max_pixels, storage=det.storage)
        log.debug("evaluation cached: %s", store_eval(cfg.eval_cache or default_eval_cache(), key, fields, report))
    return report
