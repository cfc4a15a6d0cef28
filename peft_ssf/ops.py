"""The SSF arithmetic, ``y = scale * h + shift`` per channel, as autograd ops.

Two formulations with identical gradients:

* ``scale_shift_naive``: plain tensor ops. Autograd saves ``h`` (the op's output before SSF) to compute the gradient
  of ``scale``. Kept as the reference implementation.
* ``scale_shift_fused``: a custom autograd function that saves its *output* ``y`` instead; backward gets the scale
  gradient from ``y`` (see ``_ScaleShiftSaveOutput``). The next op (GELU, attention, a norm, ...) usually saves ``y``
  anyway, so the two saved tensors share one storage and SSF adds no activation memory. Inside a training forward
  with residual pairing (``residual.py``) a site feeding a residual add keeps the add's operands instead of ``y``.
  When some ``|scale|`` is below ``RECONSTRUCT_MIN_SCALE`` dividing by it would lose precision, so the function falls
  back to saving ``h``.

``scale`` and ``shift`` arrive already shaped for broadcasting (e.g. ``[C]`` for channels-last outputs or
``[C, 1, 1]`` for ``[N, C, H, W]`` outputs) and already cast to the activation dtype; ``shift`` may be ``None``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .guard import RECONSTRUCT_MIN_SCALE, scales_reconstructible
from .residual import INPLACE_HINT, KeptOutput, RebuiltInput, ResidualPairing

__all__ = ["RECONSTRUCT_MIN_SCALE", "scale_shift_fused", "scale_shift_naive"]


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the broadcast dimensions so that it has ``shape`` (a per-channel parameter shape)."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    out = grad.sum(dim=dims, keepdim=True) if dims else grad
    return out.reshape(shape)


_INPLACE_ERROR = (
    "SSF: the output of an SSF site (or its input) was modified in place after the forward pass, e.g. by "
    "ReLU(inplace=True) right after a targeted layer; the fused training op needs it for the scale gradient. "
)


def _version_of(y: torch.Tensor) -> Optional[int]:
    """``y``'s version counter in eager mode; None while compiling (Dynamo cannot guard on it, and compiled graphs
    are functional: an in-place change there is a new tensor, not a changed saved one)."""
    return None if torch.compiler.is_compiling() else y._version


def _saved(ctx: Any) -> tuple:
    """``ctx.saved_tensors``, with autograd's in-place error turned into one that names SSF and the fix.

    Under saved-tensor hooks (activation checkpointing recomputes the forward, ``save_on_cpu`` copies) autograd does
    not check versions, so an op that saved its output records the output's version (``ctx.out_version``) and
    compares it here: a recomputed output changed in place by the recomputed forward is refused too. A copy made when
    the output was saved starts again at version 0 and holds the value as saved, which is what backward needs.
    """
    try:
        saved = ctx.saved_tensors
    except RuntimeError as exc:
        if "inplace" not in str(exc) and "in-place" not in str(exc):
            raise
        raise RuntimeError(_INPLACE_ERROR + INPLACE_HINT) from exc
    version = getattr(ctx, "out_version", None)
    if version is not None and saved[0] is not None and not torch.compiler.is_compiling() and \
            saved[0]._version > version:
        raise RuntimeError(_INPLACE_ERROR + INPLACE_HINT)
    return saved


def _refuse_higher_order() -> None:
    """Backward runs with grad enabled only for ``create_graph=True``: the training ops' backward rebuilds values
    instead of keeping a graph, so their second derivatives would be wrong. Say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "SSF's fused training op does not support higher-order gradients (backward with create_graph=True, "
            "torch.autograd.grad(..., create_graph=True), double backward): its backward rebuilds values instead "
            "of keeping the graph. Use SSFConfig(fused=False) for this model."
        )


def _channel_sums(
    g: torch.Tensor, out: Optional[torch.Tensor], dims: list[int]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(sum(g), sum(g * out))`` over ``dims``, as float32 (or wider) per-channel vectors.

    On CUDA the reductions read half-precision inputs and accumulate in float32 directly. On the CPU a reduction with
    a wider ``dtype`` first copies its whole input to that dtype (several times slower), so half-precision inputs are
    summed in their own dtype, with a float32 accumulator inside and the result rounded once, as autograd's own
    reductions of the naive op under autocast are.
    """
    low = g.dtype in (torch.bfloat16, torch.float16)
    if low and g.device.type == "cpu":
        gsum = g.sum(dims).float()
        gy = (g * out).sum(dims).float() if out is not None else None
        return gsum, gy
    wide = torch.promote_types(g.dtype, torch.float32)
    gsum = g.sum(dims, dtype=wide)
    gy = (g * out).sum(dims, dtype=torch.promote_types(wide, out.dtype)) if out is not None else None
    return gsum, gy


def _scale_shift_grads(
    g: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    dims: list[int],
    need_scale: bool,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of ``scale`` and ``shift`` from the kept output: ``shift' = sum(g)``,
    ``scale' = (sum(g * y) - shift * sum(g)) / scale`` (``h`` is never rebuilt). Shaped like ``scale``."""
    gsum, gy = _channel_sums(g, out if need_scale else None, dims)
    grad_scale = None
    if need_scale:
        if shift is not None:
            gy = gy - shift.reshape(-1).to(gy.dtype) * gsum
        grad_scale = (gy / scale.reshape(-1).to(gy.dtype)).to(scale.dtype).reshape(scale.shape)
    return grad_scale, gsum


def scale_shift_naive(h: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference SSF op: ``h * scale + shift`` with autograd saving ``h``."""
    return h * scale if shift is None else torch.addcmul(shift, h, scale)


class _ScaleShiftSaveOutput(torch.autograd.Function):
    """``y = scale * h + shift`` keeping ``y`` (or, once paired, the residual stream) instead of ``h``.

    Backward needs ``sum(g * h)`` for the scale; with ``h = (y - shift) / scale`` that is
    ``(sum(g * y) - shift * sum(g)) / scale``, and ``sum(g)`` is the shift's gradient anyway, so ``h`` is never
    rebuilt: two passes over the activation (``g * y`` and the reductions) plus ``g * scale`` for the input.
    """

    @staticmethod
    def forward(ctx, h, scale, shift, from_output, mode):  # type: ignore[override]
        y = h * scale if shift is None else torch.addcmul(shift, h, scale)
        ctx.has_shift = shift is not None
        ctx.from_output = from_output
        ctx.kept = None
        if not from_output:
            ctx.save_for_backward(h, scale, shift)
        elif mode is not None:
            ctx.kept = KeptOutput(y)  # may be paired with a residual add later in the forward
            ctx.save_for_backward(scale, shift)
        else:
            ctx.save_for_backward(y, scale, shift)
            ctx.out_version = _version_of(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        _refuse_higher_order()
        if ctx.kept is not None:
            (scale, shift), act = _saved(ctx), None
        else:
            act, scale, shift = _saved(ctx)
        grad_h = grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_y * scale
        need_s, need_t = ctx.needs_input_grad[1], ctx.has_shift and ctx.needs_input_grad[2]
        if not ctx.from_output:
            if need_t:
                grad_t = _reduce_to(grad_y, shift.shape)
            if need_s:
                grad_s = _reduce_to(grad_y * act, scale.shape)
        elif need_s or need_t:
            channel = grad_y.dim() - scale.dim()  # scale is [C] or [C, 1, ...]: its first axis is the channel
            dims = [d for d in range(grad_y.dim()) if d != channel]
            y = (ctx.kept.output(grad_y.dtype) if ctx.kept is not None else act) if need_s else None
            grad_s, gsum = _scale_shift_grads(grad_y, y, scale, shift, dims, need_s)
            if need_t:
                grad_t = gsum.to(shift.dtype).reshape(shift.shape)
        return grad_h, grad_s, grad_t, None, None


def scale_shift_fused(
    h: torch.Tensor,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    *,
    from_output: Optional[bool] = None,
    mode: Optional[ResidualPairing] = None,
    owner: object = None,
) -> torch.Tensor:
    """Memory-saving SSF op: same values and gradients as ``scale_shift_naive``, keeps its output instead of ``h``.

    Args:
        from_output: whether every ``|scale| >= RECONSTRUCT_MIN_SCALE`` (so the output can stand in for ``h``);
            checked here when None (one host-device sync). Layers pass the answer of ``guard.scale_guard``.
        mode: the active ``residual.ResidualPairing``; the output is tracked so that, if it meets a residual add
            with a float32 / float64 result, the op keeps the add's operands instead of its own output.
        owner: the SSF layer calling (recorded by the pairing mode to find residual sites).
    """
    if from_output is None:
        from_output = scales_reconstructible([scale])[0]
    if not from_output:
        mode = None
    y = _ScaleShiftSaveOutput.apply(h, scale, shift, from_output, mode)
    if mode is not None and y.grad_fn is not None:
        kept = getattr(y.grad_fn, "kept", None)
        if kept is not None:
            mode.track(y, kept, owner)
    return y


# ----- SSF on a frozen Linear / Conv ------------------------------------------------------------------------------
class _FoldedScaleShift(torch.autograd.Function):
    """SSF on a frozen Linear / Conv ``op`` that keeps only its output ``y`` (not the op's input, not ``h``).

    ``fold=True`` (float32): ``y = op(x, scale * W, scale * b + shift)``, the scale and shift folded into the weight
    and bias before the GEMM / convolution (a pass over the weight instead of one over the output); backward takes
    the input gradient from the same folded weight (or scales the gradient, whichever is smaller).

    ``fold=False`` (half precision): ``y = scale * op(x, W, b) + shift``, rounded exactly as the naive op rounds it
    (``scale * W`` rounded to bf16 is not ``scale * (W x)`` rounded, and the long differential search found a ReLU
    downstream flipping on that difference); backward gives ``g * scale`` to the op's input gradient, as autograd
    does for the naive op. Under autocast the weight is cast as autocast casts it and that copy is kept for backward,
    as autocast keeps it for a frozen op.

    Either way the scale / shift gradients come from the kept output as in ``_ScaleShiftSaveOutput``:
    ``shift' = sum(g)``, ``scale' = (sum(g * y) - shift * sum(g)) / scale``, reduced over every axis but the channel
    axis, accumulated in at least float32. The frozen op itself would keep its input; this keeps ``y`` instead, which
    the next op usually keeps anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, site, mode, fold):  # type: ignore[override]
        kept_w = None
        if fold:
            s = scale.to(weight.dtype)
            w = weight * s.view(site.weight_shape)
            t = shift.to(weight.dtype) if shift is not None else None
            b = None
            if bias is not None:
                b = bias * s if t is None else torch.addcmul(t, bias, s)
            elif t is not None:
                b = t
            y = site.run(x, w, b)
        else:
            low = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            w, b = weight, bias
            if low is not None and weight.dtype != low:  # cast as autocast would (it casts x itself)
                w = kept_w = weight.to(low)
                b = bias.to(low) if bias is not None else None
            h = site.run(x, w, b)
            s = scale.to(h.dtype).view(site.out_shape(h.dim()))
            y = h * s if shift is None else torch.addcmul(shift.to(h.dtype).view(s.shape), h, s)
        if y._is_view():  # F.linear on N-D input returns a view; autograd forbids in-place ops on a Function's views
            y = y.detach()
        ctx.site, ctx.has_shift, ctx.x_shape, ctx.fold = site, shift is not None, x.shape, fold
        ctx.kept = KeptOutput(y) if mode is not None else None
        ctx.save_for_backward(None if mode is not None else y, weight, kept_w, scale, shift)
        ctx.out_version = _version_of(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        _refuse_higher_order()
        y, weight, kept_w, scale, shift = _saved(ctx)
        site = ctx.site
        grad_x = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            if not ctx.fold:  # as autograd differentiates the naive op: g * scale, then the op's input gradient
                w = kept_w if kept_w is not None else weight
                grad_x = site.input_grad(g * scale.to(g.dtype).view(site.out_shape(g.dim())), w, ctx.x_shape)
            elif weight.numel() <= g.numel():
                grad_x = site.input_grad(g, weight * scale.to(weight.dtype).view(site.weight_shape), ctx.x_shape)
            else:
                grad_x = site.input_grad(g * scale.to(g.dtype).view(site.out_shape(g.dim())), weight, ctx.x_shape)
        need_scale = ctx.needs_input_grad[3]
        need_shift = ctx.has_shift and ctx.needs_input_grad[4]
        if need_scale or need_shift:
            out = (ctx.kept.output(g.dtype) if ctx.kept is not None else y) if need_scale else None
            grad_scale, gsum = _scale_shift_grads(g, out, scale, shift, site.reduce_dims(g.dim()), need_scale)
            if need_shift:
                grad_shift = gsum.to(shift.dtype)
        return grad_x, None, None, grad_scale, grad_shift, None, None, None


class FoldSite:
    """How one frozen op is run, differentiated and reduced for ``_FoldedScaleShift`` (Linear or ConvNd)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.is_linear = isinstance(module, torch.nn.Linear)
        self.out_channels = module.weight.shape[0]
        # the scale multiplies output channels: rows of a Linear weight, the first axis of a conv kernel
        self.weight_shape = (-1, 1) if self.is_linear else (-1,) + (1,) * (module.weight.dim() - 1)

    def run(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        if self.is_linear:
            return torch.nn.functional.linear(x, w, b)
        return self.module._conv_forward(x, w, b)

    def input_grad(self, g: torch.Tensor, w: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        if self.is_linear:  # as a 2-D product: matmul on a non-contiguous N-D gradient would expand the weight
            out = g.reshape(-1, g.shape[-1]).mm(w.to(g.dtype))
            return out.view(*g.shape[:-1], out.shape[-1])
        m = self.module
        conv_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
        return conv_input[w.dim() - 2](x_shape, w.to(g.dtype), g, m.stride, m.padding, m.dilation, m.groups)

    def reduce_dims(self, ndim: int) -> list[int]:
        channel = ndim - 1 if self.is_linear else 1
        return [d for d in range(ndim) if d != channel]

    def out_shape(self, ndim: int) -> list[int]:
        return [-1] if self.is_linear else [-1] + [1] * (ndim - 2)

    @staticmethod
    def supports(module: torch.nn.Module) -> bool:
        """Exact nn.Linear / ConvNd types, zero padding mode and numeric padding, no accelerate hook (the caller
        checks that the weights are frozen)."""
        if type(module) not in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
            return False
        if "_hf_hook" in module.__dict__:
            return False
        if isinstance(module, torch.nn.Linear):
            return True
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def folded_scale_shift(
    x: torch.Tensor,
    site: FoldSite,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    mode: Optional[ResidualPairing] = None,
    owner: object = None,
    fold: bool = True,
) -> torch.Tensor:
    """SSF on a frozen Linear / Conv keeping only its output (see ``_FoldedScaleShift``); ``fold``: fold scale and
    shift into the weight (float32), else run the op first and round as the naive op does (half precision).

    Same values as ``scale_shift_naive(op(x), scale, shift)`` (up to rounding with ``fold``, bit for bit without),
    same gradients as the naive op for ``x``, ``scale`` and ``shift``. Requires every
    ``|scale| >= RECONSTRUCT_MIN_SCALE`` (the caller checks); ``scale`` / ``shift`` are the raw ``[C]`` parameters.
    """
    m = site.module
    y = _FoldedScaleShift.apply(x, m.weight, m.bias, scale, shift, site, mode, fold)
    if mode is not None and y.grad_fn is not None:
        kept = getattr(y.grad_fn, "kept", None)
        if kept is not None:
            mode.track(y, kept, owner)
    return y


# ----- SSF after a half-precision LayerNorm -----------------------------------------------------------------------
class _LayerNormScaleShift(torch.autograd.Function):
    """``scale * LayerNorm(x) + shift`` for a frozen LayerNorm whose kernel runs in half precision (bf16 / fp16).

    Forward runs the norm's kernel, then the SSF op, in the activation dtype: the output is the naive op's bit for
    bit (folding SSF into the norm's weight rounds differently, enough to flip a ReLU downstream). Only what the norm
    keeps anyway is kept (``x``, or nothing when ``rebuild`` rebuilds it from the residual add, plus ``mean`` and
    ``rstd``), not the norm's output: backward gives ``g * scale`` to the norm's input-gradient kernel, as autograd
    does for the naive op, and computes the parameter gradients itself from ``xhat = (x - mean) * rstd`` with float32
    sums: the CPU kernel's half-precision parameter sums are 2% off over a few hundred tokens and up to a third off
    over a Swin-B stage (against float64). A trainable norm weight / bias (BitFit-style) gets the same sums.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, normalized_shape, eps, rebuild):  # type: ignore[override]
        h, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        s = scale.to(h.dtype)
        y = h * s if shift is None else torch.addcmul(shift.to(h.dtype), h, s)
        ctx.normalized_shape, ctx.has_shift, ctx.rebuild = normalized_shape, shift is not None, rebuild
        ctx.save_for_backward(None if rebuild is not None else x, mean, rstd, weight, bias, scale)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        _refuse_higher_order()
        x, mean, rstd, weight, bias, scale = _saved(ctx)
        if ctx.rebuild is not None:
            x = ctx.rebuild.input()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                g * scale.to(g.dtype), x, ctx.normalized_shape, mean, rstd, weight, bias, [True, False, False]
            )[0]
        need_weight, need_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        need_scale, need_shift = ctx.needs_input_grad[3], ctx.has_shift and ctx.needs_input_grad[4]
        grad_weight = grad_bias = grad_scale = grad_shift = None
        if need_weight or need_bias or need_scale or need_shift:
            dims = list(range(g.dim() - len(ctx.normalized_shape)))
            g32 = g.float()
            gb = g32.sum(dims)  # sum(g): the shift's gradient; times scale, the norm bias's
            grad_shift = gb.to(scale.dtype) if need_shift else None
            grad_bias = (gb * scale.float()).to(bias.dtype) if need_bias else None
            if need_scale or need_weight:
                xhat = (x.float() - mean.float()) * rstd.float()
                gw = (g32 * xhat).sum(dims)  # sum(g * xhat); the norm output is xhat * weight + bias
                if need_weight:
                    grad_weight = (gw * scale.float()).to(weight.dtype)
                if need_scale:
                    grad = gw * weight.float() + (gb * bias.float() if bias is not None else 0.0)
                    grad_scale = grad.to(scale.dtype)
        return grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, None, None


def layer_norm_scale_shift(
    x: torch.Tensor,
    norm: torch.nn.LayerNorm,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    rebuild: Optional[RebuiltInput] = None,
) -> torch.Tensor:
    """SSF after a frozen ``nn.LayerNorm`` on half-precision input (see ``_LayerNormScaleShift``): the naive op's
    output, float32-accurate parameter gradients, nothing kept beyond the norm's own.

    With ``rebuild`` (a half-precision residual stream, see ``residual.RebuiltInput``) the input is not kept but
    rebuilt in backward from the residual add's operands, which other ops keep anyway."""
    return _LayerNormScaleShift.apply(
        x, norm.weight, norm.bias, scale, shift, tuple(norm.normalized_shape), norm.eps, rebuild
    )
