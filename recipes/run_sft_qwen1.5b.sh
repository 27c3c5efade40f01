#!/usr/bin/env bash
# Search-R3 Stage 1 on one 80 GB GPU: Qwen2.5-1.5B-Instruct (the size of the released Search-R3
# model). Same recipe as run_sft_qwen7b.sh; only the lines below differ (later hydra overrides
# win). Extra arguments are hydra overrides.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-1.5B-Instruct}
export EXPORT_DIR=${EXPORT_DIR:-$HOME/models/search_r3_stage1_qwen2.5_1.5b}
export EXPERIMENT=${EXPERIMENT:-sft_qwen2.5_1.5b}
export N_GPUS=${N_GPUS:-1}

exec bash "$DIR/run_sft_qwen7b.sh" \
    data.train_batch_size=32 \
    data.max_token_len_per_gpu=8192 \
    optim.lr=2e-5 \
    search_r3.ref_param_offload=False \
    "$@"
