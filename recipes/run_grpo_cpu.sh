#!/usr/bin/env bash
# Search-R3 Stage 2 (GRPO) on the CPU backend: verl's real trainer (main_ppo, trainer mode
# search_r3, the RL environment) on host CPUs — FSDP2 over gloo and the `hf` rollout
# (config/backend/cpu.yaml). The same recipe as run_grpo_qwen7b.sh, sized for a laptop.
#   DATA_DIR     output folder of data_prep/build_pairs.py (rl_train/rl_val/corpus parquet)
#   MODEL_PATH   the Stage-1 export (HF folder with <|embed_token|>); default: SmolLM2-135M-Instruct
#                with the token added, converted once (python -m verl_search_r3.cpu.model)
#   CKPT_DIR     verl checkpoint folder (trainer.default_local_dir)
#   RAY_ADDRESS  optional: run on this Ray cluster (logical resources: GPU >= trainer.n_gpus_per_node,
#                CPU >= 8); pass ray_kwargs.ray_init.num_cpus=null ray_kwargs.ray_init.num_gpus=null
# Extra arguments are hydra overrides, e.g. trainer.total_training_steps=2, or `--cfg job` (last).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r3}
MODEL_PATH=${MODEL_PATH:-$(env -u VERL_PLATFORM python3 -m verl_search_r3.cpu.model)}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/search_r3/grpo_cpu}
export VERL_PLATFORM=cpu
export VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu${VERL_USE_EXTERNAL_MODULES:+,$VERL_USE_EXTERNAL_MODULES}

DATA=(
    data.train_files="$DATA_DIR/rl_train.parquet"
    data.val_files="$DATA_DIR/rl_val.parquet"
    data.train_batch_size=8
    data.max_prompt_length=512
    data.max_response_length=128
    data.dataloader_num_workers=0
)
MODEL=(
    actor_rollout_ref.model.path="$MODEL_PATH"
)
ACTOR=(
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=8
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024
)
ROLLOUT=(
    actor_rollout_ref.rollout.n=4
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=2048
)
REF=(
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=2048
)
SEARCH_R3=(
    search_r3.corpus_path="$DATA_DIR/corpus.parquet"
    search_r3.doc_max_length=256
    search_r3.env.num_cpus=1
    search_r3.env.encode_batch_size=64
)
TRAINER=(
    trainer.project_name=search_r3
    trainer.experiment_name=grpo_cpu
    trainer.default_local_dir="$CKPT_DIR"
    trainer.total_epochs=1
    trainer.save_freq=25
    trainer.test_freq=10
)

python3 -m verl.trainer.main_ppo \
    --config-path="$DIR/config" --config-name=search_r3_grpo +backend=cpu \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${REF[@]}" "${SEARCH_R3[@]}" "${TRAINER[@]}" \
    "$@"
