"""Writing outputs so that nothing is ever half-written or destroyed by being replaced.

:func:`write_atomic` is the one way every output (plans, profiles, Gantt charts, metrics' parent
folders, saved parameters) reaches the disk:

* a regular file (or a new one) is written to a temporary file in the same folder, flushed and
  synced, then renamed over the target: readers see the old content or the new, never a part;
  a replaced file keeps its permission bits, a new one gets the usual ``0666 & ~umask``;
* a symbolic link is followed: the file it points to is replaced, the link stays;
* a device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is written directly, as a
  shell redirection would: it is never replaced by a regular file;
* any failure is one :class:`OutputError` line naming the user's path (never the temporary
  file), and the temporary file is removed; a process stopped by a signal in the middle of a
  write removes it with :func:`discard_pending` (the torchrun entry does, on SIGTERM).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

_PENDING: set[str] = set()
"""Temporary files being written right now (what :func:`discard_pending` removes)."""


class OutputError(OSError):
    """An output that cannot be written; the message is one line naming the path."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` as the module docstring says."""
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else data
    try:
        st = os.stat(path)  # follows a symbolic link
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_special(path, blob)
        return
    target = path.resolve() if path.is_symlink() else path
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        _PENDING.add(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _PENDING.discard(tmp)
        tmp = None
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
            _PENDING.discard(tmp)


def discard_pending() -> None:
    """Remove the temporary files of the writes in progress: for a process that is about to
    leave at once (``os._exit`` on SIGTERM) in the middle of writing an output."""
    for tmp in list(_PENDING):
        Path(tmp).unlink(missing_ok=True)
    _PENDING.clear()


def _write_special(path: Path, blob: bytes) -> None:
    """A device or FIFO: written in place (renaming over it would destroy it)."""
    try:
        with open(path, "wb") as f:
            f.write(blob)
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror or err}") from None


def write_all(outputs: Sequence[tuple[Path | str, str | bytes]]) -> None:
    """Write every ``(path, data)`` with :func:`write_atomic`, all or nothing: when one fails,
    the regular files already written get their old content back (or are removed, if new)."""
    done: list[tuple[Path, bytes | None]] = []
    try:
        for path, data in outputs:
            p = Path(path)
            old = p.read_bytes() if p.is_file() else None
            write_atomic(p, data)
            if p.is_file():
                done.append((p, old))
    except BaseException:
        for p, old in reversed(done):
            if old is None:
                p.unlink(missing_ok=True)
            else:
                write_atomic(p, old)
        raise
