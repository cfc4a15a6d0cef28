"""Inference latency: base model vs SSF unmerged vs SSF merged (``merge_and_unload``).

SSF's promise is "free at inference": merged, the model must be the base graph (same module types, same parameter
names and shapes); unmerged it should cost little more than the base. The three models run in one process in eval
mode under ``torch.inference_mode()``, interleaved, median of several forwards after warm-up. The adapter is drawn
with the paper's init (scale ~ N(1, .02), shift ~ N(0, .02)) so the merge really changes the weights; the merged
model's outputs are checked against the unmerged one's.

Usage:
    python -m benchmarks.inference_latency                        # ViT-B/16, Swin-B, ConvNeXt-B; batch 1 and 8
    python -m benchmarks.inference_latency --families vit --batches 8 --repeats 10
    python -m benchmarks.inference_latency --device cuda --dtype bf16 --batches 1 64
    python -m benchmarks.inference_latency --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

import peft_ssf

from . import common as C


def graph_signature(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[int, ...]]]]:
    """Module names and types, parameter names and shapes: equal signatures = the same architecture."""
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return modules, params


def build_variants(family: str, args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The base model, an SSF-adapted copy (unmerged) and a merged copy, all in eval mode on the device."""
    base = C.build_model(family, image_size=args.image_size, quick=args.quick).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = get_peft_model(C.share_weights(base), peft_ssf.SSFConfig(init_weights="paper"))
    merged = copy.deepcopy(unmerged).merge_and_unload()  # deepcopy: merging must not touch the shared weights
    same = graph_signature(merged) == graph_signature(base)
    info = {
        "sites": sum(isinstance(m, peft_ssf.SSFLayer) for m in unmerged.modules()),
        "base_params": sum(p.numel() for p in base.parameters()),
        "merged_params": sum(p.numel() for p in merged.parameters()),
        "merged_is_base_graph": same,
    }
    models = {"base": base, "unmerged": unmerged.eval(), "merged": merged.eval()}
    return {k: m.to(args.device) for k, m in models.items()}, info


def run_family(family: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per batch size for ``family``."""
    spec = C.model_spec(family, args.quick)
    models, info = build_variants(family, args)
    rows = []
    for batch in args.batches:
        x, _ = C.make_batch(batch, args.image_size, args.device)
        with torch.inference_mode(), C.autocast_ctx(args.device, args.dtype):
            ref = C.logits_of(models["unmerged"], x).float()
            out = C.logits_of(models["merged"], x).float()
            merge_err = ((out - ref).abs().max() / ref.abs().max()).item()
            jobs = {name: (lambda m=m, x=x: C.logits_of(m, x)) for name, m in models.items()}
            times, wall = C.interleaved_times(jobs, args.warmup, args.repeats, args.device)
        med = {k: C.median(v) for k, v in times.items()}
        rows.append({
            "model": spec.label,
            "family": family,
            "batch": batch,
            "image_size": args.image_size,
            **info,
            "merged_vs_unmerged_rel_err": merge_err,
            "base_ms": 1e3 * med["base"],
            "unmerged_ms": 1e3 * med["unmerged"],
            "merged_ms": 1e3 * med["merged"],
            "images_per_s": {k: batch / v for k, v in med.items()},
            "ratio_unmerged": med["unmerged"] / med["base"],
            "ratio_merged": med["merged"] / med["base"],
            "times_s": times,
            "wall_s": wall,
        })
        msg = (f"[{spec.label}] batch {batch}: base {1e3 * med['base']:.1f} ms, unmerged "
               f"{rows[-1]['ratio_unmerged']:.3f}x, merged {rows[-1]['ratio_merged']:.3f}x")
        print(msg, file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=list(C.FAMILIES), choices=C.FAMILIES)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 (1 2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds, default 7 (2 with --quick)")
    args = parser.parse_args(argv)
    C.setup(args)
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8])
    args.image_size = args.image_size or (32 if args.quick else 224)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 7)
    cfg = {k: getattr(args, k) for k in ("batches", "image_size", "warmup", "repeats", "device", "dtype", "quick")}
    payload: dict[str, Any] = {"meta": C.machine_info(args.device, args.dtype), "config": cfg, "rows": []}
    for family in args.families:
        payload["rows"].extend(run_family(family, args))
    table = C.inference_summary_markdown(payload)
    details = [
        "| model | batch | base img/s | unmerged img/s | merged img/s | SSF sites | params base / merged | "
        "merged vs unmerged rel. err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        ips = r["images_per_s"]
        details.append(
            f"| {r['model']} | {r['batch']} | {ips['base']:.2f} | {ips['unmerged']:.2f} | {ips['merged']:.2f} | "
            f"{r['sites']} | {r['base_params']:,} / {r['merged_params']:,} | {r['merged_vs_unmerged_rel_err']:.1e} |"
        )
    markdown = f"## Inference latency\n\n{table}\n\n" + "\n".join(details)
    print(markdown)
    C.write_results(args.out, "inference_latency", payload, markdown, "inference_latency.py")
    return payload


if __name__ == "__main__":
    main()
