"""The apps' shared engine: one builder per method, one parameter-group rule, one schedule, one loop, one loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from peft_ssf import engine
from peft_ssf.io import atomic_output_dir, atomic_write

HEAD = 32 * 3 + 3  # tiny ViT: 32 features -> 3 classes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "base"
    tiny_vit(num_labels=5).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
         "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.5], "do_normalize": True}))
    return path


LABELS = {0: "a", 1: "b", 2: "c"}


@pytest.mark.parametrize("method, trainable", [
    ("ssf", 1280 + HEAD), ("ssf_paper_init", 1280 + HEAD), ("head", HEAD), ("full", None), ("bitfit", None),
    ("lora", 2 * 2 * 8 * (32 + 32) + HEAD), ("ia3", 2 * 32 * 2 + 2 * 64 + HEAD), ("ln_tuning", 5 * 2 * 32 + HEAD),
])
def test_one_builder_for_every_method(base_dir, method, trainable, capfd):
    model = engine.build_model(method, base_dir, LABELS, seed=0)
    total, head = engine.count_trainable(model)
    assert head == HEAD and method in engine.METHODS
    if trainable is not None:
        assert total == trainable
    elif method == "full":
        assert total == sum(p.numel() for p in model.parameters())
    else:
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and "classifier" not in n)
        assert total == biases + HEAD
    assert model.config.id2label == LABELS
    err = capfd.readouterr().err  # a new head is the expected outcome: no mismatch reports or label warnings
    assert "LOAD REPORT" not in err and "incompatible" not in err


def test_same_seed_same_model(base_dir):
    a = engine.build_model("ssf_paper_init", base_dir, LABELS, seed=3).state_dict()
    b = engine.build_model("ssf_paper_init", base_dir, LABELS, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ssf", "lora", "full", "head"])
def test_weight_decay_only_on_the_head_weight_matrix(base_dir, method):
    model = engine.build_model(method, base_dir, LABELS)
    decay, no_decay = engine.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(3, 32)]
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_a_separate_head_learning_rate_keeps_the_decay_rule(base_dir):
    model = engine.build_model("full", base_dir, LABELS)
    groups = engine.param_groups(model, 0.05, head_lr=1e-2)
    by = {(g["weight_decay"], g.get("lr")): [tuple(p.shape) for p in g["params"]] for g in groups}
    assert by[(0.05, 1e-2)] == [(3, 32)] and by[(0.0, 1e-2)] == [(3,)] and by[(0.05, None)] == []
    assert len(by[(0.0, None)]) == sum(p.requires_grad for p in model.parameters()) - 2
    opt = engine.make_optimizer(model, lr=1e-4, weight_decay=0.05, head_lr=1e-2)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 1e-2]


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.warmup_cosine(opt, total_steps=20, warmup=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0)
    assert lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01
    assert engine.warmup_cosine(opt, 20, warmup=4).lr_lambdas[0](3) == 1.0  # >= 1: a step count


def test_normalisation_comes_from_the_image_processor(base_dir, tmp_path):
    norm = engine.image_normalization(base_dir)
    assert (norm.size, norm.mean, norm.std, norm.source) == (32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.5), "image processor")
    tiny_vit().save_pretrained(tmp_path / "bare")
    assert engine.image_normalization(tmp_path / "bare").mean == (0.5, 0.5, 0.5)
    images = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    pixels = engine.to_pixel_values(images, norm)
    assert pixels.shape == (2, 3, 4, 4) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([3.0, 2.0, 0.8]))
    engine.save_image_processor(tmp_path / "bare", None, norm)
    assert engine.image_normalization(tmp_path / "bare").std == (0.2, 0.25, 0.5)


def test_fit_is_seeded_and_learns(base_dir):
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32), torch.arange(24) % 3
    x += y.view(-1, 1, 1, 1).float()
    recipe = engine.Recipe(epochs=3, batch_size=8, lr=1e-2, seed=1)
    runs = []
    for _ in range(2):
        model = engine.build_model("ssf", base_dir, LABELS, seed=0)
        before = engine.evaluate(lambda xb, m=model: m(pixel_values=xb).logits, x, y)[1]
        out = engine.fit(model, x, y, recipe)
        after = engine.evaluate(lambda xb, m=model: m(pixel_values=xb).logits, x, y)[1]
        runs.append(engine.predict(lambda xb, m=model: m(pixel_values=xb).logits, x))
    assert out["steps"] == 9 and after < before
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    head = engine.build_model("head", base_dir, LABELS).classifier
    feats = torch.randn(24, 32)
    assert engine.fit(head, feats, y, recipe, forward=head, max_steps=2)["steps"] == 2


def test_head_trained_on_cached_head_inputs_matches_the_model(base_dir):
    torch.manual_seed(0)
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10) % 3
    model = engine.build_model("head", base_dir, LABELS, seed=0)
    feats = engine.head_inputs(model, x, batch_size=4)
    assert feats.shape == (10, 32) and not model.classifier._forward_pre_hooks
    torch.testing.assert_close(model.classifier(feats), model(pixel_values=x).logits)
    engine.fit(model, feats, y, engine.Recipe(epochs=1, batch_size=5), forward=model.classifier)
    groups = engine.param_groups(model, 0.05)  # the whole model passed: the head's weight is still the decayed one
    assert [p.shape for p in groups[0]["params"]] == [model.classifier.weight.shape]
    torch.testing.assert_close(model.classifier(feats), model(pixel_values=x).logits)


def test_loader_handles_new_heads_and_plain_checkpoints(base_dir, tmp_path):
    model = engine.build_model("ssf", base_dir, LABELS)
    model.save_pretrained(tmp_path / "adapter")
    assert engine.adapter_head_size(tmp_path / "adapter") == 3
    loaded = engine.load_model(tmp_path / "adapter")  # base recorded by save_pretrained, 5-class head there
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
    merged = engine.load_adapter(tmp_path / "adapter", base_dir, merge=True)
    assert type(merged).__name__ == "ViTForImageClassification"
    torch.testing.assert_close(merged(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-4, atol=1e-5)
    assert engine.load_model(base_dir).config.num_labels == 5
    with pytest.raises(engine.AdapterLoadError, match="has no adapter_config.json"):
        engine.load_adapter(tmp_path)


def test_auto_peft_model_loads_an_adapter_that_keeps_the_base_head(base_dir, tmp_path):
    """What the README promises for AutoPeftModel: same head size and a recorded base that exists."""
    from peft import AutoPeftModel

    model = engine.build_model("ssf", base_dir, {i: str(i) for i in range(5)})
    model.save_pretrained(tmp_path / "same_head")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "same_head").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_atomic_writers(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "hello")
    assert path.read_text() == "hello" and list(tmp_path.iterdir()) == [path]
    atomic_write(path, lambda fh: fh.write(b"bytes"))
    assert path.read_bytes() == b"bytes"
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "whole").write_text("x")
    assert (tmp_path / "out" / "whole").is_file() and (tmp_path / "out").stat().st_mode & 0o055
