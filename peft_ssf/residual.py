"""Residual pairing: fused SSF sites that feed a residual add keep no activation of their own.

The fused SSF op (``ops.scale_shift_fused``) keeps its output ``y`` for the scale gradient. Most of the time the
next op keeps ``y`` anyway (GELU after ``fc1``, attention after ``q`` / ``k`` / ``v``), so that costs nothing. The
exception is a site whose output goes straight into a residual add ``z = r + y`` (a transformer block's attention
output and second MLP projection): the add saves nothing, so ``y`` would be SSF's own memory, about a fifth of a
ViT's saved activations. But ``r`` and ``z`` are kept already, by the norms on both sides of the add in a pre-norm
block, so backward can rebuild ``y = z - r``.

``ResidualPairing`` is a ``TorchFunctionMode`` that SSFModel enters around *training* forwards (``model.train()``,
grad enabled, ``SSFConfig(fused=True, pair_residuals=True)``, the defaults). It follows every tracked SSF output
through value-preserving reshuffles (view / reshape / flatten / permute / transpose / contiguous / roll: Swin's
window reverse and cyclic shift) to an add with a tensor of the same shape and float32 / float64 result, then
tells the op's record to keep ``(r, z)`` instead of ``y``. Anything else (dropout with ``p > 0``, slicing, a
layer-scale multiply, an in-place add) leaves the site as it was: it keeps ``y``.

A half-precision residual stream (a bf16 / fp16 model; Swin under CPU autocast) is the other way round: its rounding
is large against a branch output, so ``z - r`` cannot stand in for ``y``, and the site keeps ``y``. Then the *norm*
after the add need not keep ``z``: ``r`` and ``y`` are kept, and replaying the add (``RebuiltInput``) gives ``z`` bit
for bit. A norm whose ``r`` is itself rebuilt replays the chain of adds back to a norm that keeps its input; every
``MAX_REBUILD_DEPTH`` adds one does, which bounds the replays in backward.

Precision: ``z - r`` equals ``y`` up to float32 rounding of the residual stream, i.e. a relative error of about
``1e-7 * |r| / |y|`` per element; the parameter gradients are sums over all tokens and agree with the unpaired op
to about 1e-6 relative (tested). Tensors kept by a paired record bypass ``torch.autograd.graph.saved_tensors_hooks``
(``save_on_cpu`` would not offload them), so pairing switches itself off while such hooks are active (activation
checkpointing, offloading); ``pair_residuals=False`` turns it off everywhere.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

_ADD_NAMES = frozenset({"add", "__add__", "__radd__"})
_MUL_NAMES = frozenset({"mul", "__mul__", "__rmul__"})
#: a frozen per-channel multiplier (ConvNeXt's layer scale) is undone by division when all its |entries| reach this
LAYER_SCALE_MIN = 1e-2
_MULTIPLIER_OK: dict[tuple[int, int, int], bool] = {}
_SHUFFLE_NAMES = frozenset({"view", "reshape", "flatten", "unflatten", "contiguous", "permute", "transpose", "roll"})
_PAIRABLE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
#: longest chain of residual adds a norm replays to rebuild its input (every this many adds, a norm keeps its input)
MAX_REBUILD_DEPTH = 8

_LOCAL = threading.local()


class KeptOutput:
    """Where one fused SSF site finds its output ``y`` in backward: ``y`` itself, or ``inverse(z - r)``.

    All tensors are detached (no reference cycle through the graph); they share their version counter with the
    forward's tensors, so an in-place change after the forward is detected instead of giving wrong gradients.
    """

    __slots__ = ("y", "pair", "inverses", "versions")

    def __init__(self, y: torch.Tensor) -> None:
        self.y: Optional[torch.Tensor] = y.detach()
        self.pair: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.inverses: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
        self.versions: tuple[int, ...] = (y._version,)

    def pair_with(self, r: torch.Tensor, z: torch.Tensor, inverses: tuple) -> None:
        """Drop ``y``; rebuild it in backward as ``z - r`` undone through ``inverses`` (last reshuffle first)."""
        self.pair = (r.detach(), z.detach())
        self.versions = (r._version, z._version)
        self.inverses = inverses
        self.y = None

    def output(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``y`` in ``dtype`` (rebuilt if paired; None: as kept, or in the residual stream's dtype when rebuilt);
        raises if a tensor it needs was modified in place."""
        tensors = (self.y,) if self.pair is None else self.pair
        if tuple(t._version for t in tensors) != self.versions:
            raise RuntimeError(
                "SSF: a tensor needed for the scale gradient was modified in place after the forward pass "
                + ("(the op's output)." if self.pair is None else
                   "(the residual stream this site's output was added to). Set SSFConfig(pair_residuals=False) "
                   "for models that update their residual stream in place.")
            )
        if self.pair is None:
            return self.y if dtype is None else self.y.to(dtype)
        r, z = self.pair
        d = z - r  # in the residual stream's own (float32 / float64) precision, then cast
        for inverse in reversed(self.inverses):
            d = inverse(d)
        return d if dtype is None else d.to(dtype)


class RebuiltInput:
    """How a norm site gets its input ``z = r + P(y)`` back in backward instead of keeping it.

    For a half-precision residual stream (a bf16 / fp16 model, or Swin under CPU autocast), ``z - r`` cannot stand in
    for ``y``: the stream's rounding is large against a branch output. The opposite direction is exact: ``y`` is kept
    by its SSF site, ``r`` by the norm before the add, and replaying the add (and the reshuffles ``P`` between the
    site and the add: Swin's window reverse and roll) in the same dtype gives ``z`` bit for bit, because an
    elementwise add has one correctly rounded result whatever the layout. So the norm after the add keeps nothing of
    its own.
    """

    __slots__ = ("r", "record", "forwards", "version", "depth")

    def __init__(self, r: torch.Tensor | RebuiltInput, record: KeptOutput, forwards: tuple) -> None:
        # ``r`` itself may be rebuilt (a chain of adds back to a kept anchor, at most MAX_REBUILD_DEPTH long)
        self.r = r if isinstance(r, RebuiltInput) else r.detach()
        self.record = record
        self.forwards = forwards
        self.version = None if isinstance(r, RebuiltInput) else r._version
        self.depth = r.depth + 1 if isinstance(r, RebuiltInput) else 1

    def input(self) -> torch.Tensor:
        """``z``, rebuilt; raises if the residual stream or the site's output was modified in place."""
        y = self.record.output()
        for forward in self.forwards:
            y = forward(y)
        if isinstance(self.r, RebuiltInput):
            return self.r.input().add_(y)  # a fresh tensor of ours: one allocation for the whole chain
        if self.r._version != self.version:
            raise RuntimeError(
                "SSF: the residual stream added to an SSF site's output was modified in place after the forward "
                "pass. Set SSFConfig(pair_residuals=False) for models that update their residual stream in place."
            )
        return self.r + y


def _replay(func: Any, rest: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda d: func(d, *rest, **kwargs)


def _inverse_of(func: Any, args: tuple, kwargs: dict, src: torch.Tensor) -> Optional[Callable]:
    """Inverse of a value-preserving reshuffle applied to ``src`` (or None when it is not one we can undo)."""
    name = getattr(func, "__name__", "")
    shape = src.shape
    if name in ("view", "reshape", "flatten", "unflatten", "contiguous"):
        if name == "view" and len(args) > 1 and isinstance(args[1], torch.dtype):
            return None  # a dtype view reinterprets bits
        return lambda d: d.reshape(shape)
    if name == "permute":
        dims = kwargs.get("dims", args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
        order = [int(i) % src.dim() for i in dims]
        back = [order.index(i) for i in range(len(order))]
        return lambda d: d.permute(back)
    if name == "transpose" and len(args) == 3 and not kwargs:
        a, b = args[1], args[2]
        return lambda d: d.transpose(a, b)
    if name == "roll":
        shifts = kwargs.get("shifts", args[1] if len(args) > 1 else None)
        dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
        if shifts is None or dims is None:
            return None
        back = tuple(-s for s in shifts) if isinstance(shifts, (list, tuple)) else -shifts
        return lambda d: torch.roll(d, back, dims)
    return None


class ResidualPairing(TorchFunctionMode):
    """Pairs tracked SSF outputs with the residual add they feed (see the module docstring).

    A Python ``__torch_function__`` costs microseconds per torch call, so the mode is only active where it can pair:
    in a *discovery* forward (``sites=None``) it watches the whole forward and records which sites paired; later
    forwards pass those sites, and the mode is entered when such a site produces its output and left at the next
    site once nothing is pending (typically two intercepted calls per site: a dropout and the add).
    """

    def __init__(self, sites: Optional[frozenset[int]] = None) -> None:
        super().__init__()
        self.sites = sites
        # id(tensor) -> (weakref, the site's record, inverses back to y, site id, replays from y or None)
        self.pending: dict[int, tuple[weakref.ref, KeptOutput, tuple, int, Optional[tuple]]] = {}
        self.paired = 0
        self.rebuilt = 0  # norm sites that rebuild their input (half-precision streams) in this forward
        # half-precision adds fed by a tracked site: id(z) -> (weakref z, z's version, how to rebuild z); and the
        # norm inputs kept by their norm
        self.rebuilds: dict[int, tuple[weakref.ref, int, RebuiltInput]] = {}
        self.kept_inputs: dict[int, tuple[weakref.ref]] = {}
        self.rebuilt_inputs: dict[int, tuple[weakref.ref, RebuiltInput]] = {}  # norm inputs rebuilt in backward
        self.entered = False  # scoped mode: currently on the torch-function mode stack
        self.tracked = 0  # site outputs followed in this forward
        # discovery: inputs of the norm sites (id -> weakref), and each pairing's site with its r and z. r and z are
        # held strongly until ``take_paired_sites``: saved-tensor hooks may keep other tensor objects than these
        self.norm_inputs: dict[int, weakref.ref] = {}
        self.candidates: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def wants(self, layer: object) -> bool:
        """Whether ``layer``'s output should be tracked this forward."""
        return self.sites is None or id(layer) in self.sites

    def track(self, y: torch.Tensor, record: KeptOutput, layer: object = None) -> None:
        """Follow ``y`` (an SSF output whose op keeps ``record``) until it meets a residual add."""
        self.pending[id(y)] = (weakref.ref(y), record, (), id(layer), ())
        self.tracked += 1
        if self.sites is not None and not self.entered:
            self.__enter__()
            self.entered = True

    def norm_input(self, x: torch.Tensor, can_rebuild: bool = False) -> Optional[RebuiltInput]:
        """A norm site received ``x``. Returns how to rebuild ``x`` in backward when it may (``can_rebuild``: the site
        can run without keeping its input) and should: ``x`` is a half-precision ``r + P(y)`` of a tracked site and
        ``r`` is kept by a norm that keeps its input. Otherwise the norm keeps ``x``, and pairing with it is free."""
        if self.sites is None:
            self.norm_inputs[id(x)] = weakref.ref(x)
        known = self.rebuilds.pop(id(x), None) if can_rebuild else None
        if known is not None and known[0]() is x and x._version == known[1]:  # not changed in place since the add
            recipe = known[2]
            self.rebuilt += 1
            self.rebuilt_inputs[id(x)] = (weakref.ref(x), recipe)
            return recipe
        self.kept_inputs[id(x)] = (weakref.ref(x),)
        return None

    def _anchor_of(self, r: torch.Tensor) -> Optional[torch.Tensor | RebuiltInput]:
        """What a norm rebuilding ``z = r + P(y)`` starts from: ``r`` if a norm keeps it, ``r``'s own recipe if a
        norm rebuilds it and the chain stays within ``MAX_REBUILD_DEPTH``, else None (the norm keeps ``z``)."""
        entry = self.kept_inputs.get(id(r))
        if entry is not None and entry[0]() is r:
            return r
        entry = self.rebuilt_inputs.get(id(r))
        if entry is not None and entry[0]() is r and entry[1].depth < MAX_REBUILD_DEPTH:
            return entry[1]
        return None

    def _kept_by_a_norm(self, t: torch.Tensor) -> bool:
        known = self.norm_inputs.get(id(t))
        return known is not None and known() is t

    def take_paired_sites(self) -> frozenset[int]:
        """After a discovery forward: the sites worth pairing, and the tensors held to find them are released.

        A site is worth pairing when both tensors it keeps instead of its output (the add's operand ``r`` and result
        ``z``) are inputs of norm sites, which keep them anyway (pre-norm blocks: ViT, Swin, DINOv2, BEiT). Where
        they are not (ConvNeXt's block input feeds an SSF depthwise-conv site, which keeps its output, not its
        input), pairing would keep two tensors instead of one, so later forwards leave those sites unpaired."""
        kept = self._kept_by_a_norm
        sites = frozenset(site for site, r, z in self.candidates if kept(r) and kept(z))
        self.candidates.clear()
        self.norm_inputs.clear()
        return sites

    def site_starts(self) -> None:
        """An SSF site begins its forward: leave a scoped mode once nothing is left to pair."""
        if not self.entered:
            return
        for key in [k for k, entry in self.pending.items() if entry[0]() is None]:
            del self.pending[key]
        if not self.pending:
            self.leave()

    def leave(self) -> None:
        """Pop a scoped mode (only from the top of the stack: another mode pushed since stays intact)."""
        if self.entered and _top_torch_function_mode() is self:
            self.__exit__(None, None, None)
            self.entered = False

    def _entry(self, t: Any) -> Optional[tuple[weakref.ref, KeptOutput, tuple, int, Optional[tuple]]]:
        entry = self.pending.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry[0]() is t else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.pending or not isinstance(out, torch.Tensor) or not args:
            return out
        name = getattr(func, "__name__", "")
        if name in _ADD_NAMES:
            if len(args) == 2 and not kwargs:
                for y, r in ((args[0], args[1]), (args[1], args[0])):
                    entry = self._entry(y)
                    if entry is None or not isinstance(r, torch.Tensor) or not r.shape == y.shape == out.shape:
                        continue
                    if out.dtype in _PAIRABLE_DTYPES:
                        entry[1].pair_with(r, out, entry[2])
                        self.paired += 1
                    elif out.dtype in _HALF_DTYPES and r.dtype == y.dtype == out.dtype and entry[4] is not None:
                        # the site keeps y; the norm after the add may rebuild z instead of keeping it
                        # r must be resolved now: a rebuilt r is kept by nobody and dies after this add
                        base = self._anchor_of(r)
                        if base is not None:
                            recipe = RebuiltInput(base, entry[1], entry[4])
                            self.rebuilds[id(out)] = (weakref.ref(out), out._version, recipe)
                    else:
                        break
                    del self.pending[id(y)]
                    if self.sites is None:
                        self.candidates.append((entry[3], r, out))
                    break
        elif name in _SHUFFLE_NAMES and out is not args[0]:
            entry = self._entry(args[0])
            if entry is not None:
                inverse = _inverse_of(func, args, kwargs, args[0])
                if inverse is not None:
                    replays = None if entry[4] is None else entry[4] + (_replay(func, args[1:], kwargs),)
                    self.pending[id(out)] = (weakref.ref(out), entry[1], entry[2] + (inverse,), entry[3], replays)
        elif name in _MUL_NAMES and len(args) == 2 and not kwargs:
            for y, m in ((args[0], args[1]), (args[1], args[0])):
                entry = self._entry(y)
                if entry is not None and out.shape == y.shape and _frozen_multiplier(m, y):
                    inverse = _divide_by(m)  # (not replayed: a half-precision stream is never rebuilt through it)
                    self.pending[id(out)] = (weakref.ref(out), entry[1], entry[2] + (inverse,), entry[3], None)
                    break
        return out


def _frozen_multiplier(m: Any, y: torch.Tensor) -> bool:
    """Whether ``y * m`` can be undone by division: ``m`` a frozen per-channel vector along ``y``'s last axis (or a
    frozen scalar) with every ``|entry| >= LAYER_SCALE_MIN``.

    A rebuilt ``y = (z - r) / m`` carries the rounding of ``z`` divided by ``m``, but the gradient reaching ``y`` is
    ``m`` times the one reaching ``z``, so the error in the scale gradient is the same as for an unscaled residual;
    the floor on ``|m|`` keeps the rebuilt values themselves meaningful (a layer scale at its 1e-6 initial value is
    not paired). The check reads ``m`` once per storage and version: frozen weights do not change between steps.
    """
    if not isinstance(m, torch.Tensor) or m.requires_grad or not m.is_floating_point():
        return False
    if m.dim() > 1 or (m.dim() == 1 and m.shape[0] != y.shape[-1]):
        return False
    key = (id(m), m.data_ptr(), m._version)
    ok = _MULTIPLIER_OK.get(key)
    if ok is None:
        ok = bool(m.detach().abs().min() >= LAYER_SCALE_MIN) if m.numel() else False
        if len(_MULTIPLIER_OK) > 4096:
            _MULTIPLIER_OK.clear()
        _MULTIPLIER_OK[key] = ok
    return ok


def _divide_by(m: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    frozen, version = m.detach(), m._version

    def inverse(d: torch.Tensor) -> torch.Tensor:
        if frozen._version != version:
            raise RuntimeError(
                "SSF: a per-channel multiplier (layer scale) between this site and its residual add was modified "
                "in place after the forward pass. Set SSFConfig(pair_residuals=False) for this model."
            )
        return d / frozen

    return inverse


def active() -> Optional[ResidualPairing]:
    """The pairing mode of the running training forward in this thread, if it may be used right now.

    Not while ``saved_tensors_hooks`` are active (activation checkpointing, ``save_on_cpu``): they must see every
    tensor a site needs, and a checkpoint's recomputation (which runs without the mode) must save the same tensors
    as the original forward. Hooks declared pure observers with ``hooks_only_observe()`` do not count.
    """
    mode = getattr(_LOCAL, "mode", None)
    if mode is None:
        return None
    if not getattr(_LOCAL, "observing", False) and _saved_tensor_hooks_active():
        return None
    return mode


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # unknown torch internals: be safe, never pair
        return True
    return top(False) is not None


@contextmanager
def hooks_only_observe() -> Iterator[None]:
    """Declare the ``saved_tensors_hooks`` active inside as observers (they return what they get, e.g. to count
    saved bytes), so pairing stays on. Used by the benchmarks; do not use it around checkpointing or offloading."""
    before = getattr(_LOCAL, "observing", False)
    _LOCAL.observing = True
    try:
        yield
    finally:
        _LOCAL.observing = before


def _top_torch_function_mode() -> Any:
    depth = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(depth - 1) if depth else None


@contextmanager
def pairing(sites: Optional[frozenset[int]] = None) -> Iterator[ResidualPairing]:
    """Enable residual pairing for the forward passes run inside (one training forward at a time).

    Args:
        sites: ids of the SSF layers whose output fed a residual add in an earlier forward of this model (the mode
            is then entered only around them); None watches the whole forward to find them (``take_paired_sites``).
    """
    outer = getattr(_LOCAL, "mode", None)
    if outer is not None:  # nested forward (e.g. a wrapped model inside another): the outer mode serves both
        yield outer
        return
    mode = ResidualPairing(sites)
    _LOCAL.mode = mode
    try:
        if sites is None:
            with mode:
                yield mode
        else:
            yield mode
    finally:
        _LOCAL.mode = None
        mode.leave()
        mode.pending.clear()
        mode.rebuilds.clear()
        mode.kept_inputs.clear()
        mode.rebuilt_inputs.clear()
