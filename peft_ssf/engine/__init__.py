"""The shared engine of the applications (``peft-ssf train`` / ``demo`` / ``merge``, the examples, the benchmarks).

Each piece exists once, so the apps cannot disagree on it:

* ``methods``: the fine-tuning methods compared throughout the project (one label table), one model builder;
* ``images``: the one source of image size and normalisation (the checkpoint's image processor), pixels from
  uint8 images, the image processor saved next to a merged model;
* ``recipe``: the paper's optimisation recipe: the parameter groups (weight decay on the head's weight matrix
  only), the warm-up + cosine schedule, and the one plain training loop ``fit`` with ``evaluate``;
* ``loading``: the one loader for a saved model or adapter directory (``load_model``).

Importing ``peft_ssf`` does not import this package; it needs only the core's dependencies (torch, transformers,
peft, safetensors, huggingface_hub). Atomic file and directory writers live in ``peft_ssf.io``.
"""

from __future__ import annotations

from .images import (
    Normalization,
    image_normalization,
    save_image_processor,
    to_pixel_values,
)
from .loading import (
    AdapterLoadError,
    adapter_head_size,
    apply_labels,
    check_model_path,
    load_adapter,
    load_model,
    load_pretrained,
    read_labels,
)
from .methods import (
    HEAD_NAMES,
    METHODS,
    build_model,
    count_trainable,
    head_inputs,
    head_name,
    load_classifier,
    prepare_model,
)
from .recipe import Recipe, evaluate, fit, make_optimizer, param_groups, predict, warmup_cosine

__all__ = [
    "HEAD_NAMES",
    "METHODS",
    "AdapterLoadError",
    "Normalization",
    "Recipe",
    "adapter_head_size",
    "apply_labels",
    "check_model_path",
    "build_model",
    "count_trainable",
    "evaluate",
    "fit",
    "head_inputs",
    "head_name",
    "image_normalization",
    "load_adapter",
    "load_classifier",
    "load_model",
    "load_pretrained",
    "make_optimizer",
    "param_groups",
    "predict",
    "prepare_model",
    "read_labels",
    "save_image_processor",
    "to_pixel_values",
    "warmup_cosine",
]
