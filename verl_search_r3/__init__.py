"""verl-search-r3: train LLMs that reason, then embed (Search-R3) and reason, then search (Search-R1) on verl.

The core modules (:mod:`tokens`, :mod:`prompts`, :mod:`embedding`, :mod:`losses`) need only torch
and transformers; :mod:`.retrieval`, :mod:`.data` and :mod:`.env` build on them without verl;
verl-specific glue lives in :mod:`.rl` (Stage 2), :mod:`.stage1`, :mod:`.search_r1` and
:mod:`.plugin`. ``tests/test_layout.py`` keeps imports running in that order.

Importing the package itself is free (every verl process imports it through the plugin entry
point): the three names below load :mod:`.tokens` (and transformers) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["EMBED_TOKEN", "add_embed_token", "embed_token_id", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("EMBED_TOKEN", "add_embed_token", "embed_token_id"):
        return getattr(importlib.import_module(".tokens", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
