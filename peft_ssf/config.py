"""SSFConfig: what to adapt with a per-channel scale and shift, and how to initialise it."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .errors import UserError

InitWeights = Union[bool, Literal["paper"]]

_VALID_BIAS_FREE = ("scale_only", "error", "add_bias")

#: fields that must be JSON booleans (``"false"`` is a non-empty string, so it would read as True)
_BOOL_FIELDS = ("skip_key_shift", "allow_unmergeable", "inference_mode")

#: switches of the training op: set per run (``SSFConfig(fused=False)`` or ``config.runtime_config``), never saved
_RUNTIME_FIELDS = ("fused", "pair_residuals")

#: longest adapter name accepted (PEFT has no limit; names become folder names and state-dict key parts)
MAX_ADAPTER_NAME_LEN = 100


class AdapterFileError(UserError, ValueError):
    """An adapter's ``adapter_config.json`` or weights file is malformed or holds something it must not."""


def check_adapter_name(name: object) -> None:
    """Refuse adapter names that are unsafe as a folder name or a state-dict key part, before anything is written.

    ``save_pretrained`` writes every adapter but the default one to ``<dir>/<name>``: a name with a path separator or
    ``..`` writes outside ``<dir>`` (an absolute name replaces files elsewhere), and a very long one fails half-way
    through the save. PyTorch also refuses ``.`` in parameter names.
    """
    if not isinstance(name, str):
        raise TypeError(f"An adapter name must be a string, got {type(name).__name__} {name!r}.")
    problem = None
    if not name.strip():
        problem = "is empty"
    elif len(name) > MAX_ADAPTER_NAME_LEN:
        problem = f"has {len(name)} characters (at most {MAX_ADAPTER_NAME_LEN})"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif "." in name:
        problem = "contains '.' (it would be a path component '..' or break state-dict keys)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    if problem is not None:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise ValueError(
            f"Invalid adapter name {shown!r}: it {problem}. save_pretrained writes each adapter to a folder of that "
            "name, so use a short plain name such as 'default' or 'task_a' (letters, digits, '_' and '-')."
        )


@dataclass
class SSFRuntimeConfig:
    """How SSF trains in this process, as PEFT's ``LoraRuntimeConfig``: not written to ``adapter_config.json``.

    They change neither what the adapter learns (the same gradients up to rounding) nor what the file must hold, so
    an adapter trained with one setting loads and trains with the other. ``SSFConfig(fused=..., pair_residuals=...)``
    sets them; adapters saved by 0.1.0, whose config file holds both keys, still load (with those values).

    Attributes:
        fused: use the memory-saving training ops (same gradients as the naive ``x * scale + shift``, see ``ops.py``);
            ``False`` is the naive op, the reference every test compares with.
        pair_residuals: with ``fused``, let sites whose output feeds a residual add rebuild it from the add's operands
            in backward instead of keeping it (see ``residual.py``). It switches itself off under activation
            checkpointing and other ``saved_tensors_hooks``. Turn it off for models that modify their residual stream
            in place.
    """

    fused: bool = True
    pair_residuals: bool = True

    def __post_init__(self) -> None:
        for name in _RUNTIME_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(
                    f"SSFConfig field {name!r} must be true or false (a boolean, not a string or number), got "
                    f"{type(value).__name__} {value!r}."
                )


@dataclass
class SSFConfig(PeftConfig):
    """Configuration of an SSF adapter (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022).

    SSF inserts ``y = scale * x + shift`` after every targeted op, with one ``scale`` and one ``shift`` entry per
    output channel of that op. Both fold into the op's weights at merge time, so the merged model is the original
    architecture.

    Args:
        target_modules: module names (suffix match), a list of them, or a regex (full match). ``None`` uses the
            preset named by ``preset`` for the model's ``model_type`` (see ``peft_ssf.presets``).
        preset: ``"paper"`` (the official SSF placement, default) or ``"all"`` (every supported op of the
            backbone). Only used when ``target_modules`` is ``None``.
        exclude_modules: module names / regex that must not be adapted.
        layers_to_transform / layers_pattern: restrict adaptation to some layer indices (PEFT semantics).
        modules_to_save: extra modules trained fully and saved with the adapter (e.g. ``["classifier"]``). Frozen
            BatchNorms run on their stored statistics during training (updates would not be saved); a BatchNorm
            listed here is trained and saved with its statistics.
        init_weights: ``True`` (default) starts at the identity (scale 1, shift 0) so a fresh adapter leaves the
            model unchanged; ``"paper"`` draws scale ~ N(1, 0.02) and shift ~ N(0, 0.02) as the official code does;
            ``False`` draws a clearly non-identity adapter (scale ~ N(1, 0.2), shift ~ N(0, 0.2)), for tests.
        skip_key_shift: do not create the shift of key projections. Without rotary position embeddings it has
            exactly zero gradient (softmax ignores a per-query constant), so it is dead weight: 9,216 parameters on
            ViT-B/16. Refused on models with rotary embeddings (LLaMA, Qwen2, ...), which rotate the key per position:
            there the shift has a gradient.
        key_modules: dotted-name suffixes that identify key projections for ``skip_key_shift``. The default covers
            every naming the presets match: ``k_proj`` (transformers 5.x) and any module named ``key``
            (``attention.attention.key``, ``attention.self.key``, ``attn.key`` in transformers 4.x and others).
        bias_free_sites: what to do with a Linear / Conv that has no bias. A shift there cannot be folded into the
            weights without adding a bias (a different architecture), so ``"scale_only"`` (default) learns only the
            scale at such sites and ``"error"`` refuses to adapt them. ``"add_bias"`` learns the shift at bias-free
            linears whose bias the architecture can switch on in its config (LLaMA's ``attention_bias`` /
            ``mlp_bias``, see ``peft_ssf.bias_switches``): merging writes it as a new bias and ``merge_and_unload``
            sets the switch, so the merged model loads with plain transformers. Other bias-free sites stay
            scale-only.
        allow_unmergeable: norms without affine parameters cannot absorb scale and shift. By default targeting one
            is an error; ``True`` adapts it anyway and ``merge`` then refuses with a clear message.
        runtime_config: the training op's switches (``SSFRuntimeConfig``: ``fused``, ``pair_residuals``), not
            saved with the adapter. ``SSFConfig(fused=False)`` and ``config.fused`` are shorthands for
            ``config.runtime_config.fused`` (the same for ``pair_residuals``).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or regex to adapt. None uses the preset for the model type."},
    )
    preset: Optional[str] = field(
        default=None,
        metadata={"help": "Placement used when target_modules is None: 'paper' (default) or 'all'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to exclude from SSF."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (requires a layer list in the module path)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'layer'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules to train fully and save, e.g. ['classifier']."}
    )
    init_weights: InitWeights = field(
        default=True,
        metadata={"help": "True: identity (scale 1, shift 0). 'paper': N(1,0.02)/N(0,0.02). False: random."},
    )
    skip_key_shift: bool = field(default=False, metadata={"help": "Skip the inert shift of key projections."})
    key_modules: list[str] = field(
        default_factory=lambda: ["k_proj", "key"],
        metadata={"help": "Name suffixes of key projections (used by skip_key_shift)."},
    )
    bias_free_sites: str = field(
        default="scale_only",
        metadata={"help": "Linear/Conv without bias: 'scale_only' (learn scale only), 'error' or 'add_bias'."},
    )
    allow_unmergeable: bool = field(
        default=False, metadata={"help": "Allow norms without affine parameters (merge will then refuse)."}
    )
    runtime_config: SSFRuntimeConfig = field(
        default_factory=SSFRuntimeConfig,
        metadata={"help": "Training-op switches (fused, pair_residuals); not saved with the adapter."},
    )

    def to_dict(self) -> dict[str, Any]:
        """The adapter's settings as saved in ``adapter_config.json``: without the runtime switches."""
        out = super().to_dict()
        out.pop("runtime_config", None)
        return out

    def __post_init__(self) -> None:
        if isinstance(self.runtime_config, dict):  # e.g. dataclasses.replace / asdict round trips
            self.runtime_config = SSFRuntimeConfig(**self.runtime_config)
        _check_field_types(self)
        super().__post_init__()
        self.peft_type = PeftType.SSF
        if isinstance(self.target_modules, (list, tuple, set)):
            if len(self.target_modules) == 0:
                raise ValueError(
                    "SSFConfig(target_modules=[]) targets nothing. Pass module names, a regex, or None to use the "
                    "preset for your model type."
                )
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.preset is not None:
            from .presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"Unknown SSF preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
            if self.target_modules is not None:
                raise ValueError(
                    f"SSFConfig got both preset={self.preset!r} and target_modules; the preset is only used when "
                    "target_modules is None. Drop one of them."
                )
        if self.init_weights not in (True, False, "paper"):
            raise ValueError(f"init_weights must be True, False or 'paper', got {self.init_weights!r}.")
        if self.bias_free_sites not in _VALID_BIAS_FREE:
            raise ValueError(f"bias_free_sites must be one of {_VALID_BIAS_FREE}, got {self.bias_free_sites!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules; use a list.")
        if self.skip_key_shift and not self.key_modules:
            warnings.warn("skip_key_shift=True but key_modules is empty: no shift will be skipped.", stacklevel=2)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _check_field_types(config: SSFConfig) -> None:
    """Type checks for fields read from JSON, where a wrong type would otherwise be taken silently or fail later.

    ``fused: "false"`` would be truthy, ``target_modules: 5`` fails deep inside PEFT with ``'int' object is not
    iterable``; here each gets a message naming the field.
    """
    def bad(name: str, expected: str) -> TypeError:
        value = getattr(config, name)
        return TypeError(f"SSFConfig field {name!r} must be {expected}, got {type(value).__name__} {value!r}.")

    for name in _BOOL_FIELDS:
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "true or false (a boolean, not a string or number)")
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str) and not _is_str_list(value):
            raise bad(name, "null, a regex string, or a list of module names")
    for name in ("modules_to_save", "key_modules"):
        value = getattr(config, name)
        if value is not None and not _is_str_list(value):
            raise bad(name, "null or a list of module names")
    value = config.layers_pattern
    if value is not None and not isinstance(value, str) and not _is_str_list(value):
        raise bad("layers_pattern", "null, a string, or a list of strings")
    value = config.layers_to_transform
    ints = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if value is not None and not ints and not (isinstance(value, int) and not isinstance(value, bool)):
        raise bad("layers_to_transform", "null, a layer index, or a list of layer indices")


_dataclass_init = SSFConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self: SSFConfig, *args: Any, **kwargs: Any) -> None:
    valid = {f.name for f in fields(SSFConfig)} | set(_RUNTIME_FIELDS)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        # keep PEFT's phrase: its config loader recognises it to drop keys written by newer versions
        raise TypeError(f"SSFConfig got an unexpected keyword argument: {', '.join(hints)}.")
    runtime = {name: kwargs.pop(name) for name in _RUNTIME_FIELDS if kwargs.get(name) is not None}
    kwargs.pop("fused", None), kwargs.pop("pair_residuals", None)
    _dataclass_init(self, *args, **kwargs)
    if runtime:
        self.runtime_config = SSFRuntimeConfig(**{**vars(self.runtime_config), **runtime})


def _runtime_property(name: str) -> property:
    def get(self: SSFConfig) -> bool:
        return getattr(self.runtime_config, name)

    def set_(self: SSFConfig, value: bool) -> None:
        self.runtime_config = SSFRuntimeConfig(**{**vars(self.runtime_config), name: value})

    return property(get, set_, doc=f"Shorthand for ``runtime_config.{name}`` (see ``SSFRuntimeConfig``).")


SSFConfig.__init__ = _checked_init
_signature = inspect.signature(_dataclass_init)
_checked_init.__signature__ = _signature.replace(parameters=[
    *_signature.parameters.values(),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Optional[bool]")
      for name in _RUNTIME_FIELDS),
])
SSFConfig.fused = _runtime_property("fused")
SSFConfig.pair_residuals = _runtime_property("pair_residuals")


def check_adapter_files(directory: str | os.PathLike) -> None:
    """Fail early, naming the file and the fix, when an adapter directory's weights are missing or unreadable."""
    from safetensors import safe_open

    root = Path(directory)
    st, pickle_file = root / "adapter_model.safetensors", root / "adapter_model.bin"
    if not st.exists():
        if pickle_file.exists():
            return  # PEFT loads it with torch.load(weights_only=True): tensors only, no arbitrary code
        raise FileNotFoundError(
            f"{root} has adapter_config.json but no adapter_model.safetensors: the save was interrupted or the file "
            "was not copied. Save the adapter again with save_pretrained."
        )
    try:
        with safe_open(str(st), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                f.get_slice(key).get_shape()
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(
            f"{st} is truncated or corrupted ({type(exc).__name__}: {exc}). Save or download the adapter again."
        ) from exc
    size = st.stat().st_size
    with open(st, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(
            f"{st} is truncated or corrupted: its header describes {8 + header_len + end} bytes but the file has "
            f"{size}. Save or download the adapter again."
        )
    if not keys:
        raise ValueError(f"{st} contains no tensors. Save the adapter again with save_pretrained.")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in an ``adapter_config.json``, or an ``AdapterFileError`` naming the file and the problem.

    Catches what ``json.load`` lets through as tracebacks: invalid JSON, deep nesting (``RecursionError``), a file that
    is not UTF-8, and a top level that is not an object.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON ({exc})"
    except RecursionError:
        problem = "is nested too deeply to be an adapter config"
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text ({exc.reason})"
    else:
        problem = None
    if problem is not None:
        raise AdapterFileError(f"{path} {problem}. Save the adapter again with save_pretrained.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(
            f"{path} must hold a JSON object (the adapter's settings), got a {type(data).__name__}. Save the adapter "
            "again with save_pretrained."
        )
    return data


def _from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
    data = read_config_file(path_json_file)
    if not isinstance(data.get("peft_type"), str):
        found = "has no 'peft_type'" if "peft_type" not in data else f"has peft_type {data['peft_type']!r}"
        raise AdapterFileError(
            f"{path_json_file} {found}: an SSF adapter config has \"peft_type\": \"SSF\". Save the adapter again "
            "with save_pretrained."
        )
    if "runtime_config" in data:  # as PEFT's from_json_file: runtime settings are never read from the file
        warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.", stacklevel=2)
        del data["runtime_config"]
    return data


SSFConfig.from_json_file = classmethod(_from_json_file)


def _from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
    """Load an SSF config; refuses configs of other PEFT methods and checks a local adapter's weight file.

    A folder written by ``SSFConfig.save_pretrained`` holds only the config and loads like LoRA's. The weight file is
    checked when there is one, and when the folder is an adapter's (``PeftModel.save_pretrained`` writes
    ``inference_mode: true``), so that ``PeftModel.from_pretrained`` names a missing or damaged file.
    """
    try:
        config = PeftConfig.from_pretrained.__func__(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    except (TypeError, ValueError) as exc:
        where = Path(pretrained_model_name_or_path) / (subfolder or "") / "adapter_config.json"
        if isinstance(exc, AdapterFileError) or not where.is_file():
            raise
        raise AdapterFileError(f"{where}: {exc} Fix the file or save the adapter again.") from exc
    if not isinstance(config, SSFConfig):
        raise ValueError(
            f"{pretrained_model_name_or_path} holds a {config.peft_type} adapter, not an SSF one. Load it with "
            "peft.PeftModel.from_pretrained / PeftConfig.from_pretrained instead of SSFConfig."
        )
    local = Path(pretrained_model_name_or_path) / (subfolder or "")
    has_weights = any((local / f).exists() for f in ("adapter_model.safetensors", "adapter_model.bin"))
    if local.is_dir() and (has_weights or config.inference_mode):
        check_adapter_files(local)
    return config


SSFConfig.from_pretrained = classmethod(_from_pretrained)
