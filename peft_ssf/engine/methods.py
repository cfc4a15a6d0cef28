"""The fine-tuning methods the project compares, and the one way every app builds a model for one of them.

Every method trains the classifier head; everything else is frozen unless the method says otherwise:

======================  ===========================================================================================
``ssf``                 ``SSFConfig()``: scale 1 / shift 0 at start, the paper placement (preset by model type)
``ssf_paper_init``      ``SSFConfig(init_weights="paper")``: scale ~ N(1, 0.02), shift ~ N(0, 0.02)
``lora``                ``LoraConfig(r=8, lora_alpha=16)`` on the query and value projections
``ia3``                 ``IA3Config`` on key, value and the second MLP layer (its input scaled)
``ln_tuning``           ``LNTuningConfig`` on every LayerNorm
``bitfit``              every bias of the backbone
``head``                the classifier alone
``full``                every parameter
======================  ===========================================================================================

Shapes: the head is ``nn.Linear(hidden, num_labels)`` named ``classifier`` (or ``head``) on the transformers model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

#: method -> label used in every table the project prints (demo, transfer benchmark, train summaries)
METHODS: dict[str, str] = {
    "ssf": "SSF (identity init)",
    "ssf_paper_init": "SSF (paper init)",
    "lora": "LoRA r=8",
    "ia3": "IA3",
    "ln_tuning": "LN-tuning",
    "bitfit": "BitFit (biases)",
    "head": "head only",
    "full": "full fine-tuning",
}

HEAD_NAMES = ("classifier", "head")

#: targets of the comparison methods per transformers ``model_type`` (PEFT's name-suffix matching):
#: LoRA, IA3 (targets, feed-forward modules), LN-tuning
COMPARISON_TARGETS: dict[str, dict[str, Any]] = {
    "vit": {"lora": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "fc2"], ["fc2"]),
            "ln_tuning": ["layernorm_before", "layernorm_after", "layernorm"]},
    "swin": {"lora": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "fc2"], ["fc2"]),
             "ln_tuning": ["layernorm_before", "layernorm_after", "norm", "layernorm"]},
    "convnext": {"lora": ["pwconv1", "pwconv2"], "ia3": (["dwconv", "pwconv2"], ["pwconv2"]),
                 "ln_tuning": ["layernorm"]},
}


def head_name(model: nn.Module) -> str:
    """Attribute name of the classification head of a transformers image classifier."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def _replace_head(model: nn.Module, id2label: dict[int, str]) -> bool:
    """Give ``model`` a freshly initialised linear head for ``id2label``; False if its head is not one Linear."""
    name = head_name(model)
    old = getattr(model, name)
    if not isinstance(old, nn.Linear):
        return False
    new = nn.Linear(old.in_features, len(id2label), bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    model._init_weights(new)  # the model family's own head initialisation
    setattr(model, name, new)
    model.num_labels = len(id2label)
    return True


def load_classifier(path: Union[str, Path], id2label: Optional[dict[int, str]] = None) -> nn.Module:
    """``AutoModelForImageClassification`` from ``path`` with a head for ``id2label`` (default: the checkpoint's).

    A checkpoint trained on other labels keeps its weights and gets a new head for ours, without the mismatch
    warnings ``num_labels=... , ignore_mismatched_sizes=True`` would print (the new head is the expected outcome).
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    if id2label is None:
        return AutoModelForImageClassification.from_pretrained(str(path))
    id2label = {int(k): str(v) for k, v in id2label.items()}
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    config = AutoConfig.from_pretrained(str(path))
    has_head = any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])
    if not has_head or len(config.id2label) == len(id2label):
        return AutoModelForImageClassification.from_pretrained(str(path), **labels)
    model = AutoModelForImageClassification.from_pretrained(str(path))
    if not _replace_head(model, id2label):
        return AutoModelForImageClassification.from_pretrained(str(path), ignore_mismatched_sizes=True, **labels)
    model.config.id2label, model.config.label2id = labels["id2label"], labels["label2id"]
    return model


def peft_config(method: str, model_type: str, head: str = "classifier", **ssf_options: Any):
    """The PEFT config of ``method`` for a model of ``model_type`` (None for ``head`` / ``bitfit`` / ``full``).

    ``ssf_options`` go to ``SSFConfig`` (e.g. ``target_modules``, ``preset``, ``skip_key_shift``, ``fused``).
    """
    from peft import IA3Config, LNTuningConfig, LoraConfig

    from ..config import SSFConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("head", "bitfit", "full"):
        return None
    if method in ("ssf", "ssf_paper_init"):
        ssf_options.setdefault("init_weights", "paper" if method == "ssf_paper_init" else True)
        return SSFConfig(modules_to_save=[head], **ssf_options)
    if model_type not in COMPARISON_TARGETS:
        raise ValueError(f"no {method} targets for model type {model_type!r} (have {', '.join(COMPARISON_TARGETS)})")
    targets = COMPARISON_TARGETS[model_type][method]
    if method == "lora":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=[head])
    if method == "ia3":
        return IA3Config(target_modules=targets[0], feedforward_modules=targets[1], modules_to_save=[head])
    return LNTuningConfig(target_modules=targets, modules_to_save=[head])


def prepare_model(model: nn.Module, method: str, **ssf_options: Any) -> nn.Module:
    """``model`` made ready for ``method``: a ``PeftModel``, or the model with only the method's params trainable."""
    from peft import get_peft_model

    head = head_name(model)
    config = peft_config(method, getattr(model.config, "model_type", ""), head, **ssf_options)
    if config is not None:
        return get_peft_model(model, config)
    return train_only(model, method, head)


def train_only(model: nn.Module, method: str, head: str) -> nn.Module:
    """The non-PEFT methods: every parameter trainable (``full``), or only the head (and for ``bitfit`` the
    biases)."""
    model.requires_grad_(method == "full")
    if method != "full":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(f"{head}.") or (method == "bitfit" and name.endswith(".bias")))
    return model


def build_model(method: str, path: Union[str, Path], id2label: dict[int, str], seed: int = 0,
                **ssf_options: Any) -> nn.Module:
    """The checkpoint at ``path`` with a fresh head for ``id2label``, prepared for ``method``.

    ``seed`` fixes everything random in the build: the new head, the paper-init draw, LoRA's A matrices.
    """
    torch.manual_seed(seed)
    return prepare_model(load_classifier(path, id2label), method, **ssf_options)


@torch.no_grad()
def head_inputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """What the classifier head receives for pixel values ``x`` ``[N, 3, H, W]``: features ``[N, hidden]``.

    Captured by a forward pre-hook on the head, so it holds for every model family (pooled, CLS token or mean):
    a head trained on these features is trained on exactly what the frozen backbone gives it.
    """
    head = getattr(model, head_name(model))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(pixel_values=x[i: i + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, of which in the classifier head)."""
    total = head = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel()
            head += p.numel() if any(f".{h}." in f".{name}" for h in HEAD_NAMES) else 0
    return total, head
