"""``raydetect compress`` on the trained defect checkpoint: the pruned model's shapes and metadata
survive export and load through the model card; the whole command runs end to end on the CPU
on a few training images for one epoch; its gate fails (no model written) when a step loses
more than ``--max-map-drop``; it refuses to evaluate on the test split."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("ultralytics")
pytest.importorskip("nncf")

from raydetect.compress import REPORT_NAME, CompressConfig, CompressError, _check_splits, compress  # noqa: E402
from raydetect.config import DetectorConfig  # noqa: E402
from raydetect.engines import create_engine  # noqa: E402
from raydetect.engines.onnxruntime import is_quantized  # noqa: E402
from raydetect.model_card import ModelCard, batching_check_input  # noqa: E402
from tests.conftest import DEFECTS, MODELS  # noqa: E402

CHECKPOINT = MODELS / "yolov8n-defects.pt"
NAMES = {0: "fi", 1: "ke", 2: "ka", 3: "ib", 4: "kb", 5: "hc", 6: "hb", 7: "hd"}


def _covering(split: str, n: int) -> list:
    """The first image of each class (the set is ordered by class), then the next ones by name,
    ``n`` in all: a few images in which every class is labelled."""
    files = sorted((DEFECTS / "images" / split).iterdir())
    chosen, seen = [], set()
    for f in files:
        classes = {int(line.split()[0]) for line in (DEFECTS / "labels" / split / (f.stem + ".txt")).read_text()
                   .splitlines() if line.strip()}
        if classes - seen:
            chosen.append(f)
            seen |= classes
    chosen += [f for f in files if f not in chosen][: max(0, n - len(chosen))]
    return sorted(chosen[:n])


def tiny_dataset(root, n_train: int = 8, n_val: int = 8, test: bool = True, by_name: bool = False):
    """A YOLO data.yaml over links to a few images of the shared defect set (nothing copied):
    every class labelled in each split, or (``by_name``) the first images by name."""
    splits = {"train": n_train, "val": n_val, **({"test": 4} if test else {})}
    for split, n in splits.items():
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True)
        pick = sorted((DEFECTS / "images" / split).iterdir())[:n] if by_name or split == "test" else _covering(split, n)
        for f in pick:
            os.symlink(f, root / "images" / split / f.name)
            label = DEFECTS / "labels" / split / (f.stem + ".txt")
            os.symlink(label, root / "labels" / split / label.name)
    lines = ["path: .", *(f"{s}: images/{s}" for s in splits), "names:", *(f"  {k}: {v}" for k, v in NAMES.items())]
    (root / "data.yaml").write_text("\n".join(lines) + "\n")
    return root / "data.yaml"


def test_pruned_model_survives_export_and_model_card(data_dir, tmp_path):
    from raydetect import compress_torch as ct
    from raydetect.model_stats import onnx_gflops

    model, args = ct.load_checkpoint(str(CHECKPOINT))
    base = tmp_path / "base.onnx"
    ct.export_onnx(model, str(base), imgsz=(640, 640), names=dict(model.names), stride=32, description="base")
    info = ct.prune(model, (640, 640), 0.2, ("head",), False, 8)  # checks the C2f split is exact
    assert info["c2f_split"] == 8 and 0.5 < info["flops_ratio"] < 0.7
    head = ct.head_of(model)
    assert [s[-1].out_channels for s in head.cv3] == [8, 8, 8]  # the head stays whole
    path = tmp_path / "pruned.onnx"
    ct.export_onnx(model, str(path), imgsz=(640, 640), names=dict(model.names), stride=32, description="pruned")
    card, ref = ModelCard.load(str(path)), ModelCard.load(str(MODELS / "yolov8n-defects.onnx"))
    assert card.names == ref.names == NAMES
    assert card.imgsz == ref.imgsz == (640, 640) and card.stride == ref.stride == 32
    assert card.layout == ref.layout and card.static_batch and card.batch_rewritten  # batch made dynamic
    x = batching_check_input(card.imgsz, n=3)
    out = create_engine(card, DetectorConfig(model=str(path), engine="onnxruntime")).infer(x)
    assert out.shape == (3, 4 + 8, 8400) and np.isfinite(out).all()
    # the pruned checkpoint reloads (C2fSplit unpickles) and computes what was exported
    ct.save_checkpoint(model, str(tmp_path / "pruned.pt"), args)
    again, _ = ct.load_checkpoint(str(tmp_path / "pruned.pt"))
    import torch

    with torch.no_grad():
        t = again.eval()(torch.from_numpy(x[:1]))[0].numpy()
    assert np.abs(t - out[:1]).max() < 1e-2 * np.abs(t).max()
    g0, g1 = (onnx_gflops(p.read_bytes(), (640, 640)) for p in (base, path))
    assert 8.0 < g0 < 8.2 and g1 / g0 < 0.7  # ≥ 30 % fewer FLOPs


def test_compress_end_to_end_on_cpu(data_dir, tmp_path):
    data = tiny_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    report = compress({"checkpoint": str(CHECKPOINT), "data": str(data), "out": str(out), "imgsz": 320,
                       "finetune_epochs": 1, "qat_epochs": 1, "batch": 4, "workers": 0, "calib_batches": 1,
                       "speed_images": 8, "device": "cpu", "max_map_drop": 100.0})
    assert report.passed and report.device == "cpu"
    assert [s.step for s in report.steps] == ["baseline", "prune", "finetune", "qat"]
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["passed"] and [s["step"] for s in saved["steps"]] == ["baseline", "prune", "finetune", "qat"]
    assert saved["host"]["splits"] == {"train": 8, "eval": 8, "test_kept_out": 4}
    for s in report.steps:
        assert 0.0 <= s.map50 <= 1.0 and s.cpu_images_per_s_b8 > 0 and s.gflops > 0
        assert s.step == "baseline" or s.model and os.path.isfile(s.model)
    base, pruned = report.steps[0], report.steps[1]
    assert pruned.gflops < 0.7 * base.gflops and pruned.extra["flops_ratio"] < 0.7
    q = report.steps[-1]
    assert q.precision == "int8" and q.gated and q.passed
    card = ModelCard.load(q.model)
    assert is_quantized(card.onnx_bytes) and card.names == NAMES and card.imgsz == (320, 320)
    if "openvino" in q.extra:  # the OpenVINO engine runs the QDQ model with INT8 kernels
        assert (out / (os.path.basename(q.model)[:-5] + ".xml")).is_file()
        ov = create_engine(card, DetectorConfig(model=q.model, engine="openvino"))
        assert ov.precision == "int8" and ov.infer(batching_check_input(card.imgsz, n=2)).shape == (2, 12, 2100)


def test_gate_fails_with_impossible_threshold(data_dir, tmp_path, capsys):
    from raydetect.cli import main

    data = tiny_dataset(tmp_path / "ds", n_train=8, n_val=8, test=False)
    out = tmp_path / "out"
    rc = main(["compress", "--checkpoint", str(CHECKPOINT), "--data", str(data), "--out", str(out),
               "--imgsz", "320", "--finetune-epochs", "0", "--qat-epochs", "0", "--speed-images", "8",
               "--max-map-drop", "-100"])  # the pruned model would have to gain 100 points
    assert rc == 1
    assert "no model written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME]  # only the report, no staging left
    rep = json.loads((out / REPORT_NAME).read_text())
    assert not rep["passed"] and rep["failed_step"] == "prune"
    assert all(s["model"] is None for s in rep["steps"])


def test_refuses_the_test_split(data_dir, tmp_path):
    data = tiny_dataset(tmp_path / "ds", n_train=2, n_val=2)
    with pytest.raises(CompressError, match="test split"):
        compress({"checkpoint": str(CHECKPOINT), "data": str(data), "out": str(tmp_path / "o"), "eval_split": "test"})


def test_refuses_a_split_without_some_class(data_dir, tmp_path):
    """The defect set is ordered by class: its first images by name hold one class only. A
    fine-tune on them would make the model forget the others (it did on the first GPU run: the
    first 3,000 training images have no 'ka'), and an evaluation on them could not show it."""
    data = tiny_dataset(tmp_path / "ds", n_train=8, n_val=8, test=False, by_name=True)
    with pytest.raises(CompressError, match=r"train split has no labelled instance of class 1 \(ke\)"):
        compress({"checkpoint": str(CHECKPOINT), "data": str(data), "out": str(tmp_path / "o")})
    assert not (tmp_path / "o").exists()  # refused before anything was written
    good = tiny_dataset(tmp_path / "ds2", n_train=8, n_val=8, test=False)
    cfg = {"checkpoint": str(CHECKPOINT), "data": str(good), "out": str(tmp_path / "o")}
    assert _check_splits(CompressConfig(**cfg)) == {"train": 8, "eval": 8, "test_kept_out": 0}
    with pytest.raises(CompressError, match=r"val split sample has no labelled instance"):
        _check_splits(CompressConfig(**cfg, eval_limit=1))  # one image cannot hold all 8 classes
