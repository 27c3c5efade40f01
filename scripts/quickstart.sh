#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run every Search-R3 stage on this CPU machine:
# data -> self-analyses -> Stage 1 (verl SFT trainer) -> GRPO (verl main_ppo, search_r3 trainer, selective-refresh
# environment) -> evaluation against BM25, on the CPU backend.
# Extra arguments go to `python -m verl_search_r3.quickstart` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m verl_search_r3.quickstart "$@"
