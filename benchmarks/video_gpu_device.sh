#!/usr/bin/env bash
# Issue 15 on a one-GPU device machine, from a copy of this tree (e.g. /work/main/.wt15) with the
# carried folder DATA beside it holding: vsite.tar.xz (PyAV 18.1.0 + PyNvVideoCodec 2.2.4 cp312,
# unpacked wheels), whl/ (onnx2torch, pydantic), pyt/ (pytest, if missing there),
# yolov5n-coco.onnx.xz, traffic-highway-2s.mp4; and for step 2 the Ray bundle (.devbundle).
#   bash benchmarks/video_gpu_device.sh 1   # install, GPU tests, clips, decode-only, in-process
#   bash benchmarks/video_gpu_device.sh 2   # the Ray Data video job (same warm machine: /tmp kept)
set -u
DATA=${DATA:-../.wt15data}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAYDETECT_TEST_DATA=/tmp/data
if [ "$1" = 1 ]; then
  mkdir -p /tmp/vsite /tmp/data/models /tmp/data/video
  tar -C /tmp/vsite -xJf "$DATA/vsite.tar.xz" || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite "$DATA"/whl/*.whl
  python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/vsite "$DATA"/pyt/*.whl
  xz -dc "$DATA/yolov5n-coco.onnx.xz" > /tmp/data/models/yolov5n-coco.onnx
  cp "$DATA/traffic-highway-2s.mp4" /tmp/data/video/
  export PYTHONPATH=/tmp/vsite:$PWD
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import PyNvVideoCodec as n; p=n.PacketData(); print([a for a in dir(p) if not a.startswith('_')], list(getattr(n.cudaVideoCodec, '__members__', {}))[:12])" 2>&1 | tail -3
  python3 -c "import av, torch; from raydetect.video.nvdec import nvdec_availability as a; print(av.__version__, torch.__version__, a())"
  timeout 200 python3 -m pytest -q -s -rs tests/test_video.py -k "nvdec or colour or resolve" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^$" | tail -40
  timeout 300 python3 benchmarks/video.py --gpu clips,decode,inproc --work /tmp/vgw --out "$OUT/video_gpu" 2>&1 | grep -v Warning | tail -40
else
  [ -d /tmp/vsite/av ] && [ -f /tmp/vgw/clips.json ] || { echo "not the warm machine of step 1"; exit 4; }
  bash ../.devbundle/install.sh >/dev/null || exit 5
  export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD
  timeout 420 python3 benchmarks/video.py --gpu job --work /tmp/vgw --out "$OUT/video_gpu" ${JOBS:+--jobs $JOBS} 2>&1 | grep -E "^(job|nvdec|wrote|Traceback|  File|[A-Za-z]*Error)" | tail -40
fi
