"""The verl versions the CPU backend was written for, checked where a verl private is used.

The backend uses a few verl internals (a private dict, a private method, one monkeypatch); each
module that does calls :func:`require_verl` at import, so a verl outside :data:`SUPPORTED_VERL`
fails at start-up with the range in the message instead of misbehaving later.
``tests/test_cpu_privates.py`` checks each internal against the installed verl.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["SUPPORTED_RANGE", "SUPPORTED_VERL", "require_verl"]

SUPPORTED_RANGE = ">=0.9.1,<0.10"
"""verl releases whose internals (file:line in each module docstring) the backend was checked against."""
SUPPORTED_VERL = SpecifierSet(SUPPORTED_RANGE)


def require_verl(what: str, installed: str | None = None) -> None:
    """Raise ``RuntimeError`` naming ``what`` and the supported range unless verl is in :data:`SUPPORTED_VERL`.

    Args:
        what: the internal that needs the check, e.g. ``"verl.workers.rollout.base._ROLLOUT_REGISTRY"``.
        installed: the version to check (default: the installed ``verl`` distribution's).
    """
    if installed is None:
        try:
            installed = version("verl")
        except PackageNotFoundError as err:
            raise RuntimeError("verl_search_r3.cpu needs verl; pip install 'verl[verl-core]==0.9.1'") from err
    if Version(installed) not in SUPPORTED_VERL:
        raise RuntimeError(
            f"verl_search_r3.cpu uses {what}, written for verl {SUPPORTED_RANGE}; verl {installed} is installed. "
            "Install a supported verl or update verl_search_r3/cpu for the new internals."
        )
