"""Hub payloads up to the network boundary: exact files and card; loading by repo id from a populated cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from huggingface_hub import HfApi
from peft import get_peft_model

from peft_ssf import SSFConfig, model_card

PAYLOAD = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace the two network calls of an upload; keep a copy of what would be committed."""
    calls: dict = {}

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo(repo_id)

    def create_branch(self, **kwargs):
        calls["create_branch"] = kwargs

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        dest = tmp_path / "uploaded"
        shutil.copytree(folder_path, dest)
        calls["upload_folder"] = (repo_id, kwargs, dest)
        return f"https://huggingface.co/{repo_id}/commit/fake"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "repo_exists", lambda self, repo_id, **kw: repo_id.startswith("google/"))
    return calls


def _ssf_model(tmp_path: Path):
    base_dir = tmp_path / "base"
    tiny_vit(num_labels=3).save_pretrained(base_dir)
    from transformers import AutoModelForImageClassification

    base = AutoModelForImageClassification.from_pretrained(base_dir)
    return get_peft_model(base, SSFConfig(init_weights=False, modules_to_save=["classifier"])), base_dir


def test_peft_model_push_to_hub_uploads_adapter_and_our_card(captured, tmp_path):
    model, base_dir = _ssf_model(tmp_path)
    url = model.push_to_hub("someone/vit-ssf", commit_message="hello")
    assert url.endswith("commit/fake")
    repo_id, kwargs, folder = captured["upload_folder"]
    assert repo_id == "someone/vit-ssf" and kwargs["commit_message"] == "hello"
    assert sorted(p.name for p in folder.iterdir()) == PAYLOAD
    card = (folder / "README.md").read_text()
    assert card == model_card(model, "default", "someone/vit-ssf")
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model" not in front  # a local base: no base_model at all
    assert "- ssf" in front and "- peft-ssf" in front and "pipeline_tag: image-classification" in front
    assert "import peft_ssf" in card and "merge_and_unload()" in card
    assert "| SSF scale + shift | 1,280 |" in card
    assert "| trainable in total (incl. `modules_to_save`) | 1,379 |" in card
    assert str(tmp_path) not in card and "/tmp" not in card  # never a path of this machine
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SSF" and cfg["base_model_name_or_path"] is None
    assert _card_config(card) == cfg  # the card's config block is the uploaded adapter_config.json


def _card_config(card: str) -> dict:
    block = card.split("## SSF config (adapter_config.json)")[1].split("```json")[1].split("```")[0]
    return json.loads(block)


def test_card_records_a_hub_base_model_and_matches_the_saved_config(captured, tmp_path):
    model, _ = _ssf_model(tmp_path)
    model.peft_config["default"].base_model_name_or_path = "google/vit-base-patch16-224-in21k"
    model.push_to_hub("someone/vit-ssf")
    _, _, folder = captured["upload_folder"]
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: google/vit-base-patch16-224-in21k" in front
    assert "- base_model:adapter:google/vit-base-patch16-224-in21k" in front
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert _card_config(card) == saved and saved["inference_mode"] is True and saved["auto_mapping"]
    assert 'from_pretrained("google/vit-base-patch16-224-in21k")' in card


def test_push_to_hub_honours_every_argument_of_transformers(captured, tmp_path):
    model, _ = _ssf_model(tmp_path)
    model.push_to_hub("someone/vit-ssf", commit_message="msg", commit_description="desc", private=True, token=True,
                      revision="dev", create_pr=True, max_shard_size="1GB", tags=["my-tag"])
    repo, create_kwargs = captured["create_repo"]
    assert repo == "someone/vit-ssf" and create_kwargs["private"] is True and create_kwargs["token"] is True
    assert captured["create_branch"] == {"repo_id": "someone/vit-ssf", "branch": "dev", "token": True,
                                         "exist_ok": True}
    _, kwargs, folder = captured["upload_folder"]
    assert kwargs == {"token": True, "commit_message": "msg", "commit_description": "desc", "revision": "dev",
                      "create_pr": True}
    assert "- my-tag" in (folder / "README.md").read_text()
    with pytest.raises(TypeError, match="positional"):
        model.push_to_hub("someone/vit-ssf", "a commit message passed positionally")
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.push_to_hub("someone/vit-ssf", commit_mesage="typo")


def test_other_peft_methods_keep_transformers_push(monkeypatch):
    from peft import LoraConfig, PeftModel
    from transformers.utils.hub import PushToHubMixin

    seen = {}
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kw: seen.setdefault("repo", repo_id))
    import peft_ssf.hub as hub

    monkeypatch.setattr(PeftModel, "push_to_hub", PushToHubMixin.push_to_hub)
    hub.install_push_to_hub()
    lora = get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_proj"]))
    lora.push_to_hub("someone/lora")
    assert seen["repo"] == "someone/lora"


def test_load_by_repo_id_from_populated_cache_offline(tmp_path):
    model, base_dir = _ssf_model(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    expected = model.eval()(pixels).logits.detach()
    # lay the adapter out exactly as huggingface_hub's cache does
    cache = tmp_path / "hub-cache"
    commit = "0" * 40
    snap = cache / "models--someone--vit-ssf" / "snapshots" / commit
    model.save_pretrained(snap)
    (cache / "models--someone--vit-ssf" / "refs").mkdir(parents=True)
    (cache / "models--someone--vit-ssf" / "refs" / "main").write_text(commit)
    torch.save({"pixels": pixels, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, peft_ssf
        from peft import PeftModel
        from transformers import AutoModelForImageClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        base = AutoModelForImageClassification.from_pretrained({str(base_dir)!r}).eval()
        model = PeftModel.from_pretrained(base, "someone/vit-ssf").eval()
        torch.testing.assert_close(model(io["pixels"]).logits, io["expected"], rtol=1e-5, atol=1e-6)
        print("HUB_CACHE_OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "HUB_CACHE_OK" in res.stdout, res.stderr[-3000:]


def test_cli_push_uploads_the_same_payload(captured, tmp_path):
    from peft_ssf_cli import main

    model, base_dir = _ssf_model(tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["push", "--adapter", str(tmp_path / "adapter"), "--repo_id", "someone/cli-ssf", "--revision", "v1",
                 "--create_pr", "--message", "hi"]) == 0
    repo_id, kwargs, folder = captured["upload_folder"]
    assert repo_id == "someone/cli-ssf" and kwargs["revision"] == "v1" and kwargs["create_pr"] is True
    assert kwargs["commit_message"] == "hi"
    assert sorted(p.name for p in folder.iterdir()) == PAYLOAD
    assert "library_name: peft" in (folder / "README.md").read_text()


def _load_code(card: str) -> str:
    return card.split("## Load")[1].split("```python")[1].split("```")[0]


@pytest.mark.parametrize("base", [None, "google/vit-base-patch16-224-in21k"])
def test_card_load_snippet_is_valid_python_and_counts_adapted_modules(captured, tmp_path, base):
    """Issue 24.5: the Load snippet compiles with or without a known base; the card counts adapted modules."""
    from peft_ssf import SSFLayer

    model = get_peft_model(tiny_vit(num_labels=3), SSFConfig(target_modules=["fc1", "fc2"]))  # 2 name patterns
    model.peft_config["default"].base_model_name_or_path = base
    model.push_to_hub("someone/vit-ssf")
    card = (captured["upload_folder"][2] / "README.md").read_text()
    compile(_load_code(card), "card-load-snippet", "exec")
    adapted = sum(isinstance(m, SSFLayer) for m in model.modules())
    assert adapted == 4 and "after\n4 modules of the frozen base model" in card  # fc1 and fc2 of both layers


def test_a_relative_path_that_looks_like_a_hub_id_is_not_published(captured, tmp_path):
    """Issue 25.14: `models/vit-secret` (a path elsewhere, not on the Hub) never becomes the card's base_model."""
    from peft_ssf.hub import write_model_card

    model, _ = _ssf_model(tmp_path)
    model.peft_config["default"].base_model_name_or_path = "models/vit-secret"
    model.push_to_hub("someone/vit-ssf")  # online check: the Hub has no such model
    folder = captured["upload_folder"][2]
    for card in ((folder / "README.md").read_text(), ):
        assert "vit-secret" not in card
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    model.save_pretrained(tmp_path / "local")  # offline (the card written by training): not in the Hub cache
    assert "vit-secret" not in write_model_card(model, tmp_path / "local").read_text()
