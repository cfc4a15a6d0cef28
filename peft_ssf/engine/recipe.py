"""The optimisation recipe of the SSF paper, and the one plain training loop of the project.

Recipe: AdamW; weight decay only on the classifier head's weight matrix (0 on every SSF / IA3 scale and shift,
bias, norm and adapter vector: decaying a scale pulls it towards 0, not towards the identity); linear warm-up then
cosine decay to 0; gradient-norm clipping. ``peft-ssf train`` gives the same groups and schedule to ``Trainer``;
everything else that trains (demo-free scripts, benchmarks, examples) calls ``fit``.

Shapes: ``x`` is a float tensor ``[N, 3, H, W]`` of pixel values, ``y`` int64 labels ``[N]``; ``forward(xb)`` returns
logits ``[B, num_labels]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .methods import HEAD_NAMES

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """Everything ``fit`` needs besides the model and data. ``warmup``: a fraction of the steps if < 1, else steps;
    ``head_lr``: a separate learning rate for the classifier head (e.g. a new head on a fully fine-tuned body)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-2
    head_lr: Optional[float] = None
    weight_decay: float = 0.05
    warmup: float = 0.1
    clip_norm: Optional[float] = 1.0
    label_smoothing: float = 0.0
    drop_last: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0


def _in_head(name: str) -> bool:
    return any(f".{h}." in f".{name}" for h in HEAD_NAMES)


def param_groups(model: nn.Module, weight_decay: float, head_lr: Optional[float] = None) -> list[dict[str, Any]]:
    """Trainable parameters as AdamW groups: the head's weight matrix with ``weight_decay``, the rest with 0.

    With ``head_lr`` the head's parameters form their own groups with that learning rate (the others keep the
    optimiser's). Without it there are exactly two groups: ``[decayed, not decayed]``.
    """
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = _in_head(name)
            groups.setdefault((head and p.ndim >= 2, head and head_lr is not None), []).append(p)
    out = []
    for decay, own_lr in ((True, False), (False, False), (True, True), (False, True)):
        if (decay, own_lr) in groups or not own_lr:
            group = {"params": groups.get((decay, own_lr), []), "weight_decay": weight_decay if decay else 0.0}
            out.append({**group, "lr": head_lr} if own_lr else group)
    return out


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                   head_lr: Optional[float] = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups``."""
    return torch.optim.AdamW(param_groups(model, weight_decay, head_lr), lr=lr, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (``warmup``: fraction of ``total_steps`` if < 1, else a step count), then cosine decay to 0."""
    n_warm = max(1, round(warmup * total_steps) if warmup < 1 else int(warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - n_warm) / max(1, total_steps - n_warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _logits_of(model: nn.Module) -> Forward:
    return lambda xb: model(pixel_values=xb).logits


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, *,
        forward: Optional[Forward] = None, augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]
        = None, max_steps: Optional[int] = None, on_epoch: Optional[Callable[[int, float], None]] = None,
        progress: bool = False) -> dict[str, Any]:
    """Train ``model``'s trainable parameters on ``(x, y)`` with ``recipe``; returns the last epoch's mean loss.

    Batch order (and ``augment(xb, generator)``, if given) come from one generator seeded with ``recipe.seed``;
    ``forward`` defaults to the model's logits (pass e.g. the head alone to train it on cached features).
    ``on_epoch(epoch, mean_loss)`` runs after every epoch; ``max_steps`` stops early. Leaves the model in eval mode.
    """
    forward = forward or _logits_of(model)
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay, recipe.betas, recipe.head_lr)
    per_epoch = len(x) // recipe.batch_size if recipe.drop_last else math.ceil(len(x) / recipe.batch_size)
    total = recipe.epochs * per_epoch if max_steps is None else min(max_steps, recipe.epochs * per_epoch)
    scheduler = warmup_cosine(optimizer, total, recipe.warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = _progress(total, progress)
    model.train()
    step, last = 0, float("nan")
    for epoch in range(recipe.epochs):
        running, seen = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(recipe.batch_size)[:per_epoch]:
            xb = x[idx] if augment is None else augment(x[idx], gen)
            loss = F.cross_entropy(forward(xb), y[idx], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
            optimizer.step()
            scheduler.step()
            running, seen, step = running + loss.item(), seen + 1, step + 1
            bar.update(1)
            if step >= total:
                break
        last = running / max(seen, 1)
        if on_epoch is not None:
            on_epoch(epoch + 1, last)
        if step >= total:
            break
    bar.close()
    model.eval()
    return {"train_loss": last, "steps": step}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="training", unit="step")


@torch.no_grad()
def predict(forward: Forward, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits ``[N, num_labels]`` of ``forward`` over ``x`` in batches (no gradients)."""
    return torch.cat([forward(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(forward: Forward, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``forward`` on ``(x, y)``."""
    logits = predict(forward, x, batch_size)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))
