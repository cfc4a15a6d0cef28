"""Config switches that give bias-free linears a bias, so SSF's shift survives merging as a plain model.

LLaMA's projections have no bias (nor ModernBERT's linears and LayerNorms), so a shift after them cannot be folded
into the existing weights. The architecture has a switch for that bias, though (``attention_bias`` / ``mlp_bias``,
ModernBERT's ``norm_bias``): with ``SSFConfig(bias_free_sites="add_bias")`` SSF learns a shift at the layers a switch
covers, merging writes the folded shift as their new bias, and ``merge_and_unload`` turns the switch on (zero bias at
covered layers SSF did not adapt). The merged model then saves and loads with plain transformers and equals the
adapter.

The table lists, per ``model_type``, which linears each switch adds a bias to (checked against transformers by
``tests/test_text.py``, which builds each model with the switch on and off). Sites without a switch (RMSNorms, T5,
Mistral, Qwen2's o_proj and MLP, Phi-3) stay scale-only.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

_ATTENTION = r"self_attn\.(q|k|v|o)_proj"

#: model_type -> {config attribute: regex (suffix on a dot boundary) of the linears it gives a bias}
BIAS_SWITCHES: dict[str, dict[str, str]] = {
    "llama": {"attention_bias": _ATTENTION, "mlp_bias": r"mlp\.(gate|up|down)_proj"},
    "qwen3": {"attention_bias": _ATTENTION},
    "gemma": {"attention_bias": _ATTENTION},
    "gemma2": {"attention_bias": _ATTENTION},
    "gemma3_text": {"attention_bias": _ATTENTION},
    "modernbert": {"attention_bias": r"attn\.(Wqkv|Wo)", "mlp_bias": r"mlp\.(Wi|Wo)",
                   "norm_bias": r"(norm|attn_norm|mlp_norm|final_norm)"},
}


def _model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


#: layer types a switch can give a bias
SWITCHABLE_TYPES = (nn.Linear, nn.LayerNorm)


def switch_for(model: nn.Module, module_name: str, module: Optional[nn.Module] = None) -> Optional[str]:
    """The config attribute that would give the layer ``module_name`` of ``model`` a bias, if there is one."""
    if module is not None and not (isinstance(module, SWITCHABLE_TYPES) and getattr(module, "bias", 0) is None):
        return None
    for attr, pattern in BIAS_SWITCHES.get(_model_type(model) or "", {}).items():
        if re.search(rf"(^|\.){pattern}$", module_name) and hasattr(model.config, attr):
            return attr
    return None


def apply_bias_switches(model: nn.Module) -> list[str]:
    """Turn on every switch of ``model``'s config whose linears gained a bias in a merge; returns the switches set.

    Covered linears that are still bias-free get a zero bias, so the model matches what transformers builds with the
    switch on. A switch whose linears have no bias at all is left alone.
    """
    config: Any = getattr(model, "config", None)
    turned_on = []
    for attr, pattern in BIAS_SWITCHES.get(_model_type(model) or "", {}).items():
        if getattr(config, attr, None) is not False:
            continue
        covered = [
            m for n, m in model.named_modules()
            if isinstance(m, SWITCHABLE_TYPES) and re.search(rf"(^|\.){pattern}$", n)
        ]
        if not any(m.bias is not None for m in covered):
            continue
        for module in covered:
            if module.bias is None:
                zeros = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device)
                module.bias = nn.Parameter(zeros, requires_grad=False)
        setattr(config, attr, True)
        turned_on.append(attr)
    return turned_on
