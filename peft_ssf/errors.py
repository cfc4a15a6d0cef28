"""``UserError``: a problem with what the user asked for (a path, an option, the data), not a bug.

The ``peft-ssf`` command prints such an error as one line on stderr and exits with status 2; library callers get
an ordinary exception (the subclasses also derive from the matching built-in: ``FileExistsError``, ``ValueError``).
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing error whose message names the problem and the fix."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency of an application is not installed; the message names the extra that provides it."""


def require(module: str, extra: str):
    """Import ``module`` (an optional dependency), or raise ``MissingDependencyError`` naming ``peft-ssf[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'peft-ssf[{extra}]'"
        raise MissingDependencyError(f"missing optional dependency {module!r}: {hint}") from exc
