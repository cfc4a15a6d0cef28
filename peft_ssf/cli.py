"""The ``merge`` and ``push`` commands of ``peft-ssf`` (parsing and dispatch live in ``peft_ssf_cli``).

``main`` and ``build_parser`` are re-exported from ``peft_ssf_cli`` so ``python -m peft_ssf.cli`` and existing
imports keep working; ``load_peft_model`` / ``load_base_model`` are the engine's loaders under their old names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from peft_ssf_cli import MAIN_HELP, build_parser, main

from .engine import image_normalization, load_adapter, load_pretrained, save_image_processor
from .engine.loading import resolve_base
from .io import atomic_output_dir, check_output_dir

__all__ = ["MAIN_HELP", "build_parser", "cmd_merge", "cmd_push", "load_base_model", "load_peft_model", "main"]


def load_base_model(path: str, num_labels: Optional[int] = None) -> torch.nn.Module:
    """A transformers model from ``path`` (image-classification class when it has one), ``num_labels`` classes."""
    return load_pretrained(path, None if num_labels is None else {i: f"LABEL_{i}" for i in range(num_labels)})


def load_peft_model(adapter: str, base: Optional[str] = None):
    """Base model + adapter from disk, in eval mode (see ``peft_ssf.engine.load_adapter``)."""
    return load_adapter(adapter, base)


def _probe_inputs(model: torch.nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    size = getattr(model.config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, getattr(model.config, "num_channels", 3), size, size, generator=g)}


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base, check the merged outputs on a probe batch, then write model + processor."""
    check_output_dir(args.out, args.overwrite)
    base = resolve_base(Path(args.adapter), args.base)
    peft_model = load_adapter(args.adapter, base)
    inputs = _probe_inputs(peft_model.get_base_model())
    before = _outputs(peft_model, inputs)
    merged = peft_model.merge_and_unload(safe_merge=True, progressbar=not args.no_progress).eval()
    after = _outputs(merged, inputs)
    err = ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item()
    tol = 1e-4 if before.dtype == torch.float32 else 2e-2
    if not err <= tol:
        print(f"peft-ssf merge: error: merged outputs differ from the adapter's by {err:.3g} (> {tol}); nothing "
              "written", file=sys.stderr)
        return 1
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        save_image_processor(tmp, base, image_normalization(base, merged.config))
    print(f"merged model written to {args.out} (probe max relative difference {err:.2e})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload an adapter directory with our model card."""
    peft_model = load_adapter(args.adapter, args.base)
    if args.base:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = args.base
    url = peft_model.push_to_hub(args.repo_id, private=args.private or None, commit_message=args.message,
                                 revision=args.revision, create_pr=args.create_pr)
    print(f"pushed adapter + model card to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
