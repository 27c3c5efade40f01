"""Search-R3 Stage 1 entry point: ``python -m verl_search_r3.stage1`` (hydra; one process per GPU).

    torchrun --standalone --nproc_per_node=8 -m verl_search_r3.stage1 \\
        --config-path recipes/config --config-name search_r3_sft \\
        data.train_files=pairs.parquet model.path=<instruct model folder>

Stage 1 trains an instruct model into an embedder that still generates: SFT + KL to the base
model + InfoNCE + triplet over (query, positive, hard negatives) groups, on verl's SFT trainer
(:class:`~verl_search_r3.stage1.trainer.SearchR3SFTTrainer`). The recipes are
``recipes/run_sft_qwen7b.sh`` and ``recipes/run_sft_qwen1.5b.sh``; the keys are documented in
``recipes/README.md``. Without ``--config-name`` the config is verl's ``sft_trainer_engine`` and
every Search-R3 key takes its default.
"""

from __future__ import annotations

import importlib.util
import os

import hydra
from omegaconf import DictConfig

__all__ = ["run_sft", "main"]


def _verl_config_dir() -> str:
    """verl's trainer config folder, found without importing verl."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("verl is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "trainer", "config")


def run_sft(config: DictConfig) -> None:
    """Initialise torch.distributed (e.g. under torchrun), train Stage 1, clean up."""
    from verl.utils.device import auto_set_device
    from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

    from .trainer import SearchR3SFTTrainer

    auto_set_device(config)
    initialize_global_process_group()
    trainer = SearchR3SFTTrainer(config=config)
    trainer.fit()
    destroy_global_process_group()


@hydra.main(config_path=_verl_config_dir(), config_name="sft_trainer_engine", version_base=None)
def main(config: DictConfig) -> None:
    """Hydra entry point; the recipes pass ``--config-path recipes/config --config-name search_r3_sft``."""
    run_sft(config)


if __name__ == "__main__":
    main()
