"""Build the project's config dataclasses from hydra blocks, refusing unknown keys and wrong types by name."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, TypeVar, Union

from omegaconf import DictConfig, OmegaConf

__all__ = ["dataclass_from_dict", "check_type"]

T = TypeVar("T")


_NAMES = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_type(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit the type ``annotation``, or None if it does.

    Checked: ``bool`` (only true/false: the string ``"false"`` would read as true), ``int`` (not
    ``2.5``, not a bool, not ``"2"``), ``float`` (an int is fine, a string is not), ``str``,
    ``None`` / ``X | None``, ``Literal[...]``, ``dict`` / ``list`` / ``tuple`` (the container
    only) and dataclasses (an instance or a mapping). Anything else is accepted as is.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if any(check_type(value, option) is None for option in options):
            return None
        names = " or ".join(_NAMES.get(o, getattr(o, "__name__", str(o))) for o in options)
        return f"must be {names}, got {_describe(value)}"
    if origin is Literal:
        allowed = typing.get_args(annotation)
        ok = any(value == a and type(value) is type(a) for a in allowed)
        return None if ok else f"must be one of {list(allowed)}, got {_describe(value)}"
    if annotation is type(None) or annotation is None:
        return None if value is None else f"must be None, got {_describe(value)}"
    if annotation is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {_describe(value)}"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {_describe(value)}"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {_describe(value)}"
    if annotation is str:
        return None if isinstance(value, str) else f"must be a string, got {_describe(value)}"
    container = origin or annotation
    if container in (dict, Mapping):
        return None if isinstance(value, Mapping) else f"must be a mapping, got {_describe(value)}"
    if container in (list, tuple):
        return None if isinstance(value, (list, tuple)) else f"must be a list, got {_describe(value)}"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return None if isinstance(value, (annotation, Mapping)) else f"must be a {annotation.__name__} block, got {_describe(value)}"
    return None


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any] | DictConfig | None, where: str) -> T:
    """``cls(**values)`` for a plain or OmegaConf mapping; missing keys take the defaults.

    Args:
        cls: a dataclass.
        values: the config block (None = all defaults).
        where: the block's name in the config, e.g. ``"search_r3.reward"``, used in errors.

    Raises:
        TypeError if ``values`` is not a mapping; ValueError naming the unknown keys and the known
        ones, or a key whose value has the wrong type (see :func:`check_type`).
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
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation that only exists for type checkers: check what resolves
        hints = {}
    for name, value in values.items():
        why = check_type(value, hints.get(name, Any))
        if why is not None:
            raise ValueError(f"{where}.{name} {why}")
    return cls(**values)
