"""SSF in the stacks PEFT users bring: fused optimizers, torch.compile, low_cpu_mem_usage, quantized / offloaded
bases, mixed batches, higher-order gradients. Each test pins a behaviour that once broke."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_vit
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

from peft_ssf import SSFConfig
from peft_ssf.layer import wrapper_for
from peft_ssf.ops import scale_shift_fused, scale_shift_naive

LABELS = torch.tensor([0, 1, 2, 3])


def _grads(model: nn.Module, pixels: torch.Tensor, run: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Parameter gradients of ``model`` after one loss backward; ``run`` (e.g. a ``torch.compile`` of ``model``)
    does the forward when given."""
    model.zero_grad(set_to_none=True)
    (model if run is None else run)(pixel_values=pixels, labels=LABELS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(config: dict, fam: str = "vit") -> tuple[nn.Module, nn.Module]:
    """The same SSF model twice: fused op (default) and the naive reference op, identical weights."""
    fused = get_peft_model(FAMILIES[fam](), SSFConfig(init_weights=False, modules_to_save=["classifier"], **config))
    naive = get_peft_model(
        FAMILIES[fam](), SSFConfig(init_weights=False, modules_to_save=["classifier"], fused=False, **config)
    )
    naive.load_state_dict(fused.state_dict())
    return fused.train(), naive.train()


# ----- the |scale| guard under every way of writing a parameter ------------------------------------------------------
@pytest.mark.parametrize("target", [0.0, 1e-6])
@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_optimizer_driving_a_scale_to_zero_gives_the_naive_gradients(target, optimizer, pixels):
    """AdamW(fused=True) (the Trainer's default) updates in place without bumping version counters."""
    fused, naive = _pair({"target_modules": ["fc1", "fc2", "o_proj"]})
    layer = fused.base_model.model.vit.layers[0].mlp.fc2
    scale = layer.ssf_scale["default"]
    with torch.no_grad():
        scale[3] = 1.0
    _grads(fused, pixels)  # a first training step: anything cached from it must not survive the update below
    opt = torch.optim.AdamW([scale], lr=1.0 - target, weight_decay=0.0, **{optimizer: True})
    scale.grad = torch.zeros_like(scale)
    scale.grad[3] = 1.0  # Adam's first step moves entry 3 by exactly lr: to `target`
    version = scale._version
    opt.step()
    if optimizer == "fused":
        assert scale._version == version  # the hazard: no version bump
    assert abs(scale[3].item() - target) < 1e-6
    naive.load_state_dict(fused.state_dict())
    g_fused, g_naive = _grads(fused, pixels), _grads(naive, pixels)
    assert g_fused.keys() == g_naive.keys()
    for name, g in g_naive.items():
        assert torch.isfinite(g_fused[name]).all(), name
        tol = 1e-5 * max(g.abs().max().item(), 1e-4)
        assert (g_fused[name] - g).abs().max().item() <= tol, name


def test_write_through_data_is_seen(pixels):
    fused, naive = _pair({"target_modules": ["fc2"]})
    _grads(fused, pixels)
    for layer in (fused.base_model.model.vit.layers[1].mlp.fc2, naive.base_model.model.vit.layers[1].mlp.fc2):
        layer.ssf_scale["default"].data[5] = 0.0  # .data writes do not bump the version counter either
    g_fused, g_naive = _grads(fused, pixels), _grads(naive, pixels)
    key = "base_model.model.vit.layers.1.mlp.fc2.ssf_scale.default"
    assert g_naive[key][5] != 0
    torch.testing.assert_close(g_fused[key], g_naive[key], rtol=1e-5, atol=1e-7)


def test_one_scale_check_per_training_forward(pixels, monkeypatch):
    """The model checks all scales in one batched call per forward, not one host sync per site."""
    from peft_ssf import guard

    model = get_peft_model(tiny_vit(), SSFConfig(modules_to_save=["classifier"])).train()
    calls = []
    original = guard.scales_reconstructible
    monkeypatch.setattr(guard, "scales_reconstructible", lambda params: calls.append(len(params)) or original(params))
    model(pixel_values=pixels, labels=LABELS).loss.backward()
    n_sites = sum(1 for n, _ in model.named_parameters() if n.endswith("ssf_scale.default"))
    assert calls == [n_sites]


def test_small_scale_in_a_directly_called_layer_is_checked_on_the_spot():
    base = nn.Linear(6, 4)
    layer = wrapper_for(base)(base, "default", init_weights=False)
    with torch.no_grad():
        layer.ssf_scale["default"][1] = 0.0
    x = torch.randn(3, 6)
    layer(x).pow(2).sum().backward()
    h = base(x).detach()
    expected = (2 * layer(x).detach() * h).sum(0)
    torch.testing.assert_close(layer.ssf_scale["default"].grad, expected)


# ----- torch.compile ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_graph_count_matches_the_bare_model(family, mode, pixels):
    counts = {}
    for name in ("bare", "ssf"):
        model = FAMILIES[family]()
        if name == "ssf":
            model = get_peft_model(model, SSFConfig(modules_to_save=["classifier"]))
        getattr(model, mode)()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(pixel_values=pixels)
        counts[name] = (explanation.graph_count, explanation.graph_break_count)
    assert counts["ssf"] == counts["bare"] == (1, 0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_gradients_equal_eager(family, pixels):
    model = get_peft_model(FAMILIES[family](), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    model.train()
    for module in model.modules():  # dropout-free comparison
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    eager = _grads(model, pixels)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad(set_to_none=True)
    compiled(pixel_values=pixels, labels=LABELS).loss.backward()
    for name, g in eager.items():
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6 * max(g.abs().max().item(), 1.0), msg=name)


def _compiled_saved_bytes(model: nn.Module, pixels: torch.Tensor) -> int:
    """Bytes of the activations a compiled graph keeps for backward (unique storages, parameters excluded)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager_decomp_partition", fullgraph=True)  # inductor's partitioner
    loss = compiled(pixel_values=pixels, labels=LABELS).loss
    storages, stack, seen = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            for t in node.saved_tensors:
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def test_compiled_graph_keeps_the_output_not_the_input(pixels):
    """Under torch.compile the sites keep their output (shared with the next op) while every |scale| >= 1e-3; the
    plain formulation (what a graph built for a small scale uses) keeps more."""
    model = get_peft_model(tiny_vit(), SSFConfig(modules_to_save=["classifier"])).train()
    layers = [m for m in model.modules() if hasattr(m, "ssf_keep_output")]
    assert layers and all(layer.ssf_keep_output == {"default": True} for layer in layers)
    kept = _compiled_saved_bytes(model, pixels)
    for layer in layers:
        layer.ssf_keep_output["default"] = False
    plain = _compiled_saved_bytes(model, pixels)
    fc1_output = pixels.shape[0] * 17 * 64 * 4  # one fc1 activation (17 tokens, 64 features, float32)
    assert kept <= plain - fc1_output, (kept, plain)


def test_compiled_graph_follows_an_optimizer_step_below_the_guard(pixels):
    """An optimizer step that takes a scale below 1e-3 flips that site's answer, the graph is rebuilt for it, and the
    compiled gradients stay equal to the naive op's."""
    fused, naive = _pair({"target_modules": ["fc1", "fc2", "o_proj"]})
    layer = fused.base_model.model.vit.layers[0].mlp.fc2
    scale = layer.ssf_scale["default"]
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    g_compiled_before = _grads(fused, pixels, run=compiled)
    assert layer.ssf_keep_output["default"] is True
    opt = torch.optim.AdamW([scale], lr=1.0, weight_decay=0.0, fused=True)
    with torch.no_grad():
        scale[3] = 1.0 + 1e-6
    layer.ssf_keep_output["default"] = True  # the write above went through no refresh: the step must do it
    scale.grad = torch.zeros_like(scale)
    scale.grad[3] = 1.0  # Adam's first step moves entry 3 by exactly lr: to 1e-6
    opt.step()
    assert abs(scale[3].item()) < 1e-5
    assert layer.ssf_keep_output["default"] is False
    assert g_compiled_before.keys() == set(_grads(naive, pixels))
    naive.load_state_dict(fused.state_dict())
    g_compiled, g_naive = _grads(fused, pixels, run=compiled), _grads(naive, pixels)
    key = "base_model.model.vit.layers.0.mlp.fc2.ssf_scale.default"
    assert g_naive[key][3].abs() > 0
    for name, g in g_naive.items():
        tol = 1e-5 * max(g.abs().max().item(), 1e-4)
        assert (g_compiled[name] - g).abs().max().item() <= tol, name


def test_a_scale_written_by_hand_under_compile_raises_until_refreshed(pixels):
    import peft_ssf

    fused, naive = _pair({"target_modules": ["fc2"]})
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    _grads(compiled, pixels)
    with torch.no_grad():
        fused.base_model.model.vit.layers[1].mlp.fc2.ssf_scale["default"][5] = 0.0
    with pytest.raises(RuntimeError, match=r"below 0.001.*refresh_scale_guard"):
        _grads(compiled, pixels)
    peft_ssf.refresh_scale_guard(fused)
    naive.load_state_dict(fused.state_dict())
    g_compiled, g_naive = _grads(fused, pixels, run=compiled), _grads(naive, pixels)
    key = "base_model.model.vit.layers.1.mlp.fc2.ssf_scale.default"
    assert g_naive[key][5] != 0
    torch.testing.assert_close(g_compiled[key], g_naive[key], rtol=1e-5, atol=1e-7)


def test_loaded_small_scales_refresh_the_compiled_answer(tmp_path):
    model = get_peft_model(tiny_vit(), SSFConfig(target_modules=["fc2"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.base_model.model.vit.layers[0].mlp.fc2.ssf_scale["default"][0] = 1e-5
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        layers = [loaded.base_model.model.vit.layers[i].mlp.fc2 for i in (0, 1)]
        assert [layer.ssf_keep_output["default"] for layer in layers] == [False, True], low_cpu_mem_usage


def test_optimizer_steps_refresh_only_compiled_layers(monkeypatch, pixels):
    """The optimizer post-step hook refreshes the answers of layers a graph was compiled for, and only after a step
    that updated their scales; layers of an eager model are never checked there."""
    from peft_ssf import guard

    eager = get_peft_model(tiny_vit(), SSFConfig(modules_to_save=["classifier"]))
    compiled = get_peft_model(tiny_vit(), SSFConfig(target_modules=["fc1"], modules_to_save=["classifier"])).train()
    torch._dynamo.reset()
    torch.compile(compiled)(pixel_values=pixels, labels=LABELS).loss.backward()
    calls = []
    monkeypatch.setattr(guard, "refresh_sites", lambda sites: calls.append(list(sites)))
    head = [p for n, p in compiled.named_parameters() if "classifier" in n and p.requires_grad]
    torch.optim.SGD(head, lr=0.1).step()
    assert calls == []
    for model in (eager, compiled):
        scales = [p for n, p in model.named_parameters() if "ssf_scale" in n]
        for p in scales:
            p.grad = torch.zeros_like(p)
        torch.optim.SGD(scales, lr=0.1).step()
    assert len(calls) == 1 and len(calls[0]) == 2  # the compiled model's two fc1 sites; the eager model's none


def test_eager_training_installs_no_optimizer_hook():
    """A process that trains SSF eagerly has no global optimizer hook and no torch-function mode left behind, also
    when the user enters a TorchFunctionMode of their own around the forward."""
    code = """
import torch
from torch.overrides import TorchFunctionMode
from torch.optim.optimizer import _global_optimizer_post_hooks
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification
import peft_ssf

class Count(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                   patch_size=8, num_labels=4)
model = get_peft_model(ViTForImageClassification(config), peft_ssf.SSFConfig(modules_to_save=["classifier"])).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
for _ in range(3):
    with Count():
        loss = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss
    loss.backward()
    opt.step()
    print(torch._C._len_torch_function_stack(), end=" ")
print(len(_global_optimizer_post_hooks), model.base_model.residual_pairs)
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0", "0", "0", "4"]


# ----- double backward -------------------------------------------------------------------------------------------
def test_double_backward_through_the_fused_op_is_refused_with_a_clear_error():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s = (1 + 0.2 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    t = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = scale_shift_fused(h, s, t)
    with pytest.raises(RuntimeError, match=r"higher-order gradients.*fused=False"):
        torch.autograd.grad(y.pow(3).sum(), (h, s, t), create_graph=True)


def test_double_backward_of_the_unfused_model_is_exact():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s = (1 + 0.2 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    t = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(scale_shift_naive, (h, s, t))
    base = tiny_vit()
    base.set_attn_implementation("eager")  # SDPA's CPU kernel has no double backward
    model = get_peft_model(base, SSFConfig(init_weights=False, fused=False, target_modules=["fc1"])).train()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    loss = model(pixel_values=pixels).logits.pow(2).sum()
    scale = model.base_model.model.vit.layers[0].mlp.fc1.ssf_scale["default"]
    (g,) = torch.autograd.grad(loss, scale, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), scale)
    # the same second derivative by finite differences of the first (central, float32 step)
    eps, fd = 1e-2, torch.zeros_like(scale)
    for i in range(4):
        with torch.no_grad():
            scale[i] += eps
        up = torch.autograd.grad(model(pixel_values=pixels).logits.pow(2).sum(), scale)[0].sum()
        with torch.no_grad():
            scale[i] -= 2 * eps
        down = torch.autograd.grad(model(pixel_values=pixels).logits.pow(2).sum(), scale)[0].sum()
        with torch.no_grad():
            scale[i] += eps
        fd[i] = (up - down) / (2 * eps)
    torch.testing.assert_close(gg[:4], fd[:4], rtol=5e-2, atol=5e-2 * fd[:4].abs().max().item())


# ----- low_cpu_mem_usage ----------------------------------------------------------------------------------------
def test_low_cpu_mem_usage_paths_load_the_same_adapter(tmp_path, pixels):
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False, modules_to_save=["classifier"])).eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path, low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
    meta = get_peft_model(tiny_vit(), SSFConfig(modules_to_save=["classifier"]), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in meta.named_parameters() if "ssf_" in n} == {"meta"}
    injected = inject_adapter_in_model(SSFConfig(target_modules=["fc1"]), tiny_vit(), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in injected.named_parameters() if "ssf_" in n} == {"meta"}
    state = {k: v for k, v in get_peft_model_state_dict(model).items() if "classifier" not in k}
    assert state and all(v.device.type == "cpu" for v in state.values())


# ----- quantized and offloaded bases -----------------------------------------------------------------------------
class _FakeLinear4bit(nn.Linear):
    """Stands in for bitsandbytes.nn.Linear4bit (not installable here): an nn.Linear subclass from that package."""


_FakeLinear4bit.__module__ = "bitsandbytes.nn.modules"


class _Int8Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
        self.bias = None
        self.in_features = self.out_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never reached
        return x


@pytest.mark.parametrize("make,reason", [
    (lambda: _FakeLinear4bit(4, 4), "quantized layer"),
    (_Int8Linear, "torch.int8"),
])
def test_quantized_layers_are_refused_at_get_peft_model(make, reason):
    model = nn.Sequential()
    model.add_module("lin", make())
    with pytest.raises(TypeError, match=rf"module 'lin'.*{reason}.*LoRA"):
        get_peft_model(model, SSFConfig(target_modules=["lin"]))


def test_accelerate_offloaded_layers_are_refused_at_get_peft_model():
    from accelerate import cpu_offload

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"module '0'.*offloaded by accelerate"):
        get_peft_model(model, SSFConfig(target_modules=["0"]))


# ----- mixed batches ----------------------------------------------------------------------------------------------
def _two_adapters() -> nn.Module:
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False, target_modules=["fc1", "fc2"]), "a")
    model.add_adapter("b", SSFConfig(init_weights=False, target_modules=["fc1"]))
    return model.eval()


def test_mixed_batch_on_a_merged_model_raises_like_peft(pixels):
    model = _two_adapters()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when there are merged adapters"):
        model(pixel_values=pixels, adapter_names=["a", "b", "__base__", "a"])


def test_mixed_batch_length_is_checked_before_the_forward(pixels, monkeypatch):
    model = _two_adapters()
    ran = []
    layer = model.base_model.model.vit.layers[0].mlp.fc1
    monkeypatch.setattr(type(layer), "_mixed_batch_forward", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same as the number of inputs, "
                                         r"but got 3 and 4"):
        model(pixel_values=pixels, adapter_names=["a", "b", "a"])
    assert ran == []


def test_nan_merge_error_carries_peft_phrase():
    model = _two_adapters()
    with torch.no_grad():
        model.base_model.model.vit.layers[0].mlp.fc1.ssf_scale["a"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True, adapter_names=["a"])
    layer = model.base_model.model.vit.layers[0].mlp.fc1
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True, adapter_names=["a"])


# ----- per-layer facts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,features", [
    (lambda: nn.Linear(7, 5), (7, 5)),
    (lambda: nn.Conv2d(3, 6, 3), (3, 6)),
    (lambda: nn.Conv1d(4, 4, 3, groups=4), (4, 4)),
    (lambda: nn.LayerNorm(9), (9, 9)),
    (lambda: nn.GroupNorm(2, 8), (8, 8)),
    (lambda: nn.BatchNorm2d(5), (5, 5)),
    (lambda: nn.Embedding(11, 6), (11, 6)),
])
def test_in_and_out_features_per_layer_type(make, features):
    base = make()
    layer = wrapper_for(base)(base, "default")
    assert (layer.in_features, layer.out_features) == features


def test_in_and_out_features_of_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(nf=5, nx=7)
    layer = wrapper_for(base)(base, "default")
    assert (layer.in_features, layer.out_features) == (7, 5)


def test_fused_is_stored_per_adapter(pixels, monkeypatch):
    model = get_peft_model(tiny_vit(), SSFConfig(target_modules=["fc1"]), "fast")
    model.add_adapter("plain", SSFConfig(target_modules=["fc1"], fused=False))
    layer = model.base_model.model.vit.layers[0].mlp.fc1
    assert layer.ssf_fused == {"fast": True, "plain": False}
    calls = []
    original = type(layer)._fused_forward
    monkeypatch.setattr(
        type(layer), "_fused_forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    model.train()
    model(pixel_values=pixels)  # "fast" is active
    assert calls
    calls.clear()
    model.set_adapter("plain")
    model(pixel_values=pixels)
    assert calls == []
    model.delete_adapter("plain")
    assert layer.ssf_fused == {"fast": True}


class _Attn4x(nn.Module):
    """transformers 4.x module names: ViT ``attention.attention.key``, Swin ``attention.self.key``."""

    def __init__(self, inner: str) -> None:
        super().__init__()
        block = nn.Module()
        setattr(block, inner, nn.Module())
        getattr(block, inner).key = nn.Linear(4, 4)
        getattr(block, inner).query = nn.Linear(4, 4)
        self.attention = block


@pytest.mark.parametrize("inner", ["attention", "self"])
def test_skip_key_shift_covers_transformers_4_names(inner):
    model = get_peft_model(_Attn4x(inner), SSFConfig(target_modules=["key", "query"], skip_key_shift=True))
    shifts = [n for n, _ in model.named_parameters() if "ssf_shift" in n]
    assert shifts == [f"base_model.model.attention.{inner}.query.ssf_shift.default"]


# ----- precision: autocast and half-precision models ----------------------------------------------------------------
def _reference_errors(family: str, mode: str, pixels: torch.Tensor) -> dict[str, float]:
    """Median relative error of the SSF gradients of the naive and fused ops against a float64 run of the same
    (half-precision-rounded) weights."""
    import statistics

    def grads(dtype: torch.dtype, autocast: bool, fused: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        base = FAMILIES[family]()
        base.to(torch.bfloat16 if mode == "bf16-model" else torch.float32).to(dtype)
        model = get_peft_model(base, SSFConfig(init_weights=False, fused=fused, modules_to_save=["classifier"]))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(pixel_values=pixels.to(dtype)).logits
        torch.nn.functional.cross_entropy(logits.float(), LABELS).backward()
        return {n: p.grad.double() for n, p in model.named_parameters() if "ssf_" in n and p.grad is not None}

    ref = grads(torch.float64, False, False)
    dtype, autocast = (torch.bfloat16, False) if mode == "bf16-model" else (torch.float32, True)
    out = {}
    for fused in (False, True):
        got = grads(dtype, autocast, fused)
        errs = [((got[n] - r).norm() / r.norm()).item() for n, r in ref.items() if r.norm() > 1e-6]
        out["fused" if fused else "naive"] = statistics.median(errs)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16-model"])
def test_fused_gradients_are_as_accurate_as_naive_in_half_precision(family, mode, pixels):
    errors = _reference_errors(family, mode, pixels)
    assert errors["naive"] < 0.25  # the comparison is meaningful: bf16 noise, not garbage
    assert errors["fused"] <= 2 * errors["naive"] + 2e-3, errors


def test_half_precision_layernorm_parameter_gradients_are_float32_accurate():
    from peft_ssf.ops import layer_norm_scale_shift

    torch.manual_seed(0)
    norm = nn.LayerNorm(64).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(8, 33, 64).bfloat16().requires_grad_()
    g = torch.randn(8, 33, 64).bfloat16()
    scale = (1 + 0.1 * torch.randn(64)).requires_grad_()
    shift = (0.1 * torch.randn(64)).requires_grad_()
    layer_norm_scale_shift(x, norm, scale, shift).backward(g)
    # float64 reference of the same computation
    x64 = x.detach().double().requires_grad_()
    s64, t64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    h = torch.nn.functional.layer_norm(x64, (64,), norm.weight.double(), norm.bias.double(), norm.eps)
    (h * s64 + t64).backward(g.double())
    for got, want in ((scale.grad, s64.grad), (shift.grad, t64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 5e-3
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 2e-2


def test_layernorm_parameter_gradients_under_cpu_autocast_are_float32_accurate():
    """CPU autocast hands a bf16 stream to layer_norm unchanged (Swin, ConvNeXt), and the CPU kernel accumulates the
    parameter gradients in bf16: far off over a Swin-B stage's 25,000 tokens. SSF's norm sites sum them in float32."""
    torch.manual_seed(0)
    base = nn.LayerNorm(16).requires_grad_(False)  # frozen, as PEFT leaves it
    with torch.no_grad():
        base.weight.normal_(1, 0.2)
        base.bias.normal_(0, 0.2)
    layer = wrapper_for(base)(base, "default", init_weights=False).train()
    x = (3 + torch.randn(8, 3136, 16)).bfloat16()
    g = 1e-3 * torch.randn(8, 3136, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    (out.float() * g).sum().backward()
    scale, shift = layer.ssf_scale["default"], layer.ssf_shift["default"]
    s64, t64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    h = torch.nn.functional.layer_norm(x.double(), (16,), base.weight.double(), base.bias.double(), base.eps)
    ((h * s64 + t64) * g.double()).sum().backward()
    for got, want in ((scale.grad, s64.grad), (shift.grad, t64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
