"""Fine-tune the demo backbone three ways (full, SSF, head only) on one target task and save the models for the
invariance analysis (``examples/analyze_finetuning.py --pretrained ... --finetuned ... --images ...``).

The models, data and recipe are the transfer benchmark's, which are the engine's (``benchmarks/transfer.py`` over
``peft_ssf.engine``: ``build_model``, ``to_pixel_values``, ``fit`` with AdamW, warm-up + cosine, batch 32, weight decay
on the head's weight matrix only, no augmentation), at the learning rate and epochs the benchmark selected on
validation for this task and method (read from ``benchmarks/results/transfer.json``; ``--lr METHOD=RATE`` overrides),
seed 0.

Writes into ``--out``: ``pretrained/`` (a copy of the backbone), ``full/`` and ``head/`` (plain transformers dirs),
``ssf/`` (a PEFT adapter whose base is ``pretrained/``), ``data/<task>/`` (the task's imagefolder; the analysis reads
its test split) and ``accuracy.json``. Then::

    python examples/analyze_finetuning.py --pretrained OUT/pretrained --finetuned OUT/full OUT/ssf OUT/head \\
        --images OUT/data/orientation --out invariance_report

    HF_HUB_OFFLINE=1 python -m scripts.analysis_models --task orientation --out /tmp/am  # from the repo root
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks import transfer  # noqa: E402
from peft_ssf.demo import BACKBONE_DIR, TARGET_TASKS, TASKS  # noqa: E402
from peft_ssf.io import atomic_write  # noqa: E402

METHODS = ("full", "ssf", "head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="orientation", choices=list(TARGET_TASKS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", type=Path, default=BACKBONE_DIR)
    p.add_argument("--results", type=Path, default=transfer.RESULTS_DIR / "transfer.json",
                   help="benchmark results whose selected rates and epochs are used")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=RATE", help="override a selected rate")
    p.add_argument("--epochs", type=int, default=None, help="default: the benchmark's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"lr_selection": {}, "meta": {}}
    lrs = {m: results["lr_selection"].get(f"{args.task}/{m}", {}).get("selected_lr") for m in METHODS}
    lrs.update({k: float(v) for k, v in (item.split("=", 1) for item in args.lr)})
    if any(v is None for v in lrs.values()):
        raise SystemExit(f"no selected rate for {[m for m, v in lrs.items() if v is None]} in {args.results}; "
                         "pass --lr METHOD=RATE")
    meta = results["meta"]
    epochs = args.epochs or meta.get("task_epochs", {}).get(args.task, meta.get("epochs", transfer.DEFAULT_EPOCHS))

    args.out.mkdir(parents=True, exist_ok=True)
    pre_dir = args.out / "pretrained"
    if pre_dir.exists():
        shutil.rmtree(pre_dir)
    shutil.copytree(args.backbone, pre_dir, ignore=shutil.ignore_patterns("*.png", "*.md", "*.json.tmp"))
    data = {args.task: transfer.load_task_arrays(args.task, args.out / "data", args.seed, {})}
    digest = transfer.arrays_digest(data[args.task])
    protocol = transfer.Protocol(str(pre_dir), transfer.backbone_digest(pre_dir), epochs, 32, None, None, None,
                                 args.seed, ((args.task, digest),))
    num_labels = {args.task: TASKS[args.task].num_classes}
    transfer.init_worker(data, protocol, num_labels, args.threads)
    processor = (pre_dir / "preprocessor_config.json").read_text()

    accuracy = {}
    for method in METHODS:
        t0 = time.time()
        job = transfer.Job(args.task, method, lrs[method], args.seed)
        model, rec = transfer.train_job(job)
        accuracy[method] = {"lr": lrs[method], "val_acc": rec["val_acc"], "test_acc": rec["test_acc"]}
        target = args.out / method
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)
        if (target / "adapter_config.json").is_file():
            cfg = json.loads((target / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = str(pre_dir.resolve())
            atomic_write(target / "adapter_config.json", json.dumps(cfg, indent=2))
        else:
            atomic_write(target / "preprocessor_config.json", processor)
        print(f"{method}: lr {lrs[method]:g}, {epochs} epochs, val {rec['val_acc']:.3f} test {rec['test_acc']:.3f} "
              f"({time.time() - t0:.0f}s) -> {target}", flush=True)
    summary = {"task": args.task, "epochs": epochs, "seed": args.seed, "accuracy": accuracy,
               "backbone_sha256": protocol.backbone_sha256}
    atomic_write(args.out / "accuracy.json", json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
