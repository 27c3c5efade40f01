#!/usr/bin/env bash
# Search-R1 with GRPO on one 8-GPU node: Qwen2.5-3B (base or instruct), FSDP + vLLM TP=1, group 5,
# top-3 documents, 4 action rounds + a final turn, low-variance KL loss 0.001 (the paper's GRPO run).
#   DATA_DIR    output folder of data_prep/build_search_r1_data.py (train.parquet, test.parquet)
#   INDEX_DIR   output folder of python -m verl_search_r3.search_r1.build_index (e.g. wiki-18 + E5)
#   MODEL_PATH  Qwen2.5-3B or Qwen2.5-3B-Instruct folder
# Extra arguments are hydra overrides, e.g. `--cfg job` to print the composed config and exit.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r1}
INDEX_DIR=${INDEX_DIR:-$HOME/indexes/wiki18_e5}
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-3B}
PROJECT=${PROJECT:-search_r1}
EXPERIMENT=${EXPERIMENT:-grpo_qwen2.5_3b}

DATA=(
    data.train_files="$DATA_DIR/train.parquet"
    data.val_files="$DATA_DIR/test.parquet"
    data.train_batch_size=512
)
MODEL=(
    actor_rollout_ref.model.path="$MODEL_PATH"
)
ACTOR=(
    actor_rollout_ref.actor.ppo_mini_batch_size=256
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
    actor_rollout_ref.actor.fsdp_config.param_offload=True
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
)
ROLLOUT=(
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768
)
REF=(
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=32768
)
SEARCH_R1=(
    search_r1.retriever.index_dir="$INDEX_DIR"
)
TRAINER=(
    trainer.logger='["console","tensorboard"]'
    trainer.project_name="$PROJECT"
    trainer.experiment_name="$EXPERIMENT"
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=100
    trainer.test_freq=100
    trainer.total_training_steps=1005
    trainer.val_before_train=False
)

python3 -m verl.trainer.main_ppo \
    --config-path="$DIR/config" --config-name=search_r1_grpo \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${REF[@]}" "${SEARCH_R1[@]}" "${TRAINER[@]}" \
    "$@"
