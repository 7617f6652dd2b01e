#!/usr/bin/env bash
# Issue 15 on a one-GPU device machine, in one call, from a copy of this tree (e.g.
# /work/main/.wt15) with the carried folder DATA beside it holding: vsite.tar.xz (PyAV 18.1.0 +
# PyNvVideoCodec 2.2.4 for cp312, unpacked wheels), whl/ (onnx2torch, pydantic), pyt/ (pytest,
# if missing there), yolov5n-coco.onnx.xz, traffic-highway-2s.mp4. Ray does not fit beside them
# in one call (64 MiB): the Ray Data job step (--gpu job) needs the Ray bundle in another call.
#   bash benchmarks/video_gpu_device.sh
set -u
DATA=${DATA:-../.wt15data}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/vsite /tmp/data/models /tmp/data/video
export PYTHONUNBUFFERED=1 RAYDETECT_TEST_DATA=/tmp/data
tar -C /tmp/vsite -xJf "$DATA/vsite.tar.xz" || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite "$DATA"/whl/*.whl
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/vsite "$DATA"/pyt/*.whl
xz -dc "$DATA/yolov5n-coco.onnx.xz" > /tmp/data/models/yolov5n-coco.onnx
cp "$DATA/traffic-highway-2s.mp4" /tmp/data/video/
export PYTHONPATH=/tmp/vsite:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import PyNvVideoCodec as n; p=n.PacketData(); print([a for a in dir(p) if not a.startswith('_')], list(getattr(n.cudaVideoCodec, '__members__', {}))[:12])" 2>&1 | tail -3
python3 -c "import av, torch; from raydetect.video.nvdec import nvdec_availability as a; print(av.__version__, torch.__version__, a())" 2>&1 | tail -3
timeout ${TESTS_S:-65} python3 -m pytest -q -s -rs tests/video/test_video.py -k "nvdec or colour or resolve" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
grep -v "^$" "$OUT/gpu_tests.log" | tail -14
timeout ${BENCH_S:-85} python3 benchmarks/video.py --gpu clips,decode,inproc --segment-s 20 --inproc-files 1 --sessions 1,8 --decode-frames 800 --inproc nvdec:h264:8,cpu:h264:16,nvdec:hevc:8 --work /tmp/vgw --out "$OUT/video_gpu" 2>&1 | grep -v Warning | grep -E "^(h264|hevc|inproc|clips|wrote|Traceback|[A-Za-z]*Error)" | tail -20
