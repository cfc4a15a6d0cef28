"""Pretrain the small demo ViT on the synthetic source task and save it to ``peft_ssf/demo/backbone/``.

Why: SSF adapts a *pretrained* model. The project runs offline and cannot download ViT-B/16, so it ships a
~1.2M-parameter ViT (32x32 inputs, 8x8 patches, 6 layers) pretrained here from scratch on CPU. The demo and the
transfer benchmark fine-tune it on the target tasks of ``peft_ssf.demo.data``.

Source task (``scenes``, see ``peft_ssf.demo.data``): one object per image with four labelled factors: shape (12),
fill (outline / solid / striped), hue (6 bins) and background (a gradient or one of 6 texture families), and
unlabelled nuisances (scale, position, any rotation, distractor objects, clutter, noise). The objective
(``--objective multi``, the default) is the sum of one cross-entropy per factor, read from one linear classifier
whose outputs are the four factors' logits side by side (``config.source_factors`` says which slice is which), so the
checkpoint stays a plain ``ViTForImageClassification``. ``--objective shape`` trains on the shape alone.

Data: every epoch is a fresh chunk of ``--chunk`` scenes from ``peft_ssf.demo.data.source_stream`` (about 0.5 ms per
image to render, a few % of a training step), so the model never sees an image twice and there is no augmentation;
validation and test are the fixed splits of ``generate_task("scenes")``.

Reproducibility: everything random (data, init, batch order; the model has no dropout) hangs off ``--seed``;
``torch.use_deterministic_algorithms`` is on; torch runs on ``--threads`` intra-op threads (1 by default: float
reductions may group differently with another thread count, and on a shared 2-core machine one thread is also the
fastest per CPU second). ``--resume`` continues from the state saved after every epoch (model, optimiser, schedule,
generator), which gives the same weights as an uninterrupted run.

Shared with the other apps (``peft_ssf.engine``): the normalisation (``to_pixel_values``) and the image processor
writer. The loop stays here: it streams a fresh chunk per epoch, sums one loss per factor and saves resumable state,
which ``engine.fit`` does not. Two recipes (``--recipe``):

* ``shipped`` (default): the recipe the shipped checkpoint was trained with, so the command below reproduces it:
  weight decay on every weight matrix except the position and CLS embeddings (``shipped_param_groups``), and the
  cosine running over all steps multiplied by the warm-up ramp (``shipped_schedule``).
* ``engine``: the applications' shared rule (``engine.param_groups``: weight decay on the classifier's weight matrix
  only; ``engine.warmup_cosine``: cosine over the steps after the warm-up). It gives a different checkpoint.

    HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py --log pretrain.jsonl        # the shipped checkpoint
    HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py --max-steps 5 --out /tmp/bb  # quick determinism check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from peft_ssf import engine  # noqa: E402
from peft_ssf.demo.data import (  # noqa: E402
    IMAGE_SIZE,
    SOURCE_FACTORS,
    SOURCE_TASK,
    TASKS,
    generate_task,
    source_stream,
)
from peft_ssf.io import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "peft_ssf" / "demo" / "backbone"
#: the processor's normalisation: pixel / 255 -> (x - 0.5) / 0.5 in [-1, 1]
NORM = engine.Normalization(IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pretraining")
STATE_FILE = "training_state.pt"  # resume state, written next to the checkpoint during training, removed at the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds data generation, init and batch order")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (save_pretrained layout)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; part of the reproducibility key")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--objective", choices=("multi", "shape"), default="multi",
                   help="multi: one cross-entropy per labelled factor, summed; shape: the shape factor alone")
    p.add_argument("--chunk", type=int, default=12_800, help="fresh source scenes per epoch")
    p.add_argument("--pos-init", choices=("random", "sincos"), default="sincos",
                   help="position embeddings: transformers' random init, or 2-D sine-cosine (then trained)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--recipe", choices=("shipped", "engine"), default="shipped",
                   help="parameter groups and schedule: the shipped checkpoint's (reproduces it) or the engine's rule")
    p.add_argument("--warmup-frac", type=float, default=0.03, help="fraction of steps with linear warmup")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--n-val", type=int, default=TASKS[SOURCE_TASK].n_val, help="validation images per shape")
    p.add_argument("--n-test", type=int, default=TASKS[SOURCE_TASK].n_test, help="test images per shape")
    p.add_argument("--max-steps", type=int, default=None, help="stop early (for quick checks); no README then")
    p.add_argument("--log", type=Path, default=None, help="append one JSON line per epoch here")
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --out")
    p.add_argument("--no-readme", action="store_true", help="do not write README.md into --out")
    return p.parse_args(argv)


def factor_slices(objective: str) -> dict[str, slice]:
    """Which classifier outputs hold which factor's logits."""
    names = list(SOURCE_FACTORS) if objective == "multi" else ["shape"]
    out, start = {}, 0
    for name in names:
        out[name] = slice(start, start + len(SOURCE_FACTORS[name]))
        start += len(SOURCE_FACTORS[name])
    return out


def loss_fn(logits: torch.Tensor, factors: torch.Tensor, slices: dict[str, slice], smoothing: float) -> torch.Tensor:
    cols = list(SOURCE_FACTORS)
    return sum(F.cross_entropy(logits[:, s], factors[:, cols.index(name)], label_smoothing=smoothing)
               for name, s in slices.items())


@torch.no_grad()
def accuracy(model: ViTForImageClassification, x: torch.Tensor, factors: torch.Tensor, slices: dict[str, slice],
             bs: int = 500) -> dict[str, float]:
    """Accuracy per factor (and their mean, ``"mean"``)."""
    model.eval()
    logits = torch.cat([model(pixel_values=x[i: i + bs]).logits for i in range(0, len(x), bs)])
    model.train()
    cols = list(SOURCE_FACTORS)
    acc = {n: float((logits[:, s].argmax(-1) == factors[:, cols.index(n)]).float().mean()) for n, s in slices.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return {k: round(v, 4) for k, v in acc.items()}


def build_model(args: argparse.Namespace) -> ViTForImageClassification:
    slices = factor_slices(args.objective)
    labels = [f"{name}:{value}" for name in slices for value in SOURCE_FACTORS[name]]
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=args.patch,
        num_channels=3,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={c: i for i, c in enumerate(labels)},
    )
    config.source_task = SOURCE_TASK
    config.source_factors = {name: [s.start, s.stop] for name, s in slices.items()}  # logits slice per factor
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    if args.pos_init == "sincos":
        with torch.no_grad():
            pos = model.vit.embeddings.position_embeddings  # [1, 1 + grid * grid, hidden]; index 0 is the CLS token
            pos[0, 1:] = sincos_2d(IMAGE_SIZE // args.patch, args.hidden)
            pos[0, 0] = 0.0
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE-style fixed 2-D sine-cosine position embeddings [grid * grid, dim] (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def shipped_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The shipped checkpoint's groups: decay on weight matrices, not on biases, norms, position / CLS embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith(("cls_token", "position_embeddings")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def shipped_schedule(opt: torch.optim.Optimizer, total: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The shipped checkpoint's schedule: linear warm-up ramp times a cosine over *all* ``total`` steps."""
    warmup = max(1, int(warmup_frac * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    """Pretrain and save the backbone. The training loop is written out top to bottom on purpose (fresh data each
    epoch, one loss per factor, resumable state): ``engine.fit`` covers none of the three, and one readable loop
    is easier to audit than pieces."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0, c0 = time.time(), time.process_time()

    held_out = generate_task(SOURCE_TASK, seed=args.seed, n_train=0, n_val=args.n_val, n_test=args.n_test)
    x_val, f_val = engine.to_pixel_values(held_out["validation"].images, NORM), torch.from_numpy(
        held_out["validation"].factors)
    x_test, f_test = engine.to_pixel_values(held_out["test"].images, NORM), torch.from_numpy(held_out["test"].factors)
    slices = factor_slices(args.objective)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = args.chunk // args.batch_size  # drop the last partial batch: fixed shapes, simpler
    total = args.epochs * steps_per_epoch
    if args.recipe == "shipped":
        opt = torch.optim.AdamW(shipped_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
        sched = shipped_schedule(opt, total, args.warmup_frac)
    else:
        opt = engine.make_optimizer(model, args.lr, args.weight_decay)
        sched = engine.warmup_cosine(opt, total, args.warmup_frac)
    gen = torch.Generator().manual_seed(args.seed)  # batch order
    history: list[dict] = []
    start_epoch, step, cpu_before = 0, 0, 0.0
    state_path = args.out / STATE_FILE
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start_epoch, step, history, cpu_before = state["epoch"], state["step"], state["history"], state["cpu_s"]
        print(f"resumed after epoch {start_epoch} (step {step})", flush=True)
    print(f"model: {n_params:,} parameters; {total} steps of {args.batch_size} ({args.epochs} epochs of "
          f"{args.chunk} fresh scenes); objective {args.objective}", flush=True)

    model.train()
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        chunk = source_stream(args.seed, epoch, args.chunk)
        x_chunk, f_chunk = torch.from_numpy(chunk.images), torch.from_numpy(chunk.factors)
        order = torch.randperm(len(x_chunk), generator=gen)
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size: (i + 1) * args.batch_size]
            loss = loss_fn(model(pixel_values=engine.to_pixel_values(x_chunk[idx], NORM)).logits, f_chunk[idx], slices,
                           args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running, seen, step = running + loss.item(), seen + 1, step + 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        val = accuracy(model, x_val, f_val, slices)
        cpu = cpu_before + time.process_time() - c0
        rec = {"epoch": epoch + 1, "step": step, "images_seen": step * args.batch_size,
               "train_loss": round(running / max(seen, 1), 4), "lr": round(sched.get_last_lr()[0], 7),
               "val": val, "epoch_wall_s": round(time.time() - t_epoch, 1), "cpu_s": round(cpu, 1)}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if args.log is not None:
            with args.log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if args.max_steps is not None and step >= args.max_steps:
            break
        args.out.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "gen": gen.get_state(), "epoch": epoch + 1, "step": step, "history": history, "cpu_s": cpu}
        atomic_write(state_path, lambda fh, state=state: torch.save(state, fh))

    test = accuracy(model, x_test, f_test, slices)
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    engine.save_image_processor(args.out, None, NORM)
    state_path.unlink(missing_ok=True)
    digest = sha256(args.out / "model.safetensors")
    summary = {
        "seed": args.seed, "threads": args.threads, "steps": step, "params": n_params, "objective": args.objective,
        "val": history[-1]["val"], "test": test, "wall_s": round(wall, 1),
        "cpu_s": round(cpu_before + time.process_time() - c0, 1), "sha256": digest,
        "size_bytes": (args.out / "model.safetensors").stat().st_size, "history": history,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    atomic_write(args.out / "pretrain_summary.json", json.dumps(summary, indent=1) + "\n")
    if args.max_steps is None and not args.no_readme:
        write_curve(summary, args.out / "curve.png")
        write_readme(args, summary)
    return summary


def write_curve(s: dict, path: Path) -> None:
    """Validation accuracy per factor against images seen, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = s["history"]
    seen = [r["images_seen"] / 1e6 for r in h]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in h[0]["val"]:
        ax.plot(seen, [100 * r["val"][name] for r in h], label=name, lw=2.2 if name == "mean" else 1.2)
    ax.set_xlabel("training images seen (millions)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Source task: validation accuracy per factor")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot(seen, [r["train_loss"] for r in h])
    ax2.set_xlabel("training images seen (millions)")
    ax2.set_ylabel("training loss (sum over factors)")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def write_readme(args: argparse.Namespace, s: dict) -> None:
    """The backbone README from the run's summary: mostly one text template, hence its length."""
    spec = TASKS[SOURCE_TASK]
    cmd = "HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py" + "".join(f" {a}" for a in s["argv"])
    factors = ", ".join(f"{n} ({len(v)})" for n, v in SOURCE_FACTORS.items() if n in s["test"])
    acc = lambda d: ", ".join(f"{k} {d[k]:.3f}" for k in d)  # noqa: E731
    rows = [
        ("architecture", f"ViT, image 32x32, patch {args.patch}, hidden {args.hidden}, {args.layers} layers, "
                         f"{args.heads} heads, MLP {4 * args.hidden}, CLS-token head, no dropout; position embeddings "
                         + ("initialised as 2-D sine-cosine (MAE-style), then trained" if args.pos_init == "sincos"
                            else "randomly initialised")),
        ("parameters", f"{s['params']:,} (`model.safetensors`: {s['size_bytes']:,} bytes, float32)"),
        ("source task", f"`{SOURCE_TASK}`: {spec.description.removeprefix('SOURCE: ')}"),
        ("objective", "sum of one cross-entropy per factor: " + factors if args.objective == "multi"
         else "cross-entropy on the shape"),
        ("data", f"{args.epochs} epochs x {args.chunk:,} fresh scenes (`source_stream`, seed {args.seed}): "
                 f"{s['steps'] * args.batch_size:,} images, none seen twice; no augmentation"),
        ("recipe", f"AdamW lr {args.lr}, betas 0.9 / 0.999, wd {args.weight_decay} "
                   + ("(weight matrices only, not position / CLS embeddings)" if args.recipe == "shipped" else
                      "(the engine's rule: classifier weight matrix only)")
                   + f", batch {args.batch_size}, {s['steps']:,} steps, {args.warmup_frac:.0%} linear warmup then "
                   + ("cosine to 0 (cosine over all steps, times the warm-up ramp)" if args.recipe == "shipped" else
                      "cosine to 0") + f", label smoothing {args.label_smoothing}, grad-clip 1.0"),
        ("source accuracy (test)", f"{acc(s['test'])} ({spec.n_test if args.n_test is None else args.n_test} "
                                   f"test images per shape, {len(SOURCE_FACTORS['shape']) * args.n_test} in all)"),
        ("source accuracy (validation)", acc(s["val"])),
        ("made with", f"torch {s['torch']}, transformers {s['transformers']}, Python {s['python']}, "
                      f"{args.threads} CPU thread(s); wall time {s['wall_s'] / 3600:.1f} h, CPU time "
                      f"{s['cpu_s'] / 3600:.1f} h (shared 2-core machine)"),
        ("sha256 (model.safetensors)", f"`{s['sha256']}`"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    names = list(s["history"][0]["val"])
    every = max(1, len(s["history"]) // 20)
    shown = [r for i, r in enumerate(s["history"]) if (i + 1) % every == 0 or i == 0 or i == len(s["history"]) - 1]
    hist = "\n".join(f"| {r['epoch']} | {r['images_seen']:,} | {r['train_loss']:.3f} | "
                     + " | ".join(f"{r['val'][n]:.3f}" for n in names) + " |" for r in shown)
    text = f"""# Demo backbone: a tiny ViT pretrained on synthetic scenes

A `ViTForImageClassification` (transformers) pretrained from scratch, offline, on the `{SOURCE_TASK}` source task of
`peft_ssf.demo.data`. It exists so the demo and the transfer benchmark have a *pretrained* model to adapt with SSF
without downloading anything. It is not a general-purpose vision model.

{table}

Preprocessing (`preprocessor_config.json`): resize to 32x32, rescale by 1/255, normalise with mean = std = 0.5.

The classifier has one output per factor value, the factors side by side (`id2label` names them `factor:value`;
`config.source_factors` gives each factor's slice of the logits). Fine-tuning replaces it with a new head
(`num_labels=..., ignore_mismatched_sizes=True`).

## Training curve

![validation accuracy per factor and training loss](curve.png)

| epoch | images seen | train loss | {" | ".join(f"val {n}" for n in names)} |
|---|---|---|{"---|" * len(names)}
{hist}

(Every {every}th epoch shown; `pretrain_summary.json` has every epoch.)

## How it was made

```bash
{cmd}
```

The script seeds everything from `--seed` (scene generation, initialisation, batch order), turns on
`torch.use_deterministic_algorithms(True)` and fixes the intra-op thread count (`--threads`, 1 by default). With
the same torch version, thread count and CPU it is deterministic (two runs of the first steps, `--max-steps`, give
byte-identical `model.safetensors`; a `--resume`d run continues the same trajectory). On another torch version, thread
count or CPU instruction set, expect the same recipe to give slightly different weights and source accuracy.

## Loading

```python
from transformers import ViTForImageClassification
from peft_ssf.demo import BACKBONE_DIR

model = ViTForImageClassification.from_pretrained(BACKBONE_DIR, num_labels=6, ignore_mismatched_sizes=True)
```
"""
    atomic_write(args.out / "README.md", text)


if __name__ == "__main__":
    main()
