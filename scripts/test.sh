#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits non-zero on failures and with code 5 when no test was collected.
exec .venv/bin/python -m pytest "$@"
