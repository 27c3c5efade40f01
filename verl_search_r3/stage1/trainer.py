"""Search-R3 Stage 1 on verl's SFT trainer (run by ``python -m verl_search_r3.stage1``).

``SearchR3SFTTrainer`` is verl's ``SFTTrainer`` (``verl/trainer/sft_trainer.py``) with four
pieces swapped in; the training loop, checkpointing, resume, validation and logging are verl's:

* **data** — :class:`~verl_search_r3.stage1.data.PairsGroupDataset` over ``pairs.parquet`` (one
  item = one (query, positive, negatives) group) and :class:`~verl_search_r3.stage1.data.GroupCollator`;
  every batch carries verl's ``force_group_size`` so micro-batches (fixed or dynamic size) hold
  whole groups, which in-batch negatives need;
* **model** — if the tokenizer at ``model.path`` lacks ``<|embed_token|>``, rank 0 writes a copy
  with the token added and its row initialised (:func:`prepare_base_model`) and every rank trains
  from it; the policy engine also returns the unit hidden state at the embed token
  (:func:`~verl_search_r3.rl.engine.add_embedding_outputs`);
* **loss** — :class:`~verl_search_r3.stage1.loss.Stage1EngineLoss` (SFT + KL + InfoNCE + triplet);
* **validation** — besides verl's ``val/loss``, the policy answers the reasoning prompt for the
  first ``search_r3.emission.queries`` validation queries (greedy) and the share of replies that
  end with ``<|embed_token|>`` by themselves is logged as ``val/search_r3/emission_rate``
  (:class:`EmissionCheck`): without it, Stage 2 starts from a model whose rollouts never embed;
* **KL reference** — a frozen copy of the base model in a second, forward-only verl engine
  (``TrainingWorker``, parameters offloaded to CPU between uses by default), run on each batch
  before the policy step to get its top-k next-token log-probs on the assistant tokens. A frozen
  copy rather than LoRA with the adapters disabled: Stage 1 must train the new token's embedding
  row (LoRA on the linear layers leaves it at its initial value), and Stage 2 and corpus
  pre-encoding need a full HF checkpoint, which verl's ``hf_model`` save does not produce from an
  unmerged adapter. ``model.lora_rank > 0`` is therefore refused.

Output: ``checkpoint.save_contents`` must contain ``hf_model``; each checkpoint then holds
``global_step_<N>/huggingface`` — weights, config and the tokenizer with the embed token — usable
as ``actor_rollout_ref.model.path`` in Stage 2 and by :class:`~verl_search_r3.retrieval.encoder.SearchR3Encoder`.
With ``search_r3.export_dir`` set, the final one is also copied there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers.config import TrainingWorkerConfig
from verl.workers.engine_workers import TrainingWorker

from ..config_utils import dataclass_from_dict
from ..retrieval.encoder import TransformersGenerator, generation_pad_id, reasoning_prompt_ids, reply_stop_ids
from ..rl.engine import add_embedding_outputs
from ..tokens import EMBED_TOKEN, add_embed_token, embed_token_id
from .data import GroupCollator, GroupDataConfig, PairsGroupDataset
from .loss import REF_IDS_KEY, REF_LOGP_KEY, Stage1EngineLoss, Stage1LossConfig, add_reference_topk_outputs, assign_group_counts

__all__ = [
    "EMISSION_METRIC",
    "EmissionConfig",
    "EmissionCheck",
    "Stage1Config",
    "prepare_base_model",
    "Stage1TrainingWorker",
    "SearchR3SFTTrainer",
]

logger = logging.getLogger(__name__)

_SOURCE_FILE = "search_r3_source.json"
"""Written into a prepared base-model folder: which model it was made from, and how."""
_HF_DIR = "huggingface"
"""Sub-folder of a verl checkpoint that holds the HF model (``checkpoint.save_contents: hf_model``)."""
EMISSION_METRIC = "val/search_r3/emission_rate"
"""Logged metric: share of greedy replies to the reasoning prompt that end with the embed token unforced."""
REPLY_TOKENS_METRIC = "val/search_r3/reply_tokens"
"""Logged metric: mean length of those replies in tokens (the stop id included)."""


@dataclass
class EmissionConfig:
    """The emission check of the validation (config block ``search_r3.emission``).

    Attributes:
        queries: distinct validation queries (the first ones of ``data.val_files``' validation
            split) whose reasoning replies are checked at every validation; 0 = off.
        max_new_tokens: reply budget; a reply without the token within it counts as not emitted.
        batch_size: prompts per ``generate`` call.
    """

    queries: int = 32
    max_new_tokens: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.queries < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("search_r3.emission: queries must be >= 0, max_new_tokens and batch_size >= 1")


@dataclass
class Stage1Config:
    """Trainer knobs (config block ``search_r3``; the dataset's are under ``data.search_r3``).

    Attributes:
        embed_token_init: how a newly added ``<|embed_token|>`` row starts (see
            :func:`~verl_search_r3.tokens.add_embed_token`): ``mean`` or ``tokens:<text>``.
        base_model_dir: where the base model with the embed token is written when
            ``model.path`` lacks it; null = ``<trainer.default_local_dir>/base_model``.
        export_dir: copy the final ``huggingface`` checkpoint folder here (the Stage-2
            ``actor_rollout_ref.model.path``); null = no copy.
        ref_param_offload: keep the frozen KL reference's parameters on CPU between batches.
        loss: the loss terms, see :class:`~verl_search_r3.stage1.loss.Stage1LossConfig`.
        emission: the validation's emission check, see :class:`EmissionConfig`.
    """

    embed_token_init: str = "mean"
    base_model_dir: str | None = None
    export_dir: str | None = None
    ref_param_offload: bool = True
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    emission: EmissionConfig = field(default_factory=EmissionConfig)

    @classmethod
    def from_config(cls, cfg: Any) -> Stage1Config:
        """From a mapping or an OmegaConf node (missing keys take the defaults above)."""
        values = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg or {})
        values["loss"] = Stage1LossConfig.from_config(values.get("loss"))
        values["emission"] = dataclass_from_dict(EmissionConfig, values.get("emission"), "search_r3.emission")
        return dataclass_from_dict(cls, values, "search_r3")


def prepare_base_model(model_path: str, output_dir: str, init: str = "mean", trust_remote_code: bool = False) -> str:
    """A model folder whose tokenizer has ``<|embed_token|>``: ``model_path`` itself if it has
    the token, else a copy in ``output_dir`` with the token added and initialised.

    The copy is written to a temporary folder and renamed into place, with a
    :data:`_SOURCE_FILE` naming its source; an existing copy made from another source is an error.
    Call on one rank, then barrier; other ranks calling it afterwards get the same path.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if EMBED_TOKEN in tokenizer.get_vocab():
        return model_path
    source = {"model_path": os.path.abspath(model_path) if os.path.exists(model_path) else model_path, "init": init}
    marker = os.path.join(output_dir, _SOURCE_FILE)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            existing = json.load(f)
        if existing != source:
            raise ValueError(f"{output_dir} was prepared from {existing}, not {source}; remove it or set search_r3.base_model_dir")
        return output_dir
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir} exists without {_SOURCE_FILE}; remove it or set search_r3.base_model_dir")

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype="auto", trust_remote_code=trust_remote_code)
    add_embed_token(tokenizer, model, init=init)
    tmp = f"{output_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(source, f, indent=2)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
        os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _reduce_metrics(output: TensorDict | None) -> TensorDict | None:
    """Turn verl's per-rank lists of :class:`Metric` into floats (verl's SFT loop logs them as is)."""
    if output is None:
        return None
    metrics = tu.get(output, "metrics")
    for key, value in list(metrics.items()):
        if isinstance(value, list) and value and isinstance(value[0], Metric):
            metrics[key] = float(Metric.aggregate_dp(value))
        elif isinstance(value, Metric):
            metrics[key] = float(value.aggregate())
    return output


class EmissionCheck:
    """The unforced emission rate of the policy on fixed validation queries, at validation steps.

    verl's SFT loop logs only ``val/loss`` from its validation pass, but logs every metric a
    training step returns; the check therefore runs right after the update of each step at
    which verl validates (``trainer.test_freq`` and the last step) — on the model that
    validation sees — and its figures join that step's metrics. Replies are greedy, to the
    reasoning prompt, on the engine's module in eval mode; the queries are split over the data
    parallel ranks (``synced_gpus`` keeps the sharded forwards in step) and the counts summed.

    Args:
        queries: the validation query texts.
        tokenizer: the policy's tokenizer (with the embed token).
        config: budgets.
        test_freq: verl's ``trainer.test_freq`` (``<= 0``: only the last step).
        total_steps: the last step.
        start_step: the step training resumes from.
    """

    def __init__(self, queries: list[str], tokenizer: Any, config: EmissionConfig, test_freq: int, total_steps: int, start_step: int = 0):
        self.prompts = [reasoning_prompt_ids(tokenizer, q) for q in queries]
        self.tokenizer, self.config = tokenizer, config
        self.embed_id = embed_token_id(tokenizer)
        self.test_freq, self.total_steps, self.step = test_freq, total_steps, start_step

    def advance(self) -> bool:
        """Count one training step; True if verl validates after it."""
        self.step += 1
        return self.step >= self.total_steps or (self.test_freq > 0 and self.step % self.test_freq == 0)

    @torch.no_grad()
    def measure(self, module: torch.nn.Module, device: torch.device | str = "cpu", group: Any = None) -> dict[str, float]:
        """Generate on ``module`` (already in eval mode); ``{EMISSION_METRIC, REPLY_TOKENS_METRIC}``."""
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
        per_rank = -(-len(self.prompts) // world)
        mine = self.prompts[rank * per_rank : (rank + 1) * per_rank]
        n_real = len(mine)
        mine += [self.prompts[0]] * (per_rank - n_real)  # equal work per rank; padding is not counted
        generator = TransformersGenerator(module, generation_pad_id(module, self.tokenizer), show_progress=False, synced_gpus=world > 1)
        replies = generator.generate(mine, self.config.max_new_tokens, reply_stop_ids(module, self.tokenizer, self.embed_id), self.config.batch_size)
        replies = replies[:n_real]
        counts = torch.tensor([sum(bool(r) and r[-1] == self.embed_id for r in replies), sum(len(r) for r in replies), n_real],
                              dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts, group=group)
        emitted, tokens, n = counts.tolist()
        return {EMISSION_METRIC: emitted / max(n, 1), REPLY_TOKENS_METRIC: tokens / max(n, 1)}


class Stage1TrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` for Stage 1: keeps groups whole and adds the KL reference.

    Before verl splits a batch into micro-batches it sets ``force_group_size``, the global
    group counts, and — when a reference worker is given — the reference's top-k log-probs
    (:data:`~verl_search_r3.stage1.loss.REF_LOGP_KEY`) plus ``distillation_use_topk`` so the policy
    forward hands its logits to the loss.

    Args:
        config: verl's worker config (the policy).
        group_size: sequences per group.
        reference: a forward-only ``TrainingWorker`` holding the frozen base model, or None (no KL).
    """

    def __init__(self, config: TrainingWorkerConfig, group_size: int, reference: TrainingWorker | None = None):
        super().__init__(config=config)
        self.group_size = group_size
        self.reference = reference
        self.emission: EmissionCheck | None = None

    def install(self, token_id: int, kl_topk: int) -> None:
        """After ``reset()``: embedding outputs on the policy engine, build the reference."""
        add_embedding_outputs(self.engine, self.engine.module, token_id)
        if self.reference is not None:
            self.reference.reset()
            add_reference_topk_outputs(self.reference.engine, kl_topk)

    def prepare_batch(self, data: TensorDict, compute_loss: bool = True) -> None:
        """Add the group and reference fields to a rank's batch (in place)."""
        tu.assign_non_tensor(data, force_group_size=self.group_size)
        if not compute_loss:
            return
        assign_group_counts(data, self.group_size, self.engine.get_data_parallel_group())
        if self.reference is not None:
            ref_data = data.copy()
            tu.assign_non_tensor(ref_data, compute_loss=False)
            ref_output = self.reference.infer_batch(ref_data)
            data[REF_LOGP_KEY] = ref_output[REF_LOGP_KEY]
            data[REF_IDS_KEY] = ref_output[REF_IDS_KEY]
            tu.assign_non_tensor(data, distillation_use_topk=True)

    def train_batch(self, data: TensorDict) -> TensorDict | None:
        self.prepare_batch(data)
        output = _reduce_metrics(super().train_batch(data))
        if self.emission is not None and self.emission.advance():
            with self.engine.eval_mode():
                figures = self.emission.measure(self.engine.module, self.engine.module.device, self.engine.get_data_parallel_group())
            if output is not None:
                tu.get(output, "metrics").update(figures)
        return output

    def infer_batch(self, data: TensorDict) -> TensorDict | None:
        self.prepare_batch(data, compute_loss=tu.get(data, key="compute_loss", default=True))
        return _reduce_metrics(super().infer_batch(data))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_config(config: DictConfig, stage1: Stage1Config, data_cfg: GroupDataConfig) -> None:
    """Refuse settings that Stage 1 cannot honour, with the key to change."""
    contents = list(config.checkpoint.save_contents)
    if "hf_model" not in contents:
        raise ValueError(f"checkpoint.save_contents={contents} must include hf_model (the Stage-2 hand-off)")
    if int(config.model.get("lora_rank", 0) or 0) > 0:
        raise ValueError("Stage 1 trains the new embed-token row and exports a full model: set model.lora_rank=0")
    if int(config.engine.get("ulysses_sequence_parallel_size", 1)) > 1:
        raise ValueError("the embedding is read from the whole hidden state: set engine.ulysses_sequence_parallel_size=1")
    if config.data.get("pad_mode", "no_padding") != "no_padding":
        raise ValueError("set data.pad_mode=no_padding")
    if stage1.loss.kl_weight and config.model.get("use_fused_kernels", False):
        raise ValueError("the KL term reads the policy logits: set model.use_fused_kernels=False (or search_r3.loss.kl_weight=0)")
    if stage1.loss.kl_weight and config.engine.get("pad_to_length", False):
        raise ValueError("the KL term uses verl's top-k logits hook, which refuses engine.pad_to_length=True")
    longest_group = data_cfg.query_max_length + (data_cfg.group_size - 1) * data_cfg.doc_max_length
    if config.data.use_dynamic_bsz and config.data.max_token_len_per_gpu < longest_group:
        raise ValueError(
            f"data.max_token_len_per_gpu={config.data.max_token_len_per_gpu} is below the longest possible group "
            f"({longest_group} tokens: query_max_length + {data_cfg.group_size - 1} x doc_max_length); a group cannot be split"
        )


class SearchR3SFTTrainer(SFTTrainer):
    """verl's ``SFTTrainer`` for Search-R3 Stage 1 (see the module docstring)."""

    def __init__(self, config: DictConfig):
        self.stage1 = Stage1Config.from_config(config.get("search_r3"))
        self.data_config = GroupDataConfig.from_config(config.data.get("search_r3"))
        _check_config(config, self.stage1, self.data_config)
        model_path = os.path.expanduser(config.model.path)
        base_dir = self.stage1.base_model_dir or os.path.join(config.trainer.default_local_dir, "base_model")
        trust = bool(config.model.get("trust_remote_code", False))
        if _rank() == 0:
            prepare_base_model(model_path, base_dir, self.stage1.embed_token_init, trust)
        _barrier()
        path = prepare_base_model(model_path, base_dir, self.stage1.embed_token_init, trust)
        if path != model_path:
            with open_dict(config):
                config.model.path = path
                config.model.tokenizer_path = None
        super().__init__(config)
        emission = self.stage1.emission
        if self.val_dataset is not None and emission.queries > 0:
            self.training_client.emission = EmissionCheck(
                self.val_dataset.distinct_queries(emission.queries), self.model_config.tokenizer, emission,
                int(self.test_freq or 0), self.total_training_steps, self.resume_global_step,
            )

    def _build_dataset(self) -> None:
        data, tokenizer = self.config.data, self.model_config.tokenizer
        self.train_dataset = PairsGroupDataset(
            data.train_files, tokenizer, data, max_samples=data.get("train_max_samples", -1), split=self.data_config.train_split
        )
        self.val_dataset = None
        if data.get("val_files"):
            self.val_dataset = PairsGroupDataset(
                data.val_files, tokenizer, data, max_samples=data.get("val_max_samples", -1), split=self.data_config.val_split
            )

    def _build_engine(self) -> None:
        group_size = self.data_config.group_size
        self.loss_fn = Stage1EngineLoss(self.stage1.loss, group_size)
        reference = None
        if self.stage1.loss.kl_weight:
            ref_engine = deepcopy(self.engine_config)
            ref_engine.forward_only = True
            ref_engine.param_offload = self.stage1.ref_param_offload
            reference = TrainingWorker(
                config=TrainingWorkerConfig(
                    model_type="language_model",
                    model_config=deepcopy(self.model_config),
                    engine_config=ref_engine,
                    optimizer_config=None,
                    checkpoint_config=self.checkpoint_config,
                )
            )
        config = TrainingWorkerConfig(
            model_type="language_model",
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
            profiler_config=self.profiler_config,
        )
        self.training_client = Stage1TrainingWorker(config=config, group_size=group_size, reference=reference)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)
        self.engine = self.training_client.engine

    def _build_dataloader(self) -> None:
        super()._build_dataloader()
        # verl builds the loaders with its per-sequence collator; batches here are groups.
        self.collate_fn = GroupCollator()
        for loader in (self.train_dataloader, self.val_dataloader):
            if loader is not None:
                loader.collate_fn = self.collate_fn

    def _init_engine(self) -> None:
        super()._init_engine()
        self.training_client.install(embed_token_id(self.model_config.tokenizer), self.stage1.loss.kl_topk)

    def fit(self) -> None:
        super().fit()
        final = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.total_training_steps}", _HF_DIR)
        if self.rank == 0:
            logger.warning("Stage-1 model (HF format, with %s): %s", EMBED_TOKEN, final)
            if self.stage1.export_dir:
                _copy_folder(final, self.stage1.export_dir)
                logger.warning("copied to search_r3.export_dir=%s", self.stage1.export_dir)
        _barrier()


def _copy_folder(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling, replacing ``dst`` only when complete."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist: was checkpoint.save_contents missing hf_model?")
    tmp = f"{dst.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.rename(tmp, dst)
