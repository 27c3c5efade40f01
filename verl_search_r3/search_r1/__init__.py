"""Search-R1 (Jin et al., arXiv 2503.09516) on verl 0.9.1: reason, then search.

* :mod:`.parser` — the ``<search>`` / ``<answer>`` protocol, the token-exact turn cut and the
  ``search_r1`` ToolParser (for verl's ``tool_agent``).
* :mod:`.observation` — retrieved passages and the ``<information>`` observation (token budget).
* :mod:`.agent_loop` — ``search_r1_agent``: multi-turn rollout, observations masked from the loss.
* :mod:`.tool` — :class:`~.tool.SearchR1Tool`, verl ``BaseTool`` over the search index.
* :mod:`.retrieval`, :mod:`.models`, :mod:`.index_layout`, :mod:`.build_index` — the index (BM25,
  sentence-transformers, Search-R3 encoders over the environment's corpus index) and its CLI.
* :mod:`.reward` — exact match (SQuAD normalisation) + optional F1 / format terms, the
  ``search_r1`` reward manager.
* :mod:`.data` — QA exports to verl parquet (``data_prep/build_search_r1_data.py``).
* :mod:`.server` — optional HTTP server speaking Search-R1's ``POST /retrieve``.
* :mod:`.config` — the ``search_r1`` config block.
"""
