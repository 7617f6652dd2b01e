"""The PyTorch side of ``raydetect compress``: structured pruning (torch-pruning), fine-tuning
(Ultralytics' trainer), quantization-aware training (NNCF) and ONNX export of an Ultralytics
YOLO detection checkpoint.

Heavy optional imports (torch, ultralytics, torch_pruning, nncf) happen inside the functions;
``pip install 'raydetect[compress]'`` installs them. Ultralytics is AGPL-3.0 licensed.
"""

from __future__ import annotations

import copy
import logging
import os
import types
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def _torch_nn():
    import torch.nn as nn

    return nn


# --- C2f with its split replaced by two convolutions ------------------------------------------------


def _c2f_split_class():
    import torch
    from ultralytics.nn.modules import Conv

    nn = _torch_nn()

    class C2fSplit(nn.Module):
        """Ultralytics' C2f with ``cv1(x).chunk(2)`` computed by two 1×1 convolutions (the two
        halves of ``cv1``'s weights): the same function, but torch-pruning can prune each half on
        its own (it cannot follow channels through ``chunk`` into the concatenation)."""

        def __init__(self, old) -> None:
            super().__init__()
            c = old.c
            self.c = c
            c1 = old.cv1.conv.in_channels
            self.cv0 = Conv(c1, c, 1, 1)
            self.cv1 = Conv(c1, c, 1, 1)
            for dst, part in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
                dst.conv.weight.data.copy_(old.cv1.conv.weight.data[part])
                for a in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst.bn, a).data.copy_(getattr(old.cv1.bn, a).data[part])
                dst.bn.eps, dst.bn.momentum = old.cv1.bn.eps, old.cv1.bn.momentum
                dst.act = old.cv1.act
            self.cv2 = old.cv2
            self.m = old.m
            for a in ("f", "i", "type", "np"):  # Ultralytics' routing attributes
                if hasattr(old, a):
                    setattr(self, a, getattr(old, a))
            self.train(old.training)  # new BatchNorms default to training mode

        def forward(self, x):
            y = [self.cv0(x), self.cv1(x)]
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    return C2fSplit


_C2F_SPLIT = None


def c2f_split_class():
    """The class, created once (it must be importable for checkpoints to unpickle:
    ``raydetect.compress_torch.C2fSplit``)."""
    global _C2F_SPLIT
    if _C2F_SPLIT is None:
        _C2F_SPLIT = _c2f_split_class()
        _C2F_SPLIT.__module__ = __name__
        _C2F_SPLIT.__qualname__ = "C2fSplit"
        globals()["C2fSplit"] = _C2F_SPLIT
    return _C2F_SPLIT


def __getattr__(name: str):  # pickle looks the class up by name
    if name == "C2fSplit":
        return c2f_split_class()
    raise AttributeError(name)


def replace_c2f(module) -> int:
    """Replace every C2f below ``module`` by :class:`C2fSplit` (in place); returns how many."""
    from ultralytics.nn.modules import C2f

    cls = c2f_split_class()
    n = 0
    for name, child in module.named_children():
        if type(child) is C2f:
            setattr(module, name, cls(child))
            n += 1
        else:
            n += replace_c2f(child)
    return n


# --- loading, counting, pruning ---------------------------------------------------------------------


def load_checkpoint(path: str):
    """The float32 DetectionModel of an Ultralytics checkpoint (EMA weights when present)."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = ck.get("ema") or ck.get("model") if isinstance(ck, dict) else ck
    if model is None:
        raise ValueError(f"{path}: no 'model' or 'ema' in the checkpoint")
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    train_args = ck.get("train_args", {}) if isinstance(ck, dict) else {}
    return model, train_args


def head_of(model):
    return model.model[-1]


def count_macs(model, imgsz: tuple[int, int]) -> tuple[float, int]:
    """(multiply-accumulates, parameters) of one image at ``imgsz``, counted by torch-pruning."""
    import torch
    import torch_pruning as tp

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, *imgsz, device=dev))
    model.train(was)
    return float(macs), int(params)


def ignored_modules(model, names: tuple[str, ...]) -> list:
    """``head``: the whole Detect head; ``head-outputs``: only its last convolutions and the
    DFL (the head's inner convolutions are pruned); any other name: a module of
    ``model.named_modules()`` (e.g. ``model.9``)."""
    head = head_of(model)
    mods = dict(model.named_modules())
    out = []
    for n in names:
        if n == "head":
            out.append(head)
        elif n == "head-outputs":
            out += [s[-1] for s in head.cv2] + [s[-1] for s in head.cv3]
            if hasattr(head, "dfl"):
                out.append(head.dfl)
        elif n in mods:
            out.append(mods[n])
        else:
            raise ValueError(f"ignored layer {n!r} is not a module of the model (e.g. 'head', 'head-outputs', "
                             f"'model.9'); known: {', '.join(list(mods)[:8])}, …")
    return out


def prune(model, imgsz: tuple[int, int], ratio: float, ignore: tuple[str, ...], global_pruning: bool,
          round_to: int) -> dict[str, Any]:
    """Structured channel pruning in place: C2f split (checked to compute the same function),
    then torch-pruning's MetaPruner with L2 group-magnitude importance."""
    import torch
    import torch_pruning as tp

    model.eval()
    x = torch.rand(1, 3, *imgsz)
    reference = copy.deepcopy(model)
    split = replace_c2f(model)
    with torch.no_grad():
        a, b = reference(x)[0], model(x)[0]
    err = float((a - b).abs().max() / (a.abs().max() + 1e-9))
    if err > 1e-4:
        raise RuntimeError(f"C2f split changed the model's output (relative error {err:.2e})")
    del reference
    macs0, params0 = count_macs(model, imgsz)
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=ignored_modules(model, ignore), global_pruning=global_pruning, round_to=round_to,
    )
    pruner.step()
    macs1, params1 = count_macs(model, imgsz)
    return {"c2f_split": split, "macs_before": macs0, "macs_after": macs1, "flops_ratio": macs1 / macs0,
            "params_before": params0, "params_after": params1}


def save_checkpoint(model, path: str, train_args: dict | None = None) -> None:
    import torch

    torch.save({"model": copy.deepcopy(model).float().cpu(), "train_args": dict(train_args or {})}, path)


# --- fine-tuning with Ultralytics' trainer ----------------------------------------------------------


def finetune(model, data_yaml: str, *, checkpoint: str, epochs: int, minutes: float | None, imgsz: int, batch: int, lr: float, device: str,
             workers: int, seed: int, fraction: float, project: str, name: str = "finetune") -> tuple[Any, dict]:
    """Train ``model`` (already pruned) with Ultralytics' DetectionTrainer: its data pipeline
    (mosaic and the rest of its augmentations), its loss and EMA. SGD at a fine-tuning learning
    rate, no warm-up (warm-up's high bias learning rate would undo the trained weights).
    Returns the best checkpoint's model (on the trainer's val split) and the trainer's metrics."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class _Trainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):  # keep the pruned architecture
            return model

        def read_results_csv(self):  # the csv module instead of polars (a 40 MB dependency)
            import csv

            try:
                with open(self.csv, newline="") as f:
                    rows = list(csv.DictReader(f))
                return {k.strip(): [float(r[k]) for r in rows] for k in rows[0]} if rows else {}
            except (OSError, ValueError, KeyError):
                return {}

    import ultralytics.engine.trainer as engine_trainer

    # Ultralytics' AMP self-check downloads a reference model (no network on training nodes);
    # AMP is used on GPUs as the checkpoint was trained.
    engine_trainer.check_amp = lambda *a, **k: True
    args = dict(
        model=checkpoint, data=data_yaml, epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers,
        project=project, name=name, exist_ok=True, plots=False, val=True, seed=seed, deterministic=False,
        optimizer="SGD", lr0=lr, lrf=0.1, warmup_epochs=0.0, close_mosaic=max(0, min(2, epochs - 1)),
        fraction=fraction, amp=device != "cpu", verbose=False, save=True,
    )
    if minutes:
        args["time"] = minutes / 60
    trainer = _Trainer(overrides=args)
    trainer.model = model
    trainer.train()
    best, _ = load_checkpoint(str(trainer.best)) if os.path.exists(trainer.best) else (trainer.model, None)
    return best, {k: float(v) for k, v in (trainer.metrics or {}).items()}


# --- quantization-aware training with NNCF -----------------------------------------------------------


def _reference_fake_quant() -> None:
    """NNCF's fake-quantize kernels are C++/CUDA extensions compiled on first use (minutes, and
    a compiler on every training node); its pure-PyTorch reference implementation computes the
    same thing. Use it, without the torch.compile wrapper (one recompilation per tensor shape)."""
    from nncf.torch.quantization import extensions as ext
    from nncf.torch.quantization import reference as ref

    funcs = types.SimpleNamespace(Quantize_forward=ref.torch_executor.forward,
                                  Quantize_backward=ref.torch_executor.backward)
    for ns in (ext.QuantizedFunctionsCPU, getattr(ext, "QuantizedFunctionsCUDA", None)):
        if isinstance(ns, ext.ExtensionNamespace):
            ns._loaded_namespace = funcs


@dataclass
class _Loader:
    dataset: Any
    loader: Any
    cfg: Any  # Ultralytics' hyperparameters (the loss gains box/cls/dfl)


def _train_loader(data_yaml: str, imgsz: int, batch: int, workers: int, fraction: float, seed: int) -> _Loader:
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(data_yaml)
    cfg = get_cfg(overrides=dict(imgsz=imgsz, batch=batch, fraction=fraction, seed=seed))
    ds = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=32)
    return _Loader(ds, build_dataloader(ds, batch, workers, shuffle=True, rank=-1), cfg)


def qat(model, data_yaml: str, *, epochs: int, imgsz: int, batch: int, lr: float, device: str, workers: int,
        seed: int, fraction: float, calib_batches: int) -> tuple[Any, dict]:
    """NNCF quantization-aware training: Conv+BN folded, NNCF's post-training quantization
    (INT8 weights per channel, INT8 activations; ranges from ``calib_batches`` training batches)
    inserts trainable fake-quantizers, then ``epochs`` of training with Ultralytics' detection
    loss on its training data pipeline. Returns the fake-quantized model (CPU, eval) and stats."""
    import nncf
    import torch
    from ultralytics.utils.loss import v8DetectionLoss

    _reference_fake_quant()
    dev = torch.device(device if device != "cpu" else "cpu")
    model = model.float().fuse().to(dev)
    model.eval()
    head = head_of(model)
    # The head's box decoding (anchors, DFL integral) stays float and outside NNCF's graph: during
    # calibration and training the head returns its raw outputs.
    head.forward = types.MethodType(lambda self, x: self.forward_head(x, **self.one2many), head)
    ld = _train_loader(data_yaml, imgsz, batch, workers, fraction, seed)

    def feed(b):
        return b["img"].to(dev, non_blocking=True).float() / 255

    qmodel = nncf.quantize(
        model, nncf.Dataset(ld.loader, feed), subset_size=calib_batches * batch,
        preset=nncf.QuantizationPreset.MIXED,
        advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
    )
    model.args = ld.cfg
    crit = v8DetectionLoss(model)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    steps = max(1, epochs * len(ld.loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    qmodel.train()
    for _ in range(epochs):
        for b in ld.loader:
            for k in ("batch_idx", "cls", "bboxes"):
                b[k] = b[k].to(dev)
            loss, items = crit(qmodel(feed(b)), b)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            vals = items.values() if isinstance(items, dict) else items
            losses.append([float(v) for v in vals])
    qmodel.eval()
    qhead = head_of(qmodel)
    if "forward" in qhead.__dict__:
        del qhead.forward
    qmodel = qmodel.cpu()
    n = len(losses)
    tail = losses[-max(1, n // 5):]
    stats = {"steps": n, "last_loss_box_cls_dfl": [sum(c) / len(tail) for c in zip(*tail, strict=True)] if tail else []}
    return qmodel, stats


# --- export -----------------------------------------------------------------------------------------


def export_onnx(model, path: str, *, imgsz: tuple[int, int], names: dict[int, str], stride: int,
                description: str, extra: dict[str, str] | None = None) -> None:
    """ONNX (opset 17, static batch 1 as Ultralytics exports: shapes fold to constants, and
    :class:`~raydetect.model_card.ModelCard` makes the batch dynamic) with Ultralytics' metadata (names, imgsz, stride, task):
    what :class:`~raydetect.model_card.ModelCard` reads. NNCF fake-quantizers export as
    QuantizeLinear/DequantizeLinear pairs (a QDQ model)."""
    import onnx
    import torch

    model = model.cpu().eval()
    try:
        from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

        for m in model.modules():
            if isinstance(m, BaseQuantizer):
                m.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    except ImportError:
        pass
    from ultralytics.nn.modules import C2f

    for m in model.modules():
        if type(m) is C2f:  # as Ultralytics' exporter: split (constant sizes) instead of chunk (shape ops)
            m.forward = m.forward_split
    head = head_of(model)
    head.export, head.format, head.dynamic = True, "onnx", False
    x = torch.zeros(1, 3, *imgsz)
    with torch.no_grad():
        out_shape = list(model(x).shape)
        torch.onnx.export(model, x, path, opset_version=17, input_names=["images"], output_names=["output0"],
                          do_constant_folding=True,
                          dynamo=False)
    head.export = False
    m = onnx.load(path)
    for d, v in zip(m.graph.output[0].type.tensor_type.shape.dim[1:], out_shape[1:], strict=True):
        d.ClearField("dim_param")
        d.dim_value = v  # [batch, 4 + nc, anchors]: fixed except the batch
    folded = fold_weight_quantizers(m)
    if folded:
        log.info("%s: %d weight QuantizeLinear nodes folded into INT8 initializers", path, folded)
    meta = {"description": description, "stride": str(stride), "task": "detect", "head": "Detect", "batch": "1",
            "imgsz": str(list(imgsz)), "names": str(dict(names)), "end2end": "False", "channels": "3",
            **(extra or {})}
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)


def fold_weight_quantizers(model) -> int:
    """Store QDQ weights as integers: a QuantizeLinear of a float initializer (the weights of an
    NNCF export) becomes its quantized initializer, read by the DequantizeLinear after it. The same
    values (Q∘DQ of constants), a quarter of the bytes. Returns how many were folded."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return next(numpy_helper.to_array(a.t) for a in consts[name].attribute if a.name == "value")
        return None

    rename: dict[str, str] = {}
    drop = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] not in inits or len(n.input) < 3:
            continue
        w, scale, zp = value(n.input[0]), value(n.input[1]), value(n.input[2])
        if scale is None or zp is None or w.dtype != np.float32:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)
        name = n.output[0] + "_int"
        g.initializer.append(numpy_helper.from_array(q, name))
        rename[n.output[0]] = name
        drop.append(n)
    for n in drop:
        g.node.remove(n)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    return len(drop)
