"""Training cost of SSF against other PEFT methods: step time, saved activations and peak step memory.

Methods (classifier head trainable for all of them): ``floor`` (everything frozen except one bias in the first block,
so backward still runs through every block: the least any method in the first block can cost), ``full``, ``lora``
(r=8 on q,v), ``ia3`` (k,v,fc2), ``ln_tuning``, ``ssf_naive`` (SSFConfig(fused=False)), ``ssf_unpaired``
(SSFConfig(pair_residuals=False)) and ``ssf_fused`` (the default). All methods of a model live in one process and
share the frozen weights; steps are interleaved, medians are taken after warm-up, ratios are to the floor. Per SSF
site type the script also reports the bytes saved for backward by the SSF op alone (nothing else saves them).

Usage:
    python -m benchmarks.train_cost                               # ViT-B/16, Swin-B, ConvNeXt-B @224, batch 8, CPU
    python -m benchmarks.train_cost --families vit --steps 3      # one model, fewer steps
    python -m benchmarks.train_cost --methods floor ssf_unpaired ssf_fused
    python -m benchmarks.train_cost --device cuda --dtype bf16 --batch 64
    python -m benchmarks.train_cost --quick                       # tiny configs (smoke test)
    python -m benchmarks.train_cost --op-costs                    # per-site cost of the SSF ops alone (op_costs.*)
    python -m benchmarks.train_cost --update-peaks                # re-measure only the peaks of train_cost.json
    python -m benchmarks.train_cost --combine /tmp/a /tmp/b       # merge per-model runs made in parallel into --out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import common as C
from . import forward_memory


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure every method on one model; returns the JSON record of that model."""
    spec = C.model_spec(family, args.quick)
    base = C.build_model(family, image_size=args.image_size, quick=args.quick)
    x, y = C.make_batch(args.batch, args.image_size, args.device)
    load_start = os.getloadavg()[0]
    trainers = {m: C.Trainer(C.prepare(m, base, family), args.device, args.dtype, compile=args.compile)
                for m in args.methods}
    del base
    # saved-tensor hooks and dispatch modes do not see inside compiled graphs: compiled runs report live memory only
    eager = not args.compile
    log(f"[{spec.label}] saved activations ...")
    reports = {m: (C.saved_activations(tr.model, lambda tr=tr: tr.forward_loss(x, y)) if eager else None)
               for m, tr in trainers.items()}
    grad_error = None
    if eager and "ssf_unpaired" in trainers and "ssf_fused" in trainers:
        grad_error = C.gradient_error(trainers["ssf_unpaired"], trainers["ssf_fused"], x, y)
        log(f"[{spec.label}] paired vs unpaired SSF gradients: max rel. difference {grad_error:.2e}")
    log(f"[{spec.label}] timing {len(trainers)} methods x ({args.warmup} warm-up + {args.steps}) steps ...")
    jobs = {m: (lambda tr=tr: tr.step(x, y)) for m, tr in trainers.items()}
    times, wall = C.interleaved_times(jobs, args.warmup, args.steps, args.device)
    log(f"[{spec.label}] peak memory ...")
    peaks = {m: (C.step_peak_bytes(tr, x, y, rss=args.rss) if eager else (None, None)) for m, tr in trainers.items()}
    live = forward_live(family, args)
    methods: dict[str, Any] = {}
    for m, tr in trainers.items():
        t = C.median(times[m])
        methods[m] = {
            "trainable": C.trainable_params(tr.model),
            "time_s": t,
            "times_s": times[m],
            "wall_s": wall[m],
            "images_per_s": args.batch / t,
            "saved_bytes": reports[m].total_bytes if reports[m] else None,
            "peak_bytes": peaks[m][0],
            "rss_delta_bytes": peaks[m][1],
            "live_bytes": live.get(m),
        }
    floor = methods.get("floor")

    def ratio(r: dict[str, Any], key: str) -> float | None:
        return r[key] / floor[key] if floor and r.get(key) is not None and floor.get(key) else None

    for r in methods.values():
        for key, name in (("time_s", "ratio_time"), ("saved_bytes", "ratio_saved"), ("peak_bytes", "ratio_peak"),
                          ("live_bytes", "ratio_live")):
            r[name] = ratio(r, key)
    sites: dict[str, dict[str, Any]] = {}
    for m in C.SSF_VARIANTS:
        if reports.get(m) is None:
            continue
        for role, count in reports[m].ssf_sites.items():
            sites.setdefault(role, {"sites": count})[m] = reports[m].ssf_only_bytes.get(role, 0)
    return {
        "model": spec.label,
        "family": family,
        "load_avg_1m": [load_start, os.getloadavg()[0]],
        "pairing_grad_rel_diff": grad_error,
        "residual_pairs": _residual_pairs(trainers.get("ssf_fused")),
        "methods": methods,
        "ssf_only_saved_bytes_by_site": sites,
    }


def _residual_pairs(trainer: C.Trainer | None) -> int | None:
    """Residual sites the default SSF op paired in its last training forward (None: not measured, or compiled)."""
    return None if trainer is None else getattr(trainer.model.base_model, "residual_pairs", None)


def forward_live(family: str, args: argparse.Namespace) -> dict[str, int]:
    """Forward-live memory of every method, each in a fresh process (CPU only; see ``forward_memory.py``)."""
    if torch_device_type(args.device) != "cpu" or args.no_live:
        return {}
    log(f"[{family}] forward-live memory (fresh process per method) ...")
    return {m: forward_memory.measure(family, m, args.dtype, batch=args.batch, image_size=args.image_size,
                                      quick=args.quick, compile=args.compile, threads=args.threads or 1)
            for m in args.methods}


def torch_device_type(device: str) -> str:
    return device.split(":")[0]


def results_name(cfg: dict[str, Any]) -> str:
    """``train_cost`` for float32 eager runs, else ``train_cost_<dtype>[_compiled]``."""
    suffix = "" if cfg.get("dtype", "fp32") == "fp32" else f"_{cfg['dtype']}"
    suffix += "_compiled" if cfg.get("compile") else ""
    suffix += "_cuda" if torch_device_type(cfg.get("device", "cpu")) == "cuda" else ""
    return "train_cost" + suffix


def update_peaks(args: argparse.Namespace) -> dict[str, Any]:
    """Re-measure only the peak step memory of an existing ``train_cost.json`` (deterministic, so a separate process
    is fine) and re-render its Markdown; used after a change to the peak tracker."""
    path = args.out / "train_cost.json"
    payload = json.loads(path.read_text())
    cfg = payload["config"]
    for family, run in payload["runs"].items():
        if family not in args.families:
            continue
        base = C.build_model(family, image_size=cfg["image_size"], quick=cfg["quick"])
        x, y = C.make_batch(cfg["batch"], cfg["image_size"], args.device)
        for method, rec in run["methods"].items():
            trainer = C.Trainer(C.prepare(method, base, family), args.device, cfg["dtype"])
            trainer.step(x, y)  # optimizer state exists before the measured step, as in the main run
            rec["peak_bytes"], rss = C.step_peak_bytes(trainer, x, y, rss=args.rss)
            rec["rss_delta_bytes"] = rss if args.rss else rec.get("rss_delta_bytes")
            log(f"[{run['model']}] {method}: peak {rec['peak_bytes'] / C.MIB:,.0f} MiB")
            del trainer
        floor = run["methods"]["floor"]["peak_bytes"]
        for rec in run["methods"].values():
            rec["ratio_peak"] = rec["peak_bytes"] / floor
        payload.setdefault("peak_remeasured", {})[family] = C.machine_info(args.device, cfg["dtype"])["date"]
    write_payload(args.out, payload)
    return payload


def combine(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Merge the results of runs made separately (e.g. one model per process) into ``out``.

    Each directory holds one training-cost results file (``train_cost*.json``). The runs must share batch, image
    size, device, precision and compilation; each model keeps its own measurement date and method list (a method a
    run did not measure shows as ``-``).
    """
    payloads = [json.loads(_results_file(d).read_text()) for d in dirs]
    keys = ("batch", "image_size", "device", "dtype", "compile")
    first = payloads[0]
    for other, d in zip(payloads[1:], dirs[1:]):
        diff = [k for k in keys if other["config"].get(k) != first["config"].get(k)]
        if diff:
            raise SystemExit(f"cannot combine {d}: its {', '.join(diff)} differ from {dirs[0]}'s")
    measured = {m for p in payloads for m in p["config"]["methods"]}
    config = {**first["config"], "methods": [m for m in C.METHODS if m in measured]}
    merged = {"meta": first["meta"], "config": config, "runs": {}}
    for payload in payloads:
        for family, run in payload["runs"].items():
            run.setdefault("meta", payload["meta"])
            merged["runs"][family] = run
    order = [f for f in C.ALL_FAMILIES if f in merged["runs"]]
    merged["runs"] = {f: merged["runs"][f] for f in order}
    write_payload(out, merged)
    return merged


def _results_file(directory: Path) -> Path:
    """The one ``train_cost*.json`` in ``directory`` (an error naming the directory otherwise)."""
    found = sorted(directory.glob("train_cost*.json"))
    if len(found) != 1:
        raise SystemExit(f"{directory}: expected one train_cost*.json results file, found {len(found)}")
    return found[0]


def write_payload(out: Path, payload: dict[str, Any]) -> None:
    """Write ``<results_name>.json`` / ``.md`` from a payload."""
    cfg = payload["config"]
    sections = [family_markdown(run, cfg) for run in payload["runs"].values()]
    markdown = f"## Training cost\n\n{C.train_summary_markdown(payload)}\n\n" + "\n\n".join(sections)
    C.write_results(out, results_name(cfg), payload, markdown, "train_cost.py")


def family_markdown(run: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Full table of one model plus the per-site breakdown."""
    lines = [
        f"### {run['model']} (batch {cfg['batch']} @ {cfg['image_size']}px, {C.mode_label(cfg)})\n",
        "| method | trainable | s/step | img/s | time | forward-live MiB | forward-live | saved MiB | saved | "
        "peak MiB | peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in run["methods"].items():
        lines.append(
            f"| {C.METHOD_LABELS.get(m, m)} | {r['trainable']:,} | {r['time_s']:.2f} | {r['images_per_s']:.2f} | "
            f"{C.fmt_ratio(r['ratio_time'])} | {C.fmt_mib(r.get('live_bytes'))} | {C.fmt_ratio(r.get('ratio_live'))} "
            f"| {C.fmt_mib(r['saved_bytes'])} | {C.fmt_ratio(r['ratio_saved'])} | "
            f"{C.fmt_mib(r['peak_bytes'])} | {C.fmt_ratio(r['ratio_peak'])} |"
        )
    sites = run["ssf_only_saved_bytes_by_site"]
    floor = run["methods"].get("floor")
    if sites and floor:
        variants = [m for m in C.SSF_VARIANTS if m in run["methods"]]
        lines += [
            "",
            "Bytes saved for backward by the SSF op alone (no other op saves the same storage), per site type; "
            "% of the floor's saved activations:",
            "",
            "| site | sites | " + " | ".join(C.METHOD_LABELS[m].split(" (")[0] for m in variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        zero = sorted(role for role, rec in sites.items() if not any(rec.get(m, 0) for m in variants))
        for role, rec in sorted(sites.items(), key=lambda kv: -max(kv[1].get(m, 0) for m in variants)):
            if role in zero:
                continue
            cells = [
                f"{C.fmt_mib(rec.get(m, 0))} MiB ({100 * rec.get(m, 0) / floor['saved_bytes']:.1f}%)" for m in variants
            ]
            lines.append(f"| `{role}` | {rec['sites']} | " + " | ".join(cells) + " |")
        if zero:
            lines.append("\nNo SSF-only saved bytes at: " + ", ".join(f"`{r}`" for r in zero) + ".")
    if run.get("pairing_grad_rel_diff") is not None:
        lines.append(
            f"\nSSF parameter gradients with vs without residual pairing: max relative difference "
            f"{run['pairing_grad_rel_diff']:.1e}."
        )
    lines.append(f"\nLoad average (1 min) at start / end: {run['load_avg_1m'][0]:.1f} / {run['load_avg_1m'][1]:.1f}.")
    return "\n".join(lines)


OP_VARIANTS = ("naive", "fused")


def _site_step(kind: str, linear: Any, x: Any, scale: Any, shift: Any) -> None:
    """Forward + backward of one frozen Linear followed by the SSF op ``kind`` (or nothing)."""
    import torch

    from peft_ssf.ops import scale_shift_fused, scale_shift_naive

    if kind == "linear only":
        y = linear(x)
    elif kind == "naive":
        y = scale_shift_naive(linear(x), scale, shift)
    else:
        y = scale_shift_fused(linear(x), scale, shift)
    y.backward(torch.ones_like(y))
    x.grad = scale.grad = shift.grad = None


def op_costs(args: argparse.Namespace) -> dict[str, Any]:
    """Extra time of each SSF op variant over a frozen Linear's forward + input-gradient, per ViT-B site shape."""
    import torch

    tokens = args.batch * (197 if not args.quick else 17)
    shapes = [(32, 32), (32, 64), (64, 32)] if args.quick else [(768, 768), (768, 3072), (3072, 768)]
    kinds = ("linear only", *OP_VARIANTS)
    rows = []
    for cin, cout in shapes:
        torch.manual_seed(0)
        linear = torch.nn.Linear(cin, cout).requires_grad_(False).to(args.device)
        x = torch.randn(tokens, cin, device=args.device, requires_grad=True)
        scale = torch.nn.Parameter(1 + 0.02 * torch.randn(cout, device=args.device))
        shift = torch.nn.Parameter(0.02 * torch.randn(cout, device=args.device))
        jobs = {k: (lambda k=k, a=(linear, x, scale, shift): _site_step(k, *a)) for k in kinds}
        times, _ = C.interleaved_times(jobs, args.warmup + 1, 3 * args.steps, args.device)
        base = C.median(times["linear only"])
        rows.append({"in": cin, "out": cout, "tokens": tokens, "linear_ms": 1e3 * base,
                     "extra_ms": {k: 1e3 * (C.median(times[k]) - base) for k in OP_VARIANTS}})
    lines = [
        f"Extra time of the SSF op over a frozen Linear (forward + input gradient), {tokens} tokens, median of "
        f"{3 * args.steps} interleaved rounds. " + C.meta_line(C.machine_info(args.device, args.dtype)) + "\n",
        "| Linear | linear ms | " + " | ".join(OP_VARIANTS) + " |",
        "|---|---|" + "---|" * len(OP_VARIANTS),
    ]
    for r in rows:
        cells = [f"{r['extra_ms'][k]:+.1f} ms ({100 * r['extra_ms'][k] / r['linear_ms']:+.1f}%)" for k in OP_VARIANTS]
        lines.append(f"| {r['in']} -> {r['out']} | {r['linear_ms']:.1f} | " + " | ".join(cells) + " |")
    payload = {"meta": C.machine_info(args.device, args.dtype), "rows": rows}
    C.write_results(args.out, "op_costs", payload, "## SSF op cost per site\n\n" + "\n".join(lines),
                    "train_cost.py --op-costs")
    print("\n".join(lines))
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=list(C.FAMILIES), choices=C.ALL_FAMILIES)
    parser.add_argument("--methods", nargs="+", default=list(C.METHODS), choices=C.METHODS)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default 5, 1 with --quick)")
    parser.add_argument("--op-costs", action="store_true", help="only time the SSF ops per ViT-B site shape")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="merge the train_cost.json files of these directories into --out (no measuring)")
    parser.add_argument("--no-live", action="store_true",
                        help="skip the forward-live memory column (a fresh process per method and model)")
    parser.add_argument("--update-peaks", action="store_true",
                        help="only re-measure the peak step memory of the families in an existing train_cost.json")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    C.setup(args)
    args.batch = args.batch or (2 if args.quick else 8)
    args.image_size = args.image_size or (32 if args.quick else 224)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or (1 if args.quick else 5)
    if args.op_costs:
        return op_costs(args)
    if args.update_peaks:
        return update_peaks(args)
    if "floor" not in args.methods:
        args.methods = ["floor", *args.methods]
    keys = ("batch", "image_size", "warmup", "steps", "device", "dtype", "compile", "quick")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["methods"] = args.methods
    payload: dict[str, Any] = {"meta": C.machine_info(args.device, args.dtype), "config": cfg, "runs": {}}
    for family in args.families:
        run = run_family(family, args)
        payload["runs"][family] = run
        print(family_markdown(run, cfg) + "\n", flush=True)
        write_payload(args.out, payload)  # after every model: a crash keeps what was done
    log(f"wrote {args.out}/{results_name(cfg)}.json and .md")
    return payload


if __name__ == "__main__":
    main()
