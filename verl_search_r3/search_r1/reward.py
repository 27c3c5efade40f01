"""Search-R1 reward: exact match of the response's last ``<answer>``, optional F1 and format terms.

* :func:`normalize_answer` — SQuAD normalisation, in this order: lower-case, delete ASCII
  punctuation (``string.punctuation``), replace the articles ``a|an|the`` (whole words) by a
  space, collapse whitespace. :func:`exact_match` / :func:`f1_score` compare against every
  golden answer and keep the best.
* :func:`score_response` — the answer is the last ``<answer>…</answer>`` of the *response* only
  (the prompt is never decoded, so its example answer cannot count: the original needed a
  second match for that reason), read from the text the model generated (``<information>``
  blocks removed). ``score = exact_match + f1_weight * f1 + format_weight * format_ok`` with
  ``format_ok`` = answered and no invalid action (:class:`~.config.RewardConfig`).
* :class:`SearchR1RewardManager` — verl reward-loop manager ``search_r1``; per sample it reports
  ``acc`` (the exact match: verl's core validation metric, ``val-core/<data_source>/acc/mean@1``),
  ``f1, answered, format_ok, searches, invalid_actions`` (protocol counts from the agent loop's
  ``extra_fields``). :func:`compute_score` is the same score for verl's ``naive`` manager
  (``reward.custom_reward_function.path=pkg://verl_search_r3.search_r1.reward``).
"""

from __future__ import annotations

import asyncio
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from .config import RewardConfig, SearchR1Settings
from .parser import count_searches, last_answer, strip_information

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "golden_answers",
    "AnswerScore",
    "score_response",
    "compute_score",
    "SearchR1RewardManager",
    "REWARD_MANAGER_NAME",
]

REWARD_MANAGER_NAME = "search_r1"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation (see the module docstring)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised golden answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Best SQuAD token F1 of the prediction against the golden answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def golden_answers(ground_truth: Any) -> list[str]:
    """The golden answers of ``reward_model.ground_truth``: ``{"target": [...]}`` (Search-R1's
    layout, what ``data_prep/build_search_r1_data.py`` writes), a list, or one string.

    Null answers are dropped (never the string ``"None"``); numbers are written as text. No answer
    left is an error: no prediction could ever match.
    """
    if isinstance(ground_truth, Mapping):
        if "target" not in ground_truth:
            raise ValueError(f"ground_truth has no 'target' (golden answers): keys {sorted(ground_truth)}")
        ground_truth = ground_truth["target"]
    if isinstance(ground_truth, str):
        ground_truth = [ground_truth]
    if not isinstance(ground_truth, (list, tuple, np.ndarray)):
        raise ValueError(f"unsupported ground_truth {type(ground_truth).__name__}: expected golden answer strings")
    answers = [str(g) for g in ground_truth if g is not None and str(g).strip()]
    if not answers:
        raise ValueError(f"ground_truth holds no golden answer (got {list(ground_truth)!r})")
    return answers


@dataclass(frozen=True)
class AnswerScore:
    """Score of one trajectory and the extras logged with it (same keys for every sample);
    ``acc`` is the exact match (the name verl reports as the core validation metric)."""

    score: float
    acc: float
    f1: float
    answered: float
    format_ok: float
    searches: float
    invalid_actions: float

    def extra_info(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k != "score"}


def score_response(
    response: str, golds: Sequence[str], config: RewardConfig = RewardConfig(), stats: Mapping[str, Any] | None = None
) -> AnswerScore:
    """Score a decoded response (see the module docstring).

    Args:
        response: the response text (prompt excluded), observations included as generated.
        golds: golden answers.
        config: reward weights.
        stats: the agent loop's ``extra_fields`` (``search_r1_searches``,
            ``search_r1_invalid_actions``); without them, searches are counted in the text and
            invalid actions are taken as 0.
    """
    text = strip_information(response) if config.answer_from_model_tokens else response
    answer = last_answer(text)
    acc = exact_match(answer, golds) if answer is not None else 0.0
    f1 = f1_score(answer, golds) if answer is not None else 0.0
    stats = stats or {}
    searches = float(stats.get("search_r1_searches", count_searches(text)))
    invalid = float(stats.get("search_r1_invalid_actions", 0))
    answered = float(answer is not None)
    format_ok = float(answered and invalid == 0)
    score = acc + config.f1_weight * f1 + config.format_weight * format_ok
    return AnswerScore(score, acc, f1, answered, format_ok, searches, invalid)


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
    """verl ``custom_reward_function`` form of :func:`score_response` (default weights; pass
    ``reward.custom_reward_function.reward_kwargs.f1_weight=...`` etc. to change them)."""
    config = RewardConfig.from_dict({k: v for k, v in kwargs.items() if k in RewardConfig.__dataclass_fields__})
    result = score_response(solution_str, golden_answers(ground_truth), config, extra_info)
    return {"score": result.score, **result.extra_info()}


@register(REWARD_MANAGER_NAME)
class SearchR1RewardManager(RewardManagerBase):
    """verl reward-loop manager ``search_r1`` (``reward.reward_manager.name=search_r1``), or by
    path: ``reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://verl_search_r3.search_r1.reward
    reward.reward_manager.name=SearchR1RewardManager``. Weights from ``search_r1.reward``.
    """

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        self.reward_config = SearchR1Settings.from_config(config).reward

    async def run_single(self, data) -> dict:
        item = data[-1]
        responses = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-responses.shape[-1] :].sum())
        text = await asyncio.get_running_loop().run_in_executor(None, lambda: self.tokenizer.decode(responses[:valid], skip_special_tokens=True))
        golds = golden_answers(item.non_tensor_batch["reward_model"]["ground_truth"])
        stats = item.non_tensor_batch.get("tool_extra_fields")
        result = score_response(text, golds, self.reward_config, stats)
        return {"reward_score": result.score, "reward_extra_info": result.extra_info()}
