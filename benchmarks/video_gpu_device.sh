#!/usr/bin/env bash
# Issue 15 on a one-GPU device machine, in one call: the NVDEC GPU tests, then
# benchmarks/video.py's clips, decode, in-process and Ray Data job steps (1080p H.264 and HEVC).
#
# The carry folder C (default .c15, git-ignored; 64 MiB with the tree; built by
# `bash benchmarks/device_carry.sh c15`) holds:
#   ray-slim.tar.xz  Ray 2.60 from ../shared/device/bundle.sh, binaries stripped (strip
#                    --strip-unneeded): 24 MB instead of 28
#   wheels/          the bundle's wheels minus Serve's HTTP stack, haproxy and cryptography
#                    (a Ray Data job imports none of them), plus onnx2torch (the torch engine's
#                    ONNX converter; without it the detector runs ONNX Runtime on the CPU)
#   vsite.tar.xz     PyAV 18.1.0 + PyNvVideoCodec 2.2.4 (cp312) unpacked, samples and sources
#                    removed, shared objects stripped
#   yolov5n-coco.onnx.xz, traffic-highway-2s.mp4   from ../shared/data
# Variables: STEPS (clips,decode,inproc; the job step always runs after them), SESSIONS, SEG_S
# (segment length, default 38 s: 16 segments of the 4 clips = 4 actors x 4 sessions), JOBS, INPROC, TESTS_K,
# TESTS_S, BENCH_S, TOTAL_S, MINUTES (footage per codec, default 10), CODECS (default h264,hevc), BASE_JOBS (jobs run after JOBS with the
# raydetect of $C/base, when the carry has one: BASE=<rev> device_carry.sh; results in
# $OUT/video_gpu_base.job.json).
# Run (device tool, carry [".c15"]):  bash benchmarks/video_gpu_device.sh
# Results: $OUT/gpu_tests.log and $OUT/video_gpu.<steps>.json; fold them with
#   python benchmarks/video.py --merge $OUT/video_gpu.*.json --out benchmarks/results/video_gpu
set -u
C=${C:-.c15}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site /tmp/data/models /tmp/data/video
export PYTHONUNBUFFERED=1 RAYDETECT_TEST_DATA=/tmp/data RAY_DEDUP_LOGS=0
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$C"/wheels/*.whl || exit 2
tar -C /tmp/site -xJf "$C/ray-slim.tar.xz" || exit 3
tar -C /tmp/site -xJf "$C/vsite.tar.xz" || exit 3
chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server
xz -dc "$C/yolov5n-coco.onnx.xz" > /tmp/data/models/yolov5n-coco.onnx
cp "$C/traffic-highway-2s.mp4" /tmp/data/video/
export PYTHONPATH=/tmp/site:$PWD
echo "installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import av, torch, ray; from raydetect.video.nvdec import nvdec_availability as a; print(av.__version__, torch.__version__, ray.__version__, a())" 2>&1 | tail -3
timeout ${TESTS_S:-150} python3 -m pytest -q -s -rs tests/video/test_video.py -k "${TESTS_K:-nvdec or colour or resolve or annexb}" \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
grep -v "^$" "$OUT/gpu_tests.log" | tail -12
echo "tests done at $(( $(date +%s) - t0 )) s"
B="python3 benchmarks/video.py --segment-s ${SEG_S:-38} --minutes ${MINUTES:-10} --files 4 --work /tmp/vgw --codecs ${CODECS:-h264,hevc}"
# the job step runs below, on its own (a "job" in STEPS is dropped here)
S1=$(echo ",${STEPS:-clips,decode,inproc}," | sed 's/,job,/,/; s/^,//; s/,$//')
timeout ${BENCH_S:-200} $B --out $OUT/video_gpu --gpu "$S1" --sessions ${SESSIONS:-1,2,4,8} --decode-frames 1000 \
  --inproc ${INPROC:-nvdec:h264:4,nvdec:h264:8,nvdec:hevc:8,cpu:h264:8} --inproc-files 2 2>&1 \
  | grep -E "^(h264|hevc|inproc|clips|nvdec|wrote|Traceback|[A-Za-z]*Error)" | tail -24
echo "bench done at $(( $(date +%s) - t0 )) s"
timeout ${JOB_S:-$(( ${TOTAL_S:-585} - ($(date +%s) - t0) ))} $B --out $OUT/video_gpu --gpu job \
  --jobs ${JOBS:-nvdec:h264:4:4,cpu:h264:4:4,nvdec:h264:8:2,nvdec:hevc:4:4} 2>&1 \
  | grep -E "^(job|wrote|Traceback|[A-Za-z]*Error)" | tail -12
echo "job done at $(( $(date +%s) - t0 )) s"
if [[ -n "${BASE_JOBS:-}" && -d "$C/base/raydetect" ]]; then
  echo "base code: $(cat "$C/base/REV" 2>/dev/null)"
  # from /tmp/vbase: Ray puts the driver's working directory on its workers' sys.path (from the
  # checkout, the actors would import this checkout's raydetect, not the base)
  rm -rf /tmp/vbase && mkdir -p /tmp/vbase && cp -r "$C/base/raydetect" benchmarks /tmp/vbase/
  (cd /tmp/vbase && PYTHONPATH="/tmp/vbase:$PYTHONPATH" timeout $(( ${TOTAL_S:-585} - ($(date +%s) - t0) )) $B --out $OUT/video_gpu_base \
    --gpu job --tag-suffix _base --jobs "$BASE_JOBS" 2>&1 | grep -E "^(job|wrote|Traceback|[A-Za-z]*Error)" | tail -8)
  echo "base jobs done at $(( $(date +%s) - t0 )) s"
fi
ls -la "$OUT"
