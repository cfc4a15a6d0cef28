"""`peft-ssf demo` / `make demo`: the whole SSF story, offline, in a few minutes on a CPU (extra: ``[demo]``).

1. take the small pretrained ViT shipped in ``peft_ssf/demo/backbone`` (``BACKBONE_DIR``; its README says how it
   was made) and generate a *different* target task as an ``imagefolder`` dataset;
2. fine-tune it with ``Trainer`` (``peft_ssf.train``) three ways: head only, SSF (+ head), full fine-tuning;
3. reload the SSF adapter (``engine.load_adapter``) and the merged model saved by training (plain transformers), and
   check that their test predictions are identical;
4. print a table (trainable parameters, accuracy, time) and write it to ``OUT/results.md`` (``make docs`` copies a
   full run's table into the README) with every number in ``OUT/results.json``.

Reproducibility: torch runs on a fixed number of threads (``threads``, 1 by default) for the whole demo, so the
table does not depend on the machine's core count (float reductions group differently with more threads); the
data, the new heads and the data order are seeded by ``seed``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import engine
from ..io import atomic_write, check_output_dir, output_lock
from . import BACKBONE_DIR, TASKS, make_task

#: learning rates per method for the demo: the transfer benchmark's validation-selected rates for the default task
#: (orientation, 20 epochs: head only, SSF paper init, full fine-tuning; benchmarks/results/transfer.md)
DEMO_LR = {"head": 1e-1, "ssf": 3e-2, "full": 1e-3}
#: the engine's label of each demo row (the demo's SSF uses the paper recipe, hence the paper init)
ROW_METHOD = {"head": "head", "ssf": "ssf_paper_init", "full": "full"}


def _train_args(data: Path, out: Path, method: str, epochs: float, seed: int, progress: bool,
                threads: int = 1) -> argparse.Namespace:
    from peft_ssf_cli import ArgumentParser, add_train_arguments

    parser = ArgumentParser(prog="peft-ssf demo")
    add_train_arguments(parser)
    return parser.parse_args([
        "--model", str(BACKBONE_DIR), "--dataset", str(data), "--output_dir", str(out), "--method", method,
        "--epochs", str(epochs), "--batch_size", "32", "--lr", str(DEMO_LR[method]), "--seed", str(seed),
        "--weight_decay", "0.05", "--warmup_ratio", "0.1", "--paper_recipe", "--metric_backend", "builtin",
        "--overwrite_output_dir", "--no_checkpoints", "--no_epoch_eval", "--threads", str(threads),
        *(["--save_merged"] if method == "ssf" else []), *([] if progress else ["--no_progress"]),
    ])


def _test_logits(model: torch.nn.Module, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the task's test split, preprocessed exactly as in training."""
    from ..train import ImageTransform, TransformedImages, load_image_dataset

    ds = load_image_dataset(str(data), progress=False)
    norm = engine.image_normalization(BACKBONE_DIR, model.config)
    items = TransformedImages(ds["test"], ImageTransform(norm.size, norm.mean, norm.std), "image", "label")
    pixels = torch.stack([items[i]["pixel_values"] for i in range(len(items))])
    labels = torch.tensor([items[i]["labels"] for i in range(len(items))])
    model.eval()
    return engine.predict(lambda xb: model(pixel_values=xb).logits, pixels, 128), labels


def _merged_check(root: Path, data: Path) -> dict[str, Any]:
    """Adapter (PEFT) vs merged model (plain transformers) on the test split."""
    from transformers import AutoModelForImageClassification

    adapter_logits, _ = _test_logits(engine.load_adapter(root / "ssf" / "adapter", BACKBONE_DIR), data)
    merged = AutoModelForImageClassification.from_pretrained(root / "ssf" / "merged")
    merged_logits, _ = _test_logits(merged, data)
    return {"merged_predictions_identical": torch.equal(adapter_logits.argmax(-1), merged_logits.argmax(-1)),
            "max_logit_difference": (adapter_logits - merged_logits).abs().max().item(),
            "merged_params": sum(p.numel() for p in merged.parameters())}


def render_table(result: dict[str, Any]) -> str:
    """The Markdown the demo prints and writes to results.md (what `make docs` puts in the README)."""
    lines = [f"| method ({result['task']}, {result['epochs']:g} epochs) | trainable params | val acc | test acc | "
             "seconds |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {engine.METHODS[ROW_METHOD[r['method']]]} | {r['trainable']:,} | {r['val']:.3f} | "
                     f"{r['test']:.3f} | {r['seconds']:.0f} |")
    check = result["merged"]
    same, diff = check["merged_predictions_identical"], check["max_logit_difference"]
    lines += ["", f"Merged SSF model: {check['merged_params']:,} parameters, the plain backbone's count with this "
                  f"head; reloaded with plain transformers its test predictions are identical to the adapter's: "
                  f"{same} (max logit difference {diff:.1e}). Seed {result['seed']}, {result['threads']} torch "
                  f"thread(s), torch {result['torch']}, {result['machine']}; seconds include evaluation."]
    return "\n".join(lines) + "\n"


def run_demo(out: str = "ssf-demo-output", overwrite: bool = False, quick: bool = False, task: str = "orientation",
             epochs: float = 20.0, seed: int = 0, threads: int = 1, progress: bool = True) -> int:
    """Run the demo, print the table, return a process exit code (1 if the merged model disagrees)."""

    if not (BACKBONE_DIR / "model.safetensors").exists():
        print(f"error: the demo backbone is missing from {BACKBONE_DIR}; run scripts/pretrain_backbone.py")
        return 1
    root = check_output_dir(out, overwrite)
    with output_lock(root):
        return _run_demo_locked(root, quick, task, epochs, seed, threads, progress)


def _run_demo_locked(root: Path, quick: bool, task: str, epochs: float, seed: int, threads: int,
                     progress: bool) -> int:
    from ..train import train

    root.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes = {"n_train": 8, "n_val": 4, "n_test": 8} if quick else {}
        data = make_task(task, root / "data", seed=seed, overwrite=True, **sizes)
        print(f"target task '{task}': {TASKS[task].description}; data in {data}")
        epochs = 1.0 if quick else epochs
        rows = []
        for method in ("head", "ssf", "full"):
            print(f"\n== fine-tuning: {engine.METHODS[ROW_METHOD[method]]} ==", flush=True)
            start = time.time()
            summary = train(_train_args(data, root / method, method, epochs, seed, progress, threads))
            rows.append({"method": method, "trainable": summary["trainable_params"], "val": summary["val_accuracy"],
                         "test": summary["test_accuracy"], "seconds": time.time() - start})
        result = {"task": task, "epochs": epochs, "seed": seed, "threads": threads, "quick": quick, "rows": rows,
                  "merged": _merged_check(root, data), "torch": torch.__version__,
                  "machine": f"{platform.machine()} {platform.system()}"}
    finally:
        torch.set_num_threads(previous_threads)
    table = render_table(result)
    print("\n" + table)
    print(f"files: adapter {root / 'ssf' / 'adapter'} | merged model {root / 'ssf' / 'merged'} | data {data}")
    atomic_write(root / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write(root / "results.md", table)
    return 0 if result["merged"]["merged_predictions_identical"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``peft-ssf demo``."""
    return run_demo(out=args.out, overwrite=args.overwrite, quick=args.quick, task=args.task, epochs=args.epochs,
                    seed=args.seed, threads=args.threads, progress=not args.no_progress)
