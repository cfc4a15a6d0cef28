"""The training op's switches (``fused``, ``pair_residuals``) are runtime settings, as PEFT's ``LoraRuntimeConfig``:
set per run, never written to ``adapter_config.json``; adapters saved by 0.1.0 (whose files hold both keys) load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ssf import SSFConfig
from peft_ssf.config import SSFRuntimeConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2))


def _uses_fused(peft_model: nn.Module) -> list[bool]:
    return [flag for m in peft_model.modules() for flag in getattr(m, "ssf_fused", {}).values()]


def test_runtime_switches_are_not_saved_and_the_saved_adapter_is_unchanged(tmp_path):
    config = SSFConfig(target_modules=["0", "1"], fused=False, pair_residuals=False, init_weights=False)
    assert config.runtime_config == SSFRuntimeConfig(fused=False, pair_residuals=False)
    model = get_peft_model(_model(), config)
    assert _uses_fused(model) == [False, False]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"fused", "pair_residuals", "runtime_config"} & set(saved)
    loaded = PeftModel.from_pretrained(_model(), tmp_path)
    assert loaded.peft_config["default"].runtime_config == SSFRuntimeConfig()  # the defaults, not the saver's
    assert _uses_fused(loaded) == [True, True]
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_runtime_switches_are_set_per_run_when_loading(tmp_path):
    get_peft_model(_model(), SSFConfig(target_modules=["0"], init_weights=False)).save_pretrained(tmp_path)
    config = SSFConfig.from_pretrained(tmp_path)
    config.runtime_config.fused = False
    assert config.fused is False  # the shorthand reads the runtime config
    loaded = PeftModel.from_pretrained(_model(), tmp_path, config=config, is_trainable=True)
    assert _uses_fused(loaded) == [False]


@pytest.mark.parametrize("fused", [True, False])
def test_a_0_1_0_adapter_file_with_the_switches_still_loads(tmp_path, fused):
    model = get_peft_model(_model(), SSFConfig(target_modules=["0"], init_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "fused": fused, "pair_residuals": True}))  # as 0.1.0 wrote it
    loaded = PeftModel.from_pretrained(_model(), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].fused is fused and _uses_fused(loaded) == [fused]
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_runtime_config_key_in_the_file_is_ignored_with_a_warning(tmp_path):
    get_peft_model(_model(), SSFConfig(target_modules=["0"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "runtime_config": {"fused": False}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        config = SSFConfig.from_pretrained(tmp_path)
    assert config.fused is True


def test_a_misspelt_switch_is_refused_with_the_right_name():
    with pytest.raises(TypeError, match="'fusd' .*did you mean 'fused'"):
        SSFConfig(fusd=False)
    with pytest.raises(TypeError, match="'pair_residuals' must be true or false"):
        SSFConfig(pair_residuals="no")
