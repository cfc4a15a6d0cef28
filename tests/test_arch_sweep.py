"""Architecture sweep in CI: every architecture of ``scripts/sweep_architectures.py`` (30+ tiny transformers models:
vision, text encoders, decoders, encoder-decoders, CLIP) trains one step with the default op equal to ``fused=False``
on every gradient, merges exactly, and a few reload their saved adapter in a new process."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from sweep_architectures import ARCHS, CI_RELOAD, sweep_half, sweep_one  # noqa: E402


def test_sweep_covers_the_families():
    assert len(ARCHS) >= 30
    kinds = {kind for *_, kind in ARCHS.values()}
    assert kinds == {"image", "text", "causal", "seq2seq", "clip"}
    assert {"llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "t5", "bart", "clip"} <= set(ARCHS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = sweep_one(name, reload=name in CI_RELOAD)
    assert row["result"] == "ok", row
    assert row["sites"] > 0 and row["params"] > 0


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_architecture_all_preset(name):
    """Where the paper preset exists, ``preset="all"`` adapts more (Swin's patch merging, ConvNeXt's downsampling)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paper, everything = sweep_one(name, reload=False), sweep_one(name, reload=False, placement="all")
    assert everything["result"] == "ok", everything
    assert everything["sites"] > paper["sites"]


@pytest.mark.parametrize("precision", ["bf16-model", "bf16-autocast"])
@pytest.mark.parametrize("name", ["vit", "swin", "convnext", "resnet", "bert", "gpt2", "llama", "t5"])
def test_architecture_in_half_precision(name, precision):
    """Half precision: outputs and input gradient bit-identical to ``fused=False``, parameter gradients within the
    differential test's tolerance of a float64 run (``python scripts/sweep_architectures.py --half`` runs all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = sweep_half(name, precision)
    assert row["result"] == "ok", row
