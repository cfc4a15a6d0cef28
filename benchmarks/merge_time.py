"""Wall time of ``merge_and_unload()`` (fold every SSF scale / shift into the base weights, drop the wrappers).

Each repeat merges a fresh copy of the same adapted model (the copy is not timed). The adapter uses the paper's init
so every weight really changes.

Usage:
    python -m benchmarks.merge_time                 # ViT-B/16, Swin-B, ConvNeXt-B
    python -m benchmarks.merge_time --families vit --repeats 5
    python -m benchmarks.merge_time --device cuda
    python -m benchmarks.merge_time --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Any

from peft import get_peft_model

import peft_ssf

from . import common as C


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median merge time of ``family`` over ``args.repeats`` fresh copies."""
    spec = C.model_spec(family, args.quick)
    base = C.build_model(family, quick=args.quick).to(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(base, peft_ssf.SSFConfig(init_weights="paper"))
    sites = sum(isinstance(m, peft_ssf.SSFLayer) for m in adapted.modules())
    times, wall = [], []
    for _ in range(args.repeats):
        model = copy.deepcopy(adapted)
        seconds, wall_seconds = C.measure(model.merge_and_unload, args.device)
        times.append(seconds)
        wall.append(wall_seconds)
        del model
    row = {"model": spec.label, "family": family, "sites": sites, "median_s": C.median(times), "times_s": times,
           "median_wall_s": C.median(wall), "wall_s": wall}
    print(f"[{spec.label}] merge_and_unload: {row['median_s']:.3f} s ({sites} sites)", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=list(C.FAMILIES), choices=C.FAMILIES)
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (1 with --quick)")
    args = parser.parse_args(argv)
    C.setup(args)
    args.repeats = args.repeats or (1 if args.quick else 5)
    cfg = {"repeats": args.repeats, "device": args.device, "quick": args.quick}
    payload: dict[str, Any] = {"meta": C.machine_info(args.device, "fp32"), "config": cfg, "rows": []}
    for family in args.families:
        payload["rows"].append(run_family(family, args))
    markdown = "## Merge time\n\n" + C.merge_summary_markdown(payload)
    print(markdown)
    C.write_results(args.out, "merge_time", payload, markdown, "merge_time.py")
    return payload


if __name__ == "__main__":
    main()
