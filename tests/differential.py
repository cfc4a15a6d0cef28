"""Differential checking of SSF on generated models: the default (fused) training op against ``fused=False``.

A *spec* describes a small model built from every site type SSF supports (Linear, transformers Conv1D, Conv2d incl.
depthwise, LayerNorm channels-last / ConvNeXt channels-first, GroupNorm, BatchNorm, Embedding) combined with residual
adds (one or two per block, nested), in-place changes of site outputs and of the stream, views / rolls / permutes,
frozen or trainable layer scales, dropout, tied weights, a container head in ``modules_to_save``, other trainable
parameters (norm biases), in float32, a bfloat16 model or bfloat16 autocast, with or without activation checkpointing.

``check(spec)`` trains the two models side by side for two SGD steps and compares the outputs and the gradient of
*every* trainable parameter, then the merged model's outputs and a save / reload. It returns ``"passed"`` or
``"refused"`` (both models, or the fused one, stop with an error that names SSF) and raises ``Mismatch`` on a silent
difference or an error that does not say what went wrong. ``tests/test_differential.py`` runs it under hypothesis
and ``scripts/differential_search.py`` runs a long search.

Tolerance: in float32 the largest absolute difference must be within ``rtol * max|naive| + atol`` with
``rtol = 1e-4``. In half precision (a bfloat16 model or bfloat16 autocast) the fused op's forward must round as the
naive one does, so outputs are compared bit for bit (a folded weight used to round differently and flip a ReLU
downstream); gradients are compared with a float64 naive run: the fused op may be at most twice as far from it as
the naive op, plus ``1e-2`` of the largest value (the fused op sums its parameter gradients in float32, the naive
one in the kernels' own orders), plus one bfloat16 rounding step (2**-8) of the largest gradient in the model. That
last term is the fused op's own rounding: it keeps the site's output ``y = h * scale + shift`` in bfloat16 and takes
the scale gradient as ``(sum(g * y) - shift * sum(g)) / scale``, so where the shift dominates ``y`` the two sums
cancel and a scale gradient much smaller than the model's others is off by about ``2**-8 * sum|g * y| / scale``
(measured: 2e-5 on a gradient of 5e-5 whose model's largest is 1e-2). The bugs this hunts are 10% to 100% off.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
from transformers.pytorch_utils import Conv1D

from peft_ssf import SSFConfig

C = 8  # channels everywhere
SEQ_SITES = ("linear", "linear_nobias", "conv1d_hf", "ln")
IMG_SITES = ("conv", "dwconv", "conv_nobias", "gn", "bn", "ln_cf")
Draw = Callable[[str, tuple], Any]


class Mismatch(AssertionError):
    """The fused op differs from the naive one without an error, or fails with an error that names no cause."""


def draw_spec(draw: Draw) -> dict[str, Any]:
    """A model description; ``draw(name, options)`` picks one of ``options`` (hypothesis or a seeded RNG)."""
    domain = draw("domain", ("seq", "img"))
    sites = SEQ_SITES if domain == "seq" else IMG_SITES
    blocks = []
    for i in range(draw("n_blocks", (1, 2, 3))):
        blocks.append({
            "kind": draw(f"b{i}.kind", ("residual", "residual", "plain", "nested", "two_adds")),
            "sites": [draw(f"b{i}.s{j}", sites) for j in range(draw(f"b{i}.n_sites", (1, 2, 3)))],
            "act": draw(f"b{i}.act", ("none", "gelu", "relu", "relu_inplace")),
            "site_inplace": draw(f"b{i}.site_inplace", (False, False, True)),
            "stream_inplace": draw(f"b{i}.stream_inplace", (False, False, True)),
            "layer_scale": draw(f"b{i}.layer_scale", ("none", "none", "frozen", "trainable")),
            "dropout": draw(f"b{i}.dropout", (0.0, 0.0, 0.25)),
            "view": draw(f"b{i}.view", ("none", "none", "roll", "permute")),
        })
    return {
        "domain": domain,
        "blocks": blocks,
        "tie": domain == "seq" and draw("tie", (False, False, True)),
        "target_tied": draw("target_tied", (False, True)),
        "container_head": draw("container_head", (False, True)),
        "train_norm_bias": draw("train_norm_bias", (False, False, True)),
        "precision": draw("precision", ("fp32", "fp32", "bf16", "autocast")),
        "checkpoint": draw("checkpoint", (False, False, True)),
    }


def _site(kind: str) -> nn.Module:
    return {
        "linear": lambda: nn.Linear(C, C),
        "linear_nobias": lambda: nn.Linear(C, C, bias=False),
        "conv1d_hf": lambda: Conv1D(C, C),
        "ln": lambda: nn.LayerNorm(C),
        "conv": lambda: nn.Conv2d(C, C, 3, padding=1),
        "dwconv": lambda: nn.Conv2d(C, C, 3, padding=1, groups=C),
        "conv_nobias": lambda: nn.Conv2d(C, C, 1, bias=False),
        "gn": lambda: nn.GroupNorm(2, C),
        "bn": lambda: nn.BatchNorm2d(C),
        "ln_cf": lambda: ConvNextLayerNorm(C, data_format="channels_first"),
    }[kind]()


class Block(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.sites = nn.ModuleList(_site(k) for k in spec["sites"])
        if spec["kind"] == "nested":
            self.inner = nn.ModuleList(_site(k) for k in spec["sites"])
        if spec["layer_scale"] != "none":
            self.gamma = nn.Parameter(torch.full((C,), 0.5))
        self.drop = nn.Dropout(spec["dropout"])

    def _branch(self, h: torch.Tensor, sites: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        y, first = h, None
        for i, site in enumerate(sites):
            y = site(y)
            if i == 0:
                if self.spec["site_inplace"]:
                    y.mul_(2)
                first = y
            act = self.spec["act"]
            if act == "gelu":
                y = F.gelu(y)
            elif act == "relu":
                y = F.relu(y)
            elif act == "relu_inplace":
                y = F.relu(y, inplace=True)
        y = self.drop(y)
        if self.spec["layer_scale"] != "none":
            y = y * self.gamma.view(-1, *([1] * (y.dim() - 2))) if y.dim() == 4 else y * self.gamma
        return y, first

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        kind = self.spec["kind"]
        if kind == "plain":
            h = self._branch(h, self.sites)[0]
        elif kind == "residual":
            h = h + self._branch(h, self.sites)[0]
        elif kind == "two_adds":
            y, first = self._branch(h, self.sites)
            h = h + y + first
        else:  # nested: h + f(h + g(h))
            inner = h + self._branch(h, self.inner)[0]
            h = h + self._branch(inner, self.sites)[0]
        if self.spec["stream_inplace"]:
            h.add_(0.5)
        view = self.spec["view"]
        if view == "roll":
            h = torch.roll(h, 1, dims=-1 if h.dim() == 4 else 1)
        elif view == "permute":
            h = h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if h.dim() == 4 else h.transpose(0, 1)
            h = h.transpose(0, 1) if h.dim() == 3 else h
        return h


class Net(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        seq = spec["domain"] == "seq"
        self.embed = nn.Embedding(20, C) if seq else nn.Conv2d(3, C, 2, stride=2)
        self.blocks = nn.ModuleList(Block(b) for b in spec["blocks"])
        if spec["tie"]:
            self.out_proj = nn.Linear(C, 20, bias=False)
            self.out_proj.weight = self.embed.weight  # tied input / output embeddings
        self.classifier = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, 3)) if spec["container_head"] else (
            nn.Linear(C, 3)
        )
        self.use_checkpoint = spec["checkpoint"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.use_checkpoint and self.training else block(h)
        pooled = h.mean(1) if h.dim() == 3 else h.mean((2, 3))
        out = self.classifier(pooled)
        if self.spec["tie"]:
            out = out + self.out_proj(pooled)[:, :3]
        return out


def _inputs(spec: dict[str, Any], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec["domain"] == "seq":
        return torch.randint(0, 20, (3, 5), generator=g)
    x = torch.randn(3, 3, 8, 8, generator=g)
    return x.to(torch.bfloat16) if spec["precision"] == "bf16" else x


def _names(model: nn.Module) -> list[str]:
    names = ["embed"]
    for i, block in enumerate(model.blocks):
        names += [f"blocks.{i}.sites.{j}" for j in range(len(block.sites))]
        if hasattr(block, "inner"):
            names += [f"blocks.{i}.inner.{j}" for j in range(len(block.inner))]
    return names + (["out_proj"] if model.spec["tie"] else [])


#: why the last ``check`` returned "refused" (where, and the error's first words), for the search's summary
last_refusal: list[str] = [""]


def _refused(where: str, exc: BaseException) -> str:
    last_refusal[0] = f"{where}: {str(exc)[:70]}"
    return "refused"


def _clear(exc: BaseException) -> bool:
    return "ssf" in str(exc).lower()


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise Mismatch(f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    bound = rtol * want.abs().max().item() + atol if want.numel() else atol
    if not diff <= bound:
        raise Mismatch(f"{name}: max |fused - naive| = {diff:.3g} > {bound:.3g} (max |naive| {want.abs().max():.3g})")


def _compare(name: str, fused: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor | None, rtol: float,
             atol: float = 1e-6) -> None:
    """fp32: fused within tolerance of naive. Half precision: fused no further from the float64 reference ``ref``
    than twice the naive op's distance, plus ``rtol`` of the largest reference value."""
    if ref is None:
        _close(name, fused, naive, rtol, atol)
        return
    f, n, r = fused.detach().double(), naive.detach().double(), ref.detach().double()
    err_fused, err_naive = (f - r).abs().max().item(), (n - r).abs().max().item()
    bound = 2 * err_naive + rtol * r.abs().max().item() + atol
    if not err_fused <= bound:
        raise Mismatch(f"{name}: fused is {err_fused:.3g} from the float64 reference, naive {err_naive:.3g} "
                       f"(max |ref| {r.abs().max():.3g})")


def _build(spec: dict[str, Any], base: nn.Module, fused: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"modules_to_save": ["classifier"], "init_weights": False, "fused": fused}
    if spec["target_tied"]:
        kwargs["target_modules"] = _names(base)
    else:
        kwargs["preset"] = "all"
    torch.manual_seed(1)
    model = get_peft_model(base, SSFConfig(**kwargs))
    for block in model.base_model.model.blocks:
        if block.spec["layer_scale"] == "trainable":
            block.gamma.requires_grad_(True)
        if spec["train_norm_bias"]:
            for site in block.sites:
                base_site = site.get_base_layer() if hasattr(site, "get_base_layer") else site
                if isinstance(base_site, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
                    base_site.bias.requires_grad_(True)
    return model


def check(spec: dict[str, Any]) -> str:
    """Compare the fused and naive SSF on the model ``spec`` describes; ``"passed"`` / ``"refused"`` or Mismatch."""
    torch.manual_seed(0)
    base = Net(spec)
    if spec["precision"] == "bf16":
        base = base.to(torch.bfloat16)
    pristine = copy.deepcopy(base)
    rtol = 1e-4 if spec["precision"] == "fp32" else 1e-2
    try:
        naive = _build(spec, copy.deepcopy(base), fused=False)
    except (ValueError, TypeError) as exc:
        if not _clear(exc):
            raise Mismatch(f"get_peft_model failed without naming SSF: {exc!r}") from exc
        return _refused("get_peft_model", exc)
    fused = _build(spec, copy.deepcopy(base), fused=True)
    fused.load_state_dict(naive.state_dict())
    half = spec["precision"] != "fp32"
    # half precision: both ops are compared with a float64 naive run; the fused one may not be further off than
    # twice the naive one's error (plus rtol of the largest value)
    ref = _build(spec, copy.deepcopy(base).double(), fused=False) if half else None
    if ref is not None:
        ref.load_state_dict(naive.state_dict())
    trainable = [n for n, p in naive.named_parameters() if p.requires_grad]
    if trainable != [n for n, p in fused.named_parameters() if p.requires_grad]:
        raise Mismatch("the two models train different parameters")
    models = (naive, fused) if ref is None else (naive, fused, ref)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in models]
    autocast = spec["precision"] == "autocast"
    for step in range(2):
        outs = []
        for model in models:
            model.train()
            torch.manual_seed(10 + step)  # same dropout masks
            x = _inputs(spec, step)
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and model is not ref):
                    out = model(x.double() if model is ref and x.is_floating_point() else x)
                out.double().square().mean().backward()
            except RuntimeError as exc:
                if model is not fused:  # the model itself cannot train (autograd refuses an in-place change)
                    return _refused("the model itself (fused=False)", exc)
                if not _clear(exc):
                    raise Mismatch(f"fused training failed without naming SSF: {exc!r}") from exc
                return _refused("fused training", exc)
            outs.append(out)
        if half and not torch.equal(outs[1], outs[0]):  # half precision: the fused forward rounds as the naive one
            diff = (outs[1].double() - outs[0].double()).abs().max().item()
            raise Mismatch(f"step {step} output: fused differs from naive in half precision (max {diff:.3g}); "
                           "its forward must be the naive op's bit for bit")
        _compare(f"step {step} output", outs[1], outs[0], outs[2] if half else None, rtol)
        grads = [dict(m.named_parameters()) for m in models]
        # gradients that are zero up to rounding (a shift softmax ignores) are compared against the largest one
        largest = max((p.grad.abs().max().item() for p in grads[0].values() if p.grad is not None), default=0.0)
        floor = rtol * 1e-2 * largest + (2.0**-8 * largest if half else 0.0)
        for name in trainable:
            g_naive, g_fused = grads[0][name].grad, grads[1][name].grad
            if (g_naive is None) != (g_fused is None):
                raise Mismatch(f"step {step} {name}: grad is None in {'fused' if g_fused is None else 'naive'} only")
            if g_naive is not None:
                g_ref = grads[2][name].grad if half else None
                _compare(f"step {step} grad {name}", g_fused, g_naive, g_ref, rtol, atol=floor + 1e-9)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if half:  # step 1 at the same point: the naive op's rounding must not move the other two elsewhere
            state = naive.state_dict()
            with torch.no_grad():  # copied in place, as an optimizer writes (the fused op must see the new values)
                for model in (fused, ref):
                    for name, value in model.state_dict().items():
                        value.copy_(state[name])
    fused.eval()
    x = _inputs(spec, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = fused(x)
        unfused = naive.eval()(x)
    with torch.no_grad():
        want = ref.eval()(x.double() if x.is_floating_point() else x) if half else None
    _compare("eval output", expected, unfused, want, rtol)
    with tempfile.TemporaryDirectory() as tmp:
        fused.save_pretrained(tmp)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp).eval()
        # trainable parameters outside the adapter (layer scales, norm biases) are the user's to save: copy them
        extra = {n: p for n, p in fused.named_parameters() if p.requires_grad and "ssf_" not in n
                 and "modules_to_save" not in n}
        for mname, module in fused.named_modules():  # a BatchNorm with trainable parameters trains its statistics
            trains = any(p.requires_grad for p in module.parameters())
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and trains:
                extra.update({f"{mname}.{b}": v for b, v in module.named_buffers()})
        reloaded.load_state_dict(extra, strict=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _close("reloaded output", reloaded(x), expected, 1e-6 if spec["precision"] == "fp32" else 1e-2)
    merge_rtol = 1e-4 if spec["precision"] == "fp32" else 5e-2
    try:
        merged = fused.merge_and_unload()
    except ValueError as exc:
        if not _clear(exc):
            raise Mismatch(f"merge failed without naming SSF: {exc!r}") from exc
        return _refused("merge", exc)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _close("merged output", merged(x), expected, merge_rtol)
    return "passed"
