"""Build the project's config dataclasses from hydra blocks, refusing unknown keys by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

__all__ = ["dataclass_from_dict"]

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any] | DictConfig | None, where: str) -> T:
    """``cls(**values)`` for a plain or OmegaConf mapping; missing keys take the defaults.

    Args:
        cls: a dataclass.
        values: the config block (None = all defaults).
        where: the block's name in the config, e.g. ``"search_r3.reward"``, used in errors.

    Raises:
        TypeError if ``values`` is not a mapping; ValueError naming the unknown keys and the known ones.
    """
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if values is not None and not isinstance(values, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)
