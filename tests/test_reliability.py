"""Bad inputs get clear errors; nothing is silently wrong; nothing unsafe is loaded; outputs are atomic."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_convnext, tiny_vit
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from peft_ssf import SSFConfig
from peft_ssf.io import OutputExistsError, atomic_output_dir
from peft_ssf.layer import SSFLayer


# ----- 1. config validation ------------------------------------------------------------------------------------
def test_misspelled_option_suggests_the_right_name():
    with pytest.raises(TypeError, match=r"'targt_modules' \(did you mean 'target_modules'\?\)"):
        SSFConfig(targt_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"'skip_key_shfit' \(did you mean 'skip_key_shift'\?\)"):
        SSFConfig(skip_key_shfit=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_modules": []}, "targets nothing"),
        ({"preset": "papr"}, "Unknown SSF preset 'papr'"),
        ({"preset": "all", "target_modules": ["q_proj"]}, "both preset='all' and target_modules"),
        ({"init_weights": "gaussian"}, "init_weights must be"),
        ({"bias_free_sites": "add_biases"}, "bias_free_sites must be"),
        ({"layers_pattern": "layers"}, "only makes sense together with layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "cannot be combined with a regex"),
    ],
)
def test_conflicting_or_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSFConfig(**kwargs)


def test_target_matching_nothing_names_model_type_and_candidates():
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module.*'vit'.*'vit\.layers\.0\.attention\.q_proj'"):
        get_peft_model(tiny_vit(), SSFConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match=r"match no module.*'convnext'.*dwconv"):
        get_peft_model(tiny_convnext(), SSFConfig(target_modules=r".*\.nothing"))


def test_partially_matching_targets_warn_with_the_unmatched_names():
    with pytest.warns(UserWarning, match=r"\['qproj'\] match no module"):
        get_peft_model(tiny_vit(), SSFConfig(target_modules=["q_proj", "qproj"]))


def test_targets_matching_only_unsupported_types_name_path_and_type():
    with pytest.raises(TypeError, match=r"'vit\.layers\.0\.attention'.*ViTAttention"):
        get_peft_model(tiny_vit(), SSFConfig(target_modules=["attention"]))


# ----- 2. loading -------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_for_another_size_names_layer_and_shapes(saved_adapter):
    wider = ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8, num_labels=5))
    with pytest.raises(RuntimeError, match=r"size mismatch for .*ssf_\w+.*\[32\].*\[48\]"):
        PeftModel.from_pretrained(wider, saved_adapter)


def test_adapter_for_another_architecture_is_refused(saved_adapter):
    with pytest.raises(ValueError, match=r"match no module.*'convnext'"):
        PeftModel.from_pretrained(tiny_convnext(), saved_adapter)


def test_missing_weights_file(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors.*save_pretrained"):
        PeftModel.from_pretrained(tiny_vit(), saved_adapter)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_weights_file(saved_adapter, damage):
    file = saved_adapter / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupted"):
        PeftModel.from_pretrained(tiny_vit(), saved_adapter)


def test_config_with_unknown_keys_warns_and_names_them(saved_adapter):
    cfg_file = saved_adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["future_option"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="future_option"):
        PeftModel.from_pretrained(tiny_vit(), saved_adapter)


def test_ssfconfig_refuses_another_peft_type(tmp_path):
    get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a .*LORA adapter, not an SSF one"):
        SSFConfig.from_pretrained(tmp_path)


def test_loading_without_import_fails_with_the_type_name(saved_adapter):
    code = textwrap.dedent(f"""
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(saved_adapter)!r})
            import peft.mapping as m
            print("LOADED", type(PeftConfig.from_pretrained({str(saved_adapter)!r})))
        except KeyError as exc:
            print("KEYERROR", exc)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    # PEFT's own message; README and the model card tell users to `import peft_ssf` first
    assert "KEYERROR 'SSF'" in res.stdout, res.stdout + res.stderr[-2000:]


class _Evil:
    def __reduce__(self):
        return (print, ("ARBITRARY CODE RAN",))


def test_pickle_adapter_is_never_unpickled_with_code(saved_adapter, capsys):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with open(saved_adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        PeftModel.from_pretrained(tiny_vit(), saved_adapter)
    assert "ARBITRARY CODE RAN" not in capsys.readouterr().out


# ----- 3. numerics --------------------------------------------------------------------------------------------------
def test_double_merge_and_unmerge_when_not_merged_warn_without_corruption():
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).logits.detach()
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_models_keep_fp32_adapters_and_merge_within_tolerance(dtype, tol):
    model = get_peft_model(tiny_vit().to(dtype), SSFConfig(init_weights=False))
    assert {p.dtype for n, p in model.named_parameters() if ".ssf_" in n} == {torch.float32}
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    out = model(x).logits
    assert out.dtype == dtype
    merged = model.merge_and_unload()(x).logits
    err = ((merged.float() - out.float()).abs().max() / out.float().abs().max()).item()
    assert err <= tol


def test_autocast_gradients_of_fp32_adapters_match_the_naive_op():
    """Under bf16 autocast the fp32 adapter parameters get fp32 gradients equal to the naive op's under the same
    autocast (the fused op adds no error of its own)."""
    grads, models = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        config = SSFConfig(init_weights=False, modules_to_save=["classifier"], fused=fused)
        model = get_peft_model(tiny_vit(), config).train()
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixel_values=torch.ones(2, 3, 32, 32) * 0.5, labels=torch.tensor([0, 1])).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".ssf_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert {g.dtype for g in grads[0].values()} == {torch.float32}
    # bf16 rounding of single entries differs between the two orders of operations (and some true gradients, like
    # the query shifts', are near zero): compare the model's whole SSF gradient (per-entry accuracy against float64
    # is test_ecosystem's test_fused_gradients_are_as_accurate_as_naive_in_half_precision)
    fused, naive = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in grads)
    assert (fused - naive).norm() <= 2e-2 * naive.norm()


# ----- 4. files -----------------------------------------------------------------------------------------------------
def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_non_empty_and_replaces_when_asked(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cli_merge_refuses_non_empty_out_and_writes_verified_model(saved_adapter, tmp_path):
    from peft_ssf_cli import main

    base_dir = tmp_path / "base"
    tiny_vit().save_pretrained(base_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["merge", "--adapter", str(saved_adapter), "--base", str(base_dir), "--out", str(out)]) == 2
    assert (out / "x").read_text() == "keep"
    assert main(["merge", "--adapter", str(saved_adapter), "--base", str(base_dir), "--out", str(out),
                 "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "x").exists()


def test_ssf_layers_never_left_half_merged_after_refused_merge():
    model = get_peft_model(tiny_vit(), SSFConfig(init_weights=False))
    with torch.no_grad():
        model.base_model.model.vit.layers[1].attention.o_proj.ssf_shift["default"][3] = float("inf")
    with pytest.raises(ValueError, match="Refusing to merge"):
        model.merge_adapter(safe_merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, SSFLayer))
