"""Shared pieces of the benchmark scripts: models, methods, measurements, results files and their Markdown.

Every script builds its models from configs (no download), runs everything in ONE process, interleaves the methods
step by step (so background load hits all of them alike) and reports medians after warm-up and ratios to a
reference ("floor" for training, the base model for inference).

Measurements
------------
* step time: forward + loss + backward + AdamW step + zero_grad, wall clock (``cuda.synchronize`` on GPU).
* saved activations: bytes of the unique storages saved for backward during the forward pass, seen through
  ``torch.autograd.graph.saved_tensors_hooks``; storages of parameters and buffers are not activations and are
  skipped. Deterministic: it does not depend on the machine load.
* peak step memory: on CPU, the largest total size of tensor storages allocated during one training step and alive
  at the same time (a ``TorchDispatchMode`` sees every allocation, a weakref on each storage sees it freed). It
  counts activations, gradients and temporaries, not the resident model / optimizer state or allocator slack. On
  CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated before the step.
* RSS delta (CPU, supplementary): peak resident-set size sampled every 2 ms during a step minus the RSS before
  it. The C allocator keeps freed blocks, so it under-reports once earlier steps have grown the heap.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import re
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as T  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import peft_ssf  # noqa: E402
from peft_ssf import residual  # noqa: E402
from peft_ssf.engine.methods import METHODS as ENGINE_METHODS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FAMILIES = ("vit", "swin", "convnext")
#: every model train_cost.py knows: FAMILIES plus ConvNeXt-B with a learned-size layer scale
ALL_FAMILIES = (*FAMILIES, "convnext_ls")
METHODS = ("floor", "full", "lora", "ia3", "ln_tuning", "ssf_naive", "ssf_unpaired", "ssf_fused")
#: the three SSF variants: ``SSFConfig(fused=False)``, ``SSFConfig(pair_residuals=False)``, the default
SSF_VARIANTS = ("ssf_naive", "ssf_unpaired", "ssf_fused")
NUM_LABELS = 100
MIB = 2**20

# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model family at one size: its transformers class and config keyword arguments."""

    family: str
    label: str
    cls: type
    config_cls: type
    kwargs: dict[str, Any]


_SPECS: dict[tuple[str, str], ModelSpec] = {
    ("vit", "base"): ModelSpec(
        "vit", "ViT-B/16", T.ViTForImageClassification, T.ViTConfig,
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
    ),
    ("swin", "base"): ModelSpec(
        "swin", "Swin-B (window 7)", T.SwinForImageClassification, T.SwinConfig,
        dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, drop_path_rate=0.0),
    ),
    ("convnext", "base"): ModelSpec(
        "convnext", "ConvNeXt-B", T.ConvNextForImageClassification, T.ConvNextConfig,
        dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3], drop_path_rate=0.0),
    ),
    ("vit", "tiny"): ModelSpec(
        "vit", "ViT-tiny (test config)", T.ViTForImageClassification, T.ViTConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8),
    ),
    ("swin", "tiny"): ModelSpec(
        "swin", "Swin-tiny (test config)", T.SwinForImageClassification, T.SwinConfig,
        dict(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, drop_path_rate=0.0),
    ),
    ("convnext", "tiny"): ModelSpec(
        "convnext", "ConvNeXt-tiny (test config)", T.ConvNextForImageClassification, T.ConvNextConfig,
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, drop_path_rate=0.0),
    ),
}

#: ConvNeXt with a learned-size layer scale instead of the 1e-6 it is initialised with (pretrained ConvNeXt layer
#: scales are learned values; no pretrained weights are downloaded here, so 0.1 stands in for them)
_SPECS[("convnext_ls", "base")] = ModelSpec(
    "convnext", "ConvNeXt-B (layer scale 0.1)", T.ConvNextForImageClassification, T.ConvNextConfig,
    {**_SPECS[("convnext", "base")].kwargs, "layer_scale_init_value": 0.1},
)
_SPECS[("convnext_ls", "tiny")] = ModelSpec(
    "convnext", "ConvNeXt-tiny (layer scale 0.1)", T.ConvNextForImageClassification, T.ConvNextConfig,
    {**_SPECS[("convnext", "tiny")].kwargs, "layer_scale_init_value": 0.1},
)

#: the bias left trainable in the floor: the first op of the first block, so backward runs through every block
FLOOR_BIAS = {
    "vit": r"vit\.layers\.0\.layernorm_before\.bias",
    "swin": r"swin\.encoder\.layers\.0\.blocks\.0\.layernorm_before\.bias",
    "convnext": r"convnext\.encoder\.stages\.0\.layers\.0\.dwconv\.bias",
}

def model_spec(family: str, quick: bool = False) -> ModelSpec:
    """The B-size spec of ``family`` (or the tiny test-size one with ``quick``)."""
    return _SPECS[(family, "tiny" if quick else "base")]


def build_model(family: str, image_size: int = 224, quick: bool = False, seed: int = 0) -> nn.Module:
    """A randomly initialised image classifier of ``family`` for ``image_size`` inputs (never downloads)."""
    spec = model_spec(family, quick)
    torch.manual_seed(seed)
    config = spec.config_cls(image_size=image_size, num_labels=NUM_LABELS, **spec.kwargs)
    return spec.cls(config)


def make_batch(batch: int, image_size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels ``[batch, 3, S, S]`` and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------------------
# methods (classifier head trainable for every method, floor included)
# ----------------------------------------------------------------------------------------------------------------


def share_weights(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` whose parameters are new ``Parameter`` objects on the SAME storages.

    Frozen weights are then stored once for all methods; every method must give the parameters it trains their own
    storage (PEFT's ``modules_to_save`` copies the head; ``prepare`` clones the floor's trainable tensors).
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _quiet_peft(fn: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def prepare(method: str, base: nn.Module, family: str) -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (see ``METHODS``); the base model is left untouched."""
    from peft import get_peft_model

    from peft_ssf.engine.methods import peft_config

    head = ["classifier"]
    if method == "full":
        model = copy.deepcopy(base).requires_grad_(True)
    elif method == "floor":
        model = share_weights(base).requires_grad_(False)
        pattern = re.compile(FLOOR_BIAS[model_spec(family).family])
        for name, module in model.named_modules():
            for pname, param in list(module.named_parameters(recurse=False)):
                full = f"{name}.{pname}" if name else pname
                if full.startswith("classifier.") or pattern.fullmatch(full):
                    setattr(module, pname, nn.Parameter(param.detach().clone(), requires_grad=True))
        if sum(p.requires_grad for p in model.parameters()) != 3:
            raise RuntimeError(f"floor: expected classifier weight/bias + one bias trainable in {family}")
    elif method in METHODS:
        variant = {"ssf_naive": {"fused": False}, "ssf_unpaired": {"pair_residuals": False}}.get(method, {})
        engine_method = "ssf" if method in SSF_VARIANTS else method
        config = peft_config(engine_method, model_spec(family).family, head[0], **variant)
        shared = share_weights(base)
        model = _quiet_peft(lambda: get_peft_model(shared, config))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model.train()


def trainable_params(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# running a step
# ----------------------------------------------------------------------------------------------------------------


#: training precisions: float32; bf16 / fp16 autocast over float32 weights; a model cast to bfloat16
DTYPES = ("fp32", "bf16", "fp16", "bf16-model")


def autocast_ctx(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype="bf16"`` / ``"fp16"``, a no-op otherwise."""
    if dtype in ("bf16", "fp16"):
        low = torch.bfloat16 if dtype == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(device).type, dtype=low)
    return contextlib.nullcontext()


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits of a transformers / PEFT image classifier."""
    return model(pixel_values=x).logits


class Trainer:
    """One model + AdamW over its trainable parameters; ``step`` runs forward, backward and the update."""

    def __init__(self, model: nn.Module, device: str, dtype: str, compile: bool = False) -> None:
        self.model = model.to(device)
        if dtype == "bf16-model":  # weights in bfloat16; PEFT keeps adapter weights in float32
            self.model = _bf16_model(self.model)
        self.device, self.dtype = device, dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self._loss = torch.compile(self._eager_loss) if compile else self._eager_loss

    def _eager_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.dtype == "bf16-model":
            x = x.to(torch.bfloat16)
        with autocast_ctx(self.device, self.dtype):
            return F.cross_entropy(logits_of(self.model, x).float(), y)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._loss(x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.forward_loss(x, y).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


_ADAPTER_PREFIXES = ("ssf_", "lora_", "ia3_")


def _bf16_model(model: nn.Module) -> nn.Module:
    """The model in bfloat16, as after ``model.to(torch.bfloat16)`` before ``get_peft_model``: every weight (the
    trainable head too) in bfloat16, PEFT adapter weights in float32 (PEFT's ``autocast_adapter_dtype``)."""
    for name, module in model.named_modules():
        if any(p in name for p in _ADAPTER_PREFIXES):
            continue
        for param in list(module.parameters(recurse=False)):
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point():
                module._buffers[name] = buf.to(torch.bfloat16)
    return model


def sync(device: str) -> None:
    """Wait for queued device work (CUDA) so wall-clock timings are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: what ``timed`` measures: "cpu" = this process's CPU time (user + sys), "wall" = wall clock; set by ``setup``
CLOCK = "wall"


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn`` takes on the active clock (``CLOCK``), device work included."""
    return measure(fn, device)[0]


def measure(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(seconds on the active clock, wall-clock seconds) of one call of ``fn``.

    The CPU clock (default on CPU) counts the work of this process only, so other processes on a shared machine
    slow the wall clock but not it; with one torch thread it is the single-core cost of the step.
    """
    sync(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return (cpu if CLOCK == "cpu" else wall), wall


def interleaved_times(
    jobs: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every job once per round (order rotated each round).

    Returns the times of the rounds after warm-up on the active clock, and the same rounds' wall-clock times.
    """
    names = list(jobs)
    out: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds, wall_seconds = measure(jobs[name], device)
            if r >= warmup:
                out[name].append(seconds)
                wall[name].append(wall_seconds)
    return out, wall


def median(values: Sequence[float]) -> float:
    """Median (``nan`` for an empty list)."""
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _role(name: str) -> str:
    """Module name with layer indices folded (``vit.layers.3.mlp.fc2`` -> ``vit.layers.N.mlp.fc2``)."""
    name = re.sub(r"^(inner\.)?base_model\.model\.", "", name)
    name = re.sub(r"\.base_layer$", "", name)
    name = re.sub(r"\.modules_to_save\.default$|\.original_module$", "", name)
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def held_outside_hooks(out: Any) -> list[tuple[torch.Tensor, int]]:
    """Tensors that fused SSF ops keep for backward outside ``save_for_backward`` (hooks cannot see them).

    With residual pairing (``SSFConfig(pair_residuals=True)``) a fused op's node carries a ``kept`` record: its own
    output ``y`` or, once paired, the residual add's operands ``(r, z)``. Walks the graph behind ``out`` and returns
    ``(tensor, id of the node)`` for each of them.
    """
    roots = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found: list[tuple[torch.Tensor, int]] = []
    seen: set[int] = set()
    while roots:
        node = roots.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        record = getattr(node, "kept", None)
        if record is not None:
            tensors = (record.y,) if record.pair is None else record.pair
            found.extend((t, id(node)) for t in tensors if t is not None)
        roots.extend(fn for fn, _ in node.next_functions)
    return found


@dataclass
class SavedReport:
    """Saved-for-backward storages of one forward pass."""

    total_bytes: int
    #: role -> bytes of storages saved only by SSF ops at that role (nothing else in the graph saves them)
    ssf_only_bytes: dict[str, int]
    #: role -> number of SSF sites with that role
    ssf_sites: dict[str, int]


def _is_ssf_op(module: Optional[nn.Module]) -> bool:
    """Whether saves made with ``module`` innermost are the SSF op's own. A norm's SSF wrapper runs the norm itself
    (with folded affine parameters), so what it saves is the norm's, as in the frozen model."""
    from peft_ssf.layer import _AffineNorm

    return isinstance(module, peft_ssf.SSFLayer) and not isinstance(module, _AffineNorm)


def saved_activations(model: nn.Module, forward: Callable[[], torch.Tensor]) -> SavedReport:
    """Count unique non-parameter storages saved for backward while ``forward()`` runs.

    Each saved storage is attributed to the innermost module running when it was saved. A storage saved only while
    an SSF wrapper itself (not its base layer) was innermost is SSF's own extra memory. (One function, a little over
    60 lines: the hooks and the attribution share the module stack and the storage table.)
    """
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    savers: dict[tuple[int, int], set[tuple[str, bool]]] = {}

    def pre(module: nn.Module, *_: Any) -> None:
        stack.append(module)

    def post(module: nn.Module, *_: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key[0] != 0 and key[0] not in skip and key[1] > 0:
            top = stack[-1] if stack else None
            name = _role(names.get(id(top), "")) if top is not None else "<model>"
            savers.setdefault(key, set()).add((name, _is_ssf_op(top)))
        # detached: returning ``t`` itself would tie an op's saved output to the op's own node, a reference cycle
        # inside autograd that keeps the whole graph alive after the forward's result is dropped
        return t.detach()

    node_owner: dict[int, str] = {}  # id(grad_fn of an SSF output) -> role of its SSF wrapper

    def ssf_post(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            node_owner[id(output.grad_fn)] = _role(names.get(id(module), ""))

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
        if isinstance(module, peft_ssf.SSFLayer):
            handles.append(module.register_forward_hook(ssf_post))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), residual.hooks_only_observe():
            out = forward()
        for t, node in held_outside_hooks(out):
            key = _storage_key(t)
            if key[0] not in skip:
                role = node_owner.get(node, "<SSF op, kept outside save_for_backward>")
                savers.setdefault(key, set()).add((role, True))
        del out
    finally:
        for h in handles:
            h.remove()
    ssf_only: dict[str, int] = {}
    for (_, nbytes), who in savers.items():
        if all(is_ssf for _, is_ssf in who):
            for role in sorted({r for r, _ in who}):
                ssf_only[role] = ssf_only.get(role, 0) + nbytes // len({r for r, _ in who})
    sites: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, peft_ssf.SSFLayer):
            sites[_role(name)] = sites.get(_role(name), 0) + 1
    return SavedReport(sum(n for _, n in savers), ssf_only, sites)


class LiveTensorPeak(TorchDispatchMode):
    """Peak total bytes of tensor storages allocated inside the mode and alive at the same time (CPU or any)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._alive.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place results share an input's storage: not an allocation (``weight.t()`` of a parameter
        # would otherwise count the whole parameter as new memory)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if ptr and ptr not in self._alive and ptr not in inputs:
                    self._alive.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, ptr, nbytes)
        return out


class RssSampler:
    """Background sampler of this process's resident set size (psutil); ``peak_delta`` = peak - start."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``), so RSS deltas start low."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_bytes(
    trainer: Trainer, x: torch.Tensor, y: torch.Tensor, rss: bool = False
) -> tuple[int, Optional[int]]:
    """(peak step memory, RSS delta or None) of one training step (two steps with ``rss``); see the module doc."""
    if torch.device(trainer.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, None
    rss_delta: Optional[int] = None
    if rss:
        with contextlib.suppress(ImportError):  # psutil missing: no RSS column
            release_free_memory()
            with RssSampler() as sampler:
                trainer.step(x, y)
            rss_delta = sampler.peak_delta
    tracker = LiveTensorPeak()
    with tracker:
        trainer.step(x, y)
    return tracker.peak, rss_delta


# ----------------------------------------------------------------------------------------------------------------
# metadata, CLI and results files
# ----------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def elementwise_probe(repeats: int = 9) -> dict[str, float]:
    """Median ms of one 1.2M-element multiply with the current thread count and with one thread.

    On an oversubscribed machine every OpenMP parallel region waits for descheduled sibling threads, so small ops
    cost far more than their work; comparing the two numbers shows whether that happened during a run.
    """
    a, b = torch.randn(1576, 768), torch.randn(768)
    threads = torch.get_num_threads()
    out = {}
    for label, n in (("current_threads", threads), ("one_thread", 1)):
        torch.set_num_threads(n)
        out[f"mul_1.2M_ms_{label}"] = 1e3 * median([measure(lambda: a * b, "cpu")[1] for _ in range(repeats)])
    torch.set_num_threads(threads)
    return out


def machine_info(device: str, dtype: str) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    import peft

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": T.__version__,
        "peft": peft.__version__,
        "peft_ssf": getattr(peft_ssf, "__version__", "dev"),
        "device": device,
        "dtype": dtype,
        "clock": CLOCK,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info.update(elementwise_probe())
    with contextlib.suppress(Exception):
        info["load_avg_1m_at_start"] = os.getloadavg()[0]
    return info


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every script shares."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--dtype", default="fp32", choices=DTYPES,
        help="fp32; bf16 / fp16 = torch.autocast over float32 weights; bf16-model = frozen weights cast to bfloat16",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each method's forward + loss")
    parser.add_argument("--quick", action="store_true", help="tiny configs, one measured round (smoke test)")
    parser.add_argument(
        "--clock", default="auto", choices=["auto", "cpu", "wall"],
        help="auto (default): process CPU time on CPU (robust on a shared machine), wall clock on CUDA",
    )
    parser.add_argument("--rss", action="store_true", help="also sample the RSS delta of one step (CPU, noisy)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")


def setup(args: argparse.Namespace) -> None:
    """Apply the common options (``--quick`` results go to a temporary directory unless ``--out`` is given)."""
    global CLOCK
    CLOCK = args.clock if args.clock != "auto" else ("cpu" if torch.device(args.device).type == "cpu" else "wall")
    if args.quick and args.out == RESULTS_DIR:
        import tempfile

        args.out = Path(tempfile.gettempdir()) / "peft_ssf_bench_quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")


def write_results(out_dir: Path, name: str, payload: dict[str, Any], markdown: str, script: str) -> None:
    """Write ``name.json`` and ``name.md`` under ``out_dir`` (only those: ``make docs`` renders the README)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    header = f"<!-- generated by benchmarks/{script}; do not edit by hand -->\n"
    (out_dir / f"{name}.md").write_text(header + markdown.rstrip() + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt_ratio(value: Optional[float]) -> str:
    """``1.23x`` (or ``-``)."""
    return "-" if value is None or value != value else f"{value:.2f}x"


def fmt_mib(nbytes: Optional[float]) -> str:
    """Bytes as MiB (no decimals from 100 MiB, else 3 significant digits; ``-`` for None)."""
    if nbytes is None:
        return "-"
    mib = nbytes / MIB
    return f"{mib:,.0f}" if abs(mib) >= 100 else f"{mib:.3g}"


def meta_line(meta: dict[str, Any]) -> str:
    """One line: date, machine, versions."""
    dev = meta.get("gpu") or f"{meta['cpu']} ({meta['torch_threads']} torch thread(s) of {meta['cpu_count']} cores)"
    clock = {"cpu": "process CPU time", "wall": "wall clock"}.get(meta.get("clock", "wall"), "wall clock")
    return (
        f"{meta['date']}; {dev}; {meta['device']} {meta['dtype']}; times: {clock}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}"
    )


def _load(out_dir: Path, name: str) -> Optional[dict[str, Any]]:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def iter_sections(out_dir: Path) -> Iterator[str]:
    """Markdown blocks of the README performance section, one per results file present."""
    targets = targets_markdown(out_dir)
    if targets:
        yield targets
    for name in TRAIN_COST_FILES:
        data = _load(out_dir, name)
        if data:
            yield train_summary_markdown(data)
    renderers = {"inference_latency": inference_summary_markdown,
                 "merge_time": merge_summary_markdown, "scaling": scaling_summary_markdown}
    for name, render in renderers.items():
        data = _load(out_dir, name)
        if data:
            yield render(data)


def performance_section(out_dir: Path = RESULTS_DIR) -> str:
    """``README_performance.md``: every results file present in ``out_dir`` rendered as Markdown (writes nothing;
    ``python -m benchmarks.docs`` / ``make docs`` writes it and the README block)."""
    blocks = list(iter_sections(out_dir))
    text = "<!-- generated from benchmarks/results/*.json by `make docs`; do not edit by hand -->\n## Performance\n\n"
    if not blocks:
        return text + "No benchmark results yet: run the scripts in `benchmarks/` (see benchmarks/README.md).\n"
    return text + (
        "Ratios to a reference measured in the same process, methods interleaved, medians after warm-up "
        "(absolute times on a shared CPU are noisy; ratios are what to compare). Saved activations are "
        "exact byte counts. Details and method: `docs/performance.md`; all numbers: "
        "`benchmarks/results/`.\n\n" + "\n\n".join(blocks) + "\n"
    )


#: training-cost results files, one per mode (``train_cost.py`` names them), in the order they are shown
TRAIN_COST_FILES = ("train_cost", "train_cost_bf16", "train_cost_fp16", "train_cost_bf16-model",
                    "train_cost_compiled", "train_cost_bf16_compiled", "train_cost_bf16_cuda",
                    "train_cost_bf16_compiled_cuda")


def readme_performance_block(out_dir: Path = RESULTS_DIR) -> str:
    """The README's performance block: the targets and the fp32 and bf16-autocast training-cost summaries."""
    blocks = list(iter_sections(out_dir))[:3]
    return "\n\n".join(blocks) if blocks else "No benchmark results yet."


def targets_markdown(out_dir: Path, family: str = "vit") -> Optional[str]:
    """Issue-4 targets on ``family`` (ViT-B/16 by default) against the results files: met or not, with the value."""
    rows: list[tuple[str, str, Optional[bool]]] = []
    train = _load(out_dir, "train_cost")
    run = (train or {}).get("runs", {}).get(family)
    if run and "ssf_fused" in run["methods"]:
        fused = run["methods"]["ssf_fused"]
        for what, key in (("step time", "ratio_time"), ("saved activations", "ratio_saved")):
            rows.append((f"fused SSF {what} <= 1.05x floor", fmt_ratio(fused[key]), fused[key] <= 1.05))
    infer = [r for r in ((_load(out_dir, "inference_latency") or {}).get("rows", [])) if r["family"] == family]
    for r in infer:
        rows.append((f"unmerged inference <= 1.03x base (batch {r['batch']})", fmt_ratio(r["ratio_unmerged"]),
                     r["ratio_unmerged"] <= 1.03))
    if infer:
        same = all(r["merged_is_base_graph"] and r["base_params"] == r["merged_params"] for r in infer)
        rows.append(("merged = base graph (modules, parameter names / shapes / count)", "yes" if same else "no", same))
    merge = [r for r in ((_load(out_dir, "merge_time") or {}).get("rows", [])) if r["family"] == family]
    for r in merge:
        rows.append(("merge_and_unload < 1 s", f"{r['median_s']:.3f} s", r["median_s"] < 1.0))
    if not rows:
        return None
    model = run["model"] if run else (infer[0]["model"] if infer else merge[0]["model"])
    lines = [f"**Targets** ({model}, CPU numbers below; timing ratios carry the noise of a shared machine)\n",
             "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, value, ok in rows]
    return "\n".join(lines)


#: the engine's labels for the shared methods, plus the cost variants only this suite measures
METHOD_LABELS = {
    **ENGINE_METHODS,
    "floor": "floor (frozen + 1 bias)",
    "ssf_naive": "SSF naive",
    "ssf_unpaired": "SSF fused, pair_residuals=False",
    "ssf_fused": "SSF fused + residual pairing (default)",
}


def mode_label(cfg: dict[str, Any]) -> str:
    """``cpu fp32``, ``cpu bf16 autocast, compiled``, ``cuda bf16 model`` ..."""
    dtype = cfg.get("dtype", "fp32")
    text = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "bf16-model": "bf16 model"}.get(dtype, dtype)
    return f"{cfg.get('device', 'cpu')} {text}" + (", compiled" if cfg.get("compile") else ", eager")


def train_summary_markdown(data: dict[str, Any]) -> str:
    """Compact training-cost table: time / forward-live memory / saved activations ratio to the floor."""
    runs = data["runs"]
    families = list(runs)
    cfg = data["config"]
    head = "| method | " + " | ".join(runs[f]["model"] for f in families) + " |"
    lines = [
        f"**Training cost, {mode_label(cfg)}** (batch {cfg['batch']} @ {cfg['image_size']}px; step time / "
        "forward-live memory (RSS growth over one training forward, fresh process) / saved activations, ratio to "
        "the floor; head trainable for every method). " + meta_line(data["meta"]) + "\n",
        head,
        "|---|" + "---|" * len(families),
    ]
    methods = [m for m in METHODS if any(m in runs[f]["methods"] for f in families)]
    for m in methods:
        cells = []
        for f in families:
            r = runs[f]["methods"].get(m)
            cells.append(
                "-" if r is None else
                f"{fmt_ratio(r['ratio_time'])} / {fmt_ratio(r.get('ratio_live'))} / {fmt_ratio(r['ratio_saved'])}"
            )
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    floors = []
    for f in families:
        r = runs[f]["methods"].get("floor")
        if r:
            floors.append(
                f"{runs[f]['model']} {r['time_s']:.2f} s/step ({r['images_per_s']:.1f} img/s), "
                f"{fmt_mib(r.get('live_bytes'))} MiB forward-live, {fmt_mib(r['saved_bytes'])} MiB saved"
            )
    if floors:
        lines.append("\nFloor: " + "; ".join(floors) + ".")
    return "\n".join(lines)


def _table(caption: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A caption line and a Markdown table."""
    lines = [caption + "\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def inference_summary_markdown(data: dict[str, Any]) -> str:
    """Inference latency ratios to the base model."""
    rows = [[r["model"], r["batch"], f"{r['base_ms']:.1f}", fmt_ratio(r["ratio_unmerged"]),
             fmt_ratio(r["ratio_merged"]), "yes" if r["merged_is_base_graph"] else "NO"] for r in data["rows"]]
    return _table("**Inference latency** (ratio to the base model, eval mode, no grad). " + meta_line(data["meta"]),
                  ["model", "batch", "base (ms)", "SSF unmerged", "SSF merged", "merged = base graph"], rows)


def merge_summary_markdown(data: dict[str, Any]) -> str:
    """merge_and_unload wall time."""
    rows = [[r["model"], r["sites"], f"{r['median_s']:.3f}",
             "-" if r.get("median_wall_s") is None else f"{r['median_wall_s']:.3f}"] for r in data["rows"]]
    return _table("**merge_and_unload time** (median). " + meta_line(data["meta"]),
                  ["model", "SSF sites", "time (s)", "wall clock (s)"], rows)


def scaling_summary_markdown(data: dict[str, Any]) -> str:
    """Each method's ratios to the floor (step time / saved activations) as batch and image size grow."""
    methods = [m for m in data["config"]["methods"] if m != "floor"]
    lines = [
        f"**Scaling** ({data['config']['model']}; ratio to the floor: step time / saved activations). "
        + meta_line(data["meta"]) + "\n",
        "| batch | image | floor s/step | floor saved MiB | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for r in data["rows"]:
        res = r["methods"]
        cells = [
            "-" if m not in res else f"{fmt_ratio(res[m]['ratio_time'])} / {fmt_ratio(res[m]['ratio_saved'])}"
            for m in methods
        ]
        floor = res["floor"]
        lines.append(
            f"| {r['batch']} | {r['image_size']} | {floor['time_s']:.2f} | {fmt_mib(floor['saved_bytes'])} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def gradient_error(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest difference between the SSF parameter gradients of two models on one batch, relative to the largest
    gradient of that parameter (floored at 1e-3 of the largest gradient of its kind: the key projections' shift has
    a true gradient of 0, only rounding noise)."""
    grads = []
    for model in (model_a, model_b):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model, x).float(), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None and ".ssf_" in n})
        model.zero_grad(set_to_none=True)
    top = {kind: max(g.abs().max().item() for n, g in grads[0].items() if kind in n) for kind in ("scale", "shift")}
    worst = 0.0
    for name, ga in grads[0].items():
        ref = max(ga.abs().max().item(), 1e-3 * top["scale" if "scale" in name else "shift"], 1e-30)
        worst = max(worst, (ga - grads[1][name]).abs().max().item() / ref)
    return worst
