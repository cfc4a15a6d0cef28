"""Trainer fine-tuning: the example runs end to end offline, an interrupted + resumed run ends identical, the merged
output is deployable with transformers' pipeline, labels are checked before training, the adapter is what gets pushed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from PIL import Image
from safetensors.torch import load_file

from peft_ssf.train import LabelError, add_train_arguments, check_labels, head_weight_decay_groups, train


def _make_imagefolder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, n in (("train", per_class), ("validation", 3), ("test", 3)):
        for name, colour in colours.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(24, 24, 3)).astype(np.uint8)
                arr[6:18, 6:18] = colour
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = _make_imagefolder(root / "data")
    model = tiny_vit(num_labels=3)
    model.save_pretrained(root / "base")
    return root, data


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(extra))


def test_trainer_example_end_to_end(workspace):
    root, data = workspace
    out = root / "run"
    summary = train(_args(
        "--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out), "--epochs", "2",
        "--batch_size", "6", "--lr", "1e-2", "--paper_recipe", "--save_merged", "--no_progress",
        "--metric_backend", "builtin",
    ))
    assert summary["metric_backend"] == "builtin"
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert (out / "results.json").exists()
    # the SSF count of the tiny ViT (1,280) plus a 3-class head on 32 features
    assert summary["trainable_params"] == 1280 + 32 * 3 + 3


def test_merged_output_is_a_pipeline_with_the_adapters_predictions(workspace):
    """`pipeline("image-classification", model=merged_dir)` gives the PEFT model's top-1 on every test image."""
    from datasets import load_dataset
    from transformers import pipeline

    from peft_ssf.engine import load_adapter
    from peft_ssf.train import ImageTransform, image_stats

    root, data = workspace
    out = root / "deploy"
    train(_args("--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out), "--epochs", "2",
                "--batch_size", "6", "--lr", "3e-2", "--save_merged", "--no_progress", "--metric_backend", "builtin"))
    merged_dir = out / "merged"
    assert (merged_dir / "preprocessor_config.json").is_file()
    images = [row["image"] for row in load_dataset("imagefolder", data_dir=str(data))["test"]]
    peft_model = load_adapter(out / "adapter", root / "base")
    size, mean, std = image_stats(str(root / "base"), peft_model.config)
    pixels = torch.stack([ImageTransform(size, mean, std)(im) for im in images])
    with torch.no_grad():
        expected = peft_model(pixel_values=pixels).logits.argmax(-1).tolist()
    classify = pipeline("image-classification", model=str(merged_dir), device="cpu")
    id2label = classify.model.config.id2label
    got = [id2label_index(id2label, r[0]["label"]) for r in classify(images, top_k=1)]
    assert got == expected
    assert sorted(id2label.values()) == ["blue", "green", "red"]  # the dataset's class names, not LABEL_i


def id2label_index(id2label: dict, label: str) -> int:
    return next(i for i, name in id2label.items() if name == label)


def test_labels_outside_the_head_fail_before_training_naming_label_and_size():
    from datasets import Dataset, DatasetDict

    ds = DatasetDict({"train": Dataset.from_dict({"label": [0, 1, 1]}), "test": Dataset.from_dict({"label": [0, 5]})})
    check_labels(ds, "label", 6)
    with pytest.raises(LabelError, match=r"label 5 in split 'test' is outside the classifier head's 2 classes"):
        check_labels(ds, "label", 2)


def test_save_merged_and_push_uploads_the_trained_adapter(workspace, monkeypatch):
    from huggingface_hub import HfApi

    uploaded: dict = {}

    class Repo:
        repo_id = "someone/ssf"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())

    root, data = workspace
    out = root / "push"

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        uploaded["weights"] = load_file(Path(folder_path) / "adapter_model.safetensors")
        uploaded["local_first"] = (out / "merged" / "model.safetensors").is_file() and (out / "results.json").is_file()
        return "https://huggingface.co/someone/ssf/commit/fake"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    summary = train(_args("--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out),
                          "--max_steps", "2", "--batch_size", "6", "--save_merged", "--push_to_hub", "someone/ssf",
                          "--no_progress", "--metric_backend", "builtin", "--no_checkpoints"))
    assert summary["hub_url"].endswith("commit/fake") and (out / "merged" / "model.safetensors").is_file()
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "labels.json"]
    assert uploaded["local_first"]  # issue 25.10: the push comes after merged/ and results.json are written
    assert json.loads((out / "results.json").read_text())["hub_url"].endswith("commit/fake")
    local = load_file(out / "adapter" / "adapter_model.safetensors")
    assert uploaded["weights"].keys() == local.keys() and any(".ssf_scale" in k for k in local)
    for k in local:
        torch.testing.assert_close(uploaded["weights"][k], local[k], rtol=0, atol=0)


def test_paper_recipe_decays_only_the_head_matrix():
    from peft import get_peft_model

    from peft_ssf import SSFConfig

    model = get_peft_model(tiny_vit(num_labels=3), SSFConfig(modules_to_save=["classifier"]))
    decay, no_decay = head_weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and decay["params"][0].shape == (3, 32)
    assert all(p.dim() == 1 for p in no_decay["params"])


def test_resume_from_checkpoint_matches_uninterrupted(workspace):
    root, data = workspace
    common = ["--model", str(root / "base"), "--dataset", str(data), "--max_steps", "6", "--save_steps", "3",
              "--batch_size", "4", "--lr", "2e-2", "--seed", "7", "--paper_recipe", "--augment", "--no_progress",
              "--metric_backend", "builtin"]
    full = train(_args(*common, "--output_dir", str(root / "full")))
    part = train(_args(*common, "--output_dir", str(root / "part")), stop_after_step=3)
    assert part.get("stopped_early") and (root / "part" / "checkpoint-3").exists()
    resumed = train(_args(*common, "--output_dir", str(root / "part"), "--resume_from_checkpoint", "latest"))
    assert full["global_step"] == resumed["global_step"] == 6
    a = load_file(root / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".ssf_scale" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    # and training really moved the parameters
    assert any(not torch.allclose(v, torch.ones_like(v)) for k, v in a.items() if ".ssf_scale" in k)


def test_refuses_non_empty_output_dir(workspace):
    root, data = workspace
    out = root / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):  # peft-ssf prints it as one line
        train(_args("--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out)))


def _connect_error() -> type:
    """The exception huggingface_hub's HTTP client raises without network (httpx2 or httpx, by version)."""
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name).ConnectError
        except ImportError:
            continue
    return ConnectionError


def test_a_failed_push_comes_last_and_is_one_user_error(workspace, monkeypatch):
    """Issue 25.10: no network at push time: merged/ and results.json are written, the error is one line."""
    from huggingface_hub import HfApi

    from peft_ssf.errors import UserError

    def no_network(self, repo_id, **kwargs):
        raise _connect_error()("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    root, data = workspace
    out = root / "push_fails"
    with pytest.raises(UserError) as err:
        train(_args("--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out), "--max_steps",
                    "1", "--batch_size", "6", "--save_merged", "--push_to_hub", "someone/ssf", "--no_progress",
                    "--metric_backend", "builtin", "--no_checkpoints"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("the upload to someone/ssf failed (ConnectError: [Errno -3]")
    assert f"peft-ssf push --adapter {out / 'adapter'} --repo_id someone/ssf" in message
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter" / "labels.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["merged_to"] == str(out / "merged") and "ConnectError" in results["hub_error"]


def _quick(root: Path, data: Path, out: Path, *extra: str) -> argparse.Namespace:
    return _args("--model", str(root / "base"), "--dataset", str(data), "--output_dir", str(out), "--batch_size", "6",
                 "--no_progress", "--metric_backend", "builtin", "--no_epoch_eval", *extra)


def test_overwrite_output_dir_removes_the_earlier_runs_outputs(workspace):
    """Issue 25.1: a stale merged model or checkpoint of the earlier run is neither served nor resumed."""
    root, data = workspace
    out = root / "overwrite"
    train(_quick(root, data, out, "--max_steps", "2", "--save_steps", "1", "--save_merged"))
    assert (out / "merged").is_dir() and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1",
                                                                                             "checkpoint-2"]
    (out / "notes.txt").write_text("the user's own file")
    summary = train(_quick(root, data, out, "--max_steps", "1", "--no_checkpoints", "--overwrite_output_dir",
                           "--seed", "3"))
    assert not (out / "merged").exists() and not list(out.glob("checkpoint-*"))
    assert json.loads((out / "results.json").read_text())["global_step"] == summary["global_step"] == 1
    assert (out / "notes.txt").read_text() == "the user's own file"  # only the run's own outputs are removed
    with pytest.raises(Exception, match="no complete checkpoint"):
        train(_quick(root, data, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))


def test_save_total_limit_keeps_two_checkpoints_by_default(workspace):
    """Issue 24.11: a long run keeps the newest two checkpoints, not one per epoch."""
    root, data = workspace
    out = root / "limit"
    train(_quick(root, data, out, "--max_steps", "4", "--save_steps", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_resume_latest_skips_an_incomplete_checkpoint_and_cleans_orphans(workspace):
    """Issue 25.9: a checkpoint cut short by a kill (no trainer_state.json) is removed and the run resumes from
    the last complete one; a temporary directory left by a killed writer goes too."""
    from peft_ssf.train import checkpoint_complete

    root, data = workspace
    out = root / "killed"
    part = train(_quick(root, data, out, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5"),
                 stop_after_step=3)
    assert part.get("stopped_early")
    (out / "checkpoint-3" / "trainer_state.json").unlink()  # killed while saving checkpoint-3
    (out / ".adapter.tmp-dead1234").mkdir()  # and a kill during an earlier atomic write
    (out / ".adapter.tmp-dead1234" / "adapter_model.safetensors").write_bytes(b"half")
    assert not checkpoint_complete(out / "checkpoint-3") and checkpoint_complete(out / "checkpoint-2")
    resumed = train(_quick(root, data, out, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5",
                           "--resume_from_checkpoint", "latest"))
    assert resumed["global_step"] == 4
    assert not (out / ".adapter.tmp-dead1234").exists()
    assert checkpoint_complete(out / "checkpoint-3") and checkpoint_complete(out / "checkpoint-4")


def test_a_second_run_into_a_locked_output_dir_fails_at_once(workspace):
    """Issue 25.8: the output directory is locked for the life of a run; atomic_output_dir cannot be raced."""
    from peft_ssf.io import OutputLockedError, atomic_output_dir, output_lock

    root, data = workspace
    out = root / "locked"
    with output_lock(out), pytest.raises(OutputLockedError, match="being written by another run"):
        train(_quick(root, data, out, "--max_steps", "1"))
    assert not out.exists()
    target = root / "atomic"
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("A")
        with pytest.raises(OutputLockedError), atomic_output_dir(target) as tmp_b:
            (tmp_b / "b.txt").write_text("B")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert not list(root.glob(".atomic.*"))  # no lock file or temporary left behind


def test_threads_option_sets_torch_threads(workspace, monkeypatch):
    """Issue 24.7: --threads (default: 1 on machines with up to 4 cores, else half the cores)."""
    import os

    from peft_ssf_cli import default_threads

    root, data = workspace
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        summary = train(_quick(root, data, root / "threads", "--max_steps", "1", "--no_checkpoints", "--threads",
                               "1"))
        assert summary["threads"] == 1  # the run used one thread
        assert torch.get_num_threads() == 2  # and gave the caller's setting back
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads() == 8
