"""Training cost on a CUDA GPU: SSF against the frozen floor, LoRA and IA3, eager and compiled, bf16 autocast.

For each B-size model (ViT-B/16, Swin-B, ConvNeXt-B at 224 px, random weights, nothing downloaded) and each method,
the script times training steps (forward, backward, AdamW update; CUDA events, after warm-up) and reads
``torch.cuda.max_memory_allocated`` over one step. Every method trains the classifier head. ``floor`` trains only
the head and one bias in the first block, so backward still runs through every block: no PEFT method can cost less.

    python -m benchmarks.gpu_train --out benchmarks/results                      # everything, batch 64
    python -m benchmarks.gpu_train --families vit --batches 8 64 --no-compile    # a quick look

Writes ``gpu_train.json`` and ``gpu_train.md`` to ``--out``. Needs a CUDA device (it refuses to run without one).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import common as C

#: the comparison (``common.prepare`` builds each one: head trainable for all, floor = head + one bias)
METHODS = ("floor", "lora", "ia3", "ssf_fused", "ssf_unpaired", "ssf_naive")
FAMILIES = C.FAMILIES


class Step:
    """One training step under bf16 autocast (optionally compiled forward + loss)."""

    def __init__(self, model: nn.Module, compiled: bool) -> None:
        self.model = model.cuda().train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        self.loss_fn: Callable = self._loss
        if compiled:
            self.loss_fn = torch.compile(self._loss)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(pixel_values=x).logits
        return F.cross_entropy(logits.float(), y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_fn(x, y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def time_steps(step: Step, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(x, y)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def peak_bytes(step: Step, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(max allocated over one step, that minus what was allocated before the step)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


def run_family(family: str, args: argparse.Namespace, compiled: bool, batch: int) -> dict[str, Any]:
    base = C.build_model(family)
    x, y = C.make_batch(batch, 224, "cuda")
    out: dict[str, Any] = {}
    for method in args.methods:
        if compiled and method not in args.compile_methods:
            continue
        t0 = time.perf_counter()
        torch._dynamo.reset()
        step = Step(copy.deepcopy(C.prepare(method, base, family)), compiled)  # own weights on the GPU
        times = time_steps(step, x, y, args.warmup, args.steps)
        peak, step_peak = peak_bytes(step, x, y)
        med = statistics.median(times)
        out[method] = {"step_s": med, "images_per_s": batch / med, "max_allocated": peak, "step_peak": step_peak,
                       "times_s": times, "setup_and_run_s": time.perf_counter() - t0}
        print(f"  {family} b{batch} {'compiled' if compiled else 'eager'} {method:13s} {med * 1e3:8.2f} ms/step "
              f"{batch / med:8.1f} img/s  step peak {step_peak / 2**20:9.1f} MiB  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del step
        torch.cuda.empty_cache()
    floor = out.get("floor")
    for rec in out.values():
        rec["ratio_time"] = rec["step_s"] / floor["step_s"] if floor else None
        rec["ratio_step_peak"] = rec["step_peak"] / floor["step_peak"] if floor else None
    return out


def markdown(payload: dict[str, Any]) -> str:
    lines = [f"GPU training cost ({payload['device']}, torch {payload['torch']}, bf16 autocast, fused AdamW, "
             f"{payload['date']}). Each cell: step time ratio / step memory ratio to the floor (step memory = "
             "`max_memory_allocated` during one step minus what was allocated before it).", ""]
    for key, runs in payload["runs"].items():
        lines += [f"**{key}**", "", "| method | " + " | ".join(C.model_spec(f).label for f in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        methods = [m for m in METHODS if any(m in r for r in runs.values())]
        for m in methods:
            cells = []
            for rec in runs.values():
                r = rec.get(m)
                cells.append("-" if r is None else f"{r['ratio_time']:.2f}x / {r['ratio_step_peak']:.2f}x "
                             f"({r['images_per_s']:.0f} img/s)")
            lines.append(f"| {C.METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batches", nargs="+", type=int, default=[64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-families", nargs="+", default=["vit"], choices=FAMILIES)
    parser.add_argument("--compile-methods", nargs="+", default=["floor", "lora", "ssf_fused"], choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train.py needs a CUDA device.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    payload: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {"out": str(args.out)},
        "runs": {},
    }
    for batch in args.batches:
        key = f"eager, batch {batch}"
        payload["runs"][key] = {f: run_family(f, args, False, batch) for f in args.families}
        if not args.no_compile:
            key = f"torch.compile, batch {batch}"
            payload["runs"][key] = {f: run_family(f, args, True, batch) for f in args.compile_families}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train.json").write_text(json.dumps(payload, indent=1))
    (args.out / "gpu_train.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
