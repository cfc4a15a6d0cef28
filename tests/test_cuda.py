"""GPU checks: the fused SSF op on CUDA (fp32, bf16 autocast, compiled) against the naive op, and the scale guard
under CUDA's fused AdamW. Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_vit
from peft import get_peft_model

from peft_ssf import SSFConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LABELS = torch.tensor([0, 1, 2, 3])


def _pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    fused = get_peft_model(FAMILIES[family](), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    naive = get_peft_model(
        FAMILIES[family](), SSFConfig(init_weights=False, modules_to_save=["classifier"], fused=False)
    )
    naive.load_state_dict(fused.state_dict())
    return fused.cuda().train(), naive.cuda().train()


def _grads(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(pixel_values=x).logits
    torch.nn.functional.cross_entropy(logits.float(), LABELS.cuda()).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_matches_naive_on_cuda(family, autocast, pixels):
    fused, naive = _pair(family)
    x = pixels.cuda()
    got, want = _grads(fused, x, autocast), _grads(naive, x, autocast)
    tol = 2e-2 if autocast else 1e-4  # bf16 rounds every activation: compare at bf16 precision
    for name, g in want.items():
        scale = max(g.abs().max().item(), 1e-3)
        assert (got[name] - g).abs().max().item() <= tol * scale, name


def test_cuda_fused_adamw_to_zero_scale_keeps_gradients_finite(pixels):
    fused, naive = _pair("vit")
    scale = fused.base_model.model.vit.layers[0].mlp.fc2.ssf_scale["default"]
    with torch.no_grad():
        scale[3] = 1.0
    x = pixels.cuda()
    _grads(fused, x, False)
    opt = torch.optim.AdamW([scale], lr=1.0, weight_decay=0.0, fused=True)
    scale.grad = torch.zeros_like(scale)
    scale.grad[3] = 1.0
    opt.step()
    assert scale[3].item() == 0.0
    naive.load_state_dict(fused.state_dict())
    got, want = _grads(fused, x, False), _grads(naive, x, False)
    for name, g in want.items():
        assert torch.isfinite(got[name]).all(), name
        assert (got[name] - g).abs().max().item() <= 1e-4 * max(g.abs().max().item(), 1e-3), name


def test_compiled_training_step_matches_eager_on_cuda(pixels):
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False, modules_to_save=["classifier"])).cuda().train()
    x = pixels.cuda()
    eager = _grads(model, x, True)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = compiled(pixel_values=x).logits
    torch.nn.functional.cross_entropy(logits.float(), LABELS.cuda()).backward()
    for name, g in eager.items():
        got = dict(model.named_parameters())[name].grad.float()
        assert (got - g).abs().max().item() <= 2e-2 * max(g.abs().max().item(), 1e-3), name
