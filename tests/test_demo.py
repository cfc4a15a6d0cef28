"""The main job (`peft-ssf demo`) runs end to end offline in its quick form, quietly and reproducibly."""

from __future__ import annotations

import json

import pytest
import torch

from peft_ssf.demo import BACKBONE_DIR
from peft_ssf.demo.run import run_demo


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capfd):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert run_demo(out=str(out), quick=True) == 0
    assert torch.get_num_threads() == threads  # the demo's fixed thread count is restored afterwards
    printed, errors = capfd.readouterr()
    assert "| head only |" in printed and "| SSF (paper init) |" in printed and "| full fine-tuning |" in printed
    assert "identical to the adapter's: True" in printed
    # offline and from our own code paths: nothing downloaded, no label-mismatch noise
    for noise in ("Downloading", "incompatible to the `id2label`", "LOAD REPORT", "MISMATCH"):
        assert noise not in printed + errors, noise
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["threads"] == 1
    assert results["merged"]["merged_predictions_identical"] is True
    assert results["merged"]["max_logit_difference"] < 1e-4
    trainable = {r["method"]: r["trainable"] for r in results["rows"]}
    assert trainable["head"] < trainable["ssf"] < trainable["full"]
    assert (out / "results.md").read_text().startswith("| method (orientation, 1 epochs)")
    assert (out / "ssf" / "merged" / "model.safetensors").exists()
    assert (out / "ssf" / "merged" / "preprocessor_config.json").exists()
    assert (out / "ssf" / "adapter" / "adapter_model.safetensors").exists()
    # the demo's own verdict aside: the merged model and base + adapter, loaded afresh, give the same logits
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    import peft_ssf  # noqa: F401 - registers SSF for PeftModel.from_pretrained

    merged = AutoModelForImageClassification.from_pretrained(out / "ssf" / "merged").eval()
    base = AutoModelForImageClassification.from_pretrained(
        BACKBONE_DIR, num_labels=merged.config.num_labels, ignore_mismatched_sizes=True
    )
    adapted = PeftModel.from_pretrained(base, out / "ssf" / "adapter").eval()
    size = merged.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(pixel_values=pixels).logits, merged(pixel_values=pixels).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    card = (out / "ssf" / "adapter" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and str(BACKBONE_DIR) not in card and str(tmp_path) not in card
