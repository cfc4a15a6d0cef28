"""SSFModel: the PEFT tuner that decides which modules get an SSF wrapper and drives merge / mixed batches."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, AuxiliaryTrainingWrapper
from torch import nn

from . import bias_switches, guard, residual
from .config import SSFConfig
from .layer import (
    BASE_ADAPTER,
    BIAS_ADDING,
    SUPPORTED_TYPE_NAMES,
    SSFLayer,
    _param_device,
    merge_capabilities,
    wrapper_for,
)
from .presets import _examples, resolve_preset, supported_module_names


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class SSFModel(BaseTuner):
    """Adds SSF (scale & shift per output channel) to the targeted modules of a frozen model.

    Use it through PEFT: ``get_peft_model(model, SSFConfig(...))``. With ``target_modules=None`` the official SSF
    placement for the model's ``model_type`` is used (see ``peft_ssf.presets``).

    Example:
        >>> import peft_ssf
        >>> from peft import get_peft_model
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(num_labels=10))
        >>> peft_model = get_peft_model(model, peft_ssf.SSFConfig(modules_to_save=["classifier"]))
    """

    prefix: str = "ssf_"
    tuner_layer_cls = SSFLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ----- config / targets -------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SSFConfig, model_config: dict) -> SSFConfig:
        # Targets are resolved in _prepare_model, which (unlike this hook) can see the modules.
        return peft_config

    def _prepare_model(self, peft_config: SSFConfig, model: nn.Module) -> None:
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            return  # PEFT expands "all-linear" right after this hook (every Linear / Conv1D but the output layer)
        if targets is not None:
            self._check_targets_exist(peft_config, model)
            return
        model_type = self.get_model_config(model).get("model_type")
        placement = peft_config.preset or "paper"
        names = resolve_preset(model, model_type, placement, peft_config.modules_to_save)
        peft_config.target_modules = set(names)
        peft_config.preset = None  # resolved: the saved config lists the exact modules

    def _check_targets_exist(self, config: SSFConfig, model: nn.Module) -> None:
        """Name the model type and some candidates when a target matches no module at all (typos, renames)."""
        names = [n for n, _ in model.named_modules() if n]
        targets = config.target_modules
        if isinstance(targets, str):
            unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
        else:
            unmatched = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if not unmatched:
            return
        model_type = self.get_model_config(model).get("model_type")
        hint = f"Modules SSF supports in this {model_type} model include: {_examples(supported_module_names(model))}"
        if isinstance(targets, str) or len(unmatched) == len(targets):
            raise ValueError(
                f"SSF target_modules {sorted(unmatched) if not isinstance(targets, str) else targets!r} match no "
                f"module of the model (model_type {model_type!r}). {hint}. Or pass target_modules=None to use the "
                "preset for this model type."
            )
        warnings.warn(
            f"SSF target_modules {unmatched} match no module of the {model_type} model; the other targets are "
            "adapted.",
            stacklevel=3,
        )

    # ----- module creation ----------------------------------------------------------------------------------------
    def _create_and_replace(
        self,
        peft_config: SSFConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        reason = unsupported_storage(base)
        if reason is not None:
            raise TypeError(
                f"SSF cannot adapt module '{current_key}' ({type(base).__qualname__}): {reason}. Load the base model "
                "unquantized and fully on one device (e.g. dtype=torch.bfloat16, no CPU/disk offload in device_map), "
                "or exclude this module (exclude_modules=[...]). For quantized or offloaded bases use a PEFT method "
                "that supports them, such as LoRA."
            )
        if wrapper_for(base) is None:
            raise TypeError(
                f"SSF cannot adapt module '{current_key}' of type {type(base).__module__}."
                f"{type(base).__qualname__}. Supported types: {SUPPORTED_TYPE_NAMES}. Remove it from "
                "target_modules (or add it to exclude_modules), or target its supported sub-modules."
            )
        kwargs = {
            "init_weights": peft_config.init_weights,
            "with_shift": self._wants_shift(peft_config, base, current_key),
            "inference_mode": peft_config.inference_mode,
            "fused": peft_config.fused,
        }
        wrapper = wrapper_for(base)
        if kwargs["with_shift"] and wrapper in BIAS_ADDING and getattr(base, "bias", None) is None:
            wrapper = BIAS_ADDING[wrapper]  # bias_free_sites="add_bias": merging may give the layer a bias
            if type(target) in BIAS_ADDING:
                target.__class__ = BIAS_ADDING[type(target)]  # an earlier scale-only adapter: same state
                target.can_absorb_shift = True
        if isinstance(target, SSFLayer):
            target.update_layer(adapter_name, **kwargs)
            self._register(target)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"Module '{current_key}' is already wrapped by another PEFT method ({type(target).__name__}); "
                "SSF cannot be stacked on it."
            )
        new_module = wrapper(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        self._register(new_module)

    def _register(self, layer: SSFLayer) -> None:
        """Remember every SSF layer this tuner created, so a training forward finds them without a module walk."""
        registry = self.__dict__.setdefault("_ssf_registry", [])
        if not any(known is layer for known in registry):
            registry.append(layer)
        guard.track(self)  # optimizer steps refresh the answers compiled graphs read

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        if getattr(base, "weight", None) is not None or hasattr(base, "qweight") or hasattr(base, "W_q"):
            super()._replace_module(parent, child_name, new_module, child)  # PEFT's device / meta handling
            return
        # PEFT's version reads child.weight.device; a norm without affine parameters has weight None
        setattr(parent, child_name, new_module)
        device = _param_device(base)
        for adapter_dict in (new_module.ssf_scale, new_module.ssf_shift):
            if device is not None and not any(p.device.type == "meta" for p in adapter_dict.parameters()):
                adapter_dict.to(device)

    def _wants_shift(self, config: SSFConfig, module: nn.Module, key: str) -> bool:
        if config.skip_key_shift and any(key == k or key.endswith("." + k) for k in config.key_modules):
            return False
        can_merge, can_shift = merge_capabilities(module)
        if not can_merge:
            if not config.allow_unmergeable:
                raise ValueError(
                    f"SSF target '{key}' ({type(module).__name__}) has no affine weight/bias, so SSF there could "
                    "never be merged into the model. Exclude it (exclude_modules=[...]) or pass "
                    "allow_unmergeable=True to adapt it anyway (merge_and_unload will then refuse)."
                )
            return True
        if not can_shift:
            switchable = bias_switches.switch_for(self.model, key, module) is not None
            if switchable and config.bias_free_sites == "add_bias":
                return True  # BiasAddingLinear: merging gives the layer a bias and turns the config switch on
            if switchable:
                self.__dict__.setdefault("_switchable_sites", []).append(key)
            if config.bias_free_sites == "error":
                raise ValueError(
                    f"SSF target '{key}' ({type(module).__name__}) has no bias, so a shift there cannot be merged. "
                    "Use bias_free_sites='scale_only' (learn only the scale there) or exclude the module."
                )
            self._scale_only_sites.append(key)
            return False
        return True

    def _pre_injection_hook(self, model: nn.Module, config: SSFConfig, adapter_name: str) -> None:
        self._scale_only_sites: list[str] = []
        self._switchable_sites: list[str] = []  # of those, the ones bias_free_sites="add_bias" would give a shift

    def _post_injection_hook(self, model: nn.Module, config: SSFConfig, adapter_name: str) -> None:
        sites = getattr(self, "_scale_only_sites", [])
        switchable = getattr(self, "_switchable_sites", [])
        if sites:
            shown = ", ".join(sites[:5]) + (f", ... ({len(sites)} in all)" if len(sites) > 5 else "")
            warnings.warn(
                f"SSF adapter '{adapter_name}': {len(sites)} targeted module(s) have no bias, so they learn a scale "
                f"but no shift (a shift could not be merged): {shown}."
                + (f" bias_free_sites='add_bias' would learn a shift at {len(switchable)} of them (merging turns on "
                   "the model's bias switch)." if switchable else ""),
                stacklevel=2,
            )

    # ----- merge ------------------------------------------------------------------------------------------------
    def _ssf_layers(self) -> list[tuple[str, SSFLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, SSFLayer)]

    def _precheck_merge(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Validate every layer before any weight is written, so a failed merge leaves the model untouched."""
        problems = []
        for name, layer in self._ssf_layers():
            adapters = adapter_names if adapter_names is not None else layer.active_adapters
            adapters = [a for a in adapters if a in layer.ssf_scale and a not in layer.merged_adapters]
            if not adapters:
                continue
            if not layer.can_merge:
                problems.append(f"{name}: {type(layer.get_base_layer()).__name__} without affine parameters")
                continue
            if safe_merge:
                for adapter in adapters:
                    for key, value in layer.get_delta_weight(adapter).items():
                        if not torch.isfinite(value).all():
                            problems.append(f"{name}.{key}: NaN/Inf after merging adapter '{adapter}'")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            # keep PEFT's phrase for NaN merges, so code written against PEFT's error still matches
            nan = "NaNs detected in the merged weights. " if any("NaN/Inf" in p for p in problems) else ""
            raise ValueError(f"{nan}Refusing to merge SSF, no weight was changed: {shown}.")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge adapters into the weights in place (all checks run before anything is written)."""
        self._precheck_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._precheck_merge(adapter_names, safe_merge)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge:
            bias_switches.apply_bias_switches(model)  # merged shifts became biases: the config must say so
        return model

    # ----- training forward ------------------------------------------------------------------------------------
    def _pairs_residuals(self) -> bool:
        """Whether this forward should run with residual pairing: training, grad on, a fused active adapter asking."""
        if not (self.model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return False
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is not None and getattr(config, "fused", True) and getattr(config, "pair_residuals", True):
                return True
        return False

    def _fused_sites(self) -> list[tuple[SSFLayer, str, torch.Tensor]]:
        """``(layer, adapter, scale)`` of every site that runs the fused op in a forward with grad enabled."""
        layers = self.__dict__.get("_ssf_registry")
        if layers is None:  # e.g. a tuner restored by pickling from an older version
            layers = [m for m in self.model.modules() if isinstance(m, SSFLayer)]
        sites = []
        for layer in layers:
            if layer.merged_adapters or layer._disable_adapters:
                continue
            names = layer._active_adapter
            active = [a for a in ((names,) if isinstance(names, str) else names) if a in layer.ssf_scale]
            if len(active) == 1 and layer.ssf_fused.get(active[0], True):
                sites.append((layer, active[0], layer.ssf_scale[active[0]]))
        return sites

    @contextmanager
    def _training_forward(self):
        """Check all scales once (see ``guard.py``), and pair residuals when training."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            yield
            return
        sites = self._fused_sites()
        with guard.scale_guard(sites):
            if not self._pairs_residuals():
                yield
                return
            # which sites feed a residual add is found once (a forward watched whole), then only they are watched
            key = tuple(id(layer) for layer, _, _ in sites)
            known = self._residual_sites[1] if getattr(self, "_residual_sites", (None,))[0] == key else None
            with residual.pairing(known) as mode:
                yield
            if known is None:
                found = mode.take_paired_sites()
                # a forward that followed no site (saved-tensor hooks active: checkpointing, offloading) finds nothing
                # about the model: look again in the next one
                if mode.tracked:
                    self._residual_sites = (key, found)
            self.residual_pairs = mode.paired  # sites paired in the last training forward (for inspection)
            self.residual_rebuilds = mode.rebuilt  # norms that rebuilt their input (half-precision streams)

    # ----- mixed-batch inference --------------------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``model(x, adapter_names=[...])`` to every SSF layer and ``modules_to_save`` wrapper."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            with self._training_forward():
                yield
            return
        self._check_mixed_batch(adapter_names, args, kwargs)
        handles = []
        for module in self.model.modules():
            if isinstance(module, (SSFLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_mixed_batch(self, adapter_names: Any, args: tuple, kwargs: dict) -> None:
        """PEFT's checks for ``adapter_names``, before any layer runs (with PEFT's messages)."""
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("`adapter_names` must be a list with one adapter name (str) per input sample.")
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
        if inputs and len(inputs[0]) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(inputs[0])} respectively."
            )
        layers = self._ssf_layers()
        if any(layer.merged for _, layer in layers):
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        known = set()
        for _, layer in layers:
            known |= set(layer.ssf_scale.keys())
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Known: {sorted(known)}."
            )


def _hooks_of(module: nn.Module) -> list[Any]:
    """accelerate hooks attached to ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def unsupported_storage(module: nn.Module) -> Optional[str]:
    """Why SSF cannot wrap ``module`` as a plain float op (quantized or offloaded weights), or None if it can.

    SSF merges by rewriting weights in place and its inference fold calls the op's function directly, so it needs
    real floating-point weights that live in the module.
    """
    cls = type(module)
    if cls.__module__.split(".")[0] in ("bitsandbytes", "auto_gptq", "gptqmodel", "hqq", "awq", "optimum", "torchao"):
        return f"it is a quantized layer ({cls.__module__}.{cls.__qualname__})"
    if hasattr(module, "qweight") or hasattr(module, "W_q") or hasattr(module, "quant_state"):
        return "its weights are quantized"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if not (weight.dtype.is_floating_point or weight.dtype.is_complex):
            return f"its weight is stored as {weight.dtype} (quantized)"
        if type(weight).__module__.split(".")[0] == "bitsandbytes":
            return f"its weight is a quantized {type(weight).__name__}"
    if any(getattr(h, "offload", False) for h in _hooks_of(module)):
        return "its weights are offloaded by accelerate (device_map with CPU or disk offload)"
    return None
