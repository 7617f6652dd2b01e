"""``raydetect compress``: make a trained Ultralytics YOLO detector smaller and faster on CPUs,
proving every step with mAP on held-out images.

Steps (each writes its model, its mAP on the evaluation split and its CPU speed to one report):

1. ``baseline``: the checkpoint exported to ONNX as it is (the reference for every drop);
2. ``prune``: structured channel pruning with torch-pruning (``prune_ratio`` of the channels of
   each layer, or of the whole network with ``prune_global``; ``ignore`` keeps layers whole,
   by default the Detect head) — reported, not gated: it is the fine-tune's starting point;
3. ``finetune``: Ultralytics' trainer recovers the accuracy (``finetune_epochs``; 0 skips it);
4. ``qat``: NNCF quantization-aware training (``qat_epochs``; 0 skips it), exported as an INT8
   QDQ ONNX model (ONNX Runtime and ``--engine openvino`` run it) and, with OpenVINO installed,
   as an OpenVINO IR (``.xml``/``.bin``) for plain OpenVINO deployments.

The gate: each output step (finetune, qat; prune when nothing follows it) may lose at most
``max_map_drop`` points of mAP@0.5 against the baseline on the evaluation split; when one loses
more, the command fails and no model is written (models are built in a staging folder and moved
into ``out`` only when every gated step passed). The report is written either way.

Training and calibration read the training split only; the evaluation split defaults to
``val``; the command refuses a configuration in which either shares images with the ``test``
split. Training runs on the GPU when there is one (``device``), else on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raydetect.config import validate
from raydetect.errors import RaydetectError

log = logging.getLogger(__name__)

REPORT_NAME = "compress_report.json"


class CompressError(RaydetectError, ValueError):
    """The inputs cannot be compressed as asked; the message says why."""


class CompressConfig(BaseModel):
    """Options of :func:`compress` (one name, default and validation per setting; the CLI flags
    are derived from these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(min_length=1, description="Ultralytics YOLO detection checkpoint (.pt)")
    data: str = Field(min_length=1, description="labelled set: a YOLO data.yaml with train and val splits")
    out: str = Field(min_length=1, description="output folder (models and compress_report.json)")
    eval_split: str = Field("val", min_length=1, description="split the mAP of every step is measured on")
    eval_limit: int | None = Field(None, ge=1, description="evaluate N images of the split (seeded)")
    imgsz: int | None = Field(None, ge=32, le=4096, description="training/export size (default: the checkpoint's)")
    prune_ratio: float = Field(0.2, ge=0.0, lt=0.9, description="fraction of channels to remove")
    prune_global: bool = Field(False, description="rank channels across the whole network, not per layer")
    ignore: tuple[str, ...] = Field(
        ("head",), description="layers kept whole: head (the Detect head), head-outputs (its last convs and "
        "DFL only) or module names such as model.9")
    round_to: int = Field(8, ge=1, le=64, description="keep channel counts multiples of this (SIMD-friendly)")
    finetune_epochs: int = Field(10, ge=0, le=1000, description="fine-tuning epochs after pruning (0: none)")
    finetune_minutes: float | None = Field(
        None, gt=0.0, le=10_000.0, description="stop fine-tuning after this many minutes (Ultralytics' time limit; "
        "the learning-rate schedule is fitted to the epochs that fit)")
    qat_epochs: int = Field(1, ge=0, le=100, description="quantization-aware training epochs (0: no INT8 step)")
    batch: int = Field(32, ge=1, le=1024, description="training batch size")
    lr: float = Field(0.002, gt=0.0, le=1.0, description="fine-tuning learning rate (SGD)")
    qat_lr: float = Field(0.0002, gt=0.0, le=1.0, description="QAT learning rate (SGD, cosine)")
    calib_batches: int = Field(8, ge=1, le=1000, description="training batches for NNCF's initial ranges")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the training split to train on")
    workers: int = Field(4, ge=0, le=64, description="data-loading workers")
    device: str | None = Field(None, description="training device: cpu, cuda, cuda:0 (default: GPU when present)")
    openvino: bool = Field(True, description="also write the OpenVINO IR of the INT8 model (needs openvino)")
    speed_images: int = Field(16, ge=1, le=10_000, description="evaluation images timed for each step's speed")
    threads: int | None = Field(None, ge=1, le=512, description="CPU threads for evaluation and timing")
    max_map_drop: float = Field(
        1.5, ge=-100.0, le=100.0, description="max mAP@0.5 drop vs the baseline, in points (negative: demand a gain)")
    seed: int = Field(0, ge=0, description="training and evaluation-subset seed")


@dataclass
class StepResult:
    step: str
    model: str | None  # file in ``out`` (None when nothing was written)
    onnx_mb: float
    gflops: float
    params: int | None
    map50: float
    map50_95: float
    drop_points: float  # mAP@0.5 vs the baseline, points
    gated: bool
    passed: bool | None
    engine: str
    precision: str
    cpu_images_per_s_b8: float  # engine only, on the machine that ran the command
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressReport:
    config: dict[str, Any]
    steps: list[StepResult]
    passed: bool
    failed_step: str | None
    message: str
    out: str
    device: str
    host: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- helpers -------------------------------------------------------------------------------------


def _check_splits(cfg: CompressConfig) -> dict[str, int]:
    """Training and evaluation must not share images with the test split, and must hold every class."""
    import yaml

    from raydetect.evaluate import DatasetError, class_counts, load_dataset, subset

    if not cfg.data.lower().endswith((".yaml", ".yml")):
        raise CompressError(f"{cfg.data}: compress trains with Ultralytics, which reads a YOLO data.yaml "
                            "(train and val splits); COCO json and bare folders are for 'raydetect eval' only")
    try:
        with open(cfg.data) as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise CompressError(f"{cfg.data}: {e}") from None
    counts = {}
    try:
        train_set = load_dataset(cfg.data, "train")
        train_items = train_set.images
        ev_items = load_dataset(cfg.data, cfg.eval_split).images
        train = {i.uri for i in train_items}
        ev = {i.uri for i in ev_items}
        test = {i.uri for i in load_dataset(cfg.data, "test").images} if spec.get("test") else set()
    except DatasetError as e:
        raise CompressError(str(e)) from None
    if cfg.eval_split == "test" or (test and (train & test or ev & test)):
        raise CompressError("training, calibration and evaluation must not see the test split "
                            f"(eval_split={cfg.eval_split!r}; shared with test: train {len(train & test)}, "
                            f"eval {len(ev & test)} images)")
    names = train_set.names
    # Fine-tuning on a split without some class makes the pruned model forget it, and an
    # evaluation split without it cannot show the loss (a subset taken by file name from a set
    # ordered by class does both).
    for split, items in (("train", train_items), (cfg.eval_split, subset(ev_items, cfg.eval_limit, cfg.seed))):
        have = class_counts(items)
        missing = [f"{c} ({n})" for c, n in sorted(names.items()) if not have.get(c)]
        if missing:
            raise CompressError(
                f"{cfg.data}: the {split} split{' sample' if split != 'train' and cfg.eval_limit else ''} has no "
                f"labelled instance of class {', '.join(missing)}; every class of the model must be in the "
                "training and evaluation images (is the set ordered by class and cut by file name?)")
    counts = {"train": len(train), "eval": len(ev), "test_kept_out": len(test)}
    return counts


def _training_yaml(cfg: CompressConfig, folder: str) -> str:
    """The data.yaml Ultralytics reads: ``path`` made absolute (resolved against the yaml's folder,
    as ``raydetect eval`` does; Ultralytics would resolve it against its datasets folder), ``val``
    = the evaluation split, and no ``test`` entry, so the trainer cannot see the test split."""
    import yaml

    with open(cfg.data) as f:
        spec = yaml.safe_load(f) or {}
    base = os.path.dirname(os.path.abspath(cfg.data))
    root = str(spec.get("path") or ".")
    spec["path"] = root if os.path.isabs(root) else os.path.normpath(os.path.join(base, root))
    spec["val"] = spec[cfg.eval_split]
    spec.pop("test", None)
    out = os.path.join(folder, "data.yaml")
    with open(out, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return out


def _evaluate(cfg: CompressConfig, path: str, engine: str) -> dict[str, Any]:
    from raydetect.evaluate import evaluate_model

    r = evaluate_model(path, cfg.data, split=cfg.eval_split, engine=engine, batch_size=8, limit=cfg.eval_limit,
                       seed=cfg.seed, threads=cfg.threads, device="cpu")
    return {"map50": r.map50, "map50_95": r.map50_95, "images": r.images_evaluated}


def _speed(cfg: CompressConfig, path: str, engine: str, batch: int = 8, repeats: int = 3) -> float:
    """Engine-only images/s at ``batch`` on real evaluation images (median of ``repeats``)."""
    import statistics

    from raydetect.config import DetectorConfig
    from raydetect.engines import create_engine
    from raydetect.evaluate import load_dataset
    from raydetect.model_card import ModelCard
    from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

    card = ModelCard.load(path)
    eng = create_engine(card, DetectorConfig(model=path, engine=engine, threads=cfg.threads, device="cpu"))
    h, w = card.imgsz
    files = [i.uri for i in load_dataset(cfg.data, cfg.eval_split).images[: max(batch, cfg.speed_images)]]
    imgs = [letterbox(decode_image(open(f, "rb").read(), 10**9, 10**9), h, w)[0] for f in files]
    imgs = (imgs * batch)[: max(batch, len(imgs))]  # a split smaller than one batch repeats its images
    batches = [to_tensor(imgs[i : i + batch]) for i in range(0, len(imgs) - batch + 1, batch)]
    eng.infer(batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            eng.infer(b)
        rates.append(len(batches) * batch / (time.perf_counter() - t))
    eng.close()
    return statistics.median(rates)


def _have_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# --- the command ---------------------------------------------------------------------------------


def compress(cfg: CompressConfig | dict[str, Any], *, echo=print) -> CompressReport:
    """Run the steps of the module docstring; see :class:`CompressReport`."""
    import platform

    import torch

    from raydetect import compress_torch as ct
    from raydetect.model_stats import onnx_gflops

    if not isinstance(cfg, CompressConfig):
        cfg = validate(CompressConfig, cfg, "compress")
    t_start = time.perf_counter()
    if not os.path.isfile(cfg.checkpoint):
        raise CompressError(f"checkpoint not found: {cfg.checkpoint}")
    split_counts = _check_splits(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".compress-", dir=cfg.out)
    steps: list[StepResult] = []
    failed: str | None = None
    message = ""
    written: dict[str, list[str]] = {}
    train_yaml = _training_yaml(cfg, stage)

    model, train_args = ct.load_checkpoint(cfg.checkpoint)
    imgsz = cfg.imgsz or int(train_args.get("imgsz") or 640)
    size = (imgsz, imgsz)
    names = dict(model.names)
    stride = int(max(model.stride))
    stem = os.path.splitext(os.path.basename(cfg.checkpoint))[0]

    def record(step: str, files: list[str], onnx_path: str, t0: float, engine: str, precision: str,
               params: int | None, gated: bool, **extra) -> StepResult:
        nonlocal failed, message
        ev = _evaluate(cfg, onnx_path, engine)
        base = steps[0].map50 if steps else ev["map50"]
        drop = 100.0 * (base - ev["map50"])
        passed = None if not gated else drop <= cfg.max_map_drop
        speed = _speed(cfg, onnx_path, engine)
        raw = open(onnx_path, "rb").read()
        r = StepResult(
            step=step, model=None, onnx_mb=len(raw) / 1e6, gflops=onnx_gflops(raw, size), params=params,
            map50=ev["map50"], map50_95=ev["map50_95"], drop_points=drop, gated=gated, passed=passed,
            engine=engine, precision=precision, cpu_images_per_s_b8=speed, seconds=time.perf_counter() - t0,
            extra={"eval_images": ev["images"], **extra},
        )
        steps.append(r)
        written[step] = files
        echo(f"[compress] {step}: mAP@0.5 {r.map50:.4f} (drop {drop:+.2f} pt{'' if gated else ', not gated'}"
             f"{'' if passed is None else ', pass' if passed else ', FAIL'}), mAP@0.5:0.95 {r.map50_95:.4f}, "
             f"{r.gflops:.2f} GFLOPs, {r.onnx_mb:.2f} MB, {speed:.1f} images/s ({engine} {precision}, batch 8), "
             f"{r.seconds:.0f} s")
        if passed is False and failed is None:
            failed = step
            message = (f"step {step!r} lost {drop:.2f} points of mAP@0.5 on {cfg.eval_split} "
                       f"(> --max-map-drop {cfg.max_map_drop}); no model written")
        return r

    try:
        # 1. baseline
        t0 = time.perf_counter()
        base_onnx = os.path.join(stage, f"{stem}.onnx")
        ct.export_onnx(model, base_onnx, imgsz=size, names=names, stride=stride,
                       description=f"{stem}: baseline export by raydetect compress")
        macs, params = ct.count_macs(model, size)
        record("baseline", [], base_onnx, t0, "onnxruntime", "fp32", params, gated=False, macs=macs)

        # 2. prune
        t0 = time.perf_counter()
        pinfo = ct.prune(model, size, cfg.prune_ratio, cfg.ignore, cfg.prune_global, cfg.round_to)
        pruned_pt = os.path.join(stage, f"{stem}-pruned.pt")
        pruned_onnx = os.path.join(stage, f"{stem}-pruned.onnx")
        ct.save_checkpoint(model, pruned_pt, train_args)
        ct.export_onnx(model, pruned_onnx, imgsz=size, names=names, stride=stride,
                       description=f"{stem}: pruned {cfg.prune_ratio} by raydetect compress (not fine-tuned)")
        last = cfg.finetune_epochs == 0 and cfg.qat_epochs == 0
        record("prune", [pruned_pt, pruned_onnx], pruned_onnx, t0, "onnxruntime", "fp32", pinfo["params_after"],
               gated=last, **pinfo)

        # 3. fine-tune
        if cfg.finetune_epochs and failed is None:
            t0 = time.perf_counter()
            model, metrics = ct.finetune(
                model, train_yaml, checkpoint=cfg.checkpoint, epochs=cfg.finetune_epochs, minutes=cfg.finetune_minutes, imgsz=imgsz, batch=cfg.batch, lr=cfg.lr, device=device,
                workers=cfg.workers, seed=cfg.seed, fraction=cfg.fraction, project=os.path.join(stage, "runs"))
            ft_pt = os.path.join(stage, f"{stem}-pruned-ft.pt")
            ft_onnx = os.path.join(stage, f"{stem}-pruned-ft.onnx")
            ct.save_checkpoint(model, ft_pt, {**train_args, "imgsz": imgsz})
            ct.export_onnx(model, ft_onnx, imgsz=size, names=names, stride=stride,
                           description=f"{stem}: pruned {cfg.prune_ratio} and fine-tuned by raydetect compress")
            record("finetune", [ft_pt, ft_onnx], ft_onnx, t0, "onnxruntime", "fp32", ct.count_macs(model, size)[1],
                   gated=True, epochs=cfg.finetune_epochs, ultralytics_val=metrics, device=device)

        # 4. QAT → INT8 QDQ ONNX (+ OpenVINO IR)
        if cfg.qat_epochs and failed is None:
            t0 = time.perf_counter()
            qmodel, qstats = ct.qat(
                model, train_yaml, epochs=cfg.qat_epochs, imgsz=imgsz, batch=cfg.batch, lr=cfg.qat_lr, device=device,
                workers=cfg.workers, seed=cfg.seed, fraction=cfg.fraction, calib_batches=cfg.calib_batches)
            q_onnx = os.path.join(stage, f"{stem}-pruned-qat-int8.onnx")
            ct.export_onnx(qmodel, q_onnx, imgsz=size, names=names, stride=stride,
                           description=f"{stem}: pruned {cfg.prune_ratio}, fine-tuned, NNCF QAT INT8 (QDQ) by "
                                       "raydetect compress")
            files = [q_onnx]
            if cfg.openvino and _have_openvino():
                import openvino as ov

                xml = os.path.join(stage, f"{stem}-pruned-qat-int8.xml")
                ov.save_model(ov.convert_model(q_onnx), xml, compress_to_fp16=False)
                files += [xml, xml[:-4] + ".bin"]
            r = record("qat", files, q_onnx, t0, "onnxruntime", "int8", None, gated=True, epochs=cfg.qat_epochs,
                       device=device, **qstats)
            if _have_openvino():
                r.extra["openvino"] = {"cpu_images_per_s_b8": _speed(cfg, q_onnx, "openvino"),
                                       **_evaluate(cfg, q_onnx, "openvino")}
                echo(f"[compress] qat on openvino: mAP@0.5 {r.extra['openvino']['map50']:.4f}, "
                     f"{r.extra['openvino']['cpu_images_per_s_b8']:.1f} images/s (batch 8)")
    except Exception:
        shutil.rmtree(stage, ignore_errors=True)
        raise

    passed = failed is None
    if passed:
        for s in steps:
            for f in written.get(s.step, []):
                dst = os.path.join(cfg.out, os.path.basename(f))
                os.replace(f, dst)
                if f.endswith(".onnx") or (f.endswith(".pt") and s.model is None):
                    s.model = dst
        message = f"every gated step within {cfg.max_map_drop} points of mAP@0.5 of the baseline"
    shutil.rmtree(stage, ignore_errors=True)
    report = CompressReport(
        config=cfg.model_dump(), steps=steps, passed=passed, failed_step=failed, message=message, out=cfg.out,
        device=device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(0)})",
        host={"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "splits": split_counts},
        seconds=time.perf_counter() - t_start,
    )
    with open(os.path.join(cfg.out, REPORT_NAME), "w") as f:
        json.dump(report.as_dict(), f, indent=1)
    return report
