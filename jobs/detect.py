"""Entrypoint for ``ray job submit``: the batch detection job.

    ray job submit --working-dir . -- python jobs/detect.py \
        --model s3://models/yolov8n.onnx --input s3://archive/images --output s3://results/run1

Takes the same arguments as ``raydetect detect``. Paths are read where the job runs, on the
cluster: relative local paths are refused (they would name files in the job's temporary copy of
``--working-dir``); use ``s3://`` URLs or absolute paths that exist on every node.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydetect.cli import main  # noqa: E402

PATH_FLAGS = ("--model", "--input", "--output", "--trt-cache")


def relative_paths(argv: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of the path arguments that are relative local paths."""
    out = []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag not in PATH_FLAGS:
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if value and "://" not in value and not os.path.isabs(value):
            out.append((flag, value))
    return out


if __name__ == "__main__":
    bad = relative_paths(sys.argv[1:])
    for flag, value in bad:
        print(f"jobs/detect.py: error: {flag} {value} is a relative local path: paths resolve on the "
              "cluster (in the job's temporary copy of --working-dir), not where you submit from; "
              "use an s3:// URL or an absolute path that exists on every node", file=sys.stderr)
    if bad:
        sys.exit(2)
    sys.exit(main(["detect", *sys.argv[1:]]))
