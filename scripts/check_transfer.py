"""Quick check that the demo backbone is a fair showcase for parameter-efficient transfer.

For each target task of ``peft_ssf.demo.data`` it trains, on the task's small train split:

* ``head(random)``: a linear head on a frozen, randomly initialised ViT of the same shape (what pretraining buys);
* ``head(pretrained)``: a linear head on the frozen pretrained backbone (the cheap PEFT floor);
* ``full(pretrained)``: full fine-tuning of the pretrained backbone (the usual ceiling);
* optionally ``full(random)`` (``--scratch-full``): full training from random init.

A good showcase has head(pretrained) clearly above head(random) *and* clearly below full(pretrained): that gap
is what SSF, a per-channel scale and shift of the frozen features, is meant to recover. Heads are trained on
cached features (the frozen backbone is run once), so only full fine-tuning costs real time. No augmentation is
used: a flip or shift would change the label of ``orientation`` and ``position``.

    HF_HUB_OFFLINE=1 python scripts/check_transfer.py         # all target tasks; full fine-tuning dominates the time
    HF_HUB_OFFLINE=1 python scripts/check_transfer.py --tasks counting --full-epochs 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from peft_ssf.demo import BACKBONE_DIR, TARGET_TASKS, TASKS, generate_task  # noqa: E402

MEAN, STD = 0.5, 0.5  # must match the backbone's preprocessor_config.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", type=Path, default=BACKBONE_DIR)
    p.add_argument("--tasks", nargs="+", default=list(TARGET_TASKS), choices=list(TASKS))
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--n-train", type=int, default=None, help="train images per class (default: the task's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--head-epochs", type=int, default=100, help="linear-head epochs on cached features")
    p.add_argument("--head-lr", type=float, default=1e-2, help="the new head's rate in full fine-tuning")
    p.add_argument("--head-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                   help="linear-probe rates; the best on validation is reported")
    p.add_argument("--full-epochs", type=int, default=15)
    p.add_argument("--full-lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scratch-full", action="store_true", help="also fully train a randomly initialised ViT")
    p.add_argument("--no-full", action="store_true", help="linear probes only (compare backbones cheaply)")
    p.add_argument("--no-random", action="store_true", help="skip the probe of a randomly initialised ViT")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    return p.parse_args(argv)


def to_input(images_u8) -> torch.Tensor:
    """uint8 numpy [N, 32, 32, 3] -> float [N, 3, 32, 32], normalised like the backbone's image processor."""
    return (torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def load_model(backbone: Path, num_labels: int, pretrained: bool, seed: int) -> ViTForImageClassification:
    """The pretrained backbone with a fresh ``num_labels`` head, or a random ViT of the same configuration."""
    torch.manual_seed(seed)
    if pretrained:
        return ViTForImageClassification.from_pretrained(backbone, num_labels=num_labels, ignore_mismatched_sizes=True)
    config = ViTConfig.from_pretrained(backbone, num_labels=num_labels)
    config.id2label, config.label2id = {i: str(i) for i in range(num_labels)}, {str(i): i for i in range(num_labels)}
    return ViTForImageClassification(config)


@torch.no_grad()
def cls_features(model: ViTForImageClassification, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    """The classifier's input (final-LayerNorm CLS token) for every image, frozen backbone, eval mode."""
    model.eval()
    return torch.cat([model.vit(pixel_values=x[i: i + bs]).last_hidden_state[:, 0] for i in range(0, len(x), bs)])


def cosine(opt: torch.optim.Optimizer, total: int, warmup: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over the first ``warmup`` fraction of ``total`` steps, then cosine decay to 0."""
    w = max(1, int(warmup * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / w) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def train_head(feats: dict[str, torch.Tensor], ys: dict[str, torch.Tensor], num_labels: int,
               args: argparse.Namespace) -> dict[str, float]:
    """Linear probes on cached features at every ``--head-lrs`` rate; accuracy per split of the best on validation."""
    runs = [_train_head(feats, ys, num_labels, args, lr) for lr in args.head_lrs]
    return max(runs, key=lambda r: r["validation"])


def _train_head(feats: dict[str, torch.Tensor], ys: dict[str, torch.Tensor], num_labels: int,
                args: argparse.Namespace, lr: float) -> dict[str, float]:
    """Train a linear classifier on cached features with AdamW; returns accuracy per split."""
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(feats["train"].shape[1], num_labels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    n = len(ys["train"])
    steps = args.head_epochs * math.ceil(n / args.batch_size)
    sched = cosine(opt, steps)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.head_epochs):
        for idx in torch.randperm(n, generator=gen).split(args.batch_size):
            loss = F.cross_entropy(head(feats["train"][idx]), ys["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = {s: float((head(feats[s]).argmax(-1) == ys[s]).float().mean()) for s in ("validation", "test")}
    return {**acc, "lr": lr}


def train_full(model: ViTForImageClassification, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
               args: argparse.Namespace) -> dict[str, float]:
    """Fine-tune every parameter with AdamW + warmup/cosine schedule; returns accuracy per split.

    The new head gets ``--head-lr`` (it starts from random), the pretrained body ``--full-lr``: the usual recipe
    so that early gradients of a random head do not wreck the pretrained features.
    """
    head = list(model.classifier.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.full_lr}, {"params": head, "lr": args.head_lr}],
                            weight_decay=0.05)
    n = len(ys["train"])
    sched = cosine(opt, args.full_epochs * math.ceil(n / args.batch_size), warmup=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.full_epochs):
        for idx in torch.randperm(n, generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(pixel_values=xs["train"][idx]).logits, ys["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return {s: float(torch.cat([model(pixel_values=b).logits.argmax(-1) for b in xs[s].split(500)])
                         .eq(ys[s]).float().mean()) for s in ("validation", "test")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" warning is expected here
    hf_logging.disable_progress_bar()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in args.tasks:
        t0 = time.time()
        spec = TASKS[task]
        data = generate_task(task, seed=args.seed, n_train=args.n_train)
        xs = {s: to_input(a.images) for s, a in data.items()}
        ys = {s: torch.from_numpy(a.labels) for s, a in data.items()}
        res: dict[str, dict[str, float]] = {}
        for pretrained in (True,) if args.no_random else (False, True):
            model = load_model(args.backbone, spec.num_classes, pretrained, args.seed)
            feats = {s: cls_features(model, x) for s, x in xs.items()}
            res[f"head({'pretrained' if pretrained else 'random'})"] = train_head(feats, ys, spec.num_classes, args)
        for pretrained in () if args.no_full else (True, False) if args.scratch_full else (True,):
            model = load_model(args.backbone, spec.num_classes, pretrained, args.seed)
            res[f"full({'pretrained' if pretrained else 'random'})"] = train_full(model, xs, ys, args)
        results[task] = res
        cells = "  ".join(f"{k} {v['validation']:.3f}" for k, v in res.items())
        print(f"{task:12s} ({len(ys['train'])} train, chance {1 / spec.num_classes:.3f})  {cells}  "
              f"[{time.time() - t0:.0f}s]", flush=True)

    cols = list(next(iter(results.values())))
    for split in ("validation", "test"):
        print(f"\n{split} accuracy\n| task | chance | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
        for task, res in results.items():
            print(f"| {task} | {1 / TASKS[task].num_classes:.3f} | "
                  + " | ".join(f"{res[c][split]:.3f}" for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
