"""Where SSF goes by default: official placements per transformers ``model_type``.

A preset is a set of *roles* (patch embedding, the norm before attention, the query projection, ...). Each role lists
regular expressions for the module names it has had across transformers versions (5.x renamed ViT / Swin modules:
``attention.attention.query`` became ``attention.q_proj``). A role matches a module when one of its patterns matches
the end of the module's dotted name and SSF supports the module's type. Resolving a preset against a model gives the
exact module names to adapt, so a saved adapter config never depends on the preset tables.

``"paper"`` is the placement of the official SSF code: after the patch-embedding conv, both norms of each block, the
q/k/v and output projections, fc1 (before GELU) and fc2, and the final norm (ConvNeXt: stem conv + stem norm,
depthwise conv, block norm, pwconv1, pwconv2, final norm). Patch merging (Swin) and downsampling (ConvNeXt) layers
are not in the official placement. ``"all"`` adapts every module SSF supports, except task heads.

Text families (BERT, RoBERTa, DistilBERT, DeBERTa-v2, ModernBERT, GPT-2, LLaMA, Mistral, Qwen2/3, Gemma 1-3, Phi-3,
T5, BART) follow the same rule: after every linear and norm (LayerNorm or RMSNorm) of attention and MLP, plus the
embeddings' norm and the final norm; never the embeddings or the task head (BERT's pooler counts as head). A
transformers model type without a preset gets every supported module except embeddings, the output layer and task
heads, with a warning naming what was chosen; a model without a transformers config still needs ``target_modules``.

Two kinds of module are never chosen by a preset: task heads and everything inside them (``classifier``, ``score``,
``qa_outputs``, ``lm_head``, ... and the ``modules_to_save``: they are trained fully, and RoBERTa's
``classifier.dense`` is part of its head), and modules whose parameters are shared with another module (tied input
and output embeddings, T5's ``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens``): a merge would fold
the scale into the weight every sharer uses (see ``shared_parameter_owners``).
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

# ----- text: the same rule (after every linear / norm of attention and MLP, the embeddings' norm and the final
# norm; never the embeddings themselves nor the task head). Roles marked optional (``_OPTIONAL_ROLES``) exist only in
# some variants of a family (T5 encoders have no cross-attention, T5 v1.1 splits wi into wi_0 / wi_1) and are not
# reported when missing.

#: BERT, RoBERTa, DeBERTa-v2 (post-LN encoders; BERT's pooler belongs to the classification head)
_BERT_ROLES: dict[str, list[str]] = {
    "embeddings_norm": [r"embeddings\.LayerNorm"],
    "query": [r"attention\.self\.query(_proj)?"],
    "key": [r"attention\.self\.key(_proj)?"],
    "value": [r"attention\.self\.value(_proj)?"],
    "attention_output": [r"attention\.output\.dense"],
    "norm_after_attention": [r"attention\.output\.LayerNorm"],
    "fc1": [r"intermediate\.dense"],
    "fc2": [r"layer\.\d+\.output\.dense"],
    "norm_after_mlp": [r"layer\.\d+\.output\.LayerNorm"],
}

_DISTILBERT_ROLES: dict[str, list[str]] = {
    "embeddings_norm": [r"embeddings\.LayerNorm"],
    "query": [r"attention\.q_lin"],
    "key": [r"attention\.k_lin"],
    "value": [r"attention\.v_lin"],
    "attention_output": [r"attention\.out_lin"],
    "norm_after_attention": [r"sa_layer_norm"],
    "fc1": [r"ffn\.lin1"],
    "fc2": [r"ffn\.lin2"],
    "norm_after_mlp": [r"output_layer_norm"],
}

_MODERNBERT_ROLES: dict[str, list[str]] = {
    "embeddings_norm": [r"embeddings\.norm"],
    "norm_before_attention": [r"layers\.\d+\.attn_norm"],
    "qkv": [r"attn\.Wqkv"],
    "attention_output": [r"attn\.Wo"],
    "norm_before_mlp": [r"layers\.\d+\.mlp_norm"],
    "fc1": [r"mlp\.Wi"],
    "fc2": [r"mlp\.Wo"],
    "final_norm": [r"^(\w+\.)?final_norm"],
}

_GPT2_ROLES: dict[str, list[str]] = {
    "norm_before_attention": [r"h\.\d+\.ln_1"],
    "qkv": [r"attn\.c_attn"],
    "attention_output": [r"attn\.c_proj"],
    "norm_before_mlp": [r"h\.\d+\.ln_2"],
    "fc1": [r"mlp\.c_fc"],
    "fc2": [r"mlp\.c_proj"],
    "final_norm": [r"^(\w+\.)?ln_f"],
}

#: LLaMA-style decoders (LLaMA, Mistral, Qwen2/3, Gemma 1-3, Phi-3): RMSNorms, gated MLP, bias-free projections
_DECODER_ROLES: dict[str, list[str]] = {
    "norm_before_attention": [r"layers\.\d+\.input_layernorm"],
    "query": [r"self_attn\.q_proj"],
    "key": [r"self_attn\.k_proj"],
    "value": [r"self_attn\.v_proj"],
    "attention_output": [r"self_attn\.o_proj"],
    "norm_after_attention": [r"layers\.\d+\.post_attention_layernorm"],
    "gate": [r"mlp\.gate_proj"],
    "fc1": [r"mlp\.up_proj"],
    "fc2": [r"mlp\.down_proj"],
    "final_norm": [r"^(\w+\.)?norm"],
}

_QK_NORM_ROLES: dict[str, list[str]] = {  # Qwen3 / Gemma3: RMSNorm of queries and keys (per head)
    "query_norm": [r"self_attn\.q_norm"],
    "key_norm": [r"self_attn\.k_norm"],
}

_SANDWICH_NORM_ROLES: dict[str, list[str]] = {  # Gemma2 / Gemma3: norms around the MLP as well
    "norm_before_mlp": [r"layers\.\d+\.pre_feedforward_layernorm"],
    "norm_after_mlp": [r"layers\.\d+\.post_feedforward_layernorm"],
}

_PHI3_ROLES: dict[str, list[str]] = {
    "norm_before_attention": [r"layers\.\d+\.input_layernorm"],
    "qkv": [r"self_attn\.qkv_proj"],
    "attention_output": [r"self_attn\.o_proj"],
    "norm_after_attention": [r"layers\.\d+\.post_attention_layernorm"],
    "fc1": [r"mlp\.gate_up_proj"],
    "fc2": [r"mlp\.down_proj"],
    "final_norm": [r"^(\w+\.)?norm"],
}

_T5_ROLES: dict[str, list[str]] = {
    "norm": [r"block\.\d+\.layer\.\d+\.layer_norm"],
    "query": [r"SelfAttention\.q"],
    "key": [r"SelfAttention\.k"],
    "value": [r"SelfAttention\.v"],
    "attention_output": [r"SelfAttention\.o"],
    "cross_query": [r"EncDecAttention\.q"],
    "cross_key": [r"EncDecAttention\.k"],
    "cross_value": [r"EncDecAttention\.v"],
    "cross_attention_output": [r"EncDecAttention\.o"],
    "fc1_plain": [r"DenseReluDense\.wi"],
    "fc1_gated": [r"DenseReluDense\.wi_[01]"],
    "fc2": [r"DenseReluDense\.wo"],
    "final_norm": [r"final_layer_norm"],
}

_BART_ROLES: dict[str, list[str]] = {
    "embeddings_norm": [r"layernorm_embedding"],
    "query": [r"self_attn\.q_proj"],
    "key": [r"self_attn\.k_proj"],
    "value": [r"self_attn\.v_proj"],
    "attention_output": [r"self_attn\.out_proj"],
    "norm_after_attention": [r"self_attn_layer_norm"],
    "cross_query": [r"encoder_attn\.q_proj"],
    "cross_key": [r"encoder_attn\.k_proj"],
    "cross_value": [r"encoder_attn\.v_proj"],
    "cross_attention_output": [r"encoder_attn\.out_proj"],
    "norm_after_cross_attention": [r"encoder_attn_layer_norm"],
    "fc1": [r"layers\.\d+\.fc1"],
    "fc2": [r"layers\.\d+\.fc2"],
    "norm_after_mlp": [r"layers\.\d+\.final_layer_norm"],
    "final_norm_prenorm": [r"(encoder|decoder)\.layer_norm"],  # mBART-style pre-LN variants
}

#: roles that only some variants of a family have (encoder-only T5, T5 v1.1's gated MLP, mBART's final norms):
#: never reported as missing
_OPTIONAL_ROLES = frozenset(
    {"cross_query", "cross_key", "cross_value", "cross_attention_output", "norm_after_cross_attention", "fc1_plain",
     "fc1_gated", "final_norm_prenorm"}
)

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
    # text
    "bert": _BERT_ROLES,
    "roberta": _BERT_ROLES,
    "xlm-roberta": _BERT_ROLES,
    "deberta-v2": _BERT_ROLES,
    "distilbert": _DISTILBERT_ROLES,
    "modernbert": _MODERNBERT_ROLES,
    "gpt2": _GPT2_ROLES,
    "llama": _DECODER_ROLES,
    "mistral": _DECODER_ROLES,
    "qwen2": _DECODER_ROLES,
    "qwen3": {**_DECODER_ROLES, **_QK_NORM_ROLES},
    "gemma": _DECODER_ROLES,
    "gemma2": {**_DECODER_ROLES, **_SANDWICH_NORM_ROLES},
    "gemma3_text": {**_DECODER_ROLES, **_SANDWICH_NORM_ROLES, **_QK_NORM_ROLES},
    "phi3": _PHI3_ROLES,
    "t5": _T5_ROLES,
    "mt5": _T5_ROLES,
    "bart": _BART_ROLES,
    "mbart": _BART_ROLES,
}

#: task heads: never adapted by a preset, nor anything inside them (they are replaced / trained fully)
_HEAD_NAMES = ("classifier", "pre_classifier", "head", "lm_head", "score", "fc_norm_head", "qa_outputs")


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


def in_modules(name: str, modules: Iterable[str]) -> bool:
    """True when ``name`` is one of ``modules`` (dotted suffix match) or inside one of them."""
    dotted = "." + name + "."
    return any("." + m + "." in dotted for m in modules)


def shared_parameter_owners(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules holding one of its own parameters (tied weights).

    GPT-2 / OPT / LLaMA with ``tie_word_embeddings`` share the input embedding with the output layer; T5 and BART
    share one table between ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens``. SSF cannot adapt such
    a module: merging folds its scale into the weight the other modules use too, and a module that never runs
    (T5's ``shared``) gets no gradient. The same module object reached under two names is not a tie (one wrapper
    serves both paths). Base layers inside PEFT wrappers count as their wrapper.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    owners: dict[int, dict[int, str]] = {}  # id(param) -> {id(module): name}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, BaseTunerLayer):
            continue  # its base layer is visited as "<name>.base_layer"
        for pname, param in module.named_parameters(recurse=False):
            if pname.startswith("ssf_"):
                continue
            owner = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
            owners.setdefault(id(param), {}).setdefault(id(module), owner)
    result: dict[str, list[str]] = {}
    for by_module in owners.values():
        if len(by_module) > 1:
            names = list(by_module.values())
            for name in names:
                result.setdefault(name, []).extend(n for n in names if n != name and n not in result[name])
    return result


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
    tied = shared_parameter_owners(model)
    candidates = [n for n in supported_module_names(model) if not in_modules(n, skip) and n not in tied]
    if placement == "all":
        if not candidates:
            raise PresetError(
                f"The 'all' SSF preset found no supported module in this {model_type or type(model).__name__} "
                "model. Pass target_modules explicitly."
            )
        return candidates
    roles = PAPER_ROLES.get(model_type or "")
    if roles is None and model_type not in (None, "custom") and getattr(model, "config", None) is not None:
        return _default_placement(model, model_type, candidates)
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
    missing = [role for role in missing if role not in _OPTIONAL_ROLES]
    if missing:
        warnings.warn(
            f"SSF preset '{placement}' for {model_type!r}: no module found for role(s) {missing}; adapting the other "
            f"{len(chosen)} modules.",
            stacklevel=3,
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


#: name components of task heads and poolers that the default placement of an unknown model type leaves alone
_HEAD_PARTS = frozenset(_HEAD_NAMES) | {"pooler", "pre_classifier", "qa_outputs", "cls", "lm_head", "heads"}


def _default_placement(model: nn.Module, model_type: str, candidates: list[str]) -> list[str]:
    """Placement for a transformers model type without a preset: the paper's rule read generically.

    Every supported module (linears, convs, norms) except embeddings, the output layer and anything inside a task
    head or pooler; the user is told what was chosen.
    """
    modules = dict(model.named_modules())
    skip = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name in candidates:
        module = modules[name]
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Embedding) or base is output or module is output:
            skip.add(name)
        elif any(part in _HEAD_PARTS for part in name.split(".")):
            skip.add(name)
    chosen = [n for n in candidates if n not in skip]
    if not chosen:
        raise PresetError(
            f"No SSF preset for model_type {model_type!r}, and this model has no supported module outside its "
            f"embeddings and heads. Pass target_modules explicitly, e.g. some of: {_examples(candidates)}."
        )
    kinds = sorted({type(modules[n].get_base_layer() if hasattr(modules[n], "get_base_layer") else modules[n]).__name__
                    for n in chosen})
    warnings.warn(
        f"No SSF preset for model_type {model_type!r}: adapting every supported module except embeddings, the output "
        f"layer and task heads ({len(chosen)} modules of types {kinds}, e.g. {_examples(chosen, 4)}). Pass "
        "target_modules to choose yourself.",
        stacklevel=3,
    )
    return chosen


def _examples(names: list[str], k: int = 8) -> str:
    if not names:
        return "(the model has no module SSF supports)"
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")
