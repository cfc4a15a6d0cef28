"""SSF layers: a per-channel ``scale`` and ``shift`` applied to the output of a frozen op, and all their math.

``SSFLayer`` holds the adapter parameters and the merge / unmerge / forward logic that is the same for every op. One
small wrapper class per supported base-layer type says three things about its op, read from the module type and
never guessed from tensor shapes:

* ``channel_dim``: the axis of the op's *output* that carries the channels (``-1`` for Linear / Conv1D / LayerNorm /
  Embedding, ``1`` for Conv, BatchNorm, GroupNorm and ConvNeXt's channels-first LayerNorm);
* how to fold ``scale`` / ``shift`` into its weights (``_merged_params``) and back (``_unmerged_params``);
* optionally a fused training forward that stores no extra activations.

Merging: for Linear / Conv / Conv1D ``W' = scale * W`` (per output channel) and ``b' = scale * b + shift``; for the
norms the affine weight and bias; for RMSNorms the weight (Gemma's ``(1 + w)`` form: ``w' = scale * (1 + w) - 1``);
for Embedding ``E' = scale * E + shift`` (every row). Bias-free layers whose architecture has a config bias switch
(``BiasAddingLinear`` / ``BiasAddingLayerNorm``) gain a bias holding the shift. Computed in the wider of
float32 and the weight's own dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D as HFConv1D

from . import residual
from .guard import _is_dtensor, assert_compiled_scales, note_compiled, refresh_sites, site_may_keep_output
from .ops import FoldSite, folded_scale_shift, layer_norm_scale_shift, scale_shift_fused, scale_shift_naive

#: Unmerge divides full-precision weights by ``scale``; below this magnitude the division would amplify rounding.
MIN_UNMERGE_SCALE = 1e-4

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-batch inference


class SSFLayer(BaseTunerLayer):
    """Mixin with the adapter state and the type-independent SSF logic."""

    adapter_layer_names = ("ssf_scale", "ssf_shift")
    #: per-adapter settings that PEFT deletes together with the adapter
    other_param_names = ("ssf_fused", "ssf_keep_output")

    #: output axis carrying the channels; subclasses set it (or compute it in ``_channel_dim``)
    channel_dim: int = -1
    #: whether the op has somewhere to put a shift when merging (a bias, or a norm's affine bias)
    can_absorb_shift: bool = True
    #: whether the op has weights that can absorb the scale at all
    can_merge: bool = True
    #: whether merge keeps the whole weight for unmerge even in full precision (it absorbs the shift, so dividing it
    #: back would cancel catastrophically for small scales; see ``_restores_by_copy``)
    merge_keeps_weight: bool = False

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ssf_scale = nn.ParameterDict({})
        self.ssf_shift = nn.ParameterDict({})
        #: per adapter: may a compiled graph keep the output (every |scale| >= 1e-3)? Kept current by guard.py
        self.ssf_keep_output: dict[str, bool] = {}
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.ssf_fused: dict[str, bool] = {}  # adapter -> use the memory-saving training op
        self.num_channels = self._num_channels()
        self.in_features, self.out_features = self._features()

    # ----- per-type hooks -------------------------------------------------------------------------------------
    def _num_channels(self) -> int:
        raise NotImplementedError

    def _features(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of the wrapped op; SSF acts on the output, so ``out`` = its channels."""
        return self.num_channels, self.num_channels

    def _merged_params(
        self, scale: torch.Tensor, shift: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - per type
        """New values (in compute dtype) of the base layer's parameters with ``scale`` / ``shift`` folded in."""
        raise NotImplementedError

    def _unmerged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of ``_merged_params``."""
        raise NotImplementedError

    def _fused_forward(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Training forward that stores no extra activation. Default: base op + output-saving SSF op."""
        out = self.base_layer(x, *args, **kwargs)
        scale, shift = self._broadcast_params(adapter, out)
        if not torch.is_grad_enabled():
            return scale_shift_naive(out, scale, shift)
        if torch.compiler.is_compiling():
            # no host sync in a graph: read the last check's answer (Dynamo guards on it and rebuilds the graph when
            # it changes; guard.py keeps it current) and verify it inside the graph
            if self.ssf_keep_output.get(adapter, False):
                note_compiled(self)  # from now on optimizer steps refresh this layer's answer
                assert_compiled_scales(self.ssf_scale[adapter], self, adapter)
                return scale_shift_fused(out, scale, shift, from_output=True)
            return scale_shift_naive(out, scale, shift)
        keep_output = site_may_keep_output(self, adapter, self.ssf_scale[adapter])
        return scale_shift_fused(out, scale, shift, from_output=keep_output, mode=self._pairing_mode(), owner=self)

    def _pairing_mode(self) -> Optional[residual.ResidualPairing]:
        """The residual-pairing mode of this training forward, if it tracks this site."""
        mode = residual.active()
        return mode if mode is not None and mode.wants(self) else None

    # ----- adapter management ---------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        init_weights: bool | str = True,
        with_shift: bool = True,
        inference_mode: bool = False,
        fused: bool = True,
        **kwargs: Any,
    ) -> None:
        """Create (or re-create) the scale and shift of ``adapter_name``."""
        device = _param_device(self.get_base_layer())
        self.ssf_scale[adapter_name] = nn.Parameter(torch.ones(self.num_channels, device=device))
        if with_shift:
            self.ssf_shift[adapter_name] = nn.Parameter(torch.zeros(self.num_channels, device=device))
        elif adapter_name in self.ssf_shift:
            del self.ssf_shift[adapter_name]
        self.reset_ssf_parameters(adapter_name, init_weights)
        self.ssf_fused[adapter_name] = fused
        self.ssf_keep_output[adapter_name] = False
        refresh_sites([(self, adapter_name, self.ssf_scale[adapter_name])])
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_ssf_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """Identity (``True``), the paper's N(1, .02) / N(0, .02) (``"paper"``) or a visibly random one (``False``)."""
        scale = self.ssf_scale[adapter_name]
        shift = self.ssf_shift[adapter_name] if adapter_name in self.ssf_shift else None
        if scale.device.type == "meta":
            return
        if init_weights is True:
            scale.fill_(1.0)
            if shift is not None:
                shift.zero_()
            return
        std = 0.02 if init_weights == "paper" else 0.2
        nn.init.normal_(scale, mean=1.0, std=std)
        if shift is not None:
            nn.init.normal_(shift, mean=0.0, std=std)

    # ----- forward ----------------------------------------------------------------------------------------------
    def _broadcast_shape(self, ndim: int) -> list[int]:
        """Shape that lines the per-channel vector up with ``channel_dim`` of an ``ndim``-dim output."""
        dim = self.channel_dim % ndim
        return [self.num_channels] + [1] * (ndim - dim - 1)

    def _check_output(self, out: torch.Tensor) -> None:
        if out.dim() == 0 or out.shape[self.channel_dim] != self.num_channels:
            raise RuntimeError(
                f"SSF on {type(self.get_base_layer()).__name__} expects {self.num_channels} channels on dim "
                f"{self.channel_dim} of the op's output, but the output has shape {tuple(out.shape)}."
            )

    def _broadcast_params(
        self, adapter: str, out: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        self._check_output(out)
        shape = self._broadcast_shape(out.dim())
        scale = self.ssf_scale[adapter].to(device=out.device, dtype=out.dtype).view(shape)
        shift = self.ssf_shift[adapter] if adapter in self.ssf_shift else None
        if shift is not None:
            shift = shift.to(device=out.device, dtype=out.dtype).view(shape)
        return scale, shift

    def _apply_adapter(self, out: torch.Tensor, adapter: str) -> torch.Tensor:
        scale, shift = self._broadcast_params(adapter, out)
        return scale_shift_naive(out, scale, shift)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = self._active_adapter  # PEFT's active_adapters property, without its per-call overhead
        active = [name for name in ((names,) if isinstance(names, str) else names) if name in self.ssf_scale]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and self.ssf_fused.get(active[0], True):
            return self._fused_forward(x, active[0], *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for name in active:
            out = self._apply_adapter(out, name)
        return out

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample uses its own adapter (``"__base__"`` = none).

        The output's leading dim must be the batch, or the batch folded batch-major into it (Swin's windows turn
        ``B`` samples into ``B * num_windows`` rows, sample-major); each sample's rows get that sample's adapter.
        """
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        out = self.base_layer(x, *args, **kwargs)
        self._check_output(out)
        n_samples, lead = len(adapter_names), out.shape[0]
        batch = self._input_batch(x, n_samples)
        if batch == 1 and n_samples > 1:  # one row shared by every sample (a position embedding): give each its own
            out, lead = out.expand(n_samples, *out.shape[1:]), n_samples
        if n_samples == 0 or lead % n_samples != 0 or batch not in (None, 1, n_samples):
            site = getattr(self, "ssf_site_name", type(self.get_base_layer()).__name__)
            raise ValueError(
                f"Mixed-batch inference got {n_samples} adapter_names, but the output of SSF layer '{site}' has shape "
                f"{tuple(out.shape)}, whose leading dimension is not the batch (a table shared by all samples, such "
                "as T5's relative attention bias). Exclude this module from the adapter to use adapter_names, or run "
                "one adapter per batch."
            )
        wide = torch.promote_types(out.dtype, torch.float32)
        scales = torch.ones(n_samples, self.num_channels, device=out.device, dtype=wide)
        shifts = torch.zeros(n_samples, self.num_channels, device=out.device, dtype=wide)
        for name in set(adapter_names):
            if name == BASE_ADAPTER or name not in self.ssf_scale:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=out.device)
            scales[rows] = self.ssf_scale[name].to(out.device, wide)
            if name in self.ssf_shift:
                shifts[rows] = self.ssf_shift[name].to(out.device, wide)
        if lead != n_samples:
            scales = scales.repeat_interleave(lead // n_samples, dim=0)
            shifts = shifts.repeat_interleave(lead // n_samples, dim=0)
        dim = self.channel_dim % out.dim()
        shape = [lead] + [1] * (dim - 1) + [self.num_channels] + [1] * (out.dim() - dim - 1)
        scales = scales.view(shape).to(out.dtype)
        shifts = shifts.view(shape).to(out.dtype)
        return torch.addcmul(shifts, out, scales)

    def _input_batch(self, x: Any, n_samples: int) -> Optional[int]:
        """The batch size the input shows when it can be read off exactly (lookups), else None (the output's
        leading dim is taken as the batch, or the batch folded into it)."""
        return None

    # ----- merge / unmerge --------------------------------------------------------------------------------------
    def _adapter_tensors(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        scale = self.ssf_scale[adapter].detach().to(dtype)
        shift = self.ssf_shift[adapter].detach().to(dtype) if adapter in self.ssf_shift else None
        return scale, shift

    def _compute_dtype(self) -> torch.dtype:
        weight = getattr(self.get_base_layer(), "weight", None)
        base = weight.dtype if weight is not None else torch.float32
        return torch.promote_types(base, torch.float32)

    def _write_params(self, new_params: dict[str, torch.Tensor]) -> None:
        base = self.get_base_layer()
        for pname, value in new_params.items():
            param = getattr(base, pname)
            param.data.copy_(value.to(param.dtype))

    def _keep_premerge(self, new_params: dict[str, torch.Tensor]) -> None:
        """Before the first merge writes, keep the parameters that unmerge could not restore by dividing (see
        ``_restores_by_copy``). ``merge_and_unload`` keeps nothing: no unmerge can follow it."""
        if self.__dict__.get("_ssf_unloading", False):
            return
        if not self.merged_adapters:
            self.__dict__["_ssf_premerge"] = {}
        copies = self.__dict__.setdefault("_ssf_premerge", {})
        base = self.get_base_layer()
        for pname in new_params:
            param = getattr(base, pname)
            if param is None:  # a bias the merge creates (bias_free_sites="add_bias"): unmerge removes it again
                continue
            if pname not in copies and (_restores_by_copy(param) or (pname == "weight" and self.merge_keeps_weight)):
                copies[pname] = param.detach().clone()

    def merge_refusal(self) -> Optional[str]:
        """Why this layer cannot be merged although it has affine parameters (None: it can); checked before any
        layer is written."""
        return None

    def non_finite_adapter_params(self, adapter: str) -> list[str]:
        """Which of ``adapter``'s parameters (``ssf_scale``, ``ssf_shift``) hold NaN or Inf."""
        return [
            attr for attr in self.adapter_layer_names
            if adapter in getattr(self, attr) and not torch.isfinite(getattr(self, attr)[adapter].detach()).all()
        ]

    def non_finite_merged_params(self, adapter: str) -> list[str]:
        """Base-layer parameters that would hold NaN or Inf after merging ``adapter``, checked in their own dtype
        (an fp16 weight times 1e6 is finite in float32 and Inf once stored)."""
        base = self.get_base_layer()
        merged = self._merged_params(*self._adapter_tensors(adapter, self._compute_dtype()))
        return [k for k, v in merged.items() if not torch.isfinite(v.to(getattr(base, k).dtype)).all()]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active (or given) adapters into the base layer's weights, in order.

        Adapters with a NaN / Inf scale or shift are refused before anything is written. Parameters that unmerge
        cannot restore by division (per-channel vectors, half-precision weights) are kept until unmerge.

        Args:
            safe_merge: compute the merged weights first and refuse (leaving the layer untouched) if any is NaN/Inf
                in the parameter's dtype.
            adapter_names: adapters to merge; default: the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if not self.can_merge:
            raise ValueError(
                f"Cannot merge SSF into {self.get_base_layer()!r}: it has no affine weight and bias to absorb the "
                "scale and shift. Keep the model unmerged, or exclude this module (exclude_modules) and retrain."
            )
        names = [name for name in adapter_names if name in self.ssf_scale]
        layer_type = type(self.get_base_layer()).__name__
        for name in names:
            bad = self.non_finite_adapter_params(name)
            if bad:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken: its "
                    f"{' and '.join(bad)} on {layer_type} hold NaN or Inf. Nothing was merged into this layer."
                )
        cdtype = self._compute_dtype()
        base = self.get_base_layer()
        for name in names:
            scale, shift = self._adapter_tensors(name, cdtype)
            new_params = self._merged_params(scale, shift)
            if safe_merge:
                bad = [p for p, v in new_params.items() if not torch.isfinite(v.to(getattr(base, p).dtype)).all()]
                if bad:
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken: NaN or Inf in "
                        f"the merged {', '.join(bad)} of {layer_type} (in its dtype). Nothing was merged into this "
                        "layer."
                    )
            self._keep_premerge(new_params)
            self._write_params(new_params)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge: kept parameters are restored bit for bit, the others are divided by the scales (in
        reverse order). Refuses, before writing anything, when such a division needs a scale near zero."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        copies = self.__dict__.get("_ssf_premerge", {})
        written = [k for k in ("weight", "bias") if isinstance(getattr(base, k, None), torch.Tensor)]
        divided = [k for k in written if k not in copies]
        cdtype = self._compute_dtype()
        if divided:
            for name in self.merged_adapters:
                smallest = self.ssf_scale[name].detach().abs().min().item()
                if smallest < MIN_UNMERGE_SCALE:
                    raise ValueError(
                        f"Cannot unmerge SSF adapter '{name}' from {type(base).__name__}: a scale is {smallest:.3g} "
                        f"(< {MIN_UNMERGE_SCALE}), dividing by it would not restore the weights. Reload the base "
                        "model instead."
                    )
            for name in reversed(self.merged_adapters):
                restored = self._unmerged_params(*self._adapter_tensors(name, cdtype))
                self._write_params({k: restored[k] for k in divided})
        for pname, original in copies.items():
            getattr(base, pname).data.copy_(original)
        self.merged_adapters.clear()
        self.__dict__.pop("_ssf_premerge", None)

    def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
        """The merged parameters minus the current ones, per parameter name (for inspection)."""
        cdtype = self._compute_dtype()
        scale, shift = self._adapter_tensors(adapter, cdtype)
        base = self.get_base_layer()
        return {k: v - getattr(base, k).detach().to(cdtype) for k, v in self._merged_params(scale, shift).items()}


def _restores_by_copy(param: torch.Tensor) -> bool:
    """Whether merge keeps ``param``'s original for unmerge instead of dividing by the scale later.

    Per-channel vectors always (as small as the adapter; a bias divides back as ``(b * s + shift - shift) / s``, which
    cancels catastrophically for small scales), and whole weights stored in less than 32 bits: bf16 keeps 8 bits of
    mantissa, so ``round(round(W * s) / s)`` is not ``W`` (a bf16 ViT's logits moved 40% after merge + unmerge at
    scale 1e-3). Full-precision weights are divided: one rounding each way, whatever the scale.
    """
    return param.dim() <= 1 or torch.finfo(param.dtype).bits < 32


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: loaded scales get a fresh answer for compiled graphs (see guard.py).

    Sharded (DTensor) scales would need a collective, and a load need not run on every rank: they get "no" (the plain
    formulation, always exact) until the next optimizer step or eager training forward checks them on all ranks."""
    local = []
    for name, scale in module.ssf_scale.items():
        if _is_dtensor(scale.data):
            module.ssf_keep_output[name] = False
        else:
            local.append((module, name, scale))
    refresh_sites(local)


def _param_device(module: nn.Module) -> Optional[torch.device]:
    """Device of the module's first own parameter or buffer (None if it has neither)."""
    for p in module.parameters(recurse=False):
        return p.device
    for b in module.buffers(recurse=False):
        return b.device
    return None


class _SSFModule(nn.Module, SSFLayer):
    """Common ``nn.Module`` wrapper: PEFT needs ``forward`` on the concrete module class."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        SSFLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return SSFLayer.forward(self, x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # models read their layers' hyper-parameters (MobileNetV2's "same" padding reads conv.stride / kernel_size)
            if name in _FORWARDED_ATTRIBUTES and "base_layer" in self._modules:
                return getattr(self._modules["base_layer"], name)
            raise

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()


#: base-layer hyper-parameters a wrapper answers for its base layer (never weights: PEFT and transformers test
#: ``hasattr(module, "weight")`` to tell wrappers from base layers)
_FORWARDED_ATTRIBUTES = frozenset({
    "stride", "padding", "dilation", "groups", "kernel_size", "in_channels", "out_channels", "padding_mode",
    "transposed", "output_padding", "normalized_shape", "eps", "num_features", "num_groups", "momentum", "affine",
    "track_running_stats", "embedding_dim", "num_embeddings", "padding_idx", "max_norm", "nf", "data_format",
})


class _FoldIntoWeightAndBias:
    """Merge math shared by ops whose output channel ``c`` is ``weight[..c..] * input + bias[c]``.

    ``weight_out_dim`` is the weight's output-channel axis (0 for Linear / Conv / norms, 1 for Conv1D).
    """

    weight_out_dim = 0

    def _weight_view(self, vec: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.get_base_layer().weight.dim()
        shape[self.weight_out_dim] = -1
        return vec.view(shape)

    def _merged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        out = {"weight": base.weight.detach().to(scale.dtype) * self._weight_view(scale)}
        if base.bias is not None:
            b = base.bias.detach().to(scale.dtype)
            out["bias"] = b * scale + shift if shift is not None else b * scale
        elif shift is not None:  # guarded at creation; keep the invariant explicit
            raise ValueError(f"{type(base).__name__} has no bias to absorb the SSF shift.")
        return out

    def _unmerged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        out = {"weight": base.weight.detach().to(scale.dtype) / self._weight_view(scale)}
        if base.bias is not None:
            b = base.bias.detach().to(scale.dtype)
            out["bias"] = (b - shift) / scale if shift is not None else b / scale
        return out


class _WeightBiasOp(_FoldIntoWeightAndBias, _SSFModule):
    """Linear-like ops: per-output-channel slices of ``weight`` and a ``bias`` (which may be missing)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        self.can_absorb_shift = base_layer.bias is not None
        super().__init__(base_layer, adapter_name, **kwargs)

    def _fused_forward(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if args or kwargs:
            return super()._fused_forward(x, adapter, *args, **kwargs)
        if torch.is_grad_enabled():
            site = self._foldable_site(base)
            scale = self.ssf_scale[adapter]
            if site is None or torch.compiler.is_compiling() or not site_may_keep_output(self, adapter, scale):
                return super()._fused_forward(x, adapter, *args, **kwargs)
            if not (site.out_channels == scale.shape[0] == self.num_channels):
                raise RuntimeError(
                    f"SSF on {type(base).__name__} expects {self.num_channels} channels, but the op has "
                    f"{site.out_channels} output channels and the adapter {scale.shape[0]}."
                )
            shift = self.ssf_shift[adapter] if adapter in self.ssf_shift else None
            return folded_scale_shift(x, site, scale, shift, mode=self._pairing_mode(), owner=self,
                                      fold=_fold_exact(x, base.weight, scale))
        run = _DIRECT_OPS.get(type(base))
        if run is None or "_hf_hook" in base.__dict__ or not self._fold_is_cheaper(base, x):
            # (an accelerate hook must run the op: it moves the weights to the input's device first)
            return super()._fused_forward(x, adapter, *args, **kwargs)
        # inference: scale the (smaller) weight instead of the output; same result up to rounding
        params = self._merged_params(*self._adapter_tensors(adapter, self._compute_dtype()))
        weight = params["weight"].to(base.weight.dtype)
        bias = params["bias"].to(base.bias.dtype) if "bias" in params else None
        return run(base, x, weight, bias)

    def _foldable_site(self, base: nn.Module) -> Optional[FoldSite]:
        """The ``FoldSite`` of the base op when training may fold SSF into it (frozen plain Linear / ConvNd)."""
        cached = self.__dict__.get("_fold_site")
        if cached is None or cached[0] is not base:
            cached = self.__dict__["_fold_site"] = (base, FoldSite(base) if FoldSite.supports(base) else None)
        site = cached[1]
        if site is None or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        return site

    @staticmethod
    def _fold_is_cheaper(base: nn.Module, x: torch.Tensor) -> bool:
        """A pass over the weight vs a pass over the output: Linear folds when it sees more rows than input
        features; a conv when its weight is smaller than its input (always for depthwise convs)."""
        if isinstance(base, nn.Linear):
            return x.dim() > 0 and x.numel() // max(x.shape[-1], 1) > base.in_features
        return base.weight.numel() < x.numel()


def _fold_exact(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether training may fold SSF into the frozen weight (``ops._FoldedScaleShift``): float32 / float64 with one
    dtype throughout and no autocast. In half precision the folded weight rounds differently from the naive op's
    output, which can flip a ReLU downstream; there the op runs first and SSF after it, rounded as ``fused=False``."""
    return (not torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype == scale.dtype)


class Linear(_WeightBiasOp):
    """SSF after ``nn.Linear``: channels on the last output dim."""

    channel_dim = -1

    def _num_channels(self) -> int:
        return self.get_base_layer().out_features

    def _features(self) -> tuple[int, int]:
        return self.get_base_layer().in_features, self.num_channels


class Conv1D(_WeightBiasOp):
    """SSF after transformers' ``Conv1D`` (GPT-2 style, weight stored as [in, out])."""

    channel_dim = -1
    weight_out_dim = 1

    def _num_channels(self) -> int:
        return self.get_base_layer().nf

    def _features(self) -> tuple[int, int]:
        return self.get_base_layer().weight.shape[0], self.num_channels  # weight is [in, out]


class Conv(_WeightBiasOp):
    """SSF after ``nn.Conv1d/2d/3d`` (grouped and depthwise included): channels on dim 1."""

    channel_dim = 1

    def _num_channels(self) -> int:
        return self.get_base_layer().out_channels

    def _features(self) -> tuple[int, int]:
        return self.get_base_layer().in_channels, self.num_channels


class _AffineNorm(_FoldIntoWeightAndBias, _SSFModule):
    """Norms with a per-channel affine ``weight`` / ``bias``: SSF folds into them, even during training.

    The fused forward runs the norm's own forward with ``weight * scale`` and ``bias * scale + shift`` substituted,
    which is exactly the merged layer, so it saves nothing beyond what the norm saves anyway.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        has_weight = getattr(base_layer, "weight", None) is not None
        self.can_merge = has_weight
        self.can_absorb_shift = has_weight and getattr(base_layer, "bias", None) is not None
        super().__init__(base_layer, adapter_name, **kwargs)

    def _fused_forward(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        mode = residual.active()
        layout = _layer_norm_layout(base) if not args and not kwargs else None
        if mode is not None:
            # a half-precision residual stream: this norm may rebuild its input in backward instead of keeping it
            can_rebuild = self.can_merge and layout == "channels_last" and _half_precision_norm(base, x)
            rebuild = mode.norm_input(x, can_rebuild)
            if rebuild is not None:
                shift = self.ssf_shift[adapter] if adapter in self.ssf_shift else None
                return layer_norm_scale_shift(x, base, self.ssf_scale[adapter], shift, rebuild)
        if not self.can_merge:
            return super()._fused_forward(x, adapter, *args, **kwargs)
        if layout is not None and _half_precision_norm(base, x):
            shift = self.ssf_shift[adapter] if adapter in self.ssf_shift else None
            if layout == "channels_first":  # ConvNeXt's LayerNorm over dim 1: the same permutes as its forward
                out = layer_norm_scale_shift(x.permute(0, 2, 3, 1), base, self.ssf_scale[adapter], shift)
                return out.permute(0, 3, 1, 2)
            return layer_norm_scale_shift(x, base, self.ssf_scale[adapter], shift)
        if _half_kernel(x):
            # other norms (GroupNorm, BatchNorm, ...) in half precision: a folded weight rounds differently from the
            # naive op, and keeping the output would refuse the in-place activation that usually follows a BatchNorm
            # (ReLU(inplace=True)); so the naive op, which keeps the norm's output before SSF
            return self._apply_adapter(base(x, *args, **kwargs), adapter)
        scale = self.ssf_scale[adapter].to(base.weight.dtype)
        params = {"weight": base.weight * scale}
        if base.bias is not None:
            bias = base.bias * scale
            if adapter in self.ssf_shift:
                bias = bias + self.ssf_shift[adapter].to(base.bias.dtype)
            params["bias"] = bias
        if type(base) is nn.LayerNorm and not args and not kwargs:  # skip functional_call's module swapping
            return F.layer_norm(x, base.normalized_shape, params["weight"], params.get("bias"), base.eps)
        return functional_call(base, params, (x, *args), kwargs, strict=False)


#: LayerNorm subclasses whose forward is ``F.layer_norm`` over the last dim, or over dim 1 by permuting (ConvNeXt)
_KNOWN_LAYER_NORMS = ("ConvNextLayerNorm", "ConvNextV2LayerNorm")


def _layer_norm_layout(base: nn.Module) -> Optional[str]:
    """``"channels_last"`` / ``"channels_first"`` for LayerNorms whose forward we know exactly, else None."""
    if type(base) is nn.LayerNorm:
        return "channels_last"
    if type(base).__name__ in _KNOWN_LAYER_NORMS and type(base).__module__.startswith("transformers."):
        return getattr(base, "data_format", None)
    return None


def _half_kernel(x: torch.Tensor) -> bool:
    """A norm on ``x`` computes in half precision: ``x`` is bf16 / fp16 and no CUDA-style autocast casts it up
    (CPU autocast passes a bf16 input to the norms unchanged; CUDA autocast runs them in float32)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return x.device.type == "cpu" or not torch.is_autocast_enabled(x.device.type)


def _half_precision_norm(base: nn.Module, x: torch.Tensor) -> bool:
    """A frozen LayerNorm with a weight whose kernel runs in half precision, outside compilation: SSF runs as
    ``ops.layer_norm_scale_shift`` (the naive op's output; parameter gradients from float32 sums, where the CPU
    kernel's half-precision sums are about 2% off over a few hundred tokens and up to a third off over the 25,000
    tokens of a Swin-B stage at batch 8, measured against float64)."""
    return base.weight is not None and _half_kernel(x) and not torch.compiler.is_compiling()


class LayerNorm(_AffineNorm):
    """SSF after ``nn.LayerNorm`` (channels last) or ConvNeXt's channels-first LayerNorm (channels on dim 1)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        shape = tuple(base_layer.normalized_shape)
        if len(shape) != 1:
            raise TypeError(
                f"SSF supports LayerNorm over one (channel) dimension, got normalized_shape={shape}."
            )
        self.channel_dim = 1 if getattr(base_layer, "data_format", "channels_last") == "channels_first" else -1
        super().__init__(base_layer, adapter_name, **kwargs)

    def _num_channels(self) -> int:
        return self.get_base_layer().normalized_shape[0]


class GroupNorm(_AffineNorm):
    """SSF after ``nn.GroupNorm``: channels on dim 1."""

    channel_dim = 1

    def _num_channels(self) -> int:
        return self.get_base_layer().num_channels


class BatchNorm(_AffineNorm):
    """SSF after ``nn.BatchNorm1d/2d/3d``: channels on dim 1 (also for [N, C] inputs)."""

    channel_dim = 1

    def _num_channels(self) -> int:
        return self.get_base_layer().num_features


class Embedding(_SSFModule):
    """SSF after ``nn.Embedding``: channels = embedding dim; merge rescales and shifts every row of the table."""

    channel_dim = -1
    merge_keeps_weight = True  # the table absorbs the shift: E' = scale * E + shift

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        if base_layer.max_norm is not None:
            raise TypeError(
                "SSF cannot adapt an nn.Embedding with max_norm: the renormalisation would differ after merging."
            )
        super().__init__(base_layer, adapter_name, **kwargs)

    def _num_channels(self) -> int:
        return self.get_base_layer().embedding_dim

    def _input_batch(self, x: Any, n_samples: int) -> Optional[int]:
        """A lookup's output has the index tensor's shape plus channels: its leading dim is the batch only when the
        indices have one (``[B, T]``); ``[1, T]`` position ids are shared by all samples; other index shapes (T5's
        ``[q, k]`` relative-position buckets) have no batch dim at all."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return -1
        if x.dim() == 1:
            return n_samples if x.shape[0] == n_samples else -1
        return int(x.shape[0])

    def _features(self) -> tuple[int, int]:
        return self.get_base_layer().num_embeddings, self.num_channels

    def _merged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.get_base_layer().weight.detach().to(scale.dtype) * scale
        return {"weight": w + shift / self._lookup_scale() if shift is not None else w}

    def _unmerged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.get_base_layer().weight.detach().to(scale.dtype)
        return {"weight": (w - shift / self._lookup_scale()) / scale if shift is not None else w / scale}

    def _lookup_scale(self) -> float:
        """``c`` of an embedding whose forward returns ``c * weight[ids]``: transformers' scaled word embeddings
        (Gemma 1-3, BART / M2M100 with ``scale_embedding``) hold it as ``embed_scale``. The shift is added after that
        product, so the table absorbs ``shift / c``. Other embeddings (``nn.Embedding``, OPT's learned positions) look
        rows up unscaled. The scaled form is checked on the table's largest row: a forward that is not ``c`` times
        a lookup cannot absorb a shift, and merging refuses instead of writing a different model."""
        base = self.get_base_layer()
        scale = getattr(base, "embed_scale", None)
        if scale is None:
            return 1.0
        c = float(scale)
        with torch.no_grad():
            weight = base.weight.detach()
            row = int(weight.float().norm(dim=1).argmax())
            try:
                out = base(torch.tensor([[row]], device=weight.device)).reshape(-1).float()
            except Exception as exc:  # noqa: BLE001 - any forward that does not take token ids
                raise ValueError(self._NOT_A_LOOKUP.format(type(base).__name__)) from exc
            ref = weight[row].float()
            atol = 1e-6 * float(ref.abs().max())
            if out.shape != ref.shape or not torch.allclose(out, c * ref, rtol=1e-3, atol=atol):
                raise ValueError(self._NOT_A_LOOKUP.format(type(base).__name__))
        return c

    _NOT_A_LOOKUP = (
        "SSF cannot merge into {}: its forward is not a (scaled) table lookup, so its table cannot absorb the shift. "
        "Exclude it from target_modules, or keep the adapter unmerged."
    )

    def merge_refusal(self) -> Optional[str]:
        if not self.ssf_shift:
            return None
        try:
            self._lookup_scale()
        except ValueError as exc:
            return str(exc)
        return None


#: base-layer types whose forward is one functional call with replaceable weight / bias (exact type match)
_DIRECT_OPS: dict[type, Any] = {
    nn.Linear: lambda m, x, w, b: F.linear(x, w, b),
    nn.Conv1d: lambda m, x, w, b: m._conv_forward(x, w, b),
    nn.Conv2d: lambda m, x, w, b: m._conv_forward(x, w, b),
    nn.Conv3d: lambda m, x, w, b: m._conv_forward(x, w, b),
}

#: Supported base-layer types, checked in order (first match wins).
LAYER_TYPES: tuple[tuple[type, type], ...] = (
    (HFConv1D, Conv1D),
    (nn.Linear, Linear),
    (nn.Conv1d, Conv),
    (nn.Conv2d, Conv),
    (nn.Conv3d, Conv),
    (nn.LayerNorm, LayerNorm),
    (nn.GroupNorm, GroupNorm),
    (nn.modules.batchnorm._BatchNorm, BatchNorm),
    (nn.Embedding, Embedding),
)

SUPPORTED_TYPE_NAMES = (
    "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.LayerNorm (incl. channels-first), nn.GroupNorm, "
    "nn.BatchNorm1d/2d/3d, nn.Embedding"
)


def wrapper_for(module: nn.Module) -> Optional[type[_SSFModule]]:
    """The SSF wrapper class for ``module``'s type, or None if SSF does not support it."""
    for base_type, wrapper in LAYER_TYPES:
        if isinstance(module, base_type):
            return wrapper
    return None


def merge_capabilities(module: nn.Module) -> tuple[bool, bool]:
    """``(can_merge, can_absorb_shift)`` for a supported base module.

    A Linear / Conv without bias can absorb a scale but not a shift; a norm without affine parameters can absorb
    neither; an Embedding absorbs both (the shift is added to every row of the table).
    """
    wrapper = wrapper_for(module)
    if wrapper is None:
        return False, False
    own = getattr(wrapper, "capabilities_of", None)  # wrappers defined below say it themselves
    if own is not None:
        return own(module)
    if issubclass(wrapper, _WeightBiasOp):
        return True, module.bias is not None
    if issubclass(wrapper, _AffineNorm):
        has_weight = getattr(module, "weight", None) is not None
        return has_weight, has_weight and getattr(module, "bias", None) is not None
    return True, True


# ----- RMSNorm family (LLaMA, Mistral, Qwen, Phi-3, T5, Gemma) and bias-free Linears that may gain a bias ---------
def _rms_norm_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The per-channel weight of an RMSNorm-like module, or None when ``module`` is not one we recognise.

    Recognised: classes named ``*RMSNorm`` (transformers' and ``torch.nn.RMSNorm``) or ``T5LayerNorm``, with a 1-D
    ``weight``, an ``eps`` / ``variance_epsilon`` attribute and no bias. Their exact form (``w * n(x)`` or Gemma's
    ``(1 + w) * n(x)``) is then checked numerically when the wrapper is built.
    """
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if not (hasattr(module, "variance_epsilon") or hasattr(module, "eps")):
        return None
    if getattr(module, "bias", None) is not None:
        return None
    return weight


class _RMSNormMeta(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, nn.Module) and _rms_norm_weight(instance) is not None


class RMSNormLike(metaclass=_RMSNormMeta):
    """``isinstance(m, RMSNormLike)``: ``m`` is an RMSNorm SSF can fold into (see ``_rms_norm_weight``)."""


def _rms_offset(module: nn.Module) -> float:
    """0.0 when ``module`` computes ``w * n(x)``, 1.0 for Gemma's ``(1 + w) * n(x)``; checked on a probe input.

    Raises TypeError when the output is neither (an RMSNorm variant we do not know: merging would be wrong).
    """
    weight = module.weight
    if weight.device.type == "meta" or _is_dtensor(weight):
        src = _forward_source(module)  # cannot run it: read the forward instead
        return 1.0 if ("1.0 + self.weight" in src or "1 + self.weight" in src) else 0.0
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen, dtype=dtype).to(weight.device)
    with torch.no_grad():
        out = module(x).to(dtype)
        eps = getattr(module, "variance_epsilon", None)
        eps = getattr(module, "eps", None) if eps is None else eps
        eps = torch.finfo(dtype).eps if eps is None else eps  # torch.nn.RMSNorm(eps=None)
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        w = weight.detach().to(dtype)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    scale = 1.0 + n.abs().max().item() * (1.0 + w.abs().max().item())
    for offset in (0.0, 1.0):
        if (out - n * (w + offset)).abs().max().item() <= tol * scale:
            return offset
    raise TypeError(
        f"SSF recognised {type(module).__qualname__} as an RMSNorm, but its output is neither weight * x / rms(x) "
        "nor (1 + weight) * x / rms(x), so SSF could not be merged into it. Exclude it (exclude_modules=[...])."
    )


def _forward_source(module: nn.Module) -> str:
    import inspect

    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


class RMSNorm(_SSFModule):
    """SSF after an RMSNorm (channels last). Scale folds into the norm weight: ``w' = scale * (w + o) - o`` with
    ``o = 1`` for Gemma's ``(1 + w)`` form and 0 otherwise. RMSNorms have no bias, so no shift (``capabilities_of``).
    """

    channel_dim = -1
    can_absorb_shift = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        self.weight_offset = _rms_offset(base_layer)
        super().__init__(base_layer, adapter_name, **kwargs)

    @staticmethod
    def capabilities_of(module: nn.Module) -> tuple[bool, bool]:
        return True, False

    def _num_channels(self) -> int:
        return self.get_base_layer().weight.shape[0]

    def _merged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        if shift is not None:
            raise ValueError(f"{type(self.get_base_layer()).__name__} has no bias to absorb the SSF shift.")
        w = self.get_base_layer().weight.detach().to(scale.dtype)
        return {"weight": scale * (w + self.weight_offset) - self.weight_offset}

    def _unmerged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.get_base_layer().weight.detach().to(scale.dtype)
        return {"weight": (w + self.weight_offset) / scale - self.weight_offset}


class _AddsBias:
    """Merge math for a bias-free op whose architecture has a config switch for that bias (LLaMA's
    ``attention_bias`` / ``mlp_bias``, ModernBERT's ``norm_bias``; see ``peft_ssf.bias_switches``), used with
    ``bias_free_sites="add_bias"``.

    The site learns a shift like any other; merging creates the base layer's ``bias`` holding the folded shift, and
    unmerging removes it again. ``merge_and_unload`` then turns the config switch on (zero bias where SSF added none),
    so the merged model is a plain transformers model.
    """

    def _merged_params(self, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        if base.bias is not None:
            return super()._merged_params(scale, shift)
        out = {"weight": base.weight.detach().to(scale.dtype) * self._weight_view(scale)}
        out["bias"] = shift if shift is not None else torch.zeros_like(scale)
        return out

    def _write_params(self, new_params: dict[str, torch.Tensor]) -> None:
        base = self.get_base_layer()
        if "bias" in new_params and base.bias is None:
            bias = new_params.pop("bias")
            base.bias = nn.Parameter(bias.to(base.weight.dtype), requires_grad=False)
            self.__dict__["_ssf_added_bias"] = True
        super()._write_params(new_params)

    def unmerge(self) -> None:
        super().unmerge()
        if not self.merged and self.__dict__.pop("_ssf_added_bias", False):
            self.get_base_layer().register_parameter("bias", None)

    def _fused_forward(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.get_base_layer().bias is None and (self._plain_without_bias or not torch.is_grad_enabled()):
            return SSFLayer._fused_forward(self, x, adapter, *args, **kwargs)  # base op, then the SSF op
        return super()._fused_forward(x, adapter, *args, **kwargs)

    def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        if base.bias is not None:
            return super().get_delta_weight(adapter)
        merged = self._merged_params(*self._adapter_tensors(adapter, self._compute_dtype()))
        merged["weight"] = merged["weight"] - base.weight.detach().to(merged["weight"].dtype)
        return merged


class BiasAddingLinear(_AddsBias, Linear):
    """SSF with a shift after a bias-free ``nn.Linear`` that a config switch can give a bias (see ``_AddsBias``).

    Training folds scale and shift into the frozen weight as for any Linear; inference without grad runs the base
    op and then the SSF op (the inference fold needs an existing bias)."""

    _plain_without_bias = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.can_absorb_shift = True


class BiasAddingLayerNorm(_AddsBias, LayerNorm):
    """SSF with a shift after a bias-free ``nn.LayerNorm`` that a config switch can give a bias (ModernBERT's
    ``norm_bias``; see ``_AddsBias``). While unmerged it runs the norm, then the SSF op."""

    _plain_without_bias = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.can_absorb_shift = True


#: wrapper -> its bias-adding variant, for ``bias_free_sites="add_bias"``
BIAS_ADDING: dict[type, type] = {Linear: BiasAddingLinear, LayerNorm: BiasAddingLayerNorm}


LAYER_TYPES = LAYER_TYPES + ((RMSNormLike, RMSNorm),)
SUPPORTED_TYPE_NAMES = SUPPORTED_TYPE_NAMES + ", RMSNorm (LLaMA / Mistral / Qwen / Phi-3 / Gemma, T5LayerNorm)"
