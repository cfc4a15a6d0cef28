"""Safe output: files and directories appear whole or not at all; nothing non-empty is overwritten unless asked.

The project's one atomic writer: ``atomic_write`` for a file, ``atomic_output_dir`` for a directory. Both write
to a temporary sibling and ``os.replace`` it into place, so a reader (or a crash) never sees half an adapter,
model, report or dataset. Standard library only (no torch), so the command line can use it before anything heavy.
"""

from __future__ import annotations

import os
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


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a non-empty ``path`` unless ``overwrite``; return it as a Path."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"Output directory {out} already exists and is not empty. Choose another path or pass --overwrite."
        )
    return out


def _umask_mode(directory: bool) -> int:
    """The permissions a plain ``mkdir`` / ``open`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    If the body raises (or the process is interrupted), ``path`` is left exactly as it was and the temporary
    directory is removed. The directory gets ordinary permissions (``tempfile.mkdtemp`` makes it private).
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(_umask_mode(directory=True))
    try:
        yield tmp
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
