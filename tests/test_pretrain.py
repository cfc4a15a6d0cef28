"""``scripts/pretrain_backbone.py``: the default recipe is the shipped checkpoint's, and runs are deterministic.

The full reproduction (the shipped run's first epoch: train loss 7.2231 and validation shape / fill / hue /
background 0.0817 / 0.4167 / 0.325 / 0.1383, bit for bit) takes half a minute and is recorded in the backbone README;
here a tiny model checks the pieces.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from peft_ssf import engine
from scripts import pretrain_backbone as pb

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--chunk", "128", "--batch-size", "32", "--n-val", "1",
        "--n-test", "1", "--max-steps", "3", "--epochs", "2", "--no-readme"]


def _digest(out: Path) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_shipped_param_groups_decay_weight_matrices_but_not_embeddings() -> None:
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    decay, no_decay = pb.shipped_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "classifier.weight" in decayed and "vit.embeddings.patch_embeddings.projection.weight" in decayed
    assert not decayed & {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # the engine's rule decays the classifier's weight matrix only: a different set
    engine_decayed = {names[id(p)] for g in engine.param_groups(model, 0.05) if g["weight_decay"] > 0
                      for p in g["params"]}
    assert engine_decayed == {"classifier.weight"}


def test_shipped_schedule_is_the_warm_up_ramp_times_a_cosine_over_all_steps() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = pb.shipped_schedule(opt, total=100, warmup_frac=0.1)
    factors = [sched.lr_lambdas[0](s) for s in (0, 9, 50, 100)]
    expected = [0.1 * 0.5 * (1 + math.cos(0.0)), 1.0 * 0.5 * (1 + math.cos(math.pi * 0.09)), 0.5, 0.0]
    assert factors == pytest.approx(expected, abs=1e-12)


@pytest.fixture
def restore_torch_globals() -> object:
    """``main`` pins the thread count and turns on deterministic algorithms; give the other tests theirs back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_runs_are_deterministic_and_the_recipe_matters(tmp_path: Path, restore_torch_globals: object) -> None:
    pb.main([*TINY, "--out", str(tmp_path / "a")])
    pb.main([*TINY, "--out", str(tmp_path / "b")])
    pb.main([*TINY, "--out", str(tmp_path / "c"), "--recipe", "engine"])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
