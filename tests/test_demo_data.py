"""The offline demo kit: seeded task generators, imagefolder round trip, and the shipped pretrained backbone."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_ssf.demo import (  # noqa: E402
    BACKBONE_DIR,
    SOURCE_TASK,
    SPLITS,
    TARGET_TASKS,
    TASKS,
    generate_task,
    load_task,
    make_task,
)
from peft_ssf.demo.data import SOURCE_FACTORS, digits_partition, source_stream  # noqa: E402

SMALL = {"n_train": 3, "n_val": 2, "n_test": 1}  # images per class


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_registry_shape() -> None:
    assert TASKS[SOURCE_TASK].group == "source"
    assert len(TARGET_TASKS) >= 4 and SOURCE_TASK not in TARGET_TASKS
    for spec in TASKS.values():
        assert list(spec.classes) == sorted(spec.classes), "imagefolder label ids must equal ours"
        assert len(set(spec.classes)) == spec.num_classes >= 2
        assert spec.description


@pytest.mark.parametrize("name", list(TASKS))
def test_generate_splits_and_counts(name: str) -> None:
    data = generate_task(name, seed=0, **SMALL)
    k = TASKS[name].num_classes
    for split, per_class in zip(SPLITS, SMALL.values()):
        arr = data[split]
        assert arr.images.shape == (k * per_class, 32, 32, 3) and arr.images.dtype == np.uint8
        assert arr.labels.dtype == np.int64
        assert arr.labels.min() >= 0 and arr.labels.max() < k
        assert np.bincount(arr.labels, minlength=k).tolist() == [per_class] * k
        if name == SOURCE_TASK:  # every labelled factor, the shape (= label) first
            assert arr.factors.shape == (len(arr.labels), len(SOURCE_FACTORS)) and arr.factors.dtype == np.int64
            np.testing.assert_array_equal(arr.factors[:, 0], arr.labels)
            for col, values in enumerate(SOURCE_FACTORS.values()):
                assert 0 <= arr.factors[:, col].min() and arr.factors[:, col].max() < len(values)
        else:
            assert arr.factors is None
    assert data["train"].images.std() > 10  # not blank


@pytest.mark.parametrize("name", list(TASKS))
def test_generate_is_deterministic(name: str) -> None:
    a, b = generate_task(name, seed=3, **SMALL), generate_task(name, seed=3, **SMALL)
    c = generate_task(name, seed=4, **SMALL)
    for split in SPLITS:
        np.testing.assert_array_equal(a[split].images, b[split].images)
        np.testing.assert_array_equal(a[split].labels, b[split].labels)
    assert not np.array_equal(a["train"].images, c["train"].images)


@pytest.mark.parametrize("name", ["counting", "digits"])
def test_eval_splits_do_not_depend_on_train_size(name: str) -> None:
    a = generate_task(name, seed=0, n_train=2, n_val=2, n_test=1)
    b = generate_task(name, seed=0, n_train=5, n_val=2, n_test=1)
    for split in ("validation", "test"):
        np.testing.assert_array_equal(a[split].images, b[split].images)


def test_digits_are_disjoint_real_digits() -> None:
    from peft_ssf.demo.data import _load_digits

    glyphs, targets = _load_digits()
    assert glyphs.shape == (1797, 8, 8) and np.bincount(targets).min() == 174  # scikit-learn's bundled set
    spec = TASKS["digits"]
    for seed in (0, 1):
        parts = digits_partition(seed, spec.n_train, spec.n_val, spec.n_test)
        sets = {split: set(idx.tolist()) for split, idx in parts.items()}
        assert [len(sets[s]) for s in SPLITS] == [len(parts[s]) for s in SPLITS] == list(spec.sizes.values())
        assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
                    or sets["validation"] & sets["test"])
        for split in SPLITS:  # balanced classes
            assert np.bincount(targets[parts[split]], minlength=10).tolist() == [len(parts[split]) // 10] * 10
    tests = [set(digits_partition(seed, spec.n_train, spec.n_val, spec.n_test)["test"].tolist()) for seed in (0, 1)]
    assert tests[0] != tests[1]  # the split depends on the seed
    assert set(digits_partition(0, 5, spec.n_val, spec.n_test)["test"].tolist()) == tests[0]  # not on n_train
    with pytest.raises(ValueError, match="only"):
        generate_task("digits", n_train=150, n_val=30, n_test=30)
    with pytest.raises(KeyError, match="unknown task"):
        generate_task("nope")


def test_source_stream_chunks() -> None:
    k = len(SOURCE_FACTORS["shape"])
    a, b = source_stream(0, 3, 2 * k), source_stream(0, 3, 2 * k)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.factors, b.factors)
    assert np.bincount(a.labels, minlength=k).tolist() == [2] * k  # balanced shapes within a chunk
    assert not np.array_equal(a.images, source_stream(0, 4, 2 * k).images)  # chunks differ
    assert not np.array_equal(a.images, source_stream(1, 3, 2 * k).images)  # seeds differ
    val = generate_task(SOURCE_TASK, seed=0, n_train=0, n_val=1, n_test=0)["validation"]
    assert not any((img == a.images).all(axis=(1, 2, 3)).any() for img in val.images)  # own stream
    for col, values in enumerate(SOURCE_FACTORS.values()):
        assert a.factors[:, col].max() < len(values)


def test_make_task_bytes_identical_and_cached(tmp_path: Path) -> None:
    d1 = make_task("orientation", tmp_path / "a", seed=1, **SMALL)
    d2 = make_task("orientation", tmp_path / "b", seed=1, **SMALL)
    assert d1 == tmp_path / "a" / "orientation"
    assert _tree_digest(d1) == _tree_digest(d2)
    assert sorted(p.name for p in d1.iterdir() if p.is_dir()) == sorted(SPLITS)
    assert len(list((d1 / "train").rglob("*.png"))) == SMALL["n_train"] * TASKS["orientation"].num_classes

    mtime = (d1 / ".task.json").stat().st_mtime_ns
    assert make_task("orientation", tmp_path / "a", seed=1, **SMALL) == d1  # same arguments: reused
    assert (d1 / ".task.json").stat().st_mtime_ns == mtime
    make_task("orientation", tmp_path / "a", seed=2, **SMALL)  # other arguments: regenerated in place
    assert _tree_digest(d1) != _tree_digest(d2)

    foreign = tmp_path / "c" / "orientation"
    foreign.mkdir(parents=True)
    with pytest.raises(FileExistsError):
        make_task("orientation", tmp_path / "c", **SMALL)


def test_load_task_imagefolder_offline(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_task("counting", root, seed=0, **SMALL)
    ds = load_task("counting", root, cache_dir=str(tmp_path / "cache"))
    spec = TASKS["counting"]
    assert set(ds) == set(SPLITS)
    assert ds["train"].features["label"].names == list(spec.classes)
    arrays = generate_task("counting", seed=0, **SMALL)
    for split in SPLITS:
        got = sorted((int(r["label"]), np.asarray(r["image"].convert("RGB")).tobytes()) for r in ds[split])
        want = sorted((int(y), img.tobytes()) for img, y in zip(arrays[split].images, arrays[split].labels))
        assert got == want  # PNG round trip is lossless and labels map to the same ids
    with pytest.raises(FileNotFoundError, match="make_task"):
        load_task("texture", root)


# ---- the shipped backbone ------------------------------------------------------------------------------------


def _readme_fact(pattern: str) -> str:
    text = (BACKBONE_DIR / "README.md").read_text()
    m = re.search(pattern, text)
    assert m, f"README.md of the backbone lacks {pattern!r}"
    return m.group(1)


def test_backbone_files_and_checksum() -> None:
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (BACKBONE_DIR / f).is_file(), f
    weights = BACKBONE_DIR / "model.safetensors"
    assert weights.stat().st_size <= 8 * 2**20
    documented = _readme_fact(r"sha256 \(model.safetensors\) \| `([0-9a-f]{64})`")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == documented


def test_backbone_loads_with_plain_transformers() -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(BACKBONE_DIR).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == int(_readme_fact(r"\| parameters \| ([\d,]+)").replace(",", ""))
    assert model.config.image_size == 32 and model.config.patch_size == 8
    # one classifier output per factor value, the factors side by side; config.source_factors gives the slices
    labels = [f"{name}:{value}" for name, values in SOURCE_FACTORS.items() for value in values]
    assert list(model.config.id2label.values()) == labels
    slices = model.config.source_factors  # {factor: [start, stop]} (config.json sorts the keys)
    assert [slices[name] for name in SOURCE_FACTORS] == [[0, 12], [12, 15], [15, 21], [21, len(labels)]]

    k = TASKS[SOURCE_TASK].num_classes
    test = generate_task(SOURCE_TASK, seed=0, n_train=0, n_val=0, n_test=4)["test"]
    x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    assert logits.shape == (4 * k, len(labels)) and torch.isfinite(logits).all()
    # the shipped weights are the trained ones (see the README's accuracies), not a random init: on these 48 images
    # every factor is far above chance (shape 1/12, fill 1/3, hue 1/6, background 1/7)
    for col, name in enumerate(SOURCE_FACTORS):
        start, stop = slices[name]
        acc = (logits[:, start:stop].argmax(-1).numpy() == test.factors[:, col]).mean()
        assert acc >= 0.6, (name, acc)


def test_backbone_readme_matches_training_summary() -> None:
    import json

    summary = json.loads((BACKBONE_DIR / "pretrain_summary.json").read_text())
    assert summary["sha256"] == _readme_fact(r"sha256 \(model.safetensors\) \| `([0-9a-f]{64})`")
    test_row = _readme_fact(r"\| source accuracy \(test\) \| ([^|]+) \|")
    for name, value in summary["test"].items():
        assert f"{name} {value:.3f}" in test_row
    assert (BACKBONE_DIR / "curve.png").stat().st_size > 0
    assert not (BACKBONE_DIR / "training_state.pt").exists()


def test_backbone_processor_matches_documented_normalisation() -> None:
    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    from PIL import Image

    proc = Processor.from_pretrained(BACKBONE_DIR)
    img = generate_task("digits", seed=0, n_train=1, n_val=0, n_test=0)["train"].images[0]
    got = proc(images=Image.fromarray(img), return_tensors="pt")["pixel_values"][0]
    want = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_backbone_adapts_to_new_label_set() -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(BACKBONE_DIR, num_labels=6, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 6


def test_target_textures_are_finer_than_the_source_backgrounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The texture task draws its period from TEXTURE_PERIOD (3-6 px in the image); source backgrounds keep 5-10 px."""
    from peft_ssf.demo import data as D

    def edges(period: tuple[float, float] | None) -> float:
        rng = np.random.default_rng(0)
        extra = () if period is None else (period,)
        masks = [D._texture_mask(rng, "stripes", *extra).astype(int) for _ in range(20)]
        return float(np.mean([np.abs(np.diff(m, axis=1)).sum() + np.abs(np.diff(m, axis=0)).sum() for m in masks]))

    assert D.TEXTURE_PERIOD == (6.0, 12.0)
    assert edges(D.TEXTURE_PERIOD) > 1.4 * edges(None)
    seen: list[tuple[float, float]] = []
    real = D._texture_mask
    def spy(rng: np.random.Generator, kind: str, period: tuple[float, float] = (10, 20)) -> np.ndarray:
        seen.append(period)
        return real(rng, kind, period)

    monkeypatch.setattr(D, "_texture_mask", spy)
    D._render_texture(np.random.default_rng(0), 0)
    assert seen == [D.TEXTURE_PERIOD]


def test_orientation_has_16_bins_of_11_25_degrees() -> None:
    from peft_ssf.demo import data as D

    spec = D.TASKS["orientation"]
    assert spec.num_classes == D.N_ANGLES == 16 and len(set(spec.classes)) == 16
    assert spec.classes[:3] == ("deg_000", "deg_011", "deg_022") and spec.classes[-1] == "deg_169"
