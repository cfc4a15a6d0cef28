"""Forward-live memory: how much the resident set grows over one training forward, in a fresh process.

Everything a method keeps for backward (saved tensors, tensors held by its own bookkeeping, autocast's cast
weights) is alive when the forward returns, however it is kept; so the RSS growth over the forward counts it all and
no mechanism of ours can hide from it (``saved_tensors_hooks`` would switch residual pairing off). glibc's
``malloc`` is told to serve every block above 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``), so a freed
activation goes back to the system and the RSS follows the live memory. The process first runs one full training
step, so that optimizer state and autocast caches exist before the measured forward.

    python -m benchmarks.forward_memory --family vit --method ssf_fused --dtype bf16     # prints one JSON line

``measure(...)`` runs that in a subprocess with the right environment; ``train_cost.py`` uses it for its memory
column.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from . import common as C

    torch.set_num_threads(args.threads)
    base = C.build_model(args.family, image_size=args.image_size, quick=args.quick)
    trainer = C.Trainer(C.prepare(args.method, base, args.family), "cpu", args.dtype, compile=args.compile)
    del base
    x, y = C.make_batch(args.batch, args.image_size, "cpu")
    trainer.step(x, y)  # optimizer state, autocast and compile caches: not part of the measured forward
    gc.collect()
    before = _rss_bytes()
    loss = trainer.forward_loss(x, y)
    after = _rss_bytes()
    loss.backward()
    return {"family": args.family, "method": args.method, "dtype": args.dtype, "compile": args.compile,
            "batch": args.batch, "forward_live_bytes": after - before}


def measure(family: str, method: str, dtype: str, *, batch: int, image_size: int = 224, quick: bool = False,
            compile: bool = False, threads: int = 1) -> int:
    """Forward-live bytes of ``method`` on ``family`` (a fresh Python process with mmap-backed large blocks)."""
    cmd = [sys.executable, "-m", "benchmarks.forward_memory", "--family", family, "--method", method, "--dtype", dtype,
           "--batch", str(batch), "--image-size", str(image_size), "--threads", str(threads)]
    cmd += ["--quick"] if quick else []
    cmd += ["--compile"] if compile else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"forward_memory failed for {family}/{method}/{dtype}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["forward_live_bytes"]


def main(argv: list[str] | None = None) -> int:
    from .common import ALL_FAMILIES, DTYPES, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=ALL_FAMILIES, required=True)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny test configs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        print("warning: MALLOC_MMAP_THRESHOLD_=65536 is not set; use measure() or set it", file=sys.stderr)
    print(json.dumps(_run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
