"""Residual pairing: fused SSF sites that feed a residual add keep no activation of their own.

The fused SSF op (``ops.scale_shift_fused`` / ``ops.folded_scale_shift``) keeps its output ``y`` for the scale
gradient. Usually the next op keeps ``y`` anyway (GELU after ``fc1``, attention after ``q`` / ``k`` / ``v``), so that
costs nothing. The exception is a site whose output goes straight into a residual add ``z = r + y`` (a transformer
block's attention output and second MLP projection): the add keeps nothing, so ``y`` would be SSF's own memory, about
a fifth of a ViT's saved activations. In a pre-norm block ``r`` and ``z`` are kept anyway, by the norms on both sides
of the add, so backward can rebuild ``y = z - r``.

How it works, in one training forward:

1. ``SSFModel`` enters a ``ResidualPairing`` (a ``TorchFunctionMode``) around the whole forward with ``with``, so the
   mode stack is always left in LIFO order.
2. A fused site hands its output and record to ``track``: the output tensor gets a ``_Pending`` mark.
3. The mode watches every torch call. A value-preserving reshuffle of a marked tensor (view / reshape / flatten /
   permute / transpose / contiguous / roll: Swin's window reverse and cyclic shift) marks its result too, with the
   inverse reshuffle. An out-of-place add of a marked tensor and another tensor of the same shape, with a float32 /
   float64 result, pairs the record: it drops ``y`` and keeps ``(r, z)``. Anything else (dropout with ``p > 0``,
   slicing, a multiply, an in-place change) leaves the site as it was: it keeps ``y``.
4. At the end of the forward every mark is removed.

Marks live on the tensors themselves (a Python attribute), so nothing is keyed by ``id()`` and a freed tensor cannot be
mistaken for a new one. Every kept tensor carries its version counter; a change in place after the forward raises an
error naming SSF and the fix instead of giving a wrong gradient, and a site output changed in place *before* the add
(``y.mul_(2)``) is not paired.

Which sites pay off is found in the first training forward (*discovery*): a pairing is worth it only when both ``r``
and ``z`` are inputs of SSF norm sites, which keep them anyway (ViT, Swin, DINOv2, BEiT). Where they are not
(ConvNeXt's block input feeds an SSF depthwise conv, which keeps its output, not its input), pairing would keep two
tensors instead of one, so later forwards track only the sites found worth pairing.

A half-precision residual stream (a bf16 / fp16 model; Swin under CPU autocast) is the other way round: its rounding
is large against a branch output, so ``z - r`` cannot stand in for ``y`` and the site keeps ``y``. Then the *norm*
after the add need not keep ``z``: ``r`` and ``y`` are kept, and replaying the add (``RebuiltInput``) gives ``z`` bit
for bit. A norm whose ``r`` is itself rebuilt replays the chain of adds back to a norm that keeps its input; every
``MAX_REBUILD_DEPTH`` adds one does, which bounds the replays in backward.

Precision: ``z - r`` equals ``y`` up to float32 rounding of the residual stream, i.e. a relative error of about
``1e-7 * |r| / |y|`` per element; the parameter gradients are sums over all tokens and agree with the unpaired op
to about 1e-6 relative (tested). Tensors kept by a paired record bypass ``torch.autograd.graph.saved_tensors_hooks``
(``save_on_cpu`` would not offload them), so pairing is off while such hooks are active (activation checkpointing,
offloading); ``SSFConfig(pair_residuals=False)`` turns it off everywhere.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

_ADD_NAMES = frozenset({"add", "__add__", "__radd__"})
_SHUFFLE_NAMES = frozenset({"view", "reshape", "flatten", "unflatten", "contiguous", "permute", "transpose", "roll"})
_PAIRABLE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
#: longest chain of residual adds a norm replays to rebuild its input (every this many adds, a norm keeps its input)
MAX_REBUILD_DEPTH = 8
#: the attribute that marks a tensor during one training forward (removed at its end)
_MARK = "_ssf_residual_mark"

_LOCAL = threading.local()

INPLACE_HINT = (
    "Use SSFConfig(fused=False) for models that change an SSF site's output or residual stream in place (or make the "
    "in-place op out-of-place, e.g. ReLU(inplace=False))."
)

STREAM_HINT = "Set SSFConfig(pair_residuals=False) for models that update their residual stream in place."


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

    def unchanged(self) -> bool:
        """Whether ``y`` is still as the op produced it (not changed in place since)."""
        return self.y is not None and self.y._version == self.versions[0]

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
            if self.pair is None:
                what, fix = "the op's output", INPLACE_HINT
            else:
                what, fix = "the residual stream this site's output was added to", STREAM_HINT
            raise RuntimeError(
                f"SSF: a tensor the fused training op needs for the scale gradient ({what}) was modified in place "
                f"after the forward pass. {fix}"
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

    For a half-precision residual stream, ``z - r`` cannot stand in for ``y``. The opposite direction is exact: ``y``
    is kept by its SSF site, ``r`` by the norm before the add, and replaying the add (and the reshuffles ``P`` between
    the site and the add: Swin's window reverse and roll) in the same dtype gives ``z`` bit for bit, because an
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
                f"pass. {STREAM_HINT}"
            )
        return self.r + y


@dataclass(frozen=True)
class _Pending:
    """A tensor derived from a site's output ``y`` by reshuffles, on its way to a residual add."""

    record: KeptOutput
    site: object  # the SSF layer
    version: int  # the marked tensor's version when marked: a change in place since then stops the pairing
    inverses: tuple  # undo the reshuffles, back to y
    replays: tuple  # redo them from y (to rebuild a half-precision norm input)


@dataclass(frozen=True)
class _Rebuild:
    """A half-precision ``z = r + P(y)``: the norm it feeds may rebuild it instead of keeping it."""

    version: int
    recipe: RebuiltInput


@dataclass(frozen=True)
class _NormInput:
    """A tensor a norm site received: kept by that norm (``recipe`` None) or rebuilt in backward."""

    recipe: Optional[RebuiltInput]


@dataclass
class _Marks:
    """Everything one forward attached to one tensor (see ``_MARK``)."""

    mode: ResidualPairing
    pending: Optional[_Pending] = None
    rebuild: Optional[_Rebuild] = None
    norm: Optional[_NormInput] = None


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


def _replay(func: Any, rest: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda d: func(d, *rest, **kwargs)


class ResidualPairing(TorchFunctionMode):
    """Pairs tracked SSF outputs with the residual add they feed (see the module docstring).

    Args:
        sites: the SSF layers worth pairing, found by an earlier forward of this model; None watches all of them
            (discovery, see ``take_paired_sites``).
    """

    def __init__(self, sites: Optional[frozenset] = None) -> None:
        super().__init__()
        self.sites = sites
        self.paired = 0  # sites paired in this forward
        self.rebuilt = 0  # norm sites that rebuild their input (half-precision streams) in this forward
        self.tracked = 0  # site outputs followed in this forward
        self.pending = 0  # marked tensors that may still reach an add (0: every torch call passes straight through)
        self._marked: list[weakref.ref] = []  # tensors carrying a mark, to clear them at the end
        # discovery: each pairing's (site, r, z), held until ``take_paired_sites`` (saved-tensor hooks may keep other
        # tensor objects than these)
        self.candidates: list[tuple[object, torch.Tensor, torch.Tensor]] = []

    # ----- marks ----------------------------------------------------------------------------------------------
    def _marks(self, t: Any, create: bool = False) -> Optional[_Marks]:
        if not isinstance(t, torch.Tensor):
            return None
        marks = getattr(t, _MARK, None)
        if marks is not None and marks.mode is self:
            return marks
        if not create:
            return None
        marks = _Marks(self)
        setattr(t, _MARK, marks)
        self._marked.append(weakref.ref(t))
        return marks

    def _set_pending(self, t: torch.Tensor, pending: _Pending) -> None:
        self._marks(t, create=True).pending = pending
        self.pending += 1

    def _take_pending(self, t: Any) -> Optional[_Pending]:
        marks = self._marks(t)
        return marks.pending if marks is not None else None

    def clear(self) -> None:
        """Remove every mark this forward attached (tensors that outlive the forward carry nothing of it)."""
        for ref in self._marked:
            t = ref()
            if t is not None and getattr(t, _MARK, None) is not None and getattr(t, _MARK).mode is self:
                delattr(t, _MARK)
        self._marked.clear()
        self.pending = 0

    # ----- what sites and norms report --------------------------------------------------------------------------
    def wants(self, layer: object) -> bool:
        """Whether ``layer``'s output should be tracked this forward."""
        return self.sites is None or layer in self.sites

    def track(self, y: torch.Tensor, record: KeptOutput, layer: object) -> None:
        """Follow ``y`` (an SSF output whose op keeps ``record``) until it meets a residual add."""
        self._set_pending(y, _Pending(record, layer, y._version, (), ()))
        self.tracked += 1

    def norm_input(self, x: torch.Tensor, can_rebuild: bool = False) -> Optional[RebuiltInput]:
        """A norm site received ``x``. Returns how to rebuild ``x`` in backward when it may (``can_rebuild``: the site
        can run without keeping its input) and should: ``x`` is a half-precision ``r + P(y)`` of a tracked site and
        ``r`` is kept by a norm that keeps its input. Otherwise the norm keeps ``x``, and pairing with it is free."""
        marks = self._marks(x, create=True)
        known = marks.rebuild if can_rebuild else None
        if known is not None and x._version == known.version:  # not changed in place since the add
            self.rebuilt += 1
            marks.norm = _NormInput(known.recipe)
            return known.recipe
        marks.norm = _NormInput(None)
        return None

    def _anchor_of(self, r: torch.Tensor) -> Optional[torch.Tensor | RebuiltInput]:
        """What a norm rebuilding ``z = r + P(y)`` starts from: ``r`` if a norm keeps it, ``r``'s own recipe if a
        norm rebuilds it and the chain stays within ``MAX_REBUILD_DEPTH``, else None (the norm keeps ``z``)."""
        marks = self._marks(r)
        if marks is None or marks.norm is None:
            return None
        recipe = marks.norm.recipe
        if recipe is None:
            return r
        return recipe if recipe.depth < MAX_REBUILD_DEPTH else None

    def _is_norm_input(self, t: torch.Tensor) -> bool:
        marks = self._marks(t)
        return marks is not None and marks.norm is not None

    def take_paired_sites(self) -> frozenset:
        """After a discovery forward: the sites worth pairing (both tensors a paired site keeps instead of its output,
        the add's operand ``r`` and result ``z``, are inputs of norm sites, which keep them anyway)."""
        sites = frozenset(site for site, r, z in self.candidates if self._is_norm_input(r) and self._is_norm_input(z))
        self.candidates.clear()
        return sites

    # ----- the interception -----------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.pending or not isinstance(out, torch.Tensor) or not args:
            return out
        name = getattr(func, "__name__", "")
        if name in _ADD_NAMES and len(args) == 2 and not kwargs:
            self._at_add(args[0], args[1], out)
        elif name in _SHUFFLE_NAMES and out is not args[0]:
            src = args[0]
            pending = self._take_pending(src)
            if pending is not None and src._version == pending.version:
                inverse = _inverse_of(func, args, kwargs, src)
                if inverse is not None:
                    replays = pending.replays + (_replay(func, args[1:], kwargs),)
                    inverses = pending.inverses + (inverse,)
                    self._set_pending(out, _Pending(pending.record, pending.site, out._version, inverses, replays))
        return out

    def _at_add(self, a: Any, b: Any, z: torch.Tensor) -> None:
        for y, r in ((a, b), (b, a)):
            pending = self._take_pending(y)
            if pending is None or not isinstance(r, torch.Tensor) or not (r.shape == y.shape == z.shape):
                continue
            if y._version != pending.version or not pending.record.unchanged():
                return  # changed in place on its way here: the site keeps y (and its backward checks y's version)
            if z.dtype in _PAIRABLE_DTYPES:
                pending.record.pair_with(r, z, pending.inverses)
                self.paired += 1
            elif z.dtype in _HALF_DTYPES and r.dtype == y.dtype == z.dtype:
                # the site keeps y; the norm after the add may rebuild z instead of keeping it. r is resolved now: a
                # rebuilt r is kept by nobody and dies after this add
                base = self._anchor_of(r)
                if base is not None:
                    recipe = RebuiltInput(base, pending.record, pending.replays)
                    self._marks(z, create=True).rebuild = _Rebuild(z._version, recipe)
            else:
                return
            self._marks(y).pending = None
            self.pending -= 1
            if self.sites is None:
                self.candidates.append((pending.site, r, z))
            return


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


@contextmanager
def pairing(sites: Optional[frozenset] = None) -> Iterator[ResidualPairing]:
    """Residual pairing for the training forward run inside: the mode is entered here and left here (LIFO).

    Args:
        sites: the SSF layers found worth pairing by an earlier forward of this model; None watches all of them.
    """
    outer = getattr(_LOCAL, "mode", None)
    if outer is not None:  # nested forward (e.g. a wrapped model inside another): the outer mode serves both
        yield outer
        return
    mode = ResidualPairing(sites)
    _LOCAL.mode = mode
    try:
        with mode:
            yield mode
    finally:
        _LOCAL.mode = None
        mode.clear()
