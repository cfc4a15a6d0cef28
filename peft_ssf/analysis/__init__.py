"""``peft_ssf.analysis``: the invariance toolkit under its old name, for code that also uses the SSF tuner.

The toolkit lives in the top-level package :mod:`peft_ssf_analysis`, which imports neither ``peft_ssf`` nor PEFT's
tuner registry: ``import peft_ssf_analysis`` leaves PEFT as it is. Importing *this* package runs
``peft_ssf/__init__`` first (it registers SSF with PEFT and installs the SSF model-card ``push_to_hub``), which is
what a user of the tuner wants anyway. Its submodules (``peft_ssf.analysis.cli``, ``.stir``, ...) are the very same
module objects as ``peft_ssf_analysis.cli``, ``.stir``, ..., so patching one patches the other.
"""

from __future__ import annotations

import importlib
import sys

import peft_ssf_analysis
from peft_ssf_analysis import *  # noqa: F403
from peft_ssf_analysis import __all__  # noqa: F401

for _name in peft_ssf_analysis.SUBMODULES:
    _module = importlib.import_module(f"peft_ssf_analysis.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals().setdefault(_name, _module)  # as in peft_ssf_analysis, the function stir() keeps its name
del _name, _module
