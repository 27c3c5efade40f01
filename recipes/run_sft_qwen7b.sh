#!/usr/bin/env bash
# Search-R3 Stage 1 (SFT + KL + InfoNCE + triplet) on one 8-GPU node: Qwen2.5-7B-Instruct, FSDP.
#   DATA_DIR    output folder of data_prep/build_pairs.py (pairs.parquet)
#   MODEL_PATH  the base instruct model (HF folder); <|embed_token|> is added if it lacks it
#   EXPORT_DIR  where the final HF checkpoint is copied: the Stage-2 MODEL_PATH of run_grpo_qwen7b.sh
#   N_GPUS      processes on this node; LAUNCH overrides the launcher (e.g. LAUNCH=python for --cfg job)
# Extra arguments are hydra overrides, e.g. `--cfg job` to print the composed config and exit.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r3}
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-7B-Instruct}
EXPORT_DIR=${EXPORT_DIR:-$HOME/models/search_r3_stage1_qwen2.5_7b}
PROJECT=${PROJECT:-search_r3}
EXPERIMENT=${EXPERIMENT:-sft_qwen2.5_7b}
N_GPUS=${N_GPUS:-8}
LAUNCH=${LAUNCH:-"torchrun --standalone --nnodes=1 --nproc_per_node=$N_GPUS"}

DATA=(
    data.train_files="$DATA_DIR/pairs.parquet"
    data.val_files="$DATA_DIR/pairs.parquet"
    data.train_batch_size=128
    data.use_dynamic_bsz=True
    data.max_token_len_per_gpu=16384
    data.search_r3.num_negatives=4
    data.search_r3.query_max_length=256
    data.search_r3.doc_max_length=512
)
MODEL=(
    model.path="$MODEL_PATH"
    model.use_remove_padding=True
    model.enable_gradient_checkpointing=True
)
ENGINE=(
    engine.param_offload=False
    engine.optimizer_offload=False
    optim.lr=1e-5
)
SEARCH_R3=(
    search_r3.export_dir="$EXPORT_DIR"
    search_r3.ref_param_offload=True
)
TRAINER=(
    trainer.logger='["console","tensorboard"]'
    trainer.project_name="$PROJECT"
    trainer.experiment_name="$EXPERIMENT"
    trainer.n_gpus_per_node="$N_GPUS"
    trainer.nnodes=1
    trainer.total_epochs=1
    trainer.save_freq=500
    trainer.test_freq=100
)

# shellcheck disable=SC2086  # LAUNCH is a command line
$LAUNCH -m verl_search_r3.stage1 \
    --config-path="$DIR/config" --config-name=search_r3_sft \
    "${DATA[@]}" "${MODEL[@]}" "${ENGINE[@]}" "${SEARCH_R3[@]}" "${TRAINER[@]}" \
    "$@"
