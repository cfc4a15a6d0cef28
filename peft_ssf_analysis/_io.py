"""Atomic file writes for saved reports (the toolkit's own copy: it must not import ``peft_ssf``, whose import
registers SSF with PEFT)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Union


def atomic_write(path: str | os.PathLike, content: Union[str, bytes, Callable[[IO[bytes]], Any]]) -> Path:
    """Write ``content`` (text, bytes, or a function writing to the open binary file) to ``path`` through a
    temporary file in the same directory, then ``os.replace`` it, so a reader never sees a half-written file."""
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
