"""``peft-ssf analyze``: invariance report of fine-tuned models against their pretrained model, from local dirs.

    peft-ssf analyze --pretrained P --finetuned F [F2 ...] --images DIR --out DIR [--protocol cached|faithful]

Protocols (:mod:`~peft_ssf_analysis.protocol`): ``cached`` (default: 64 images, 100 steps, one X' per model and
source layer) and ``faithful`` (``--faithful``: the authors' settings, 500 images, 500 steps, fresh noise per STIR
cell). Explicit ``--n`` / ``--steps`` / ``--step-size`` / ``--size`` / ``--fresh-noise-per-cell`` override the
protocol and are recorded as overrides in the report.

Model dirs are loaded with the project's one loader (``peft_ssf.engine.load_model``): a checkpoint as its
image-classification class (or ``AutoModel``), a PEFT adapter dir (one with ``adapter_config.json``) onto its base
model (``base_model_name_or_path``, or ``--base``), merged. Images: a folder searched recursively for
png / jpg files, or a ``datasets`` directory written by ``save_to_disk``; they are resized (shorter side) and
centre-cropped with PIL + numpy, scaled to [0, 1], and the model's own normalisation is applied inside the analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .features import FINAL, LayerProbe, Normalization, _resolve, _view, eval_mode, layer_names, resolve_normalization
from .protocol import CACHED, FAITHFUL, PROTOCOLS
from .report import MIN_IMAGES, check_file_stems, check_settings, planned_inversions
from .stir import _device_of

__all__ = ["add_analyze_arguments", "default_name", "load_images", "load_model", "run_analyze"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SMALL_MODEL_PARAMS = 20 * 10**6  # below this, one CPU thread is the default (see --threads)
_SPLIT_PREFERENCE = ("test", "validation", "val", "valid", "eval")


class AnalyzeError(Exception):
    """A user-facing problem with the command line (bad path, non-empty --out, ...)."""


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``analyze`` options to ``parser`` (a sub-command parser of the ``peft-ssf`` console script).

    Long because it is one flat list of options, each with its help text."""
    p = parser
    p.add_argument("--pretrained", required=True, help="local dir of the pretrained model (or a PEFT adapter dir)")
    p.add_argument("--finetuned", required=True, nargs="+", help="local dirs of fine-tuned models or PEFT adapters")
    p.add_argument(
        "--names",
        nargs="+",
        help="report names of the fine-tuned models (default: the dir name, or its parent's for a generic dir name "
        "such as model/ or adapter/: out/ssf/adapter is 'ssf')",
    )
    p.add_argument("--images", required=True, help="image folder (recursive png/jpg) or a datasets save_to_disk dir")
    p.add_argument("--split", help="split of a DatasetDict / imagefolder (default: test, validation, val, ...)")
    p.add_argument("--image-column", help="image column of a datasets dir (default: the first Image feature)")
    p.add_argument("--out", required=True, help="output dir for report.json, CSVs and PNG heatmaps")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help=f"settings preset (default cached). cached: {CACHED.help()}. faithful: {FAITHFUL.help()}",
    )
    p.add_argument("--faithful", action="store_true", help=f"same as --protocol faithful: {FAITHFUL.help()}")
    p.add_argument("--n", type=int, help="number of images (overrides the protocol)")
    p.add_argument("--steps", type=int, help="inversion steps (overrides the protocol)")
    p.add_argument("--step-size", type=float, help="L2 length of each inversion step (overrides the protocol)")
    p.add_argument("--size", type=int, help="resize (shorter side) + centre-crop size (default: model image_size)")
    p.add_argument(
        "--fresh-noise-per-cell",
        action="store_true",
        default=None,
        help="new noise for every STIR cell (as --faithful does; L^2 (1+3m) instead of L (1+m) inversions)",
    )
    p.add_argument("--layers", nargs="+", help="layers to analyse (default: every block and 'final')")
    p.add_argument("--tokens", choices=("flatten", "cls", "mean"), default="flatten", help="token handling")
    p.add_argument("--tau", type=float, default=0.8, help="threshold of the shallowest-layer compression summary")
    p.add_argument("--reference", help="closeness reference model (default: first --finetuned)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the inversion noise")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mean", type=float, nargs="+", help="input normalisation mean (default: the model's processor)")
    p.add_argument("--std", type=float, nargs="+", help="input normalisation std (default: the model's processor)")
    p.add_argument("--unbiased", action="store_true", help="unbiased HSIC estimator in every CKA")
    p.add_argument(
        "--reverse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compute Q = STIR(P | F): inverts every fine-tuned model too (default: the protocol's; cached: "
        "off, faithful: on)",
    )
    p.add_argument(
        "--within",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compute the within-model matrices W (default: the protocol's; cached: off, faithful: on)",
    )
    p.add_argument("--base", help="base model dir for adapters whose base_model_name_or_path is not a local dir")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        help=f"torch CPU threads (default on a CPU: 1 for models under {SMALL_MODEL_PARAMS // 10**6}M parameters, "
        "whose small ops gain nothing from threads and lose up to 10x on a busy machine; else torch's default)",
    )
    p.add_argument("--no-plots", action="store_true", help="write JSON / CSV only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def load_model(path: str | Path, base: str | Path | None = None) -> nn.Module:
    """Load a local model dir, or a PEFT adapter dir merged into its base model, in eval mode.

    The project's one loader (:func:`peft_ssf.engine.load_model`) does the work; this adds the analysis CLI's
    error handling (a missing dir or base model is a usage error, exit status 2). It imports ``peft_ssf`` (which
    registers SSF with PEFT) when called, never at import time of this module.
    """
    from peft_ssf.engine import AdapterLoadError  # registers SSF with PEFT: needed to load SSF adapters
    from peft_ssf.engine import load_model as engine_load_model

    path = Path(path)
    if not path.is_dir():
        raise AnalyzeError(f"model dir not found: {path}")
    try:
        with _no_loading_bars():
            return engine_load_model(path, base, merge=True).eval()
    except AdapterLoadError as exc:
        raise AnalyzeError(str(exc)) from exc


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """Hide transformers' per-model "Loading weights" bars: stderr is for the analysis' own progress and errors."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _resize_center_crop(image: Any, size: int) -> torch.Tensor:
    """PIL image -> [3, size, size] float32 in [0, 1]: bilinear resize of the shorter side, then centre crop."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _open_image(file: Path, size: int) -> torch.Tensor:
    """One image file as [3, size, size] in [0, 1]; a file PIL cannot decode is a usage error naming the file."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            return _resize_center_crop(img, size)
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError; truncated files too
        raise AnalyzeError(f"cannot read image {file}: {exc}; remove or replace it") from exc


def _evenly_spaced(count: int, n: int) -> list[int]:
    if n >= count:
        return list(range(count))
    return [i * count // n for i in range(n)]


def _split_dir(root: Path, split: str | None) -> Path:
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    if split is not None:
        if split not in subdirs:
            raise AnalyzeError(f"split {split!r} not found under {root} (have: {sorted(subdirs)})")
        return subdirs[split]
    for name in _SPLIT_PREFERENCE:
        if name in subdirs:
            return subdirs[name]
    return root


def _is_datasets_dir(root: Path) -> bool:
    return any((root / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def load_images(
    source: str | Path, n: int, size: int, split: str | None = None, image_column: str | None = None
) -> torch.Tensor:
    """Load ``n`` images as [n, 3, size, size] in [0, 1].

    A ``datasets`` dir (``save_to_disk``): the first ``n`` rows of ``split`` (default: test, validation, ...), the
    paper's choice. An image folder: files sorted by path and, if there are more than ``n``, an evenly spaced
    subset (so a class-per-folder layout is not cut to its first classes); split subfolders are honoured as above.
    """
    root = Path(source)
    if not root.exists():
        raise AnalyzeError(f"images not found: {root}")
    if root.is_dir() and _is_datasets_dir(root):
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            chosen = split or next((s for s in _SPLIT_PREFERENCE if s in ds), names[0])
            if chosen not in ds:
                raise AnalyzeError(f"split {chosen!r} not in {names}")
            ds = ds[chosen]
        column = image_column or next(
            (k for k, f in ds.features.items() if isinstance(f, datasets.Image)),
            next((k for k in ("image", "img") if k in ds.column_names), None),
        )
        if column is None or column not in ds.column_names:
            raise AnalyzeError(f"no image column found in {root} (columns: {ds.column_names}); pass --image-column")
        rows = ds.select(range(min(n, len(ds))))
        try:
            images = [_resize_center_crop(img, size) for img in rows[column]]
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoding errors
            raise AnalyzeError(f"cannot decode an image of {root} (column {column!r}): {exc}") from exc
    elif root.is_dir():
        folder = _split_dir(root, split)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise AnalyzeError(f"no png/jpg images under {folder}")

        images = [_open_image(files[index], size) for index in _evenly_spaced(len(files), n)]
    else:
        raise AnalyzeError(f"--images must be a directory, got {root}")
    return torch.stack(images)


# --------------------------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------------------------


def _model_image_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


_GENERIC_DIRS = frozenset({"model", "adapter", "merged", "final", "best", "output", "outputs", "finetuned", "ckpt"})


def default_name(path: str | Path) -> str:
    """A report name for a model dir: its name, or for a generic name (``model``, ``adapter``, ``merged``,
    ``checkpoint-N``, ...) its parent's (``out/ssf/adapter`` -> ``ssf``, ``run/checkpoint-50`` -> ``run-50``); an
    adapter whose parent is generic too is named after its base model and method (``vit-tiny+ssf``)."""
    p = Path(path).resolve()
    leaf = p.name or "finetuned"
    step = leaf.split("-", 1)[1] if leaf.startswith("checkpoint-") else None
    if leaf.lower() not in _GENERIC_DIRS and step is None:
        return leaf
    parent = p.parent.name
    if parent and parent.lower() not in _GENERIC_DIRS:
        return parent if step is None else f"{parent}-{step}"
    try:
        config = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        base = Path(str(config["base_model_name_or_path"]).rstrip("/")).name
        return f"{base}+{str(config['peft_type']).lower()}"
    except (OSError, ValueError, KeyError, TypeError):
        return leaf


def _unique_names(paths: list[str], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise AnalyzeError(f"--names has {len(names)} entries for {len(paths)} --finetuned models")
        if len(set(names)) != len(names):
            raise AnalyzeError("--names must be unique")
        if any(not name.strip() for name in names):
            raise AnalyzeError("--names must not be empty")
        return names
    out: list[str] = []
    for p in paths:
        base = default_name(p)
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``peft-ssf analyze`` with parsed ``args``; returns the process exit code (0 ok, 2 usage error)."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    except AnalyzeError as exc:
        print(f"peft-ssf analyze: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # --threads (or its default) holds for this run only


def _check_out(args: argparse.Namespace) -> Path:
    """``--out`` must be a writable directory (or creatable), and empty unless ``--overwrite``. Writes nothing."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AnalyzeError(f"--out {out} exists and is not a directory; pick another --out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise AnalyzeError(f"--out {out} exists and is not empty; pass --overwrite to write into it")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AnalyzeError(f"cannot create --out {out}: {existing} is not a directory; pick another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AnalyzeError(f"--out {out} is not writable (no write permission on {existing}); pick another --out")
    return out


def _positive(name: str, value: float | None, integer: bool = True) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        kind = "a positive integer" if integer else "a finite number > 0"
        raise AnalyzeError(f"{name} must be {kind}, got {value}")


def _check_options(args: argparse.Namespace) -> None:
    """Numeric options that can be checked before any model is loaded (one usage error each)."""
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--size", args.size),
                        ("--threads", args.threads)):  # fmt: skip
        _positive(name, value)
    _positive("--step-size", args.step_size, integer=False)
    if args.n is not None and args.n < MIN_IMAGES:
        raise AnalyzeError(f"--n must be at least {MIN_IMAGES} (with fewer images CKA is not informative)")
    if not (math.isfinite(args.tau) and 0.0 <= args.tau <= 1.0):
        raise AnalyzeError(f"--tau must be a CKA threshold in [0, 1], got {args.tau}")
    for name, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and not all(math.isfinite(v) for v in values):
            raise AnalyzeError(f"{name} must be finite numbers, got {values}")


def _device(requested: str | None) -> torch.device:
    """The torch device to run on; an unknown or unavailable one is a usage error."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise AnalyzeError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from exc
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": lambda: torch.backends.mps.is_available(),
    }.get(device.type, lambda: True)
    if not available():
        raise AnalyzeError(f"--device {requested} is not available on this machine; use --device cpu")
    return device


def _check_layers(model: nn.Module, layers: list[str] | None) -> None:
    if not layers:
        return
    view = _view(model)
    for name in layers:
        try:
            _resolve(view, name)
        except ValueError as exc:
            raise AnalyzeError(f"--layers: {exc}") from exc


def _report_names(args: argparse.Namespace) -> list[str]:
    """Names of the fine-tuned models in the report ("pretrained" is taken by the pretrained model)."""
    names = _unique_names(args.finetuned, args.names)
    if "pretrained" in names:
        if args.names is not None:
            raise AnalyzeError("'pretrained' is the pretrained model's name in the report; pick another --names")
        names = [f"{n}_ft" if n == "pretrained" else n for n in names]
    try:
        check_file_stems(["pretrained", *names])
    except ValueError as exc:
        raise AnalyzeError(f"--names: {exc}") from exc
    if args.reference is not None and args.reference not in ["pretrained", *names]:
        raise AnalyzeError(
            f"--reference {args.reference!r} is not one of the report's models {['pretrained', *names]}"
        )
    return names


def _protocol_settings(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The chosen protocol resolved for ``model``, with the explicit flags as recorded overrides."""
    if args.faithful and args.protocol not in (None, FAITHFUL.name):
        raise AnalyzeError(f"--faithful contradicts --protocol {args.protocol}")
    protocol = PROTOCOLS[FAITHFUL.name if args.faithful else args.protocol or CACHED.name]
    given = {"n": args.n, "steps": args.steps, "step_size": args.step_size, "size": args.size,
             "fresh_noise_per_cell": args.fresh_noise_per_cell, "reverse": args.reverse,
             "within": args.within}  # fmt: skip
    settings = protocol.resolve(_model_image_size(model), **given)
    if settings["size"] is None:
        raise AnalyzeError("cannot tell the model's input size from its config; pass --size")
    return settings


def _seconds_per_pass(model: nn.Module, layer: str, batch: torch.Tensor, tokens: str, norm: Normalization) -> float:
    """Wall time of one inversion step (forward + backward to the pixels) on ``batch`` at ``layer``."""
    probe = LayerProbe(model, layer, tokens, norm)
    times = []
    with eval_mode(probe.view.model):
        for _ in range(3):  # the fastest of three: the first warms up allocators and kernels
            x = batch.clone().requires_grad_(True)
            started = time.perf_counter()
            torch.autograd.grad(probe(x).square().sum(), x)
            times.append(time.perf_counter() - started)
    return min(times[1:])


def _cost(models: dict[str, nn.Module], layers: list[str], images: torch.Tensor, protocol: dict[str, Any],
          args: argparse.Namespace, norm: Normalization) -> str:  # fmt: skip
    """What the run will cost, said before it starts: inversions x steps x batches, and a measured time estimate."""
    plan = planned_inversions(
        models, len(layers), reverse=protocol["reverse"], within=protocol["within"],
        fresh_noise_per_cell=protocol["fresh_noise_per_cell"],
    )  # fmt: skip
    n = images.shape[0]
    batch = min(args.batch_size, n)
    n_batches = math.ceil(n / batch)
    pretrained = next(iter(models.values()))
    blocks = len(_view(pretrained).blocks) or 1
    deepest = FINAL if FINAL in layers else layers[-1]
    seconds = _seconds_per_pass(pretrained, deepest, images[:batch], args.tokens, norm)
    threads = f", {torch.get_num_threads()} CPU thread(s)" if _device_of(pretrained).type == "cpu" else ""
    match = (re.fullmatch(r"block(\d+)", layers[k]) for _, k in plan)
    depth = sum((int(m.group(1)) + 1) / blocks if m else 1.0 for m in match)  # a cut pass costs its depth
    passes = len(plan) * protocol["steps"] * n_batches
    estimate = depth * protocol["steps"] * n_batches * seconds
    sources = len({name for name, _ in plan})
    return (
        f"analyze: {len(plan)} inversions ({sources} model(s) x {len(layers)} layers"
        f"{', one per STIR cell' if protocol['fresh_noise_per_cell'] else ''}) x {protocol['steps']} steps x "
        f"{n} images ({n_batches} batch(es) of {batch}) = {passes} forward+backward passes; about "
        f"{_duration(estimate)} here ({seconds * 1000:.0f} ms per pass to {deepest!r}{threads})"
    )


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.1f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


def _describe(protocol: dict[str, Any], images: torch.Tensor, norm: Normalization, device: torch.device) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in protocol["overrides"].items()) or "none"
    noise = "fresh noise per cell" if protocol["fresh_noise_per_cell"] else "cached X'"
    matrices = "R, C" + (", Q" if protocol["reverse"] else "") + (", W" if protocol["within"] else "")
    return (
        f"analyze: protocol {protocol['protocol']} (overrides: {overrides}): {images.shape[0]} images at "
        f"{protocol['size']} px, {protocol['steps']} steps of {protocol['step_size']}, {noise}, {matrices}; "
        f"normalisation from {norm.source}; device {device}"
    )


def _load_models(
    args: argparse.Namespace, names: list[str], device: torch.device
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The pretrained and fine-tuned models on ``device``; checks ``--layers`` and picks the default CPU threads."""
    pretrained = load_model(args.pretrained, args.base).to(device)
    small = sum(p.numel() for p in pretrained.parameters()) < SMALL_MODEL_PARAMS
    if args.threads is None and device.type == "cpu" and small:
        torch.set_num_threads(1)
    _check_layers(pretrained, args.layers)
    finetuned = {name: load_model(path, args.base).to(device) for name, path in zip(names, args.finetuned)}
    return pretrained, finetuned


def _load_enough_images(args: argparse.Namespace, protocol: dict[str, Any]) -> torch.Tensor:
    images = load_images(args.images, protocol["n"], protocol["size"], args.split, args.image_column)
    try:
        check_settings(n_images=images.shape[0])
    except ValueError as exc:
        raise AnalyzeError(f"{exc}; add images to {args.images}") from exc
    if images.shape[0] < protocol["n"]:
        print(f"note: only {images.shape[0]} images available (asked for {protocol['n']})", file=sys.stderr)
    return images


def _run(args: argparse.Namespace) -> int:
    from .report import compare

    out = _check_out(args)
    _check_options(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = _report_names(args)
    started = time.perf_counter()
    pretrained, finetuned = _load_models(args, names, device)
    protocol = _protocol_settings(args, pretrained)
    try:
        norm = resolve_normalization(pretrained, args.mean, args.std)
    except ValueError as exc:
        raise AnalyzeError(str(exc)) from exc
    images = _load_enough_images(args, protocol)
    layers = list(args.layers) if args.layers else layer_names(pretrained)
    print(_describe(protocol, images, norm, device), file=sys.stderr)
    print(_cost({"pretrained": pretrained, **finetuned}, layers, images, protocol, args, norm), file=sys.stderr)
    report = compare(
        pretrained,
        finetuned,
        images,
        layers=layers,
        tokens=args.tokens,
        steps=protocol["steps"],
        step_size=protocol["step_size"],
        seed=args.seed,
        batch_size=args.batch_size,
        mean=norm.mean,
        std=norm.std,
        tau=args.tau,
        unbiased=args.unbiased,
        reverse=protocol["reverse"],
        within=protocol["within"],
        reference=args.reference,
        fresh_noise_per_cell=protocol["fresh_noise_per_cell"],
        progress=not args.quiet,
    )
    report.settings.update(_cli_settings(args, names, protocol, norm))
    written = sorted(set(report.save(out, plots=False if args.no_plots else None)))
    print(report.summary())
    print(
        f"wrote {len(written)} files to {out} in {time.perf_counter() - started:.1f} s "
        f"({report.inversions_performed} inversions; {report.inversions_without_cache} without the cache)"
    )
    return 0


def _cli_settings(
    args: argparse.Namespace, names: list[str], protocol: dict[str, Any], norm: Normalization
) -> dict[str, Any]:
    """What the command line adds to ``report.settings``: paths, and the protocol with its overrides."""
    return {
        "pretrained_path": str(args.pretrained),
        "finetuned_paths": dict(zip(names, args.finetuned)),
        "images": str(args.images),
        "size": protocol["size"],
        "faithful": protocol["protocol"] == FAITHFUL.name and not protocol["overrides"],
        "protocol": protocol,
        "normalization": norm.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m peft_ssf_analysis.cli``); the ``peft-ssf`` script wires its own."""
    parser = argparse.ArgumentParser(prog="peft-ssf analyze", description=__doc__.splitlines()[0])
    add_analyze_arguments(parser)
    return run_analyze(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
