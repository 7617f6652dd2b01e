"""raydetect.progress: a live bar in a terminal, a line every interval elsewhere; and the CLI
commands that show it (eval and bench are checked in their own test files)."""

from __future__ import annotations

import io

from raydetect.progress import Progress
from tests.conftest import DEFECTS, MODELS


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_every_interval_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", 800, stream=out, tty=False, interval_s=10, clock=clock)
    for done in range(0, 801, 40):  # 40 images every 2 s: 20 images/s
        clock.t += 2.0
        p(done, 800)
    p.close()
    lines = out.getvalue().splitlines()
    # a line every 10 s of the ~42 s, then the summary; no carriage returns in a log
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[0] == "eval: 160/800 images (20%), 16.0 images/s, ETA 0:40"
    assert lines[-1] == "eval: 800/800 images in 42.0 s (19.0 images/s)"


def test_terminal_bar_redraws_in_place_and_ends_with_a_newline():
    clock, out = Clock(), io.StringIO()
    with Progress("calibration (entropy)", 10, stream=out, tty=True, redraw_s=0.2, clock=clock) as p:
        for _ in range(10):
            clock.t += 0.5
            p.update()
        p.write("a result line", stream=out)
    text = out.getvalue()
    assert text.endswith("calibration (entropy): 10/10 images in 5.0 s (2.0 images/s)\n")
    assert text.count("\n") == 2  # the result line and the final line: the bar never scrolls
    assert "\r\x1b[Kcalibration (entropy):  50%|████████████            | 5/10 images [0:02<0:02, 2.0 images/s]" in text
    assert "a result line\n" in text


def test_without_total_counts_and_rate():
    clock, out = Clock(), io.StringIO()
    p = Progress("bench", None, unit="timings", stream=out, tty=False, interval_s=1, clock=clock)
    clock.t += 4
    p.update(2)
    assert out.getvalue() == "bench: 2 timings, 0.5 timings/s, 0:04 elapsed\n"


def test_quantize_cli_shows_calibration_and_both_evaluations(tmp_path, capsys, data_dir):
    from raydetect.cli import main

    rc = main(["quantize", "--model", str(MODELS / "yolov8n-defects.onnx"), "--calib",
               str(DEFECTS / "images" / "train"), "--images", "4", "--method", "minmax",
               "--out", str(tmp_path / "q.onnx"), "--eval-data", str(DEFECTS / "data.yaml"),
               "--eval-limit", "4", "--max-map-drop", "100"])
    assert rc == 0
    err = capsys.readouterr().err
    for step in ("calibration (minmax): 4/4 images in ", "FP32 evaluation: 4/4 images in ",
                 "INT8 evaluation (minmax): 4/4 images in "):
        assert step in err, err[-2000:]
