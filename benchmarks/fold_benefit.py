"""What the training fold buys, and what exact rounding costs in half precision.

On a frozen Linear / Conv the default op (``ops._FoldedScaleShift``) folds ``scale`` and ``shift`` into the weight and
bias before the GEMM in float32; in half precision it does not (it runs the op first and SSF after it, rounded as the
naive op: a folded weight rounds differently, and a ReLU downstream can flip on that). Both keep only the site
output. Three methods in one process, interleaved step by step (process CPU time, medians after warm-up): ``floor``
(frozen model + one bias), ``ssf_fold`` (the op with the fold forced on) and ``ssf_no_fold`` (forced off). In float32
the default is ``ssf_fold`` and the comparison sizes the fold's benefit against its code; with ``--dtype bf16`` /
``bf16-model`` the default is ``ssf_no_fold`` and the comparison is what exactness costs (the forced fold is the
inexact op the package used before; it recasts the folded weight in backward instead of keeping it). Saved
activations are reported too.

    python -m benchmarks.fold_benefit                        # ViT-B/16 and ConvNeXt-B, fp32, batch 8, CPU
    python -m benchmarks.fold_benefit --dtype bf16           # the same under bf16 autocast -> fold_benefit_bf16.*
    python -m benchmarks.fold_benefit --quick                # tiny configs (smoke test), results to $TMPDIR
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from peft_ssf import layer as ssf_layer

from . import common as C

METHODS = ("floor", "ssf_fold", "ssf_no_fold")


@contextlib.contextmanager
def fold_forced(fold: bool) -> Iterator[None]:
    """Force the layers' training fold on or off (``layer._fold_exact`` answers ``fold``) while the block runs."""
    original = ssf_layer._fold_exact
    ssf_layer._fold_exact = lambda *args: fold
    try:
        yield
    finally:
        ssf_layer._fold_exact = original


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = C.model_spec(family, args.quick)
    base = C.build_model(family, image_size=args.image_size, quick=args.quick)
    x, y = C.make_batch(args.batch, args.image_size, args.device)
    trainers = {m: C.Trainer(C.prepare("floor" if m == "floor" else "ssf_fused", base, family), args.device,
                             args.dtype) for m in METHODS}
    del base

    def step(m: str) -> None:
        with fold_forced(m == "ssf_fold"):
            trainers[m].step(x, y)

    saved = {}
    for m, tr in trainers.items():
        with fold_forced(m == "ssf_fold"):
            saved[m] = C.saved_activations(tr.model, lambda tr=tr: tr.forward_loss(x, y)).total_bytes
    print(f"[{spec.label}] timing {len(trainers)} x ({args.warmup} warm-up + {args.steps}) steps ...", file=sys.stderr)
    times, _ = C.interleaved_times({m: (lambda m=m: step(m)) for m in METHODS}, args.warmup, args.steps, args.device)
    floor = C.median(times["floor"])
    return {"label": spec.label, "methods": {m: {"time_s": C.median(times[m]), "times_s": times[m],
                                                 "time_ratio": C.median(times[m]) / floor,
                                                 "saved_bytes": saved[m]} for m in METHODS}}


def render(payload: dict[str, Any]) -> str:
    title = ("The float32 training fold: what it buys" if payload["meta"]["dtype"] == "fp32" else
             "Half precision: what rounding as the naive op costs against the (inexact) fold")
    lines = [f"## {title}", "", C.meta_line(payload["meta"]), "",
             "| model | floor s/step | SSF with fold | SSF without fold | fold saves | saved MiB (fold / no fold) |",
             "|---|---|---|---|---|---|"]
    for run in payload["runs"].values():
        m = run["methods"]
        fold, nofold = m["ssf_fold"], m["ssf_no_fold"]
        gain = 1 - fold["time_s"] / nofold["time_s"]
        lines.append(f"| {run['label']} | {m['floor']['time_s']:.2f} | {fold['time_ratio']:.3f}x | "
                     f"{nofold['time_ratio']:.3f}x | {100 * gain:.1f}% of the SSF step | "
                     f"{C.fmt_mib(fold['saved_bytes'])} / {C.fmt_mib(nofold['saved_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["vit", "convnext"], choices=C.ALL_FAMILIES)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="default 5 (1 with --quick)")
    C.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.dtype not in ("fp32", "bf16", "bf16-model") or args.compile:
        raise SystemExit("eager mode, --dtype fp32, bf16 or bf16-model")
    C.setup(args)
    args.batch = args.batch or (2 if args.quick else 8)
    args.image_size = args.image_size or (32 if args.quick else 224)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or (1 if args.quick else 5)
    payload = {"meta": C.machine_info(args.device, args.dtype),
               "runs": {f: run_family(f, args) for f in args.families}}
    markdown = render(payload)
    name = "fold_benefit" if args.dtype == "fp32" else f"fold_benefit_{args.dtype}"
    C.write_results(args.out, name, payload, markdown, "fold_benefit.py")
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
