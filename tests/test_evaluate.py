"""raydetect eval: mAP with pycocotools on known answers, YOLO/COCO label loading, the real
detector on the labelled defects set, the CLI report, local and S3 inputs."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from raydetect.evaluate import (
    DatasetError,
    coco_map,
    evaluate_model,
    load_dataset,
    parse_yolo_labels,
    subset,
    yolo_to_coco_box,
)
from tests.conftest import DEFECTS, MODELS

MODEL = str(MODELS / "yolov8n-defects.onnx")
NAMES = {0: "a", 1: "b"}


def _img(i: int, w: int = 200, h: int = 100) -> dict:
    return {"id": i, "width": w, "height": h}


# --- mAP on hand-built predictions -------------------------------------------------------------


def test_perfect_predictions_give_map_one():
    gts = [
        {"image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 40]},
        {"image_id": 1, "category_id": 1, "bbox": [100, 20, 30, 60]},
        {"image_id": 2, "category_id": 0, "bbox": [0, 0, 200, 100]},
    ]
    dets = [{**g, "score": 0.9 - 0.1 * i} for i, g in enumerate(gts)]
    r = coco_map([_img(1), _img(2)], gts, dets, NAMES)
    assert r.map50 == pytest.approx(1.0)
    assert r.map50_95 == pytest.approx(1.0)
    assert [(c.class_id, c.instances) for c in r.per_class] == [(0, 2), (1, 1)]
    assert [c.ap50 for c in r.per_class] == pytest.approx([1.0, 1.0])


def test_shifted_box_matches_only_low_iou_thresholds():
    # a 100x100 box shifted by 20 px: IoU = 80*100 / (120*100) = 0.667, a true positive at the
    # IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10) and a false positive above
    gt = [{"image_id": 1, "category_id": 0, "bbox": [10, 0, 100, 100]}]
    det = [{"image_id": 1, "category_id": 0, "bbox": [30, 0, 100, 100], "score": 0.8}]
    r = coco_map([_img(1, 200, 200)], gt, det, {0: "a"})
    assert r.map50 == pytest.approx(1.0)
    assert r.map50_95 == pytest.approx(0.4)


def test_false_positive_ranked_first_halves_ap():
    # detections by score: FP (wrong place), then TP → precision 0.5 at recall 1 → AP 0.5
    gt = [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 50, 50]}]
    dets = [
        {"image_id": 1, "category_id": 0, "bbox": [120, 40, 50, 50], "score": 0.9},
        {"image_id": 1, "category_id": 0, "bbox": [0, 0, 50, 50], "score": 0.5},
    ]
    r = coco_map([_img(1)], gt, dets, {0: "a"})
    assert r.map50 == pytest.approx(0.5)
    assert r.map50_95 == pytest.approx(0.5)


def test_wrong_class_and_classes_without_ground_truth():
    names = {0: "a", 1: "b", 2: "c"}
    gts = [
        {"image_id": 1, "category_id": 0, "bbox": [0, 0, 50, 50]},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]},
    ]
    dets = [
        {"image_id": 1, "category_id": 0, "bbox": [0, 0, 50, 50], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.9},  # right box, wrong class
    ]
    r = coco_map([_img(1), _img(2)], gts, dets, names)
    # class 2 has no ground truth: not averaged (as COCO / Ultralytics)
    assert r.map50 == pytest.approx(0.5)
    by = {c.class_id: c for c in r.per_class}
    assert by[0].ap50 == pytest.approx(1.0) and by[1].ap50 == pytest.approx(0.0)
    assert by[2].ap50 is None and by[2].instances == 0


def test_max_det_counts_more_than_coco_100():
    # 150 ground truth boxes in one image, all found: with COCO's default maxDets=100 recall
    # would stop at 100/150; raydetect uses max_det (300) as Ultralytics does
    gts = [{"image_id": 1, "category_id": 0, "bbox": [float(i * 10), 0.0, 8.0, 8.0]} for i in range(150)]
    dets = [{**g, "score": 0.5 + i / 1000} for i, g in enumerate(gts)]
    assert coco_map([_img(1, 1600, 10)], gts, dets, {0: "a"}).map50 == pytest.approx(1.0)
    assert coco_map([_img(1, 1600, 10)], gts, dets, {0: "a"}, max_det=100).map50 < 0.7


# --- YOLO labels -------------------------------------------------------------------------------


def test_yolo_box_to_pixels_exact():
    assert yolo_to_coco_box(0.5, 0.5, 0.2, 0.4, 780, 144) == pytest.approx((312.0, 43.2, 156.0, 57.6))
    assert yolo_to_coco_box(0.05, 0.1, 0.1, 0.2, 100, 50) == pytest.approx((0.0, 0.0, 10.0, 10.0))


def test_parse_yolo_labels_and_polygons():
    rows = parse_yolo_labels("0 0.5 0.5 0.2 0.4\n\n3 0.1 0.1 0.3 0.1 0.3 0.5\n", "x.txt")
    assert rows[0] == (0, 0.5, 0.5, 0.2, 0.4)
    cls, cx, cy, w, h = rows[1]  # polygon → its bounding box
    assert cls == 3 and (cx, cy, w, h) == pytest.approx((0.2, 0.3, 0.2, 0.4))


@pytest.mark.parametrize(
    "text,msg",
    [("0 0.5 0.5 0.2\n", "x.txt:1"), ("a 0.5 0.5 0.2 0.2\n", "not numbers"), ("0 0.5 0.5 0.2 0.2\n1.5 0 0 1 1", "x.txt:2"),
     ("0 50 60 20 20\n", "normalised")],
)
def test_parse_yolo_labels_errors_name_file_and_line(text, msg):
    with pytest.raises(DatasetError, match=msg):
        parse_yolo_labels(text, "x.txt")


def test_load_dataset_forms(data_dir):
    by_yaml = load_dataset(str(DEFECTS / "data.yaml"), "test")
    assert len(by_yaml.images) == 800 and by_yaml.split == "test" and by_yaml.names[7] == "hd"
    first = by_yaml.images[0]
    assert first.label_uri.endswith("/labels/test/" + first.uri.rsplit("/", 1)[1].rsplit(".", 1)[0] + ".txt")
    by_root = load_dataset(str(DEFECTS), "test")  # finds data.yaml in the root
    by_images_dir = load_dataset(str(DEFECTS / "images" / "test"), None)
    assert [i.uri for i in by_root.images] == [i.uri for i in by_images_dir.images] == [i.uri for i in by_yaml.images]
    with pytest.raises(DatasetError, match="no 'nope' split"):
        load_dataset(str(DEFECTS / "data.yaml"), "nope")
    with pytest.raises(FileNotFoundError):
        load_dataset(str(DEFECTS / "missing"), "test")


def test_subset_is_seeded_and_spread():
    items = list(range(800))
    a, b = subset(items, 100, 0), subset(items, 100, 0)
    assert a == b == sorted(a) and len(set(a)) == 100
    assert subset(items, 100, 1) != a
    assert max(a) > 700 and min(a) < 100  # not just the first 100
    assert subset(items, None) == items


# --- the real detector on the defects set -----------------------------------------------------


def _copy_subset(dst, n: int, *, corrupt: bool = False):
    """A small YOLO dataset (images/ + labels/) from defects/test, spread over the classes."""
    src = load_dataset(str(DEFECTS / "data.yaml"), "test")
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    for item in subset(src.images, n, seed=3):
        name = item.uri.rsplit("/", 1)[1]
        shutil.copy(item.uri, dst / "images" / name)
        shutil.copy(item.label_uri, dst / "labels" / (name.rsplit(".", 1)[0] + ".txt"))
    if corrupt:
        (dst / "images" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (dst / "labels" / "zz_broken.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return dst


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, data_dir):
    return _copy_subset(tmp_path_factory.mktemp("defects-small"), 24)


def test_evaluate_real_model_on_yolo_and_same_set_as_coco_json(small_set):
    yolo = evaluate_model(MODEL, str(small_set), engine="onnxruntime", batch_size=8)
    assert yolo.images == yolo.images_evaluated == 24 and yolo.instances == 24
    assert yolo.engine == "onnxruntime" and yolo.precision == "fp32"
    assert 0.2 < yolo.map50 <= 1.0 and 0.0 < yolo.map50_95 < yolo.map50
    assert [c.name for c in yolo.per_class] == ["fi", "ke", "ka", "ib", "kb", "hc", "hb", "hd"]
    assert sum(c.instances for c in yolo.per_class) == 24

    # the same images and boxes as a COCO json (category ids deliberately not 0-based):
    # identical mAP proves the YOLO → pixel conversion and the COCO path agree
    names = ["fi", "ke", "ka", "ib", "kb", "hc", "hb", "hd"]
    doc = {"images": [], "annotations": [], "categories": [{"id": 10 + i, "name": n} for i, n in enumerate(names)]}
    for i, p in enumerate(sorted((small_set / "images").iterdir()), 1):
        h, w = cv2.imread(str(p)).shape[:2]
        doc["images"].append({"id": i, "file_name": f"images/{p.name}", "width": w, "height": h})
        for line in (small_set / "labels" / (p.stem + ".txt")).read_text().splitlines():
            c, cx, cy, bw, bh = (float(v) for v in line.split())
            doc["annotations"].append(
                {"id": len(doc["annotations"]) + 1, "image_id": i, "category_id": 10 + int(c),
                 "bbox": list(yolo_to_coco_box(cx, cy, bw, bh, w, h)), "iscrowd": 0, "area": bw * bh * w * h}
            )
    (small_set / "coco.json").write_text(json.dumps(doc))
    coco = evaluate_model(MODEL, str(small_set / "coco.json"), engine="onnxruntime", batch_size=8)
    assert coco.format == "coco" and coco.images_evaluated == 24
    assert coco.map50 == pytest.approx(yolo.map50, abs=1e-9)
    assert coco.map50_95 == pytest.approx(yolo.map50_95, abs=1e-9)


def test_unreadable_image_is_reported_and_left_out(tmp_path, data_dir):
    root = _copy_subset(tmp_path / "set", 6, corrupt=True)
    r = evaluate_model(MODEL, str(root), engine="onnxruntime", batch_size=4)
    assert r.images == 7 and r.images_evaluated == 6 and r.instances == 6
    assert len(r.errors) == 1 and r.errors[0]["uri"].endswith("zz_broken.jpg")
    assert "JPEG" in r.errors[0]["error"] or "decode" in r.errors[0]["error"]


def test_cli_eval_writes_json_report_with_per_class_ap(small_set, tmp_path, capsys):
    from raydetect.cli import main

    out = tmp_path / "reports" / "eval.json"
    rc = main(["eval", "--model", MODEL, "--data", str(small_set), "--engine", "onnxruntime",
               "--limit", "12", "--batch-size", "4", "--report", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "mAP@0.5" in text and "hd" in text
    assert "eval: 12/12 images in " in cap.err  # the progress line at the end (not a terminal here)
    rep = json.loads(out.read_text())
    assert rep["images"] == 12 and rep["conf"] == 0.001 and rep["iou"] == 0.7 and rep["max_det"] == 300
    assert 0.0 <= rep["map50_95"] <= rep["map50"] <= 1.0
    assert len(rep["per_class"]) == 8 and {"ap50", "ap50_95", "instances", "name"} <= set(rep["per_class"][0])
    assert rep["evaluator"].startswith("pycocotools")


def test_cli_eval_max_pixels_takes_effect(small_set, tmp_path, capsys):
    """--max-pixels reaches the detector (it used to be dropped): images larger than it are
    reported as errors and left out of the mAP."""
    from raydetect.cli import main

    # the defect images are all 780x144: half of a copy of the set is downscaled (YOLO labels
    # are relative, they stay right), and --max-pixels sits between the two sizes
    root = tmp_path / "set"
    shutil.copytree(small_set, root, ignore=shutil.ignore_patterns("*.json"))
    pixels = {}
    for i, p in enumerate(sorted((root / "images").iterdir())):
        im = cv2.imread(str(p))
        if i % 2:
            im = cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(p), im)
        pixels[p.name] = im.shape[0] * im.shape[1]
    limit = (min(pixels.values()) + max(pixels.values())) // 2
    too_large = sorted(n for n, px in pixels.items() if px > limit)
    assert 0 < len(too_large) < len(pixels)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", MODEL, "--data", str(root), "--engine", "onnxruntime",
               "--batch-size", "8", "--max-pixels", str(limit), "--report", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["images"] == len(pixels) and rep["images_evaluated"] == len(pixels) - len(too_large)
    assert sorted(e["uri"].rsplit("/", 1)[1] for e in rep["errors"]) == too_large
    assert all("image too large" in e["error"] and f"max_pixels {limit}" in e["error"] for e in rep["errors"])
    capsys.readouterr()
    # smaller than every image: nothing to evaluate, a clear error naming the cause
    assert main(["eval", "--model", MODEL, "--data", str(root), "--engine", "onnxruntime",
                 "--max-pixels", "1000"]) == 2
    assert f"none of the {len(pixels)} images could be evaluated" in (err := capsys.readouterr().err)
    assert "image too large" in err


def test_cli_eval_bad_data_is_a_clear_error(tmp_path, capsys, data_dir):
    from raydetect.cli import main

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5\n")
    assert main(["eval", "--model", MODEL, "--data", str(tmp_path), "--engine", "onnxruntime"]) == 2
    assert "a.txt:1" in capsys.readouterr().err
    assert main(["eval", "--model", MODEL, "--data", str(tmp_path / "nothing-here")]) == 2
    assert "not found" in capsys.readouterr().err


def test_evaluate_from_s3_matches_local(small_set, s3_storage, s3fs_client, tmp_path):
    s3fs_client.mkdir("eval-bucket")
    local = tmp_path / "local"
    for sub in ("images", "labels"):
        (local / sub).mkdir(parents=True)
        for p in sorted((small_set / sub).iterdir())[:8]:
            s3fs_client.put(str(p), f"eval-bucket/set/{sub}/{p.name}")
            shutil.copy(p, local / sub / p.name)
    r = evaluate_model(MODEL, "s3://eval-bucket/set", engine="onnxruntime", storage=s3_storage, batch_size=8)
    assert r.images_evaluated == 8 and r.instances == 8 and r.errors == []
    assert r.per_class and all(e.startswith("s3://") for e in [r.data])
    same = evaluate_model(MODEL, str(local), engine="onnxruntime", batch_size=8)
    assert (r.map50, r.map50_95) == (same.map50, same.map50_95)


def test_cli_eval_help_shows_val_defaults_and_parses_them():
    """eval's --help names the defaults it really uses (Ultralytics val: conf 0.001, IoU 0.7,
    max_det 300), and detect keeps the field defaults."""
    from raydetect.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    text = " ".join(sub["eval"].format_help().split())
    assert "Minimum confidence (default 0.001)" in text
    assert "NMS IoU threshold (default 0.7)" in text
    assert "max detections per image (default 300)" in text
    args = parser.parse_args(["eval", "--model", "m.onnx", "--data", "d"])
    assert tuple(getattr(args, f"detector.{n}") for n in ("conf", "iou", "max_det")) == (0.001, 0.7, 300)
    detect_text = " ".join(sub["detect"].format_help().split())
    assert "Minimum confidence (default 0.25)" in detect_text
    assert getattr(parser.parse_args(["detect", "--model", "m", "--input", "i", "--output", "o"]), "detector.conf") == 0.25
