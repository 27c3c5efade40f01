"""Batched sampling with transformers ``generate``, with vLLM's request semantics (the ``hf`` rollout's core).

verl's agent loops send vLLM-style requests: token ids in, a ``sampling_params`` dict, token ids
(and optionally their log-probs) out. :class:`SamplingParams` reads that dict, refusing what
this backend cannot honour, and :func:`generate` runs one ``model.generate`` call for a group of
requests that share their parameters, with these semantics (as in vLLM):

* ``temperature`` 0 is greedy; ``top_k`` -1 or 0 and ``top_p`` 1 disable those filters;
* generation ends at ``max_tokens``, at a ``stop_token_ids`` token or the model's EOS (unless
  ``ignore_eos``), both kept in the output, or after the token that completes a ``stop`` string
  (kept too: the output always includes the stop string);
* ``logprobs``: the log-probability of each sampled token under ``softmax(logits / temperature)``
  before top-k/top-p filtering — what verl's actor computes for the same tokens.

Rows are left-padded; each row is cut at its own ``max_tokens`` and stop. A callable
``should_abort`` ends the whole group early (finish reason ``"aborted"``, partial tokens kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["SamplingParams", "Completion", "generate"]

_IGNORED = frozenset({"include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "detokenize"})
"""vLLM keys about text detokenization only: token outputs do not depend on them."""
_MUST_BE_DEFAULT = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "seed": None, "prompt_logprobs": None}
"""vLLM keys this backend implements only at their default value."""


@dataclass(frozen=True)
class SamplingParams:
    """The part of a vLLM ``sampling_params`` dict that shapes sampling (hashable: requests with equal
    parameters are generated together).

    Attributes:
        temperature: 0 = greedy.
        top_p: nucleus mass; 1 = off.
        top_k: candidates kept; -1 or 0 = off.
        repetition_penalty: transformers' (CTRL) penalty on tokens of the prompt and output; 1 = off.
        stop_token_ids: extra tokens that end a sequence (kept in the output).
        stop: strings that end a sequence after the token that completes them (kept).
        logprobs: return the sampled tokens' log-probabilities.
        ignore_eos: do not stop at the model's EOS tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    @classmethod
    def from_request(cls, params: dict[str, Any]) -> tuple[SamplingParams, int | None]:
        """``(parameters, max_tokens or None)`` from a vLLM-style dict; ``ValueError`` names an unsupported key."""
        values = dict(params)
        max_tokens = values.pop("max_tokens", None)
        max_new = values.pop("max_new_tokens", None)  # SGLang's name
        max_tokens = max_tokens if max_tokens is not None else max_new
        for key, default in _MUST_BE_DEFAULT.items():
            value = values.pop(key, default)
            if value != default and not (default == 0.0 and value == 0):
                raise ValueError(f"the hf rollout does not support sampling_params[{key!r}]={value!r} (only {default!r})")
        for key in _IGNORED & values.keys():
            values.pop(key)
        unknown = values.keys() - cls.__dataclass_fields__.keys()
        if unknown:
            raise ValueError(f"the hf rollout does not support sampling_params keys {sorted(unknown)}")
        stop = values.get("stop") or ()
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        values["stop_token_ids"] = tuple(int(t) for t in values.get("stop_token_ids") or ())
        logprobs = values.get("logprobs")  # vLLM: None or a count (0 = the sampled token's); verl: a bool
        values["logprobs"] = logprobs is not None and logprobs is not False
        for key in ("temperature", "top_p", "repetition_penalty"):
            if key in values:
                values[key] = float(values[key])
        if "top_k" in values:
            values["top_k"] = int(values["top_k"]) if values["top_k"] is not None else -1
        return cls(**values), None if max_tokens is None else int(max_tokens)


@dataclass
class Completion:
    """One generated sequence: ``token_ids``, their ``log_probs`` (or None), ``finish_reason``
    (``"stop"``, ``"length"`` or ``"aborted"``)."""

    token_ids: list[int]
    log_probs: list[float] | None
    finish_reason: str


class _LogProbRecorder(LogitsProcessor):
    """Records ``log_softmax(logits / T)`` of each sampled token; must run before any filter.

    ``generate`` calls it once per step with the tokens so far, so the token sampled at step
    ``t`` is scored when step ``t + 1`` starts; :meth:`finish` scores the last one.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, steps)`` log-probs, given the last generated token of each row."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
            self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)


class _Abort(StoppingCriteria):
    def __init__(self, should_abort: Callable[[], bool]) -> None:
        self.should_abort = should_abort
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or bool(self.should_abort())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class _StopStrings(StoppingCriteria):
    """Ends a row once its *generated* text contains a stop string (transformers' own criterion
    also matches across the prompt's tail; vLLM looks at the output only)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.width = tokenizer, tuple(stops), prompt_width
        self.window = max(len(s) for s in stops) + 1  # a stop string of c characters spans at most c tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[:, max(self.width, input_ids.shape[1] - self.window) :].tolist()
        done = [any(s in text for s in self.stops) for text in self.tokenizer.batch_decode(tail)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_string_end(tokenizer: PreTrainedTokenizerBase, ids: list[int], stops: Sequence[str]) -> int | None:
    """Number of leading tokens up to the one that completes the first stop string, or None."""
    text = tokenizer.decode(ids)
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        return None
    end = min(ends)
    for n in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) >= end:
            return n
    return len(ids)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_tokens: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    should_abort: Callable[[], bool] | None = None,
) -> list[Completion]:
    """Sample one completion per prompt in a single ``model.generate`` call (see the module docstring).

    Args:
        model: a causal LM whose ``generation_config`` holds no sampling defaults of its own.
        tokenizer: its tokenizer (stop strings, padding id).
        prompts: token ids per request.
        max_tokens: per request, the most tokens to generate (>= 1).
        params: the group's shared sampling parameters.
        eos_token_ids: the model's end-of-sequence tokens (ignored with ``params.ignore_eos``).
        should_abort: polled every step; True ends generation with finish reason ``"aborted"``.
    """
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_token_ids) or [0])[0]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        if len(p):
            input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))

    greedy = params.temperature <= 0
    recorder = _LogProbRecorder(params.temperature) if params.logprobs else None
    processors: list[LogitsProcessor] = [recorder] if recorder else []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    abort = _Abort(should_abort) if should_abort is not None else None
    criteria = [c for c in (abort, _StopStrings(tokenizer, params.stop, width) if params.stop else None) if c is not None]
    # filters run in `processors` (after the recorder), none from the generation config
    sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    config = GenerationConfig(
        max_new_tokens=max(max_tokens),
        do_sample=not greedy,
        repetition_penalty=1.0,
        **sampling,
        eos_token_id=sorted(stops) or None,
        pad_token_id=pad_id,
    )
    sequences = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
        stopping_criteria=StoppingCriteriaList(criteria),
    ).cpu()
    new = sequences[:, width:]
    logprobs = recorder.finish(new[:, -1]) if recorder and new.shape[1] else None

    out = []
    for i, limit in enumerate(max_tokens):
        ids = new[i, :limit].tolist()
        n, reason = len(ids), "length"
        hit = next((k for k, t in enumerate(ids) if t in stops), None)
        if hit is not None:
            n, reason = hit + 1, "stop"
        if params.stop:
            end = _stop_string_end(tokenizer, ids[:n], params.stop)
            if end is not None and (reason == "length" or end < n):
                n, reason = end, "stop"
        if reason == "length" and n < limit and abort is not None and abort.fired:
            reason = "aborted"
        lp = logprobs[i, :n].tolist() if logprobs is not None else None
        out.append(Completion(token_ids=ids[:n], log_probs=lp, finish_reason=reason))
    return out
