"""Image size and normalisation: one source (the checkpoint's image processor), one conversion to pixel values.

Shapes: ``images`` are uint8 ``[H, W, 3]`` or ``[N, H, W, 3]`` (what PIL / numpy / ``datasets`` give);
``pixel_values`` are float32 ``[3, H, W]`` or ``[N, 3, H, W]``, rescaled to [0, 1] and normalised per channel,
exactly what the checkpoint's ``preprocessor_config.json`` describes and what ``pipeline("image-classification")``
computes. Resizing is left to the caller (the train app resizes with PIL's bilinear filter, like the processor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

#: used only when a checkpoint has no image processor (the ViT family's default)
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Normalization:
    """Square input size and per-channel mean / std of a checkpoint; ``source`` says where they came from."""

    size: int
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    source: str = "default"


def _read_processor_config(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """``preprocessor_config.json`` of a local directory or a (cached) Hub id, or None when there is none."""
    local = Path(path) / "preprocessor_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        return None
    from transformers.utils import cached_file

    try:
        file = cached_file(str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:  # offline without a cached copy, or no such repository
        return None
    return json.loads(Path(file).read_text()) if file else None


def _config_size(config: Any) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def image_normalization(path: Union[str, Path], config: Any = None) -> Normalization:
    """Input size and normalisation of checkpoint ``path`` (a local directory or Hub id).

    From its image processor when it has one (``size``, ``image_mean`` / ``image_std``; ``do_normalize=False``
    means mean 0 / std 1); otherwise the model config's ``image_size`` with mean = std = 0.5. ``config`` (the
    model's ``PretrainedConfig``) saves reading ``config.json`` again.
    """
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    size = _config_size(config)
    proc = _read_processor_config(path)
    if proc is None:
        return Normalization(size, source="default (no image processor)")
    proc_size = proc.get("size") or {}
    if isinstance(proc_size, dict):
        size = int(proc_size.get("height") or proc_size.get("shortest_edge") or size)
    elif isinstance(proc_size, int):
        size = proc_size
    if not proc.get("do_normalize", True):
        return Normalization(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "image processor (do_normalize=False)")
    mean = tuple(float(v) for v in proc.get("image_mean", DEFAULT_MEAN))
    std = tuple(float(v) for v in proc.get("image_std", DEFAULT_STD))
    return Normalization(size, mean, std, "image processor")


def to_pixel_values(images: Union[np.ndarray, torch.Tensor], norm: Normalization) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]``: ``(images / 255 - mean) / std``."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, copy=True))
    x = x.to(torch.float32).movedim(-1, -3) / 255.0
    shape = (3, 1, 1)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(norm.std, dtype=torch.float32).view(shape)
    return (x - mean) / std


def save_image_processor(out_dir: Union[str, Path], base: Union[str, Path, None], norm: Normalization) -> Path:
    """Write ``out_dir/preprocessor_config.json`` so that ``pipeline(..., model=out_dir)`` preprocesses like training.

    The base checkpoint's own processor is copied when it has one; otherwise a ViT image processor is written
    from ``norm`` (resize to ``norm.size`` square, bilinear; rescale 1/255; normalise with ``norm``).
    """
    out = Path(out_dir)
    proc = _read_processor_config(base) if base is not None else None
    if proc is None:
        proc = {
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,
            "size": {"height": norm.size, "width": norm.size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(norm.mean), "image_std": list(norm.std),
        }
    path = out / "preprocessor_config.json"
    path.write_text(json.dumps(proc, indent=2) + "\n")
    return path
