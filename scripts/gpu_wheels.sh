#!/usr/bin/env bash
# Wheels for the lent GPU machine (nvidia-h200), which reaches no package index. Its image has torch 2.11 (CUDA),
# transformers 5.17, huggingface_hub 1.33, accelerate 1.15 and peft, but no trl, datasets or bitsandbytes
# (/work/.library/device/KINDS.md). This downloads, into .whl/ (gitignored), the versions this virtualenv runs, for
# CPython 3.12 on x86-64 (~63 MB: the device tool carries at most 64 MiB with the working tree; torch stays the
# image's). vllm and flash-attn do not fit or have no wheel for that torch: their checks are skipped there, saying so.
#
#   bash scripts/gpu_wheels.sh          # here, once per checkout (needs the package index)
# then, on the device (carry: [".whl"]), as docs/benchmarks.md "First GPU session" shows:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && timeout 540 python3 scripts/gpu_check.py --json $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(trl transformers huggingface_hub kernels accelerate peft datasets dill multiprocess bitsandbytes)
pins=$(python - "${PACKAGES[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in this virtualenv: {', '.join(missing)} (pip install -e '.[peft,quantization]' first)")
PY
)
rm -rf .whl && mkdir .whl
for pin in $pins; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$pin"
done
du -sh .whl
