"""Issue 22's model-level rows: tied weights, container heads, BatchNorm statistics, ``layers_to_transform`` with a
preset, config-only folders, mixed batches through position embeddings, ``skip_key_shift`` under RoPE. Each test
failed on main before the fix (a silent difference or an unrelated error)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from peft_ssf import SSFConfig
from peft_ssf.layer import SSFLayer
from peft_ssf.presets import shared_parameter_owners

IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def _gpt2(layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=layers, n_head=2, n_positions=16, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _t5(layers: int = 1) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _roberta(cls=RobertaForSequenceClassification):
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=20, pad_token_id=1)
    return cls(cfg).eval()


# ----- tied weights -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama-tied"])
def test_all_preset_skips_tied_embedding_and_merge_is_exact(make):
    peft_model = get_peft_model(make(), SSFConfig(preset="all", init_weights=False)).eval()
    targets = peft_model.peft_config["default"].target_modules
    assert not any(t.endswith(("wte", "embed_tokens")) for t in targets)
    before = peft_model(IDS).logits
    after = peft_model.merge_and_unload()(IDS).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # main: up to 7.9 (GPT-2) / 13.3 (LLaMA) off


def test_untied_llama_embedding_stays_adaptable():
    model = get_peft_model(_llama(tied=False), SSFConfig(preset="all"))
    assert isinstance(model.base_model.model.model.embed_tokens, SSFLayer)


def test_targeting_a_tied_embedding_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"'transformer.wte'.*shared with \['lm_head'\].*tie_word_embeddings=False"):
        get_peft_model(_gpt2(), SSFConfig(target_modules=["wte"]))


def test_t5_shared_table_is_left_alone():
    model = _t5()
    owners = shared_parameter_owners(model)
    assert set(owners) >= {"shared", "encoder.embed_tokens", "decoder.embed_tokens"}
    peft_model = get_peft_model(model, SSFConfig(preset="all", init_weights=False)).train()
    targets = peft_model.peft_config["default"].target_modules
    assert not any("shared" in t or "embed_tokens" in t for t in targets)
    out = peft_model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    no_grad = [n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


# ----- container heads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["task_type", "modules_to_save"])
def test_container_head_merges(how):
    kwargs = {"task_type": "SEQ_CLS"} if how == "task_type" else {"modules_to_save": ["classifier"]}
    peft_model = get_peft_model(_roberta(), SSFConfig(preset="all", init_weights=False, **kwargs)).eval()
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.dense.weight.add_(0.5)  # a trained head: the merged model must keep it
    before = peft_model(IDS).logits
    merged = peft_model.merge_and_unload()  # main: AttributeError 'RobertaClassificationHead' ... 'ssf_scale'
    torch.testing.assert_close(merged(IDS).logits, before, atol=1e-5, rtol=1e-5)
    assert type(merged.classifier).__name__ == "RobertaClassificationHead"


def test_all_preset_never_adapts_inside_heads():
    targets = get_peft_model(_roberta(), SSFConfig(preset="all")).peft_config["default"].target_modules
    assert not any(t.startswith("classifier") for t in targets)  # main: classifier.dense, classifier.out_proj
    qa = get_peft_model(_roberta(RobertaForQuestionAnswering), SSFConfig(preset="all", task_type="QUESTION_ANS"))
    assert not any("qa_outputs" in t for t in qa.peft_config["default"].target_modules)  # main: TypeError


# ----- BatchNorm statistics -----------------------------------------------------------------------------------------
class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn2(self.conv2(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("fused", [True, False])
def test_frozen_batchnorm_stats_survive_training_and_reload(tmp_path, fused):
    torch.manual_seed(0)
    base = _ConvBN()
    with torch.no_grad():
        base.bn.running_mean.normal_()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, SSFConfig(target_modules=["conv", "bn"], modules_to_save=["head"], fused=fused,
                                           init_weights=False))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(reloaded(x), expected)  # main: 0.08 off (the stats moved and were not saved)


def test_batchnorm_in_modules_to_save_trains_its_stats():
    model = get_peft_model(_ConvBN(), SSFConfig(target_modules=["conv"], modules_to_save=["bn2", "head"])).train()
    copy_bn = model.base_model.model.bn2.modules_to_save["default"]
    before = copy_bn.running_mean.clone()
    model(torch.randn(4, 3, 8, 8))
    assert not torch.equal(copy_bn.running_mean, before)
    assert not model.base_model.model.bn.training  # the frozen one keeps its statistics


# ----- layers_to_transform with a preset ----------------------------------------------------------------------------
def _opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=20, word_embed_proj_dim=16))


@pytest.mark.parametrize("make", [_opt, _gpt2, lambda: _t5(2)], ids=["opt", "gpt2", "t5"])
def test_layers_to_transform_filters_a_preset(make):
    def sites(model):
        return {n for n, m in model.named_modules() if hasattr(m, "ssf_scale")}

    everything = get_peft_model(make(), SSFConfig(preset="all"))
    some = get_peft_model(make(), SSFConfig(preset="all", layers_to_transform=[0]))
    assert some.get_nb_trainable_parameters()[0] < everything.get_nb_trainable_parameters()[0]  # main: equal
    assert sites(some) and sites(some) < sites(everything)
    assert all(".0." in name for name in sites(some))


def test_layers_to_transform_matching_nothing_says_so():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*keeps none"):
        get_peft_model(_opt(), SSFConfig(preset="all", layers_to_transform=[7]))


# ----- config-only folders ------------------------------------------------------------------------------------------
def test_config_only_folder_loads(tmp_path):
    SSFConfig(target_modules=["q_proj"], skip_key_shift=True).save_pretrained(tmp_path)
    loaded = SSFConfig.from_pretrained(tmp_path)  # main: FileNotFoundError (LoRA loads it)
    assert loaded.target_modules == {"q_proj"} and loaded.skip_key_shift


# ----- mixed batches through a position embedding -------------------------------------------------------------------
def test_mixed_batch_with_adapted_position_embedding():
    model = get_peft_model(_gpt2(1), SSFConfig(target_modules=["wpe", "c_fc"], init_weights=False)).eval()
    mixed = model(IDS, adapter_names=["default", "__base__"]).logits  # main: ValueError not naming the layer
    adapted = model(IDS).logits
    with model.disable_adapter():
        plain = model(IDS).logits
    torch.testing.assert_close(mixed[0], adapted[0])
    torch.testing.assert_close(mixed[1], plain[1])


def test_mixed_batch_without_batch_dim_names_the_layer():
    config = SSFConfig(target_modules=["relative_attention_bias"], init_weights=False)
    model = get_peft_model(_t5(), config).eval()
    with pytest.raises(ValueError, match=r"SSF layer 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias'"):
        model(input_ids=IDS[:, :3], decoder_input_ids=IDS[:, :3], adapter_names=["default", "__base__"])


# ----- skip_key_shift under RoPE ------------------------------------------------------------------------------------
def test_skip_key_shift_refused_with_rotary_embeddings():
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=32))
    with pytest.raises(ValueError, match="rotary position embeddings.*skip_key_shift=False"):
        get_peft_model(qwen, SSFConfig(target_modules=["k_proj"], skip_key_shift=True))
    # where it is exact (no rotary: GPT-2 style absolute positions) the option is still accepted
    get_peft_model(_roberta(), SSFConfig(target_modules=["key"], skip_key_shift=True))


def test_merged_tied_gpt2_reloads_with_plain_transformers(tmp_path):
    model = get_peft_model(_gpt2(), SSFConfig(preset="all", init_weights=False)).eval()
    expected = model(IDS).logits
    model.merge_and_unload().save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import torch
        from transformers import GPT2LMHeadModel
        ids = torch.tensor({IDS.tolist()})
        print(GPT2LMHeadModel.from_pretrained({str(tmp_path)!r}).eval()(ids).logits.flatten().tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = torch.tensor(eval(out.strip().splitlines()[-1])).view_as(expected)  # noqa: S307 - our own list of floats
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
