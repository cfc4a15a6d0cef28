"""The scale guard: which fused SSF sites may rebuild their input from their output in this training forward.

The fused op (``ops.scale_shift_fused``) keeps its output ``y`` and gets the scale gradient by dividing by the scale,
which is only accurate while every ``|scale| >= RECONSTRUCT_MIN_SCALE``; a site with a smaller scale keeps its input
instead. Deciding that needs the scale values on the host. Reading them per site would cost one host-device sync per
site per forward, and caching the answer per parameter version is unsound: fused and foreach optimizers
(``AdamW(fused=True)``, the Trainer's default) and writes through ``.data`` change values without bumping the
version counter.

So ``SSFModel`` checks every active scale of the model once at the start of each training forward, in one batched
reduction and one sync (``scale_guard``), and each site looks its answer up (``site_may_keep_output``). Sharded
parameters (FSDP2 ``DTensor``) are reduced over their mesh, so every rank sees the global minimum. Outside such a
forward (a layer called directly, ``inject_adapter_in_model`` without ``PeftModel``) a site checks its own scale.

A compiled graph cannot make that decision (a host sync inside it is a graph break), so under ``torch.compile`` each
layer reads a plain Python answer instead, ``layer.ssf_keep_output[adapter]``, which Dynamo guards on: the graph is
built for the answer it saw and rebuilt when the answer changes. The answers are refreshed outside compiled code:
when an adapter is created or loaded (``load_state_dict``), by every eager training forward's check, and after every
optimizer step that updates the scales of a layer some graph was compiled for (an optimizer post-step hook registered
the first time Dynamo traces an SSF layer, so eager-only processes never have it; one sync per step for all layers).
A scale written by hand between those points is caught inside the graph
(``assert_compiled_scales``): the forward raises an error naming ``refresh_scale_guard`` instead of returning wrong
gradients.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

#: Below this magnitude dividing by the scale (to get the scale gradient from the output) amplifies rounding noise.
RECONSTRUCT_MIN_SCALE = 1e-3

_LOCAL = threading.local()


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(param: torch.Tensor) -> torch.Tensor:
    data = param.detach()
    return data.to_local() if _is_dtensor(data) else data


def _min_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``min |t|`` over all ``tensors`` (their local shards), as a 1-element float32 tensor (``+inf`` if empty)."""
    local = [_local(t).reshape(-1) for t in tensors]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in local:
        by_device.setdefault(t.device, []).append(t.float() if t.dtype != torch.float32 else t)
    mins = [torch.cat(ts).abs().amin() if sum(t.numel() for t in ts) else torch.tensor(float("inf"), device=dev)
            for dev, ts in by_device.items()]
    first = local[0].device
    return torch.stack([m.to(first) for m in mins]).amin().reshape(1)


def _all_reduce_min(mins: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Global minimum over the ranks that share the sharded parameters (one collective for all of them)."""
    import torch.distributed as dist

    meshes = [p.device_mesh for p in params if _is_dtensor(p)]
    if not meshes or not dist.is_available() or not dist.is_initialized():
        return mins
    mesh = meshes[0]
    group = mesh.get_group() if mesh.ndim == 1 else None  # several mesh dims: all ranks (a superset is still safe)
    mins = mins.to(mesh.device_type) if mins.device.type != mesh.device_type else mins
    dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
    return mins


def _checked_min(tensors: list[torch.Tensor]) -> torch.Tensor:
    mins = _min_abs(tensors)
    if any(_is_dtensor(t) for t in tensors):
        mins = _all_reduce_min(mins, tensors)
    return mins


def scales_reconstructible(params: list[torch.Tensor]) -> list[bool]:
    """For each scale vector: whether all its entries have ``|scale| >= RECONSTRUCT_MIN_SCALE``.

    One concatenation, one reduction and one host sync for all of them in the common case (every scale large
    enough); only when some scale is small is each vector checked on its own.
    """
    if not params:
        return []
    if bool(_checked_min(params) >= RECONSTRUCT_MIN_SCALE):
        return [True] * len(params)
    return [bool(_checked_min([p]) >= RECONSTRUCT_MIN_SCALE) for p in params]


def _record(sites: list[tuple[object, str, torch.Tensor]], answers: list[bool]) -> None:
    """Store each site's answer where compiled code reads it (``layer.ssf_keep_output``)."""
    for (layer, adapter, _), ok in zip(sites, answers):
        flags = getattr(layer, "ssf_keep_output", None)
        if flags is not None and flags.get(adapter) is not ok:
            flags[adapter] = ok


@contextmanager
def scale_guard(sites: Iterable[tuple[object, str, torch.Tensor]]) -> Iterator[None]:
    """Check every ``(layer, adapter, scale)`` once for the forward inside (a nested forward reuses the outer one)."""
    if getattr(_LOCAL, "flags", None) is not None:
        yield
        return
    sites = list(sites)
    answers = scales_reconstructible([scale for _, _, scale in sites])
    _record(sites, answers)
    _LOCAL.flags = {(layer, adapter): ok for (layer, adapter, _), ok in zip(sites, answers)}
    try:
        yield
    finally:
        _LOCAL.flags = None


def site_may_keep_output(layer: object, adapter: str, scale: torch.Tensor) -> bool:
    """Whether the fused op at this site may keep its output: the forward's answer, else a check of its own."""
    current: Optional[dict[tuple[object, str], bool]] = getattr(_LOCAL, "flags", None)
    if current is not None:
        answer = current.get((layer, adapter))
        if answer is not None:
            return answer
    return scales_reconstructible([scale])[0]


# ----- answers for compiled graphs ----------------------------------------------------------------------------------
def refresh_sites(sites: Iterable[tuple[object, str, torch.Tensor]]) -> None:
    """Recompute ``layer.ssf_keep_output[adapter]`` for every ``(layer, adapter, scale)`` (one sync for all)."""
    sites = [site for site in sites if site[2].device.type != "meta"]
    if sites:
        _record(sites, scales_reconstructible([scale for _, _, scale in sites]))


def refresh_scale_guard(model: torch.nn.Module) -> None:
    """Re-check every SSF scale of ``model`` for compiled graphs, after changing scales by hand (outside an optimizer
    step, ``load_state_dict`` or an eager training forward, which refresh it themselves)."""
    refresh_sites(
        (module, name, scale)
        for module in model.modules()
        if isinstance(getattr(module, "ssf_keep_output", None), dict)
        for name, scale in module.ssf_scale.items()
    )


def assert_compiled_scales(scale: torch.Tensor, layer: object, adapter: str) -> None:
    """Inside a compiled graph built for the output-keeping backward: fail the forward (no host sync, no graph break)
    if a scale is below ``RECONSTRUCT_MIN_SCALE`` after all, which only a write by hand outside an optimizer step
    can cause."""
    torch._assert_async(
        scale.detach().abs().amin() >= RECONSTRUCT_MIN_SCALE,
        f"SSF adapter '{adapter}' on {type(layer).__name__}: a scale is below {RECONSTRUCT_MIN_SCALE} but this "
        "compiled graph was built for scales at or above it (the scales were changed outside an optimizer step, "
        "e.g. by hand under torch.no_grad()). Call peft_ssf.refresh_scale_guard(model) after changing scales, "
        "then run the forward again.",
    )


#: SSF layers that a compiled graph was built for: an optimizer step that updates their scales refreshes their answers
_COMPILED: weakref.WeakSet[object] = weakref.WeakSet()
_HOOK: list[object] = []


@torch._dynamo.assume_constant_result
def note_compiled(layer: object) -> bool:
    """Called while Dynamo traces a fused SSF layer (the call runs once per trace, in Python, and leaves nothing in
    the graph): from then on optimizer steps refresh ``layer``'s answer. The optimizer post-step hook is registered
    on the first such call, so eager-only processes never have it."""
    _COMPILED.add(layer)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))
    return True


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Refresh the answers of compiled layers whose scales this step updated (one host sync for all of them)."""
    if not _COMPILED:
        return
    stepped = {p for group in optimizer.param_groups for p in group["params"]}
    sites = [
        (layer, adapter, scale)
        for layer in list(_COMPILED)
        for adapter, scale in layer.ssf_scale.items()
        if scale in stepped
    ]
    if sites:
        refresh_sites(sites)
