"""What ``peft-ssf train`` shares between its image job (``peft_ssf.train``) and its text job (``engine/text.py``):
label checks, the accuracy metric, the ``Trainer`` subclass with the engine's recipe, its arguments and callbacks.

Kept here, below both jobs, so neither imports the other.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import UserError, require
from . import recipe


class LabelError(UserError, ValueError):
    """The dataset's labels do not fit the classifier head (or cannot be found)."""


# ----- data ---------------------------------------------------------------------------------------
def dataset_labels(ds, label_col: str) -> dict[int, str]:
    """``id2label`` of the dataset: its ``ClassLabel`` names, else ``"0" .. str(max label)`` over every split."""
    names = getattr(ds["train"].features[label_col], "names", None)
    if names:
        return dict(enumerate(names))
    top = max(max(ds[split][label_col]) for split in ds if len(ds[split]))
    return {i: str(i) for i in range(int(top) + 1)}


def check_labels(ds, label_col: str, num_labels: int) -> None:
    """Fail before training when a label of any split is outside the head's ``num_labels`` classes."""
    for split in ds:
        values = np.asarray(ds[split][label_col])
        bad = values[(values < 0) | (values >= num_labels)]
        if bad.size:
            raise LabelError(f"label {int(bad[0])} in split {split!r} is outside the classifier head's {num_labels} "
                             f"classes (0..{num_labels - 1}); the head is sized from the dataset's labels")



def make_accuracy_metric(backend: str = "auto") -> tuple[Callable, str]:
    """``compute_metrics`` for Trainer. ``evaluate.load("accuracy")`` needs the Hub; offline we use numpy."""
    if backend in ("auto", "evaluate") and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            evaluate = require("evaluate", "train")
            metric = evaluate.load("accuracy")

            def compute(pred) -> dict[str, float]:
                return metric.compute(predictions=np.argmax(pred.predictions, -1), references=pred.label_ids)

            return compute, "evaluate"
        except Exception as exc:  # noqa: BLE001 - any failure to fetch the metric script
            if backend == "evaluate":
                raise
            print(f"note: evaluate.load('accuracy') failed ({type(exc).__name__}); using the built-in accuracy.")
    elif backend == "auto":
        print("note: HF_HUB_OFFLINE is set, so evaluate cannot fetch its accuracy script; using built-in accuracy.")

    def compute_builtin(pred) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    return compute_builtin, "builtin"


def _trainer_class():
    """``Trainer`` with the engine's optimiser (parameter groups) and, for ``cosine``, its schedule."""
    from transformers import Trainer

    class SSFTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = recipe.make_optimizer(self.model, self.args.learning_rate, self.args.weight_decay)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None and self.args.lr_scheduler_type == "cosine":
                warmup = self.args.warmup_steps or self.args.warmup_ratio
                self.lr_scheduler = recipe.warmup_cosine(optimizer or self.optimizer, num_training_steps, warmup)
            return super().create_scheduler(num_training_steps, optimizer)

    return SSFTrainer


def _training_arguments(args: argparse.Namespace, out: Path):
    from transformers import TrainingArguments

    per_epoch = "epoch" if args.save_steps is None else "steps"
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        lr_scheduler_type="cosine" if args.paper_recipe else args.scheduler,
        eval_strategy="no" if args.no_epoch_eval else per_epoch, eval_steps=args.save_steps,
        save_strategy="no" if args.no_checkpoints else per_epoch, save_steps=args.save_steps,
        save_total_limit=getattr(args, "save_total_limit", None),
        logging_steps=10, seed=args.seed, data_seed=args.seed, remove_unused_columns=False, report_to=[],
        disable_tqdm=args.no_progress, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )


def _callbacks(train_set: Any, stop_after_step: Optional[int]) -> list:
    """Set the augmentation epoch; optionally stop (with a checkpoint) after a step, for resume tests."""
    from transformers import TrainerCallback

    class EpochSetter(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            train_set.epoch = int(state.epoch or 0)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= stop_after_step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return [EpochSetter()] + ([Stop()] if stop_after_step is not None else [])
