"""The ``merge`` and ``push`` commands of ``peft-ssf`` (imported only when one of them runs: they need torch).

Both check everything they can before doing anything: ``merge`` writes nothing unless the adapter loads onto the
base and the merged model reproduces the adapter's outputs on a probe batch; ``push`` uploads with a time limit
and reports a failed upload (no network, no permission) as one line.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peft_ssf.engine import image_normalization, load_adapter, save_image_processor
from peft_ssf.engine.loading import check_model_path, resolve_base
from peft_ssf.errors import UserError
from peft_ssf.io import atomic_output_dir, check_output_dir

__all__ = ["HubPushError", "cmd_merge", "cmd_push", "run_with_timeout"]


class HubPushError(UserError, ConnectionError):
    """An upload to the Hub failed or timed out; nothing local was lost."""


def run_with_timeout(func: Callable[[], Any], seconds: float, what: str) -> Any:
    """``func()`` in a daemon thread; its result, or ``HubPushError`` after ``seconds`` or on a network error.

    The Hub client has no timeout of its own (an endpoint that accepts and never answers hangs it forever); the
    abandoned thread is a daemon, so it cannot keep the process alive.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - re-raised (or reported) in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"peft-ssf {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise HubPushError(f"{what} did not finish within {seconds:g} s (no answer from the Hub); nothing local was "
                           "changed: check the network and retry, or raise the timeout")
    error = result.get("error")
    if error is None:
        return result.get("value")
    if isinstance(error, UserError):
        raise error
    if isinstance(error, (OSError, ConnectionError, TimeoutError, ValueError, RuntimeError)) or \
            type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "huggingface_hub"):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HubPushError(f"{what} failed ({type(error).__name__}: {first}); nothing local was changed: check the "
                           "network and your token (`hf auth login`), then retry") from error
    raise error


def _probe_inputs(model: torch.nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    """A fixed batch the model accepts: images, or token ids for a text model (decoder ids too for seq2seq)."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    if getattr(config, "image_size", None) is None and getattr(config, "vocab_size", None):
        ids = torch.randint(0, min(config.vocab_size, 1000), (batch, 16), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :8]
        return inputs
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=g)}


def _save_preprocessor(out: str | Path, base: str, merged: torch.nn.Module) -> None:
    """Beside the merged model: the base's tokenizer for a text model (when it has one), else the image processor."""
    if "input_ids" not in _probe_inputs(merged, 1):
        save_image_processor(out, base, image_normalization(base, merged.config))
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError, KeyError):  # a base without tokenizer files (tiny test models)
        print(f"note: {base} has no tokenizer; the merged model is written without one")
        return
    tokenizer.save_pretrained(out)


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _refuse_overlap(out: str, **inputs: str) -> None:
    """``out`` must be neither an input directory, nor inside one, nor around one (even with --overwrite)."""
    target = Path(out).expanduser().resolve()
    for option, path in inputs.items():
        if not path or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "is inside" if source in target.parents else "contains"
            raise UserError(f"--output_dir {out} {relation} --{option} {path}: merging would replace the input; "
                            "choose another output directory")


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base, check the merged outputs on a probe batch, then write model + processor."""
    _refuse_overlap(args.out, adapter=args.adapter, base=args.base)
    check_output_dir(args.out, args.overwrite)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    base = resolve_base(Path(args.adapter), args.base)
    _refuse_overlap(args.out, base=base)
    check_model_path(base, "base model")
    peft_model = load_adapter(args.adapter, base)
    inputs = _probe_inputs(peft_model.get_base_model())
    before = _outputs(peft_model, inputs)
    merged = peft_model.merge_and_unload(safe_merge=True, progressbar=not args.no_progress).eval()
    after = _outputs(merged, inputs)
    err = ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item()
    tol = 1e-4 if before.dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise UserError(f"merged outputs differ from the adapter's by {err:.3g} (> {tol}); nothing written")
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        _save_preprocessor(tmp, base, merged)
    print(f"merged model written to {args.out} (probe max relative difference {err:.2e})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload an adapter directory with our model card (within ``--timeout`` seconds)."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.base:
        check_model_path(args.base, "base model")
    peft_model = load_adapter(args.adapter, args.base)
    if args.base:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = args.base
    url = run_with_timeout(
        lambda: peft_model.push_to_hub(args.repo_id, private=args.private or None, commit_message=args.message,
                                       revision=args.revision, create_pr=args.create_pr),
        args.timeout, f"the upload to {args.repo_id}")
    print(f"pushed adapter + model card to {args.repo_id}: {url}")
    return 0
