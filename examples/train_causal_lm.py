"""Fine-tune a causal language model with SSF and transformers' Trainer, merge it, and generate with a pipeline.

Runs offline in about a minute on a CPU: a tiny LLaMA (random weights, 2 layers) and a word-level tokenizer are built
from a small generated corpus. On a real checkpoint, replace `build_model_and_tokenizer` with
`AutoModelForCausalLM.from_pretrained(...)` / `AutoTokenizer.from_pretrained(...)`: the rest is unchanged.

    python examples/train_causal_lm.py --output_dir runs/clm

SSF's default placement on LLaMA adapts both RMSNorms of every block, q/k/v/o, gate/up/down and the final norm.
`--bias_free_sites add_bias` (the default here) also learns a shift after the bias-free projections: merging writes
it as their bias and sets `attention_bias` / `mlp_bias` in the config, so `runs/clm/merged` is a plain LLaMA that
`pipeline("text-generation")` serves. RMSNorms have no bias: they learn a scale only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import peft_ssf  # noqa: F401  (registers SSF with PEFT)

SUBJECTS = ["the cat", "the dog", "a bird", "the child", "my friend", "the teacher"]
VERBS = ["sees", "likes", "follows", "finds", "draws", "greets"]
OBJECTS = ["the ball", "a tree", "the house", "the river", "a small boat", "the red door"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` short sentences; "the cat" always "sees" something, so a fine-tuned model can learn a fact."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        verb = "sees" if subject == "the cat" else rng.choice(VERBS)
        lines.append(f"{subject} {verb} {rng.choice(OBJECTS)} .")
    return lines


def build_model_and_tokenizer(texts: list[str], seed: int = 0):
    """A word-level tokenizer over ``texts`` and a tiny random LLaMA with the matching vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    # SentencePiece-style words ("\u2581the"), so decoded continuations keep their leading space
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{"\u2581" + w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Metaspace(prepend_scheme="never")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", model_max_length=32)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_causal_lm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where the adapter, merged model and results go")
    parser.add_argument("--max_steps", type=int, default=150, help="training steps")
    parser.add_argument("--lr", type=float, default=1e-1, help="peak learning rate of AdamW")
    parser.add_argument("--bias_free_sites", choices=("add_bias", "scale_only"), default="add_bias",
                        help="learn shifts after LLaMA's bias-free projections (add_bias) or scales only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    args = parser.parse_args(argv)

    import datasets
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from peft_ssf import SSFConfig

    out = Path(args.output_dir)
    texts = corpus(400, args.seed)
    model, tokenizer = build_model_and_tokenizer(texts, args.seed)
    model = get_peft_model(model, SSFConfig(bias_free_sites=args.bias_free_sites, task_type="CAUSAL_LM"))
    if not args.quiet:
        model.print_trainable_parameters()

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[tokenizer.bos_token_id, *x, tokenizer.eos_token_id] for x in ids]}

    data = datasets.Dataset.from_dict({"text": texts}).map(encode, batched=True, remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    probe = collator([data[i] for i in range(32)])
    model.eval()
    with torch.no_grad():
        initial_loss = model(**probe).loss.item()

    training = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=16,
        learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=10,
        logging_strategy="no" if args.quiet else "steps",
        save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=args.quiet, use_cpu=True,
        log_level="error" if args.quiet else "passive",
    )
    Trainer(model=model, args=training, train_dataset=data, data_collator=collator).train()
    model.eval()
    with torch.no_grad():
        final_loss = model(**probe).loss.item()
        adapter_logits = model(**probe).logits
    model.save_pretrained(out / "adapter")

    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_equals_adapter = torch.allclose(merged(**probe).logits, adapter_logits, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")

    from transformers import pipeline

    generate = pipeline("text-generation", model=str(out / "merged"), device="cpu")
    sample = generate("the cat", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    result = {"initial_loss": round(initial_loss, 4), "final_loss": round(final_loss, 4),
              "merged_equals_adapter": bool(merged_equals_adapter), "greedy_sample": sample,
              "attention_bias": merged.config.attention_bias, "mlp_bias": merged.config.mlp_bias}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
