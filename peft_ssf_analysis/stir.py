"""Identically-represented inputs and STIR (Nanda et al. 2022): do two layers share invariances?

``invert(A, a, X)`` searches, for each clean image x_k, an input x'_k that layer a of model A represents (almost)
like x_k, starting from noise: the layer cannot tell the two apart, so X' spans what the layer is invariant to.
``stir(A, a, B, b, X) = CKA(B_b(X), B_b(X'))`` then asks whether layer b of model B is invariant to the same things.
It is directional: STIR(B|A) != STIR(A|B) in general.

The search (one seed per image, so results do not depend on the batch size):

    x'_0 ~ N(0, I)                                           (the image's own standard-normal noise, unclamped)
    x'_{t+1} = clamp_[0,1](x'_t - step_size * g_t / ||g_t||)  g_t = grad of ||A_a(x'_t) - A_a(x)|| / ||A_a(x)||
    result   = the iterate x'_t, t >= 1, with the lowest relative loss (so always inside [0, 1])

The model's input normalisation is applied inside the differentiable forward pass (the search runs on raw [0, 1]
pixels), exactly once; the forward pass stops at layer a (see :class:`~peft_ssf_analysis.features.LayerProbe`).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cka import center_gram, cka_from_grams, gram_linear
from .features import (
    LayerProbe,
    Normalization,
    TokenMode,
    eval_mode,
    layer_names,
    layer_representations,
    resolve_normalization,
)

__all__ = [
    "InversionCache",
    "InversionResult",
    "image_seed",
    "invert",
    "model_fingerprint",
    "noise_baseline",
    "noise_images",
    "representation_grams",
    "start_noise",
    "stir",
    "stir_matrix",
    "tensor_fingerprint",
]


def image_seed(seed: int, index: int) -> int:
    """Seed of the starting noise of image ``index`` (its position in ``images``) for a given base ``seed``."""
    return (seed * 1_000_003 + index) % (2**63)


def start_noise(image_shape: Sequence[int], seed: int, indices: Iterable[int]) -> torch.Tensor:
    """The inversion's starting points: standard-normal noise [len(indices), *image_shape], image k seeded with
    ``image_seed(seed, k)`` (unclamped; :func:`noise_baseline` clamps it to [0, 1])."""
    shape = tuple(image_shape)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, k))) for k in indices]
    )


def _progress(total: int, desc: str, enabled: bool, leave: bool = False) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True)
        except ImportError:  # tqdm is optional
            pass
    return _NoProgress()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [n, C, H, W], got shape {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"images must be raw pixels in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); the model's own "
            "normalisation is applied inside the analysis, so do not normalise them yourself"
        )


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class InversionResult:
    """Identically-represented inputs for one (model, layer) and how well the search converged."""

    inputs: torch.Tensor  # [n, C, H, W] float32 in [0, 1], on the CPU
    rel_loss: torch.Tensor  # [n] lowest relative loss reached per image (the convergence check)
    start_rel_loss: torch.Tensor  # [n] relative loss of the starting noise
    layer: str
    steps: int
    step_size: float
    seed: int


def invert(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    *,
    tokens: TokenMode = "flatten",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
    normalization: Normalization | None = None,
    check_cut: bool = True,
) -> InversionResult:
    """Find inputs that ``layer`` of ``model`` represents like ``images`` (normalised-gradient descent on pixels).

    Args:
        model: the model to invert (Hugging Face vision model, ``PeftModel``, or a plain module; see
            :mod:`~peft_ssf_analysis.features` for layer names). Put in eval mode for the search, then restored.
        layer: the layer whose representation is matched.
        images: [n, C, H, W] raw pixels in [0, 1].
        steps: gradient steps per image (500 in the fine-tuning paper, 1000 in STIR).
        step_size: L2 length of each pixel-space step (0.5 in both papers).
        seed: base seed; image k starts from N(0, I) noise seeded with ``image_seed(seed, k)``.
        batch_size: images searched together (results do not depend on it beyond float rounding).
        progress: show a tqdm bar.
        tokens: token handling of the matched representation.
        mean, std, processor, normalization: the model's input normalisation (see
            :func:`~peft_ssf_analysis.features.resolve_normalization`); ``normalization`` wins if given.
        check_cut: verify once, on a few images, that the cut forward pass gives the full forward pass's values.

    Returns:
        :class:`InversionResult` with the best iterate per image and its relative loss.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_images(images)
    norm = normalization or resolve_normalization(model, mean, std, processor)
    probe = LayerProbe(model, layer, tokens, norm)
    device = _device_of(probe.view.model)
    n = images.shape[0]
    out_x = torch.empty(images.shape, dtype=torch.float32)
    out_loss = torch.empty(n, dtype=torch.float64)
    out_start = torch.empty(n, dtype=torch.float64)
    n_batches = math.ceil(n / batch_size)
    bar = _progress(steps, f"invert {layer}", progress)  # counts steps, as the settings state them, per batch
    with eval_mode(probe.view.model):
        if check_cut:
            _check_cut(probe, images[: min(n, 4)].to(device, torch.float32))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if n_batches > 1:
                bar.reset(total=steps)
                bar.set_description(f"invert {layer} (images {start + 1}-{stop} of {n})")
            clean = images[start:stop].to(device, torch.float32)
            noise = start_noise(images.shape[1:], seed, range(start, stop)).to(device)
            x, loss, start_loss = _search(probe, clean, noise, steps, step_size, bar)
            out_x[start:stop] = x.cpu()
            out_loss[start:stop] = loss.cpu().double()
            out_start[start:stop] = start_loss.cpu().double()
    bar.close()
    return InversionResult(out_x, out_loss, out_start, layer, steps, step_size, seed)


def _check_cut(probe: LayerProbe, clean: torch.Tensor) -> None:
    with torch.no_grad():
        cut = probe(clean).cpu()
        full = layer_representations(probe.view.model, probe.normalization(clean), [probe.layer], probe.tokens)
        full = full[probe.layer].float()
    if cut.shape != full.shape or not torch.allclose(cut, full, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"the forward pass cut at {probe.layer!r} does not reproduce the full forward pass for "
            f"{type(probe.view.model).__name__}; please report this model type"
        )


def _search(
    probe: LayerProbe, clean: torch.Tensor, x: torch.Tensor, steps: int, step_size: float, bar: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised-gradient descent for one batch; returns (best inputs, best rel. loss, start rel. loss)."""
    with torch.no_grad():
        target = probe(clean).flatten(1)
    target_norm = target.norm(dim=1).clamp_min(torch.finfo(target.dtype).tiny)
    view_shape = (-1,) + (1,) * (x.dim() - 1)
    best_x = x.clone()
    best = torch.full((x.shape[0],), math.inf, device=x.device)
    start_loss = best
    for t in range(steps + 1):
        last = t == steps
        x = x.detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            rel = (probe(x).flatten(1) - target).norm(dim=1) / target_norm
        rel_value = rel.detach()
        if t == 0:
            start_loss = rel_value.clone()
        else:
            better = rel_value < best
            best = torch.where(better, rel_value, best)
            best_x[better] = x.detach()[better]
        if last:
            break
        (grad,) = torch.autograd.grad(rel.sum(), x)
        grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(view_shape)
        x = (x.detach() - step_size * grad / grad_norm).clamp_(0.0, 1.0)
        bar.update(1)
        if t % 10 == 0:
            bar.set_postfix_str(f"rel loss {float(best.mean()) if t else float(start_loss.mean()):.3g}")
    return best_x, best, start_loss


def tensor_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    """A cheap summary of tensor contents that changes when any of them is changed in place.

    Per tensor: storage address, version counter, shape, dtype, device, and two value checksums (float64 sum and
    L2 norm, one pass each, computed on the tensor's device with a single transfer per device). The checksums are
    needed because fused optimizers (AdamW ``fused=True``, the Trainer default) and writes through ``.data`` change
    values without bumping ``_version``. Equal fingerprints on unchanged tensors are deterministic for a fixed
    device and thread count; a spurious mismatch can only cost a recomputation, never a stale result.
    """
    meta: list[tuple] = []
    stats: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for t in tensors:
            t = t.detach()
            meta.append((t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device)))
            values = t if t.is_floating_point() or t.is_complex() else t.to(torch.float64)
            stats[t.device].append(torch.sum(values, dtype=torch.float64).real)
            stats[t.device].append(torch.linalg.vector_norm(values, dtype=torch.float64))
    sums = tuple(float(v) for device in sorted(stats, key=str) for v in torch.stack(stats[device]).cpu())
    return tuple(meta), sums


def model_fingerprint(model: nn.Module) -> tuple:
    """:func:`tensor_fingerprint` of every parameter and buffer of ``model`` (buffers: e.g. BatchNorm statistics)."""
    return tensor_fingerprint(itertools.chain(model.parameters(), model.buffers()))


@dataclass
class InversionCache:
    """Keeps X' per (model, source layer, images, settings) so that every evaluated layer reuses one inversion.

    ``performed`` counts the inversions actually run, ``requests`` how many were asked for; a cell-by-cell STIR
    computation without the cache would have run ``requests`` of them. The cached X' is exactly what a fresh call
    with the same seed would produce, so the estimator is unchanged.

    A stored X' is only served while the model's parameters and buffers and the images are unchanged: each entry
    keeps a :func:`model_fingerprint` (addresses, version counters and value checksums), so a model fine-tuned
    or edited in place between two calls gets a new inversion (counted in ``stale``), also when a fused optimizer
    changed it without bumping version counters. :meth:`clear` drops everything explicitly.
    """

    performed: int = 0
    requests: int = 0
    stale: int = 0
    _entries: dict[tuple, tuple[nn.Module, torch.Tensor, tuple, InversionResult]] = field(
        default_factory=dict, repr=False
    )

    def invert(self, model: nn.Module, layer: str, images: torch.Tensor, **kwargs: Any) -> InversionResult:
        """Like :func:`invert`, but returns the stored result when the same inversion was already run."""
        self.requests += 1
        settings = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in ("progress", "check_cut")))
        key = (id(model), layer, id(images), settings)
        fingerprint = (model_fingerprint(model), tensor_fingerprint([images]))
        entry = self._entries.get(key)
        if entry is not None and entry[0] is model and entry[1] is images:
            if entry[2] == fingerprint:
                return entry[3]
            self.stale += 1
        result = invert(model, layer, images, **kwargs)
        self._entries[key] = (model, images, fingerprint, result)
        self.performed += 1
        return result

    def clear(self) -> None:
        """Drop every stored X' (the counters are kept)."""
        self._entries.clear()


def _feature_sizes(
    model: nn.Module, images: torch.Tensor, layers: Sequence[str], tokens: str, norm: Normalization
) -> dict[str, int]:
    device = _device_of(model)
    with eval_mode(model):
        reps = layer_representations(model, norm(images[:1].to(device, torch.float32)), layers, tokens)
    return {name: t.shape[1] for name, t in reps.items()}


def _layer_groups(sizes: dict[str, int], n: int, max_feature_bytes: int) -> list[list[str]]:
    """Split layers into groups whose float32 features for n images fit in ``max_feature_bytes``."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        need = 4 * n * size
        if current and used + need > max_feature_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    if current:
        groups.append(current)
    return groups


def representation_grams(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    *,
    tokens: TokenMode = "flatten",
    normalization: Normalization,
    batch_size: int = 32,
    unbiased: bool = False,
    max_feature_bytes: int = 2**31,
) -> dict[str, torch.Tensor]:
    """Centred float64 Gram matrices [n, n] (on the CPU) of ``model``'s layers on raw [0, 1] ``images``.

    Runs without gradients and in eval mode. Layers are evaluated together in one forward pass per batch, split
    into several passes only when their features for all n images would exceed ``max_feature_bytes`` (the
    features stay on the model's device until their Gram is built there).
    """
    device = _device_of(model)
    n = images.shape[0]
    sizes = _feature_sizes(model, images, layers, tokens, normalization)
    grams: dict[str, torch.Tensor] = {}
    with eval_mode(model):
        for group in _layer_groups(sizes, n, max_feature_bytes):
            parts: dict[str, list[torch.Tensor]] = {name: [] for name in group}
            for start in range(0, n, batch_size):
                pixels = normalization(images[start : start + batch_size].to(device, torch.float32))
                reps = layer_representations(model, pixels, group, tokens, on_model_device=True)
                for name in group:
                    parts[name].append(reps[name])
            for name in group:  # the Gram is built on the model's device; only the n x n result comes back
                grams[name] = center_gram(gram_linear(torch.cat(parts[name])), unbiased=unbiased)
            del parts
    return {name: grams[name] for name in layers}


def noise_images(image_shape: Sequence[int], n: int, seed: int = 0) -> torch.Tensor:
    """Pure-noise stand-ins for n images: the inversion's starting noise (:func:`start_noise`, same seeds) clamped to
    [0, 1], i.e. an X' that no search step has informed."""
    return start_noise(image_shape, seed, range(n)).clamp_(0.0, 1.0)


def noise_baseline(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    tokens: TokenMode = "flatten",
    seed: int = 0,
    batch_size: int = 32,
    unbiased: bool = False,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
    normalization: Normalization | None = None,
) -> dict[str, float]:
    """Per layer l, CKA(M_l(X), M_l(N)) with N = :func:`noise_images`: the noise floor of STIR at that layer.

    STIR(M_l | .) = CKA(M_l(X), M_l(X')); this is the value it takes when X' carries no information about X at all.
    With many features per example (``tokens="flatten"``) and the biased estimator it is far above 0, so a STIR
    value is only evidence of shared invariance by how far it rises above this floor.
    """
    _check_images(images)
    norm = normalization or resolve_normalization(model, mean, std, processor)
    names = list(layers) if layers is not None else layer_names(model)
    common = {"tokens": tokens, "normalization": norm, "batch_size": batch_size, "unbiased": unbiased}
    clean = representation_grams(model, images, names, **common)
    noise = representation_grams(model, noise_images(images.shape[1:], images.shape[0], seed), names, **common)
    return {name: cka_from_grams(clean[name], noise[name], unbiased=unbiased, centered=True) for name in names}


def stir(
    source_model: nn.Module,
    source_layer: str,
    eval_model: nn.Module,
    eval_layer: str,
    images: torch.Tensor,
    *,
    tokens: TokenMode = "flatten",
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
    unbiased: bool = False,
    cache: InversionCache | None = None,
    progress: bool = True,
) -> float:
    """STIR(eval_model_eval_layer | source_model_source_layer) = CKA(B_b(X), B_b(X')), X' inverted from A_a.

    One normalisation (resolved from ``source_model`` unless given) is used for both models: the analysis
    compares versions of one architecture. Pass an :class:`InversionCache` to reuse X' across calls.
    """
    _check_images(images)
    norm = resolve_normalization(source_model, mean, std, processor)
    kwargs = {
        "steps": steps,
        "step_size": step_size,
        "seed": seed,
        "batch_size": batch_size,
        "tokens": tokens,
        "normalization": norm,
    }
    if cache is not None:
        result = cache.invert(source_model, source_layer, images, progress=progress, **kwargs)
    else:
        result = invert(source_model, source_layer, images, progress=progress, **kwargs)
    common = {"tokens": tokens, "normalization": norm, "batch_size": batch_size, "unbiased": unbiased}
    clean = representation_grams(eval_model, images, [eval_layer], **common)[eval_layer]
    inverted = representation_grams(eval_model, result.inputs, [eval_layer], **common)[eval_layer]
    return cka_from_grams(clean, inverted, unbiased=unbiased, centered=True)


def stir_matrix(
    source_model: nn.Module,
    eval_model: nn.Module,
    images: torch.Tensor,
    *,
    source_layers: Iterable[str] | None = None,
    eval_layers: Iterable[str] | None = None,
    tokens: TokenMode = "flatten",
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
    unbiased: bool = False,
    cache: InversionCache | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``M[a, b] = STIR(eval_model_b | source_model_a)`` (rows: source layers, columns: evaluated layers).

    Runs one inversion per source layer (reused for every column) and one forward pass over all evaluated layers
    per inversion. Same values as calling :func:`stir` cell by cell with the same seed.
    """
    _check_images(images)
    src = list(source_layers) if source_layers is not None else layer_names(source_model)
    dst = list(eval_layers) if eval_layers is not None else layer_names(eval_model)
    norm = resolve_normalization(source_model, mean, std, processor)
    cache = cache if cache is not None else InversionCache()
    common = {"tokens": tokens, "normalization": norm, "batch_size": batch_size, "unbiased": unbiased}
    clean = representation_grams(eval_model, images, dst, **common)
    out = torch.empty(len(src), len(dst), dtype=torch.float64)
    for a, layer in enumerate(src):
        result = cache.invert(
            source_model,
            layer,
            images,
            steps=steps,
            step_size=step_size,
            seed=seed,
            batch_size=batch_size,
            tokens=tokens,
            normalization=norm,
            progress=progress,
        )
        inverted = representation_grams(eval_model, result.inputs, dst, **common)
        for b, name in enumerate(dst):
            out[a, b] = cka_from_grams(clean[name], inverted[name], unbiased=unbiased, centered=True)
    return out
