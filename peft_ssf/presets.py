"""Where SSF goes by default: official placements per transformers ``model_type``.

A preset is a set of *roles* (patch embedding, the norm before attention, the query projection, ...). Each role lists
regular expressions for the module names it has had across transformers versions (5.x renamed ViT / Swin modules:
``attention.attention.query`` became ``attention.q_proj``). A role matches a module when one of its patterns matches
the end of the module's dotted name and SSF supports the module's type. Resolving a preset against a model gives the
exact module names to adapt, so a saved adapter config never depends on the preset tables.

``"paper"`` is the placement of the official SSF code: after the patch-embedding conv, both norms of each block, the
q/k/v and output projections, fc1 (before GELU) and fc2, and the final norm (ConvNeXt: stem conv + stem norm,
depthwise conv, block norm, pwconv1, pwconv2, final norm). Patch merging (Swin) and downsampling (ConvNeXt) layers
are not in the official placement. ``"all"`` adapts every module SSF supports, except the classification head.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from .layer import wrapper_for

PRESETS = ("paper", "all")

_VIT_ROLES: dict[str, list[str]] = {
    "patch_embed": [r"embeddings\.patch_embeddings\.projection"],
    "norm_before_attention": [r"layernorm_before", r"layer\.\d+\.norm1"],
    "query": [r"q_proj", r"attention\.query", r"self\.query"],
    "key": [r"k_proj", r"attention\.key", r"self\.key"],
    "value": [r"v_proj", r"attention\.value", r"self\.value"],
    "attention_output": [r"o_proj", r"attention\.output\.dense"],
    "norm_before_mlp": [r"layernorm_after", r"layer\.\d+\.norm2"],
    "fc1": [r"mlp\.fc1", r"intermediate\.dense"],
    "fc2": [r"mlp\.fc2", r"(layer|layers|blocks)\.\d+\.output\.dense"],
    "final_norm": [r"^(\w+\.)?layernorm", r"pooler\.layernorm"],
}

_SWIN_ROLES: dict[str, list[str]] = {
    **_VIT_ROLES,
    "patch_norm": [r"embeddings\.norm"],
}

_CONVNEXT_ROLES: dict[str, list[str]] = {
    "stem_conv": [r"embeddings\.patch_embeddings"],
    "stem_norm": [r"embeddings\.layernorm"],
    "dwconv": [r"layers\.\d+\.dwconv"],
    "block_norm": [r"layers\.\d+\.layernorm"],
    "pwconv1": [r"pwconv1"],
    "pwconv2": [r"pwconv2"],
    "final_norm": [r"^(\w+\.)?layernorm"],
}

#: model_type -> roles of the official ("paper") placement
PAPER_ROLES: dict[str, dict[str, list[str]]] = {
    "vit": _VIT_ROLES,
    "deit": _VIT_ROLES,
    "beit": _VIT_ROLES,
    "dinov2": _VIT_ROLES,
    "vit_mae": _VIT_ROLES,
    "swin": _SWIN_ROLES,
    "swinv2": _SWIN_ROLES,
    "convnext": _CONVNEXT_ROLES,
    "convnextv2": _CONVNEXT_ROLES,
}

#: module names never adapted by the "all" placement (classification heads)
_HEAD_NAMES = ("classifier", "head", "lm_head", "score", "fc_norm_head")


class PresetError(ValueError):
    """No module of the model matched the preset (or there is no preset for the model type)."""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern matches the end of ``name`` on a dot boundary (``^`` patterns: the whole name)."""
    for pattern in patterns:
        regex = pattern + "$" if pattern.startswith("^") else rf"(^|\.){pattern}$"
        if re.search(regex, name):
            return True
    return False


def supported_module_names(model: nn.Module) -> list[str]:
    """Module names in ``model`` whose type SSF supports.

    A module already wrapped by a PEFT layer counts as its base layer, and nothing inside PEFT wrappers (base
    layers, ``modules_to_save`` copies) is listed, so presets resolve the same before and after a first adapter.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    names: list[str] = []
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrappers.append(name)
            if isinstance(module, BaseTunerLayer) and wrapper_for(module.get_base_layer()) is not None:
                names.append(name)
            continue
        if wrapper_for(module) is not None:
            names.append(name)
    return names


def resolve_preset(
    model: nn.Module,
    model_type: str | None,
    placement: str = "paper",
    modules_to_save: Iterable[str] | None = None,
) -> list[str]:
    """Exact names of the modules that ``placement`` adapts in ``model``.

    Raises:
        PresetError: unknown model type (for "paper"), or nothing in the model matched.
    """
    if placement not in PRESETS:
        raise PresetError(f"Unknown SSF preset {placement!r}; choose one of {list(PRESETS)}.")
    skip = tuple(modules_to_save or ()) + _HEAD_NAMES
    candidates = [
        n for n in supported_module_names(model) if not any(n == s or n.endswith("." + s) for s in skip)
    ]
    if placement == "all":
        if not candidates:
            raise PresetError(
                f"The 'all' SSF preset found no supported module in this {model_type or type(model).__name__} "
                "model. Pass target_modules explicitly."
            )
        return candidates
    roles = PAPER_ROLES.get(model_type or "")
    if roles is None:
        raise PresetError(
            f"No SSF preset for model_type {model_type!r} (presets exist for {sorted(PAPER_ROLES)}). Pass "
            f"target_modules explicitly, e.g. some of: {_examples(candidates)}; or use preset='all'."
        )
    chosen: list[str] = []
    missing: list[str] = []
    for role, patterns in roles.items():
        hits = [n for n in candidates if _matches(n, patterns)]
        if not hits:
            missing.append(role)
        chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise PresetError(
            f"The SSF '{placement}' preset for model_type {model_type!r} matched no module: this transformers "
            f"version names its modules differently. Pass target_modules explicitly, e.g. some of: "
            f"{_examples(candidates)}."
        )
    if missing:
        warnings.warn(
            f"SSF preset '{placement}' for {model_type!r}: no module found for role(s) {missing}; adapting the other "
            f"{len(chosen)} modules.",
            stacklevel=3,
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


def _examples(names: list[str], k: int = 8) -> str:
    if not names:
        return "(the model has no module SSF supports)"
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")
