"""Issue 22's op-level rows: models the fused training op was not designed around. Each test compares the default
op with the naive reference (``fused=False``) or asserts the clear error that replaces a silent difference."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
from transformers.pytorch_utils import Conv1D

from peft_ssf import SSFConfig


class _Block(nn.Module):
    """Pre-norm residual block whose site output is changed in place before the add (``mul_`` or ``relu_``)."""

    def __init__(self, site: str = "conv1d", inplace: str = "mul", channels: int = 8) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.fc = Conv1D(channels, channels) if site == "conv1d" else nn.Linear(channels, channels)
        self.head = nn.Linear(channels, 2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.ln1(x))
        if self.inplace == "mul":
            y.mul_(2)
        elif self.inplace == "relu":
            y = torch.relu_(y)
        return self.head(self.ln2(x + y)).square().mean()


def _pair(base: nn.Module, **config) -> tuple[nn.Module, nn.Module]:
    fused = get_peft_model(copy.deepcopy(base), SSFConfig(init_weights=False, **config)).train()
    naive = get_peft_model(copy.deepcopy(base), SSFConfig(init_weights=False, fused=False, **config)).train()
    naive.load_state_dict(fused.state_dict())
    return fused, naive


def _grads(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(*inputs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("site", ["conv1d", "linear"])
@pytest.mark.parametrize("inplace", ["mul", "relu"])
def test_site_output_changed_in_place_is_a_clear_error_never_a_wrong_gradient(site, inplace):
    """Today's main paired the Conv1D site through ``y.mul_(2)`` and returned scale gradients 9x off, silently; a
    folded Linear failed with autograd's view error, naming neither SSF nor the fix."""
    torch.manual_seed(0)
    fused, naive = _pair(_Block(site, inplace), target_modules=["fc", "ln1", "ln2"])
    x = torch.randn(3, 5, 8)
    reference = _grads(naive, x)
    for _ in range(2):  # the discovery forward and a later one
        try:
            got = _grads(fused, x)
        except RuntimeError as exc:
            assert "SSF" in str(exc) and "fused=False" in str(exc)
            continue
        assert got.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 6), lambda: nn.Conv1d(6, 6, 1)])
def test_in_place_activation_after_a_folded_site_names_ssf_and_the_fix(make):
    model = nn.Sequential(make(), nn.ReLU(inplace=True), make())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 6, 5) if isinstance(model[0], nn.Conv1d) else torch.randn(4, 6)
    peft = get_peft_model(model, SSFConfig(target_modules=["0"], init_weights=False)).train()
    with pytest.raises(RuntimeError, match=r"SSF: .*modified in place.*fused=False"):
        peft(x).sum().backward()
    naive = get_peft_model(reference, SSFConfig(target_modules=["0"], fused=False)).train()
    naive(x).sum().backward()  # the reference op works


class _CheckpointedBlock(nn.Module):
    """A block run under non-reentrant activation checkpointing whose site output is changed in place before a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ln = nn.Linear(8, 8, bias=False), nn.LayerNorm(8)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y.mul_(2)
        return x + self.ln(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._block, x, use_reentrant=False).square().mean()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_in_place_change_under_activation_checkpointing_is_refused(checkpointed):
    """Checkpointing recomputes the forward through saved-tensor hooks, which skip autograd's version check: main gave
    the fc scale a gradient 100% off, silently (0.093 vs 0.093 largest). Now the same error as without checkpointing;
    ``save_on_cpu`` (a copy taken at save time) still trains with the naive gradients."""
    torch.manual_seed(0)
    fused, naive = _pair(_CheckpointedBlock(), target_modules=["fc"], bias_free_sites="scale_only")
    x = torch.randn(3, 5, 8)
    run = (lambda m: m(x)) if checkpointed else (lambda m: m.base_model.model._block(x).square().mean())
    run(naive).backward()  # the reference op keeps the site's input, which the in-place change does not touch
    with pytest.raises(RuntimeError, match=r"SSF: .*modified in place.*fused=False"):
        run(fused).backward()


def test_save_on_cpu_hooks_train_with_the_naive_gradients():
    torch.manual_seed(0)
    fused, naive = _pair(_Block("linear", "none"), target_modules=["fc", "ln1", "ln2"])
    x = torch.randn(3, 5, 8)
    with torch.autograd.graph.save_on_cpu():
        got, reference = _grads(fused, x), _grads(naive, x)
    assert got.keys() == reference.keys() and len(got) == 6
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


class _NormModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.fc(x))).float().square().mean()


def test_trainable_norm_bias_in_a_bf16_model_gets_the_naive_gradient():
    """BitFit-style: SSF on a norm whose bias is trainable, in a bf16 model. Main returned grad=None for the bias."""
    torch.manual_seed(0)
    base = _NormModel().to(torch.bfloat16)
    fused, naive = _pair(base, target_modules=["norm"])
    for model in (fused, naive):
        model.base_model.model.norm.base_layer.bias.requires_grad_(True)
    x = torch.randn(4, 6, 8, dtype=torch.bfloat16)
    got, reference = _grads(fused, x), _grads(naive, x)
    assert got.keys() == reference.keys()
    assert "base_model.model.norm.base_layer.bias" in got
    for name, g in reference.items():
        torch.testing.assert_close(got[name].float(), g.float(), rtol=2e-2, atol=1e-3)


class _ChannelsFirstNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = ConvNextLayerNorm(8, data_format="channels_first")
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.conv(x)).mean((2, 3))).double().square().mean()


@pytest.mark.parametrize("trainable", [("bias",), ("weight", "bias")])
def test_trainable_norm_parameters_in_a_bf16_model_are_as_accurate_as_the_naive_op(trainable):
    """Main ran a norm with a trainable bias through the CPU LayerNorm kernel, whose half-precision parameter sums
    made the SSF shift gradient 6x further from float64 than the naive op's (4.7e-3 vs 7.8e-4 of 0.10)."""
    torch.manual_seed(0)
    base = _ChannelsFirstNorm()
    grads = {}
    for name, dtype, fused in (("ref", torch.float64, False), ("naive", torch.bfloat16, False),
                               ("fused", torch.bfloat16, True)):
        model = get_peft_model(copy.deepcopy(base).to(dtype), SSFConfig(target_modules=["norm"], init_weights=False,
                                                                        fused=fused)).train()
        if name == "ref":  # every model starts from the same bf16-representable values
            state = {k: v.to(torch.bfloat16).double() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        for p in trainable:
            getattr(model.base_model.model.norm.base_layer, p).requires_grad_(True)
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads[name] = {k: v.double() for k, v in _grads(model, x).items()}
    assert grads["fused"].keys() == grads["ref"].keys() and len(grads["ref"]) == 2 + len(trainable)
    for key, ref in grads["ref"].items():
        err_fused = (grads["fused"][key] - ref).abs().max().item()
        err_naive = (grads["naive"][key] - ref).abs().max().item()
        assert err_fused <= 1.5 * err_naive + 1e-3 * ref.abs().max().item(), (key, err_fused, err_naive)


class _SubclassTensor(torch.Tensor):
    """Stands in for torchao's AffineQuantizedTensor: a tensor subclass from another package."""


_SubclassTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"


def test_tensor_subclass_weights_are_refused_at_get_peft_model():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(_SubclassTensor), requires_grad=False)
    with pytest.raises(TypeError, match=r"SSF cannot adapt module '0'.*tensor subclass.*LoRA"):
        get_peft_model(model, SSFConfig(target_modules=["0"]))


def test_inference_fold_runs_the_accelerate_hook():
    """A module with an accelerate hook (device alignment, or any pre-forward) must run through the hook also in
    the no-grad inference path, which otherwise folds SSF into a direct ``F.linear`` call."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Double(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(a * 2 for a in args), kwargs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    add_hook_to_module(model[0], Double())
    peft = get_peft_model(model, SSFConfig(target_modules=["0"], init_weights=False)).eval()
    layer = peft.base_model.model[0]
    x = torch.randn(16, 4)  # more rows than features: the fold would be chosen
    with torch.no_grad():
        got = peft(x)
        expected = layer.base_layer(x) * layer.ssf_scale["default"] + layer.ssf_shift["default"]
    torch.testing.assert_close(got, expected)


class _HalfNet(nn.Module):
    """Every site type SSF folds during training, each followed by a ReLU (a rounding difference flips it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.cf_norm = ConvNextLayerNorm(16, data_format="channels_first")
        self.gn = nn.GroupNorm(4, 16)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.ln2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.bn(torch.relu(self.gn(torch.relu(self.cf_norm(h))))))
        h = torch.relu(self.ln(torch.relu(self.fc(h.permute(0, 2, 3, 1)))))
        h = h + self.fc2(h)  # a residual add: in a training forward the norm after it may rebuild its input
        return self.head(torch.relu(self.ln2(h)))


@pytest.mark.parametrize("precision", ["bf16-model", "bf16-autocast", "fp16-model"])
def test_half_precision_forward_and_input_gradients_are_the_naive_ops_bit_for_bit(precision):
    """In half precision the fused op may not round a site's output differently from ``fused=False``: a weight with
    SSF folded in (``scale * W`` rounded, then the GEMM / the norm) did, and a ReLU downstream flipped on the
    difference (the long differential search's two failures). Outputs and input gradients must be bit-identical;
    only the scale / shift gradients come from the fused op's own (float32) sums."""
    torch.manual_seed(0)
    base = _HalfNet()
    for norm in (base.cf_norm, base.gn, base.bn, base.ln, base.ln2):  # affine parameters away from (1, 0)
        nn.init.normal_(norm.weight, 1.0, 0.2)
        nn.init.normal_(norm.bias, 0.0, 0.2)
    dtype = torch.float16 if precision == "fp16-model" else torch.bfloat16
    if precision.endswith("model"):
        base = base.to(dtype)
    targets = ["conv", "cf_norm", "gn", "bn", "fc", "ln", "fc2", "ln2"]
    fused, naive = _pair(base, target_modules=targets)
    x = torch.randn(4, 3, 8, 8, dtype=dtype if precision.endswith("model") else torch.float32)
    outs, grads = [], []
    for model in (fused, naive):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            out = model(xi)
        out.float().square().mean().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    for (name, p), q in zip(fused.named_parameters(), naive.parameters()):
        if p.requires_grad:
            tol = 2.0**-6 * q.grad.abs().max().item() + 1e-6
            assert (p.grad.float() - q.grad.float()).abs().max().item() <= tol, name


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_half_precision_norm_then_in_place_relu_trains_like_the_naive_op(norm):
    """A bf16 ResNet-style block (conv -> BatchNorm / GroupNorm -> ReLU(inplace=True)) with SSF on the norm: the
    fused op keeps the norm's output, as the naive op does, so the in-place activation is not refused."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if norm == "bn" else nn.GroupNorm(2, 8),
                         nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1)).to(torch.bfloat16)
    fused, naive = _pair(base, target_modules=["1"])
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    for model in (fused, naive):
        model(x).float().square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), naive.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
