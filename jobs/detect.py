"""Entrypoint for ``ray job submit``: the batch detection job.

    ray job submit --working-dir . -- python jobs/detect.py \
        --model s3://models/yolov8n.onnx --input s3://archive/images --output s3://results/run1

Takes the same arguments as ``raydetect detect``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydetect.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["detect", *sys.argv[1:]]))
