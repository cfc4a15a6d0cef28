"""Tests of the invariance analysis toolkit (peft_ssf_analysis): CKA, features, inversion, STIR, report, CLI.

Tiny offline models only; the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys

import pytest
import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from peft_ssf_analysis import (
    InversionCache,
    MinibatchCKA,
    Normalization,
    cka_from_grams,
    compare,
    forward_to_layer,
    gram_linear,
    invert,
    layer_names,
    layer_representations,
    linear_cka,
    resolve_normalization,
    stir,
    stir_matrix,
)
from peft_ssf_analysis import cka as cka_module
from peft_ssf_analysis.features import LayerProbe

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster single-threaded on a shared CPU (thread contention dominates otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(seed: int = 0, image_size: int = 16) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=image_size,
        patch_size=4,
        num_labels=3,
    )
    return ViTForImageClassification(cfg).eval()


def tiny_swin(seed: int = 0) -> SwinForImageClassification:
    torch.manual_seed(seed)
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    return SwinForImageClassification(cfg).eval()


def tiny_convnext(seed: int = 0) -> ConvNextForImageClassification:
    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    return ConvNextForImageClassification(cfg).eval()


def perturbed(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """A stand-in 'fine-tuned' model: the same architecture with every parameter moved a little."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=gen))
    return out


def images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


NORM = {"mean": 0.5, "std": 0.5}
FAMILIES = {"vit": (tiny_vit, 16), "swin": (tiny_swin, 32), "convnext": (tiny_convnext, 32)}


# --------------------------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------------------------


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Independent feature-space formula: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), float64."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def song_unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased HSIC of Song et al. (2012), written out literally."""

    def hsic(k: torch.Tensor, m: torch.Tensor) -> float:
        n = k.shape[0]
        k, m = k.clone(), m.clone()
        k.fill_diagonal_(0)
        m.fill_diagonal_(0)
        one = torch.ones(n, 1, dtype=torch.float64)
        term1 = torch.trace(k @ m)
        term2 = (one.T @ k @ one) * (one.T @ m @ one) / ((n - 1) * (n - 2))
        term3 = 2.0 / (n - 2) * (one.T @ k @ m @ one)
        return float((term1 + term2 - term3) / (n * (n - 3)))

    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


def test_cka_identical_inputs_is_one():
    x = torch.randn(20, 3, 4, 5)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, unbiased=True) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_isotropic_scale_and_translation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    z = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    y = 3.7 * x @ q + 5.0
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(y, z) == pytest.approx(linear_cka(x, z), abs=1e-10)


def test_cka_not_invariant_to_anisotropic_scaling():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 10, generator=gen, dtype=torch.float64)
    scales = torch.tensor([20.0] + [1.0] * 9, dtype=torch.float64)
    value = linear_cka(x, x * scales)
    assert value < 0.9
    assert value == pytest.approx(reference_cka(x, x * scales), abs=1e-10)


@pytest.mark.parametrize("p,q", [(8, 5), (3000, 2000)])
def test_cka_matches_feature_space_formula(p: int, q: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cka_module, "_CHUNK_ELEMENTS", 64)  # force the chunked Gram accumulation
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, p, generator=gen) + 2.0  # float32 with an offset: centring must be right
    y = x[:, : min(p, q)] @ torch.randn(min(p, q), q, generator=gen) + torch.randn(16, q, generator=gen)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    # float32 inputs are converted, not computed in float32
    assert gram_linear(x).dtype == torch.float64


def test_unbiased_cka_matches_song_estimator_and_removes_high_dimensional_bias():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(25, 40, generator=gen)
    y = x[:, :10] @ torch.randn(10, 30, generator=gen) + torch.randn(25, 30, generator=gen)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(song_unbiased_cka(x, y), rel=1e-9)
    # independent, high-dimensional features: the biased estimate is far from 0, the unbiased one is not
    a = torch.randn(30, 2000, generator=gen)
    b = torch.randn(30, 2000, generator=gen)
    assert linear_cka(a, b) > 0.5
    assert abs(linear_cka(a, b, unbiased=True)) < 0.1
    with pytest.raises(ValueError):
        linear_cka(a[:3], b[:3], unbiased=True)


def test_cka_edge_cases():
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 3)))
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    k = gram_linear(torch.randn(6, 4))
    assert cka_from_grams(k, k) == pytest.approx(1.0)


def test_minibatch_cka():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 20, generator=gen)
    y = x @ torch.randn(20, 20, generator=gen) + 0.5 * torch.randn(64, 20, generator=gen)
    acc, same = MinibatchCKA(), MinibatchCKA()
    assert math.isnan(acc.compute())
    for start in range(0, 64, 16):
        acc.update(x[start : start + 16], y[start : start + 16])
        same.update(x[start : start + 16], x[start : start + 16])
    assert same.compute() == pytest.approx(1.0, abs=1e-12)
    assert acc.num_batches == 4 and acc.num_examples == 64
    assert acc.compute() == pytest.approx(linear_cka(x, y, unbiased=True), abs=0.15)
    with pytest.raises(ValueError):
        acc.update(x[:3], y[:3])


# --------------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_representations_match_hidden_states(family: str):
    build, size = FAMILIES[family]
    model = build()
    x = images(3, size)
    names = layer_names(model)
    assert names == ["block0", "block1", "final"]
    reps = layer_representations(model, x)
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        out = backbone(x, output_hidden_states=True)
    for k in range(2):
        assert torch.equal(reps[f"block{k}"], out.hidden_states[k + 1].reshape(3, -1))
    if family == "vit":  # CLS after the final LayerNorm, not pooler_output, not the pre-norm hidden state
        assert torch.equal(reps["final"], out.last_hidden_state[:, 0])
        assert not torch.allclose(reps["final"], out.hidden_states[-1][:, 0])
    else:
        assert torch.equal(reps["final"], out.pooler_output)
    # batching does not change values beyond float rounding
    batched = layer_representations(model, x, batch_size=2)
    for name in names:
        torch.testing.assert_close(batched[name], reps[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cut_forward_is_exact_and_stops_early(family: str):
    build, size = FAMILIES[family]
    model = build()
    x = images(3, size)
    reps = layer_representations(model, x)
    with torch.no_grad():
        for name in layer_names(model):
            assert torch.equal(forward_to_layer(model, x, name), reps[name]), name
    # cutting at block0 never runs the later blocks
    probe = LayerProbe(model, "block1")
    calls = []
    handle = probe.module.register_forward_hook(lambda *_: calls.append(1))
    try:
        forward_to_layer(model, x, "block0")
        assert calls == []
        forward_to_layer(model, x, "final")
        assert calls == [1]
    finally:
        handle.remove()


def test_token_modes():
    vit = tiny_vit()
    x = images(2)
    tokens = 1 + (16 // 4) ** 2
    assert layer_representations(vit, x, ["block0"])["block0"].shape == (2, tokens * 32)
    cls = layer_representations(vit, x, ["block0", "final"], tokens="cls")
    mean = layer_representations(vit, x, ["block0"], tokens="mean")
    with torch.no_grad():
        hidden = vit.vit(x, output_hidden_states=True).hidden_states[1]
    assert torch.equal(cls["block0"], hidden[:, 0])
    torch.testing.assert_close(mean["block0"], hidden.mean(dim=1))
    assert cls["final"].shape == (2, 32)
    with pytest.raises(ValueError, match="CLS"):
        layer_representations(tiny_swin(), images(2, 32), ["block0"], tokens="cls")
    assert layer_representations(tiny_convnext(), images(2, 32), ["block1"], tokens="mean")["block1"].shape == (2, 16)
    with pytest.raises(ValueError):
        layer_representations(vit, x, ["block7"])
    with pytest.raises(ValueError):
        layer_representations(vit, x, tokens="all")


def test_peft_model_is_unwrapped_merged_or_not():
    import peft
    base = tiny_vit()
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    merged = copy.deepcopy(model).merge_and_unload()
    x = images(3)
    a = layer_representations(model, x)
    b = layer_representations(merged, x)
    c = layer_representations(base, x)
    for name in layer_names(base):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a["final"], c["final"])  # the adapter is active, not bypassed


def test_normalization_is_applied_exactly_once_and_resolved_in_order(tmp_path):
    class Record(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    x = images(2, 4)
    probe = LayerProbe(Record(), "final", normalization=Normalization((0.5,), (0.25,), "test"))
    torch.testing.assert_close(probe(x), ((x - 0.5) / 0.25).reshape(2, -1))

    vit = tiny_vit()
    assert resolve_normalization(vit, mean=[0.1, 0.2, 0.3], std=[1, 2, 3]).source == "argument"

    class Processor:
        image_mean = (0.4, 0.4, 0.4)
        image_std = (0.2, 0.2, 0.2)

    assert resolve_normalization(vit, processor=Processor()).mean == (0.4, 0.4, 0.4)
    vit.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.3] * 3, "image_std": [0.7] * 3}))
    loaded = ViTForImageClassification.from_pretrained(tmp_path)
    norm = resolve_normalization(loaded)
    assert norm.mean == (0.3, 0.3, 0.3) and norm.std == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError):
        resolve_normalization(vit, mean=0.5)


# --------------------------------------------------------------------------------------------------------------------
# Inversion and STIR
# --------------------------------------------------------------------------------------------------------------------


def test_invert_drives_relative_loss_down_deterministically():
    model = tiny_vit()
    x = images(6)
    result = invert(model, "block0", x, steps=60, batch_size=4, progress=False, **NORM)
    assert result.inputs.shape == x.shape
    assert float(result.inputs.min()) >= 0.0 and float(result.inputs.max()) <= 1.0
    assert float(result.rel_loss.mean()) < 0.25 * float(result.start_rel_loss.mean())
    again = invert(model, "block0", x, steps=60, batch_size=6, progress=False, **NORM)
    torch.testing.assert_close(again.inputs, result.inputs, rtol=0, atol=1e-5)
    # the best iterate is kept: a longer run of the same trajectory can only be better
    shorter = invert(model, "block0", x, steps=30, batch_size=6, progress=False, **NORM)
    assert bool((again.rel_loss <= shorter.rel_loss + 1e-7).all())
    # the result is represented (almost) like the clean images, yet is far from them in pixel space
    with torch.no_grad():
        f_clean = forward_to_layer(model, (x - 0.5) / 0.5, "block0")
        f_inv = forward_to_layer(model, (result.inputs - 0.5) / 0.5, "block0")
    rel = (f_inv - f_clean).norm(dim=1) / f_clean.norm(dim=1)
    torch.testing.assert_close(rel.double(), result.rel_loss, rtol=1e-4, atol=1e-5)
    assert float((result.inputs - x).flatten(1).norm(dim=1).mean()) > 2.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        invert(model, "block0", (x - 0.5) / 0.5, steps=2, progress=False, **NORM)


def test_stir_of_a_layer_with_itself_is_close_to_one():
    model = tiny_vit()
    assert stir(model, "block1", model, "block1", images(8), steps=50, progress=False, **NORM) > 0.95


class _Pool(nn.Module):
    """Invariant to everything inside 4x4 pixel blocks: keeps only block means."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1) + self.dummy


class _Identity(nn.Module):
    """Sees every pixel: invariant to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + self.dummy


def structured_images(n: int = 12, size: int = 16) -> torch.Tensor:
    """Images that vary along two directions only: a smooth ramp (survives 4x4 pooling) and a checkerboard (does not).

    With i.i.d. random pixels every centred Gram matrix is close to a multiple of the identity (n << pixels) and
    CKA cannot tell representations apart; low-dimensional structure across images avoids that.
    """
    gen = torch.Generator().manual_seed(6)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    smooth = torch.sin(xx / size * math.pi).expand(3, size, size)
    checker = ((xx + yy) % 2 * 2 - 1).expand(3, size, size)
    u = torch.rand(n, 1, 1, 1, generator=gen) - 0.5
    v = torch.rand(n, 1, 1, 1, generator=gen) - 0.5
    return (0.5 + 0.5 * u * smooth + 0.5 * v * checker).clamp(0, 1)


def test_stir_is_directional():
    x = structured_images()
    pool, ident = _Pool(), _Identity()
    kw = {"steps": 120, "progress": False, "mean": 0.0, "std": 1.0}
    # X' from the pixel-exact model is X itself, so the pooling model represents it like X
    pool_given_ident = stir(ident, "final", pool, "final", x, **kw)
    # X' from the pooling model only keeps the block means: the identity model tells it apart from X
    ident_given_pool = stir(pool, "final", ident, "final", x, **kw)
    assert pool_given_ident > 0.95
    assert ident_given_pool < 0.7


def test_invert_keeps_the_best_iterate_not_the_last():
    # inverting the identity converges within a few steps and then oscillates around the target (fixed step length),
    # so the last iterate is often worse than an earlier one; the kept best can only improve with more steps
    x = 0.25 + 0.5 * images(4, 4)
    losses = [
        invert(_Identity(), "final", x, steps=s, progress=False, mean=0.0, std=1.0).rel_loss for s in (20, 21, 22, 23)
    ]
    for shorter, longer in itertools.pairwise(losses):
        assert bool((longer <= shorter).all())
    assert float(losses[-1].max()) < 0.1


def test_cache_reuses_inversions_without_changing_values():
    model, other = tiny_vit(), perturbed(tiny_vit(), 0.3, seed=1)
    x = images(6)
    cache = InversionCache()
    kw = dict(steps=8, progress=False, **NORM)
    matrix = stir_matrix(model, other, x, cache=cache, **kw)
    assert cache.performed == 3 and cache.requests == 3
    assert stir(model, "block0", other, "final", x, **kw) == matrix[0, 2].item()
    assert stir(model, "final", other, "block1", x, cache=cache, **kw) == matrix[2, 1].item()
    assert cache.performed == 3 and cache.requests == 4  # served from the cache


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_report():
    pretrained = tiny_vit()
    finetuned = {"near": perturbed(pretrained, 0.2, seed=1), "far": perturbed(pretrained, 1.0, seed=2)}
    x = images(6)
    report = compare(pretrained, finetuned, x, steps=8, progress=False, **NORM)
    return pretrained, finetuned, x, report


def test_compare_matrices_counts_and_cell_by_cell_equality(small_report):
    pretrained, finetuned, x, report = small_report
    n_layers, m = 3, 2
    assert report.layers == ["block0", "block1", "final"]
    assert report.inversions_performed == n_layers * (1 + m)
    assert report.inversions_without_cache == n_layers**2 * (1 + 3 * m)
    for mats in (report.R, report.Q, report.C):
        assert set(mats) == {"near", "far"}
    assert set(report.W) == {"pretrained", "near", "far"}
    for mats in (report.R, report.Q, report.C, report.W):
        for mat in mats.values():
            assert mat.shape == (3, 3) and torch.isfinite(mat).all()
    kw = dict(steps=8, progress=False, **NORM)
    # R[i, j] = STIR(F_j | P_i), Q[i, j] = STIR(P_i | F_j), W[i, j] = STIR(M_i | M_j), C = CKA(P_i, F_j)
    assert report.R["far"][0, 2].item() == stir(pretrained, "block0", finetuned["far"], "final", x, **kw)
    assert report.Q["near"][2, 1].item() == stir(finetuned["near"], "block1", pretrained, "final", x, **kw)
    assert report.W["far"][0, 1].item() == stir(finetuned["far"], "block1", finetuned["far"], "block0", x, **kw)
    p_feats = layer_representations(pretrained, (x - 0.5) / 0.5, ["block1"])["block1"]
    f_feats = layer_representations(finetuned["near"], (x - 0.5) / 0.5, ["final"])["final"]
    assert report.C["near"][1, 2].item() == pytest.approx(linear_cka(p_feats, f_feats), abs=1e-12)
    # retention, compression, closeness
    retention = report.retention()
    assert retention["near"] == pytest.approx(torch.diagonal(report.R["near"]).tolist())
    rows = report.compression()["far"]
    for i, row in enumerate(rows):
        assert row["best_value"] == pytest.approx(float(report.R["far"][i].max()))
        assert row["shift"] == i - report.layers.index(row["best_layer"])
    close = report.closeness()
    assert close["near"] == pytest.approx([1.0, 1.0, 1.0])
    assert close["pretrained"][-1] > close["far"][-1]  # the small perturbation stays closer to P than the large one
    assert "retention" in report.summary()


def test_compare_with_an_identical_model_reduces_to_the_within_model_matrix():
    pretrained = tiny_vit()
    report = compare(pretrained, copy.deepcopy(pretrained), images(6), steps=6, progress=False, **NORM)
    r, w = report.R["finetuned"], report.W["pretrained"]
    torch.testing.assert_close(r, w.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(report.C["finetuned"]), torch.ones(3, dtype=torch.float64))


def test_fresh_noise_per_cell_counts_every_cell():
    pretrained = tiny_vit()
    report = compare(
        pretrained,
        perturbed(pretrained, 0.3, seed=3),
        images(5),
        layers=["block1", "final"],
        steps=2,
        fresh_noise_per_cell=True,
        progress=False,
        **NORM,
    )
    assert report.inversions_performed == report.inversions_without_cache == 2**2 * (1 + 3)
    assert torch.isfinite(report.R["finetuned"]).all()


def test_report_save_writes_json_csv_png_atomically(small_report, tmp_path, monkeypatch):
    _, _, _, report = small_report
    written = report.save(tmp_path / "out")
    names = {p.name for p in written}
    assert {"report.json", "R_near.csv", "Q_far.csv", "C_near.csv", "W_pretrained.csv", "retention.csv"} <= names
    assert {"R_near.png", "W_far.png", "retention.png", "closeness.png"} <= names
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["inversions"]["performed"] == 9 and data["inversions"]["without_cache"] == 63
    assert data["inversions"]["rel_loss"] == json.loads(json.dumps(report.inversion_loss))  # what the report holds
    assert torch.tensor(data["R"]["near"], dtype=torch.float64).equal(report.R["near"])
    lines = (tmp_path / "out" / "R_far.csv").read_text().strip().splitlines()
    assert lines[0].split(",")[1:] == report.layers and len(lines) == 4
    assert (tmp_path / "out" / "R_near.png").read_bytes()[:4] == b"\x89PNG"
    # without matplotlib: a clear message, and plots=None quietly skips the PNGs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install peft-ssf\[plot\]"):
        report.save(tmp_path / "noplot", plots=True)
    assert all(not p.name.endswith(".png") for p in report.save(tmp_path / "auto"))


def _ssf_config():
    from peft_ssf import SSFConfig

    return SSFConfig


def test_unmerged_and_merged_ssf_adapters_give_the_same_report():
    ssf_config = _ssf_config()
    import peft
    pretrained = tiny_vit()
    unmerged = peft.get_peft_model(copy.deepcopy(pretrained), ssf_config(init_weights=False))
    merged = copy.deepcopy(unmerged).merge_and_unload()
    x = images(6)
    reps_u = layer_representations(unmerged, (x - 0.5) / 0.5)
    reps_m = layer_representations(merged, (x - 0.5) / 0.5)
    reps_p = layer_representations(pretrained, (x - 0.5) / 0.5)
    for name in reps_u:
        torch.testing.assert_close(reps_u[name], reps_m[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reps_u["final"], reps_p["final"])
    report = compare(pretrained, {"unmerged": unmerged, "merged": merged}, x, steps=8, progress=False, **NORM)
    for mats in (report.R, report.Q, report.C):
        torch.testing.assert_close(mats["unmerged"], mats["merged"], rtol=0, atol=2e-3)
    torch.testing.assert_close(report.W["unmerged"], report.W["merged"], rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _write_images(folder, count: int, size=(20, 12)) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for k in range(count):
        sub = folder / f"class{k % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        array = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(sub / f"{k:03d}.png")


def test_load_images_folder_and_datasets_dir(tmp_path):
    from peft_ssf_analysis.cli import load_images

    _write_images(tmp_path / "imgs" / "test", 10)
    _write_images(tmp_path / "imgs" / "train", 3)
    x = load_images(tmp_path / "imgs", n=4, size=8)
    assert x.shape == (4, 3, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    # the 'test' split is preferred, and the subset spans both class folders
    assert load_images(tmp_path / "imgs", n=20, size=8).shape[0] == 10
    import datasets
    from PIL import Image

    pil = [Image.new("RGB", (10, 16), color=(k * 20, 0, 0)) for k in range(5)]
    ds = datasets.Dataset.from_dict(
        {"img": pil, "label": list(range(5))},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "ds"))
    y = load_images(tmp_path / "ds", n=3, size=8)
    assert y.shape == (3, 3, 8, 8)
    assert y[1, 0].mean().item() == pytest.approx(20 / 255, abs=1e-6)


def test_cli_end_to_end(tmp_path, capsys):
    import argparse

    from peft_ssf_analysis.cli import add_analyze_arguments, run_analyze

    pretrained = tiny_vit()
    pretrained.save_pretrained(tmp_path / "pre")
    perturbed(pretrained, 0.3, seed=4).save_pretrained(tmp_path / "full")
    _write_images(tmp_path / "imgs", 6, size=(24, 20))
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    argv = [
        "--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "full"), "--images",
        str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--n", "5", "--steps", "3", "--layers", "block1",
        "final", "--mean", "0.5", "--std", "0.5", "--no-plots", "--quiet",
    ]  # fmt: skip
    assert run_analyze(parser.parse_args(argv)) == 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["finetuned"] == ["full"] and data["layers"] == ["block1", "final"]
    assert data["settings"]["size"] == 16 and data["settings"]["n_images"] == 5
    protocol = data["settings"]["protocol"]
    assert protocol["protocol"] == "cached" and not protocol["fresh_noise_per_cell"]
    assert protocol["overrides"] == {"n": 5, "steps": 3}
    assert "retention" in capsys.readouterr().out
    # a non-empty --out is refused unless --overwrite
    assert run_analyze(parser.parse_args(argv)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # no preprocessor_config.json and no --mean / --std: a usage error that says what to pass
    no_norm = [a for a in argv if a not in ("--mean", "--std", "0.5")]
    assert run_analyze(parser.parse_args([*no_norm, "--overwrite"])) == 2
    assert "--mean and --std" in capsys.readouterr().err
    assert run_analyze(parser.parse_args([*argv, "--overwrite"])) == 0


def test_cli_loads_and_merges_an_ssf_adapter(tmp_path):
    ssf_config = _ssf_config()
    import peft

    from peft_ssf_analysis.cli import load_model

    tiny_vit().save_pretrained(tmp_path / "base")
    base = ViTForImageClassification.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, ssf_config(init_weights=False, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    expected = copy.deepcopy(model).merge_and_unload()
    loaded = load_model(tmp_path / "adapter")
    assert not hasattr(loaded, "peft_config")
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected(pixel_values=x).logits)


# --------------------------------------------------------------------------------------------------------------------
# Issue 16: faithful protocol, noise floor, eval mode, half precision, Hub normalisation, NaN summary, device Grams,
# stale inversion cache. New names are imported inside the tests so that each test fails on its own on older code.
# --------------------------------------------------------------------------------------------------------------------


def _analyze_parser():
    import argparse

    from peft_ssf_analysis.cli import add_analyze_arguments

    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    return parser


def test_faithful_protocol_draws_fresh_noise_per_cell_and_states_its_settings(tmp_path, capsys):
    from peft_ssf_analysis.cli import run_analyze

    pretrained = tiny_vit()
    pretrained.save_pretrained(tmp_path / "pre")
    perturbed(pretrained, 0.3, seed=4).save_pretrained(tmp_path / "full")
    _write_images(tmp_path / "imgs", 6, size=(24, 20))
    argv = [
        "--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "full"), "--images",
        str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--faithful", "--n", "5", "--steps", "2",
        "--layers", "block1", "final", "--mean", "0.5", "--std", "0.5", "--no-reverse", "--no-within",
        "--no-plots", "--quiet",
    ]  # fmt: skip
    assert run_analyze(_analyze_parser().parse_args(argv)) == 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    settings = data["settings"]
    assert settings["fresh_noise_per_cell"] is True
    # R only, 2 layers, fresh noise: one inversion per cell (the cached estimator would run 2)
    assert data["inversions"]["performed"] == data["inversions"]["without_cache"] == 4
    assert settings["estimator"].startswith("fresh noise per cell")
    assert settings["protocol"] == {
        "protocol": "faithful", "n": 5, "steps": 2, "step_size": 0.5, "size": 16, "fresh_noise_per_cell": True,
        "reverse": False, "within": False, "overrides": {"n": 5, "steps": 2, "reverse": False, "within": False},
    }  # fmt: skip
    assert settings["faithful"] is False  # overridden settings are not called faithful
    assert "protocol faithful (overrides: n=5, steps=2, reverse=False, within=False)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _analyze_parser().parse_args([*argv, "--protocol", "bogus"])
    assert run_analyze(_analyze_parser().parse_args([*argv, "--overwrite", "--protocol", "cached"])) == 2

    # what --faithful sets, and where it says so
    from peft_ssf_analysis.protocol import FAITHFUL

    assert FAITHFUL.resolve(None) == {
        "protocol": "faithful", "n": 500, "steps": 500, "step_size": 0.5, "size": 224,
        "fresh_noise_per_cell": True, "reverse": True, "within": True, "overrides": {},
    }  # fmt: skip
    assert FAITHFUL.resolve(384)["n"] == 100
    help_text = " ".join(_analyze_parser().format_help().split())
    assert "fresh noise per STIR cell" in help_text and "n=500" in help_text and "500 steps of 0.5" in help_text


def test_report_carries_a_per_layer_noise_baseline(small_report, tmp_path):
    pretrained, finetuned, x, report = small_report
    assert set(report.noise_baseline) == {"pretrained", "near", "far"}
    from peft_ssf_analysis import noise_baseline, noise_images

    noise = noise_images(x.shape[1:], x.shape[0], seed=0)
    assert float(noise.min()) >= 0.0 and float(noise.max()) <= 1.0
    clean_feats = layer_representations(finetuned["near"], (x - 0.5) / 0.5)
    noise_feats = layer_representations(finetuned["near"], (noise - 0.5) / 0.5)
    for k, layer in enumerate(report.layers):
        expected = linear_cka(clean_feats[layer], noise_feats[layer])
        assert report.noise_baseline["near"][k] == pytest.approx(expected, abs=1e-12)
    direct = noise_baseline(finetuned["near"], x, **NORM)
    assert list(direct.values()) == pytest.approx(report.noise_baseline["near"], abs=1e-12)
    # in the JSON, the CSV, the summary and on the heatmaps
    assert report.to_dict()["noise_baseline"]["far"] == pytest.approx(report.noise_baseline["far"])
    assert "noise floor" in report.summary()
    report.save(tmp_path / "out", plots=False)
    lines = (tmp_path / "out" / "noise_baseline.csv").read_text().strip().splitlines()
    assert lines[0].split(",")[1:] == ["pretrained", "near", "far"] and len(lines) == 1 + len(report.layers)
    r_fig = report.figure("R", "near")  # evaluated layer along the columns: floor as an extra row
    assert [t.get_text() for t in r_fig.axes[0].get_yticklabels()][-1] == "noise floor"
    w_fig = report.figure("W", "far")  # evaluated layer along the rows: floor as an extra column
    assert [t.get_text() for t in w_fig.axes[0].get_xticklabels()][-1] == "noise floor"


def test_representations_run_in_eval_mode_and_restore_the_callers_mode():
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5,
    )  # fmt: skip
    model = ViTForImageClassification(cfg).train()
    model.vit.layers[0].eval()  # a mixed state, to be restored exactly
    before = [m.training for m in model.modules()]
    x = images(3)
    a = layer_representations(model, x)
    b = layer_representations(model, x)
    reference = layer_representations(copy.deepcopy(model).eval(), x)
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], reference[name]), name
    with torch.no_grad():
        assert torch.equal(forward_to_layer(model, x, "block1"), forward_to_layer(model, x, "block1"))
        assert torch.equal(forward_to_layer(model, x, "block1"), a["block1"])
    assert [m.training for m in model.modules()] == before


def test_half_precision_features_are_promoted_before_the_gram():
    from peft_ssf_analysis import representation_grams
    from peft_ssf_analysis.cka import center_gram

    model = tiny_vit().to(torch.bfloat16)
    x = images(5)
    pixels = ((x - 0.5) / 0.5).to(torch.bfloat16)
    reps = layer_representations(model, pixels, ["block0", "final"], tokens="mean")
    assert reps["block0"].dtype == torch.float32 and reps["final"].dtype == torch.float32
    with torch.no_grad():
        hidden = model.vit(pixels, output_hidden_states=True).hidden_states[1]
    assert torch.equal(reps["block0"], hidden.float().mean(dim=1))  # the token mean is not taken in bf16
    grams = representation_grams(
        model, x, ["block0"], tokens="mean", normalization=Normalization((0.5,), (0.5,), "test")
    )
    feats = hidden.float().mean(dim=1).double()
    torch.testing.assert_close(grams["block0"], center_gram(feats @ feats.T), rtol=1e-12, atol=1e-12)


def _fake_hub_cache(root, repo_id: str, preprocessor: dict) -> None:
    """A local Hugging Face cache holding one model repo snapshot with a preprocessor_config.json."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_models_resolve_their_processor_offline_or_raise(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "someone/cached-vit", {"image_mean": [0.1] * 3, "image_std": [0.2] * 3})
    vit = tiny_vit()
    vit.config._name_or_path = "someone/cached-vit"
    norm = resolve_normalization(vit)
    assert norm.mean == (0.1,) * 3 and norm.std == (0.2,) * 3 and "someone--cached-vit" in norm.source
    # a Hub id that is not in the cache: a clear error, unless mean / std are given
    vit.config._name_or_path = "someone/not-cached-vit"
    with pytest.raises(ValueError, match=r"someone/not-cached-vit.*offline.*mean="):
        resolve_normalization(vit)
    with pytest.raises(ValueError, match="mean="):
        compare(vit, copy.deepcopy(vit), images(4), steps=1, progress=False)
    assert resolve_normalization(vit, mean=0.5, std=0.5).source == "argument"
    # a local folder without preprocessor_config.json, and a model built from a config: no silent identity
    tiny_vit().save_pretrained(tmp_path / "local")
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        resolve_normalization(ViTForImageClassification.from_pretrained(tmp_path / "local"))
    with pytest.raises(ValueError, match="built from a config"):
        resolve_normalization(tiny_vit())
    with pytest.raises(ValueError, match="no Hugging Face config"):
        resolve_normalization(_Identity())


def test_summary_prints_nan_for_an_all_nan_row(small_report):
    report = copy.deepcopy(small_report[3])
    report.R["near"][1] = math.nan
    lines = report.summary().splitlines()
    row = next(line for line in lines if line.strip().startswith("block1:"))
    assert row.count("nan") >= 2  # retention and best value
    comp = report.compression()["near"][1]
    assert comp["best_layer"] is None and comp["best_value"] is None and comp["shift"] is None
    assert json.dumps(report.to_dict())  # still serialisable


def test_representation_grams_on_the_cpu_are_float64_exact():
    from peft_ssf_analysis import representation_grams
    from peft_ssf_analysis.cka import center_gram

    model = tiny_vit()
    x = images(6)
    norm = Normalization((0.5,), (0.5,), "test")
    grams = representation_grams(model, x, ["block0", "final"], normalization=norm)
    feats = layer_representations(model, norm(x), ["block0", "final"])
    for name, f in feats.items():
        f = f.double()
        assert grams[name].dtype == torch.float64 and grams[name].device.type == "cpu"
        assert torch.equal(grams[name], center_gram(f @ f.T)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grams_are_built_on_the_model_device_and_match_cpu_float64(monkeypatch):
    from peft_ssf_analysis import representation_grams
    from peft_ssf_analysis import stir as stir_module
    from peft_ssf_analysis.cka import center_gram

    seen = []
    real = stir_module.gram_linear
    monkeypatch.setattr(stir_module, "gram_linear", lambda x: seen.append(x.device) or real(x))
    model = tiny_vit().cuda()
    x = images(6)
    norm = Normalization((0.5,), (0.5,), "test")
    grams = representation_grams(model, x, ["block0", "final"], normalization=norm)
    assert seen and all(d.type == "cuda" for d in seen)
    feats = layer_representations(model, norm(x.cuda()), ["block0", "final"])  # same device features, on the CPU
    for name, f in feats.items():
        f = f.double()
        assert grams[name].device.type == "cpu"
        torch.testing.assert_close(grams[name], center_gram(f @ f.T), rtol=1e-12, atol=1e-9)


def test_inversion_cache_notices_in_place_changes_even_without_version_bumps():
    model = tiny_vit()
    x = images(5)
    cache = InversionCache()
    kw = dict(steps=3, batch_size=5, progress=False, **NORM)
    first = cache.invert(model, "block0", x, **kw)
    assert cache.invert(model, "block0", x, **kw) is first and cache.performed == 1
    # a write through .data does not bump the version counter
    weight = model.vit.embeddings.patch_embeddings.projection.weight
    version = weight._version
    weight.data.mul_(1.5)
    assert weight._version == version
    second = cache.invert(model, "block0", x, **kw)
    assert cache.performed == 2 and getattr(cache, "stale", 1) == 1
    assert not torch.equal(second.inputs, first.inputs)
    torch.testing.assert_close(second.inputs, invert(model, "block0", x, **kw).inputs, rtol=0, atol=0)
    # a fused AdamW step (the Trainer default) does not bump version counters either
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(pixel_values=x).logits.sum().backward()
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions
    cache.invert(model, "block0", x, **kw)
    assert cache.performed == 3
    assert cache.invert(model, "block0", x, **kw) is not None and cache.performed == 3  # unchanged: served
    with torch.no_grad():
        x.mul_(0.5)  # the images changed in place
    cache.invert(model, "block0", x, **kw)
    assert cache.performed == 4


def test_analysis_functions_are_short_or_say_why():
    """Readable units: no function body (after its docstring) over 60 lines unless its docstring says why."""
    import ast
    from pathlib import Path

    import peft_ssf_analysis

    long = []
    for file in sorted(Path(peft_ssf_analysis.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                first = node.body[1] if doc is not None and len(node.body) > 1 else node.body[0]
                if node.end_lineno - first.lineno + 1 > 60 and "long because" not in (doc or "").lower():
                    long.append(f"{file.name}:{node.name}")
    assert long == []


def test_example_script_runs_end_to_end_and_reports_noise_floors(tmp_path, small_report):
    """examples/analyze_finetuning.py with minimal settings (the README runs it at full size)."""
    import importlib.util
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "analyze_finetuning.py"
    argv = ["--out", str(tmp_path / "report"), "--n", "6", "--steps", "2", "--pretrain-steps", "2",
            "--finetune-steps", "2", "--quiet"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "noise floor CKA(M_l(X), M_l(noise)) of full" in done.stdout
    assert json.loads((tmp_path / "report" / "report.json").read_text())["noise_baseline"]["full"]
    spec = importlib.util.spec_from_file_location("analyze_finetuning", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = small_report[3]
    assert example.estimator_difference(report, report).count("max 0.000, mean 0.000") == 3


# --------------------------------------------------------------------------------------------------------------------
# Issue 24 item 8: cost of the default run, model names, closeness plot, progress that agrees with the settings.
# --------------------------------------------------------------------------------------------------------------------


def test_default_names_skip_generic_dir_names(tmp_path):
    from peft_ssf_analysis.cli import default_name

    assert default_name(tmp_path / "demo" / "ssf" / "adapter") == "ssf"
    assert default_name(tmp_path / "demo" / "full" / "model") == "full"
    assert default_name(tmp_path / "run7" / "checkpoint-50") == "run7-50"
    assert default_name(tmp_path / "vit-lora") == "vit-lora"
    adapter = tmp_path / "model" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/vit-tiny/",
                                                             "peft_type": "SSF"}))  # fmt: skip
    assert default_name(adapter) == "vit-tiny+ssf"


def test_identical_backbones_share_their_inversions():
    """A head-only fine-tune computes exactly what the pretrained backbone computes: its inversions are reused."""
    pretrained = tiny_vit()
    head_only = copy.deepcopy(pretrained)
    with torch.no_grad():
        head_only.classifier.weight.add_(1.0)
    full = perturbed(pretrained, 0.3, seed=4)
    x = images(4)
    report = compare(pretrained, {"head": head_only, "full": full}, x, steps=2, progress=False, **NORM)
    n_layers = len(report.layers)
    assert report.inversions_performed == 2 * n_layers  # pretrained and full; head reuses the pretrained ones
    assert report.settings["shared_inversions"] == {"head": "pretrained"}
    # same values as without sharing: R(head)[i, j] = STIR(head_j | P_i) = W(P)[j, i] for identical models
    torch.testing.assert_close(report.R["head"], report.W["pretrained"].T, rtol=0, atol=0)
    alone = compare(pretrained, {"full": full}, x, steps=2, progress=False, **NORM)
    torch.testing.assert_close(report.R["full"], alone.R["full"], rtol=0, atol=0)
    torch.testing.assert_close(report.Q["full"], alone.Q["full"], rtol=0, atol=0)


def test_cli_default_is_the_pretrained_inversions_only_and_says_its_cost_first(tmp_path, capfd):
    from peft_ssf_cli import main

    pretrained = tiny_vit()
    pretrained.save_pretrained(tmp_path / "pre")
    perturbed(pretrained, 0.3, seed=4).save_pretrained(tmp_path / "full" / "model")
    perturbed(pretrained, 0.1, seed=5).save_pretrained(tmp_path / "ssf" / "merged")
    _write_images(tmp_path / "imgs", 6, size=(24, 20))
    argv = [
        "analyze", "--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "full" / "model"),
        str(tmp_path / "ssf" / "merged"), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
        "--n", "5", "--steps", "3", "--batch-size", "4", "--mean", "0.5", "--std", "0.5", "--no-plots", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capfd.readouterr()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["finetuned"] == ["full", "ssf"]  # not "model" / "merged"
    assert data["inversions"]["performed"] == 3 and data["Q"] == {} and data["W"] == {}  # L = 3 (2 blocks + final)
    assert data["settings"]["protocol"]["reverse"] is False and data["settings"]["protocol"]["within"] is False
    cost = "analyze: 3 inversions (1 model(s) x 3 layers) x 3 steps x 5 images (2 batch(es) of 4) = 18 forward"
    assert cost in captured.err
    assert (tmp_path / "out" / "R_full.csv").is_file() and (tmp_path / "out" / "R_ssf.csv").is_file()
    # Q and W on request: every fine-tuned model is inverted too
    assert main([*argv, "--overwrite", "--reverse", "--within"]) == 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["inversions"]["performed"] == 9 and sorted(data["W"]) == ["full", "pretrained", "ssf"]
    assert "analyze: 9 inversions (3 model(s) x 3 layers)" in capfd.readouterr().err


def test_progress_counts_the_steps_the_header_states(monkeypatch):
    import importlib

    stir_module = importlib.import_module("peft_ssf_analysis.stir")  # the module, not the function of that name
    bars = []

    class Recorder:
        def __init__(self, total, desc, enabled, leave=False):
            self.total, self.count, self.per_batch = total, 0, []
            bars.append(self)

        def update(self, n=1):
            self.count += n

        def reset(self, total=None):
            self.per_batch.append(self.count)
            self.total, self.count = total, 0

        def set_description(self, desc):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            self.per_batch.append(self.count)

    monkeypatch.setattr(stir_module, "_progress", Recorder)
    invert(tiny_vit(), "block0", images(6), steps=5, batch_size=4, **NORM)
    (bar,) = bars
    assert bar.total == 5 and bar.per_batch == [0, 5, 5]  # 5 steps for images 1-4, then 5 for images 5-6


def test_closeness_plot_leaves_out_the_reference_against_itself(small_report):
    report = small_report[3]
    labels = [line.get_label() for line in report.closeness_figure().axes[0].get_lines()]
    assert report.reference == "near" and "near" not in labels and labels == ["pretrained", "far"]


# --------------------------------------------------------------------------------------------------------------------
# Issue 24 item 10: the toolkit is importable without side effects on PEFT.
# --------------------------------------------------------------------------------------------------------------------


def test_importing_the_toolkit_leaves_peft_untouched():
    import subprocess

    code = """
import sys
import peft
from peft import PeftModel
from peft.utils import PeftType
push_to_hub = PeftModel.push_to_hub
import peft_ssf_analysis
from peft_ssf_analysis import cka, cli, features, plots, protocol, report, stir
assert not hasattr(PeftType, "SSF"), "SSF registered"
assert PeftModel.push_to_hub is push_to_hub, "push_to_hub replaced"
assert not [m for m in sys.modules if m == "peft_ssf" or m.startswith("peft_ssf.")], "peft_ssf imported"
import peft_ssf.analysis
import peft_ssf.analysis.cli
assert peft_ssf.analysis.cli is cli and peft_ssf.analysis.compare is peft_ssf_analysis.compare
assert hasattr(PeftType, "SSF")  # the re-export is for users of the tuner: it runs peft_ssf/__init__
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_gpu_check_script_imports_the_toolkit_directly():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "examples" / "check_analysis_gpu.py").read_text()
    assert "import peft_ssf_analysis" in text and "ModuleType" not in text and "__path__" not in text


def test_cli_runs_small_models_on_one_cpu_thread_and_restores_the_setting(tmp_path, capfd):
    """Small models lose up to 10x with two threads on a busy CPU (docs/analysis.md): one thread by default."""
    from peft_ssf_cli import main

    pretrained = tiny_vit()
    pretrained.save_pretrained(tmp_path / "pre")
    perturbed(pretrained, 0.3, seed=4).save_pretrained(tmp_path / "full")
    _write_images(tmp_path / "imgs", 4, size=(24, 20))
    argv = ["analyze", "--pretrained", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "full"), "--images",
            str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--steps", "1", "--layers", "final", "--mean",
            "0.5", "--std", "0.5", "--no-plots", "--quiet", "--device", "cpu"]  # fmt: skip
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert "1 CPU thread(s))" in capfd.readouterr().err
        assert torch.get_num_threads() == 2
        assert main([*argv, "--overwrite", "--threads", "2"]) == 0
        assert "2 CPU thread(s))" in capfd.readouterr().err
    finally:
        torch.set_num_threads(1)
