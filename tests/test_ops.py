"""The fused (output-saving) SSF op has the same values and gradients as the naive one."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from peft import get_peft_model

from peft_ssf import SSFConfig, residual
from peft_ssf.ops import RECONSTRUCT_MIN_SCALE, scale_shift_fused, scale_shift_naive


@pytest.mark.parametrize("shape,pshape", [((3, 5, 6), (6,)), ((2, 4, 3, 3), (4, 1, 1)), ((7, 4), (4,))])
@pytest.mark.parametrize("with_shift", [True, False])
def test_gradcheck_float64(shape, pshape, with_shift):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    s = (1 + 0.3 * torch.randn(pshape, dtype=torch.float64, generator=g)).requires_grad_()
    t = torch.randn(pshape, dtype=torch.float64, generator=g).requires_grad_() if with_shift else None
    inputs = (h, s, t) if with_shift else (h, s)
    fn = (lambda a, b, c: scale_shift_fused(a, b, c)) if with_shift else (lambda a, b: scale_shift_fused(a, b, None))
    assert torch.autograd.gradcheck(fn, inputs)


def test_small_scale_falls_back_to_saving_the_input():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s = torch.ones(6, dtype=torch.float64)
    s[2] = RECONSTRUCT_MIN_SCALE / 10
    s.requires_grad_()
    t = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scale_shift_fused, (h, s, t))


def test_fused_saves_no_new_activation_after_gelu_consumer():
    """The output saved by the fused op is the tensor GELU saves anyway: one storage, not two."""
    h = torch.randn(8, 16, 32, requires_grad=False)
    s = torch.ones(32, requires_grad=True)
    t = torch.zeros(32, requires_grad=True)

    def saved_bytes(op):
        storages = {}

        def pack(x):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            torch.nn.functional.gelu(op(h, s, t)).sum()
        return sum(v for v in storages.values() if v >= h.numel() * 4)

    assert saved_bytes(scale_shift_fused) == h.numel() * 4  # one activation: the SSF output GELU keeps
    assert saved_bytes(scale_shift_naive) == 2 * h.numel() * 4  # naive keeps h as well


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_and_naive_give_same_model_gradients(family, pixels):
    grads = {}
    for fused in (True, False):
        model = get_peft_model(
            FAMILIES[family](), SSFConfig(init_weights="paper", fused=fused, modules_to_save=["classifier"])
        )
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".ssf_" in n:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "scale" in n else 0.0))
        model.train()
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6, msg=n)


# ----- residual pairing ------------------------------------------------------------------------------------------


def _paired_block(h, s, t, r, ln_weight):
    """SSF output -> window-style reshuffle -> residual add -> LayerNorm, inside a pairing context."""
    with residual.pairing() as mode:
        y = scale_shift_fused(h, s, t, mode=mode)
        y = y.view(2, 3, 2, 4).permute(0, 2, 1, 3).contiguous().view(2, 6, 4)
        y = torch.roll(y, shifts=(1,), dims=(1,))
        z = r + y
        out = torch.nn.functional.layer_norm(z, (4,), ln_weight) * r  # r and z are both saved by later ops
    return out, mode.paired


def test_paired_op_passes_float64_gradcheck_through_reshuffles():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    s = (1 + 0.3 * torch.randn(4, dtype=torch.float64, generator=g)).requires_grad_()
    t = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.randn(2, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, generator=g)
    out, paired = _paired_block(h, s, t, r, w)
    assert paired == 1
    assert out.grad_fn is not None
    assert torch.autograd.gradcheck(lambda a, b, c, d: _paired_block(a, b, c, d, w)[0], (h, s, t, r))


def test_paired_op_keeps_no_output_of_its_own():
    h = torch.randn(2, 6, 4, requires_grad=True)
    s, t = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    r = torch.randn(2, 6, 4)
    with residual.pairing() as mode:
        y = scale_shift_fused(h, s, t, mode=mode)
        z = r + y
    assert mode.paired == 1 and y.grad_fn.kept.y is None and y.grad_fn.kept.pair[1].data_ptr() == z.data_ptr()
    with residual.pairing() as mode:
        hb = h.detach().bfloat16().requires_grad_()
        y = scale_shift_fused(hb, s.bfloat16(), t.bfloat16(), mode=mode)
        _ = r.bfloat16() + y  # a bf16 residual stream would swamp y in rounding: never paired
    assert mode.paired == 0


def test_low_precision_output_pairs_with_a_float32_residual_stream():
    """Autocast: a bf16 site output added to the float32 residual stream is rebuilt from it, in float32."""
    torch.manual_seed(0)
    h = torch.randn(2, 6, 4).bfloat16().requires_grad_()
    s = (1 + 0.1 * torch.randn(4)).requires_grad_()
    t = (0.1 * torch.randn(4)).requires_grad_()
    r = torch.randn(2, 6, 4)
    grads = {}
    for pair in (False, True):
        with residual.pairing() as mode:
            y = scale_shift_fused(h, s.bfloat16(), t.bfloat16(), mode=mode if pair else None)
            z = r + y
        assert mode.paired == int(pair) and z.dtype == torch.float32
        grads[pair] = torch.autograd.grad((z * torch.arange(48.0).view(2, 6, 4)).sum(), (s, t))
    for paired, unpaired in zip(grads[True], grads[False]):
        torch.testing.assert_close(paired, unpaired, rtol=1e-2, atol=1e-2)


def test_in_place_change_of_the_residual_stream_is_an_error_not_a_wrong_gradient():
    h = torch.randn(3, 4, requires_grad=True)
    s, t = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with residual.pairing() as mode:
        z = torch.randn(3, 4) + scale_shift_fused(h, s, t, mode=mode)
    assert mode.paired == 1
    loss = z.detach().sum() + (z * 2).sum()
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="pair_residuals=False"):
        loss.backward()


@pytest.mark.parametrize("family,expected_pairs", [("vit", 4), ("swin", 5), ("convnext", 0)])
def test_pairing_matches_unpaired_gradients_on_real_models(family, expected_pairs, pixels):
    """ViT: attention output and fc2 of both blocks pair; ConvNeXt's layer-scale multiply stops the pairing."""
    grads, pairs = {}, {}
    for pair in (True, False):
        model = get_peft_model(FAMILIES[family](), SSFConfig(init_weights=False, pair_residuals=pair,
                                                             modules_to_save=["classifier"]))
        model.train()
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads[pair] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        pairs[pair] = getattr(model.base_model, "residual_pairs", None)
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels)  # eval forwards never enter the pairing mode
        assert getattr(model.base_model, "residual_pairs", None) == pairs[pair]
    assert pairs == {True: expected_pairs, False: None}
    for n, g in grads[False].items():
        scale = max(g.abs().max().item(), 1e-4)  # key shifts have a zero true gradient: compare against rounding
        assert (grads[True][n] - g).abs().max().item() <= 1e-5 * scale, n


def test_in_place_scale_update_to_near_zero_is_seen_by_the_next_forward(pixels):
    """The 'scale large enough' check runs every training forward: an update to ~0 is seen at once, and the
    gradients are the naive op's."""
    models = []
    for fused in (True, False):
        config = SSFConfig(target_modules=["fc2"], modules_to_save=["classifier"], init_weights=False, fused=fused)
        models.append(get_peft_model(FAMILIES["vit"](), config).train())
    models[1].load_state_dict(models[0].state_dict())
    grads = []
    for model in models:
        layer = model.base_model.model.vit.layers[0].mlp.fc2
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        with torch.no_grad():
            layer.ssf_scale["default"][3] = RECONSTRUCT_MIN_SCALE / 100
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-5, atol=1e-6 * max(g.abs().max().item(), 1e-3))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_turns_pairing_off_and_gives_the_same_gradients(reentrant, pixels):
    """Checkpointing recomputes blocks without the pairing mode; the saved tensors must match, so pairing is off."""
    grads = {}
    for checkpointing in (False, True):
        base = FAMILIES["vit"]()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, SSFConfig(init_weights=False, modules_to_save=["classifier"]))
        model.train()
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if checkpointing:
            assert model.base_model.residual_pairs == 0
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[False].items():
        assert (grads[True][n] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), 1e-4), n


def test_pairing_is_off_under_save_on_cpu_unless_hooks_only_observe():
    h = torch.randn(3, 4, requires_grad=True)
    s, t = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with residual.pairing() as mode:
        with torch.autograd.graph.save_on_cpu():
            _ = torch.randn(3, 4) + scale_shift_fused(h, s, t, mode=residual.active())
        assert mode.paired == 0
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x), residual.hooks_only_observe():
            _ = torch.randn(3, 4) + scale_shift_fused(h, s, t, mode=residual.active())
        assert mode.paired == 1


@pytest.mark.parametrize("make,shape", [
    (lambda: torch.nn.Linear(8, 6), (4, 5, 8)),  # 20 rows > 8 input features: folds
    (lambda: torch.nn.Conv2d(3, 3, 3, padding=1, groups=3), (2, 3, 6, 6)),  # depthwise: weight < input, folds
])
def test_inference_fold_matches_scaling_the_output(make, shape):
    """Without grad, a site that folds scale / shift into its weight gives the grad-mode result (output scaling)."""
    from peft_ssf.layer import wrapper_for

    torch.manual_seed(0)
    base = make().requires_grad_(False)
    layer = wrapper_for(base)(base, "default", init_weights=False)
    x = torch.randn(shape)
    assert layer._fold_is_cheaper(base, x)
    with torch.no_grad():
        folded = layer(x)
    reference = layer(x)  # grad enabled: base op, then the fused SSF op on its output
    assert reference.requires_grad
    torch.testing.assert_close(folded, reference.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(folded, base(x), atol=1e-3)  # the adapter is visibly applied


@pytest.mark.parametrize("gamma", [None, 0.3])
def test_convnext_sites_behind_a_layer_scale_keep_their_output(gamma, pixels):
    """ConvNeXt multiplies pwconv2's output by a layer scale before the residual add, and its residual stream is not
    kept by a norm: nothing pairs (a multiply ends the search), and the gradients are the unpaired ones."""
    grads, pairs = {}, {}
    for pair in (False, True):
        base = FAMILIES["convnext"]()
        if gamma is not None:
            torch.manual_seed(0)
            for name, param in base.named_parameters():
                if name.endswith("layer_scale_parameter"):
                    with torch.no_grad():
                        param.copy_(gamma * (0.5 + torch.rand_like(param)))
        config = SSFConfig(init_weights=False, pair_residuals=pair, modules_to_save=["classifier"])
        model = get_peft_model(base, config)
        model.train()
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        grads[pair] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        pairs[pair] = getattr(model.base_model, "residual_pairs", None)
    assert pairs[True] == 0
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_scoped_pairing_after_discovery_pairs_the_same_sites(family, pixels):
    """The first training forward finds the residual sites; later forwards track only them and must pair exactly as
    many, with the same gradients."""
    model = get_peft_model(FAMILIES[family](), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    model.train()
    for module in model.modules():  # deterministic forwards: no dropout, no stochastic depth
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    counts, grads = [], []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        counts.append(model.base_model.residual_pairs)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # the discovery forward pairs every site it can; later forwards only those whose r and z norms keep anyway
    # (Swin's last block of a stage feeds patch merging, whose norm sees a concatenation, not z)
    assert counts[0] >= counts[1] == counts[2] > 0
    assert counts[1] == {"vit": 4, "swin": 7}[family]
    assert torch._C._len_torch_function_stack() == 0  # the mode never stays on the stack
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[2][n], g)


@pytest.mark.parametrize("first_forward", ["save_on_cpu", "observing_hooks_keeping_detached_copies"])
def test_discovery_is_not_spoiled_by_saved_tensor_hooks(first_forward, pixels):
    """The first training forward finds the residual sites once for all later forwards. Under hooks that switch
    pairing off (offloading) it follows no site and must not record 'no sites'; under observing hooks that keep
    other tensor objects than the forward's (detached copies) it must still find them."""
    model = get_peft_model(FAMILIES["vit"](), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    model.train()
    labels = torch.tensor([0, 1, 2, 3])
    if first_forward == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            model(pixel_values=pixels, labels=labels).loss.backward()
        assert model.base_model.residual_pairs == 0
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t), \
                residual.hooks_only_observe():
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        assert model.base_model.residual_pairs == 4
    model(pixel_values=pixels, labels=labels).loss.backward()
    assert model.base_model.residual_pairs == 4  # attention output and fc2 of both blocks


# ----- half-precision residual streams: norms rebuild their input --------------------------------------------------
def _bf16_model(family: str, pair: bool, autocast: bool = False) -> torch.nn.Module:
    """A bf16 model, or (``autocast``) a float32 one that runs under CPU bf16 autocast."""
    model = get_peft_model(FAMILIES[family](), SSFConfig(init_weights=False, pair_residuals=pair,
                                                         modules_to_save=["classifier"]))
    model = (model if autocast else model.to(torch.bfloat16)).train()
    model.runs_under_autocast = autocast
    for module in model.modules():  # deterministic forwards
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def _saved_bytes_and_grads(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def hold(t: torch.Tensor) -> None:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    model.zero_grad(set_to_none=True)
    autocast = model.runs_under_autocast
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), residual.hooks_only_observe(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = pixels if autocast else pixels.bfloat16()
        loss = model(pixel_values=x, labels=torch.tensor([0, 1, 2, 3])).loss
    # what SSF's nodes hold outside save_for_backward: kept outputs (or paired operands), rebuild anchors
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kept = getattr(node, "kept", None)
        for t in ([] if kept is None else [kept.y] if kept.pair is None else list(kept.pair)):
            hold(t)
        recipe = getattr(node, "rebuild", None)
        while recipe is not None:
            hold(recipe.record.output())
            recipe = recipe.r if isinstance(recipe.r, residual.RebuiltInput) else hold(recipe.r)
        stack.extend(fn for fn, _ in node.next_functions)
    loss.backward()
    return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,autocast,expected", [("vit", False, 4), ("swin", False, 7), ("swin", True, 7)])
def test_half_precision_stream_norms_rebuild_their_input_bit_for_bit(family, autocast, expected, pixels):
    """In a bf16 model (and in Swin under CPU autocast, whose stream stays bf16) ``z - r`` cannot stand in for a
    branch output, so the norm after each residual add rebuilds its input ``z = r + y`` in backward instead of
    keeping it: the same gradients bit for bit, one stream tensor less per rebuilding norm (Swin: through the window
    reverse and roll). Swin's discovery pairs 3 norms per stage: the downsampling norm sees a concatenation."""
    unpaired = _bf16_model(family, pair=False, autocast=autocast)
    paired = _bf16_model(family, pair=True, autocast=autocast)
    paired.load_state_dict(unpaired.state_dict())
    saved_off, grads_off = _saved_bytes_and_grads(unpaired, pixels)
    for forward in range(3):  # the discovery forward, then scoped forwards
        saved_on, grads_on = _saved_bytes_and_grads(paired, pixels)
        assert paired.base_model.residual_rebuilds == expected, forward
        assert paired.base_model.residual_pairs == 0
        assert grads_on.keys() == grads_off.keys()
        for name, g in grads_off.items():
            assert torch.equal(grads_on[name], g), (forward, name)
    if family == "vit":  # every stream tensor has the same size: exactly one per rebuilding norm
        assert saved_off - saved_on == expected * pixels.shape[0] * 17 * 32 * 2, (saved_off, saved_on)
    else:  # Swin's stages differ in size: at least one first-stage stream tensor per rebuilding norm of that stage
        assert saved_off - saved_on >= 3 * pixels.shape[0] * 64 * 16 * 2, (saved_off, saved_on)


def test_rebuild_chains_are_anchored(pixels, monkeypatch):
    """Every MAX_REBUILD_DEPTH adds a norm keeps its input, so backward replays at most that many adds."""
    monkeypatch.setattr(residual, "MAX_REBUILD_DEPTH", 2)
    unpaired, paired = _bf16_model("vit", pair=False), _bf16_model("vit", pair=True)
    paired.load_state_dict(unpaired.state_dict())
    _, grads_off = _saved_bytes_and_grads(unpaired, pixels)
    _, grads_on = _saved_bytes_and_grads(paired, pixels)
    # norms: block 0 before (keeps), after (depth 1), block 1 before (depth 2), after (keeps), final (depth 1)
    assert paired.base_model.residual_rebuilds == 3
    for name, g in grads_off.items():
        assert torch.equal(grads_on[name], g), name


def _bf16_site(mode: residual.ResidualPairing, shape: tuple = (2, 6, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, generator=g).bfloat16().requires_grad_()
    s = (1 + 0.1 * torch.randn(shape[-1], generator=g)).bfloat16().requires_grad_()
    t = (0.1 * torch.randn(shape[-1], generator=g)).bfloat16().requires_grad_()
    return scale_shift_fused(h, s, t, mode=mode)


def test_rebuilt_input_replays_the_reshuffles_exactly():
    r = (10 * torch.randn(2, 6, 4)).bfloat16()  # a stream much larger than the branch: z - r would not give y
    with residual.pairing() as mode:
        assert mode.norm_input(r, True) is None  # kept by its norm: an anchor
        y = _bf16_site(mode)
        y = y.view(2, 3, 2, 4).permute(0, 2, 1, 3).contiguous().view(2, 6, 4)
        y = torch.roll(y, shifts=(1,), dims=(1,))
        z = r + y
        recipe = mode.norm_input(z, True)
        assert recipe is not None and mode.rebuilt == 1
        assert torch.equal(recipe.input(), z)
        assert not torch.equal((z.float() - r.float()).bfloat16(), y)  # what pairing would have rebuilt


def test_a_norm_input_changed_in_place_after_the_add_is_kept():
    r = torch.randn(2, 6, 4).bfloat16()
    with residual.pairing() as mode:
        mode.norm_input(r, True)
        z = r + _bf16_site(mode)
        with torch.no_grad():
            z.add_(1.0)
        assert mode.norm_input(z, True) is None


def test_in_place_change_of_a_rebuild_anchor_is_an_error_not_a_wrong_gradient():
    from peft_ssf.ops import layer_norm_scale_shift

    norm = torch.nn.LayerNorm(4).requires_grad_(False).to(torch.bfloat16)
    scale, shift = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    r = torch.randn(2, 6, 4).bfloat16()
    with residual.pairing() as mode:
        mode.norm_input(r, True)
        z = r + _bf16_site(mode)
        recipe = mode.norm_input(z, True)
        out = layer_norm_scale_shift(z, norm, scale, shift, recipe)
    with torch.no_grad():
        r.mul_(2.0)
    with pytest.raises(RuntimeError, match="pair_residuals=False"):
        out.float().sum().backward()
