"""Invariance report of fine-tuning, offline on CPU in a few minutes.

What it does (default, no arguments):

1. "pretrains" a tiny ViT (4 blocks, 16x16 px, patch 4) to name the *colour* of one object drawn at a random
   position with a random shape, so the pretrained backbone has no reason to keep track of position or shape;
2. fine-tunes it to tell the object's *position* (which quadrant) three ways: full fine-tuning, SSF
   (``peft_ssf``; skipped if the tuner is not importable) and head only (frozen backbone + new linear head);
3. runs :func:`peft_ssf_analysis.compare` on held-out images and writes report.json, CSVs and heatmaps, with
   every model's per-layer noise floor CKA(M_l(X), M_l(noise)).

With ``--pretrained DIR --finetuned DIR [DIR ...] --images DIR`` it analyses your own local models instead (same
loading rules as ``peft-ssf analyze``). ``--save-models DIR`` keeps the tiny models (the SSF one as an adapter dir)
so that ``peft-ssf analyze`` can be tried on them. ``--compare-estimators`` also runs the authors' estimator (fresh
noise per STIR cell) on the same models and images and prints how far its cells are from the cached ones.

    python examples/analyze_finetuning.py --out invariance_report
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from peft_ssf_analysis import InvarianceReport, compare

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the tiny models' input normalisation (ViT's default processor)
COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.85, 0.2], [0.25, 0.35, 0.95], [0.9, 0.85, 0.2]])


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data: one object (square, disc, horizontal or vertical bar) of one of four colours in one of the four
# quadrants, on a random grey background; labels for three 4-class tasks: colour, shape and position.
# --------------------------------------------------------------------------------------------------------------------


def synthetic_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images [n, 3, SIZE, SIZE] in [0, 1] and labels {"colour", "shape", "position"}."""
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    labels = {key: torch.randint(0, 4, (n,), generator=gen) for key in ("colour", "shape", "position")}
    half, r = SIZE / 2, SIZE / 8
    quadrant = labels["position"]
    cy = (quadrant // 2).float() * half + r + 0.5 + torch.rand(n, generator=gen) * (half - 2 * r - 1)
    cx = (quadrant % 2).float() * half + r + 0.5 + torch.rand(n, generator=gen) * (half - 2 * r - 1)
    dy = (yy[None] - cy[:, None, None]).abs()
    dx = (xx[None] - cx[:, None, None]).abs()
    masks = torch.stack(
        [
            (dy <= r) & (dx <= r),  # square
            dy**2 + dx**2 <= r * r,  # disc
            (dy <= r / 3 + 0.3) & (dx <= r + 0.5),  # horizontal bar
            (dy <= r + 0.5) & (dx <= r / 3 + 0.3),  # vertical bar
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), labels["shape"]].float()[:, None]
    background = 0.3 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen) + 0.05 * torch.randn(n, 3, 1, 1, generator=gen)
    colour = COLOURS[labels["colour"]][:, :, None, None] + 0.08 * torch.randn(n, 3, 1, 1, generator=gen)
    noise = 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return (background * (1 - mask) + colour * mask + noise).clamp(0, 1), labels


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(model: nn.Module, task: str, steps: int, lr: float, seed: int, batch: int = 64) -> None:
    """AdamW with a cosine schedule on freshly generated batches (no data set to store)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        x, labels = synthetic_batch(batch, gen)
        loss = nn.functional.cross_entropy(model(pixel_values=normalise(x)).logits, labels[task])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, task: str, seed: int = 999, n: int = 512) -> float:
    x, labels = synthetic_batch(n, torch.Generator().manual_seed(seed))
    return float((model(pixel_values=normalise(x)).logits.argmax(-1) == labels[task]).float().mean())


def tiny_models(args: argparse.Namespace) -> tuple[nn.Module, dict[str, nn.Module], dict[str, float]]:
    """The pretrained stand-in and its fine-tuned versions, with their test accuracies."""
    torch.manual_seed(args.seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        image_size=SIZE, patch_size=4, num_labels=4,
    )  # fmt: skip
    pretrained = ViTForImageClassification(config)
    t = time.perf_counter()
    train(pretrained, "colour", args.pretrain_steps, 2e-3, seed=args.seed)
    acc = {"pretrained/colour": accuracy(pretrained, "colour")}
    print(f"pretrained on colour: accuracy {acc['pretrained/colour']:.3f} ({time.perf_counter() - t:.1f} s)")

    def with_new_head(model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        torch.manual_seed(args.seed + 1)
        out.classifier = nn.Linear(config.hidden_size, 4)
        return out

    t = time.perf_counter()
    finetuned: dict[str, nn.Module] = {"full": with_new_head(pretrained)}
    train(finetuned["full"], "position", args.finetune_steps, 1e-3, seed=args.seed + 2)
    try:
        import peft

        from peft_ssf import SSFConfig
    except ImportError as exc:  # the tuner is optional for this example
        print(f"skipping SSF ({exc})")
    else:
        ssf = peft.get_peft_model(with_new_head(pretrained), SSFConfig(modules_to_save=["classifier"]))
        train(ssf, "position", args.finetune_steps, 1e-2, seed=args.seed + 2)
        finetuned["ssf"] = ssf  # analysed unmerged: the toolkit unwraps PeftModels itself
    head = with_new_head(pretrained)
    for name, p in head.named_parameters():
        p.requires_grad = name.startswith("classifier")
    train(head, "position", args.finetune_steps, 1e-2, seed=args.seed + 2)
    finetuned["head"] = head
    for name, model in finetuned.items():
        acc[f"{name}/position"] = accuracy(model, "position")
    scores = ", ".join(f"{k} {acc[f'{k}/position']:.3f}" for k in finetuned)
    print(f"fine-tuned on position: accuracy {scores} ({time.perf_counter() - t:.1f} s)")
    return pretrained, finetuned, acc


def save_models(root: Path, pretrained: nn.Module, finetuned: dict[str, nn.Module]) -> None:
    """Write the tiny models as local dirs (SSF as an adapter on the pretrained dir) for ``peft-ssf analyze``."""
    processor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
        "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
    }  # fmt: skip
    pre_dir = root / "pretrained"
    pretrained.save_pretrained(pre_dir)
    (pre_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    for name, model in finetuned.items():
        target = root / name
        model.save_pretrained(target)
        if (target / "adapter_config.json").is_file():
            cfg = json.loads((target / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = str(pre_dir.resolve())
            (target / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        else:
            (target / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    print(f"saved models to {root}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="invariance_report", help="output dir of the report")
    parser.add_argument("--n", type=int, default=32, help="number of analysed images")
    parser.add_argument("--steps", type=int, default=100, help="inversion steps (paper: 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for tiny models)")
    parser.add_argument("--save-models", help="also write the tiny models to this dir")
    parser.add_argument("--pretrained", help="analyse a local model dir instead of the tiny stand-ins")
    parser.add_argument("--finetuned", nargs="+", help="local fine-tuned model / adapter dirs (with --pretrained)")
    parser.add_argument("--images", help="image folder or datasets dir (with --pretrained)")
    parser.add_argument(
        "--compare-estimators",
        action="store_true",
        help="also run the authors' estimator (fresh noise per STIR cell, same n and steps) into OUT/fresh_noise "
        "and print how far its cells are from the cached estimator's",
    )
    parser.add_argument(
        "--tokens",
        choices=("flatten", "cls", "mean"),
        default="flatten",
        help="token handling of block outputs (the paper flattens)",
    )
    parser.add_argument(
        "--unbiased",
        action="store_true",
        help="unbiased CKA (noise floor ~0 at any p / n; the paper's numbers are biased)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.pretrained and (not args.finetuned or not args.images):
        parser.error("--pretrained needs --finetuned and --images")
    return args


def models_and_images(args: argparse.Namespace) -> tuple[nn.Module, dict[str, nn.Module], torch.Tensor, dict]:
    """The models and images to analyse, the normalisation to pass (empty: read from the model dir), accuracies."""
    if args.pretrained:
        from peft_ssf_analysis.cli import load_images, load_model

        pretrained = load_model(args.pretrained)
        finetuned = {Path(p).resolve().name: load_model(p) for p in args.finetuned}
        size = pretrained.config.image_size
        images = load_images(args.images, args.n, size if isinstance(size, int) else size[0])
        return pretrained, finetuned, images, {"norm": {}, "accuracy": {}}
    pretrained, finetuned, accuracies = tiny_models(args)
    if args.save_models:
        save_models(Path(args.save_models), pretrained, finetuned)
    images, _ = synthetic_batch(args.n, torch.Generator().manual_seed(12345))
    return pretrained, finetuned, images, {"norm": {"mean": MEAN, "std": STD}, "accuracy": accuracies}


def estimator_difference(cached: InvarianceReport, fresh: InvarianceReport) -> str:
    """Max and mean absolute cell difference between two reports, per matrix kind (R, Q, W)."""
    parts = []
    for kind in ("R", "Q", "W"):
        a, b = getattr(cached, kind), getattr(fresh, kind)
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        parts.append(f"{kind}: max {float(diff.max()):.3f}, mean {float(diff.mean()):.3f}")
    return "fresh noise per cell vs cached, |cell difference|: " + "; ".join(parts)


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pretrained, finetuned, images, extra = models_and_images(args)
    trained = time.perf_counter()
    settings = dict(
        steps=args.steps,
        seed=args.seed,
        reference="full" if "full" in finetuned else None,
        tokens=args.tokens,
        unbiased=args.unbiased,
    )
    report = compare(pretrained, finetuned, images, progress=not args.quiet, **settings, **extra["norm"])
    report.settings["accuracy"] = extra["accuracy"]
    written = report.save(args.out)
    done = time.perf_counter()
    print(report.summary())
    losses = ", ".join(f"{k} {v['mean']:.3f}" for k, v in report.inversion_loss[report.pretrained].items())
    print(
        f"inversions: {report.inversions_performed} run, {report.inversions_without_cache} without the cache; "
        f"mean best relative loss per pretrained source layer: {losses}"
    )
    for name, floor in report.noise_baseline.items():
        print(f"noise floor CKA(M_l(X), M_l(noise)) of {name}: " + ", ".join(f"{v:.3f}" for v in floor))
    print(f"time: models {trained - started:.1f} s, analysis {done - trained:.1f} s; wrote {len(written)} files")
    if args.compare_estimators:
        fresh = compare(
            pretrained, finetuned, images, fresh_noise_per_cell=True, progress=not args.quiet, **settings,
            **extra["norm"],
        )  # fmt: skip
        fresh.save(Path(args.out) / "fresh_noise")
        print(estimator_difference(report, fresh))
        seconds = time.perf_counter() - done
        print(f"time: fresh-noise analysis {seconds:.1f} s ({fresh.inversions_performed} inversions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
