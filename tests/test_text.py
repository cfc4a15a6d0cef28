"""Text models: presets for every family, RMSNorm sites, shifts on bias-free linears via config bias switches."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import get_peft_model
from text_models import SEQ2SEQ, TEXT_FAMILIES, text_config, text_inputs, tiny_text_model
from torch import nn
from transformers import AutoModelForCausalLM

from peft_ssf import PresetError, SSFConfig
from peft_ssf.bias_switches import BIAS_SWITCHES, SWITCHABLE_TYPES
from peft_ssf.layer import BiasAddingLinear, RMSNorm, SSFLayer, wrapper_for

#: model_type -> (sites, SSF parameters) with the default config, and with bias_free_sites="add_bias"
EXPECTED_COUNTS = {
    "bert": (17, 1108, 17, 1108),
    "roberta": (17, 1108, 17, 1108),
    "distilbert": (17, 1108, 17, 1108),
    "deberta-v2": (17, 1108, 17, 1108),
    "modernbert": (13, 628, 13, 1256),
    "gpt2": (13, 1472, 13, 1472),
    "llama": (19, 564, 19, 968),
    "mistral": (19, 564, 19, 564),
    "qwen2": (19, 692, 19, 692),
    "qwen3": (23, 596, 23, 788),
    "gemma": (19, 564, 19, 756),
    "gemma2": (23, 692, 23, 884),
    "gemma3_text": (27, 724, 27, 916),
    "phi3": (13, 564, 13, 564),
    "t5": (44, 1428, 44, 1428),
    "bart": (44, 2856, 44, 2856),
}
#: Gemma's RMSNorm computes in float32 whatever the model dtype, so adapter and merged model differ by float32 rounding
_FLOAT32_NORMS = ("gemma", "gemma2", "gemma3_text")


def _ssf_count(model) -> tuple[int, int]:
    sites = [m for m in model.modules() if isinstance(m, SSFLayer)]
    return len(sites), sum(p.numel() for n, p in model.named_parameters() if ".ssf_" in n)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("bias_free_sites", ["scale_only", "add_bias"])
@pytest.mark.parametrize("model_type", sorted(TEXT_FAMILIES))
def test_default_config_adapts_every_text_family_and_merges_exactly(model_type, bias_free_sites):
    base = tiny_text_model(model_type).double()
    inputs = text_inputs(model_type)
    ref = _logits(base, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, SSFConfig(init_weights=False, bias_free_sites=bias_free_sites))
    assert not [w for w in caught if "no module found for role" in str(w.message)]  # every role of the preset hit
    counts = EXPECTED_COUNTS[model_type]
    assert _ssf_count(model) == (counts[:2] if bias_free_sites == "scale_only" else counts[2:])
    sites = {n: m for n, m in model.named_modules() if isinstance(m, SSFLayer)}
    assert not any(isinstance(m.get_base_layer(), nn.Embedding) for m in sites.values())  # not the embeddings
    assert not any(re.search(r"(lm_head|classifier|score|pooler|head\.)", n) for n in sites)  # nor the task head
    out = _logits(model, inputs)
    assert (out - ref).abs().max() > 1e-3  # the random adapter changes the output
    merged = model.merge_and_unload()
    atol = 1e-6 if model_type in _FLOAT32_NORMS else 1e-12
    torch.testing.assert_close(_logits(merged, inputs), out, rtol=0, atol=atol)


def test_default_config_trains_shift_and_scale_of_rmsnorm_decoder():
    model = get_peft_model(tiny_text_model("llama"), SSFConfig(bias_free_sites="add_bias"))
    inputs = text_inputs("llama")
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(".ssf_" in n for n in grads)
    # every parameter learns, the key shift included: RoPE rotates it with the position, so unlike ViT's (where softmax
    # ignores a per-query constant) it is not inert and skip_key_shift would drop a live parameter
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert len([n for n in grads if "ssf_shift" in n]) == 14  # 7 linears x 2 layers; RMSNorms are scale-only


# ----- RMSNorm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,offset", [("llama", 0.0), ("qwen3", 0.0), ("phi3", 0.0), ("gemma", 1.0),
                                               ("gemma3_text", 1.0), ("t5", 0.0)])
def test_rmsnorm_form_is_detected(model_type, offset):
    model = get_peft_model(tiny_text_model(model_type), SSFConfig())
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and {m.weight_offset for m in norms} == {offset}


def test_unknown_rmsnorm_form_is_refused():
    class OddRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight * 2.0

    net = nn.Sequential(OddRMSNorm())
    assert wrapper_for(net[0]) is RMSNorm
    with pytest.raises(TypeError, match="neither weight"):
        get_peft_model(net, SSFConfig(target_modules=["0"]))


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_rmsnorm_merge_saves_and_loads_with_plain_transformers(model_type, tmp_path):
    model = get_peft_model(tiny_text_model(model_type).double(), SSFConfig(init_weights=False))
    inputs = text_inputs(model_type)
    out = _logits(model, inputs)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    atol = 1e-6 if model_type in _FLOAT32_NORMS else 1e-12
    torch.testing.assert_close(_logits(reloaded, inputs), out, rtol=0, atol=atol)


# ----- bias switches ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_bias_switch_merge_loads_with_plain_transformers(model_type, tmp_path):
    model = get_peft_model(tiny_text_model(model_type).double(), SSFConfig(init_weights=False,
                                                                            bias_free_sites="add_bias"))
    inputs = text_inputs(model_type)
    out = _logits(model, inputs)
    merged = model.merge_and_unload()
    assert merged.config.attention_bias is True
    assert merged.model.layers[0].self_attn.o_proj.bias is not None
    merged.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not [w for w in caught if "newly initialized" in str(w.message)]
    assert reloaded.config.attention_bias is True
    atol = 1e-6 if model_type in _FLOAT32_NORMS else 1e-12
    torch.testing.assert_close(_logits(reloaded, inputs), out, rtol=0, atol=atol)


def test_partial_targets_get_zero_bias_on_the_other_switched_linears(tmp_path):
    model = get_peft_model(tiny_text_model("llama").double(),
                           SSFConfig(target_modules=["q_proj"], init_weights=False, bias_free_sites="add_bias"))
    out = _logits(model, text_inputs("llama"))
    merged = model.merge_and_unload()
    attn = merged.model.layers[1].self_attn
    assert attn.q_proj.bias.abs().sum() > 0 and attn.v_proj.bias.abs().sum() == 0
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False  # MLP untouched
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(reloaded, text_inputs("llama")), out, rtol=0, atol=1e-12)


def test_bias_adding_merge_unmerge_restores_bias_free_layers():
    model = get_peft_model(tiny_text_model("llama").double(), SSFConfig(init_weights=False,
                                                                         bias_free_sites="add_bias"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BiasAddingLinear) and q.get_base_layer().bias is None
    weight = q.get_base_layer().weight.detach().clone()
    inputs = text_inputs("llama")
    out = _logits(model, inputs)
    model.merge_adapter()
    assert q.get_base_layer().bias is not None
    torch.testing.assert_close(_logits(model, inputs), out, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    assert q.get_base_layer().bias is None
    torch.testing.assert_close(q.get_base_layer().weight, weight, rtol=0, atol=1e-14)
    assert model.base_model.model.config.attention_bias is False  # only merge_and_unload sets the switch


@pytest.mark.parametrize("model_type", sorted(BIAS_SWITCHES))
def test_bias_switch_table_matches_transformers(model_type):
    """Each switch gives a bias to exactly the linears the table says (built on meta, switch on vs off)."""
    model_cls = type(tiny_text_model(model_type))
    for attr, pattern in BIAS_SWITCHES[model_type].items():
        built = {}
        for value in (False, True):
            config = text_config(model_type, **{attr: value})
            with torch.device("meta"):
                model = model_cls(config)
            built[value] = {n for n, m in model.named_modules()
                            if isinstance(m, SWITCHABLE_TYPES) and m.bias is not None}
        gained = built[True] - built[False]
        assert gained and all(re.search(rf"(^|\.){pattern}$", n) for n in gained)
        assert not [n for n in built[False] if re.search(rf"(^|\.){pattern}$", n)]


def test_scale_only_warning_points_to_add_bias_where_a_switch_exists():
    with pytest.warns(UserWarning, match="19 targeted module.*'add_bias' would learn a shift at 14 of them"):
        get_peft_model(tiny_text_model("llama"), SSFConfig())


def test_scale_only_sites_warn_once_and_mistral_has_no_switch():
    with pytest.warns(UserWarning, match="19 targeted module") as record:
        get_peft_model(tiny_text_model("mistral"), SSFConfig(bias_free_sites="add_bias"))
    assert len([w for w in record if "no bias" in str(w.message)]) == 1


# ----- targets ----------------------------------------------------------------------------------------------------
def test_all_linear_means_what_it_means_in_peft():
    model = get_peft_model(tiny_text_model("llama"), SSFConfig(target_modules="all-linear"))
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SSFLayer)})
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert _ssf_count(model)[0] == 14  # not lm_head
    gpt2 = get_peft_model(tiny_text_model("gpt2"), SSFConfig(target_modules="all-linear"))
    assert _ssf_count(gpt2)[0] == 8  # transformers Conv1D counts as linear; lm_head excluded


def test_unknown_transformers_model_type_gets_a_default_with_a_warning():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                                   num_attention_heads=4, word_embed_proj_dim=32)).eval()
    with pytest.warns(UserWarning, match="No SSF preset for model_type 'opt'.*17 modules"):
        model = get_peft_model(opt, SSFConfig())
    names = [n for n, m in model.named_modules() if isinstance(m, SSFLayer)]
    assert len(names) == 17  # 2 x (q, k, v, out_proj, 2 norms, fc1, fc2) + the final norm
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_model_without_config_still_needs_targets():
    with pytest.raises(PresetError, match="No SSF preset for model_type"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), SSFConfig())


def test_seq2seq_families_cover_cross_attention():
    for model_type in SEQ2SEQ:
        model = get_peft_model(tiny_text_model(model_type), SSFConfig())
        names = [n for n, m in model.named_modules() if isinstance(m, SSFLayer)]
        assert any("EncDecAttention.q" in n or "encoder_attn.q_proj" in n for n in names)


def test_add_bias_adapter_saves_and_loads_in_a_fresh_base(tmp_path):
    from peft import PeftModel

    model = get_peft_model(tiny_text_model("llama").double(), SSFConfig(init_weights=False,
                                                                         bias_free_sites="add_bias"))
    inputs = text_inputs("llama")
    out = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_text_model("llama").double(), tmp_path)
    assert isinstance(loaded.base_model.model.model.layers[0].mlp.down_proj, BiasAddingLinear)
    torch.testing.assert_close(_logits(loaded, inputs), out, rtol=0, atol=0)


def test_torch_rmsnorm_is_a_site_and_merges_exactly():
    net = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    model = get_peft_model(net, SSFConfig(target_modules=["1"], init_weights=False))
    assert isinstance(model.base_model.model[1], RMSNorm) and model.base_model.model[1].weight_offset == 0.0
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), out, rtol=0, atol=1e-14)


def test_t5_v1_1_gated_mlp_is_covered():
    model = get_peft_model(tiny_text_model("t5", feed_forward_proj="gated-gelu").double(),
                           SSFConfig(init_weights=False))
    names = [n for n, m in model.named_modules() if isinstance(m, SSFLayer)]
    assert sum(n.endswith(("wi_0", "wi_1")) for n in names) == 8  # 2 per block, 2 encoder + 2 decoder blocks
    inputs = text_inputs("t5")
    out = _logits(model, inputs)
    torch.testing.assert_close(_logits(model.merge_and_unload(), inputs), out, rtol=0, atol=1e-12)


#: README's per-family table: (sites, SSF params scale_only, SSF params add_bias) on transformers' default configs
README_COUNTS = {
    "bert": (97, 204_288, 204_288),
    "roberta": (97, 204_288, 204_288),
    "distilbert": (49, 102_912, 102_912),
    "deberta-v2": (193, 814_080, 814_080),
    "modernbert": (133, 169_728, 339_456),
    "gpt2": (73, 204_288, 204_288),
    "llama": (289, 1_626_112, 2_985_984),
    "mistral": (289, 1_642_496, 1_642_496),
    "qwen2": (289, 2_723_840, 2_723_840),
    "qwen3": (353, 2_338_816, 2_863_104),
    "gemma": (253, 2_067_456, 2_497_536),
    "gemma2": (287, 947_456, 1_113_856),
    "gemma3_text": (339, 960_768, 1_127_168),
    "phi3": (193, 1_215_488, 1_215_488),
    "t5": (128, 83_968, 83_968),
    "bart": (254, 667_648, 667_648),
}


@pytest.mark.parametrize("model_type", sorted(README_COUNTS))
def test_readme_counts_on_default_configs(model_type):
    """The README's per-family table: transformers' default config of each type, built on the meta device."""
    from transformers import AutoConfig

    cls = type(tiny_text_model(model_type))
    found = []
    for bias_free_sites in ("scale_only", "add_bias"):
        with torch.device("meta"):
            model = cls(AutoConfig.for_model(model_type))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found.append(_ssf_count(get_peft_model(model, SSFConfig(bias_free_sites=bias_free_sites))))
    assert (found[0][0], found[0][1], found[1][1]) == README_COUNTS[model_type]


def test_modernbert_add_bias_merge_turns_on_three_switches_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = get_peft_model(tiny_text_model("modernbert").double(),
                           SSFConfig(init_weights=False, bias_free_sites="add_bias"))
    assert not [m for m in model.modules() if isinstance(m, SSFLayer) and m.ssf_shift.keys() == set()]  # all shift
    inputs = text_inputs("modernbert")
    out = _logits(model, inputs)
    merged = model.merge_and_unload()
    assert (merged.config.attention_bias, merged.config.mlp_bias, merged.config.norm_bias) == (True, True, True)
    assert merged.head.norm.bias is not None and merged.head.norm.bias.abs().sum() == 0  # not adapted: zero bias
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(reloaded, inputs), out, rtol=0, atol=1e-12)


def test_generate_with_add_bias_adapter_equals_merged_model():
    model = get_peft_model(tiny_text_model("llama"), SSFConfig(init_weights=False, bias_free_sites="add_bias"))
    prompt = text_inputs("llama", batch=1, length=4)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        adapter_ids = model.generate(input_ids=prompt, **kwargs)
        merged_ids = model.merge_and_unload().generate(input_ids=prompt, **kwargs)
    assert adapter_ids.shape == (1, 10)
    assert torch.equal(adapter_ids, merged_ids)


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_scaled_word_embedding_merges_exactly(model_type):
    """Gemma's embedding multiplies the looked-up rows by sqrt(hidden) inside its forward, so the shift added after it
    is folded into the table divided by that factor. Main merged ``shift`` itself: logits 0.20 / 0.30 / 0.38 off."""
    model = tiny_text_model(model_type, tie_word_embeddings=False).double()
    peft_model = get_peft_model(model, SSFConfig(preset="all", init_weights=False)).eval()
    assert isinstance(peft_model.base_model.model.model.embed_tokens, SSFLayer)
    inputs = text_inputs(model_type)
    with torch.no_grad():
        before = peft_model(**inputs).logits
        peft_model.merge_adapter()
        merged = peft_model(**inputs).logits
        peft_model.unmerge_adapter()
        unmerged = peft_model(**inputs).logits
    torch.testing.assert_close(merged, before, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(unmerged, before, rtol=1e-7, atol=1e-7)


class _NoisyEmbedding(nn.Embedding):
    """A "scaled" embedding (``embed_scale``) whose forward is not a scaled lookup: no table absorbs a shift."""

    embed_scale = 2.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale + 1.0


def test_embedding_that_is_not_a_lookup_refuses_to_merge_before_writing():
    model = nn.Sequential(_NoisyEmbedding(10, 4), nn.Linear(4, 2))
    peft_model = get_peft_model(model, SSFConfig(target_modules=["0"], init_weights=False))
    table = peft_model.base_model.model[0].get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"no weight was changed.*_NoisyEmbedding.*not a \(scaled\) table lookup"):
        peft_model.merge_and_unload()
    assert torch.equal(peft_model.base_model.model[0].get_base_layer().weight, table)
