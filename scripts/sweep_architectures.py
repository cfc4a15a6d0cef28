"""Architecture sweep: SSF on tiny transformers models built from configs (no downloads).

For each architecture: ``get_peft_model`` with the preset (``"paper"`` where the model type has one, and ``"all"``),
one training step with the default op and with ``fused=False`` (every trainable parameter's gradient compared),
merge equality, and a save / reload in a new process. ``--write-docs`` writes docs/architectures.md.

``--half`` checks half precision instead: each architecture as a bf16 model and under CPU bf16 autocast, one
training step with the default op and with ``fused=False``; the outputs and the input gradient must be identical bit
for bit (the fused op rounds exactly as the naive one) and every gradient within the differential test's
half-precision tolerance of a float64 run (``sweep_half``).

    python scripts/sweep_architectures.py [--only gpt2,t5] [--write-docs] [--half]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from peft import get_peft_model

import peft_ssf  # noqa: F401
from peft_ssf import SSFConfig
from peft_ssf.presets import PAPER_ROLES

ROOT = Path(__file__).resolve().parents[1]
TXT = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
DEC = {**TXT, "num_key_value_heads": 1, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
IMG = {"image_size": 32, "patch_size": 8, "num_channels": 3}

#: name -> (model class, config class, config kwargs, input kind)
ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", {**TXT, **IMG}, "image"),
    "deit": ("DeiTForImageClassification", "DeiTConfig", {**TXT, **IMG}, "image"),
    "beit": ("BeitForImageClassification", "BeitConfig", {**TXT, **IMG, "vocab_size": 64}, "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", {**TXT, **IMG}, "image"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
              "window_size": 4}, "image"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}, "image"),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config",
                   {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}, "image"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}, "image"),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                     {"image_size": 32, "depth_multiplier": 0.25}, "image"),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     {"image_size": 32, "width_coefficient": 0.1, "depth_coefficient": 0.1, "hidden_dim": 128},
                     "image"),
    "bert": ("BertForSequenceClassification", "BertConfig", TXT, "text"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", {**TXT, "pad_token_id": 1}, "text"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   {"vocab_size": 64, "dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}, "text"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", {**TXT, "embedding_size": 16}, "text"),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", TXT, "text"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", {**TXT, "embedding_size": 16}, "text"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0},
             "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig",
            {**TXT, "ffn_dim": 32, "word_embed_proj_dim": 16, "pad_token_id": 0, "bos_token_id": 0,
             "eos_token_id": 0}, "causal"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig",
             {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4, "bos_token_id": 0,
              "eos_token_id": 0}, "causal"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", DEC, "causal"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", DEC, "causal"),
    "mistral": ("MistralForCausalLM", "MistralConfig", DEC, "causal"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DEC, "causal"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**DEC, "head_dim": 8}, "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**DEC, "head_dim": 8}, "causal"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**DEC, "head_dim": 8}, "causal"),
    "phi": ("PhiForCausalLM", "PhiConfig", DEC, "causal"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", DEC, "causal"),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2,
            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}, "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             {"vocab_size": 64, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
              "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
              "max_position_embeddings": 32,
              "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}, "seq2seq"),
    "clip": ("CLIPModel", "CLIPConfig",
             {"text_config": {**TXT, "max_position_embeddings": 16},
              "vision_config": {**TXT, **IMG}, "projection_dim": 8}, "clip"),
}

#: the few that tests/test_arch_sweep.py also reloads in a subprocess
CI_RELOAD = ("vit", "gpt2", "t5")


def build(name: str) -> torch.nn.Module:
    model_cls, cfg_cls, kwargs, _ = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(tf, cfg_cls)(**copy.deepcopy(kwargs))
    if hasattr(config, "num_labels") and ARCHS[name][3] in ("image", "text"):
        config.num_labels = 3
    return getattr(tf, model_cls)(config).eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    kind = ARCHS[name][3]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 8), generator=g)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    if kind == "image":
        return {"pixel_values": pixels}
    if kind == "text":
        return {"input_ids": ids}
    if kind == "causal":
        return {"input_ids": ids, "labels": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "pixel_values": pixels, "return_loss": True}


def _loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float().square().mean()


def _logits(out: Any) -> torch.Tensor:
    for key in ("logits", "logits_per_image"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def config_for(name: str, placement: str | None = None, **extra: Any) -> SSFConfig:
    model_type = build(name).config.model_type
    preset = placement or ("paper" if model_type in PAPER_ROLES else "all")
    kind = ARCHS[name][3]
    save = ["classifier"] if kind in ("image", "text") else None
    return SSFConfig(preset=preset, init_weights=False, modules_to_save=save, **extra)


def sweep_one(name: str, reload: bool = True, placement: str | None = None) -> dict[str, Any]:
    """One architecture: sites, parameters, and the result (``ok``, ``refused: ...`` or ``FAILED: ...``).

    ``placement``: ``"paper"`` / ``"all"``; default: the paper preset where the model type has one, else ``"all"``.
    """
    row: dict[str, Any] = {"arch": name, "sites": 0, "params": 0}
    x = inputs(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = get_peft_model(build(name), config_for(name, placement))
            naive = get_peft_model(build(name), config_for(name, placement, fused=False))
    except (ValueError, TypeError) as exc:
        row["result"] = f"refused: {str(exc)[:120]}"
        return row
    naive.load_state_dict(fused.state_dict())
    row["sites"] = sum(1 for _, m in fused.named_modules() if hasattr(m, "ssf_scale"))
    row["params"] = sum(p.numel() for n, p in fused.named_parameters() if "ssf_" in n)
    row["preset"] = placement or ("paper" if fused.config.model_type in PAPER_ROLES else "all")
    try:
        for model in (fused, naive):
            model.train()
            torch.manual_seed(0)
            _loss(model(**x)).backward()
        grads = dict(naive.named_parameters())
        # floor: a hundred-thousandth of the largest gradient, for gradients that are zero up to rounding (the
        # shift of a key projection, T5's relative-bias shift: softmax ignores them)
        floor = 1e-5 * max(p.grad.abs().max().item() for p in grads.values() if p.grad is not None)
        for pname, p in fused.named_parameters():
            if not p.requires_grad:
                continue
            ref = grads[pname].grad
            if (p.grad is None) != (ref is None):
                raise AssertionError(f"{pname}: grad None in one op only")
            if ref is not None:
                diff = (p.grad - ref).abs().max().item()
                if diff > 1e-3 * ref.abs().max().item() + floor:
                    raise AssertionError(f"{pname}: gradient differs by {diff:.3g} (max {ref.abs().max():.3g})")
        fused.eval()
        with torch.no_grad():
            before = _logits(fused(**x))
            with tempfile.TemporaryDirectory() as tmp:
                fused.save_pretrained(tmp)
                if reload:
                    _reload_in_subprocess(name, tmp, before)
                merged = fused.merge_and_unload()
                after = _logits(merged(**x))
        merge_diff = (after - before).abs().max().item()
        if merge_diff > 1e-4 * (before.abs().max().item() + 1):
            raise AssertionError(f"merged logits differ by {merge_diff:.3g}")
        row["result"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        row["result"] = f"FAILED: {type(exc).__name__}: {str(exc)[:160]}"
    return row


def _input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        return model.get_input_embeddings()
    except NotImplementedError:  # CLIP: two towers, no single input embedding
        return None


def _catch_grad(caught: list[torch.Tensor]) -> Any:
    """A forward hook that records the gradient reaching a module's output (and leaves the output alone)."""
    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(caught.append)
    return hook


def sweep_half(name: str, precision: str) -> dict[str, Any]:
    """Half precision (``"bf16-model"`` / ``"bf16-autocast"``): the default op's outputs and the gradient reaching
    the pixels / the embeddings' output (where it has one) equal ``fused=False``'s bit for bit (a float32 one, under
    autocast, up to the order autograd sums branch contributions in: 1e-5 of its largest value), and every parameter
    gradient passes tests/differential.py's half-precision tolerance against a float64 naive run: no further from
    it than twice the naive op's error, plus 1e-2 of the tensor's largest value, plus 2**-8 of the model's largest
    gradient (the fused op takes a scale gradient from its kept bf16 output; where the shift dominates that output
    the rounding of a small scale gradient is far above the naive op's)."""
    row: dict[str, Any] = {"arch": name, "precision": precision}
    x = inputs(name)
    model_dtype = torch.bfloat16 if precision == "bf16-model" else torch.float32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = get_peft_model(build(name).to(model_dtype), config_for(name))
            naive = get_peft_model(build(name).to(model_dtype), config_for(name, fused=False))
            ref = get_peft_model(build(name).to(model_dtype), config_for(name, fused=False))
    except (ValueError, TypeError) as exc:
        row["result"] = f"refused: {str(exc)[:120]}"
        return row
    naive.load_state_dict(fused.state_dict())
    ref.load_state_dict(fused.state_dict())
    ref.double()
    try:
        outs, seen, grads = [], [], []
        for model in (fused, naive, ref):
            model.train()
            dtype = torch.float64 if model is ref else model_dtype
            embed = _input_embeddings(model) if "input_ids" in x else None
            caught: list[torch.Tensor] = []
            hook = embed.register_forward_hook(_catch_grad(caught)) if embed is not None else None
            xi = {k: (v.detach().to(dtype).clone().requires_grad_(True) if k == "pixel_values" else v)
                  for k, v in x.items()}
            torch.manual_seed(0)
            autocast = precision == "bf16-autocast" and model is not ref
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(**xi)
            _loss(out).double().backward()
            if hook is not None:
                hook.remove()
            outs.append(_logits(out).detach())
            seen.append(xi["pixel_values"].grad if "pixel_values" in xi else (caught[-1] if caught else None))
            grads.append({n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None})
        if not torch.equal(outs[0], outs[1]):
            raise AssertionError(f"outputs differ by {(outs[0].float() - outs[1].float()).abs().max():.3g}")
        if (seen[0] is None) != (seen[1] is None):
            raise AssertionError("the input gradient is None in one op only")
        if seen[0] is not None and not torch.equal(seen[0], seen[1]):
            # a float32 gradient (autocast keeps the stream in float32) may differ in the order autograd sums the
            # branches' contributions (a custom node vs several plain ones): float32 rounding, not a bf16 step
            diff = (seen[0].double() - seen[1].double()).abs().max().item()
            if seen[0].dtype != torch.float32 or diff > 1e-5 * seen[1].abs().max().item():
                raise AssertionError(f"the input gradient differs by {diff:.3g} (max {seen[1].abs().max():.3g})")
        if set(grads[0]) != set(grads[1]):
            raise AssertionError("the two ops give gradients to different parameters")
        largest = max(g.abs().max().item() for g in grads[1].values())
        for pname, g in grads[0].items():
            want = grads[2][pname]
            err_fused, err_naive = (g - want).abs().max().item(), (grads[1][pname] - want).abs().max().item()
            if err_fused > 2 * err_naive + 1e-2 * want.abs().max().item() + 2.0**-8 * largest + 1e-9:
                raise AssertionError(f"{pname}: fused is {err_fused:.3g} from float64, naive {err_naive:.3g}")
        row["result"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        row["result"] = f"FAILED: {type(exc).__name__}: {str(exc)[:160]}"
    return row


def _reload_in_subprocess(name: str, folder: str, expected: torch.Tensor) -> None:
    code = (
        "import sys, torch, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, sys.argv[1]);"
        "from sweep_architectures import build, inputs, _logits; from peft import PeftModel; import peft_ssf;"
        "m = PeftModel.from_pretrained(build(sys.argv[2]), sys.argv[3]).eval();"
        "torch.save(_logits(m(**inputs(sys.argv[2]))).detach(), sys.argv[3] + '/out.pt')"
    )
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name, folder], check=True,
                   capture_output=True, text=True)
    got = torch.load(Path(folder) / "out.pt")
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
        raise AssertionError(f"reloaded in a new process: logits differ by {(got - expected).abs().max():.3g}")


def write_docs(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Architectures",
        "",
        "Generated by `python scripts/sweep_architectures.py --write-docs` (tiny models built from configs, no "
        "weights): `get_peft_model` with the preset (`paper` where the model type has one, else `all`), one training "
        "step with the default op and with `fused=False` (every gradient compared), merge equality, and save / reload "
        "in a new process.",
        "",
        "| architecture | preset | SSF sites | SSF parameters | result |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arch']} | {r.get('preset', '-')} | {r['sites']} | {r['params']} | {r['result']} |")
    lines += ["", "Half precision: `python scripts/sweep_architectures.py --half` runs every architecture above as a "
              "bf16 model and under CPU bf16 autocast (its preset): outputs and the input gradient must be "
              "bit-identical to `fused=False`, every parameter gradient within tests/differential.py's tolerance of a "
              "float64 run."]
    (ROOT / "docs" / "architectures.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--half", action="store_true", help="bf16 model and bf16 autocast: bit-identical forward")
    args = parser.parse_args()
    names = [n for n in ARCHS if not args.only or n in args.only.split(",")]
    rows = []
    if args.half:
        for name in names:
            for precision in ("bf16-model", "bf16-autocast"):
                rows.append(sweep_half(name, precision))
                print(json.dumps(rows[-1]), flush=True)
        counts = {k: sum(r["result"].startswith(k) for r in rows) for k in ("ok", "refused", "FAILED")}
        print(f"architectures={len(names)} runs={len(rows)} " + " ".join(f"{k}={v}" for k, v in counts.items()))
        return 1 if counts["FAILED"] else 0
    for name in names:
        placements = [None] + (["all"] if build(name).config.model_type in PAPER_ROLES else [])
        for placement in placements:  # the model type's preset, and "all" as well where that is a different one
            row = sweep_one(name, placement=placement)
            rows.append(row)
            print(json.dumps(row), flush=True)
    counts = {k: sum(r["result"].startswith(k) for r in rows) for k in ("ok", "refused", "FAILED")}
    print(f"architectures={len(names)} runs={len(rows)} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    if args.write_docs:
        write_docs(rows)
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
