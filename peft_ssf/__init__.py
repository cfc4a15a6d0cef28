"""peft-ssf: SSF ("Scaling & Shifting Your Features", NeurIPS 2022) as a Hugging Face PEFT method.

Importing this package registers SSF with PEFT (idempotent), after which ``get_peft_model(model, SSFConfig(...))``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work for SSF adapters.
"""

from __future__ import annotations

from .config import SSFConfig
from .guard import refresh_scale_guard
from .hub import install_push_to_hub, model_card, push_adapter_to_hub
from .layer import SSFLayer
from .model import SSFModel
from .presets import PRESETS, PresetError, resolve_preset
from .registration import RegistrationError, is_registered, register

__version__ = "0.1.0"

register()
install_push_to_hub()

__all__ = [
    "PRESETS",
    "PresetError",
    "RegistrationError",
    "SSFConfig",
    "SSFLayer",
    "SSFModel",
    "__version__",
    "is_registered",
    "model_card",
    "push_adapter_to_hub",
    "refresh_scale_guard",
    "register",
    "resolve_preset",
]
