#!/usr/bin/env bash
# issue 18 precision table: all CPU rows, interleaved timing, mAP on all 800 test images.
# The models (paths below) were made with:
#   Q: raydetect quantize --model $M --calib <defects>/images/train --out $Q --images 300
#   P: raydetect nncf-quantize --model $M --calib <defects>/images/train --out $P --images 300
#   F: raydetect compress --checkpoint <models>/yolov8n-defects.pt --data DS --out /tmp/wt18/cpu/ft --prune-ratio 0.2
#        --finetune-epochs 10 --finetune-minutes 25 --lr 0.005 --qat-epochs 0 --batch 16 --workers 2 --device cpu
#        --max-map-drop 100   (CPU: about one epoch in 25 min; the GPU run could not be made)
#   A: raydetect compress --checkpoint /tmp/wt18/cpu/ft/yolov8n-defects-pruned-ft.pt --data DS --out /tmp/wt18/cpu/qat
#        --prune-ratio 0 --finetune-epochs 0 --qat-epochs 1 --fraction 0.1 --batch 16 --calib-batches 4 --eval-limit 150
#        --device cpu --max-map-drop 100
#   DS: the defect set with train = the first 3,500 train images by name (the checkpoint's training set) and
#       val = 300 seeded val images; test = images/test (kept out, checked by compress)
set -e
cd /work/wt18
M=/work/shared/data/models/yolov8n-defects.onnx
Q=/tmp/wt18/ortq/yolov8n-defects_int8.onnx
P=/tmp/wt18/ptq/yolov8n-defects_nncf_int8.onnx
F=/tmp/wt18/cpu/ft/yolov8n-defects-pruned-ft.onnx
A=/tmp/wt18/cpu/qat/yolov8n-defects-pruned-ft-pruned-qat-int8.onnx
PYTHONPATH=/work/wt18 python3 benchmarks/precision_table.py --model $M --int8 $Q --rounds ${ROUNDS:-5} --reps 3 \
  --out benchmarks/results/precision_table_issue18 \
  --rows onnxruntime:fp32:$M:baseline openvino:fp32:$M:baseline onnxruntime:int8:$Q:baseline-ORT-PTQ \
         openvino:int8:$Q:baseline-ORT-PTQ openvino:int8:$P:baseline-NNCF-PTQ \
         onnxruntime:fp32:$F:pruned-ft openvino:fp32:$F:pruned-ft \
         onnxruntime:int8:$A:pruned-ft-QAT openvino:int8:$A:pruned-ft-QAT "$@"
