"""Offline demo kit (extra: ``[demo]``): seeded synthetic image tasks and a small pretrained ViT to adapt.

``peft_ssf.demo.data`` generates the tasks (see its docstring); ``BACKBONE_DIR`` is a small
``ViTForImageClassification`` checkpoint pretrained on the source task by ``scripts/pretrain_backbone.py``; its
README.md says how it was made. The demo (``peft_ssf.demo.run``) reads everything it needs about the backbone
(input size, normalisation, label count) from that directory, so a new checkpoint drops in. Load it with plain
transformers::

    from transformers import ViTForImageClassification
    from peft_ssf.demo import BACKBONE_DIR
    model = ViTForImageClassification.from_pretrained(BACKBONE_DIR)
"""

from __future__ import annotations

from pathlib import Path

from . import data
from .data import *  # noqa: F403  (the task generator's public names; see data.__all__)

BACKBONE_DIR: Path = Path(__file__).resolve().parent / "backbone"

__all__ = ["BACKBONE_DIR", *data.__all__]
