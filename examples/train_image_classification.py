"""Fine-tune an image classifier with SSF and transformers' Trainer (the same program as `peft-ssf train`).

Offline, on the demo backbone and the task data `peft-ssf demo` (or `make demo`) writes:

    python examples/train_image_classification.py --model peft_ssf/demo/backbone \\
        --dataset ssf-demo-output/data/orientation --output_dir runs/ssf --paper_recipe --epochs 10 --save_merged

With a Hub model and dataset (needs network):

    python examples/train_image_classification.py --model google/vit-base-patch16-224-in21k \\
        --dataset cifar100 --output_dir runs/c100 --paper_recipe --push_to_hub me/vit-ssf-c100

Resume an interrupted run: add `--resume_from_checkpoint latest` (or a checkpoint directory). All the work is in
`peft_ssf.train`; the options are `peft_ssf_cli.add_train_arguments`.
"""

from __future__ import annotations

import sys

from peft_ssf_cli import ArgumentParser, add_train_arguments


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="train_image_classification.py", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    from peft_ssf.errors import UserError
    from peft_ssf.train import run_train

    try:
        return run_train(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
