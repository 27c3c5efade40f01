"""verl-search-r3: train LLMs that reason, then embed (Search-R3) and reason, then search (Search-R1) on verl.

The core modules (:mod:`tokens`, :mod:`prompts`, :mod:`embedding`, :mod:`losses`) need only torch
and transformers; :mod:`.retrieval`, :mod:`.data` and :mod:`.env` build on them without verl;
verl-specific glue lives in :mod:`.rl` (Stage 2), :mod:`.stage1`, :mod:`.search_r1` and
:mod:`.plugin`. ``tests/test_layout.py`` keeps imports running in that order.
"""

from .tokens import EMBED_TOKEN, add_embed_token, embed_token_id

__version__ = "0.1.0"
__all__ = ["EMBED_TOKEN", "add_embed_token", "embed_token_id", "__version__"]
