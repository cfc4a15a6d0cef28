"""Transfer benchmark: does SSF, through this plugin, adapt a pretrained backbone as well as the alternatives?

Setup: the demo ViT (``peft_ssf/demo/backbone``, pretrained on the synthetic ``scenes`` source task by
``scripts/pretrain_backbone.py``) is adapted to the target tasks of ``peft_ssf.demo.data`` (``TARGET_TASKS``: real
handwritten digits and synthetic texture, counting, orientation, position and relation tasks). Each task is written
once as a ``datasets`` imagefolder (``make_task``), read back with ``load_task`` and kept in memory as pixel values
normalised by the engine (``engine.image_normalization`` / ``to_pixel_values``: the backbone's image processor).

Methods: the engine's table (``peft_ssf.engine.methods``, built with ``engine.build_model``): SSF with identity and
with paper init, LoRA, IA3, LN-tuning, BitFit (optional, not in the default set), head only, full fine-tuning. The
head-only runs train the linear head on the frozen backbone's head inputs, computed once per task and worker
(``engine.head_inputs``: same maths, the backbone has no dropout).

Protocol (identical for every method): the engine's recipe and loop (``engine.fit``): AdamW (betas 0.9 / 0.999),
weight decay 0.05 on the classifier head's weight matrix only (0 on everything else: decaying an SSF / IA3 scale
pulls it towards 0, not towards the identity), batch 32 with the last partial batch kept, the same number of epochs
for everyone, linear warm-up over the first 10 % of the steps then cosine decay to 0, gradient-norm clip 1.0, no
augmentation (flips and shifts change the labels of ``orientation`` and ``position``), cross-entropy without
smoothing. Learning rate: a grid per method (``LR_GRID``) on the half-decade ``LADDER``; for each (task, method) the
grid is run with seed 0 and the value with the best *final-epoch* validation accuracy is selected (ties: lower
validation loss, then the smaller rate); a selected rate at an edge of the grid adds the next ladder rate beyond that
edge, until none is at an edge. Seeds 0, 1, 2 are then reported at that rate (seed 0 is the grid run itself). The
seed sets the head's initialisation, the paper-init SSF draw, LoRA's A init and the batch order; the data are the
same for all seeds. Every number reported is from the model at the end of training: validation accuracy of the
selected configuration and test accuracy of that same final model. The test split is never used to choose anything.

    HF_HUB_OFFLINE=1 python benchmarks/transfer.py              # full suite: results/transfer.{json,md,png}
    HF_HUB_OFFLINE=1 python benchmarks/transfer.py --smoke --out /tmp/t   # one task, one seed, 1 epoch, tiny data
    python benchmarks/transfer.py --render                      # re-render .md / .png from results/transfer.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from peft_ssf import engine  # noqa: E402
from peft_ssf.io import atomic_write  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

#: initial learning-rate grid per method (the head and the adapter share one rate), on the half-decade LADDER; a grid
#: whose best rate is at an edge is widened by the next ladder value beyond that edge until it is not (see run_suite),
#: so 3 starting values are enough to guarantee an interior selected rate
LR_GRID: dict[str, tuple[float, ...]] = {
    "ssf": (3e-3, 1e-2, 3e-2),
    "ssf_paper_init": (3e-3, 1e-2, 3e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "ia3": (3e-3, 1e-2, 3e-2),
    "ln_tuning": (3e-3, 1e-2, 3e-2),
    "bitfit": (3e-3, 1e-2, 3e-2),
    "head": (3e-3, 1e-2, 3e-2),
    "full": (1e-4, 3e-4, 1e-3),
}
LADDER: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 3))  # 1e-7 ... 3
LR_BOUNDS = (1e-6, 1.0)  # widening never goes beyond these
DEFAULT_EPOCHS = 10  # pilots: within ~2 validation points of 30 epochs on the demo backbone (docs/transfer.md)
#: tasks that train longer than DEFAULT_EPOCHS (every method alike), set by the convergence check: at 10 epochs four
#: methods still gained 2.2-2.8 validation points on orientation when trained 3x as long (docs/transfer.md)
TASK_EPOCHS: dict[str, int] = {"orientation": 20}
LONGER_FACTOR = 3  # the convergence check retrains the selected configurations for this many times the epochs
#: a selected configuration counts as converged when the longer schedule does not raise its validation accuracy by
#: more than this many points (about 6 validation images of 300; the suite's seed spreads are 0.1-4 points)
CONVERGED_POINTS = 2.0
N_CURVE_POINTS = 10  # validation accuracy is recorded at about this many epochs of every run
DEFAULT_METHODS = ("ssf", "ssf_paper_init", "lora", "ia3", "ln_tuning", "head", "full")
METHOD_LABELS = engine.METHODS  # the engine's one label table
RECORD_KEYS = ("task", "method", "seed", "trainable_params", "val_acc", "test_acc", "train_seconds")
WEIGHT_DECAY = 0.05
WARMUP_FRAC = 0.1
CLIP_NORM = 1.0
SMOKE_SIZES = {"n_train": 4, "n_val": 2, "n_test": 2}  # images per class


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """Everything that defines a run apart from (task, method, lr, seed); the resume key (without the path)."""

    backbone: str  # a private snapshot of the checkpoint, so a concurrent rewrite cannot mix two backbones
    backbone_sha256: str
    epochs: int
    batch_size: int
    n_train: int | None
    n_val: int | None
    n_test: int | None
    data_seed: int
    data_sha256: tuple[tuple[str, str], ...]  # (task, digest of its arrays): the generators may change
    task_epochs: tuple[tuple[str, int], ...] = ()  # (task, epochs) where a task trains longer than ``epochs``

    def epochs_for(self, task: str) -> int:
        """Epochs of ``task``'s runs (the same for every method)."""
        return dict(self.task_epochs).get(task, self.epochs)

    def longer(self, factor: int) -> Protocol:
        """This protocol with every task's epochs multiplied by ``factor`` (the convergence check)."""
        return replace(self, epochs=factor * self.epochs,
                       task_epochs=tuple((t, factor * e) for t, e in self.task_epochs))

    def key(self, task: str) -> str:
        """Resume key of ``task``'s runs: every field but the snapshot path, with that task's epochs and only its data
        digest (so a task's runs stay valid when another task's epochs or data change)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("backbone", "data_sha256", "task_epochs")}
        fields["epochs"] = self.epochs_for(task)
        fields["data"] = dict(self.data_sha256)[task]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def backbone_digest(backbone: Path) -> str:
    """sha256 of the backbone's weights file (identifies the checkpoint a result was measured on)."""
    weights = backbone / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "missing"


def count_checkpoint_params(weights: Path) -> int:
    """Number of parameters stored in a safetensors file (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def load_task_arrays(
    task: str, root: Path, seed: int, sizes: dict[str, int | None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write ``task`` as an imagefolder under ``root`` (reused if present), load it with ``datasets``.

    Returns ``{split: (uint8 images [N, 32, 32, 3], int64 labels [N])}`` for train / validation / test.
    """
    import datasets
    import numpy as np

    from peft_ssf.demo import load_task, make_task

    datasets.disable_progress_bars()
    make_task(task, root, seed=seed, **sizes)
    ds = load_task(task, root, cache_dir=str(root / ".hf_datasets_cache"))
    out = {}
    for split in ("train", "validation", "test"):
        part = ds[split]
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in part["image"]])
        out[split] = (torch.from_numpy(images), torch.tensor(part["label"], dtype=torch.int64))
    return out


def arrays_digest(splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 of a task's images and labels in every split (identifies the exact data a result was measured on)."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for t in splits[split]:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run."""

    task: str
    method: str
    lr: float
    seed: int


_WORKER: dict[str, Any] = {}  # per-process state: data, protocol, threads


def init_worker(data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], protocol: Protocol,
                num_labels: dict[str, int], threads: int) -> None:
    """Process initialiser: pin the thread count, quiet transformers, keep the normalised task tensors."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    norm = engine.image_normalization(protocol.backbone)
    _WORKER["data"] = {t: {s: (engine.to_pixel_values(x, norm), y) for s, (x, y) in splits.items()}
                       for t, splits in data.items()}
    _WORKER["protocol"] = protocol
    _WORKER["num_labels"] = num_labels


def train_loop(model: nn.Module, forward: Any, x: torch.Tensor, y: torch.Tensor, job: Job, protocol: Protocol,
               curve: list | None = None, curve_data: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[float, int, tuple[float, float]]:
    """``engine.fit`` with the benchmark's recipe; ``forward(xb)`` returns logits.

    With ``curve`` (a list) and ``curve_data`` (validation x, y), appends ``[epoch, validation accuracy]`` at about
    ``N_CURVE_POINTS`` evenly spaced epochs, the last one included. Returns (mean train loss of the last epoch,
    steps, (wall, CPU) seconds spent on those evaluations, which callers subtract from the training time).
    """
    epochs = protocol.epochs_for(job.task)
    recipe = engine.Recipe(epochs=epochs, batch_size=protocol.batch_size, lr=job.lr,
                           weight_decay=WEIGHT_DECAY, warmup=WARMUP_FRAC, clip_norm=CLIP_NORM, seed=job.seed)
    every = max(1, round(epochs / N_CURVE_POINTS))
    spent = [0.0, 0.0]

    def on_epoch(epoch: int, _loss: float) -> None:
        if curve is None or curve_data is None or not (epoch % every == 0 or epoch == epochs):
            return
        t0, c0 = time.perf_counter(), time.process_time()
        model.eval()
        curve.append([epoch, round(engine.evaluate(forward, *curve_data)[0], 4)])
        model.train()
        spent[0], spent[1] = spent[0] + time.perf_counter() - t0, spent[1] + time.process_time() - c0

    out = engine.fit(model, x, y, recipe, forward=forward, on_epoch=on_epoch)
    return out["train_loss"], out["steps"], (spent[0], spent[1])


def head_features(model: nn.Module, task: str, data: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """The frozen backbone's classifier input per split (``engine.head_inputs``), cached per worker and task.

    Returns (features, (wall, CPU) seconds of the train split's forward pass).
    """
    cache = _WORKER.setdefault("features", {})
    if task not in cache:
        feats, seconds = {}, (0.0, 0.0)
        for split, (x, _) in data.items():
            t0, c0 = time.perf_counter(), time.process_time()
            feats[split] = engine.head_inputs(model, x)
            if split == "train":
                seconds = (time.perf_counter() - t0, time.process_time() - c0)
        cache[task] = (feats, seconds)
    return cache[task]


def run_job(job: Job) -> dict[str, Any]:
    """Train one (task, method, lr, seed) and evaluate the final model on validation and test: the run's record."""
    return train_job(job)[1]


def train_job(job: Job) -> tuple[nn.Module, dict[str, Any]]:
    """Like :func:`run_job`, and also returns the trained model (in a worker set up by :func:`init_worker`)."""
    protocol: Protocol = _WORKER["protocol"]
    data = _WORKER["data"][job.task]
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data["train"], data["validation"], data["test"]
    labels = {i: str(i) for i in range(_WORKER["num_labels"][job.task])}
    model = engine.build_model(job.method, protocol.backbone, labels, job.seed)
    trainable, head_params = engine.count_trainable(model)
    curve: list[list[float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    if job.method == "head":  # frozen backbone without dropout: train the head on its features, computed once
        feats, feat_seconds = head_features(model, job.task, data)
        head = getattr(model, engine.head_name(model))
        t0, c0 = time.perf_counter(), time.process_time()
        train_loss, steps, ev = train_loop(model, head, feats["train"], y_tr, job, protocol, curve,
                                           (feats["validation"], y_va))
        # charge the train split's feature pass to every run
        seconds = feat_seconds[0] + time.perf_counter() - t0 - ev[0]
        cpu_seconds = feat_seconds[1] + time.process_time() - c0 - ev[1]
        val_acc, val_loss = engine.evaluate(head, feats["validation"], y_va)
        test_acc, _ = engine.evaluate(head, feats["test"], y_te)
    else:
        def logits(xb: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=xb).logits

        train_loss, steps, ev = train_loop(model, logits, x_tr, y_tr, job, protocol, curve, (x_va, y_va))
        seconds, cpu_seconds = time.perf_counter() - t0 - ev[0], time.process_time() - c0 - ev[1]
        val_acc, val_loss = engine.evaluate(logits, x_va, y_va)
        test_acc, _ = engine.evaluate(logits, x_te, y_te)
    return model, {
        "task": job.task, "method": job.method, "seed": job.seed, "trainable_params": trainable,
        "val_acc": round(val_acc, 4), "test_acc": round(test_acc, 4), "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2), "lr": job.lr, "head_params": head_params,
        "val_loss": round(val_loss, 4), "train_loss": round(train_loss, 4), "steps": steps, "n_train": len(y_tr),
        "val_curve": curve,
    }


# ----------------------------------------------------------------------------------------------------------------
# the suite: LR grid on seed 0, then the other seeds at the selected rate
# ----------------------------------------------------------------------------------------------------------------


def select_lr(runs: Iterable[dict[str, Any]]) -> float:
    """Best final validation accuracy; ties -> lower validation loss, then the smaller learning rate."""
    return min(runs, key=lambda r: (-r["val_acc"], r["val_loss"], r["lr"]))["lr"]


def widen_grid(grid: Sequence[float], selected: float) -> float | None:
    """The next LADDER rate beyond the edge of ``grid`` that ``selected`` sits on; None if interior or at a bound."""
    if selected == min(grid):
        below = [v for v in LADDER if v < selected * 0.99 and v >= LR_BOUNDS[0]]
        return max(below) if below else None
    if selected == max(grid):
        above = [v for v in LADDER if v > selected * 1.01 and v <= LR_BOUNDS[1]]
        return min(above) if above else None
    return None


def _load_log(path: Path | None, protocol: Protocol, tasks: Sequence[str]) -> dict[tuple, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    keys = {t: protocol.key(t) for t in tasks}
    done = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("task") in keys and rec.get("protocol") == keys[rec["task"]]:
            done[(rec["task"], rec["method"], rec["lr"], rec["seed"])] = rec
    return done


def _append_run(runs_log: Path | None, rec: dict[str, Any], key: str) -> None:
    """Append a finished run to the runs log (one JSON line, tagged with its protocol key), if there is one."""
    if runs_log is not None:
        with runs_log.open("a") as f:
            f.write(json.dumps({**rec, "protocol": key}) + "\n")


def execute(args: argparse.Namespace, protocol: Protocol, data: dict, num_labels: dict[str, int],
            jobs: list[Job], done: dict[tuple, dict[str, Any]],
            on_done: Callable[[Job, dict[str, Any], bool], list[Job]]) -> None:
    """Run ``jobs`` and every job ``on_done(job, record, cached)`` returns, reusing ``done`` (the runs log).

    Workers <= 1 (the smoke test): in this process, restoring what ``init_worker`` changes afterwards; otherwise a
    spawn process pool, each worker set up once with the normalised data and ``protocol``.
    """
    def cached(job: Job) -> dict[str, Any] | None:
        rec = done.get((job.task, job.method, job.lr, job.seed))
        return None if rec is None else {k: v for k, v in rec.items() if k != "protocol"}

    queue = list(jobs)
    if args.workers <= 1:
        from transformers.utils import logging as hf_logging

        threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        try:
            with warnings.catch_warnings():
                init_worker(data, protocol, num_labels, args.threads)
                while queue:
                    job = queue.pop(0)
                    rec = cached(job)
                    queue.extend(on_done(job, run_job(job) if rec is None else rec, rec is not None))
        finally:
            torch.set_num_threads(threads)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            _WORKER.clear()
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=init_worker,
                                initargs=(data, protocol, num_labels, args.threads)) as pool:
        futures: dict[cf.Future, Job] = {}

        def submit(batch: list[Job]) -> None:
            for job in batch:
                rec = cached(job)
                if rec is not None:
                    submit(on_done(job, rec, True))
                else:
                    futures[pool.submit(run_job, job)] = job

        submit(queue)
        while futures:
            finished, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = futures.pop(fut)
                submit(on_done(job, fut.result(), False))


def run_suite(args: argparse.Namespace, protocol: Protocol, data: dict, num_labels: dict[str, int]
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Run every job (grid first, dependent seeds as soon as their grid is complete).

    Returns (records of the selected rate for every seed, the selection per task/method, every run).
    One function on purpose: the scheduler's state (runs, pending grids, selection) is shared by the logging and
    follow-up closures that :func:`execute` calls back; split up, that state would have to be threaded through every
    piece.
    """
    done = _load_log(args.runs_log, protocol, args.tasks)
    grids = {m: (LR_GRID[m][len(LR_GRID[m]) // 2],) if args.smoke else LR_GRID[m] for m in args.methods}
    if args.lrs:
        grids = {m: tuple(args.lrs) for m in args.methods}
    widen = not args.smoke and not args.no_widen
    runs: dict[Job, dict[str, Any]] = {}
    selection: dict[str, dict[str, Any]] = {}
    pending_grid = {(t, m): {Job(t, m, lr, args.seeds[0]) for lr in grids[m]}
                    for t in args.tasks for m in args.methods}
    # most expensive first, so the two workers finish together
    cost = {"full": 3, "lora": 2, "ssf": 2, "ssf_paper_init": 2, "ia3": 1, "ln_tuning": 1, "bitfit": 1, "head": 0}
    first = sorted((j for js in pending_grid.values() for j in js), key=lambda j: (-cost[j.method], j.task, j.lr))
    t_start = time.time()
    n_total = len(first) + len(pending_grid) * (len(args.seeds) - 1)

    def log(job: Job, rec: dict[str, Any], cached: bool) -> None:
        runs[job] = rec
        if not cached:
            _append_run(args.runs_log, rec, protocol.key(job.task))
        print(f"[{len(runs):3d}/{n_total}] {job.task:11s} {job.method:14s} lr {job.lr:<7g} seed {job.seed}  "
              f"val {rec['val_acc']:.3f} test {rec['test_acc']:.3f}  {rec['train_seconds']:6.1f}s"
              f"{' (cached)' if cached else ''}  [{time.time() - t_start:.0f}s]", flush=True)

    def followups(job: Job) -> list[Job]:
        nonlocal n_total
        group = pending_grid.get((job.task, job.method))
        if group is None or not all(j in runs for j in group):
            return []
        lr = select_lr(runs[j] for j in group)
        if widen and len(group) > 1:
            extra = widen_grid(sorted(j.lr for j in group), lr)
            if extra is not None:  # best rate at an edge: add the next ladder value beyond it and wait for it
                new = Job(job.task, job.method, extra, args.seeds[0])
                group.add(new)
                n_total += 1
                return [new]
        del pending_grid[(job.task, job.method)]
        selection[f"{job.task}/{job.method}"] = {
            "task": job.task, "method": job.method, "selected_lr": lr,
            "initial_grid": [f"{v:g}" for v in grids[job.method]],
            "grid": {f"{j.lr:g}": {"val_acc": runs[j]["val_acc"], "val_loss": runs[j]["val_loss"]}
                     for j in sorted(group, key=lambda j: j.lr)},
        }
        return [Job(job.task, job.method, lr, s) for s in args.seeds[1:]]

    def on_done(job: Job, rec: dict[str, Any], cached: bool) -> list[Job]:
        log(job, rec, cached)
        return followups(job)

    execute(args, protocol, data, num_labels, first, done, on_done)
    chosen = []
    for sel in selection.values():
        for seed in args.seeds:
            chosen.append(runs[Job(sel["task"], sel["method"], sel["selected_lr"], seed)])
    order = {m: i for i, m in enumerate(args.methods)}
    chosen.sort(key=lambda r: (args.tasks.index(r["task"]), order[r["method"]], r["seed"]))
    return chosen, selection, list(runs.values())


def run_longer_schedule(args: argparse.Namespace, protocol: Protocol, data: dict, num_labels: dict[str, int],
                        selection: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Retrain every selected (task, method, rate) with the first seed for ``args.check_factor`` times its epochs.

    The convergence check: if a longer schedule (same rate, same recipe, warm-up and cosine stretched with it) does
    not raise validation accuracy by more than ``CONVERGED_POINTS``, the suite's epochs were enough for that method.
    A configuration that rose by more on the first seed is rerun with the other seeds too, so the verdict rests on
    the mean change over seeds rather than on one run. Nothing is selected from these runs.
    """
    longer = protocol.longer(args.check_factor)
    done = _load_log(args.runs_log, longer, args.tasks)
    jobs = [Job(v["task"], v["method"], v["selected_lr"], args.seeds[0]) for v in selection.values()]
    suite_val = {(r["task"], r["method"], r["seed"]): r["val_acc"] for r in records}
    runs: list[dict[str, Any]] = []
    n_total = len(jobs)
    t_start = time.time()

    def on_done(job: Job, rec: dict[str, Any], cached: bool) -> list[Job]:
        nonlocal n_total
        runs.append(rec)
        if not cached:
            _append_run(args.runs_log, rec, longer.key(job.task))
        print(f"[longer {len(runs):3d}/{n_total}] {job.task:11s} {job.method:14s} lr {job.lr:<7g} seed {job.seed} "
              f"{longer.epochs_for(job.task)} epochs: val {rec['val_acc']:.3f} test {rec['test_acc']:.3f}"
              f"{' (cached)' if cached else ''}  [{time.time() - t_start:.0f}s]", flush=True)
        rose = 100 * (rec["val_acc"] - suite_val[(job.task, job.method, job.seed)]) > CONVERGED_POINTS
        if job.seed != args.seeds[0] or not rose:
            return []
        n_total += len(args.seeds) - 1
        return [Job(job.task, job.method, job.lr, s) for s in args.seeds[1:]]

    execute(args, longer, data, num_labels, jobs, done, on_done)
    return {"factor": args.check_factor, "epochs": longer.epochs, "task_epochs": dict(longer.task_epochs),
            "seed": args.seeds[0], "runs": runs}


# ----------------------------------------------------------------------------------------------------------------
# rendering: Markdown table and plot, from the JSON alone
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: test accuracy mean / std per task and of the per-seed task average, val mean, params, time."""
    records = data["records"]
    tasks = data["meta"]["tasks"]
    out: dict[str, dict[str, Any]] = {}
    for method in data["meta"]["methods"]:
        recs = [r for r in records if r["method"] == method]
        if not recs:
            continue
        per_task = {t: _mean_std([r["test_acc"] for r in recs if r["task"] == t]) for t in tasks
                    if any(r["task"] == t for r in recs)}
        seeds = sorted({r["seed"] for r in recs})
        per_seed_avg = [statistics.fmean(r["test_acc"] for r in recs if r["seed"] == s) for s in seeds
                        if sum(r["seed"] == s for r in recs) == len(tasks)]
        out[method] = {
            "per_task": per_task,
            "average": _mean_std(per_seed_avg) if per_seed_avg else None,
            "val_average": statistics.fmean(r["val_acc"] for r in recs),
            "params": {t: next(r["trainable_params"] for r in recs if r["task"] == t) for t in per_task},
            "adapter_params": recs[0]["trainable_params"] - recs[0].get("head_params", 0),
            "seconds": statistics.fmean(r["train_seconds"] for r in recs),
            "cpu_seconds": statistics.fmean(r.get("train_cpu_seconds", math.nan) for r in recs),
        }
    return out


def _epochs_text(epochs: int, task_epochs: dict[str, int] | None) -> str:
    """"10 epochs" or "10 epochs; orientation 20"."""
    return f"{epochs} epochs" + "".join(f"; {t} {e}" for t, e in sorted((task_epochs or {}).items()))


def _pct(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def render_markdown(data: dict[str, Any]) -> str:
    """The results tables (test accuracy mean ± std over seeds, parameters, selected learning rates)."""
    meta = data["meta"]
    tasks = meta["tasks"]
    summary = summarise(data)
    ref = "digits" if "digits" in tasks else tasks[0]
    lines = [
        "<!-- generated by benchmarks/transfer.py from results/transfer.json; do not edit by hand -->",
        "",
        f"Test accuracy (%) of the validation-selected learning rate, mean ± std over seeds {meta['seeds']} "
        f"({_epochs_text(meta['epochs'], meta.get('task_epochs'))}, batch {meta['batch_size']}; backbone "
        f"`{meta['backbone_name']}`, "
        f"{meta['backbone_params']:,} parameters). *Average* = mean over tasks per seed, then mean ± std over seeds. "
        f"*Trainable* = with the {ref} head ({meta.get('num_labels', {}).get(ref, '?')} classes) / without any head.",
        "",
        "| method | " + " | ".join(tasks)
        + f" | **average** | trainable ({ref} head / no head) | train s / run (wall / CPU) |",
        "|---|" + "---|" * (len(tasks) + 3),
    ]
    for method, s in summary.items():
        cells = [_pct(s["per_task"].get(t)) for t in tasks]
        avg = s["average"]
        params = s["params"].get(ref, next(iter(s["params"].values())))
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells)
                     + f" | **{_pct(avg)}** | {params:,} / {s['adapter_params']:,} | {s['seconds']:.1f} / "
                     f"{s['cpu_seconds']:.1f} |")
    lines += ["", "Validation accuracy (%) of the selected configuration (mean over seeds), and the selected learning "
              "rate (grid run with seed 0):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    sel = data.get("lr_selection", {})
    for method in summary:
        cells = []
        for t in tasks:
            vals = [r["val_acc"] for r in data["records"] if r["method"] == method and r["task"] == t]
            lr = sel.get(f"{t}/{method}", {}).get("selected_lr")
            cells.append(f"{100 * statistics.fmean(vals):.1f} (lr {lr:g})" if vals and lr is not None else "-")
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    grid_edge = [k for k, v in sel.items() if len(v["grid"]) > 1 and v["selected_lr"] in
                 (min(map(float, v["grid"])), max(map(float, v["grid"])))]
    lines += ["", f"Selected rate at an edge of its grid: {len(grid_edge)} of {len(sel)} (task, method) pairs"
              + (f" ({', '.join(sorted(grid_edge))})." if grid_edge else "."), ""]
    lines += render_grids(data, list(summary)) + render_checks(data, summary) + render_convergence(data, list(summary))
    lines += render_longer_schedule(data, list(summary))
    lines += [f"Runs: {meta['n_runs']} ({meta['workers']} worker processes x {meta['threads']} thread), "
              f"wall time {meta['wall_seconds'] / 60:.1f} min on {meta['cpu']} (training CPU time of all runs: "
              f"{meta.get('train_cpu_seconds_total', math.nan) / 60:.1f} min); {meta['date']}, "
              f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}."]
    return "\n".join(lines) + "\n"


def render_grids(data: dict[str, Any], methods: list[str]) -> list[str]:
    """Each (task, method)'s final grid (lowest .. highest rate tried), selected rate and how often it was widened."""
    tasks, sel = data["meta"]["tasks"], data.get("lr_selection", {})
    initial = data["meta"]["protocol"].get("lr_grid", {})
    lines = ["Learning-rate grids: selected rate [lowest .. highest rate tried] (+n: values added beyond the initial "
             "grid because the best rate sat on its edge). Initial grids: "
             + "; ".join(f"{METHOD_LABELS.get(m, m)} {', '.join(f'{float(v):g}' for v in initial[m])}"
                         for m in methods if m in initial) + ".", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method in methods:
        cells = []
        for t in tasks:
            v = sel.get(f"{t}/{method}")
            if v is None:
                cells.append("-")
                continue
            grid = sorted(map(float, v["grid"]))
            added = len(grid) - len(v.get("initial_grid", grid))
            cells.append(f"{v['selected_lr']:g} [{grid[0]:g} .. {grid[-1]:g}]" + (f" +{added}" if added else ""))
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_checks(data: dict[str, Any], summary: dict[str, dict[str, Any]]) -> list[str]:
    """Per task: chance, full fine-tuning minus head only (test, mean over seeds), and the weakest method."""
    tasks, num_labels = data["meta"]["tasks"], data["meta"].get("num_labels", {})
    if "full" not in summary or "head" not in summary:
        return []
    lines = ["Does each task discriminate? Full fine-tuning minus head only (test accuracy, points), and the weakest "
             "method against chance:", "", "| task | chance | full - head | weakest method (test) |",
             "|---|---|---|---|"]
    for t in tasks:
        if t not in summary["full"]["per_task"] or t not in summary["head"]["per_task"]:
            continue
        gap = 100 * (summary["full"]["per_task"][t][0] - summary["head"]["per_task"][t][0])
        weakest = min((s["per_task"][t][0], m) for m, s in summary.items() if t in s["per_task"])
        chance = 100 / num_labels[t] if t in num_labels else math.nan
        lines.append(f"| {t} | {chance:.1f} | {gap:+.1f} | {METHOD_LABELS.get(weakest[1], weakest[1])} "
                     f"{100 * weakest[0]:.1f} |")
    return lines + [""]


def render_convergence(data: dict[str, Any], methods: list[str]) -> list[str]:
    """How much the selected seed-0 runs still gained over the last third of training (validation accuracy)."""
    tasks, sel = data["meta"]["tasks"], data.get("lr_selection", {})
    runs = {(r["task"], r["method"], r["lr"], r["seed"]): r for r in data.get("all_runs", [])}
    seed0 = data["meta"]["seeds"][0]
    rows = []
    for method in methods:
        gains, drops = [], []
        for t in tasks:
            v = sel.get(f"{t}/{method}")
            rec = runs.get((t, method, v["selected_lr"], seed0)) if v else None
            curve = rec.get("val_curve") if rec else None
            if not curve or len(curve) < 3:
                continue
            final_epoch, final = curve[-1]
            earlier = [acc for epoch, acc in curve if epoch <= round(2 * final_epoch / 3)]
            if earlier:
                gains.append(100 * (final - earlier[-1]))
            drops.append(100 * (max(acc for _, acc in curve) - final))
        if gains:
            rows.append(f"| {METHOD_LABELS.get(method, method)} | {statistics.fmean(gains):+.1f} | {max(gains):+.1f} "
                        f"| {max(drops):.1f} |")
    if not rows:
        return []
    return ["Convergence of the selected runs (seed 0, validation accuracy in points): gain from 2/3 of the epochs to "
            "the end (mean over tasks, largest), and the largest drop from the curve's best point to the end:", "",
            "| method | gain, last third (mean) | (largest) | best - final (largest) |", "|---|---|---|---|",
            *rows, ""]




def render_longer_schedule(data: dict[str, Any], methods: list[str]) -> list[str]:
    """Per (method, task): validation / test change (points) when the selected run is retrained for longer."""
    check = data.get("longer_schedule")
    if not check or not check.get("runs"):
        return []
    tasks, meta = data["meta"]["tasks"], data["meta"]
    epochs = _epochs_text(meta["epochs"], meta.get("task_epochs"))
    longer_epochs = _epochs_text(check["epochs"], check.get("task_epochs"))
    seed0 = check["seed"]
    all_suite = {(r["task"], r["method"], r["seed"]): r for r in data["records"]}
    all_longer = {(r["task"], r["method"], r["seed"]): r for r in check["runs"]}
    suite = {(t, m): r for (t, m, s), r in all_suite.items() if s == seed0}
    longer = {(t, m): r for (t, m, s), r in all_longer.items() if s == seed0}
    lines = [f"Convergence check: each selected configuration retrained (seed {seed0}, same rate, warm-up and "
             f"cosine stretched) for {check.get('factor', '')}x its epochs ({longer_epochs}) instead of the suite's "
             f"({epochs}). Cells: change of validation / test accuracy in points (longer minus suite).", "",
             "| method | " + " | ".join(tasks) + " | mean change (val) |", "|---|" + "---|" * (len(tasks) + 1)]
    rose, fell = [], []
    for method in methods:
        cells, dvals = [], []
        for t in tasks:
            a, b = suite.get((t, method)), longer.get((t, method))
            if a is None or b is None:
                cells.append("-")
                continue
            dval, dtest = 100 * (b["val_acc"] - a["val_acc"]), 100 * (b["test_acc"] - a["test_acc"])
            dvals.append(dval)
            label = f"{METHOD_LABELS.get(method, method)} on {t} ({dval:+.1f}"
            if dval > CONVERGED_POINTS:
                seeds = sorted(s for (tt, mm, s) in all_longer if (tt, mm) == (t, method) and (tt, mm, s) in all_suite)
                mean = statistics.fmean(100 * (all_longer[(t, method, s)]["val_acc"] - all_suite[(t, method, s)]
                                               ["val_acc"]) for s in seeds)
                rose.append((mean > CONVERGED_POINTS, label + (f", mean over seeds {seeds}: {mean:+.1f})"
                                                                if len(seeds) > 1 else ")")))
            elif dval < -CONVERGED_POINTS:
                fell.append(label + ")")
            cells.append(f"{dval:+.1f} / {dtest:+.1f}")
        if dvals:
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells)
                         + f" | {statistics.fmean(dvals):+.1f} |")
    n = sum(1 for k in longer if k in suite)
    not_converged = sum(1 for confirmed, _ in rose if confirmed)
    lines += ["", f"Validation accuracy rose by more than {CONVERGED_POINTS:g} points on seed {seed0}: "
              f"{len(rose)} of {n}" + (f" ({'; '.join(text for _, text in rose)})" if rose else "")
              + f"; those are rerun with the other seeds, and **{not_converged} of {n}** still rise by more than "
              f"{CONVERGED_POINTS:g} points on the mean over seeds (not converged at the suite's epochs). Validation "
              f"accuracy fell by more than {CONVERGED_POINTS:g} points (the same rate over-trains when run longer): "
              f"{len(fell)} of {n}" + (f" ({'; '.join(fell)})." if fell else "."), ""]
    return lines


def render_plot(data: dict[str, Any], path: Path) -> None:
    """Left: test accuracy per task and method (error bars = std over seeds). Right: average vs trainable params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["meta"]["tasks"]
    summary = summarise(data)
    methods = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    cols = [*tasks, "average"]
    width = 0.8 / max(1, len(methods))
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        s = summary[method]
        stats = [s["per_task"].get(t, (math.nan, 0.0)) for t in tasks] + [s["average"] or (math.nan, 0.0)]
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cols))]
        ax.bar(xs, [100 * m for m, _ in stats], width, yerr=[100 * e for _, e in stats], capsize=2,
               label=METHOD_LABELS.get(method, method), color=colours(i))
        if s["average"] is not None:
            params = s["params"].get("digits", next(iter(s["params"].values())))
            ax2.errorbar(params, 100 * s["average"][0], yerr=100 * s["average"][1], fmt="o", capsize=3,
                         color=colours(i), label=METHOD_LABELS.get(method, method))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Transfer from {data['meta']['backbone_name']} (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax2.set_xscale("log")
    ax2.set_xlabel("trainable parameters (10-class head included, log)")
    ax2.set_ylabel("average test accuracy (%)")
    ax2.set_title("Accuracy vs trainable parameters")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def write_outputs(data: dict[str, Any], out: Path, plot: bool = True) -> None:
    """Write transfer.json / transfer.md (and transfer.png) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "transfer.json", json.dumps(data, indent=1) + "\n")
    atomic_write(out / "transfer.md", render_markdown(data))
    if plot:
        render_plot(data, out / "transfer.png")


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from peft_ssf.demo import BACKBONE_DIR, TARGET_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CI form: one task, seed 0, 1 epoch, 4/2/2 images per class, the middle rate of each grid")
    p.add_argument("--render", action="store_true", help="only re-render transfer.md / .png from transfer.json")
    p.add_argument("--backbone", type=Path, default=BACKBONE_DIR)
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TARGET_TASKS))
    p.add_argument("--methods", nargs="+", default=None, choices=list(LR_GRID))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="the first one runs the LR grid")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="override every method's grid (exploration)")
    p.add_argument("--no-widen", action="store_true", help="do not widen a grid whose best rate is at an edge")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS} (smoke: 1)")
    p.add_argument("--task-epochs", nargs="*", default=None, metavar="TASK=EPOCHS",
                   help=f"tasks that train for other than --epochs (default {TASK_EPOCHS}; smoke: none)")
    p.add_argument("--check-factor", type=int, default=None,
                   help="convergence check: retrain each selected configuration (first seed) for this many times "
                        f"its epochs (default {LONGER_FACTOR}; 0 = off; smoke: off)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=None, help="train images per class (default: the task's)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated task data")
    p.add_argument("--data-root", type=Path, default=None,
                   help="keep the generated imagefolders here (default: a temp dir, regenerated every run)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 2; smoke: 1, in-process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--runs-log", type=Path, default=None,
                   help="append every finished run here (JSON lines) and reuse runs of the same protocol from it")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for transfer.json / .md / .png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.tasks = args.tasks or (["counting"] if smoke else list(TARGET_TASKS))
    args.methods = args.methods or list(DEFAULT_METHODS)
    args.seeds = args.seeds or ([0] if smoke else [0, 1, 2])
    args.epochs = args.epochs or (1 if smoke else DEFAULT_EPOCHS)
    args.workers = args.workers or (1 if smoke else 2)
    if args.check_factor is None:
        args.check_factor = 0 if smoke else LONGER_FACTOR
    if args.task_epochs is None:
        args.task_epochs = {} if smoke else {t: e for t, e in TASK_EPOCHS.items() if t in args.tasks}
    else:
        args.task_epochs = {t: int(e) for t, e in (item.split("=", 1) for item in args.task_epochs)}
        unknown = set(args.task_epochs) - set(args.tasks)
        if unknown:
            p.error(f"--task-epochs names tasks this run does not include: {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or re-render) the suite and write its results; reads top to bottom as the protocol's steps (data, runs,
    selection, records, outputs), which is why it is kept whole."""
    args = parse_args(argv)
    if args.render:
        data = json.loads((args.out / "transfer.json").read_text())
        write_outputs(data, args.out, plot=not args.no_plot)
        print(render_markdown(data))
        return data

    import peft
    import transformers

    from peft_ssf.demo import GENERATOR_VERSION, TASKS

    t0 = time.time()
    sizes: dict[str, int | None] = (dict(SMOKE_SIZES) if args.smoke else
                                    {"n_train": args.n_train, "n_val": None, "n_test": None})
    if not (args.backbone / "config.json").is_file():
        raise SystemExit(f"no backbone at {args.backbone}; create it with: python scripts/pretrain_backbone.py")
    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        snapshot = Path(tmp) / "backbone"
        shutil.copytree(args.backbone, snapshot)
        root = args.data_root or Path(tmp) / "data"
        data = {t: load_task_arrays(t, root, args.data_seed, sizes) for t in args.tasks}
        digests = tuple((t, arrays_digest(d)) for t, d in data.items())
        protocol = Protocol(str(snapshot), backbone_digest(snapshot), args.epochs, args.batch_size,
                            sizes["n_train"], sizes.get("n_val"), sizes.get("n_test"), args.data_seed, digests,
                            tuple(sorted(args.task_epochs.items())))
        num_labels = {t: TASKS[t].num_classes for t in args.tasks}
        print(f"data ready in {time.time() - t0:.1f}s: " + ", ".join(
            f"{t} {len(d['train'][1])}/{len(d['validation'][1])}/{len(d['test'][1])}" for t, d in data.items())
            + f"; backbone sha256 {protocol.backbone_sha256[:12]}", flush=True)
        records, selection, all_runs = run_suite(args, protocol, data, num_labels)
        longer = (run_longer_schedule(args, protocol, data, num_labels, selection, records) if args.check_factor > 0
                  else None)
        config = json.loads((snapshot / "config.json").read_text())
        backbone_params = count_checkpoint_params(snapshot / "model.safetensors")
    wall = time.time() - t0
    meta = {
        "protocol": {"optimizer": "AdamW(0.9, 0.999)", "loop": "peft_ssf.engine.fit",
                     "weight_decay": f"{WEIGHT_DECAY} on the head's weight matrix only",
                     "schedule": f"linear warm-up {WARMUP_FRAC:.0%} of steps, then cosine to 0",
                     "grad_clip": CLIP_NORM, "augmentation": "none", "selection": "seed-0 grid, best final val acc",
                     "lr_grid": {m: list(args.lrs or LR_GRID[m]) for m in args.methods},
                     "lr_widening": "off" if args.no_widen or args.smoke else
                     f"an edge-selected rate adds the next half-decade rate beyond it, within {LR_BOUNDS}"},
        "smoke": args.smoke, "tasks": args.tasks, "num_labels": num_labels, "methods": args.methods,
        "seeds": args.seeds,
        "epochs": args.epochs, "task_epochs": args.task_epochs, "batch_size": args.batch_size,
        "per_class_sizes": sizes,
        "data_seed": args.data_seed, "backbone_name": os.path.relpath(args.backbone, REPO)
        if args.backbone.resolve().is_relative_to(REPO) else str(args.backbone),
        "backbone_sha256": protocol.backbone_sha256, "backbone_params": backbone_params,
        "data_sha256": dict(protocol.data_sha256), "data_generator_version": GENERATOR_VERSION,
        "backbone_config": {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "patch_size",
                                                       "image_size")},
        "n_runs": len(all_runs),
        "train_seconds_total": round(sum(r["train_seconds"] for r in all_runs), 1),
        "train_cpu_seconds_total": round(sum(r["train_cpu_seconds"] for r in all_runs), 1),
        "workers": args.workers, "threads": args.threads, "wall_seconds": round(wall, 1),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    result = {"meta": meta, "records": records, "lr_selection": selection, "all_runs": all_runs}
    if longer is not None:
        result["longer_schedule"] = longer
    write_outputs(result, args.out, plot=not args.no_plot)
    print(render_markdown(result))
    print(f"wrote {args.out / 'transfer.json'} ({wall / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
