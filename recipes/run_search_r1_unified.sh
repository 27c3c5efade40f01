#!/usr/bin/env bash
# Search-R1 x Search-R3 ("unified"): the agent searches with embeddings produced by reasoning. The
# index is built with a Search-R3 model; each <search> query is analysed, then embedded, by
#   RETRIEVER=frozen  that Search-R3 checkpoint, in the retriever actor on a GPU of its own (default);
#   RETRIEVER=policy  the policy being trained: the retriever reloads each Hugging Face checkpoint the
#                     trainer writes (every SAVE_FREQ steps) and re-encodes the corpus with it, so the
#                     policy must itself be a Search-R3 model (its tokenizer has <|embed_token|>).
# Everything else is run_search_r1_grpo_qwen3b.sh, on 7 GPUs for verl + 1 for the retriever.
#   DATA_DIR    output folder of data_prep/build_search_r1_data.py
#   INDEX_DIR   python -m verl_search_r3.search_r1.build_index --retriever search_r3 --model <Search-R3 checkpoint> ...
#   MODEL_PATH  the policy: Qwen2.5-3B(-Instruct) for RETRIEVER=frozen, the Search-R3 checkpoint for RETRIEVER=policy
#   CKPT_DIR    verl checkpoint folder (trainer.default_local_dir)
# Extra arguments are hydra overrides, e.g. `--cfg job` to print the composed config and exit.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RETRIEVER=${RETRIEVER:-frozen}
EXPERIMENT=${EXPERIMENT:-unified_${RETRIEVER}_qwen2.5_3b}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/search_r1/$EXPERIMENT}
SAVE_FREQ=${SAVE_FREQ:-20}

UNIFIED=(
    trainer.n_gpus_per_node=7                  # the 8th GPU is the retriever's
    data.train_batch_size=448                  # divisible by 7 data-parallel ranks (x5 rollouts)
    actor_rollout_ref.actor.ppo_mini_batch_size=224
    trainer.default_local_dir="$CKPT_DIR"
    search_r1.retriever.num_gpus=1
    search_r1.retriever.batch_size=32
    search_r1.retriever.reasoning=true
)
case "$RETRIEVER" in
    frozen) ;;
    policy)
        UNIFIED+=(
            search_r1.retriever.model=policy
            search_r1.retriever.policy_checkpoint_dir="$CKPT_DIR"
            "actor_rollout_ref.actor.checkpoint.save_contents=['model','optimizer','extra','hf_model']"
            trainer.save_freq="$SAVE_FREQ"
        ) ;;
    *) echo "RETRIEVER must be 'frozen' or 'policy', got '$RETRIEVER'" >&2; exit 2 ;;
esac

EXPERIMENT="$EXPERIMENT" exec bash "$DIR/run_search_r1_grpo_qwen3b.sh" "${UNIFIED[@]}" "$@"
