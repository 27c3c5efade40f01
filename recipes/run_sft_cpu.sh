#!/usr/bin/env bash
# Search-R3 Stage 1 (SFT + KL + InfoNCE + triplet) on the CPU backend: verl's SFT trainer under
# torchrun with one gloo process (config/backend/cpu_sft.yaml). The same recipe as
# run_sft_qwen7b.sh, sized for a laptop.
#   DATA_DIR    output folder of data_prep/build_pairs.py (pairs.parquet)
#   MODEL_PATH  the base instruct model (HF folder); default: SmolLM2-135M-Instruct, converted once
#               (python -m verl_search_r3.cpu.model --no-embed-token); <|embed_token|> is added if missing
#   EXPORT_DIR  where the final HF checkpoint is copied: the MODEL_PATH of run_grpo_cpu.sh
#   CKPT_DIR    verl checkpoint folder (trainer.default_local_dir)
#   NPROC       gloo processes (default 1); LAUNCH overrides the launcher (e.g. LAUNCH=python3 for --cfg job)
# Extra arguments are hydra overrides, e.g. trainer.total_training_steps=3, or `--cfg job` (last).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r3}
MODEL_PATH=${MODEL_PATH:-$(env -u VERL_PLATFORM python3 -m verl_search_r3.cpu.model --no-embed-token)}
EXPORT_DIR=${EXPORT_DIR:-$HOME/models/search_r3_stage1_cpu}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/search_r3/sft_cpu}
NPROC=${NPROC:-1}
LAUNCH=${LAUNCH:-"torchrun --standalone --nnodes=1 --nproc_per_node=$NPROC"}
export VERL_PLATFORM=cpu
export VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu${VERL_USE_EXTERNAL_MODULES:+,$VERL_USE_EXTERNAL_MODULES}

DATA=(
    data.train_files="$DATA_DIR/pairs.parquet"
    data.val_files="$DATA_DIR/pairs.parquet"
    data.train_batch_size=8
    data.use_dynamic_bsz=True
    data.max_token_len_per_gpu=2048
    data.search_r3.num_negatives=3
    data.search_r3.query_max_length=128
    data.search_r3.doc_max_length=256
)
MODEL=(
    model.path="$MODEL_PATH"
)
ENGINE=(
    optim.lr=1e-5
)
SEARCH_R3=(
    search_r3.export_dir="$EXPORT_DIR"
    search_r3.ref_param_offload=False
)
TRAINER=(
    trainer.project_name=search_r3
    trainer.experiment_name=sft_cpu
    trainer.default_local_dir="$CKPT_DIR"
    trainer.n_gpus_per_node="$NPROC"
    trainer.total_epochs=1
    trainer.save_freq=100
    trainer.test_freq=50
)

# shellcheck disable=SC2086  # LAUNCH is a command line
$LAUNCH -m verl_search_r3.stage1 \
    --config-path="$DIR/config" --config-name=search_r3_sft +backend=cpu_sft \
    "${DATA[@]}" "${MODEL[@]}" "${ENGINE[@]}" "${SEARCH_R3[@]}" "${TRAINER[@]}" \
    "$@"
