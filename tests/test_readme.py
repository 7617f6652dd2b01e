"""README.md's shell blocks run as written, so the README cannot drift from the code.

Every ```` ```bash ```` block of README.md is one of:

* marked ``<!-- readme-test: skip (why) -->`` on the line before it (installs, a cluster, S3,
  long benchmarks), or needing a GPU (:data:`GPU`: ``--engine torch|tensorrt``, ``--num-gpus``,
  ``--precision fp16``, ``raydetect build``, NVIDIA's index): not run;
* marked ``<!-- readme-test: server (...) -->``: started in the background (its own session and
  Ray), stopped with SIGTERM once the blocks after it have run;
* anything else: run with ``bash -e`` and checked by the entry of :data:`CHECKS` whose key it
  contains — a block without a check fails :func:`test_every_block_is_skipped_or_checked`.

How a block runs here: from a scratch folder whose ``../shared/data`` is the test data (so
``../shared/data`` paths work as from the repo root and files the commands write stay out of
the repo), ``/tmp/`` paths moved to a scratch folder, port 8000 replaced by a free port, and the
long commands shortened by the adaptations in :data:`CHECKS` (``--limit``, fewer calibration
images). ``raydetect detect`` joins the session's local Ray (``RAY_ADDRESS``) instead of starting
one per block: Ray's start-up is tested elsewhere, and it would triple the runtime. The server
starts its own Ray, as on a fresh machine. Exported variables (``export X=Y``) carry over to
the blocks after them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO, free_port

README = REPO / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(skip|server)\b\s*(?:\((.*?)\))?\s*-->")
#: blocks that need a GPU (or NVIDIA's packages) without a mark: the GPU sections of the README
GPU = re.compile(r"--engine (torch|tensorrt)|--num-gpus|--precision fp16|raydetect build|pypi\.nvidia\.com|tensorrt")
EXPORT = re.compile(r"^\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)", re.M)

pytestmark = pytest.mark.timeout(600)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    mark: str | None = None  # skip | server
    reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.mark == "skip" or bool(GPU.search(self.text))

    def title(self) -> str:
        first = next((ln for ln in self.text.splitlines() if ln.strip() and not ln.startswith("#")), "")
        return f"README.md:{self.line}: {first.strip()[:70]}"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARK.search(prev)
            out.append(Block(i + 1, "\n".join(lines[i + 1 : j]), m and m.group(1), m and m.group(2)))
            i = j
        i += 1
    return out


@dataclass
class Run:
    rc: int
    out: str  # stdout + stderr
    cwd: Path
    tmp: Path  # where README's /tmp/ paths went

    def fail(self, why: str) -> str:
        return f"{why}; exit {self.rc}; output tail:\n{self.out[-3000:]}"


@dataclass
class Check:
    check: Callable[[Run], None]
    adapt: Callable[[str], str] = lambda s: s
    timeout_s: float = 240.0
    extra: dict = field(default_factory=dict)


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"README block changed: {old!r} is gone (update tests/test_readme.py)"
    return text.replace(old, new)


def ok(r: Run, *needles: str) -> None:
    assert r.rc == 0, r.fail("non-zero exit")
    for n in needles:
        assert n in r.out, r.fail(f"{n!r} not in the output")


def _classes(row) -> set[str]:
    return {d["class_name"] for d in row["detections"] or []}


def check_photos(r: Run) -> None:
    import raydetect

    ok(r, "raydetect: 7 images in", "0 errors")
    res = raydetect.read_results(str(r.tmp / "raydetect-out"))
    by_name = {row["uri"].rsplit("/", 1)[-1]: _classes(row) for row in res.images.to_pylist()}
    assert {"bus", "car"} <= by_name["bus.jpg"], by_name
    assert "cat" in by_name["cat22.jpg"] and "bicycle" in by_name["bike1.jpg"], by_name
    assert (r.tmp / "raydetect-out" / "_report" / "report.md").exists()


def check_defects(r: Run) -> None:
    import raydetect

    ok(r, "raydetect: 100 images in", "0 errors")
    rows = raydetect.read_results(str(r.tmp / "defects-out")).images.to_pylist()
    names = set().union(*(_classes(x) for x in rows))
    assert len(rows) == 100 and names and names <= {"fi", "ke", "ka", "ib", "kb", "hc", "hb", "hd"}, names


def check_read_results(r: Run) -> None:
    ok(r, "Results(", ": 7 images, 0 video frame rows, 0 videos)", "bus.jpg ['bus', 'car']")


def check_video(r: Run) -> None:
    import raydetect

    ok(r, "raydetect: 1 videos (1 segments)", "49 frames decoded", "11 processed", "0 errors")
    res = raydetect.read_results(str(r.tmp / "video-out"))
    frames = res.frames.to_pylist()
    assert len(frames) == 11 and all("car" in _classes(f) for f in frames)
    assert res.video_summary.column("frames_decoded").to_pylist() == [49]


def check_curl(r: Run) -> None:
    ok(r, '"class_name":"bus"', '"class_name":"car"', '"engine":"onnxruntime"', '{"status":"ok"}')
    first, _ = json.JSONDecoder().raw_decode(r.out)  # the raw-body request at conf=0.3 (curl adds no newline)
    assert {"bus", "car"} <= {d["class_name"] for d in first["detections"]} and first["width"] == 800
    assert all(d["score"] > 0.3 for d in first["detections"])
    assert '"names":{"0":"person"' in r.out and r.out.count('"status":200') == 2, r.fail("batch/model answers")


def adapt_accuracy(text: str) -> str:
    text = replace(text, "--split test --report eval_fp32.json", "--split test --report eval_fp32.json --limit 16")
    text = replace(text, "--images 300", "--images 8 --eval-limit 16")
    text = replace(text, "--max-map-drop 1.0", "--max-map-drop 100")  # 16 images: mAP too noisy to gate
    return replace(text, "--engine onnxruntime", "--engine onnxruntime --limit 16")


def check_accuracy(r: Run) -> None:
    ok(r, "mAP@0.5", "onnxruntime fp32", "onnxruntime int8")
    for f in ("eval_fp32.json", "yolov8n-defects_int8.onnx", "quantize.json"):
        assert (r.cwd / f).exists(), r.fail(f"{f} not written")
    report = json.loads((r.cwd / "eval_fp32.json").read_text())
    assert report["images_evaluated"] == 16 and report["per_class"], report.keys()
    # quantize reuses eval's FP32 evaluation (same model, images and settings)
    assert "FP32 evaluation: reused" in r.out, r.fail("FP32 evaluated again")
    assert json.loads((r.cwd / "quantize.json").read_text())["fp32_reused"]


#: block key (a unique substring of the block) → how to run and check it
CHECKS: dict[str, Check] = {
    "--input ../shared/data/images --output /tmp/raydetect-out": Check(check_photos),
    "--input ../shared/data/defects/images/test --output /tmp/defects-out --limit 100": Check(check_defects),
    'raydetect.read_results("/tmp/raydetect-out")': Check(check_read_results, timeout_s=60),
    "--input ../shared/data/video --output /tmp/video-out": Check(check_video),
    "/v1/detect/batch": Check(check_curl, timeout_s=60),
    "raydetect quantize --model ../shared/data/models/yolov8n-defects.onnx": Check(
        check_accuracy, adapt_accuracy, timeout_s=400
    ),
}


def check_for(block: Block) -> Check | None:
    found = [c for k, c in CHECKS.items() if k in block.text]
    assert len(found) <= 1, f"{block.title()}: several checks match"
    return found[0] if found else None


def test_every_block_is_skipped_or_checked():
    """Each README block is skipped (with a reason), a GPU block, the server, or has a check;
    each check still matches a block. Also the marker parser itself."""
    blocks = readme_blocks()
    assert len(blocks) >= 10
    for b in blocks:
        if b.mark == "skip":
            assert b.reason, f"{b.title()}: a skip mark says why"
        if b.skipped or b.mark == "server":
            continue
        assert check_for(b) is not None, f"{b.title()}: no check in tests/test_readme.py (or mark it skip)"
    runnable = [b for b in blocks if not b.skipped]
    for key in CHECKS:
        assert any(key in b.text for b in runnable), f"check {key!r} matches no runnable README block"
    assert sum(b.mark == "server" for b in blocks) == 1
    sample = "text\n<!-- readme-test: skip (needs GPU) -->\n```bash\nnvidia-smi\n```\n\n```bash\necho hi\n```\n"
    parsed = readme_blocks(sample)
    assert [(b.mark, b.reason, b.text) for b in parsed] == [("skip", "needs GPU", "nvidia-smi"), (None, None, "echo hi")]


def _localise(text: str, tmp: Path, port: int) -> str:
    text = text.replace("/tmp/", f"{tmp}/")
    return text.replace("--port 8000", f"--port {port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    pytest.fail(f"server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop_server(proc: subprocess.Popen, log: Path) -> int:
    from tests.local_cluster import stop_session

    if proc.poll() is None:
        # SIGTERM to the command the block runs (bash's child), as a service manager would; bash
        # then exits with its status
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children or [str(proc.pid)]:
            os.kill(int(pid), signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    rc = proc.poll()
    stop_session(proc.pid, grace_s=5.0)  # whatever the server's own Ray left in its session
    return -1 if rc is None else rc


def test_readme_blocks_run(ray_local, data_dir, tmp_path):
    blocks = [b for b in readme_blocks() if not b.skipped]
    cwd = tmp_path / "main"
    cwd.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    ctx = ray_local._private.worker.global_worker.node
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    server: tuple[subprocess.Popen, Path] | None = None
    times: list[tuple[str, float]] = []
    try:
        for b in blocks:
            for name, value in EXPORT.findall(b.text):
                env[name] = value
            if b.mark == "server":
                log = tmp_path / "server.log"
                # its own Ray, as on a fresh machine: none of the session's Ray/Serve settings
                own = {k: v for k, v in env.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
                with open(log, "w") as fh:
                    proc = subprocess.Popen(["bash", "-ec", _localise(b.text, scratch, port)], cwd=cwd, env=own,
                                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                server = (proc, log)
                t0 = time.monotonic()
                _wait_healthy(port, proc, log)
                times.append((b.title(), time.monotonic() - t0))
                continue
            c = check_for(b)
            assert c is not None, b.title()
            text = _localise(c.adapt(b.text), scratch, port)
            t0 = time.monotonic()
            p = subprocess.run(["bash", "-ec", text], cwd=cwd, env={**env, "RAY_ADDRESS": ctx.address},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=c.timeout_s)
            times.append((b.title(), time.monotonic() - t0))
            c.check(Run(p.returncode, p.stdout, cwd, scratch))
        if server is not None:
            rc = _stop_server(*server)
            log_text = server[1].read_text()
            server = None
            assert rc == 0 and "Traceback" not in log_text, f"server: exit {rc} on SIGTERM:\n{log_text[-3000:]}"
    finally:
        if server is not None:
            _stop_server(*server)
        print("\n".join(f"{s:6.1f} s  {t}" for t, s in times))
