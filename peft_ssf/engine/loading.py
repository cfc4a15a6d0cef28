"""The one loader of saved models: a transformers checkpoint, or a PEFT adapter directory on top of its base.

``load_model(path)`` is what the apps call: a directory with ``adapter_config.json`` is an adapter (of any PEFT
method, SSF included), anything else a transformers checkpoint (directory or Hub id). An adapter whose
``modules_to_save`` head has another size than the base's gets a base with a head of that size, so adapters
trained on a new label set load without mismatch errors (``AutoPeftModel`` cannot do that: it loads the base
as saved).

The class names of an adapter's head (``id2label`` / ``label2id``) are not part of PEFT's adapter files, so the apps
save them next to ``adapter_config.json`` as ``labels.json`` (``save_labels``) and every model rebuilt from an
adapter gets them back (``load_adapter``; ``peft-ssf merge`` then writes them into the merged ``config.json``, so
transformers' pipeline prints the real class names instead of ``LABEL_0``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..errors import UserError
from ..hub import LABELS_FILE
from .methods import HEAD_NAMES, load_classifier

PathLike = Union[str, Path]



class AdapterLoadError(UserError, ValueError):
    """An adapter directory cannot be loaded as asked (missing files, no base model); the message says what to do."""


def load_pretrained(path: PathLike, id2label: Optional[dict[int, str]] = None) -> nn.Module:
    """A transformers checkpoint: its image-classification class when it has one (or ``id2label`` is given),
    else the bare ``AutoModel``."""
    from transformers import AutoConfig, AutoModel

    archs = getattr(AutoConfig.from_pretrained(str(path)), "architectures", None) or []
    if id2label is not None or any(a.endswith("ForImageClassification") for a in archs):
        return load_classifier(path, id2label)
    return AutoModel.from_pretrained(str(path))


#: output layers of text classification heads (RoBERTa: a head module with its own ``out_proj``; decoders: ``score``)
_TEXT_HEADS = ("classifier.out_proj", "score")

#: PEFT task types of text adapters -> the transformers auto class their base model is loaded with
TEXT_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def adapter_task_type(adapter_dir: PathLike) -> Optional[str]:
    """The PEFT ``task_type`` recorded in an adapter's config (``SEQ_CLS``, ``CAUSAL_LM``, ...; None for images)."""
    from ..config import read_config_file

    task = read_config_file(Path(adapter_dir) / "adapter_config.json").get("task_type")
    return task if isinstance(task, str) else None


def load_text_model(path: PathLike, task_type: str, id2label: Optional[dict[int, str]] = None) -> nn.Module:
    """The base of a text adapter with the auto class of its ``task_type``; a classifier gets ``id2label``'s size
    (a new head when the checkpoint's differs: the adapter brings its trained head)."""
    import transformers

    auto = getattr(transformers, TEXT_TASK_CLASSES[task_type])
    if task_type != "SEQ_CLS" or id2label is None:
        return auto.from_pretrained(str(path))
    labels = {"num_labels": len(id2label), "id2label": dict(id2label),
              "label2id": {v: k for k, v in id2label.items()}}
    return auto.from_pretrained(str(path), ignore_mismatched_sizes=True, **labels)


def adapter_head_size(adapter_dir: PathLike) -> Optional[int]:
    """Number of classes of a ``modules_to_save`` classifier head stored in an adapter, if it has one."""
    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118  (safe_open is not iterable)
            shape = fh.get_slice(key).get_shape()
            if any(key.endswith(f"{h}.weight") for h in (*HEAD_NAMES, *_TEXT_HEADS)) and len(shape) == 2:
                return int(shape[0])
    return None


def read_labels(adapter_dir: PathLike) -> Optional[dict[int, str]]:
    """``id2label`` stored with an adapter by ``save_labels`` (None when the adapter has none)."""
    path = Path(adapter_dir) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())["id2label"]
        return {int(k): str(v) for k, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterLoadError(f"{path} is not a labels file of peft-ssf ({exc}); delete it or fix it") from exc


def apply_labels(model: nn.Module, id2label: Optional[dict[int, str]]) -> nn.Module:
    """Give ``model``'s config the class names ``id2label`` when they fit its head (same number of classes)."""
    config = getattr(model, "config", None)
    if id2label and config is not None and getattr(config, "num_labels", None) == len(id2label):
        config.id2label = dict(id2label)
        config.label2id = {v: k for k, v in id2label.items()}
    return model


def check_model_path(name_or_path: PathLike, what: str = "model") -> None:
    """Fail with a clear message for a local path that does not exist (instead of the Hub's "Repo id must be ...").

    A name is taken for a local path when it is absolute, starts with ``.`` or ``~``, has more than one ``/``, or
    its parent directory exists here; ``org/name`` with no such parent is left to the Hub.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        check_regular_files(path)
        return
    parent = path.parent
    looks_local = (text.startswith((".", "~", os.sep)) or path.is_absolute() or text.count("/") > 1
                   or "\\" in text or (str(parent) not in ("", ".") and parent.is_dir()))
    if looks_local:
        raise UserError(f"{what} {text!r} does not exist (no such directory from {Path.cwd()}); check the path")


def check_regular_files(directory: PathLike) -> None:
    """Refuse a model or adapter directory with a FIFO, socket or device in place of a file: reading one blocks
    (a FIFO forever, not even Ctrl-C interrupts ``safe_open``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise AdapterLoadError(f"{entry} is not a regular file (a FIFO, socket or device); replace it with the "
                                   "real file")


_SIZE_MISMATCH = re.compile(r"size mismatch for (?P<name>\S+): copying a param with shape (?P<saved>[^\n]*?) from "
                            r"checkpoint, the shape in current model is (?P<model>[^\n]*?)\.?$", re.M)


def _load_error(exc: Exception, adapter_dir: Path, base_path: str) -> AdapterLoadError:
    """A one-line ``AdapterLoadError`` for an adapter that does not load onto ``base_path``."""
    text = str(exc)
    mismatches = list(_SIZE_MISMATCH.finditer(text))
    if mismatches:
        first = mismatches[0]
        return AdapterLoadError(
            f"the adapter {adapter_dir} does not fit the base model {base_path!r}: first mismatching layer "
            f"{first['name']}: adapter {first['saved']}, base {first['model']} ({len(mismatches)} mismatching "
            "tensors); pass the base it was trained on (--base)")
    first_line = (text.strip().splitlines() or [type(exc).__name__])[0]
    if any(hint in text for hint in ("not found in the base model", "Target module", "match no module")):
        return AdapterLoadError(f"the adapter {adapter_dir} does not fit the base model {base_path!r} ({first_line}); "
                                "pass the base it was trained on (--base)")
    return AdapterLoadError(f"cannot load the adapter {adapter_dir} ({type(exc).__name__}: {first_line}); is "
                            "adapter_model.safetensors complete? Save or download it again")


def resolve_base(adapter_dir: Path, base: Optional[PathLike] = None) -> str:
    """The base model to load: ``base`` if given, else the one the adapter config records (a path or Hub id)."""
    if base:
        return str(base)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise AdapterLoadError(f"{adapter_dir} has no adapter_config.json: is it a directory written by "
                               "save_pretrained?")
    from ..config import read_config_file  # a malformed file gets a UserError naming it (issue 25 item 12)

    recorded = read_config_file(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path")
    if not recorded:
        raise AdapterLoadError(f"{adapter_dir}/adapter_config.json records no base model: pass --base PATH_OR_ID")
    beside = Path(adapter_dir) / recorded
    return str(beside) if not Path(recorded).exists() and beside.is_dir() else recorded


def load_adapter(adapter: PathLike, base: Optional[PathLike] = None, merge: bool = False) -> nn.Module:
    """Base model + adapter from ``adapter`` (a ``save_pretrained`` directory), in eval mode.

    ``base`` defaults to the base recorded in the adapter config. ``merge=True`` folds the adapter into the base
    (``merge_and_unload``) and returns the plain transformers model. Raises ``AdapterLoadError`` with a one-line
    reason when the directory or its base model cannot be found.
    """
    from peft import PeftModel  # (SSF is registered: importing peft_ssf, which holds this module, did that)
    from transformers import AutoConfig

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterLoadError(f"{adapter_dir} has no adapter_config.json: is it a directory written by "
                               "save_pretrained?")
    check_regular_files(adapter_dir)
    base_path = resolve_base(adapter_dir, base)
    check_model_path(base_path, "base model")
    try:
        head = adapter_head_size(adapter_dir)
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError for a corrupted file
        raise _load_error(exc, adapter_dir, base_path) from exc
    labels = read_labels(adapter_dir)
    try:
        same_head = head is None or AutoConfig.from_pretrained(base_path).num_labels == head
        new_labels = labels if labels and len(labels) == head else {i: f"LABEL_{i}" for i in range(head or 0)}
        task = adapter_task_type(adapter_dir)
        if task in TEXT_TASK_CLASSES:
            model = apply_labels(load_text_model(base_path, task, None if same_head else new_labels), labels)
        else:
            model = apply_labels(load_pretrained(base_path, None if same_head else new_labels), labels)
    except OSError as exc:
        raise AdapterLoadError(f"cannot load the base model {base_path!r} of {adapter_dir} "
                               f"({str(exc).splitlines()[0]}); pass --base PATH_OR_ID") from exc
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise _load_error(exc, adapter_dir, base_path) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _load_error(exc, adapter_dir, base_path) from exc
    return (peft_model.merge_and_unload() if merge else peft_model).eval()


def load_model(path: PathLike, base: Optional[PathLike] = None, merge: bool = False) -> nn.Module:
    """A saved model in eval mode: an adapter directory (see ``load_adapter``) or a transformers checkpoint."""
    check_model_path(path)
    if (Path(path) / "adapter_config.json").is_file():
        return load_adapter(path, base, merge)
    return load_pretrained(path).eval()
