"""Data safety of the tuner core (issue 25 items 2-5, 11, 12; issue 22 item 6): merges never corrupt the base model,
adapter files cannot reach outside their parameters, names cannot reach outside their folder, bad files and options
get errors that name the field and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_vit
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_ssf import SSFConfig
from peft_ssf.config import AdapterFileError
from peft_ssf.errors import UserError
from peft_ssf.layer import SSFLayer

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _ssf_layers(model):
    return [m for m in model.modules() if isinstance(m, SSFLayer)]


def _base_state(model) -> dict[str, torch.Tensor]:
    """The frozen base model's tensors (SSF wrappers' base layers included), cloned."""
    state = model.get_base_model().state_dict()
    return {k: v.detach().clone() for k, v in state.items() if ".ssf_" not in k and ".modules_to_save." not in k}


def _assert_bitwise_equal(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == [], f"{len(changed)} base tensors changed, e.g. {changed[:3]}"


def _set_scales(model, value: float, seed: int = 0) -> None:
    """Every scale near ``value`` (10% spread) and every shift ~ N(0, 0.2): a small but non-trivial adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _ssf_layers(model):
            for scale in layer.ssf_scale.values():
                scale.copy_(value * (1 + 0.1 * torch.randn(scale.shape, generator=gen)))
            for shift in layer.ssf_shift.values():
                shift.copy_(0.2 * torch.randn(shift.shape, generator=gen))


def _peft_nan_text() -> str:
    """PEFT's own NaN merge message, read from LoRA's source (not copied by hand)."""
    source = Path(peft.tuners.lora.layer.__file__).read_text()
    found = re.search(r'"(NaNs detected in the merged weights\. The adapter \{\w+\} seems to be broken)"', source)
    assert found, "PEFT's LoRA layer no longer has its NaN merge message"
    return found.group(1)


# ----- 25.2: unmerge in half precision restores the base exactly; NaN / Inf scales never merge -----------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-3, 2e-4])
def test_half_precision_merge_unmerge_restores_the_base_bit_for_bit(dtype, scale):
    model = get_peft_model(tiny_vit().to(dtype), SSFConfig(preset="all"))
    _set_scales(model, scale)
    x = PIXELS.to(dtype)
    with model.disable_adapter():
        base_logits = model(x).logits.detach()
    before = _base_state(model)
    model.merge_adapter()
    assert all(layer.merged for layer in _ssf_layers(model))
    model.unmerge_adapter()
    assert not any(layer.merged for layer in _ssf_layers(model))
    _assert_bitwise_equal(_base_state(model), before)
    with model.disable_adapter():
        assert torch.equal(model(x).logits, base_logits)


def test_full_precision_unmerge_still_divides_and_keeps_no_weight_copy():
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    fc1 = model.base_model.model.vit.layers[0].mlp.fc1
    before = _base_state(model)
    model.merge_adapter()
    kept = fc1.__dict__["_ssf_premerge"]
    assert set(kept) == {"bias"}  # the fp32 weight matrix is divided back; only the per-channel bias is kept
    model.unmerge_adapter()
    after = _base_state(model)
    bias = "vit.layers.0.mlp.fc1.base_layer.bias"
    assert torch.equal(after[bias], before[bias])
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=2e-7, atol=0)


class _EmbedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


def test_full_precision_small_scales_restore_shift_absorbing_params_exactly():
    """fp32, scale 1e-3 with shifts of 0.2: what absorbs a shift (biases, norm biases, an embedding table) comes back
    bit for bit; dividing ``(E * s + shift - shift) / s`` back would not."""
    model = get_peft_model(_EmbedNet(), SSFConfig(target_modules=["emb", "norm", "out"]))
    _set_scales(model, 1e-3)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with model.disable_adapter():
        base_out = model(ids).detach()
    before = _base_state(model)
    model.merge_adapter()
    model.unmerge_adapter()
    after = _base_state(model)
    for key in ("emb.base_layer.weight", "norm.base_layer.weight", "norm.base_layer.bias", "out.base_layer.bias"):
        assert torch.equal(after[key], before[key]), key
    torch.testing.assert_close(after["out.base_layer.weight"], before["out.base_layer.weight"], rtol=2e-7, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids), base_out, rtol=1e-6, atol=1e-7)


def test_merge_and_unload_keeps_no_copies():
    model = get_peft_model(tiny_vit().to(torch.bfloat16), SSFConfig(init_weights=False))
    layers = _ssf_layers(model)
    model.merge_and_unload()
    assert all("_ssf_premerge" not in layer.__dict__ for layer in layers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("param", ["ssf_scale", "ssf_shift"])
def test_non_finite_adapter_is_refused_by_plain_merge_before_anything_is_written(bad, param):
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    fc2 = model.base_model.model.vit.layers[1].mlp.fc2
    with torch.no_grad():
        getattr(fc2, param)["default"][2] = bad
    before = _base_state(model)
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: fc2.merge()):
        with pytest.raises(ValueError) as info:
            merge()
        assert str(info.value).startswith(
            "NaNs detected in the merged weights. The adapter default seems to be broken"
        ), str(info.value)
        assert param in str(info.value)
        _assert_bitwise_equal(_base_state(model), before)
        assert not any(layer.merged for layer in _ssf_layers(model))


# ----- 25.3: safe_merge checks in the weight's own dtype and the modules_to_save heads ------------------------------
def test_safe_merge_detects_overflow_in_the_weights_dtype():
    model = get_peft_model(tiny_vit().to(torch.float16), SSFConfig(init_weights=False))
    norm = model.base_model.model.vit.layers[0].layernorm_before
    assert norm.get_base_layer().weight.abs().max() >= 1.0  # so 1e6 * weight > 65504, the fp16 maximum
    with torch.no_grad():
        norm.ssf_scale["default"].fill_(1e6)
    before = _base_state(model)
    with pytest.raises(ValueError, match=r"seems to be broken.*layers\.0\.layernorm_before\.weight"):
        model.merge_and_unload(safe_merge=True)
    _assert_bitwise_equal(_base_state(model), before)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be"):
        norm.merge(safe_merge=True)
    _assert_bitwise_equal(_base_state(model), before)


def test_safe_merge_refuses_a_non_finite_modules_to_save_head():
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"seems to be broken.*classifier \(modules_to_save 'default'\).*weight"):
        model.merge_and_unload(safe_merge=True)
    assert not any(layer.merged for layer in _ssf_layers(model))


# ----- 22.6: PEFT's NaN message, exactly, at the start -------------------------------------------------------------
def test_nan_merge_errors_start_with_peft_exact_text():
    expected = _peft_nan_text().format(active_adapter="default", adapter_name="default")
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    fc1 = model.base_model.model.vit.layers[0].mlp.fc1
    with torch.no_grad():
        fc1.get_base_layer().weight[0, 0] = float("nan")  # a broken merge result, not a broken adapter
    for merge in (lambda: model.merge_and_unload(safe_merge=True), lambda: fc1.merge(safe_merge=True)):
        with pytest.raises(ValueError) as info:
            merge()
        assert str(info.value).startswith(expected), str(info.value)


# ----- 25.4: adapter files cannot write outside their own parameters ------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_weights(adapter: Path, edit) -> None:
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_adapter_key_reaching_a_base_weight_is_refused(saved):
    key = "base_model.model.vit.layers.0.attention.q_proj.base_layer.weight"
    _edit_weights(saved, lambda t: t.__setitem__(key, torch.full((32, 32), 7.0)))
    base = tiny_vit()
    q_weight = base.vit.layers[0].attention.q_proj.weight
    original = q_weight.detach().clone()
    with pytest.raises(AdapterFileError, match=re.escape(repr(key)) + ".*overwrite the frozen base model"):
        PeftModel.from_pretrained(base, saved)
    assert torch.equal(q_weight, original)


def test_adapter_key_reaching_a_base_weight_is_refused_by_load_adapter(saved):
    model = PeftModel.from_pretrained(tiny_vit(), saved)
    key = "base_model.model.vit.layernorm.weight"
    _edit_weights(saved, lambda t: t.__setitem__(key, torch.zeros(32)))
    before = _base_state(model)
    with pytest.raises(AdapterFileError, match=re.escape(repr(key))):
        model.load_adapter(str(saved), adapter_name="second")
    _assert_bitwise_equal(_base_state(model), before)


def test_two_keys_for_one_parameter_are_refused(saved):
    """A key with the adapter name already in it maps onto the same parameter as the saved one: refused, so no key
    escapes the checks."""
    key = "base_model.model.vit.layers.0.mlp.fc1.ssf_scale"
    _edit_weights(saved, lambda t: t.__setitem__(key + ".default", torch.full_like(t[key], 9.0)))
    with pytest.raises(AdapterFileError, match="two keys for the same parameter"):
        PeftModel.from_pretrained(tiny_vit(), saved)


def test_adapter_key_reaching_the_patch_embedding_is_refused(saved):
    key = "base_model.model.vit.embeddings.patch_embeddings.projection.weight"
    _edit_weights(saved, lambda t: t.__setitem__(key, torch.zeros(32, 3, 8, 8)))
    with pytest.raises(AdapterFileError, match=re.escape(repr(key))):
        PeftModel.from_pretrained(tiny_vit(), saved)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_embedding_weights_saved_by_peft_still_load_but_other_base_keys_do_not(tmp_path):
    """PEFT's save_embedding_layers writes the base embedding with an adapter that targets it; that round trip
    keeps working, while any other base weight in the same file is refused."""
    model = get_peft_model(_tiny_llama(), SSFConfig(target_modules=["embed_tokens", "q_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "a")
    saved_keys = load_file(tmp_path / "a/adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved_keys
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "a")
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    _edit_weights(tmp_path / "a", lambda t: t.__setitem__(key, torch.zeros(16, 16)))
    with pytest.raises(AdapterFileError, match=re.escape(repr(key))):
        PeftModel.from_pretrained(_tiny_llama(), tmp_path / "a")


def test_adapter_without_any_ssf_weights_fails_to_load(saved):
    _edit_weights(saved, lambda t: [t.pop(k) for k in [k for k in t if ".ssf_" in k]])
    assert load_file(saved / "adapter_model.safetensors")  # only the head is left
    with pytest.raises(AdapterFileError, match=r"none of its \d+ SSF parameters"):
        PeftModel.from_pretrained(tiny_vit(), saved)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8])
def test_non_float_adapter_tensors_are_refused_naming_the_key(saved, dtype):
    key = "base_model.model.vit.layers.1.mlp.fc1.ssf_scale"
    _edit_weights(saved, lambda t: t.__setitem__(key, torch.ones_like(t[key]).to(dtype)))
    with pytest.raises(AdapterFileError, match=re.escape(repr(key)) + f" as {dtype}"):
        PeftModel.from_pretrained(tiny_vit(), saved)


# ----- 25.5: adapter names ------------------------------------------------------------------------------------------
BAD_NAMES = {
    "absolute": "/some/dir/victim",
    "relative": "sub/victim",
    "backslash": "sub\\victim",
    "dotdot": "..",
    "empty": "",
    "long": "a" * 300,
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_unsafe_adapter_names_are_refused_where_they_enter(tmp_path, saved, name):
    with pytest.raises(ValueError, match="Invalid adapter name"):
        get_peft_model(tiny_vit(), SSFConfig(), adapter_name=name)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        PeftModel.from_pretrained(tiny_vit(), saved, adapter_name=name)
    model = get_peft_model(tiny_vit(), SSFConfig())
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter(name, SSFConfig())
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.load_adapter(str(saved), adapter_name=name)
    assert list(model.peft_config) == ["default"]
    assert not any(name in layer.ssf_scale for layer in _ssf_layers(model))
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]


def test_ordinary_adapter_names_still_work():
    model = get_peft_model(tiny_vit(), SSFConfig(), adapter_name="task-a_1")
    model.add_adapter("B" * 100, SSFConfig())
    assert set(model.peft_config) == {"task-a_1", "B" * 100}


# ----- 25.11: huge target_modules lists ---------------------------------------------------------------------------
def test_100001_target_modules_never_reach_peft_quadratic_minimiser(monkeypatch):
    import peft.tuners.tuners_utils as tu

    sizes = []
    original = tu._find_minimal_target_modules

    def counting(target_modules, other_module_names):
        sizes.append(len(target_modules))
        assert len(target_modules) <= 1000, "the quadratic minimiser got the whole list"
        return original(target_modules, other_module_names)

    monkeypatch.setattr(tu, "_find_minimal_target_modules", counting)
    model = tiny_vit()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    real = linear + [n.removeprefix("vit.") for n in linear]  # 24 entries that match: PEFT minimises from 20 on
    targets = real + [f"nothing_{i}" for i in range(100_001 - len(real))]
    with pytest.warns(UserWarning, match=rf"'nothing_0', .*\.\.\. \({100_001 - len(real)} in all\)\] match no module"):
        peft_model = get_peft_model(model, SSFConfig(target_modules=targets))
    assert len(sizes) == 1 and sizes[0] == len(real)  # only the entries that match something
    assert len(_ssf_layers(peft_model)) == len(linear)
    assert len(peft_model.peft_config["default"].target_modules) <= len(real)  # the saved config drops the rest


def test_target_list_matching_nothing_names_a_few_and_counts():
    with pytest.raises(ValueError, match=r"\(50000 in all\)\] match no module") as info:
        get_peft_model(tiny_vit(), SSFConfig(target_modules=[f"x{i}" for i in range(50_000)]))
    assert len(str(info.value)) < 2000


# ----- 25.12: malformed adapter_config.json -------------------------------------------------------------------------
def _write_config(saved: Path, content) -> Path:
    file = saved / "adapter_config.json"
    file.write_text(content if isinstance(content, str) else json.dumps(content))
    return file


def _with(saved: Path, **fields) -> dict:
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize(
    "content,match",
    [
        ("{}", "has no 'peft_type'"),
        ("{", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"peft_type": 5}', "has peft_type 5"),
    ],
    ids=["empty", "invalid", "deep", "list", "peft_type_int"],
)
def test_malformed_config_file_is_named(saved, content, match):
    file = _write_config(saved, content)
    for load in (lambda: PeftModel.from_pretrained(tiny_vit(), saved), lambda: SSFConfig.from_pretrained(saved)):
        with pytest.raises(AdapterFileError, match=re.escape(str(file)) + ".*" + match) as info:
            load()
        assert isinstance(info.value, UserError)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("target_modules", 5, "'target_modules' must be null, a regex string, or a list"),
        ("target_modules", [1, 2], "'target_modules' must be"),
        ("fused", "false", "'fused' must be true or false"),
        ("pair_residuals", "no", "'pair_residuals' must be true or false"),
        ("skip_key_shift", 1, "'skip_key_shift' must be true or false"),
        ("modules_to_save", "classifier", "'modules_to_save' must be null or a list"),
        ("layers_to_transform", "0", "'layers_to_transform' must be"),
    ],
)
def test_config_field_of_the_wrong_type_is_named_with_the_file(saved, field, value, match):
    file = _write_config(saved, _with(saved, **{field: value}))
    for load in (lambda: PeftModel.from_pretrained(tiny_vit(), saved), lambda: SSFConfig.from_pretrained(saved)):
        with pytest.raises(AdapterFileError, match=re.escape(str(file)) + ".*" + match):
            load()
    with pytest.raises(TypeError, match=match):
        SSFConfig(**{field: value})


@pytest.mark.parametrize("damage", ["no_ssf_weights", "invalid_json", "empty_config"])
def test_cli_merge_refuses_a_damaged_adapter_with_exit_2(saved, tmp_path, damage, capsys):
    from peft_ssf_cli import main

    tiny_vit().save_pretrained(tmp_path / "base")
    if damage == "no_ssf_weights":
        _edit_weights(saved, lambda t: [t.pop(k) for k in [k for k in t if ".ssf_" in k]])
    else:
        _write_config(saved, "{" if damage == "invalid_json" else "{}")
    for base in (["--base", str(tmp_path / "base")], []):
        assert main(["merge", "--adapter", str(saved), *base, "--out", str(tmp_path / "merged")]) == 2
        assert not (tmp_path / "merged").exists()
    assert "adapter_config.json" in capsys.readouterr().err or damage == "no_ssf_weights"
