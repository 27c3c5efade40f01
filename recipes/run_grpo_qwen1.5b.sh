#!/usr/bin/env bash
# Search-R3 Stage 2 (GRPO) on one 80 GB GPU: Qwen2.5-1.5B-Instruct after Stage 1 (the size of the
# released Search-R3 model). Same recipe as run_grpo_qwen7b.sh; only the lines below differ
# (later hydra overrides win). Extra arguments are hydra overrides.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH=${MODEL_PATH:-$HOME/models/search_r3_stage1_qwen2.5_1.5b}
export EXPERIMENT=${EXPERIMENT:-grpo_qwen2.5_1.5b}

exec bash "$DIR/run_grpo_qwen7b.sh" \
    data.train_batch_size=64 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    search_r3.env.num_cpus=2 \
    trainer.n_gpus_per_node=1 \
    "$@"
