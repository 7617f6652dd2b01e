"""The job report (JSON, Markdown, throughput PNG, annotated samples), with and without matplotlib,
and the metrics counting of one result batch."""

from __future__ import annotations

import json
import sys

import cv2
import pytest

from raydetect.config import DetectorConfig, JobConfig
from raydetect.job import output as sh
from raydetect.job.metrics import batch_counts
from raydetect.job.report import annotate, rate_series, throughput_png, write_report
from raydetect.job.run import JobSummary
from raydetect.storage import filesystem
from raydetect.types import Detection, ImageResult, ModelIdentity, results_to_table
from tests.conftest import MODELS, photo_paths


def test_rate_series_hand_computed():
    # 30 bins over 15 s → 0.5 s bins; 10 images land in bin 2 ([1.0, 1.5)), 20 in the last bin
    tl = [(0.0, 0), (1.2, 10), (15.0, 30)]
    rates = rate_series(tl)
    assert len(rates) == 30 and rates[2] == (1.25, 20.0) and rates[-1] == (14.75, 40.0)
    assert sum(r for _, r in rates) * 0.5 == 30  # every image counted once
    assert rate_series([(0.0, 0)]) == []


def results_for(paths):
    res = []
    for k, p in enumerate(paths):
        dets = [Detection(10, 10, 60 + 10 * j, 80, 0.9 - 0.1 * j, j, f"c{j}") for j in range(k % 3)]
        res.append(ImageResult(uri=str(p), width=100, height=100, detections=dets))
    res.append(ImageResult(uri="/gone/broken.jpg", error="cannot decode: not an image or corrupt data"))
    return res


def make_output(tmp_path):
    fs, out = filesystem(str(tmp_path / "out"))
    fs.makedirs(out, exist_ok=True)
    res = results_for(photo_paths())
    table = results_to_table(res, ModelIdentity("x", engine="onnxruntime", precision="fp32"))
    w = sh.ShardWriter(fs, out, sh.plan_shards([r.uri for r in res], 3))
    w.add(table)
    w.close()
    cfg = JobConfig(input="/in", output=str(tmp_path / "out"), detector=DetectorConfig(model=str(MODELS / "x.onnx")),
                    report_samples=2)
    summary = JobSummary(images=len(res), seconds=4.0, detections=sum(len(r.detections) for r in res), errors=1,
                         output=cfg.output, processed=len(res), shards=3)
    return fs, out, cfg, summary, res


def test_report_files(tmp_path):
    fs, out, cfg, summary, res = make_output(tmp_path)
    timeline = [(0.0, 0), (1.0, 3), (2.5, 6), (4.0, len(res))]
    url = write_report(cfg, summary, timeline, fs, fs, out, "")
    rep = json.loads((tmp_path / "out" / "_report" / "report.json").read_text())
    assert url.endswith("_report/report.json")
    assert rep["per_class"] == {"c0": 4, "c1": 2}  # photos 1,2,4,5 have c0; photos 2,5 also c1
    assert rep["errors"] == 1 and rep["error_examples"] == [{"uri": "/gone/broken.jpg",
                                                             "error": "cannot decode: not an image or corrupt data"}]
    assert rep["throughput_timeline"][-1] == [4.0, len(res)] and rep["throughput_plot"] == "throughput.png"
    png = (tmp_path / "out" / "_report" / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s["detections"] for s in rep["samples"]] == [2, 2]
    img = cv2.imread(str(tmp_path / "out" / "_report" / rep["samples"][0]["file"]))
    assert img is not None and img.shape[:2] == cv2.imread(rep["samples"][0]["uri"]).shape[:2]
    md = (tmp_path / "out" / "_report" / "report.md").read_text()
    assert "| c0 | 4 |" in md and "![throughput](throughput.png)" in md and "/gone/broken.jpg" in md


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert throughput_png([(0.0, 0), (1.0, 5)], "t") is None
    fs, out, cfg, summary, _ = make_output(tmp_path)
    write_report(cfg, summary, [(0.0, 0), (1.0, 5)], fs, fs, out, "")
    rep = json.loads((tmp_path / "out" / "_report" / "report.json").read_text())
    assert rep["throughput_plot"] is None and not (tmp_path / "out" / "_report" / "throughput.png").exists()
    assert "matplotlib is not installed" in (tmp_path / "out" / "_report" / "report.md").read_text()


def test_annotate_draws_inside_the_box():
    img = cv2.imread(str(photo_paths()[0]))
    out = annotate(img, [{"x1": 50, "y1": 60, "x2": 200, "y2": 220, "score": 0.5, "class_id": 3, "class_name": "x"}])
    assert out.shape == img.shape and (out != img).any() and (img == cv2.imread(str(photo_paths()[0]))).all()
    assert (out[150, 120] == img[150, 120]).all()  # the inside of the box is untouched


@pytest.mark.parametrize("frames", [False, True])
def test_batch_counts(frames):
    res = results_for(photo_paths()[:4])
    table = results_to_table(res, ModelIdentity("x", engine="e", precision="p"))
    if frames:
        import pyarrow as pa

        table = table.append_column("frame", pa.array([0, 1, None, 3, 4], pa.int64()))
    c = batch_counts(table)
    assert c["detections"] == 0 + 1 + 2 + 0 and c["errors"] == 1
    assert (c["images"], c["frames"]) == ((1, 4) if frames else (5, 0))
