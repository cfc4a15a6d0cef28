"""Quick check that the demo backbone is a fair showcase for parameter-efficient transfer.

For each target task of ``peft_ssf.demo.data`` it trains, on the task's small train split:

* ``head(random)``: a linear head on a frozen, randomly initialised ViT of the same shape (what pretraining buys);
* ``head(pretrained)``: a linear head on the frozen pretrained backbone (the cheap PEFT floor);
* ``full(pretrained)``: full fine-tuning of the pretrained backbone (the usual ceiling);
* optionally ``full(random)`` (``--scratch-full``): full training from random init.

A good showcase has head(pretrained) clearly above head(random) *and* clearly below full(pretrained): that gap
is what SSF, a per-channel scale and shift of the frozen features, is meant to recover. Heads are trained on
cached features (the frozen backbone is run once), so only full fine-tuning costs real time. No augmentation is
used: a flip or shift would change the label of ``orientation`` and ``position``. Models, normalisation, feature
caching and the loop are the engine's (``peft_ssf.engine``: ``build_model``, ``to_pixel_values``, ``head_inputs``,
``fit`` with its parameter groups: weight decay on the head's weight matrix only).

    HF_HUB_OFFLINE=1 python scripts/check_transfer.py         # all target tasks; full fine-tuning dominates the time
    HF_HUB_OFFLINE=1 python scripts/check_transfer.py --tasks counting --full-epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_ssf import engine  # noqa: E402
from peft_ssf.demo import BACKBONE_DIR, TARGET_TASKS, TASKS, generate_task  # noqa: E402
from peft_ssf.io import atomic_write  # noqa: E402


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


def load_model(backbone: Path, num_labels: int, pretrained: bool, seed: int, method: str) -> torch.nn.Module:
    """The pretrained backbone with a fresh ``num_labels`` head prepared for ``method`` (``engine.build_model``), or
    a randomly initialised ViT of the same configuration prepared the same way."""
    labels = {i: str(i) for i in range(num_labels)}
    if pretrained:
        return engine.build_model(method, backbone, labels, seed)
    config = ViTConfig.from_pretrained(backbone, num_labels=num_labels)
    config.id2label, config.label2id = labels, {v: k for k, v in labels.items()}
    torch.manual_seed(seed)
    return engine.prepare_model(ViTForImageClassification(config), method)


def train_head(model: torch.nn.Module, feats: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
               args: argparse.Namespace) -> dict[str, float]:
    """Linear probes on cached head inputs at every ``--head-lrs`` rate; accuracy per split of the best on
    validation. Each probe starts from the same fresh head (seeded) and trains with ``engine.fit``."""
    initial = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    runs = []
    for lr in args.head_lrs:
        model.classifier.load_state_dict(initial)
        recipe = engine.Recipe(epochs=args.head_epochs, batch_size=args.batch_size, lr=lr, weight_decay=1e-4,
                               warmup=0, clip_norm=None, seed=args.seed)
        engine.fit(model, feats["train"], ys["train"], recipe, forward=model.classifier)
        acc = {s: engine.evaluate(model.classifier, feats[s], ys[s])[0] for s in ("validation", "test")}
        runs.append({**acc, "lr": lr})
    return max(runs, key=lambda r: r["validation"])


def train_full(model: torch.nn.Module, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
               args: argparse.Namespace) -> dict[str, float]:
    """Fine-tune every parameter with ``engine.fit`` (AdamW, warm-up + cosine); returns accuracy per split.

    The new head gets ``--head-lr`` (it starts from random), the pretrained body ``--full-lr``: the usual recipe
    so that early gradients of a random head do not wreck the pretrained features.
    """
    recipe = engine.Recipe(epochs=args.full_epochs, batch_size=args.batch_size, lr=args.full_lr,
                           head_lr=args.head_lr, weight_decay=0.05, warmup=0.1, clip_norm=None, seed=args.seed)
    engine.fit(model, xs["train"], ys["train"], recipe)
    logits = lambda xb: model(pixel_values=xb).logits  # noqa: E731
    return {s: engine.evaluate(logits, xs[s], ys[s])[0] for s in ("validation", "test")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" warning is expected here
    hf_logging.disable_progress_bar()
    results: dict[str, dict[str, dict[str, float]]] = {}
    norm = engine.image_normalization(args.backbone)
    for task in args.tasks:
        t0 = time.time()
        spec = TASKS[task]
        data = generate_task(task, seed=args.seed, n_train=args.n_train)
        xs = {s: engine.to_pixel_values(a.images, norm) for s, a in data.items()}
        ys = {s: torch.from_numpy(a.labels) for s, a in data.items()}
        res: dict[str, dict[str, float]] = {}
        for pretrained in (True,) if args.no_random else (False, True):
            model = load_model(args.backbone, spec.num_classes, pretrained, args.seed, "head")
            feats = {s: engine.head_inputs(model, x) for s, x in xs.items()}
            res[f"head({'pretrained' if pretrained else 'random'})"] = train_head(model, feats, ys, args)
        for pretrained in () if args.no_full else (True, False) if args.scratch_full else (True,):
            model = load_model(args.backbone, spec.num_classes, pretrained, args.seed, "full")
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
        atomic_write(args.json, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
