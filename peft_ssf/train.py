"""Fine-tune an image classifier with SSF and ``transformers.Trainer`` (``peft-ssf train``; extra: ``[train]``).

Reads top to bottom as the job runs: load a dataset (a Hub id, a local ``imagefolder`` or a ``save_to_disk``
directory) and its labels; build the model for the method with the engine (a head for the dataset's labels);
train with ``Trainer`` using the engine's recipe (AdamW with weight decay on the head's weight matrix only, warm-up
then cosine); evaluate; save the adapter with its model card, optionally the merged model with its image
processor, write results.json, and only then (everything local being safe) optionally push the adapter to the Hub.
The output directory is locked for the whole run (a second run into it fails at once); ``--overwrite_output_dir``
first removes the earlier run's adapter, merged model, checkpoints and results, so nothing stale is resumed or
served. Images are preprocessed with PIL + numpy (no torchvision),
normalised with the checkpoint's image-processor statistics (``engine.image_normalization``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from peft_ssf_cli import add_train_arguments

from . import engine
from .engine.trainer import (
    LabelError,
    _callbacks,
    _trainer_class,
    _training_arguments,
    check_labels,
    dataset_labels,
    make_accuracy_metric,
)
from .errors import UserError, require
from .io import atomic_output_dir, atomic_write, check_output_dir, clean_orphans, output_lock

__all__ = ["HEAD_NAMES", "ImageTransform", "LabelError", "TransformedImages", "add_train_arguments", "build_model",
           "check_labels", "dataset_labels", "head_weight_decay_groups", "image_stats", "load_image_dataset",
           "make_accuracy_metric", "run_train", "train"]

HEAD_NAMES = engine.HEAD_NAMES



def load_image_dataset(name_or_path: str, seed: int = 0, val_fraction: float = 0.1, progress: bool = True):
    """A ``DatasetDict`` with ``train`` and ``validation`` (and ``test`` if present) splits.

    ``name_or_path`` is a local ``imagefolder`` directory (``<split>/<class>/<image>``), a directory saved with
    ``save_to_disk``, or a Hub dataset id. Without a validation split, ``val_fraction`` of train is held out.
    """
    datasets = require("datasets", "train")
    path = Path(name_or_path)
    if not progress:
        datasets.disable_progress_bars()
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():  # local files: say so instead of datasets' default "Downloading data"
            config = datasets.DownloadConfig(download_desc="Indexing local image files", disable_tqdm=not progress)
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), download_config=config)
        else:
            ds = datasets.load_dataset(name_or_path)
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise UserError(f"cannot load dataset {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    if "validation" not in ds and "valid" in ds:
        ds["validation"] = ds.pop("valid")
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=val_fraction, seed=seed)
        ds["train"], ds["validation"] = split["train"], split["test"]
    return ds


def image_and_label_columns(ds, image_column: Optional[str] = None,
                            label_column: Optional[str] = None) -> tuple[str, str]:
    """Names of the image and label columns of a ``DatasetDict`` (the given ones, checked, or the usual names)."""
    features = ds["train"].features
    for option, name in (("--image_column", image_column), ("--label_column", label_column)):
        if name is not None and name not in features:
            raise LabelError(f"{option} {name!r} is not a column of the dataset (columns: {', '.join(features)})")
    image_col = image_column or next((c for c in ("image", "img", "pixel_values") if c in features), None)
    label_col = label_column or next((c for c in ("label", "labels", "fine_label") if c in features), None)
    if image_col is not None and label_col is None and list(features) == [image_col]:
        raise LabelError("the dataset has images but no labels: an imagefolder needs one folder per class and at "
                         "least two classes (SPLIT/CLASS/IMAGE)")
    missing = [kind for kind, col in (("image", image_col), ("label", label_col)) if col is None]
    if missing:
        raise LabelError(f"no {' / '.join(missing)} column among the dataset's columns ({', '.join(features)}): "
                         f"name it with {' and '.join(f'--{kind}_column' for kind in missing)}")
    return image_col, label_col


def check_classes(id2label: dict[int, str]) -> None:
    """A classifier needs at least two classes."""
    if len(id2label) < 2:
        raise LabelError(f"the dataset has {len(id2label)} class ({', '.join(id2label.values())}): a classifier "
                         "needs at least two (an imagefolder: one folder per class)")


@dataclass
class ImageTransform:
    """PIL image -> normalised ``[C, H, W]`` float tensor (resize, optional flip / random-resized-crop for train)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool = False

    def __call__(self, image: Any, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        if self.train and rng is not None:
            w, h = image.size
            scale = rng.uniform(0.8, 1.0)
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return engine.to_pixel_values(np.asarray(image), engine.Normalization(self.size, self.mean, self.std))


def image_stats(model_path: str, config: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation of a checkpoint (see ``engine.image_normalization``)."""
    norm = engine.image_normalization(model_path, config)
    return norm.size, norm.mean, norm.std


class TransformedImages(torch.utils.data.Dataset):
    """A ``datasets`` split seen as ``{"pixel_values", "labels"}`` items.

    Training augmentation is drawn from ``default_rng([seed, epoch, index])``, so a run resumed from a checkpoint
    sees exactly the images an uninterrupted run would (``epoch`` is set by the trainer's epoch callback).
    """

    #: splits up to this many images are decoded once and kept in memory (decoding dominates small-model epochs)
    CACHE_LIMIT = 20_000

    def __init__(self, split, transform: ImageTransform, image_col: str, label_col: str, seed: int = 0) -> None:
        self.split, self.transform = split, transform
        self.image_col, self.label_col, self.seed = image_col, label_col, seed
        self.epoch = 0
        self._rows = None
        if len(split) <= self.CACHE_LIMIT:
            self._rows = [(row[image_col].convert("RGB"), int(row[label_col])) for row in split]
        self._eval_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if self._rows is not None:
            image, label = self._rows[index]
        else:
            row = self.split[index]
            image, label = row[self.image_col], int(row[self.label_col])
        if not self.transform.train:  # deterministic: compute once
            if index not in self._eval_cache:
                self._eval_cache[index] = self.transform(image)
            return {"pixel_values": self._eval_cache[index], "labels": label}
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return {"pixel_values": self.transform(image, rng), "labels": label}


# ----- metric -------------------------------------------------------------------------------------
# ----- model and recipe (the engine's) ------------------------------------------------------------
def build_model(model_path: str, num_labels: int, id2label: dict[int, str], method: str, args: Any):
    """Base model with a fresh head for ``id2label``, prepared for ``method`` (ssf / head / full) by the engine."""
    if len(id2label) != num_labels:
        raise LabelError(f"id2label has {len(id2label)} entries for {num_labels} labels")
    ssf: dict[str, Any] = {}
    if method == "ssf":
        targets = args.target_modules.split(",") if getattr(args, "target_modules", None) else None
        ssf = {"target_modules": targets, "preset": None if targets else getattr(args, "preset", None),
               "skip_key_shift": getattr(args, "skip_key_shift", False)}
        if getattr(args, "paper_init", False) or getattr(args, "paper_recipe", False):
            method = "ssf_paper_init"
    try:
        return engine.build_model(method, model_path, id2label, seed=getattr(args, "seed", 0), **ssf)
    except OSError as exc:
        raise UserError(f"cannot load model {model_path!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:  # PEFT: target modules that match nothing, and the like
        if isinstance(exc, UserError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot apply {method} to {model_path!r}: {first} (see --target_modules / --preset)") \
            from exc


def head_weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups of the paper's recipe: weight decay on the head's weight matrix only."""
    return engine.param_groups(model, weight_decay)


# ----- the job ------------------------------------------------------------------------------------
def _save_outputs(model, args: argparse.Namespace, out: Path, save_preprocessor: Callable[[Path], None]
                  ) -> dict[str, str]:
    """Adapter (+ card, + labels.json) or full model, and the merged model, each with the image processor or
    tokenizer (``save_preprocessor``); the Hub push comes after, in ``finish_run``."""
    saved: dict[str, str] = {}
    final = out / ("adapter" if args.method == "ssf" else "model")
    with atomic_output_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if args.method == "ssf":
            from .hub import write_model_card

            write_model_card(model, tmp, args.push_to_hub)
        else:
            save_preprocessor(tmp)
    saved["saved_to"] = str(final)
    if args.method == "ssf" and args.save_merged:
        merged = model.merge_and_unload(safe_merge=True)
        with atomic_output_dir(out / "merged", overwrite=True) as tmp:
            merged.save_pretrained(tmp)
            save_preprocessor(tmp)
        saved["merged_to"] = str(out / "merged")
    return saved


def finish_run(summary: dict[str, Any], model, args: argparse.Namespace, out: Path,
               save_preprocessor: Callable[[Path], None]) -> dict[str, Any]:
    """The end of every ``train`` job (image and text): outputs, ``results.json``, and the Hub push last, so that
    everything local is safe whatever the network does."""
    summary.update(_save_outputs(model, args, out, save_preprocessor))
    atomic_write(out / "results.json", json.dumps(summary, indent=2) + "\n")
    if args.push_to_hub and args.method == "ssf":
        try:
            summary["hub_url"] = _push(out / "adapter", args)
        except UserError as exc:
            summary["hub_error"] = str(exc)
            atomic_write(out / "results.json", json.dumps(summary, indent=2) + "\n")
            raise UserError(f"{exc} (the run's outputs are safe in {out}; retry with `peft-ssf push --adapter "
                            f"{out / 'adapter'} --repo_id {args.push_to_hub}`)") from exc
        atomic_write(out / "results.json", json.dumps(summary, indent=2) + "\n")
    return summary


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: what a run writes into its output directory (removed by --overwrite_output_dir before a new run)
RUN_OUTPUTS = ("adapter", "model", "merged", "results.json", "runs")


def _checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` directories of ``out``, newest (largest N) first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint is complete when its trainer state (written last) parses and its weights are there."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((path / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors",
                                                "model.safetensors.index.json"))


def latest_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint of ``out``; incomplete newer ones (a run killed while saving) are removed."""
    for path in _checkpoints(out):
        if checkpoint_complete(path):
            return path
        print(f"note: removing incomplete checkpoint {path} (the run was stopped while saving it)")
        shutil.rmtree(path)
    raise UserError(f"no complete checkpoint in {out} to resume from; run without --resume_from_checkpoint")


def _clear_run(out: Path) -> None:
    """Remove an earlier run's outputs and checkpoints from ``out`` (``--overwrite_output_dir``)."""
    for path in [*(out / name for name in RUN_OUTPUTS), *_checkpoints(out)]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _push(folder: Path, args: argparse.Namespace) -> str:
    """Upload the saved adapter folder (adapter, card, labels) as it is on disk, within ``--push_timeout``."""
    from peft_ssf_cli.commands import run_with_timeout

    from .hub import upload_adapter_folder

    return str(run_with_timeout(lambda: upload_adapter_folder(folder, args.push_to_hub),
                                getattr(args, "push_timeout", 300.0), f"the upload to {args.push_to_hub}"))


def train(args: argparse.Namespace, stop_after_step: Optional[int] = None) -> dict[str, Any]:
    """Fine-tune and evaluate; save the adapter (and optionally the merged model). Returns a summary dict.

    The output directory is locked for the whole run (``peft_ssf.io.output_lock``).
    """
    out = Path(args.output_dir)
    if args.method != "ssf" and (args.save_merged or args.push_to_hub):
        raise UserError(f"--save_merged and --push_to_hub apply to SSF adapters; with --method {args.method} the "
                        f"trained model is saved to {out / 'model'}")
    if not args.resume_from_checkpoint:
        check_output_dir(out, args.overwrite_output_dir)
    engine.check_model_path(args.model)
    with output_lock(out), _cpu_threads(getattr(args, "threads", None)):
        return _train_locked(args, out, stop_after_step)


@contextlib.contextmanager
def _cpu_threads(threads: Optional[int]) -> Iterator[None]:
    """``--threads`` for the run (image and text jobs) on CPU; the caller's thread count is restored afterwards."""
    previous = torch.get_num_threads()
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_locked(args: argparse.Namespace, out: Path, stop_after_step: Optional[int]) -> dict[str, Any]:
    from transformers import AutoConfig, set_seed

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    set_seed(args.seed)
    ds = load_image_dataset(args.dataset, seed=args.seed, progress=not args.no_progress)
    from .engine import text  # a text column and no image column: sequence classification (engine/text.py)

    if text.is_text_dataset(ds):
        return text.train_text(args, ds, stop_after_step, finish=finish_run)
    image_col, label_col = image_and_label_columns(ds, getattr(args, "image_column", None),
                                                   getattr(args, "label_column", None))
    if args.max_train_samples:
        ds["train"] = ds["train"].select(range(min(args.max_train_samples, len(ds["train"]))))
    id2label = dataset_labels(ds, label_col)
    check_classes(id2label)
    check_labels(ds, label_col, len(id2label))
    try:
        norm = engine.image_normalization(args.model, AutoConfig.from_pretrained(args.model))
    except OSError as exc:
        raise UserError(f"cannot load model {args.model!r}: {str(exc).splitlines()[0]}") from exc
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = str(latest_checkpoint(out))
    elif resume and not checkpoint_complete(Path(resume)):
        raise UserError(f"{resume} is not a complete checkpoint (no trainer_state.json or weights)")
    if out.is_dir():
        clean_orphans(out)
        if not resume and args.overwrite_output_dir:
            _clear_run(out)
    model = build_model(args.model, len(id2label), id2label, args.method, args)
    transform = ImageTransform(norm.size, norm.mean, norm.std)
    train_set = TransformedImages(ds["train"], ImageTransform(norm.size, norm.mean, norm.std, train=args.augment),
                                  image_col, label_col, args.seed)
    eval_sets = {k: TransformedImages(ds[k], transform, image_col, label_col) for k in ds if k != "train"}
    compute_metrics, metric_backend = make_accuracy_metric(args.metric_backend)
    trainer = _trainer_class()(model=model, args=_training_arguments(args, out), train_dataset=train_set,
                               eval_dataset=eval_sets["validation"], compute_metrics=compute_metrics,
                               callbacks=_callbacks(train_set, stop_after_step))
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    summary: dict[str, Any] = {
        "method": args.method, "trainable_params": engine.count_trainable(model)[0],
        "train_seconds": round(time.time() - start, 1), "metric_backend": metric_backend,
        "global_step": trainer.state.global_step, "num_labels": len(id2label), "base_model": args.model,
        "threads": torch.get_num_threads(),
    }
    if stop_after_step is not None and trainer.state.global_step < trainer.state.max_steps:
        return {**summary, "stopped_early": True}
    summary["val_accuracy"] = trainer.evaluate().get("eval_accuracy")
    if "test" in ds:
        summary["test_accuracy"] = trainer.evaluate(eval_sets["test"], metric_key_prefix="test").get("test_accuracy")
    return finish_run(summary, model, args, out, lambda folder: engine.save_image_processor(folder, args.model, norm))


def run_train(args: argparse.Namespace) -> int:
    """Run a training job described by ``args`` (see ``add_train_arguments``); returns an exit code."""
    print(json.dumps(train(args), indent=2))
    return 0
