"""Atomic writes, and what a killed run leaves behind.

* :func:`atomic_write` (and :func:`atomic_write_text`, :func:`write_json`): readers never see a
  half-written file (temporary file in the same folder + ``os.replace``); the file gets the mode
  ``open()`` would give it (the user's umask), not ``mkstemp``'s private 0600.
* :func:`temp_sibling`: the hidden name every atomic writer of the project uses for its work in
  progress — files here, folders in :class:`~verl_search_r3.data.outputs.AtomicFolder` and
  :func:`~verl_search_r3.env.snapshot.atomic_directory`: ``.<name>.<kind>-<host>-<pid>-<random>``,
  so the name says which process on which machine owns it.
* :func:`remove_stale_siblings`: a new write removes the temporary siblings of its target left by a
  process of this machine that no longer runs (SIGKILL, power loss); a live process's are kept.
* :func:`sigterm_as_interrupt`: SIGTERM (``timeout``, SLURM, Kubernetes) raises :class:`Terminated`,
  a ``KeyboardInterrupt``, so every ``with`` block cleans up its temporary files as on Ctrl-C.
* :func:`check_writable`: refuse an output path that cannot be created before any work is done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "write_json",
    "temp_sibling",
    "remove_stale_siblings",
    "Terminated",
    "sigterm_as_interrupt",
    "exit_status",
    "check_writable",
]

logger = logging.getLogger(__name__)

#: Kinds of hidden siblings: work in progress (``tmp``) and a replaced output on its way out (``old``).
TEMP_KINDS = ("tmp", "old")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def temp_sibling(path: str, kind: str = "tmp") -> str:
    """``<folder>/.<name>.<kind>-<host>-<pid>-<random>``: a fresh hidden path beside ``path``."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"kind must be one of {TEMP_KINDS}, got {kind!r}")
    path = os.path.abspath(path)
    name = f".{os.path.basename(path)}.{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(os.path.dirname(path), name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(path: str) -> list[str]:
    """Delete the hidden siblings of ``path`` (see :func:`temp_sibling`) whose process is gone.

    Only siblings written by a process of *this* machine that no longer runs are removed; a
    running process's (another run writing the same output) and other machines' are kept. A
    replaced output (``old``) is removed only when ``path`` itself exists, else it may hold the
    only copy (a run killed between two renames): it is kept and named in a warning.

    Returns:
        The removed paths.
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-([0-9a-f]{{8}})-(\d+)-[0-9a-f]+$")
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.match(entry)
        if m is None or m.group(2) != _host_tag():
            continue
        pid = int(m.group(3))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        stale = os.path.join(folder, entry)
        if m.group(1) == "old" and not os.path.exists(path):
            logger.warning("%s holds the previous %s of a run that died while replacing it; it is kept, move it back by hand",
                           stale, name)
            continue
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        logger.warning("removed %s, left by process %d that no longer runs", stale, pid)
        removed.append(stale)
    return removed


def check_writable(path: str, what: str = "output", folder: bool = False) -> None:
    """Raise ``OSError`` naming ``path`` if it cannot be created or replaced.

    The nearest existing ancestor must be a writable folder (an ancestor that is a regular file
    can never hold it); a file output (``folder=False``) must not be an existing folder. Checked
    before a long run, so it fails in a second, not after an hour.
    """
    path = os.path.abspath(path)
    if not folder and os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {what} {path!r}: it is a folder")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {what} {path!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write {what} {path!r}: folder {parent!r} is not writable")


def _create_error(path: str, what: str, e: OSError) -> OSError:
    """``e`` re-worded to name the output the user asked for, not the hidden temporary path."""
    return type(e)(e.errno, f"cannot write {what} {path!r}: {e.strerror or e}")


def atomic_write(path: str, write: Callable[[IO[Any]], Any], mode: str = "w") -> None:
    """Create ``path`` through ``write(file)`` on a temporary file in the same folder, then rename.

    The file's mode follows the umask (as with ``open``); stale temporary files of ``path`` left
    by dead processes are removed first; on any exception (SIGTERM under
    :func:`sigterm_as_interrupt` included) the temporary file is deleted.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_siblings(path)
        tmp = temp_sibling(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _create_error(path, "file", e) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda f: (json.dump(obj, f, indent=2), f.write("\n")))


class Terminated(KeyboardInterrupt):
    """SIGTERM received (see :func:`sigterm_as_interrupt`); a ``KeyboardInterrupt``, so the same
    clean-up runs as for Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Further SIGTERMs are ignored while the clean-up runs (a second one would cut it short). Outside
    the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit status for an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
