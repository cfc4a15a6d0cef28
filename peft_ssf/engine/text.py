"""The text half of ``peft-ssf train``: sequence classification on a ``datasets`` text dataset.

``peft_ssf.train.train`` hands a dataset over when it has a text column and no image column. The job is the image
job's, with a tokenizer instead of an image processor: the tokenizer comes from the model (``AutoTokenizer``), the
labels from the dataset (its ``ClassLabel`` names, else the label values), the head is sized for them; training,
progress, checkpoints, the adapter's model card and the merged model are the same as for images. The merged model
is saved with its tokenizer and serves with ``pipeline("text-classification")``.
"""

from __future__ import annotations

import argparse
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

#: column names read as the input text (first found), and a second one for sentence-pair datasets
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "question", "sentence1", "premise")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question": "sentence"}
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")
#: attribute names of sequence-classification heads in transformers (BERT: classifier, LLaMA / GPT-2: score)
TEXT_HEAD_NAMES = ("classifier", "score", "head")
#: tokens per example unless the tokenizer allows fewer
MAX_LENGTH = 256


def text_columns(ds) -> Optional[tuple[str, Optional[str]]]:
    """``(text column, pair column or None)`` of a ``DatasetDict`` with string inputs, else None."""
    features = ds["train"].features
    if any(c in features for c in ("image", "img", "pixel_values")):
        return None
    for col in TEXT_COLUMNS:
        feature = features.get(col)
        if feature is not None and getattr(feature, "dtype", None) in ("string", "large_string"):
            pair = PAIR_COLUMNS.get(col)
            return col, (pair if pair in features else None)
    return None


def is_text_dataset(ds) -> bool:
    """True when ``peft-ssf train`` should take the text path for ``ds``."""
    return text_columns(ds) is not None


def label_column(ds) -> str:
    from .trainer import LabelError

    features = ds["train"].features
    col = next((c for c in LABEL_COLUMNS if c in features), None)
    if col is None:
        raise LabelError(f"cannot find a label column ({', '.join(LABEL_COLUMNS)}) in the dataset's features "
                         f"{list(features)}")
    return col


def text_head_name(model: nn.Module) -> str:
    for name in TEXT_HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(TEXT_HEAD_NAMES)}")


def load_tokenizer(model_path: str):
    """The model's tokenizer, with a padding token (decoders such as LLaMA / GPT-2 ship none: use EOS)."""
    from transformers import AutoTokenizer

    from ..errors import UserError

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer for {model_path!r}: {str(exc).splitlines()[0]}; a text model "
                        "needs its tokenizer saved next to it (tokenizer.save_pretrained)") from exc
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers builds an empty one when none is saved
        raise UserError(f"cannot load a tokenizer for {model_path!r}: it has no vocabulary (no tokenizer files "
                        "there?); a text model needs its tokenizer saved next to it (tokenizer.save_pretrained)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {model_path!r} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_text_classifier(model_path: str, id2label: dict[int, str], method: str, args: Any, pad_token_id: int):
    """``AutoModelForSequenceClassification`` with a head for ``id2label``, prepared for ``method``."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ..errors import UserError
    from .methods import peft_config, train_only

    labels = {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(id2label), ignore_mismatched_sizes=True, **labels
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {model_path!r}: {str(exc).splitlines()[0]}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # decoders pool the last non-padding token
    head = text_head_name(model)
    if method == "ssf":
        targets = args.target_modules.split(",") if getattr(args, "target_modules", None) else None
        options = {"target_modules": targets, "preset": None if targets else getattr(args, "preset", None),
                   "skip_key_shift": getattr(args, "skip_key_shift", False),
                   "task_type": "SEQ_CLS"}  # AutoPeftModelForSequenceClassification loads the adapter
        if getattr(args, "bias_free_sites", None):  # for a CLI that exposes it
            options["bias_free_sites"] = args.bias_free_sites
        paper = getattr(args, "paper_init", False) or getattr(args, "paper_recipe", False)
        config = peft_config("ssf_paper_init" if paper else "ssf", model.config.model_type, head, **options)
        return get_peft_model(model, config)
    return train_only(model, method, head)


def tokenize(ds, tokenizer, text_col: str, pair_col: Optional[str], label_col: str):
    """Token ids + ``labels`` for every split; the other columns are dropped (the collator pads per batch)."""
    max_length = min(int(tokenizer.model_max_length or MAX_LENGTH), MAX_LENGTH)

    def encode(batch):
        pair = batch[pair_col] if pair_col else None
        enc = tokenizer(batch[text_col], pair, truncation=True, max_length=max_length)
        enc["labels"] = batch[label_col]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds["train"].column_names, desc="Tokenizing")


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the (base) model's forward takes the keyword ``name``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def train_text(args: argparse.Namespace, ds, stop_after_step: Optional[int] = None, *,
               finish: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Fine-tune a sequence classifier on the text dataset ``ds``; ``finish`` (``peft_ssf.train.finish_run``, passed in
    so the two jobs do not import each other) writes the image job's outputs with the tokenizer, and pushes last."""
    from transformers import DataCollatorWithPadding

    from .methods import count_trainable
    from .trainer import (
        _callbacks,
        _trainer_class,
        _training_arguments,
        check_labels,
        dataset_labels,
        make_accuracy_metric,
    )

    out = Path(args.output_dir)
    text_col, pair_col = text_columns(ds)
    label_col = label_column(ds)
    if args.max_train_samples:
        ds["train"] = ds["train"].select(range(min(args.max_train_samples, len(ds["train"]))))
    id2label = dataset_labels(ds, label_col)
    check_labels(ds, label_col, len(id2label))
    tokenizer = load_tokenizer(args.model)
    model = build_text_classifier(args.model, id2label, args.method, args, tokenizer.pad_token_id)
    encoded = tokenize(ds, tokenizer, text_col, pair_col, label_col)
    unused = [c for c in encoded["train"].column_names if c != "labels" and not _accepts(model, c)]
    if unused:  # e.g. token_type_ids for a model that takes none
        encoded = encoded.remove_columns(unused)
    compute_metrics, metric_backend = make_accuracy_metric(args.metric_backend)
    epoch_holder = types.SimpleNamespace(epoch=0)  # text has no augmentation epoch; the callback wants one
    trainer = _trainer_class()(model=model, args=_training_arguments(args, out), train_dataset=encoded["train"],
                               eval_dataset=encoded["validation"], compute_metrics=compute_metrics,
                               data_collator=DataCollatorWithPadding(tokenizer),
                               callbacks=_callbacks(epoch_holder, stop_after_step))
    start = time.time()
    trainer.train(resume_from_checkpoint=True if args.resume_from_checkpoint == "latest"
                  else args.resume_from_checkpoint)
    summary: dict[str, Any] = {
        "method": args.method, "trainable_params": count_trainable(model)[0],
        "train_seconds": round(time.time() - start, 1), "metric_backend": metric_backend,
        "global_step": trainer.state.global_step, "num_labels": len(id2label), "base_model": args.model,
        "task": "text-classification", "text_column": text_col,
    }
    if stop_after_step is not None and trainer.state.global_step < trainer.state.max_steps:
        return {**summary, "stopped_early": True}
    summary["val_accuracy"] = trainer.evaluate().get("eval_accuracy")
    if "test" in encoded:
        summary["test_accuracy"] = trainer.evaluate(encoded["test"], metric_key_prefix="test").get("test_accuracy")
    return finish(summary, model, args, out, tokenizer.save_pretrained)
