#!/usr/bin/env bash
# Issues 12 and 16 on a one-GPU device machine, in one call: the GPU tests of the JPEG decoders,
# benchmarks/gpu_pipeline.py (engine, ready, Ray Data job) and benchmarks/shared_pool.py.
#
# The carry folder C (default .c12, git-ignored; built by `bash benchmarks/device_carry.sh c12`)
# holds Ray 2.60 (Data + Serve) with the bundle's wheels and onnx2torch, nvImageCodec + nvJPEG
# (nvimg.tar.xz), the trained defect model (yolov8n-defects.onnx.xz) and the photos (images/).
# Variables: STEPS (tests,pipeline,pool; default all three), FILES (JPEGs per set; default 40000:
# ~10 s of steady state at 4k images/s), POOL_FILES (shared_pool.py, default 20000), E2E (gpu_pipeline.py variants), SECTIONS
# (gpu_pipeline.py sections, default engine,ready,e2e), POOL_S (seconds kept for the pool step when
# the pipeline step runs), POOL_BATCHES (default '64 16'), POOL_OVERLAP (default auto; e.g. 'auto off'), PROFILE, PROFILE_S, BASE_E2E (below), TESTS_K
# (pytest -k of tests/test_gpu.py), TESTS_S, TOTAL_S.
# Run (device tool, carry [".c12"]):  bash benchmarks/gpu_device.sh
# Results: $OUT/gpu_pipeline_dev.json|md, $OUT/shared_pool_gpu_sb{64,16}.json|md, $OUT/gpu_tests.log.
set -u
C=${C:-.c12}
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-tests,pipeline,pool}
mkdir -p "$OUT" /tmp/site /tmp/data/models
export PYTHONUNBUFFERED=1 RAYDETECT_TEST_DATA=/tmp/data RAY_DEDUP_LOGS=0
t0=$(date +%s)
left() { echo $(( ${TOTAL_S:-585} - ($(date +%s) - t0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$C"/wheels/*.whl \
  2>&1 | grep -v "already exists" || true
tar -C /tmp/site -xJf "$C/ray-slim.tar.xz" || exit 3
tar -C /tmp/site -xJf "$C/nvimg.tar.xz" || exit 3
chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server
xz -dc "$C/yolov8n-defects.onnx.xz" > /tmp/data/models/yolov8n-defects.onnx
rm -rf /tmp/data/images /tmp/data/defects && cp -r "$C/images" /tmp/data/images
[[ -d "$C/defects" ]] && cp -r "$C/defects" /tmp/data/defects
export PYTHONPATH=/tmp/site:$PWD
echo "installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, ray; from raydetect.stages.gpu_preprocess import nvimgcodec_status as s; print(torch.__version__, ray.__version__, s())" 2>&1 | tail -2
M=/tmp/data/models/yolov8n-defects.onnx
if [[ ",$STEPS," == *,tests,* ]]; then
  # default: every GPU test without Ray (the decoders, engines, NMS, letterbox, compiled detector)
  timeout ${TESTS_S:-240} python3 -m pytest -q -s -rs tests/test_gpu.py -k "${TESTS_K:-not ray_actor and not gpu_job}" \
    -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
  grep -v "^$" "$OUT/gpu_tests.log" | tail -6
  echo "tests done at $(( $(date +%s) - t0 )) s"
fi
# PROFILE=<e2e variant>: while that variant's job runs, once its first part file is written
# (steady state), py-spy samples one detector actor for PROFILE_S seconds (collapsed stacks:
# $OUT/profile_actor.txt, with the GIL-holding samples in $OUT/profile_actor_gil.txt), the driver
# too ($OUT/profile_driver.txt), and top lists the busiest processes ($OUT/profile_top.txt)
if [[ -n "${PROFILE:-}" ]]; then
  (
    d=/tmp/raydetect-gpu-bench/out_$PROFILE
    for _ in $(seq 600); do compgen -G "$d/part-*" > /dev/null && break; sleep 0.5; done
    sleep 1
    pid=$(pgrep -f "MapWorker" | head -1)
    [[ -z "$pid" ]] && pid=$(ps -eo pid,args | grep -E "ray::.*(MapBatches|Detector)" | grep -v grep | head -1 | awk '{print $1}')
    top -b -n 1 -w 250 | head -40 > "$OUT/profile_top.txt"
    if [[ -n "$pid" ]]; then
      ps -o pid,args -p "$pid" >> "$OUT/profile_top.txt"
      /tmp/site/bin/py-spy record -p "$pid" -d "${PROFILE_S:-6}" -r 250 -f raw -o "$OUT/profile_actor.txt" --nonblocking --threads > "$OUT/profile_pyspy.log" 2>&1 &
      # the driver: Ray Data's streaming executor and the part-file writer run there
      drv=$(pgrep -f "^[^ ]*python[0-9.]* benchmarks/gpu_pipeline.py" | head -1)
      [[ -n "$drv" ]] && /tmp/site/bin/py-spy record -p "$drv" -d "${PROFILE_S:-6}" -r 100 -f raw \
        -o "$OUT/profile_driver.txt" --nonblocking --threads >> "$OUT/profile_pyspy.log" 2>&1 &
      /tmp/site/bin/py-spy record -p "$pid" -d "${PROFILE_S:-6}" -r 100 -f raw -o "$OUT/profile_actor_gil.txt" --nonblocking --gil >> "$OUT/profile_pyspy.log" 2>&1
      wait
    else
      echo "no actor process found" > "$OUT/profile_pyspy.log"
    fi
  ) &
fi
if [[ ",$STEPS," == *,pipeline,* ]]; then
  timeout $(( $(left) - ${POOL_S:-0} )) python3 benchmarks/gpu_pipeline.py --model $M --models $M \
    --batches 64,256 --sections ${SECTIONS:-engine,ready,e2e} --files ${FILES:-40000} --seconds 1.0 \
    --e2e ${E2E:-nvjpeg_4actors_t2_r256,nvimg_4actors_t2_r256,nvjpeg_1actor_t4_r256,nvjpeg_2actors_t4_r256,nvimg_2actors_t4_r256} \
    --out "$OUT" --name gpu_pipeline_dev 2>&1 | tail -30
  echo "pipeline done at $(( $(date +%s) - t0 )) s"
fi
# BASE_E2E=<variants>: the same e2e variants with the raydetect of $C/base (BASE=<rev>
# device_carry.sh c12) in the driver and the actors, on the same host: $OUT/gpu_pipeline_base.*
if [[ -n "${BASE_E2E:-}" && -d "$C/base/raydetect" ]]; then
  echo "base code: $(cat "$C/base/REV" 2>/dev/null)"
  rm -rf /tmp/base && mkdir -p /tmp/base && cp -r "$C/base/raydetect" benchmarks /tmp/base/
  # run from /tmp/base: Ray puts the driver's working directory on its workers' sys.path, and
  # from the checkout the actors imported this checkout's raydetect, not the base (2026-12-08)
  (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site timeout $(( $(left) - ${POOL_S:-0} )) python3 benchmarks/gpu_pipeline.py \
    --model $M --models $M --batches 64 --sections e2e --files ${FILES:-40000} --e2e "$BASE_E2E" \
    --out "$OUT" --name gpu_pipeline_base 2>&1 | grep -E "^\| e2e|Traceback|Error" | tail -8)
  echo "base e2e done at $(( $(date +%s) - t0 )) s"
fi
if [[ ",$STEPS," == *,pool,* ]]; then
  # POOL_BATCHES: the replicas' engine batch (images per archive-only call), one run each;
  # 16 = the online max_batch_size (how the archive ran until 2026-12-07)
  # POOL_OVERLAP: the replicas' archive_overlap, one run each (default auto: on, on a GPU)
  for sb in ${POOL_BATCHES:-64 16}; do
    for ov in ${POOL_OVERLAP:-auto}; do
      name=sb$sb; [[ "$ov" != auto ]] && name=${name}_overlap_$ov
      timeout $(left) python3 benchmarks/shared_pool.py --model $M --files ${POOL_FILES:-20000} --duration 8 \
        --serve-batch-size $sb --archive-overlap $ov --out "$OUT/shared_pool_gpu_$name" > "$OUT/shared_pool_gpu_$name.log" 2>&1
      grep -E "^(shared_pool|\|)" "$OUT/shared_pool_gpu_$name.log" | tail -20
      grep -A30 "^Traceback" "$OUT/shared_pool_gpu_$name.log" | grep -vE "^\s*$" | tail -12
      echo "pool ($name) done at $(( $(date +%s) - t0 )) s"
    done
  done
fi
ls -la "$OUT"
