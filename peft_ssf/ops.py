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

from typing import Optional

import torch

from .guard import RECONSTRUCT_MIN_SCALE, scales_reconstructible
from .residual import KeptOutput, ResidualPairing

__all__ = ["RECONSTRUCT_MIN_SCALE", "scale_shift_fused", "scale_shift_naive"]


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the broadcast dimensions so that it has ``shape`` (a per-channel parameter shape)."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    out = grad.sum(dim=dims, keepdim=True) if dims else grad
    return out.reshape(shape)


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
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "SSF's fused training op does not support higher-order gradients (backward with create_graph=True, "
                "torch.autograd.grad(..., create_graph=True), double backward): its backward rebuilds values "
                "instead of keeping the graph. Use SSFConfig(fused=False) for this model."
            )
        if ctx.kept is not None:
            (scale, shift), act = ctx.saved_tensors, None
        else:
            act, scale, shift = ctx.saved_tensors
        grad_h = grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_y * scale
        need_s, need_t = ctx.needs_input_grad[1], ctx.has_shift and ctx.needs_input_grad[2]
        if need_t:
            grad_t = _reduce_to(grad_y, shift.shape)
        if need_s and not ctx.from_output:
            grad_s = _reduce_to(grad_y * act, scale.shape)
        elif need_s:
            wide = torch.promote_types(grad_y.dtype, torch.float32)
            y = ctx.kept.output(wide) if ctx.kept is not None else act.to(wide)
            g = grad_y.to(wide)
            gy = _reduce_to(g * y, scale.shape)
            if shift is not None:
                gsum = grad_t if grad_t is not None and grad_t.dtype == wide else _reduce_to(g, shift.shape)
                gy = gy - shift.to(wide) * gsum
            grad_s = (gy / scale.to(wide)).to(scale.dtype)
        return grad_h, grad_s, grad_t, None, None


def scale_shift_fused(
    h: torch.Tensor,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    *,
    from_output: Optional[bool] = None,
    mode: Optional[ResidualPairing] = None,
) -> torch.Tensor:
    """Memory-saving SSF op: same values and gradients as ``scale_shift_naive``, keeps its output instead of ``h``.

    Args:
        from_output: whether every ``|scale| >= RECONSTRUCT_MIN_SCALE`` (so the output can stand in for ``h``);
            checked here when None (one host-device sync). Layers pass the answer of ``guard.scale_guard``.
        mode: the active ``residual.ResidualPairing`` (float32 / float64 outputs only); the output is tracked so
            that, if it meets a residual add, the op keeps the add's operands instead of its own output.
    """
    if from_output is None:
        from_output = scales_reconstructible([scale])[0]
    if mode is not None and (not from_output or h.dtype not in (torch.float32, torch.float64)):
        mode = None
    y = _ScaleShiftSaveOutput.apply(h, scale, shift, from_output, mode)
    if mode is not None and y.grad_fn is not None:
        kept = getattr(y.grad_fn, "kept", None)
        if kept is not None:
            mode.track(y, kept)
    return y
