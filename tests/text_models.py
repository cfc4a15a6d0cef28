"""Tiny offline text models of every family with an SSF preset (2 layers, hidden 32), and a tiny tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

VOCAB = 97
_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: model_type -> config kwargs (vocabulary 97 for all)
TEXT_FAMILIES: dict[str, dict] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37),
    "deberta-v2": _ENCODER,
    "modernbert": dict(_ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=2),
}
SEQ2SEQ = ("t5", "bart")
ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2", "modernbert")


def text_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **TEXT_FAMILIES[model_type], **overrides})


def tiny_text_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's natural head: sequence classification for encoders, LM head for decoders and seq2seq."""
    config = text_config(model_type, **overrides)
    torch.manual_seed(seed)
    if model_type in SEQ2SEQ:
        return AutoModelForSeq2SeqLM.from_config(config).eval()
    if model_type in ENCODERS:
        return AutoModelForSequenceClassification.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def text_inputs(model_type: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    inputs = {"input_ids": ids}
    if model_type in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def tiny_tokenizer(texts: list[str], model_max_length: int = 64):
    """A word-level ``PreTrainedTokenizerFast`` built offline from ``texts`` (pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        model_max_length=model_max_length,
    )


def write_readme_stand_ins(root) -> dict[str, str]:
    """Tiny local stand-ins for the text models and dataset README.md names (a LLaMA, a DistilBERT, an IMDB).

    Returns the placeholder values ``tests/test_readme.py`` substitutes: ``tiny_llama``, ``tiny_distilbert``,
    ``tiny_imdb``.
    """
    from pathlib import Path

    import datasets
    from transformers import DistilBertModel, LlamaForCausalLM

    root = Path(root)
    good, bad = ["great", "lovely", "superb"], ["awful", "dull", "poor"]
    texts = [f"the film was {w} and the plot {v}" for w in good + bad for v in ("moved", "dragged")]
    labels = [int(t.split()[3] in good) for t in texts]
    tokenizer = tiny_tokenizer(texts + ["ssf scales and shifts features ."])
    values = {}
    for name, cls, model_type in (("tiny_llama", LlamaForCausalLM, "llama"),
                                  ("tiny_distilbert", DistilBertModel, "distilbert")):
        torch.manual_seed(0)
        cls(text_config(model_type, vocab_size=len(tokenizer))).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        values[name] = str(root / name)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    split = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(root / "tiny_imdb"))
    values["tiny_imdb"] = str(root / "tiny_imdb")
    return values
