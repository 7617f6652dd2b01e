#!/usr/bin/env bash
# Issue 18 on the device: `raydetect compress` with the fine-tune and QAT on the GPU, in one call.
#
# The carry folder C (default .c18, git-ignored; built by `bash benchmarks/device_carry.sh c18`) holds:
#   whl/          ultralytics 8.4.190, ultralytics-thop, ultralytics-platform, torch-pruning 1.6.1,
#                 nncf 3.4.0, pydot, openvino-telemetry, pydantic (+core, annotated-types,
#                 typing-inspection), pycocotools, onnx2torch (cp312 wheels; the device README's
#                 `pip download` recipe)
#   defects.zip   defects/ with data.yaml, train = a class-stratified seeded sample of 3,200 train
#                 images (the split is ordered by class: the first 3,500 by name, the checkpoint's own
#                 training images, hold no 'kb' or 'hc'; all 4,700 do not fit the 64 MiB carry),
#                 val = 304 (38 per class); no test split (never travels)
#   yolov8n-defects.pt  (CKPT=... PRUNE=0: fine-tune an already pruned checkpoint instead)
# Run (device tool): bash benchmarks/compress_gpu_device.sh   (carry: [".c18"])
# Then, on the CPU machine: benchmarks/issue18_table.sh with the models this writes to $OUT.
set -u
C=${C:-.c18}
OUT=${OUT:-/tmp/out}
FT_MIN=${FT_MIN:-4}
QAT_EPOCHS=${QAT_EPOCHS:-2}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$C"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
mkdir -p /tmp/c18 && python3 -m zipfile -e "$C"/defects.zip /tmp/c18 || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
W=/tmp/c18/work
# 1. prune 20 % of the channels per layer (head kept), fine-tune on the GPU for FT_MIN minutes
timeout $(( ${FT_MIN%.*} * 60 + 150 )) python3 -m raydetect.cli compress --checkpoint "$C"/${CKPT:-yolov8n-defects.pt} \
  --data /tmp/c18/defects/data.yaml --out $W/ft --prune-ratio ${PRUNE:-0.2} --finetune-epochs 100 \
  --finetune-minutes "$FT_MIN" --lr 0.01 --batch 64 --workers 12 --qat-epochs 0 --max-map-drop 100 \
  --device cuda 2>&1 | grep -v -E "^\s+[0-9]+/[0-9]+ .*it/s|Scanning" | tail -60
mkdir -p "$OUT"
cp $W/ft/compress_report.json "$OUT"/compress_defects_gpu_prune_finetune.json 2>/dev/null
cp $W/ft/*-pruned-ft.pt $W/ft/*-pruned-ft.onnx "$OUT"/ 2>/dev/null
FT=$(ls $W/ft/*-pruned-ft.pt 2>/dev/null | head -1)
# 2. NNCF quantization-aware training of the fine-tuned model on the GPU → INT8 QDQ ONNX
if [ -n "$FT" ] && [ "$QAT_EPOCHS" -gt 0 ]; then
  timeout 170 python3 -m raydetect.cli compress --checkpoint "$FT" \
    --data /tmp/c18/defects/data.yaml --out $W/qat --prune-ratio 0 --finetune-epochs 0 \
    --qat-epochs "$QAT_EPOCHS" --batch 32 --calib-batches 8 --workers 12 --max-map-drop 100 \
    --device cuda 2>&1 | tail -30
  cp $W/qat/compress_report.json "$OUT"/compress_defects_gpu_qat.json 2>/dev/null
  cp $W/qat/*-qat-int8.onnx "$OUT"/ 2>/dev/null
fi
ls -la "$OUT"
