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
from .config import AdapterFileError, SSFConfig, check_adapter_name
from .guard import _is_dtensor
from .layer import (
    BASE_ADAPTER,
    BIAS_ADDING,
    SUPPORTED_TYPE_NAMES,
    SSFLayer,
    _param_device,
    merge_capabilities,
    wrapper_for,
)
from .presets import (
    PresetError,
    _examples,
    in_modules,
    resolve_preset,
    shared_parameter_owners,
    supported_module_names,
)


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

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        if self.model.training:
            self._freeze_batch_norm_stats()

    def train(self, mode: bool = True) -> SSFModel:
        """``nn.Module.train``, except that frozen BatchNorms stay in eval mode (see ``_freeze_batch_norm_stats``)."""
        super().train(mode)
        if mode:
            self._freeze_batch_norm_stats()
        return self

    def _freeze_batch_norm_stats(self) -> None:
        """Frozen BatchNorms normalise with their running statistics and never update them.

        A BatchNorm in train mode updates its running mean / variance even when its parameters are frozen, and
        ``save_pretrained`` saves only the adapter: a reloaded model would differ from the trained one. So every
        BatchNorm without trainable parameters (SSF-adapted or not) runs as at inference, the usual way to fine-tune a
        frozen backbone. A BatchNorm listed in ``modules_to_save`` is trained and saved with its statistics.
        """
        to_save = set()
        for config in self.peft_config.values():
            to_save.update(getattr(config, "modules_to_save", None) or ())
        wrappers: list[str] = []
        for name, module in self.model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                wrappers.append(name + ".")
                continue
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.track_running_stats:
                continue
            if any(name.startswith(w) for w in wrappers) or in_modules(name.removesuffix(".base_layer"), to_save):
                continue
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    # ----- config / targets -------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, after refusing an unsafe adapter name (every way a name enters: ``get_peft_model``,
        ``add_adapter``, ``load_adapter``, ``PeftModel.from_pretrained``, transformers' ``load_adapter``)."""
        check_adapter_name(adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

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
        if peft_config.layers_to_transform is not None:
            # PEFT skips its layer filter for exact names (which a resolved preset is): apply it here
            kept = [n for n in names if _in_layers(n, peft_config.layers_to_transform, peft_config.layers_pattern)]
            if not kept:
                raise PresetError(
                    f"layers_to_transform={peft_config.layers_to_transform} (layers_pattern="
                    f"{peft_config.layers_pattern!r}) keeps none of the {len(names)} modules of the SSF "
                    f"'{placement}' preset, e.g. {_examples(names, 4)}. Check the layer indices and the layer "
                    "list's name."
                )
            names = kept
        peft_config.target_modules = set(names)
        peft_config.preset = None  # resolved: the saved config lists the exact modules

    def _check_targets_exist(self, config: SSFConfig, model: nn.Module) -> None:
        """Name the model type and some candidates when a target matches no module at all (typos, renames).

        A list of targets is matched in linear time (against every dotted suffix of every module name), and entries
        that match no module are dropped from the config: PEFT's ``_find_minimal_target_modules``, which runs next on
        lists of 20 or more, is quadratic in the list's length (100,001 entries would take hours).
        """
        names = [n for n, _ in model.named_modules() if n]
        targets = config.target_modules
        if isinstance(targets, str):
            unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
        else:
            suffixes = {".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))}
            unmatched = sorted(t for t in targets if t not in suffixes)
        if not unmatched:
            return
        model_type = self.get_model_config(model).get("model_type")
        hint = f"Modules SSF supports in this {model_type} model include: {_examples(supported_module_names(model))}"
        shown = targets if isinstance(targets, str) else _shorten(unmatched)
        if isinstance(targets, str) or len(unmatched) == len(targets):
            raise ValueError(
                f"SSF target_modules {shown} match no module of the model (model_type {model_type!r}). {hint}. Or "
                "pass target_modules=None to use the preset for this model type."
            )
        warnings.warn(
            f"SSF target_modules {shown} match no module of the {model_type} model; the other targets are adapted.",
            stacklevel=3,
        )
        config.target_modules = set(targets) - set(unmatched)

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
        sharers = self.__dict__.get("_ssf_tied", {}).get(current_key)
        if sharers:
            raise ValueError(
                f"SSF cannot adapt '{current_key}': its weight is shared with {sharers} (tied weights, e.g. "
                "tie_word_embeddings). Merging would fold the scale into the weight those modules use too, changing "
                "their outputs. Exclude it (exclude_modules=[...]), or untie the weights before get_peft_model "
                "(load the model with tie_word_embeddings=False)."
            )
        new_module = wrapper(target, adapter_name, **kwargs)
        new_module.ssf_site_name = current_key  # named in errors (mixed batches)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        self._register(new_module)

    def _register(self, layer: SSFLayer) -> None:
        """Remember every SSF layer this tuner created, so a training forward finds them without a module walk."""
        registry = self.__dict__.setdefault("_ssf_registry", [])
        if not any(known is layer for known in registry):
            registry.append(layer)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, SSFLayer):
            # unloading: a base layer or a trained modules_to_save copy (a container head such as RoBERTa's
            # classifier has no weight of its own) goes back in place as it is
            setattr(parent, child_name, new_module)
            return
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
        self._ssf_tied = shared_parameter_owners(model)
        if config.skip_key_shift and _uses_rotary_embeddings(model):
            raise ValueError(
                "skip_key_shift=True on a model with rotary position embeddings: the rotation is applied to the key "
                "per position, so a key-projection shift is not a per-query constant there and its gradient is not "
                "zero (it is as large as the query's). Use skip_key_shift=False; the shift is inert only without "
                "rotary embeddings (ViT, BERT, GPT-2, T5, BART)."
            )

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
        """Validate every layer before any weight is written, so a failed merge leaves the model untouched.

        Always: the layer can absorb SSF, and the adapter's scales and shifts are finite. With ``safe_merge``: every
        merged weight is finite once cast to the parameter's own dtype (an fp16 weight times 1e6 overflows only
        there), and so is every ``modules_to_save`` module that the merge puts into the model.
        """
        problems: list[tuple[str, str]] = []  # (adapter or "", what)
        for name, layer in self._ssf_layers():
            adapters = adapter_names if adapter_names is not None else layer.active_adapters
            adapters = [a for a in adapters if a in layer.ssf_scale and a not in layer.merged_adapters]
            if not adapters:
                continue
            if not layer.can_merge:
                problems.append(("", f"{name}: {type(layer.get_base_layer()).__name__} without affine parameters"))
                continue
            refusal = layer.merge_refusal()
            if refusal is not None:
                problems.append(("", f"{name}: {refusal}"))
                continue
            for adapter in adapters:
                bad = layer.non_finite_adapter_params(adapter)
                if bad:
                    problems.append((adapter, f"{name}.{'/'.join(bad)}['{adapter}']: NaN/Inf in the adapter"))
                elif safe_merge:
                    for key in layer.non_finite_merged_params(adapter):
                        problems.append((adapter, f"{name}.{key}: NaN/Inf after merging adapter '{adapter}'"))
        if safe_merge:
            for name, module in self.model.named_modules():
                if not isinstance(module, AuxiliaryTrainingWrapper) or not hasattr(module, "modules_to_save"):
                    continue
                wanted = adapter_names if adapter_names is not None else module.active_adapters
                for adapter in [a for a in wanted if a in module.modules_to_save]:
                    bad = [k for k, v in module.modules_to_save[adapter].state_dict().items()
                           if v.is_floating_point() and not torch.isfinite(v).all()]
                    if bad:
                        what = f"{name} (modules_to_save '{adapter}'): NaN/Inf in {', '.join(bad)}"
                        problems.append((adapter, what))
        if problems:
            whats = [what for _, what in problems]
            shown = "; ".join(whats[:5]) + (f"; ... ({len(whats)} in all)" if len(whats) > 5 else "")
            broken = next((adapter for adapter, _ in problems if adapter), None)
            # PEFT's exact message first, so code and tests written against PEFT's error still match
            nan = f"NaNs detected in the merged weights. The adapter {broken} seems to be broken. " if broken else ""
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
        layers = [layer for _, layer in self._ssf_layers()]
        for layer in layers:
            layer._ssf_unloading = True  # no unmerge can follow: merge keeps no copy of the weights it overwrites
        try:
            model = super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )
        finally:
            for layer in layers:
                layer._ssf_unloading = False
                layer.__dict__.pop("_ssf_premerge", None)
        if merge:
            bias_switches.apply_bias_switches(model)  # merged shifts became biases: the config must say so
        return model

    # ----- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SSFConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key mapping, then refuse what an SSF adapter file must not hold, before anything is loaded.

        ``set_peft_model_state_dict`` loads with ``strict=False`` into the whole model, so without this a key such as
        ``...q_proj.base_layer.weight`` would silently overwrite a frozen base weight. Refused, naming the key: keys
        that are neither this adapter's SSF parameters, nor its ``modules_to_save`` / other auxiliary modules, nor the
        input / output embedding weights that PEFT's ``save_embedding_layers`` writes (when an embedding is targeted or
        the vocabulary was resized); two keys for one parameter; non-float tensors (bool, int8, ...) where the model
        holds floats; a file without any of the adapter's SSF parameters (PEFT would only warn about missing keys and
        leave an identity adapter).
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict(keep_vars=True)
        ssf_suffixes = tuple(f".{attr}.{adapter_name}" for attr in SSFLayer.adapter_layer_names)
        ssf_keys = {key for key in model_state if key.endswith(ssf_suffixes)}
        aux_keys = set()
        for name, module in model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                name = name.removeprefix("_fsdp_wrapped_module.")
                aux_keys |= {f"{name}.{v}" for v in module.adapter_state_dict_load_map(adapter_name).values()}
        allowed = ssf_keys | aux_keys | _embedding_keys(model, model_state)
        prefix = "base_model.model."
        loaded_ssf = 0
        if len(remapped) != len(state_dict):
            raise AdapterFileError(
                f"The weights of SSF adapter '{adapter_name}' hold two keys for the same parameter (e.g. with and "
                "without the adapter name). The file was not written by save_pretrained; save the adapter again."
            )
        # PEFT's mapping keeps the order of the file's keys: messages name the key as it is in the file
        for key, (mapped, value) in zip(state_dict, remapped.items()):
            target = mapped if mapped in allowed else mapped.removeprefix(prefix)
            if target not in allowed:
                raise AdapterFileError(
                    f"The weights of SSF adapter '{adapter_name}' hold {key!r}, which is not an SSF parameter or a "
                    "modules_to_save module of this adapter: loading it would overwrite the frozen base model. Remove "
                    "that key from the adapter file (only ssf_scale / ssf_shift and modules_to_save weights belong "
                    "there)."
                )
            expected = model_state[target]
            if isinstance(value, torch.Tensor) and expected.is_floating_point() and not value.is_floating_point():
                raise AdapterFileError(
                    f"The weights of SSF adapter '{adapter_name}' hold {key!r} as {value.dtype}, where the model "
                    f"holds {expected.dtype} values. The adapter file is damaged or was not written by "
                    "save_pretrained; save it again."
                )
            loaded_ssf += target in ssf_keys
        if ssf_keys and not loaded_ssf:
            raise AdapterFileError(
                f"The weights of SSF adapter '{adapter_name}' contain none of its {len(ssf_keys)} SSF parameters "
                "(ssf_scale / ssf_shift): the file was not written for this adapter config or was stripped. Save the "
                "adapter again with save_pretrained."
            )
        return remapped

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
            key = tuple(layer for layer, _, _ in sites)
            known = self._residual_sites[1] if getattr(self, "_residual_sites", (None,))[0] == key else None
            with residual.pairing(known) as mode:
                yield
                if known is None:
                    found = mode.take_paired_sites()  # (before the mode's marks are cleared on leaving)
                    # a forward that followed no site (saved-tensor hooks active: checkpointing, offloading) finds
                    # nothing about the model: look again in the next one
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


def _embedding_keys(model: nn.Module, model_state: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys of the input / output embeddings (SSF keys excluded): PEFT's ``save_embedding_layers`` saves
    these base weights with an adapter when an embedding is targeted or was resized, and loads them back."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            layer = None
        found.append(layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer)
    if not isinstance(found[0], nn.Embedding):  # a vocabulary (text models) only: not e.g. ViT's patch embedding
        return set()
    layers = [id(layer) for layer in found if layer is not None]
    prefixes = tuple(
        f"{name}." for name, module in model.named_modules(remove_duplicate=False)
        if id(module) in layers or (isinstance(module, BaseTunerLayer) and id(module.get_base_layer()) in layers)
    )
    ssf = tuple(f".{attr}." for attr in SSFLayer.adapter_layer_names)
    return {k for k in model_state if prefixes and k.startswith(prefixes) and not any(a in k for a in ssf)}


def _shorten(names: list[str], limit: int = 10) -> str:
    """``['a', 'b', ...]`` with at most ``limit`` names and the total, for messages about very long lists."""
    head = ", ".join(repr(n if len(n) <= 80 else n[:77] + "...") for n in names[:limit])
    return f"[{head}]" if len(names) <= limit else f"[{head}, ... ({len(names)} in all)]"


def _in_layers(name: str, layers: int | list[int], pattern: str | list[str] | None) -> bool:
    """PEFT's ``layers_to_transform`` rule (``check_target_module_exists``): the first numbered segment after
    ``pattern`` (or after any segment, without a pattern) is one of ``layers``; a module outside a layer list is not
    kept."""
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


#: config attributes that mean rotary position embeddings (transformers names), when set
_ROTARY_CONFIG_KEYS = ("rope_theta", "rope_parameters", "rotary_dim", "rotary_pct", "rotary_emb_base")


def _uses_rotary_embeddings(model: nn.Module) -> bool:
    """Whether keys are rotated per position (RoPE): a rotary module, or a config that sets rotary parameters."""
    if any("rotary" in type(m).__name__.lower() for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "position_embedding_type", None) == "rotary":
        return True
    return any(getattr(config, key, None) not in (None, 0, {}) for key in _ROTARY_CONFIG_KEYS)


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
        kind = type(weight.data)
        if kind is not torch.Tensor and not _is_dtensor(weight.data) and kind.__module__.split(".")[0] != "torch":
            # a tensor subclass (torchao's AffineQuantizedTensor, ...): SSF's fold multiplies the weight, which such
            # storage does not support
            return f"its weight is a {kind.__module__}.{kind.__qualname__} tensor subclass (quantized storage)"
        if type(weight).__module__.split(".")[0] == "bitsandbytes":
            return f"its weight is a quantized {type(weight).__name__}"
    if any(getattr(h, "offload", False) for h in _hooks_of(module)):
        return "its weights are offloaded by accelerate (device_map with CPU or disk offload)"
    return None
