"""The ``hf`` rollout server: a Ray actor that serves one replica's generate requests with transformers.

It plays the part of verl's ``vLLMHttpServer`` (``verl/workers/rollout/vllm_rollout/vllm_async_server.py``)
for the calls verl's agent loops, load balancer and trainer make on a rollout server:

* ``generate(prompt_ids, sampling_params, request_id)`` -> ``TokenOutput`` (token-in-token-out,
  vLLM parameter semantics, see :mod:`.sampling`). Concurrent requests are collected for
  ``batch_wait_ms`` and generated together, one ``model.generate`` call per group of equal
  sampling parameters; ``extra_fields["global_steps"]`` is the weight version.
* ``update_weights(state, global_steps)``: the trainer's full weights (sent by
  :class:`~verl_search_r3.cpu.rollout.HFServerAdapter`); a ``None`` step (verl syncs after
  validation without one) keeps the current version.
* the lifecycle calls: ``wake_up``/``sleep`` (generate refuses to run while asleep; the weights
  stay in host memory), ``abort_all_requests``/``resume_generation`` (in-flight generation ends
  with ``stop_reason="aborted"`` and its partial tokens), ``abort_request``,
  ``wait_for_requests_to_drain``, ``clear_kv_cache``/``release_kv_cache``/``resume_kv_cache``
  and ``start_profile``/``stop_profile`` (nothing to do: no cache outlives a request).

Options live in ``actor_rollout_ref.rollout.engine_kwargs.hf`` (:class:`HFEngineOptions`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.replica import TokenOutput

from .sampling import Completion, SamplingParams, generate

logger = logging.getLogger(__name__)

__all__ = ["HFEngineOptions", "HFServer", "token_budget"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HFEngineOptions:
    """``actor_rollout_ref.rollout.engine_kwargs.hf``.

    Attributes:
        batch_wait_ms: how long the server collects concurrent requests before generating them together.
        dtype: weights and compute dtype of the rollout model (``float32``, ``bfloat16``, ``float16``);
            keep it equal to the trainer's compute dtype so rollout and trainer log-probs agree.
        num_threads: torch intra-op threads of the server process (null = Ray's default for the actor).
    """

    batch_wait_ms: float = 10.0
    dtype: str = "float32"
    num_threads: int | None = None

    @classmethod
    def from_config(cls, values: Any) -> HFEngineOptions:
        values = dict(values or {})
        unknown = values.keys() - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown actor_rollout_ref.rollout.engine_kwargs.hf keys {sorted(unknown)}")
        options = cls(**values)
        if options.dtype not in _DTYPES:
            raise ValueError(f"engine_kwargs.hf.dtype must be one of {sorted(_DTYPES)}, got {options.dtype!r}")
        return options


def token_budget(config: RolloutConfig, prompt_length: int, max_tokens: int | None) -> int:
    """Tokens a request may generate, as verl's vLLM server computes it.

    Default ``min(response_length, prompt_length + response_length - len(prompt))``; always
    clamped to ``[1, max_model_len - len(prompt)]`` (``max_model_len`` defaults to
    ``prompt_length + response_length``).
    """
    max_model_len = config.max_model_len or config.prompt_length + config.response_length
    room = max_model_len - prompt_length
    if room < 1:
        raise ValueError(f"prompt of {prompt_length} tokens leaves no room to generate within max_model_len={max_model_len}")
    if max_tokens is None:
        max_tokens = min(config.response_length, config.prompt_length + config.response_length - prompt_length)
    return max(1, min(int(max_tokens), room))


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    future: asyncio.Future


class HFServer:
    """One ``hf`` rollout replica: the policy in host memory behind verl's rollout-server calls (module docstring)."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int) -> None:
        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)  # objects pass through
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.options = HFEngineOptions.from_config((self.config.engine_kwargs or {}).get("hf"))
        self.replica_rank = replica_rank
        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        torch.manual_seed(self.config.seed + replica_rank)

        path = self.model_config.local_path
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_config.local_tokenizer_path or path)
        attn = self.model_config.override_config.get("attn_implementation", "sdpa")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[self.options.dtype], attn_implementation=attn)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(set(eos))
        # sampling is set per request: no defaults from the checkpoint's generation_config.json
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id)

        self.global_steps: int | None = None
        self.awake = True
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = asyncio.Event()
        self._gate.set()
        self._rejecting = False
        self._aborting = False
        self._model_lock = asyncio.Lock()
        self._batcher: asyncio.Task | None = None

    async def ready(self) -> int:
        """Returns once the model is loaded (the replica's start-up barrier)."""
        return self.replica_rank

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        priority: int = 0,
    ) -> TokenOutput:
        """Token-in-token-out generation of one request (batched with concurrent ones)."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("the hf rollout serves text-only models")
        params, max_tokens = SamplingParams.from_request(sampling_params)
        prompt = [int(t) for t in prompt_ids]
        budget = token_budget(self.config, len(prompt), max_tokens)
        while not self._gate.is_set():
            if self._rejecting:
                return self._output(Completion([], None, "aborted"))
            await self._gate.wait()
        if not self.awake:
            raise RuntimeError(f"hf rollout replica {self.replica_rank} is asleep: generate was called between sleep and wake_up")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(request_id, prompt, budget, params, future))
        self._idle.clear()
        self._arrived.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._serve())
        return self._output(await future)

    def _output(self, completion: Completion) -> TokenOutput:
        return TokenOutput(
            token_ids=completion.token_ids,
            log_probs=completion.log_probs,
            stop_reason="aborted" if completion.finish_reason == "aborted" else "completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _serve(self) -> None:
        """Batch loop: wait for requests, collect for ``batch_wait_ms``, generate per parameter group."""
        while True:
            await self._arrived.wait()
            await asyncio.sleep(self.options.batch_wait_ms / 1000)
            self._arrived.clear()
            self._running, self._pending = self._pending, []
            groups: dict[SamplingParams, list[_Request]] = defaultdict(list)
            for request in self._running:
                groups[request.params].append(request)
            for params, requests in groups.items():
                for start in range(0, len(requests), self.config.max_num_seqs):
                    await self._run_group(params, requests[start : start + self.config.max_num_seqs])
            self._running = []
            if not self._pending:
                self._idle.set()

    async def _run_group(self, params: SamplingParams, requests: list[_Request]) -> None:
        live = [r for r in requests if not r.future.done()]
        if not live:
            return
        try:
            async with self._model_lock:
                completions = await asyncio.to_thread(
                    generate, self.model, self.tokenizer, [r.prompt_ids for r in live], [r.max_tokens for r in live],
                    params, self.eos_token_ids, lambda: self._aborting,
                )
        except Exception as err:  # the caller of each request gets the error
            logger.exception("hf rollout replica %d: generation failed", self.replica_rank)
            for r in live:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        for r, c in zip(live, completions):
            if not r.future.done():
                r.future.set_result(c)

    # ------------------------------------------------------------------ weights
    async def update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> None:
        """Load the trainer's full weights (HF parameter names); ``global_steps=None`` keeps the version."""
        current = self.model.state_dict()
        unexpected = sorted(state.keys() - current.keys())
        if unexpected:
            raise ValueError(f"hf rollout: weights not in the model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        sent = {current[k].data_ptr() for k in state}
        missing = sorted(k for k in current.keys() - state.keys() if current[k].data_ptr() not in sent)  # tied aliases are fine
        if missing:
            raise ValueError(f"hf rollout: the update lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        async with self._model_lock:
            self.model.load_state_dict(state, strict=False)
        if global_steps is not None:
            self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # ------------------------------------------------------------------ lifecycle
    async def wake_up(self, tags: list[str] | None = None) -> None:
        self.awake = True

    async def sleep(self) -> None:
        if self.config.free_cache_engine:
            await self.wait_for_requests_to_drain()
            self.awake = False

    async def wait_for_requests_to_drain(self) -> None:
        await self._idle.wait()

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict[str, Any]:
        """Close the gate (later requests wait, or come back aborted with ``reject_request``) and end the running ones."""
        self._gate.clear()
        self._rejecting = reject_request
        ids = [r.request_id for r in self._pending + self._running]
        for r in self._pending:
            r.future.set_result(Completion([], None, "aborted"))
        self._pending = []
        self._aborting = True
        try:
            if self._running:
                await self._idle.wait()
        finally:
            self._aborting = False
        if not self._pending and not self._running:
            self._idle.set()
        return {"aborted_count": len(ids), "request_ids": ids}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        """Abort a request that has not started generating (a running batch is not split)."""
        for r in self._pending:
            if r.request_id == request_id and not r.future.done():
                r.future.set_result(Completion([], None, "aborted"))
                return {"aborted": True, "request_id": request_id}
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        self._rejecting = False
        self._gate.set()

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def get_rollout_config(self) -> RolloutConfig:
        return self.config
