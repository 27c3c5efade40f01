#!/usr/bin/env bash
# Search-R1 (reason, then search) with GRPO on the CPU backend: verl's real trainer on host CPUs —
# FSDP2 over gloo, the `hf` rollout with <search>/<answer> stop strings, a BM25 (or dense) index in
# a Ray retriever actor (config/backend/cpu.yaml). The same recipe as run_search_r1_grpo_qwen3b.sh,
# sized for a laptop.
#   DATA_DIR     output folder of data_prep/build_search_r1_data.py (train.parquet, test.parquet)
#   INDEX_DIR    output folder of python -m verl_search_r3.search_r1.build_index (e.g. BM25 over a BEIR folder)
#   MODEL_PATH   the policy (HF folder); default: SmolLM2-135M-Instruct, converted once
#                (python -m verl_search_r3.cpu.model --no-embed-token)
#   CKPT_DIR     verl checkpoint folder (trainer.default_local_dir)
#   RAY_ADDRESS  optional: run on this Ray cluster (see run_grpo_cpu.sh)
# Extra arguments are hydra overrides, e.g. trainer.total_training_steps=2, or `--cfg job` (last).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR=${DATA_DIR:-$HOME/data/search_r1}
INDEX_DIR=${INDEX_DIR:-$HOME/indexes/search_r1_bm25}
MODEL_PATH=${MODEL_PATH:-$(env -u VERL_PLATFORM python3 -m verl_search_r3.cpu.model --no-embed-token)}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/search_r1/grpo_cpu}
export VERL_PLATFORM=cpu
export VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu${VERL_USE_EXTERNAL_MODULES:+,$VERL_USE_EXTERNAL_MODULES}

DATA=(
    data.train_files="$DATA_DIR/train.parquet"
    data.val_files="$DATA_DIR/test.parquet"
    data.train_batch_size=8
    data.max_prompt_length=512
    data.max_response_length=1024
    data.dataloader_num_workers=0
)
MODEL=(
    actor_rollout_ref.model.path="$MODEL_PATH"
)
ACTOR=(
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
SEARCH_R1=(
    search_r1.retriever.index_dir="$INDEX_DIR"
    search_r1.retriever.num_cpus=1
    search_r1.retriever.index_num_cpus=1
    search_r1.protocol.max_turns=2
    search_r1.protocol.turn_max_tokens=128
    search_r1.protocol.max_obs_tokens=256
)
TRAINER=(
    trainer.project_name=search_r1
    trainer.experiment_name=grpo_cpu
    trainer.default_local_dir="$CKPT_DIR"
    trainer.total_epochs=1
    trainer.save_freq=25
    trainer.test_freq=10
    trainer.val_before_train=False
)

python3 -m verl.trainer.main_ppo \
    --config-path="$DIR/config" --config-name=search_r1_grpo +backend=cpu \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${REF[@]}" "${SEARCH_R1[@]}" "${TRAINER[@]}" \
    "$@"
