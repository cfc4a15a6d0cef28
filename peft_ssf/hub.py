"""Hub-ready SSF adapters: our model card, and a ``push_to_hub`` that makes sure that card is what lands.

``PeftModel.push_to_hub`` comes from transformers' ``PushToHubMixin``, which (in transformers 5.x) saves the adapter
and then replaces PEFT's README with a generic transformers card. For SSF adapters we route ``push_to_hub`` to
``push_adapter_to_hub``, which takes exactly the arguments of transformers' method: save with ``save_pretrained``,
write the card from ``model_card``, upload the folder. Other PEFT methods keep the original behaviour.

The card never records a path of the user's machine: ``base_model`` is the base's Hub id when it is known to be one
(the push asks the Hub; offline, the local Hub cache must have it) and is left out otherwise, so a relative path
such as ``models/vit-secret`` is never published; the adapter_config.json saved next to the card gets the same
treatment. The card's config block is that saved file, verbatim. ``labels.json`` beside it keeps the head's class
names (``save_labels``), which the apps restore when they rebuild a model from the adapter.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import HfApi

LIBRARY_TAGS = ("ssf", "peft-ssf")
#: file next to adapter_config.json with the head's class names: {"id2label": {"0": name, ...}, "label2id": {...}}
LABELS_FILE = "labels.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id``'s config.json is in the local Hub cache (it was downloaded from the Hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even look up is no Hub id we know
        return False


def hub_base_model(name_or_path: Optional[str], on_hub: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """``name_or_path`` if it is a Hub repository id, else None (empty, a path on this machine, or unknown).

    ``models/vit-secret`` looks like ``org/name`` but may be a relative path from another directory: a name that
    is not a local path counts as a Hub id only when ``on_hub(name)`` says so (the push asks the Hub) or, without
    ``on_hub``, when the local Hub cache has it (it was downloaded from the Hub). Nothing else is published.
    """
    if not name_or_path or Path(name_or_path).expanduser().exists() or not _REPO_ID.match(name_or_path):
        return None
    if on_hub is not None:
        try:
            return name_or_path if on_hub(name_or_path) else None
        except Exception:  # noqa: BLE001 - no answer: fall back to the cache
            pass
    return name_or_path if _in_hub_cache(name_or_path) else None


def _default_labels(id2label: dict[int, str]) -> bool:
    return all(name == f"LABEL_{i}" for i, name in id2label.items())


def save_labels(model: Any, directory: Union[str, Path]) -> Optional[Path]:
    """Write the class names of `model`'s head (a PeftModel or a transformers model) to ``directory/labels.json``.

    Nothing is written for a model without a classification config or with transformers' placeholder names
    (``LABEL_i``). Returns the file written, if any.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    id2label = getattr(getattr(base, "config", None), "id2label", None)
    if not id2label or _default_labels({int(k): v for k, v in id2label.items()}):
        return None
    id2label = {int(k): str(v) for k, v in id2label.items()}
    content = {"id2label": {str(k): v for k, v in sorted(id2label.items())},
               "label2id": {v: k for k, v in sorted(id2label.items())}}
    path = Path(directory) / LABELS_FILE
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def _ssf_configs(peft_model: Any) -> dict[str, Any]:
    from .config import SSFConfig

    return {name: cfg for name, cfg in peft_model.peft_config.items() if isinstance(cfg, SSFConfig)}


#: architecture suffix -> (Auto class of the load snippet, pipeline tag); text entries added for text models
_TASKS = (
    ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
)


def _architectures(peft_model: Any) -> list[str]:
    base = peft_model.get_base_model()
    return [type(base).__name__, *(getattr(getattr(base, "config", None), "architectures", None) or [])]


def _auto_class(peft_model: Any) -> str:
    archs = _architectures(peft_model)
    for suffix, auto, _ in _TASKS:
        if archs[0].endswith(suffix):
            return auto
    return "AutoModelForImageClassification" if _is_vision(peft_model) else "AutoModel"


def _is_vision(peft_model: Any) -> bool:
    config = getattr(peft_model.get_base_model(), "config", None)
    return hasattr(config, "image_size") or hasattr(config, "num_channels")


def _pipeline_tag(peft_model: Any) -> Optional[str]:
    archs = _architectures(peft_model)
    for suffix, _, tag in _TASKS:
        if any(a.endswith(suffix) for a in archs):
            return tag
    if any(a.endswith("Model") for a in archs):
        return "image-feature-extraction" if _is_vision(peft_model) else "feature-extraction"
    return None


def _saved_config(peft_model: Any, adapter_name: str, on_hub: Optional[Callable[[str], bool]] = None
                  ) -> dict[str, Any]:
    """The adapter_config.json ``save_pretrained`` writes for ``adapter_name`` (with a Hub-safe base model)."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        folder = Path(tmp) if adapter_name == "default" else Path(tmp) / adapter_name
        return _hub_safe_config(folder / "adapter_config.json", on_hub)


def _hub_safe_config(path: Path, on_hub: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
    """Read a saved adapter_config.json, drop a base that is not a Hub id (``hub_base_model``), write it back."""
    cfg = json.loads(path.read_text())
    safe = hub_base_model(cfg.get("base_model_name_or_path"), on_hub)
    if safe != cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = safe
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return cfg


def _counts(peft_model: Any, adapter_name: str) -> tuple[int, int, int]:
    """(SSF scale + shift parameters, trainable parameters incl. modules_to_save, frozen base parameters)."""
    named = list(peft_model.named_parameters())
    ssf = sum(p.numel() for n, p in named if ".ssf_" in n and n.endswith(f".{adapter_name}"))
    trainable = sum(p.numel() for n, p in named
                    if n.endswith(f".{adapter_name}") or f".modules_to_save.{adapter_name}." in n)
    backbone = sum(p.numel() for n, p in peft_model.get_base_model().named_parameters()
                   if ".ssf_" not in n and ".modules_to_save." not in n)
    return ssf, trainable, backbone


def _front_matter(peft_model: Any, base: Optional[str], tags: tuple[str, ...]) -> str:
    pipeline = _pipeline_tag(peft_model)
    all_tags = {*LIBRARY_TAGS, "peft", *tags, *(["image-classification"] if pipeline == "image-classification"
                                                 else [])}
    if base:
        all_tags.add("base_model:adapter:" + base)
    lines = ["---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags:"]
    lines += [f"- {t}" for t in sorted(all_tags)]
    lines += [f"pipeline_tag: {pipeline}"] if pipeline else []
    return "\n".join([*lines, "---"])


def _load_snippet(base: Optional[str], name: str, auto: str = "AutoModelForImageClassification") -> str:
    """Valid Python (tests compile it) whether or not the base is known."""
    comment = "" if base else "  # the model this adapter was trained on"
    return f"""```python
import peft_ssf  # registers the SSF method with PEFT: needed before loading
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained({json.dumps(base or "BASE_MODEL_ID_OR_PATH")}){comment}
model = PeftModel.from_pretrained(base, {json.dumps(name)})
```"""


def adapted_modules(peft_model: Any, adapter_name: str = "default") -> int:
    """How many modules of the model carry this adapter's SSF scale / shift (not how many name patterns)."""
    from .layer import SSFLayer

    return sum(1 for m in peft_model.modules()
               if isinstance(m, SSFLayer) and (adapter_name in m.ssf_scale or adapter_name in m.ssf_shift))


def model_card(peft_model: Any, adapter_name: str = "default", repo_id: Optional[str] = None,
               adapter_config: Optional[dict[str, Any]] = None, tags: tuple[str, ...] = (),
               on_hub: Optional[Callable[[str], bool]] = None) -> str:
    """The README.md (YAML front matter + body) of an SSF adapter: config, parameter counts, load and merge code.

    ``adapter_config`` is the saved adapter_config.json the card describes (default: what ``save_pretrained``
    would write now); it is shown verbatim, and its base model, if a Hub id, becomes the card's ``base_model``.
    """
    import peft
    import transformers

    from . import __version__

    cfg = adapter_config if adapter_config is not None else _saved_config(peft_model, adapter_name, on_hub)
    base = hub_base_model(cfg.get("base_model_name_or_path"), on_hub)
    ssf_params, trainable, backbone = _counts(peft_model, adapter_name)
    n_modules = adapted_modules(peft_model, adapter_name)
    return f"""{_front_matter(peft_model, base, tags)}

# SSF adapter{f" for `{base}`" if base else ""}

This is an [SSF](https://arxiv.org/abs/2210.08823) ("Scaling & Shifting Your Features") adapter trained with
[peft-ssf](https://pypi.org/project/peft-ssf/): a learnable per-channel scale and shift after
{n_modules} modules of the frozen base model.

| | parameters |
|---|---|
| SSF scale + shift | {ssf_params:,} |
| trainable in total (incl. `modules_to_save`) | {trainable:,} |
| frozen base model | {backbone:,} |

## Load

{_load_snippet(base, repo_id or "path/to/this/adapter", _auto_class(peft_model))}

If the adapter has a new classification head, load the base with `num_labels=...` and
`ignore_mismatched_sizes=True`.

## Merge for deployment

SSF folds into the weights: the merged model is the original architecture with zero overhead and loads with
transformers alone.

```python
merged = model.merge_and_unload()
merged.save_pretrained("deploy")
```

## SSF config (adapter_config.json)

```json
{json.dumps(cfg, indent=2, sort_keys=True)}
```

### Framework versions

- peft-ssf {__version__}
- PEFT {peft.__version__}
- transformers {transformers.__version__}
"""


def write_model_card(peft_model: Any, directory: Union[str, Path], repo_id: Optional[str] = None,
                     tags: tuple[str, ...] = (), on_hub: Optional[Callable[[str], bool]] = None) -> Path:
    """Write our card as ``directory/README.md`` for the adapter ``save_pretrained`` just wrote there.

    Replaces PEFT's generic card, drops a machine path from that directory's adapter_config.json, and saves the
    head's class names beside it (``save_labels``) so a merged or reloaded model keeps them.
    """
    save_labels(peft_model, directory)
    adapter = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else "default"
    cfg = _hub_safe_config(Path(directory) / "adapter_config.json", on_hub)
    path = Path(directory) / "README.md"
    path.write_text(model_card(peft_model, adapter, repo_id, adapter_config=cfg, tags=tags, on_hub=on_hub))
    return path


def push_adapter_to_hub(
    peft_model: Any,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    max_shard_size: Union[int, str, None] = "50GB",
    tags: Optional[list[str]] = None,
) -> Any:
    """Upload adapter_config.json, adapter_model.safetensors, labels.json and our README.md to ``repo_id``.

    The arguments are those of transformers' ``PushToHubMixin.push_to_hub`` with the same meaning (``token=True``:
    the token of ``hf auth login``; ``revision``: a branch, created if missing; ``create_pr``: open a pull request).
    ``max_shard_size`` is accepted for compatibility: an adapter is always one file.
    """
    del max_shard_size

    def on_hub(name: str) -> bool:  # we are online anyway: ask the Hub whether the base is a Hub model
        return HfApi().repo_exists(name, token=token)

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        write_model_card(peft_model, tmp, repo_id, tags=tuple(tags or ()), on_hub=on_hub)
        return upload_adapter_folder(tmp, repo_id, commit_message=commit_message,
                                     commit_description=commit_description, private=private, token=token,
                                     revision=revision, create_pr=create_pr)


def upload_adapter_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
) -> Any:
    """Upload an adapter folder as saved (adapter files, our card, labels.json) to ``repo_id``; the commit URL."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        token=token,
        commit_message=commit_message or "Upload SSF adapter",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def install_push_to_hub() -> None:
    """Make ``PeftModel.push_to_hub`` use ``push_adapter_to_hub`` for SSF adapters (idempotent)."""
    from peft import PeftModel

    original = PeftModel.push_to_hub
    if getattr(original, "_peft_ssf", False):
        return

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        if _ssf_configs(self):
            if args:  # transformers' signature is keyword-only after repo_id: fail the same way
                raise TypeError(f"push_to_hub() takes 1 positional argument after self but {1 + len(args)} were "
                                "given; pass commit_message=..., private=..., token=... by keyword")
            return push_adapter_to_hub(self, repo_id, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    push_to_hub.__doc__ = original.__doc__
    push_to_hub._peft_ssf = True
    PeftModel.push_to_hub = push_to_hub
