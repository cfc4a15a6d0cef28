"""Invariance analysis of fine-tuning: linear CKA, identically-represented inputs, STIR and full reports.

A top-level package of its own: importing it has no side effects on PEFT (it never imports ``peft_ssf``, whose
import registers SSF with PEFT). ``peft_ssf.analysis`` re-exports it for users of the tuner; the ``peft-ssf
analyze`` command imports ``peft_ssf`` only when it loads a model dir (to load SSF adapters).

Implements the metrics of Merlin et al. (CoLLAs 2023) / Nanda et al. (ICML 2022, STIR) and the per-layer
feature-similarity comparison of the SSF paper, for Hugging Face ViT-family, Swin and ConvNeXt models (plain, or
wrapped in a ``PeftModel``, merged or not). Depends on torch and model outputs only; it does not use the SSF tuner.

Quick start::

    from peft_ssf_analysis import compare
    report = compare(pretrained, {"full": full_ft, "ssf": ssf_model}, images01, steps=100)
    print(report.summary())
    report.save("invariance_report")          # JSON, CSV and heatmaps, each with its per-layer noise floor

See docs/analysis.md for the definitions and how to read the heatmaps.
"""

from .cka import MinibatchCKA, center_gram, cka_from_grams, gram_linear, linear_cka
from .features import (
    FINAL,
    LayerProbe,
    Normalization,
    TokenMode,
    eval_mode,
    forward_to_layer,
    layer_names,
    layer_representations,
    resolve_normalization,
    unwrap_model,
)
from .protocol import PROTOCOLS, Protocol
from .report import InvarianceReport, compare
from .stir import (
    InversionCache,
    InversionResult,
    image_seed,
    invert,
    model_fingerprint,
    noise_baseline,
    noise_images,
    representation_grams,
    stir,
    stir_matrix,
)

SUBMODULES = ("cka", "cli", "features", "plots", "protocol", "report", "stir")

__all__ = [
    "FINAL",
    "InvarianceReport",
    "InversionCache",
    "InversionResult",
    "LayerProbe",
    "MinibatchCKA",
    "Normalization",
    "PROTOCOLS",
    "Protocol",
    "TokenMode",
    "center_gram",
    "cka_from_grams",
    "compare",
    "eval_mode",
    "forward_to_layer",
    "gram_linear",
    "image_seed",
    "invert",
    "layer_names",
    "layer_representations",
    "linear_cka",
    "model_fingerprint",
    "noise_baseline",
    "noise_images",
    "representation_grams",
    "resolve_normalization",
    "stir",
    "stir_matrix",
    "unwrap_model",
]
