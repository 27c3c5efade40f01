#!/usr/bin/env bash
# Search-R3 Stage 2 (GRPO) on one 8-GPU node: Qwen2.5-7B-Instruct after Stage 1, FSDP + vLLM TP=2.
#   DATA_DIR    output folder of data_prep/build_pairs.py (rl_train/rl_val/corpus parquet)
#   MODEL_PATH  the Stage-1 checkpoint (HF folder with <|embed_token|> in its tokenizer)
# Extra arguments are hydra overrides, e.g. `--cfg job` to print the composed config and exit.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r3}
MODEL_PATH=${MODEL_PATH:-$HOME/models/search_r3_stage1_qwen2.5_7b}
PROJECT=${PROJECT:-search_r3}
EXPERIMENT=${EXPERIMENT:-grpo_qwen2.5_7b}

DATA=(
    data.train_files="$DATA_DIR/rl_train.parquet"
    data.val_files="$DATA_DIR/rl_val.parquet"
    data.train_batch_size=256
    data.max_prompt_length=512
    data.max_response_length=512
)
MODEL=(
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.enable_gradient_checkpointing=True
)
ACTOR=(
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=64
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
)
ROLLOUT=(
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=5
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768
)
REF=(
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=32768
)
SEARCH_R3=(
    search_r3.corpus_path="$DATA_DIR/corpus.parquet"
    search_r3.env.num_cpus=8
)
TRAINER=(
    trainer.logger='["console","tensorboard"]'
    trainer.project_name="$PROJECT"
    trainer.experiment_name="$EXPERIMENT"
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=50
    trainer.test_freq=25
    trainer.total_epochs=2
)

python3 -m verl.trainer.main_ppo \
    --config-path="$DIR/config" --config-name=search_r3_grpo \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${REF[@]}" "${SEARCH_R3[@]}" "${TRAINER[@]}" \
    "$@"
