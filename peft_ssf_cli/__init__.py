"""The ``peft-ssf`` command line: argument parsing and dispatch, with nothing heavy imported before it is needed.

This is a separate top-level package on purpose: importing anything inside ``peft_ssf`` first runs
``peft_ssf/__init__``, which registers SSF with PEFT and so imports torch, transformers and peft (seconds).
Here the arguments are parsed (and ``--help`` answered) with the standard library alone; only then is the
command's implementation imported:

=========  ==============================  =====================================================================
command    implementation                  what it does
=========  ==============================  =====================================================================
demo       ``peft_ssf.demo.run.cmd_demo``  the SSF story offline on CPU: fine-tune, compare, merge, reload
train      ``peft_ssf.train.run_train``    fine-tune an image / text classifier with SSF (or a baseline), ``Trainer``
merge      ``.commands.cmd_merge``         fold an adapter into its base model, save a plain transformers model
push       ``.commands.cmd_push``          upload an adapter with its model card to the Hugging Face Hub
analyze    ``peft_ssf.analysis.cli``       invariance report: what fine-tuning did to each layer
=========  ==============================  =====================================================================

Every user error (bad option, missing path, non-empty output, labels that do not fit the head, a missing
optional dependency, no network for a push) is one line on stderr and exit status 2, with nothing written.

One spelling convention, transformers' examples': options are spelled with underscores (``--output_dir``) and
the dash spelling (``--output-dir``) is accepted as an alias; prefixes of options are not (``--overwrite`` is an
option of its own, not an abbreviation). The same option has the same names in every command: ``--output_dir``
(alias ``--out``), ``--overwrite_output_dir`` (alias ``--overwrite``), ``--no_progress``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

PROG = "peft-ssf"
MAIN_HELP = """\
SSF ("Scaling & Shifting Your Features") for Hugging Face PEFT.

  peft-ssf demo                      the whole SSF story offline on CPU in a few minutes
  peft-ssf train --model M --dataset D --output_dir OUT     fine-tune with Trainer (see --help)
  peft-ssf merge --adapter DIR --output_dir DIR             fold an adapter into its base model
  peft-ssf push --adapter DIR --repo_id NAME/REPO           upload adapter + model card to the Hub
  peft-ssf analyze --pretrained P --finetuned F --images I --out DIR   invariance report

Run `peft-ssf COMMAND --help` for the options of one command. Options are spelled with underscores
(--output_dir); the dash spelling (--output-dir) is accepted too.
"""

#: command -> (implementation "module:function", extra that provides its optional dependencies)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peft_ssf.demo.run:cmd_demo", "demo"),
    "train": ("peft_ssf.train:run_train", "train"),
    "merge": ("peft_ssf_cli.commands:cmd_merge", ""),
    "push": ("peft_ssf_cli.commands:cmd_push", ""),
    "analyze": ("peft_ssf.analysis.cli:run_analyze", "analysis"),
}
TRAIN_METHODS = ("ssf", "head", "full")
DEMO_TASKS = ("digits", "texture", "counting", "orientation", "position")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (or that it is required) after its help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``.

    Options are written with underscores; the dash spelling of each is accepted as an alias (and the other way
    round for an option written with dashes). Abbreviations are not: an option is named in full.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _spelling(self, token: str) -> str:
        name, eq, value = token.partition("=")
        if name in self._option_string_actions:
            return token
        for alias in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if alias in self._option_string_actions:
                return alias + eq + value
        return token

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's
        args = list(sys.argv[1:] if args is None else args)
        if "--" in args:
            cut = args.index("--")
            args = [self._spelling(a) if a.startswith("--") else a for a in args[:cut]] + args[cut:]
        else:
            args = [self._spelling(a) if a.startswith("--") else a for a in args]
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def max_steps(text: str) -> int:
    """argparse type: -1 (use the epochs) or a positive number of steps."""
    value = _number(text, int)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be -1 (use --epochs) or a positive number of steps, got {text}")
    return value


def default_threads() -> int:
    """Torch threads for CPU training: 1 on small machines (<= 4 cores, often shared: extra threads spin and
    wait), else half the cores this process may use (about the physical cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``peft-ssf train`` / ``examples/train_image_classification.py``."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="model id or local path (an image or text classification checkpoint)")
    g.add_argument("--dataset", required=True, help="Hub dataset id, imagefolder dir, or save_to_disk dir")
    g.add_argument("--output_dir", "--out", dest="output_dir", required=True,
                   help="where checkpoints, the adapter and results go")
    g.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite_output_dir", action="store_true",
                   help="replace a non-empty output_dir: the earlier run's adapter, merged model, checkpoints and "
                        "results are removed first")
    g.add_argument("--max_train_samples", type=positive_int, default=None,
                   help="use only this many training examples (default: all)")
    g.add_argument("--image_column", default=None,
                   help="the dataset's image column (default: the first of image, img, pixel_values)")
    g.add_argument("--label_column", default=None,
                   help="the dataset's label column (default: the first of label, labels, fine_label)")
    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=TRAIN_METHODS, default="ssf",
                   help="ssf, head-only tuning, or full fine-tuning (for comparison)")
    g.add_argument("--target_modules", default=None,
                   help="comma-separated module names (default: the preset for the model type)")
    g.add_argument("--preset", default=None, choices=("paper", "all"),
                   help="placement when no targets are given (default: paper)")
    g.add_argument("--skip_key_shift", action="store_true", help="skip the inert shift of key projections")
    g.add_argument("--paper_init", action="store_true", help="scale ~ N(1, .02), shift ~ N(0, .02)")
    g.add_argument("--paper_recipe", action="store_true",
                   help="the paper's recipe: paper init and a cosine schedule with warm-up (the optimiser always "
                        "decays only the head's weight matrix)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_float, default=3.0, help="training epochs")
    g.add_argument("--max_steps", type=max_steps, default=-1, help="stop after this many steps; -1: use --epochs")
    g.add_argument("--batch_size", type=positive_int, default=32, help="examples per step (per device)")
    g.add_argument("--lr", type=positive_float, default=5e-3, help="peak learning rate of AdamW")
    g.add_argument("--weight_decay", type=nonnegative_float, default=0.05,
                   help="weight decay of the head's weight matrix")
    g.add_argument("--warmup_ratio", type=nonnegative_float, default=0.1,
                   help="fraction of the steps with linear warm-up")
    g.add_argument("--scheduler", default="cosine",
                   help="cosine (warm-up then cosine decay to 0) or any transformers lr_scheduler_type")
    g.add_argument("--seed", type=int, default=42, help="seed of the head init, the data order and augmentation")
    g.add_argument("--save_steps", type=positive_int, default=None,
                   help="checkpoint every N steps (default: each epoch)")
    g.add_argument("--save_total_limit", type=positive_int, default=2,
                   help="keep only the newest N checkpoints (older ones are deleted as training goes)")
    g.add_argument("--no_checkpoints", action="store_true", help="do not write resumable checkpoints")
    g.add_argument("--no_epoch_eval", action="store_true", help="evaluate only at the end, not every epoch")
    g.add_argument("--augment", action="store_true",
                   help="random-resized crop (scale 0.8-1) + horizontal flip; off by default because they change "
                        "the label of orientation / position tasks")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint dir, or 'latest' for the newest complete checkpoint in output_dir (default: "
                        "start fresh)")
    g.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="torch threads on CPU (1 on machines with up to 4 cores: more threads only wait for each "
                        "other there)")
    g.add_argument("--metric_backend", choices=("auto", "evaluate", "builtin"), default="auto",
                   help="accuracy via `evaluate` (needs the Hub once) or the built-in numpy version")
    g = parser.add_argument_group("outputs")
    g.add_argument("--save_merged", action="store_true",
                   help="also write the merged plain model (with its image processor or tokenizer) to "
                        "output_dir/merged")
    g.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                   help="upload the trained adapter + model card to this Hub repository, last, after everything "
                        "is saved locally (default: no upload)")
    g.add_argument("--push_timeout", type=positive_float, default=300.0,
                   help="seconds the upload may take before it is abandoned")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the offline SSF demo (fine-tune, compare, merge, reload) on CPU",
                       description="Fine-tune the shipped demo backbone three ways (head only, SSF, full) on a "
                                   "generated target task, merge the SSF adapter and reload it with plain "
                                   "transformers; prints a table and writes it to OUT/results.md.")
    p.add_argument("--output_dir", "--out", dest="out", default="ssf-demo-output",
                   help="where the demo writes its models, data and table")
    p.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true",
                   help="replace a non-empty output directory")
    p.add_argument("--quick", action="store_true", help="a much shorter run on less data (smoke test)")
    p.add_argument("--task", default="orientation", choices=DEMO_TASKS, help="target task")
    p.add_argument("--epochs", type=positive_float, default=20.0,
                   help="epochs per method (the transfer benchmark's protocol for orientation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the new heads and the data order")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads; fixed so that results do not depend on the machine's core count")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def _add_merge_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an SSF adapter into its base model and save a plain transformers model")
    p.add_argument("--adapter", required=True, help="directory written by save_pretrained (adapter_config.json ...)")
    p.add_argument("--base", default=None,
                   help="base model path or Hub id (default: the one recorded in the adapter config)")
    p.add_argument("--output_dir", "--out", dest="out", required=True,
                   help="output directory for the merged model and its image processor or tokenizer (not inside or "
                        "around the adapter or base)")
    p.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true",
                   help="replace a non-empty output directory")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    p = sub.add_parser("push", help="upload an SSF adapter with its model card to the Hugging Face Hub")
    p.add_argument("--adapter", required=True, help="directory written by save_pretrained")
    p.add_argument("--repo_id", required=True, help="e.g. your-name/vit-base-ssf-cifar100")
    p.add_argument("--base", default=None,
                   help="base model path or Hub id (default: the one recorded in the adapter config); a Hub id "
                        "is recorded as the card's base_model")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", default=None, help="commit message (default: 'Upload SSF adapter')")
    p.add_argument("--revision", default=None, help="branch to push to (default: the repository's main branch)")
    p.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="seconds the upload may take before it is abandoned (the Hub client itself has no timeout)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``peft-ssf`` parser (``analyze`` only by name: its options live in ``peft_ssf.analysis.cli``)."""
    parser = ArgumentParser(prog=PROG, description=MAIN_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    _add_demo(sub)
    p = sub.add_parser("train", help="fine-tune an image or text classifier with SSF and Trainer")
    add_train_arguments(p)
    _add_merge_push(sub)
    sub.add_parser("analyze", help="invariance report: what fine-tuning did to each layer", add_help=False)
    return parser


def _missing_extra(command: str, extra: str, exc: ImportError) -> int:
    hint = f"pip install 'peft-ssf[{extra}]'" if extra else "pip install peft-ssf"
    print(f"{PROG} {command}: error: missing optional dependency {exc.name or exc}: {hint}", file=sys.stderr)
    return 2


def _load(command: str):
    module, _, name = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), name)


def _analyze(argv: list[str]) -> int:
    try:
        from peft_ssf_analysis.cli import add_analyze_arguments, run_analyze
    except ImportError as exc:
        return _missing_extra("analyze", "analysis", exc)
    parser = ArgumentParser(prog=f"{PROG} analyze", description="Invariance report of fine-tuned models against "
                                                                 "their pretrained model, from local directories.")
    add_analyze_arguments(parser)
    return run_analyze(parser.parse_args(argv))


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``peft-ssf`` with ``argv`` (default: the process arguments); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] == "analyze":
        return _analyze(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        func = _load(args.command)
    except ImportError as exc:
        return _missing_extra(args.command, COMMANDS[args.command][1], exc)
    from peft_ssf.errors import UserError

    try:
        return int(func(args) or 0)
    except UserError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
