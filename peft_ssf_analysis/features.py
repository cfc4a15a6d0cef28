"""Per-layer representations of Hugging Face vision backbones, and a forward pass cut at one layer.

Layer names (``layer_names(model)``):

- ``"block0" .. "block{L-1}"``: the output of transformer block / stage k, i.e. ``hidden_states[k + 1]`` of the
  backbone called with ``output_hidden_states=True``. ViT family (vit, deit, beit, dinov2, vit_mae, ...): the
  whole token sequence [n, tokens, dim]. Swin: the output of stage k as Hugging Face reports it (after that
  stage's patch merging, [n, tokens, dim]). ConvNeXt: the output of stage k [n, C, H, W].
- ``"final"``: the representation the classification head reads. ViT family with a CLS token:
  ``last_hidden_state[:, 0]`` *after* the final LayerNorm (not ``pooler_output``, which on ViT is an unused
  dense + tanh); models that pool by mean (BEiT with ``use_mean_pooling``, Swin, ConvNeXt): ``pooler_output``.
- any other string is looked up as a dotted module name of the (unwrapped) model and its output is captured with
  a forward hook. For plain ``nn.Module`` models (no Hugging Face config) this is the only kind of name besides
  ``"final"`` (the model's output, or its first element).

Token handling (``tokens``): ``"flatten"`` keeps everything ([n, tokens * dim] or [n, C * H * W]); ``"cls"`` keeps
the first token (only for models with a CLS token, or 3-D outputs of plain modules); ``"mean"`` averages over the
tokens (including CLS / register tokens) or over the spatial positions. ``"final"`` is already a vector and is
returned as is. Every representation is returned as a 2-D [n, features] tensor.

PEFT: a ``PeftModel`` is unwrapped with ``get_base_model()`` (adapters stay active; merged or not, it is the same
module tree), then the backbone is found through ``base_model_prefix`` (``model.vit``, ``model.swin``, ...).

Mode and precision: extraction runs in eval mode (dropout and drop-path would make two calls differ) and restores
every submodule's training flag; outputs of half-precision models are promoted to float32 before any reduction,
so the analysis adds no half-precision rounding to what the model itself computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "FINAL",
    "Normalization",
    "TokenMode",
    "eval_mode",
    "forward_to_layer",
    "layer_names",
    "layer_representations",
    "resolve_normalization",
    "unwrap_model",
]

TokenMode = Literal["flatten", "cls", "mean"]
FINAL = "final"
_BLOCK_RE = re.compile(r"^block(\d+)$")
_TOKEN_MODES = ("flatten", "cls", "mean")


# --------------------------------------------------------------------------------------------------------------------
# Finding the backbone and its blocks
# --------------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model a ``PeftModel`` wraps (``get_base_model()``); any other module is returned unchanged."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class _View:
    """What the feature code needs to know about one model."""

    model: nn.Module  # unwrapped model (no PeftModel around it)
    backbone: nn.Module  # HF base model (ViTModel, SwinModel, ...) or the model itself for plain modules
    blocks: tuple[nn.Module, ...]  # blocks[k] produces hidden_states[k + 1]; empty for plain modules
    is_hf: bool
    has_cls: bool
    mean_pooled: bool  # the head reads a mean-pooled vector rather than the CLS token
    mae_patches: int | None = None  # ViT-MAE: patch count, to pass a fixed (identity-order) masking noise


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model_prefix")


def _hidden_state_block_class(backbone: nn.Module) -> type | None:
    """The module class whose outputs transformers 5 records as ``hidden_states`` (if it declares one)."""
    recorders = getattr(type(backbone), "_can_record_outputs", None) or {}
    target = recorders.get("hidden_states")
    if target is None:
        return None
    if isinstance(target, type):
        return target
    return getattr(target, "target_class", None)


def _find_blocks(backbone: nn.Module, config: Any) -> tuple[nn.Module, ...]:
    cls = _hidden_state_block_class(backbone)
    if cls is not None:
        blocks = tuple(m for m in backbone.modules() if type(m) is cls)
        if blocks:
            return blocks
    # Older / hand-written families (ConvNeXt, transformers 4.x): the shallowest ModuleList with one entry per
    # reported hidden state.
    depths = getattr(config, "depths", None)
    expected = len(depths) if depths else getattr(config, "num_hidden_layers", None)
    best: tuple[int, nn.ModuleList] | None = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == expected:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module)
    if best is None:
        raise ValueError(
            f"could not find the block list of {type(backbone).__name__}: no module class is recorded as "
            f"hidden_states and no ModuleList has {expected} entries. Pass module names as layers instead."
        )
    return tuple(best[1])


def _view(model: nn.Module) -> _View:
    model = unwrap_model(model)
    if not _is_hf(model):
        return _View(model, model, (), is_hf=False, has_cls=True, mean_pooled=False)
    backbone = getattr(model, model.base_model_prefix, None)
    if not isinstance(backbone, nn.Module):
        backbone = model
    config = model.config
    embeddings = getattr(backbone, "embeddings", None)
    has_cls = embeddings is not None and getattr(embeddings, "cls_token", None) is not None
    mean_pooled = (not has_cls) or bool(getattr(config, "use_mean_pooling", False))
    mae_patches = None
    if hasattr(config, "mask_ratio") and embeddings is not None:
        # ViT-MAE shuffles (and masks) patches with random noise in every forward pass; a fixed increasing noise
        # keeps the patch order, which makes the representation deterministic.
        mae_patches = getattr(embeddings, "num_patches", None)
        if mae_patches is None:
            mae_patches = getattr(getattr(embeddings, "patch_embeddings", None), "num_patches", None)
        if config.mask_ratio:
            warnings.warn(
                f"{type(model).__name__} has mask_ratio={config.mask_ratio}: the analysis sees only the first "
                f"{1 - config.mask_ratio:.0%} of the patches. Set config.mask_ratio = 0.0 to analyse all of them.",
                stacklevel=3,
            )
    return _View(model, backbone, _find_blocks(backbone, config), True, has_cls, mean_pooled, mae_patches)


def layer_names(model: nn.Module) -> list[str]:
    """Default analysis layers of a Hugging Face vision model: ``["block0", ..., "block{L-1}", "final"]``."""
    view = _view(model)
    if not view.is_hf:
        raise ValueError("a plain nn.Module has no default layers: pass module names (and/or 'final') as layers")
    return [f"block{k}" for k in range(len(view.blocks))] + [FINAL]


# --------------------------------------------------------------------------------------------------------------------
# Normalisation (applied by the analysis on raw [0, 1] pixels)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` applied to raw [0, 1] pixels; ``source`` says where the values came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (pixels.dim() - 2)
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).reshape(shape)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).reshape(shape)
        return (pixels - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


def _as_tuple(value: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(float(v) for v in value)


_NORMALIZATION_HINT = (
    "Pass mean= and std= (the values the model was trained with; mean=0.0, std=1.0 for raw [0, 1] pixels) or "
    "processor= (its image processor); on the command line --mean and --std."
)


def _offline() -> bool:
    """Hugging Face offline mode, read at call time (huggingface_hub reads its flag once, at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _from_preprocessor_file(file: str) -> Normalization | None:
    """Normalisation stated by a ``preprocessor_config.json`` (None if it states none)."""
    with open(file, encoding="utf-8") as fh:
        pre = json.load(fh)
    if not pre.get("do_normalize", True):
        return Normalization((0.0,), (1.0,), f"{file} (do_normalize=false)")
    if "image_mean" in pre and "image_std" in pre:
        return Normalization(_as_tuple(pre["image_mean"]), _as_tuple(pre["image_std"]), file)
    return None


def _hub_preprocessor_file(repo_id: str) -> tuple[str | None, str]:
    """Path of the Hub repo's ``preprocessor_config.json`` (from the local cache when offline) or (None, why)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    offline = _offline()
    try:
        return hf_hub_download(repo_id, "preprocessor_config.json", local_files_only=offline), ""
    except HFValidationError:
        return None, f"{repo_id!r} is neither a local directory nor a valid Hub model id"
    except (OSError, ValueError, EntryNotFoundError) as exc:  # not cached (offline), no such repo / file, no network
        where = "in the local Hugging Face cache (offline mode)" if offline else "on the Hub"
        return None, f"no preprocessor_config.json for {repo_id!r} {where} ({type(exc).__name__})"


def _from_model(model: nn.Module) -> tuple[Normalization | None, str]:
    """Normalisation recorded with the model itself, or (None, why not)."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None, f"{type(model).__name__} has no Hugging Face config"
    if getattr(config, "image_mean", None) is not None and getattr(config, "image_std", None) is not None:
        return Normalization(_as_tuple(config.image_mean), _as_tuple(config.image_std), "model.config"), ""
    name = getattr(config, "_name_or_path", "") or ""
    if not name:
        return None, "the model was built from a config in code (config._name_or_path is empty)"
    if os.path.isdir(name):
        file = os.path.join(name, "preprocessor_config.json")
        if not os.path.isfile(file):
            return None, f"the model's directory {name} has no preprocessor_config.json"
    else:
        file, why = _hub_preprocessor_file(name)
        if file is None:
            return None, why
    norm = _from_preprocessor_file(file)
    return (norm, "") if norm is not None else (None, f"{file} has no image_mean / image_std")


def resolve_normalization(
    model: nn.Module | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
) -> Normalization:
    """Decide the input normalisation the analysis applies inside its differentiable forward pass.

    Order: explicit ``mean`` / ``std`` > ``processor.image_mean`` / ``image_std`` (an image processor) >
    ``model.config.image_mean`` / ``image_std`` > the ``preprocessor_config.json`` of where the model was loaded
    from (``config._name_or_path``): its local directory, or for a Hub id the Hub (only the local cache when
    offline, ``HF_HUB_OFFLINE=1``). A processor or preprocessor file with ``do_normalize=False`` means identity.

    Raises:
        ValueError: when none of these gives a normalisation. Guessing (identity, or ImageNet statistics) would
            silently analyse a model on inputs it never saw; pass ``mean=0.0, std=1.0`` to ask for identity.
    """
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is not None and std is not None:
        m, s = _as_tuple(mean), _as_tuple(std)
        if len(m) != len(s):
            raise ValueError(f"mean and std differ in length: {len(m)} vs {len(s)}")
        if any(v <= 0 for v in s):
            raise ValueError(f"std must be positive, got {s}")
        return Normalization(m, s, "argument")
    if processor is not None:
        if not getattr(processor, "do_normalize", True):
            return Normalization((0.0,), (1.0,), f"{type(processor).__name__} (do_normalize=False)")
        if getattr(processor, "image_mean", None) is not None and getattr(processor, "image_std", None) is not None:
            return Normalization(
                _as_tuple(processor.image_mean), _as_tuple(processor.image_std), type(processor).__name__
            )
    why = "no model given"
    if model is not None:
        norm, why = _from_model(model)
        if norm is not None:
            return norm
    raise ValueError(f"cannot tell the model's input normalisation: {why}. {_NORMALIZATION_HINT}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout / drop-path) and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.train(flag)


# --------------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a forward hook to end the forward pass once the wanted layer has run."""


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # ModelOutput
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor in a module output of type {type(output).__name__}")


def _check_tokens(tokens: str) -> None:
    if tokens not in _TOKEN_MODES:
        raise ValueError(f"tokens must be one of {_TOKEN_MODES}, got {tokens!r}")


def _reduce(t: torch.Tensor, tokens: str, view: _View, name: str) -> torch.Tensor:
    """Apply the token mode to one layer output and return [n, features] in float32 or wider.

    Half-precision (bf16 / fp16) outputs are promoted before the token mean and before any Gram matrix is built
    from them: the model computes in its own precision, the analysis never adds half-precision rounding.
    """
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if t.dim() <= 2 or tokens == "flatten":
        return t.reshape(t.shape[0], -1)
    if tokens == "mean":
        if t.dim() == 3:  # [n, tokens, dim]
            return t.mean(dim=1)
        return t.flatten(2).mean(dim=2)  # [n, C, *spatial]
    # tokens == "cls"
    if t.dim() != 3 or not view.has_cls:
        raise ValueError(f"tokens='cls' needs a token sequence with a CLS token; layer {name!r} has none")
    return t[:, 0]


def _final_from_output(view: _View, out: Any) -> torch.Tensor:
    if not view.is_hf:
        return _first_tensor(out)
    if view.has_cls and not view.mean_pooled:
        return out.last_hidden_state[:, 0]
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.reshape(pooled.shape[0], -1)
    last = out.last_hidden_state
    return last.mean(dim=1) if last.dim() == 3 else last.flatten(2).mean(dim=2)


def _resolve(view: _View, name: str) -> int | nn.Module | None:
    """Block index for ``blockK``, None for ``final``, the module for a dotted module name."""
    if name == FINAL:
        return None
    match = _BLOCK_RE.match(name)
    if match and view.is_hf:
        k = int(match.group(1))
        if k >= len(view.blocks):
            raise ValueError(f"{name!r} does not exist: the model has {len(view.blocks)} blocks")
        return k
    modules = dict(view.model.named_modules())
    if name in modules and name != "":
        return modules[name]
    hint = "block0.., final" if view.is_hf else "a module name from model.named_modules() or 'final'"
    raise ValueError(f"unknown layer {name!r}; expected {hint}")


def _call(view: _View, pixel_values: torch.Tensor, hidden_states: bool) -> Any:
    if not view.is_hf:
        return view.model(pixel_values)
    kwargs: dict[str, Any] = {}
    if view.mae_patches:
        order = torch.arange(view.mae_patches, device=pixel_values.device, dtype=torch.float32)
        kwargs["noise"] = order.expand(pixel_values.shape[0], -1)
    return view.backbone(pixel_values=pixel_values, output_hidden_states=hidden_states, return_dict=True, **kwargs)


def _input_like(view: _View, pixel_values: torch.Tensor) -> torch.Tensor:
    param = next(view.model.parameters(), None)
    if param is None:
        return pixel_values
    dtype = param.dtype if param.is_floating_point() else pixel_values.dtype
    return pixel_values.to(device=param.device, dtype=dtype)


def _layer_representations_batch(
    view: _View, pixel_values: torch.Tensor, names: Sequence[str], tokens: str
) -> dict[str, torch.Tensor]:
    targets = {name: _resolve(view, name) for name in names}
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.setdefault(key, _first_tensor(output))

        return hook

    for name, target in targets.items():
        if isinstance(target, nn.Module):
            handles.append(target.register_forward_hook(make_hook(name)))
    need_hidden = any(isinstance(t, int) for t in targets.values())
    try:
        out = _call(view, _input_like(view, pixel_values), need_hidden)
    finally:
        for handle in handles:
            handle.remove()
    hidden = getattr(out, "hidden_states", None) if need_hidden else None
    if need_hidden and (hidden is None or len(hidden) != len(view.blocks) + 1):
        got = "none" if hidden is None else len(hidden)
        raise RuntimeError(
            f"{type(view.backbone).__name__} returned {got} hidden states, expected {len(view.blocks) + 1} "
            "(embeddings + one per block)"
        )
    result = {}
    for name, target in targets.items():
        if target is None:
            t = _final_from_output(view, out)
        elif isinstance(target, int):
            t = hidden[target + 1]
        else:
            if name not in captured:
                raise RuntimeError(f"module {name!r} was not called during the forward pass")
            t = captured[name]
        result[name] = _reduce(t, tokens, view, name)
    return result


def layer_representations(
    model: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[str] | None = None,
    tokens: TokenMode = "flatten",
    batch_size: int | None = None,
    *,
    on_model_device: bool = False,
) -> dict[str, torch.Tensor]:
    """Representations of ``pixel_values`` at several layers from one full forward pass per batch.

    Args:
        model: a Hugging Face vision model (ViT family, Swin, ConvNeXt), plain or wrapped in a ``PeftModel``, or any
            ``nn.Module`` (then ``layers`` must name modules and/or ``"final"``).
        pixel_values: [n, C, H, W] model-ready inputs (already normalised, as a processor would give them).
        layers: layer names (see the module docstring); default ``layer_names(model)``.
        tokens: ``"flatten"`` | ``"cls"`` | ``"mean"``.
        batch_size: forward this many examples at a time (default: all at once).
        on_model_device: keep the features on the model's device instead of moving them to the CPU (what the Gram
            builder uses, so that only n x n Gram matrices leave the device).

    Returns:
        ``{name: [n, features] tensor}`` in float32 (float64 for a float64 model), in the order of ``layers``.
        Computed under ``torch.no_grad`` and in eval mode (no dropout / drop-path, whatever mode the caller left
        the model in); every submodule's training flag is restored afterwards.
    """
    _check_tokens(tokens)
    view = _view(model)
    names = list(layers) if layers is not None else layer_names(model)
    n = pixel_values.shape[0]
    step = batch_size or max(n, 1)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad(), eval_mode(view.model):
        for start in range(0, n, step):
            batch = _layer_representations_batch(view, pixel_values[start : start + step], names, tokens)
            for name in names:
                parts[name].append(batch[name].detach() if on_model_device else batch[name].detach().cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


class LayerProbe:
    """Differentiable map from raw [0, 1] pixels to one layer's representation, with the forward cut at the layer.

    Normalisation is applied exactly once, inside the call. Blocks and module names stop the forward pass right
    after that module ran (a forward hook raises a private exception), so inverting an early layer does not pay
    for the deeper ones; ``"final"`` runs the whole backbone (never the classification head).
    """

    def __init__(
        self, model: nn.Module, layer: str, tokens: TokenMode = "flatten", normalization: Normalization | None = None
    ) -> None:
        _check_tokens(tokens)
        self.view = _view(model)
        self.layer = layer
        self.tokens = tokens
        self.normalization = normalization
        self._target = _resolve(self.view, layer)

    @property
    def module(self) -> nn.Module | None:
        """The module whose output is the representation (None for ``"final"``)."""
        if isinstance(self._target, int):
            return self.view.blocks[self._target]
        return self._target

    def model_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features from model-ready (normalised) inputs, cut at the layer; returns [n, features]."""
        pixel_values = _input_like(self.view, pixel_values)
        module = self.module
        if module is None:
            t = _final_from_output(self.view, _call(self.view, pixel_values, False))
            return _reduce(t, self.tokens, self.view, self.layer)
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(_first_tensor(output))
            raise _StopForward

        handle = module.register_forward_hook(hook)
        try:
            _call(self.view, pixel_values, False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} was not reached by the forward pass")
        return _reduce(captured[0], self.tokens, self.view, self.layer)

    def __call__(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Features of raw [0, 1] pixels (normalised here), cut at the layer; returns float32 [n, features]."""
        x = self.normalization(pixels01) if self.normalization is not None else pixels01
        return self.model_forward(x).float()


def forward_to_layer(
    model: nn.Module, pixel_values: torch.Tensor, layer: str, tokens: TokenMode = "flatten"
) -> torch.Tensor:
    """Run ``model`` only up to ``layer`` and return its representation [n, features] (differentiable).

    Gives exactly the values :func:`layer_representations` gives for the same layer; ``pixel_values`` are
    model-ready (normalised) inputs. Runs in eval mode (like :func:`layer_representations`) and restores every
    submodule's training flag afterwards.
    """
    probe = LayerProbe(model, layer, tokens)
    with eval_mode(probe.view.model):
        return probe.model_forward(pixel_values)
