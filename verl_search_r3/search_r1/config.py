"""The ``search_r1`` config block: protocol, retriever and reward knobs, one dataclass each.

Every field is a hydra key with a default and one line of documentation; a recipe sets them as
``search_r1.<block>.<field>=...`` and each component builds its block with ``from_dict`` (unknown
keys are an error that names them). The recipe YAML ``recipes/config/search_r1_grpo.yaml`` lists
every key, so overrides work without ``+``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from ..config_utils import dataclass_from_dict

__all__ = [
    "ProtocolConfig",
    "RetrieverConfig",
    "RewardConfig",
    "SearchR1Settings",
    "DEFAULT_INVALID_ACTION_MESSAGE",
    "POLICY_MODEL",
    "AGENT_NAME",
]

#: Fed back (mask 0) after a turn that holds neither a complete ``<search>`` nor ``<answer>``.
#: Spliced into the model's own stream, so it is written in the first person.
DEFAULT_INVALID_ACTION_MESSAGE = (
    "\nThat step was not a valid action. To look something up I write my query between <search> and "
    "</search>; to finish I write the final answer between <answer> and </answer>. Trying again.\n"
)

#: Name of the registered agent loop (``default_agent_loop`` / the dataset's ``agent_name``).
AGENT_NAME = "search_r1_agent"

#: ``retriever.model`` value that makes a Search-R3 index follow the policy being trained.
POLICY_MODEL = "policy"



@dataclass(frozen=True)
class ProtocolConfig:
    """How a Search-R1 rollout runs (``search_r1.protocol``).

    Attributes:
        max_turns: action rounds (a search, or an invalid action answered with feedback) before
            the final turn; Search-R1's "action budget" B (4 in the paper).
        final_turn: after ``max_turns`` rounds, generate once more; a search there is not run
            and ends the trajectory (Search-R1's last generation with search disabled). With
            false, the ``max_turns``-th turn is the last: at most ``max_turns - 1`` searches run.
        stop_at_action: pass ``</search>`` and ``</answer>`` as stop strings to the sampler
            (vLLM's ``stop`` and ``include_stop_str_in_output``), so a turn ends right after its
            action (no wasted tokens). The turn is also cut at the first stop string on our side,
            token-exactly, for engines without these parameters (set false for them).
        turn_max_tokens: most tokens generated per turn (Search-R1: 500).
        max_obs_tokens: token budget of one observation, ``<information>`` wrapper included;
            documents are cut, the closing tag is always kept (Search-R1: 500).
        topk: documents retrieved per search (Search-R1: 3).
        tool_name: name of the search tool among verl's tools (the tool YAML's schema name).
        invalid_action_message: feedback appended (mask 0) after an invalid action; null =
            :data:`DEFAULT_INVALID_ACTION_MESSAGE`.
    """

    max_turns: int = 4
    final_turn: bool = True
    stop_at_action: bool = True
    turn_max_tokens: int = 500
    max_obs_tokens: int = 500
    topk: int = 3
    tool_name: str = "search"
    invalid_action_message: str | None = None

    def __post_init__(self) -> None:
        for name in ("turn_max_tokens", "max_obs_tokens", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"search_r1.protocol.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise ValueError(f"search_r1.protocol.max_turns must be >= 0, got {self.max_turns}")
        if self.max_turns == 0 and not self.final_turn:
            raise ValueError("search_r1.protocol: max_turns=0 with final_turn=false leaves no turn to generate")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> ProtocolConfig:
        return dataclass_from_dict(cls, values, "search_r1.protocol")

    @property
    def feedback(self) -> str:
        """The invalid-action message in use."""
        return DEFAULT_INVALID_ACTION_MESSAGE if self.invalid_action_message is None else self.invalid_action_message


@dataclass(frozen=True)
class RetrieverConfig:
    """Where the search tool gets its documents (``search_r1.retriever``; also the ``config`` of
    the tool in a verl tool YAML).

    The retriever kind (BM25, sentence-transformers, Search-R3) is the one the index folder was
    built with (``python -m verl_search_r3.search_r1.build_index``); queries are encoded the same way.

    Attributes:
        index_dir: folder written by ``build_index``.
        model: query encoder folder for dense indexes; null = the folder recorded in the index
            (its weights are checked against the index's fingerprint either way). For a
            Search-R3 index, ``policy`` makes the index follow the policy being trained: the
            encoder is reloaded from each new Hugging Face checkpoint the trainer writes under
            ``policy_checkpoint_dir`` and the corpus is re-encoded with it.
        policy_checkpoint_dir: the trainer's ``trainer.default_local_dir`` (``model: policy``).
        policy_poll_seconds: how often a ``policy`` retriever looks for a newer checkpoint.
        device: torch device of the query encoder (null = CUDA if available, else CPU).
        dtype: Search-R3 encoder dtype (null = bfloat16 on CUDA, float32 on CPU).
        backend: Search-R3 reasoning generation: ``auto``, ``transformers`` or ``vllm``.
        batch_size: queries per encoder batch.
        reasoning: Search-R3 queries are embedded after a generated analysis (false = directly).
        max_new_tokens: Search-R3 analysis budget per query.
        max_query_length: token budget of a query for the encoder (null = the model's).
        placement: ``ray``: one named Ray actor per index serves every agent-loop worker;
            ``local``: the retriever lives in the calling process (tests, the HTTP server).
        actor_name: base name of the Ray actor (the index id is appended).
        namespace: Ray namespace of the retriever and index actors.
        detached: keep the retriever actor after its creator exits.
        num_cpus, num_gpus: Ray resources of the retriever actor (GPUs outside verl's pools).
        max_concurrency: concurrent calls the retriever actor accepts (encodes are serialised).
        index_num_cpus: Ray CPUs per corpus-index shard actor.
        timeout_seconds: a search that takes longer is answered with an error observation.
    """

    index_dir: str | None = None
    model: str | None = None
    policy_checkpoint_dir: str | None = None
    policy_poll_seconds: float = 60.0
    device: str | None = None
    dtype: str | None = None
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    batch_size: int = 64
    reasoning: bool = True
    max_new_tokens: int = 256
    max_query_length: int | None = None
    placement: Literal["ray", "local"] = "ray"
    actor_name: str = "search_r1_retriever"
    namespace: str = "verl_search_r3"
    detached: bool = False
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_concurrency: int = 16
    index_num_cpus: float = 1.0
    timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.placement not in ("ray", "local"):
            raise ValueError(f"search_r1.retriever.placement must be 'ray' or 'local', got {self.placement!r}")
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"search_r1.retriever.backend must be auto, transformers or vllm, got {self.backend!r}")
        for name in ("batch_size", "max_new_tokens", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"search_r1.retriever.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_seconds", "policy_poll_seconds", "num_cpus", "index_num_cpus"):
            if getattr(self, name) <= 0:
                raise ValueError(f"search_r1.retriever.{name} must be > 0, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise ValueError(f"search_r1.retriever.num_gpus must be >= 0, got {self.num_gpus}")
        if self.model == POLICY_MODEL and not self.policy_checkpoint_dir:
            raise ValueError("search_r1.retriever.model=policy needs policy_checkpoint_dir (the trainer's default_local_dir)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> RetrieverConfig:
        return dataclass_from_dict(cls, values, "search_r1.retriever")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RewardConfig:
    """The ``search_r1`` reward (``search_r1.reward``):
    ``score = exact_match + f1_weight * f1 + format_weight * format_ok``.

    Attributes:
        f1_weight: weight of the best token F1 against the golden answers (0 = pure EM, the paper).
        format_weight: weight of ``format_ok`` (the trajectory ended with an answer and had no
            invalid action); 0 = the paper's main runs.
        answer_from_model_tokens: read the answer only from the text the model generated
            (observation blocks removed), so a retrieved document can never supply it.
    """

    f1_weight: float = 0.0
    format_weight: float = 0.0
    answer_from_model_tokens: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> RewardConfig:
        return dataclass_from_dict(cls, values, "search_r1.reward")


@dataclass(frozen=True)
class SearchR1Settings:
    """The whole ``search_r1`` block."""

    protocol: ProtocolConfig = ProtocolConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    reward: RewardConfig = RewardConfig()

    @classmethod
    def from_config(cls, config: DictConfig | Mapping[str, Any] | None) -> SearchR1Settings:
        """From a trainer config (reads its ``search_r1`` block; absent blocks take defaults)."""
        block = OmegaConf.select(config, "search_r1", default=None) if isinstance(config, DictConfig) else (config or {}).get("search_r1")
        if isinstance(block, DictConfig):
            block = OmegaConf.to_container(block, resolve=True)
        block = dict(block or {})
        unknown = sorted(set(block) - {"protocol", "retriever", "reward"})
        if unknown:
            raise ValueError(f"unknown search_r1 blocks {unknown}; known: ['protocol', 'retriever', 'reward']")
        return cls(
            protocol=ProtocolConfig.from_dict(block.get("protocol")),
            retriever=RetrieverConfig.from_dict(block.get("retriever")),
            reward=RewardConfig.from_dict(block.get("reward")),
        )
