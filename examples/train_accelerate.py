"""SSF fine-tuning with a plain training loop and Hugging Face Accelerate, on one or many processes.

    # one process (CPU or one GPU), on an imagefolder dataset (e.g. written by `peft-ssf demo`)
    python examples/train_accelerate.py --model peft_ssf/demo/backbone --dataset ssf-demo-output/data/orientation \\
        --output_dir runs/acc
    # several processes: DDP on GPUs (FSDP / DeepSpeed configs: README.md, section "Accelerate")
    accelerate launch --num_processes 2 examples/train_accelerate.py --model ... --dataset ... --output_dir ...
    # several CPU processes with the gloo backend (what CI runs)
    torchrun --nproc_per_node 2 examples/train_accelerate.py --tiny --synthetic 64 --cpu --output_dir runs/ddp

The number of classes comes from the dataset (its label names); `--num_labels` is only for `--synthetic` data.
Labels that do not fit the head stop the run before training, with the label and the head size in the message.
`--batch_size` is per process: N processes with batch b see the same samples per step as one process with batch
N*b, and (gradients being averaged) end with the same SSF parameters up to float rounding.
Each process writes its final trainable parameters to OUTPUT_DIR/rank{R}.safetensors; the main process also saves
the adapter (save_pretrained, with its model card and labels.json) to OUTPUT_DIR/adapter, with FSDP too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import peft_ssf
from peft_ssf import engine
from peft_ssf.errors import UserError
from peft_ssf.hub import write_model_card
from peft_ssf.train import ImageTransform, check_labels, dataset_labels, image_and_label_columns, load_image_dataset
from peft_ssf_cli import ArgumentParser, positive_float, positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="train_accelerate.py", description=__doc__)
    p.add_argument("--model", default=None, help="model id or local path (or --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny ViT built from a config (tests)")
    p.add_argument("--dataset", default=None, help="imagefolder / save_to_disk directory or Hub id (or --synthetic)")
    p.add_argument("--synthetic", type=positive_int, default=None, help="use N synthetic images instead of a dataset")
    p.add_argument("--num_labels", type=positive_int, default=None,
                   help="classes of --synthetic data (default 4); with --dataset: must match the dataset's labels")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per step and process")
    p.add_argument("--steps", type=positive_int, default=8, help="optimiser steps")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="weight decay of the head's weight matrix")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, the data and their order")
    p.add_argument("--shuffle", action="store_true", help="shuffle (Accelerate keeps the order in sync)")
    p.add_argument("--cpu", action="store_true", help="force CPU (gloo backend when multi-process)")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="Accelerate's autocast")
    p.add_argument("--skip_key_shift", action="store_true",
                   help="drop the inert key-projection shift (its zero gradient is pure rounding noise, which Adam "
                        "amplifies differently on different process counts)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (works on CPU with gloo too)")
    p.add_argument("--output_dir", required=True, help="where rank files, the adapter and run.json go")
    args = p.parse_args(argv)
    if not (args.tiny or args.model):
        p.error("pass --model or --tiny")
    if not (args.synthetic or args.dataset):
        p.error("pass --dataset or --synthetic N")
    return args


def build_data(args: argparse.Namespace) -> tuple[TensorDataset, dict[int, str]]:
    """(images as normalised tensors + labels, id2label): ``--synthetic N`` images or a dataset's train split."""
    if args.synthetic:
        n = args.num_labels or 4
        size = 32 if args.tiny else engine.image_normalization(args.model).size
        g = torch.Generator().manual_seed(args.seed)
        x = torch.rand(args.synthetic, 3, size, size, generator=g)
        y = (x[:, 0].mean(dim=(1, 2)) * n * 0.999).long().clamp_max(n - 1)
        return TensorDataset(x, y), {i: str(i) for i in range(n)}
    ds = load_image_dataset(args.dataset, seed=args.seed, progress=False)
    image_col, label_col = image_and_label_columns(ds)
    id2label = dataset_labels(ds, label_col)
    num_labels = args.num_labels or len(id2label)
    check_labels(ds, label_col, num_labels)  # a --num_labels smaller than the data's labels stops here
    id2label = {i: id2label.get(i, str(i)) for i in range(num_labels)}
    norm = engine.image_normalization(args.model) if args.model else engine.Normalization(32)
    transform = ImageTransform(norm.size, norm.mean, norm.std)
    x = torch.stack([transform(row[image_col]) for row in ds["train"]])
    return TensorDataset(x, torch.tensor(ds["train"][label_col])), id2label


def build_model(args: argparse.Namespace, id2label: dict[int, str]) -> torch.nn.Module:
    """The SSF-wrapped classifier (head for ``id2label`` trainable)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(args.seed)
    if args.tiny:
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=32, patch_size=8, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        model = ViTForImageClassification(cfg)
    else:
        model = engine.load_classifier(args.model, id2label)
    return engine.prepare_model(model, "ssf", skip_key_shift=args.skip_key_shift)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks / stages of an HF vision model (what FSDP shards one by one)."""
    for name in ("layers", "layer", "blocks", "stages"):
        blocks = [m for n, m in model.named_modules() if n.endswith("." + name) and isinstance(m, torch.nn.ModuleList)]
        if blocks:
            return [b for ml in blocks for b in ml]
    return []


def prepare(args, model, loader) -> tuple:
    """Accelerator, model, optimiser, loader and whether torch's FSDP2 was applied by hand (CPU processes)."""
    plugin = None
    if args.fsdp and not args.cpu:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, fsdp_plugin=plugin)
    manual_fsdp = args.fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU
    if manual_fsdp:
        # Accelerate only enables FSDP on accelerators; on CPU processes (gloo) we apply torch's FSDP2 ourselves:
        # one shard group per transformer block, then the root.
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
    optimizer = engine.make_optimizer(model, args.lr, args.weight_decay)
    if manual_fsdp:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader, manual_fsdp


def train_loop(args, accelerator, model, optimizer, loader) -> None:
    """The Accelerate loop: forward, ``accelerator.backward``, step, for ``args.steps`` steps."""
    model.train()
    step = 0
    while step < args.steps:
        for x, y in loader:
            loss = model(pixel_values=x, labels=y).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if accelerator.is_main_process and (step % 5 == 0 or step == args.steps):
                print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                return


def save(args, accelerator, model, manual_fsdp: bool, seconds: float, id2label: dict[int, str]) -> None:
    """Every rank's trainable parameters; the adapter (with its card and labels) and run.json from the main process.

    Under FSDP the parameters are sharded: every rank gathers the full values (``full_tensor``, a collective), and
    the main process writes them through an unsharded copy of the model, so ``OUTPUT_DIR/adapter`` is the same
    ``save_pretrained`` directory as without FSDP.
    """
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
                 for n, p in unwrapped.named_parameters() if p.requires_grad}
    save_file(trainable, str(out / f"rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if manual_fsdp:  # sharded parameters: load the gathered full values into an unsharded model, save that
            unwrapped = build_model(args, id2label)
            missing = set(trainable) - set(unwrapped.state_dict())
            if missing:
                raise RuntimeError(f"gathered parameters not in the unsharded model: {sorted(missing)[:3]}")
            unwrapped.load_state_dict(trainable, strict=False)
        unwrapped.save_pretrained(out / "adapter")
        write_model_card(unwrapped, out / "adapter")
        info = {"distributed_type": "FSDP2 (torch, gloo)" if manual_fsdp else str(accelerator.distributed_type),
                "num_processes": accelerator.num_processes, "per_process_batch": args.batch_size,
                "steps": args.steps, "seconds": round(seconds, 2), "peft_ssf": peft_ssf.__version__}
        (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # everything that can be wrong with the inputs is checked before any process group exists
        data, id2label = build_data(args)
        model = build_model(args, id2label)
    except UserError as exc:
        print(f"train_accelerate.py: error: {exc}", file=sys.stderr)
        return 2
    set_seed(args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=args.shuffle, drop_last=True)
    accelerator, model, optimizer, loader, manual_fsdp = prepare(args, model, loader)
    start = time.time()
    train_loop(args, accelerator, model, optimizer, loader)
    save(args, accelerator, model, manual_fsdp, time.time() - start, id2label)
    accelerator.wait_for_everyone()  # no rank tears its process group down while another still writes or reduces
    accelerator.end_training()
    return 0


def _exit_worker(code: int) -> None:
    """Leave a finished ``torchrun`` worker without interpreter teardown.

    Gloo's worker threads can still hold collective work objects (FSDP2 issues asynchronous ones) whose tensors are
    freed during interpreter finalization, when taking the GIL is no longer possible: the process then aborts with
    "terminate called without an active exception" after a clean run (seen about once in ten 2-process FSDP2 runs).
    By the time ``main`` returns everything is written and the process group is destroyed, so nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(exit_code)
    sys.exit(exit_code)
