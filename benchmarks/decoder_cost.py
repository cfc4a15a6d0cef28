"""Training cost of SSF, LoRA and IA3 on a LLaMA-like decoder: step time and forward-live memory against the floor.

Model: ``LlamaForCausalLM`` from a config (no download): hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary
32,000, causal-LM loss on random tokens, batch 4 x 256 tokens. Precisions: float32, and bf16 autocast over float32
weights; each with and without gradient checkpointing (transformers' non-reentrant one).

Methods (nothing else is trainable; the LM head stays frozen for every method):

* ``floor``: the whole model frozen except the first block's input RMSNorm weight (512 values), so backward still
  runs through every block: the least any method that adapts the first block can cost;
* ``ssf``: ``SSFConfig`` with explicit targets ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``;
* ``lora``: ``LoraConfig(r=8, lora_alpha=16)`` on the same seven linears;
* ``ia3``: ``IA3Config()`` with PEFT's LLaMA defaults (``k_proj, v_proj, down_proj``, the last one's input scaled).

Measurements, as ``train_cost.py`` / ``forward_memory.py`` define them. On CPU every (precision, checkpointing,
method) runs in a fresh process (``MALLOC_MMAP_THRESHOLD_=65536``, one torch thread): one warm-up step (optimizer
state, autocast caches), then the forward-live memory (RSS growth over one training forward: everything kept for
backward), then ``--steps`` timed steps on the process CPU clock (forward + loss + backward + AdamW + zero_grad); the
median is reported. On CUDA one process holds one method at a time: forward-live = ``torch.cuda.memory_allocated``
after the forward minus before, peak = ``torch.cuda.max_memory_allocated`` over a step minus the memory before it,
step time = wall clock with ``cuda.synchronize``. Ratios are to the floor of the same precision and checkpointing.

    OMP_NUM_THREADS=1 python -m benchmarks.decoder_cost --steps 2          # CPU -> results/decoder_cost.{json,md}
    python -m benchmarks.decoder_cost --device cuda                         # GPU -> results/decoder_cost_cuda.*
    python -m benchmarks.decoder_cost --quick --out /tmp/dc                 # tiny config (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("floor", "ssf", "lora", "ia3")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {"floor": "floor (frozen + 1 norm weight)", "ssf": "SSF (7 linears)", "lora": "LoRA r=8 (7 linears)",
          "ia3": "IA3 (PEFT defaults: k, v, down)"}
MODES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
CONFIGS = {
    False: dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1376, vocab_size=32000, max_position_embeddings=512, batch=4, seq=256),
    True: dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=64, vocab_size=128, max_position_embeddings=64, batch=2, seq=16),
}
FLOOR_PARAM = "model.layers.0.input_layernorm.weight"
MIB = 2**20


def build(method: str, quick: bool, checkpointing: bool) -> Any:
    """The decoder (seed 0, so every process has the same weights) prepared for ``method``."""
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in CONFIGS[quick].items() if k not in ("batch", "seq")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attention_dropout=0.0))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(name == FLOOR_PARAM)
        return model.train()
    from peft import IA3Config, LoraConfig, get_peft_model

    from peft_ssf import SSFConfig

    config = {"ssf": lambda: SSFConfig(target_modules=LINEARS),
              "lora": lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LINEARS),
              "ia3": lambda: IA3Config()}[method]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).train()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Runner:
    """One model, its AdamW and one batch; ``forward`` returns the loss, ``step`` trains once."""

    def __init__(self, method: str, dtype: str, checkpointing: bool, quick: bool, device: str) -> None:
        import torch

        self.device, self.dtype = device, dtype
        self.model = build(method, quick, checkpointing).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        cfg = CONFIGS[quick]
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g).to(device)

    def forward(self) -> Any:
        import torch

        ctx = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                             enabled=self.dtype == "bf16")
        with ctx:
            return self.model(input_ids=self.ids, labels=self.ids).loss

    def step(self) -> None:
        self.forward().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure_cpu(method: str, dtype: str, checkpointing: bool, quick: bool, steps: int) -> dict[str, Any]:
    """In this (fresh) process: trainable count, forward-live RSS growth, median CPU seconds per step."""
    import torch

    torch.set_num_threads(1)
    runner = Runner(method, dtype, checkpointing, quick, "cpu")
    runner.step()  # optimizer state and autocast caches exist before anything is measured
    gc.collect()
    before = _rss_bytes()
    loss = runner.forward()
    live = _rss_bytes() - before
    loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        runner.step()
        times.append(time.process_time() - t0)
    return {"trainable": runner.trainable, "live_bytes": live, "times_s": times}


def run_cpu(method: str, dtype: str, checkpointing: bool, quick: bool, steps: int) -> dict[str, Any]:
    """``measure_cpu`` in a fresh Python process (mmap-backed large blocks, so the RSS follows live memory)."""
    cmd = [sys.executable, "-m", "benchmarks.decoder_cost", "--_child", method, dtype, str(int(checkpointing)),
           "--steps", str(steps)] + (["--quick"] if quick else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"decoder_cost child failed for {method}/{dtype}/ckpt={checkpointing}:\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cuda(dtype: str, checkpointing: bool, methods: Sequence[str], quick: bool, steps: int, warmup: int
             ) -> dict[str, dict[str, Any]]:
    """Every method of one mode on CUDA, one model alive at a time: memory counters, wall-clock step times."""
    import torch

    out = {}
    for method in methods:
        runner = Runner(method, dtype, checkpointing, quick, "cuda")
        for _ in range(warmup):
            runner.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = runner.forward()
        torch.cuda.synchronize()
        live = torch.cuda.memory_allocated() - before
        loss.backward()
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[method] = {"trainable": runner.trainable, "live_bytes": live, "peak_bytes": peak, "times_s": times}
        del runner, loss
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _median(values: Sequence[float]) -> float:
    import statistics

    return statistics.median(values)


def add_ratios(methods: dict[str, dict[str, Any]]) -> None:
    floor = methods["floor"]
    for rec in methods.values():
        rec["time_s"] = _median(rec["times_s"])
        rec["ratio_time"] = rec["time_s"] / _median(floor["times_s"])
        rec["ratio_live"] = rec["live_bytes"] / floor["live_bytes"] if floor["live_bytes"] > 0 else None
        if "peak_bytes" in rec:
            rec["ratio_peak"] = rec["peak_bytes"] / floor["peak_bytes"]


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(payload: dict[str, Any]) -> str:
    """The Markdown table: one row per method, one column group per mode."""
    meta, cfg, runs = payload["meta"], payload["config"], payload["runs"]
    cuda = meta["device"] == "cuda"
    modes = list(runs)
    what = "step time / forward-live / peak step memory" if cuda else "step time / forward-live memory"
    model = ("tiny test config" if cfg["quick"] else "hidden 512, 8 layers, intermediate 1376, vocab 32k")
    how = "one process, wall clock" if cuda else "fresh process per method, process CPU time, 1 thread"
    lines = [
        f"**Decoder training cost** (LLaMA-like {model}, batch {cfg['batch']} x {cfg['seq']} tokens, causal-LM "
        f"loss; {what}, ratio to the floor of the same mode; {how}; median of {cfg['steps']} steps). "
        f"{meta['date']}; {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, peft "
        f"{meta['peft']}\n",
        "| method | trainable | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for m in cfg["methods"]:
        cells = []
        for mode in modes:
            r = runs[mode][m]
            cell = f"{_ratio(r['ratio_time'])} / {_ratio(r['ratio_live'])}"
            cells.append(cell + (f" / {_ratio(r['ratio_peak'])}" if cuda else ""))
        lines.append(f"| {LABELS[m]} | {runs[modes[0]][m]['trainable']:,} | " + " | ".join(cells) + " |")
    floors = []
    for mode in modes:
        f = runs[mode]["floor"]
        text = f"{mode} {f['time_s'] * 1e3:.1f} ms/step, " if cuda else f"{mode} {f['time_s']:.2f} s/step, "
        text += f"{f['live_bytes'] / MIB:,.0f} MiB forward-live"
        floors.append(text + (f", {f['peak_bytes'] / MIB:,.0f} MiB peak" if cuda else ""))
    lines.append("\nFloor: " + "; ".join(floors) + ".")
    return "\n".join(lines)


def machine(device: str) -> dict[str, Any]:
    import datetime as _dt
    import platform

    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()) + " CPU"
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "machine": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpu_count": os.cpu_count()}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=[f"{d}{'+ckpt' if c else ''}" for d, c in MODES],
                        choices=[f"{d}{'+ckpt' if c else ''}" for d, c in MODES])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=5, help="CUDA warm-up steps per method (CPU: always 1)")
    parser.add_argument("--quick", action="store_true", help="tiny config (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    if args._child:
        method, dtype, ckpt = args._child
        print(json.dumps(measure_cpu(method, dtype, ckpt == "1", args.quick, args.steps)))
        return {}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    methods = ["floor", *[m for m in args.methods if m != "floor"]]
    cfg = {"methods": methods, "modes": args.modes, "steps": args.steps, "quick": args.quick,
           "batch": CONFIGS[args.quick]["batch"], "seq": CONFIGS[args.quick]["seq"],
           "model": {k: v for k, v in CONFIGS[args.quick].items() if k not in ("batch", "seq")}}
    payload: dict[str, Any] = {"meta": machine(args.device), "config": cfg, "runs": {}}
    for mode in args.modes:
        dtype, ckpt = mode.split("+")[0], mode.endswith("+ckpt")
        if args.device == "cuda":
            runs = run_cuda(dtype, ckpt, methods, args.quick, args.steps, args.warmup)
        else:
            runs = {}
            for m in methods:
                runs[m] = run_cpu(m, dtype, ckpt, args.quick, args.steps)
                print(f"[{mode}] {m}: {runs[m]['live_bytes'] / MIB:,.1f} MiB forward-live, "
                      f"{_median(runs[m]['times_s']):.2f} s/step", file=sys.stderr, flush=True)
        add_ratios(runs)
        payload["runs"][mode] = runs
    name = "decoder_cost" + ("_cuda" if args.device == "cuda" else "")
    markdown = render(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{name}.md").write_text("<!-- generated by benchmarks/decoder_cost.py; do not edit by hand -->\n"
                                         + markdown + "\n")
    print(markdown, flush=True)
    return payload


if __name__ == "__main__":
    main()
