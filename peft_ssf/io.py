"""Safe output: files and directories appear whole or not at all; nothing non-empty is overwritten unless asked.

The project's one atomic writer: ``atomic_write`` for a file, ``atomic_output_dir`` for a directory. Both write
to a temporary sibling and ``os.replace`` it into place, so a reader (or a crash) never sees half an adapter,
model, report or dataset. Standard library only (no torch), so the command line can use it before anything heavy.

An output directory is locked for as long as something writes it (``output_lock``: an advisory ``flock`` on a
sibling ``.NAME.lock`` file, released and removed at the end), so two runs into one directory cannot interleave:
the second fails at once with ``OutputLockedError``. Temporary siblings left by a killed process (``.NAME.tmp-*``,
``.NAME.old-*``) are removed by the next writer of that directory (``clean_orphans``), never while their writer
still holds the lock.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Union

from .errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The output directory already has content and overwriting was not requested."""


class OutputNotWritableError(UserError, PermissionError):
    """The output directory cannot be created or written (a file in the way, no permission)."""


class OutputLockedError(UserError, BlockingIOError):
    """Another run is writing the same output directory."""


def _check_writable(out: Path) -> None:
    """Fail now (nothing written) when ``out`` cannot be created or written."""
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"Output directory {out} is a file: choose a directory path")
    if existing != out and not existing.is_dir():
        raise OutputNotWritableError(f"cannot create output directory {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write output directory {out}: no write permission on {existing}")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a non-empty ``path`` unless ``overwrite``, and a path that cannot be written; return it as a Path."""
    out = Path(path)
    _check_writable(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"Output directory {out} already exists and is not empty. Choose another path or pass --overwrite."
        )
    return out


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _try_lock(out: Path) -> Any:
    """An open, exclusively ``flock``-ed lock file of ``out``, or None when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return open(os.devnull, "w")  # noqa: SIM115
    lock = _lock_path(out)
    while True:
        fh = open(lock, "a")  # noqa: SIM115 - held for the life of the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        try:  # the file may have been removed by the previous holder between our open and lock: retry
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()


def _unlock(out: Path, fh: Any) -> None:
    try:
        if fh.name != os.devnull:
            Path(fh.name).unlink(missing_ok=True)
    finally:
        fh.close()


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of output directory ``path`` for the body; raise ``OutputLockedError`` if another run has it."""
    out = Path(path)
    _check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fh = _try_lock(out)
    if fh is None:
        raise OutputLockedError(f"Output directory {out} is being written by another run (lock {_lock_path(out)}); "
                                "wait for it to finish or choose another path")
    try:
        yield out
    finally:
        _unlock(out, fh)


_ORPHAN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[^/]+$")


def clean_orphans(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) a killed writer left in ``directory``.

    A temporary of NAME exists only while its writer holds NAME's lock, so one whose lock is free is an orphan.
    Returns what was removed.
    """
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        match = _ORPHAN.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        fh = _try_lock(directory / match["name"])
        if fh is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            _unlock(directory / match["name"], fh)
    return removed


def _umask_mode(directory: bool) -> int:
    """The permissions a plain ``mkdir`` / ``open`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    If the body raises (or the process is interrupted), ``path`` is left exactly as it was and the temporary
    directory is removed. The directory gets ordinary permissions (``tempfile.mkdtemp`` makes it private). ``path``
    is locked meanwhile (``output_lock``): a concurrent writer fails instead of replacing this one's result, and
    without ``overwrite`` a directory that became non-empty meanwhile is not replaced either.
    """
    out = check_output_dir(path, overwrite)
    with output_lock(out):
        for orphan in out.parent.iterdir():  # our own temporaries, left by a killed writer (we hold the lock)
            match = _ORPHAN.match(orphan.name)
            if match and match["name"] == out.name and orphan.is_dir() and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tmp.chmod(_umask_mode(directory=True))
            yield tmp
            _replace(out, tmp, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _replace(out: Path, tmp: Path, overwrite: bool) -> None:
    check_output_dir(out, overwrite)  # again: someone may have filled it since we started
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
        os.replace(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write(path: str | os.PathLike, content: Union[str, bytes, Callable[[IO[bytes]], Any]]) -> Path:
    """Write ``content`` to ``path`` through a temporary file in the same directory, then ``os.replace`` it.

    ``content`` is text (UTF-8), bytes, or a function that writes to the open binary file (e.g. a figure's
    ``savefig``). Returns ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:  # regular permissions (umask), unlike tempfile.mkstemp's 0600
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path
