"""Search-R3 Stage 1 on verl's SFT trainer: ``python -m verl_search_r3.stage1``.

* :mod:`.data` — ``pairs.parquet`` as (query, positive, negatives) groups, the group collator.
* :mod:`.loss` — the Stage-1 objective as a verl engine loss (SFT + KL + InfoNCE + triplet).
* :mod:`.trainer` — :class:`~.trainer.SearchR3SFTTrainer` (verl ``SFTTrainer``), base-model
  preparation, HF export with the embed token.
* :mod:`.__main__` — the hydra entry point.
"""
