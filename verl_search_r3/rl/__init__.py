"""Search-R3 Stage 2 on verl: GRPO with a ranking reward over the selective-refresh environment.

* :mod:`.engine` — query/document embeddings as outputs of verl's FSDP engine (both stages).
* :mod:`.workers` — the embedding-aware actor worker, PPO + InfoNCE loss, document encoding.
* :mod:`.agent_loop` — ``search_r3_agent``: reasoning that ends at the embed token.
* :mod:`.reward` — the ranking score and the ``search_r3`` reward manager.
* :mod:`.trainer` — the ``search_r3`` trainer (V1 sync trainer with the environment step).
"""
