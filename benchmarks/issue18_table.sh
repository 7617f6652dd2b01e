#!/usr/bin/env bash
# issue 18 precision table: all CPU rows, interleaved timing, mAP on all 800 test images.
# Models (folder W, default /tmp/i18; none of them is committed):
#   Q: raydetect quantize --model $M --calib <defects>/images/train --out $Q --images 300
#   P: raydetect nncf-quantize --model $M --calib <defects>/images/train --out $P --images 300
#   F, A: benchmarks/compress_gpu_device.sh on the device (one call): raydetect compress prunes
#      20 % of the channels per layer (head kept), fine-tunes on the GPU (Ultralytics' trainer,
#      FT_MIN=4 minutes, SGD lr 0.01, batch 64), then a second compress run does NNCF QAT (2 epochs,
#      GPU) of the fine-tuned checkpoint. Training: a class-stratified sample of 3,200 train images;
#      val: 304 (benchmarks/device_carry.sh c18); test never travels.
# Run from the repository root: bash benchmarks/issue18_table.sh [extra precision_table.py args]
set -e
D=${DATA:-../shared/data}
W=${W:-/tmp/i18}
M=$D/models/yolov8n-defects.onnx
Q=$W/yolov8n-defects_int8.onnx
P=$W/yolov8n-defects_nncf_int8.onnx
F=$W/yolov8n-defects-pruned-ft.onnx
A=$W/yolov8n-defects-pruned-ft-pruned-qat-int8.onnx
[ -f "$Q" ] || raydetect quantize --model $M --calib $D/defects/images/train --out $Q --images 300
[ -f "$P" ] || raydetect nncf-quantize --model $M --calib $D/defects/images/train --out $P --images 300
python3 benchmarks/precision_table.py --model $M --int8 $Q --rounds ${ROUNDS:-5} --reps 3 \
  --out benchmarks/results/precision_table_issue18 \
  --rows onnxruntime:fp32:$M:baseline openvino:fp32:$M:baseline onnxruntime:int8:$Q:baseline-ORT-PTQ \
         openvino:int8:$Q:baseline-ORT-PTQ openvino:int8:$P:baseline-NNCF-PTQ \
         onnxruntime:fp32:$F:pruned-ft openvino:fp32:$F:pruned-ft \
         onnxruntime:int8:$A:pruned-ft-QAT openvino:int8:$A:pruned-ft-QAT "$@"
