"""Text training: ``peft-ssf train`` on a text dataset, the causal-LM example, merged models served by pipelines."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from text_models import text_config, tiny_tokenizer

from peft_ssf.train import add_train_arguments, train

_GOOD = ["great", "fine", "lovely", "superb", "nice"]
_BAD = ["awful", "poor", "dreadful", "bad", "dull"]
_FILLER = ["the", "film", "was", "really", "quite", "plot", "acting", "and"]


def _sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [_FILLER[int(j)] for j in torch.randint(0, len(_FILLER), (5,), generator=gen)]
        cue = (_GOOD if label else _BAD)[int(torch.randint(0, 5, (1,), generator=gen))]
        words.insert(int(torch.randint(0, 6, (1,), generator=gen)), cue)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def text_workspace(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("text_train")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    splits = {}
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        texts, labels = _sentences(n, seed)
        splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root / "data"))
    tokenizer = tiny_tokenizer(_GOOD + _BAD + _FILLER)
    for model_type, cls_name in (("bert", "BertForSequenceClassification"), ("llama", "LlamaForCausalLM")):
        import transformers

        config = text_config(model_type, vocab_size=len(tokenizer))
        torch.manual_seed(0)
        getattr(transformers, cls_name)(config).save_pretrained(root / model_type)
        tokenizer.save_pretrained(root / model_type)
    return root


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(extra))


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_train_on_a_text_dataset_and_serve_the_merged_model(text_workspace, model_type):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, pipeline

    root = text_workspace
    out = root / f"run_{model_type}"
    summary = train(_args(
        "--model", str(root / model_type), "--dataset", str(root / "data"), "--output_dir", str(out),
        "--epochs", "3", "--batch_size", "8", "--lr", "3e-2", "--save_merged", "--no_progress",
        "--metric_backend", "builtin", "--no_checkpoints",
    ))
    assert summary["task"] == "text-classification" and summary["num_labels"] == 2
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads((out / "results.json").read_text())["global_step"] == summary["global_step"] == 18
    card = (out / "adapter" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification.from_pretrained" in card
    # the merged model is a plain transformers classifier with its tokenizer: the pipeline serves it
    clf = pipeline("text-classification", model=str(out / "merged"), device="cpu")
    texts = ["the film was superb", "the acting was dreadful and dull"]
    preds = clf(texts)
    assert {p["label"] for p in preds} <= {"negative", "positive"}
    # ... and gives the adapter's probabilities
    base = AutoModelForSequenceClassification.from_pretrained(str(root / model_type), num_labels=2,
                                                              ignore_mismatched_sizes=True)
    base.config.pad_token_id = 0
    adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    enc = clf.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = adapter(**enc).logits.softmax(-1)
    top = probs.max(-1).values
    torch.testing.assert_close(torch.tensor([p["score"] for p in preds]), top, rtol=0, atol=1e-5)
    # the adapter records its task (AutoPeftModelForSequenceClassification, for a base on the Hub)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_causal_lm_example_trains_merges_and_generates(tmp_path):
    out = tmp_path / "clm"
    script = Path(__file__).resolve().parents[1] / "examples" / "train_causal_lm.py"
    proc = subprocess.run([sys.executable, str(script), "--output_dir", str(out), "--max_steps", "80", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["final_loss"] < result["initial_loss"] - 0.5  # it learned the toy corpus
    assert result["merged_equals_adapter"] is True
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out / "merged"), device="cpu")
    text = gen("the cat", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the cat") and text == result["greedy_sample"]


@pytest.mark.parametrize("method", ["head", "full"])
def test_text_path_trains_the_other_methods(text_workspace, method):
    out = text_workspace / f"run_{method}"
    summary = train(_args(
        "--model", str(text_workspace / "bert"), "--dataset", str(text_workspace / "data"), "--output_dir", str(out),
        "--max_steps", "2", "--batch_size", "8", "--method", method, "--no_progress", "--metric_backend", "builtin",
        "--no_checkpoints",
    ))
    head = 32 * 2 + 2  # BERT's classifier: hidden 32 -> 2 labels
    assert (summary["trainable_params"] == head) if method == "head" else (summary["trainable_params"] > 10 * head)
    assert (out / "model" / "tokenizer.json").exists() and (out / "model" / "model.safetensors").exists()


def test_text_path_user_errors(text_workspace, tmp_path):
    import datasets

    from peft_ssf.errors import UserError

    no_tokenizer = tmp_path / "bare"
    import transformers

    transformers.BertForSequenceClassification(text_config("bert")).save_pretrained(no_tokenizer)
    with pytest.raises(UserError, match="cannot load a tokenizer.*tokenizer.save_pretrained"):
        train(_args("--model", str(no_tokenizer), "--dataset", str(text_workspace / "data"), "--output_dir",
                    str(tmp_path / "a"), "--no_progress", "--metric_backend", "builtin"))
    unlabeled = tmp_path / "unlabeled"
    split = datasets.Dataset.from_dict({"text": ["a film", "the plot"], "stars": [1, 2]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(unlabeled))
    with pytest.raises(UserError, match=r"cannot find a label column.*\['text', 'stars'\]"):
        train(_args("--model", str(text_workspace / "bert"), "--dataset", str(unlabeled), "--output_dir",
                    str(tmp_path / "b"), "--no_progress", "--metric_backend", "builtin"))


def test_text_job_pushes_last_and_a_failed_push_is_one_user_error(text_workspace, monkeypatch):
    """The text job ends as the image job does (issue 25.10): merged/ and results.json are written before the push,
    and no network at push time is one line naming the retry. Before, it pushed before writing merged/."""
    from huggingface_hub import HfApi

    from peft_ssf.errors import UserError

    def no_network(self, repo_id, **kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    out = text_workspace / "push_fails"
    with pytest.raises(UserError) as err:
        train(_args("--model", str(text_workspace / "bert"), "--dataset", str(text_workspace / "data"),
                    "--output_dir", str(out), "--max_steps", "1", "--batch_size", "8", "--save_merged",
                    "--push_to_hub", "someone/ssf", "--no_progress", "--metric_backend", "builtin",
                    "--no_checkpoints"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("the upload to someone/ssf failed (ConnectionError")
    assert f"peft-ssf push --adapter {out / 'adapter'} --repo_id someone/ssf" in message
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["merged_to"] == str(out / "merged") and "ConnectionError" in results["hub_error"]
