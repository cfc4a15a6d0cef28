"""How training cost grows with batch size and image size: floor vs LoRA vs naive / fused SSF.

For every (batch, image size) point the methods are measured as in ``train_cost.py`` (one process, shared frozen
weights, interleaved steps, median after warm-up): step time, images/s and saved activations, as ratios to the floor.
Saved-activation bytes are exact; they grow linearly with batch and with the token count (image size squared).

Usage:
    python -m benchmarks.scaling                # ViT-B/16: batch 1, 2, 4, 8 @224; 160, 224, 288px @ batch 4
    python -m benchmarks.scaling --family convnext --batches 2 4 --image-sizes 224
    python -m benchmarks.scaling --methods floor ssf_unpaired ssf_fused
    python -m benchmarks.scaling --device cuda --dtype bf16 --batches 32 64 128
    python -m benchmarks.scaling --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import common as C


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(batch, image size) grid: every batch at the default size, every size at ``--size-batch``."""
    grid = [(b, args.default_size) for b in args.batches]
    grid += [(args.size_batch, s) for s in args.image_sizes if (args.size_batch, s) not in grid]
    return grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the defaults of a full or a ``--quick`` run filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--family", default="vit", choices=C.FAMILIES)
    parser.add_argument("--methods", nargs="+", default=["floor", "lora", "ssf_naive", "ssf_unpaired", "ssf_fused"],
                        choices=C.METHODS)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 2 4 8 (1 2 with --quick)")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=None,
                        help="default 160 224 288 (32 48 with --quick)")
    parser.add_argument("--size-batch", type=int, default=None, help="batch for the image-size sweep (default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds, default 3 (1 with --quick)")
    args = parser.parse_args(argv)
    C.setup(args)
    args.batches = args.batches or ([1, 2] if args.quick else [1, 2, 4, 8])
    args.image_sizes = args.image_sizes or ([32, 48] if args.quick else [160, 224, 288])
    args.default_size = 32 if args.quick else 224
    args.size_batch = args.size_batch or (2 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.steps = args.steps or (1 if args.quick else 3)
    if "floor" not in args.methods:
        args.methods = ["floor", *args.methods]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    spec = C.model_spec(args.family, args.quick)
    cfg = {k: getattr(args, k) for k in ("family", "methods", "batches", "image_sizes", "size_batch", "warmup",
                                         "steps", "device", "dtype", "quick")}
    cfg["model"] = spec.label
    payload: dict[str, Any] = {"meta": C.machine_info(args.device, args.dtype), "config": cfg, "rows": []}
    trainers: dict[int, dict[str, C.Trainer]] = {}
    for batch, size in points(args):
        if size not in trainers:
            base = C.build_model(args.family, image_size=size, quick=args.quick)
            trainers = {size: {m: C.Trainer(C.prepare(m, base, args.family), args.device, args.dtype)
                               for m in args.methods}}  # one image size alive at a time
        x, y = C.make_batch(batch, size, args.device)
        group = trainers[size]
        saved = {m: C.saved_activations(tr.model, lambda tr=tr, x=x, y=y: tr.forward_loss(x, y)).total_bytes
                 for m, tr in group.items()}
        jobs = {m: (lambda tr=tr, x=x, y=y: tr.step(x, y)) for m, tr in group.items()}
        times, wall = C.interleaved_times(jobs, args.warmup, args.steps, args.device)
        floor_t, floor_b = C.median(times["floor"]), saved["floor"]
        methods = {
            m: {
                "time_s": C.median(times[m]),
                "times_s": times[m],
                "wall_s": wall[m],
                "images_per_s": batch / C.median(times[m]),
                "saved_bytes": saved[m],
                "ratio_time": C.median(times[m]) / floor_t,
                "ratio_saved": saved[m] / floor_b,
            }
            for m in group
        }
        payload["rows"].append({"batch": batch, "image_size": size, "methods": methods})
        fused = methods.get("ssf_fused")
        print(f"[{spec.label}] batch {batch} @ {size}: floor {floor_t:.2f} s"
              + (f", fused SSF {fused['ratio_time']:.2f}x / {fused['ratio_saved']:.2f}x" if fused else ""),
              file=sys.stderr, flush=True)
        C.write_results(args.out, "scaling", payload, "## Scaling\n\n" + C.scaling_summary_markdown(payload),
                        "scaling.py")
    markdown = "## Scaling\n\n" + C.scaling_summary_markdown(payload)
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
