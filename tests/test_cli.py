"""The command line and the package's shape: a light core, a fast `--help`, one-line user errors, no import cycles."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from peft import get_peft_model

import peft_ssf_cli
from peft_ssf import SSFConfig

REPO = Path(__file__).resolve().parents[1]
APP_MODULES = ("peft_ssf.train", "peft_ssf_cli", "peft_ssf.demo", "peft_ssf.analysis", "peft_ssf.engine",
               "peft_ssf_cli.commands")
HEAVY_EXTRAS = ("datasets", "evaluate", "matplotlib")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return set(out.split())


def test_import_peft_ssf_loads_nothing_beyond_peft_but_the_core():
    """`import peft` already brings torch, transformers, accelerate and PIL; the tuner adds only its own core."""
    plain = _modules_after("import peft")
    ours = _modules_after("import peft_ssf")
    extra = sorted(ours - plain)
    assert all(m == "peft_ssf" or m.startswith("peft_ssf.") for m in extra), extra
    assert not [m for m in ours if m.split(".")[0] in HEAVY_EXTRAS]
    assert not [m for m in ours if m.startswith(APP_MODULES)]


HEAVY = {"torch", "transformers", "peft", "peft_ssf", "datasets", "numpy", "safetensors", "huggingface_hub"}


def _modules_after_cli(args: list[str]) -> tuple[int, str, set[str]]:
    """Run ``peft-ssf ARGS`` in a fresh interpreter; (exit status, stdout, modules imported by then)."""
    code = ("import runpy, sys\nsys.argv = ['peft-ssf', *sys.argv[1:]]\nstatus = 0\ntry:\n"
            "    runpy.run_module('peft_ssf_cli', run_name='__main__')\nexcept SystemExit as exc:\n"
            "    status = exc.code or 0\nprint('MODULES', *sorted(sys.modules))\nsys.exit(status)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    head, _, modules = res.stdout.rpartition("MODULES ")
    return res.returncode, head, set(modules.split())


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["demo", "--help"], ["merge", "--help"],
                                  ["push", "--help"]])
def test_help_imports_no_framework(args):
    """`--help` is answered by the standard library alone (what makes it fast; the timing is in
    benchmarks/cli_startup.py, never asserted in a test)."""
    status, out, modules = _modules_after_cli(args)
    assert status == 0 and "usage: peft-ssf" in out, out
    assert not {m.split(".")[0] for m in modules} & HEAVY, sorted({m.split(".")[0] for m in modules} & HEAVY)


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file, lazy imports included)."""
    files = [*REPO.glob("peft_ssf/**/*.py"), *REPO.glob("peft_ssf_cli/**/*.py")]
    names = {}
    for f in files:
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in names.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in names]
                deps.update(subs or [target])
        # importing one's own parent package is always a no-op (it is being initialised)
        graph[name] = {d for d in deps if d in names and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_cycles_and_the_core_never_imports_the_apps():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path[path.index(dep):], dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    core = ("peft_ssf.config", "peft_ssf.layer", "peft_ssf.model", "peft_ssf.ops", "peft_ssf.residual",
            "peft_ssf.registration", "peft_ssf.presets", "peft_ssf.hub", "peft_ssf")
    for module in core:
        assert not [d for d in graph[module] if d.startswith(APP_MODULES)], module


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    parser = peft_ssf_cli.build_parser()
    for command, sub in _subparsers(parser).items():
        if command == "analyze":  # its options come from peft_ssf.analysis (checked there)
            continue
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            shown = sub._get_formatter()._get_help_string(action) % {"default": action.default}
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            assert "default" in shown or "(required)" in shown, f"{command} {action.option_strings[0]}: {shown}"


def _image_dir(root: Path, classes: tuple[str, ...], per_class: int = 2) -> Path:
    from PIL import Image

    for split in ("train", "validation"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 7 * j, 90)).save(root / split / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    import shutil

    from conftest import tiny_swin
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from transformers import ViTConfig, ViTForImageClassification

    from peft_ssf.hub import write_model_card

    root = tmp_path_factory.mktemp("cli")
    tiny_vit(num_labels=3).save_pretrained(root / "base")
    tiny_swin(num_labels=3).save_pretrained(root / "swin")
    ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
                              ).save_pretrained(root / "wide")
    model = get_peft_model(tiny_vit(num_labels=3), SSFConfig(modules_to_save=["classifier"]))
    model.save_pretrained(root / "no_base")  # built from a config: records no base model
    write_model_card(model, root / "no_base")
    shutil.copytree(root / "no_base", root / "corrupt")
    weights = root / "corrupt" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:24] = b"{not json at all"  # the header
    weights.write_bytes(bytes(raw))
    (root / "fifo").mkdir()
    shutil.copy(root / "no_base" / "adapter_config.json", root / "fifo")
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")
    (root / "occupied").mkdir()
    (root / "occupied" / "keep.txt").write_text("x")
    (root / "data" / "train" / "a").mkdir(parents=True)
    _image_dir(root / "images", ("cat", "dog"))
    _image_dir(root / "one_class", ("cat",))
    rows = [{"picture": f"{root}/images/train/cat/0.png", "category": 0},
            {"picture": f"{root}/images/train/dog/0.png", "category": 1}]
    features = Features({"picture": Image(), "category": Value("int64")})
    DatasetDict({s: Dataset.from_list(rows, features=features) for s in ("train", "validation")}
                ).save_to_disk(str(root / "category"))
    (root / "afile").write_text("a file, not a directory")
    return root


def _bad_invocations(root: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one-line error must say) for every subcommand."""
    base, occupied, data = str(root / "base"), str(root / "occupied"), str(root / "data")
    out, missing, adapter = str(root / "new"), str(root / "missing"), str(root / "no_base")
    train = ["train", "--model", base, "--dataset", data, "--output_dir"]
    images = ["train", "--model", base, "--dataset", str(root / "images"), "--output_dir", out, "--no_progress"]
    merge = ["merge", "--no_progress", "--adapter", adapter, "--base", base, "--output_dir"]
    return [
        (["bogus"], "invalid choice: 'bogus'"),
        (["train"], "the following arguments are required: --model, --dataset, --output_dir/--out"),
        ([*train, out, "--epochs", "many"], "argument --epochs: invalid float value: 'many'"),
        ([*train, out, "--epochs", "-1"], "argument --epochs: must be a positive number, got -1"),
        ([*train, out, "--epochs", "0"], "argument --epochs: must be a positive number, got 0"),
        ([*train, out, "--batch_size", "0"], "argument --batch_size: must be a positive integer, got 0"),
        ([*train, out, "--max_steps", "0"], "argument --max_steps: must be -1 (use --epochs) or a positive"),
        ([*train, out, "--threads", "0"], "argument --threads: must be a positive integer"),
        ([*train, out, "--overwrite_out"], "unrecognized arguments: --overwrite_out"),  # no prefix matching
        ([*train, occupied], "already exists and is not empty"),
        ([*train, str(root / "afile" / "run")], "is a file, not a directory"),
        ([*train, out, "--method", "full", "--save_merged"], "--save_merged and --push_to_hub apply to SSF"),
        (["train", "--model", base, "--dataset", missing, "--output_dir", out], "cannot load dataset"),
        (["train", "--model", missing, "--dataset", data, "--output_dir", out], f"model {missing!r} does not exist"),
        ([*images, "--target_modules", "qkv,fc3"], "cannot apply ssf to"),
        (["train", "--model", base, "--dataset", str(root / "one_class"), "--output_dir", out, "--no_progress"],
         "an imagefolder needs one folder per class and at least two classes"),
        (["train", "--model", base, "--dataset", str(root / "category"), "--output_dir", out],
         "no image / label column among the dataset's columns (picture, category): name it with --image_column "
         "and --label_column"),
        (["train", "--model", base, "--dataset", str(root / "category"), "--output_dir", out, "--image_column",
          "picture"], "no label column among the dataset's columns (picture, category): name it with --label_column"),
        (["train", "--model", base, "--dataset", str(root / "category"), "--output_dir", out, "--image_column",
          "picture", "--label_column", "label"], "--label_column 'label' is not a column of the dataset"),
        (["merge", "--adapter", missing, "--out", out], "has no adapter_config.json"),
        (["merge", "--adapter", adapter, "--out", out], "records no base model: pass --base"),
        ([*merge[:-2], missing, "--out", out], f"base model {missing!r} does not exist"),
        ([*merge, occupied], "already exists"),
        ([*merge, str(root / "afile" / "x")], "is a file, not a directory"),
        (["merge", "--no_progress", "--adapter", str(root / "corrupt"), "--base", base, "--out", out],
         "cannot load the adapter"),
        (["merge", "--no_progress", "--adapter", adapter, "--base", str(root / "swin"), "--out", out],
         "does not fit the base model"),
        (["merge", "--no_progress", "--adapter", adapter, "--base", str(root / "wide"), "--out", out],
         "first mismatching layer base_model.model.vit.embeddings.patch_embeddings.projection.ssf_scale.default"
         ": adapter torch.Size([32]), base torch.Size([48])"),
        (["merge", "--adapter", str(root / "fifo"), "--base", base, "--out", out], "is not a regular file"),
        ([*merge, adapter, "--overwrite"], f"--output_dir {adapter} is --adapter"),
        ([*merge, base, "--overwrite_output_dir"], f"--output_dir {base} is --base"),
        ([*merge, str(root / "no_base" / "merged")], "is inside --adapter"),
        ([*merge, str(root), "--overwrite"], "contains --adapter"),
        (["merge", "--adapter", adapter], "the following arguments are required: --output_dir/--out"),
        (["push", "--repo_id", "a/b"], "the following arguments are required: --adapter"),
        (["push", "--adapter", missing, "--repo_id", "a/b"], "has no adapter_config.json"),
        (["push", "--adapter", adapter, "--base", missing, "--repo_id", "a/b"], "does not exist"),
        (["push", "--no_progress", "--adapter", adapter, "--base", base, "--repo_id", "a/b"],
         "the upload to a/b failed"),
        (["demo", "--task", "nope"], "invalid choice: 'nope'"),
        (["demo", "--out", occupied], "already exists and is not empty"),
        (["demo", "--threads", "two"], "invalid int value: 'two'"),
        (["demo", "--epochs", "0"], "argument --epochs: must be a positive number, got 0"),
        (["analyze"], "the following arguments are required"),
        (["analyze", "--pretrained", missing, "--finetuned", missing, "--images", data, "--out", out],
         "not found"),
    ]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (what "nothing written" compares)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_bad_invocations_are_one_line_errors_with_status_2_and_write_nothing(adapters, capsys):
    """Issues 24.3 / 24.4 / 25.6 / 25.13: each invocation is one line on stderr, exit 2, nothing written."""
    for argv, expected in _bad_invocations(adapters):
        before = _tree(adapters)
        try:
            status = peft_ssf_cli.main(argv)
        except SystemExit as exc:  # argparse's own exit
            status = exc.code
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert status == 2, (argv, status, err)
        assert len(lines) == 1 and lines[0].startswith("peft-ssf"), (argv, err)
        assert expected in lines[0], (argv, lines[0])
        assert "Traceback" not in out + err
        assert _tree(adapters) == before, (argv, set(_tree(adapters)) ^ set(before))


def test_console_script_errors_have_no_traceback(adapters):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = ["merge", "--adapter", str(adapters / "no_base"), "--out", str(adapters / "new")]
    res = subprocess.run([sys.executable, "-m", "peft_ssf_cli", *argv], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"peft-ssf merge: error: {adapters / 'no_base'}/adapter_config.json records no base model: pass --base "
        "PATH_OR_ID"]


def test_missing_optional_dependency_names_the_extra(adapters, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    status = peft_ssf_cli.main(["train", "--model", str(adapters / "base"), "--dataset", str(adapters / "data"),
                                "--output_dir", str(adapters / "new")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == ("peft-ssf train: error: missing optional dependency 'datasets': "
                                   "pip install 'peft-ssf[train]'")


def test_merge_writes_a_deployable_model(adapters, capsys):
    from transformers import AutoModelForImageClassification

    out = adapters / "merged"
    assert peft_ssf_cli.main(["merge", "--adapter", str(adapters / "no_base"), "--base", str(adapters / "base"),
                              "--out", str(out), "--no_progress"]) == 0
    assert "merged model written" in capsys.readouterr().out
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 3


def test_merge_and_load_model_restore_the_class_names(tmp_path, capsys):
    """Issue 24.2: the adapter stores id2label / label2id (labels.json); merge and engine.load_model restore them."""
    from transformers import AutoModelForImageClassification, pipeline

    from peft_ssf.engine import load_model
    from peft_ssf.hub import write_model_card

    names = {0: "cat", 1: "dog", 2: "fish"}
    base = tiny_vit(num_labels=3)
    base.save_pretrained(tmp_path / "base")  # the base's own head: LABEL_0..2
    trained = tiny_vit(num_labels=3)
    trained.config.id2label, trained.config.label2id = names, {v: k for k, v in names.items()}
    model = get_peft_model(trained, SSFConfig(modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    write_model_card(model, tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "labels.json").read_text())
    assert stored == {"id2label": {"0": "cat", "1": "dog", "2": "fish"}, "label2id": {"cat": 0, "dog": 1, "fish": 2}}
    assert load_model(tmp_path / "adapter", tmp_path / "base").config.id2label == names
    assert load_model(tmp_path / "adapter", tmp_path / "base", merge=True).config.label2id == {"cat": 0, "dog": 1,
                                                                                               "fish": 2}
    out = tmp_path / "deploy"
    assert peft_ssf_cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                              "--out", str(out), "--no_progress"]) == 0
    assert AutoModelForImageClassification.from_pretrained(out).config.id2label == names
    classify = pipeline("image-classification", model=str(out), device="cpu")
    from PIL import Image

    result = classify(Image.new("RGB", (32, 32), (200, 30, 30)), top_k=3)
    assert sorted(r["label"] for r in result) == ["cat", "dog", "fish"]


def test_push_is_bounded_by_its_timeout(adapters, capsys, monkeypatch):
    """Issue 25.11: a Hub that never answers: the push gives up after --timeout with one line, exit 2."""
    import threading

    from huggingface_hub import HfApi

    release = threading.Event()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: release.wait(60))
    try:
        status = peft_ssf_cli.main(["push", "--adapter", str(adapters / "no_base"), "--base", str(adapters / "base"),
                                    "--repo_id", "a/b", "--timeout", "0.5", "--no_progress"])
    finally:
        release.set()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("peft-ssf push: error: the upload to a/b did not finish within 0.5 s")


def test_push_without_network_is_one_line(adapters, capsys, monkeypatch):
    """Issue 24.4 / 25.13: a connection error during the push (the 83-line double traceback before)."""
    from huggingface_hub import HfApi

    def no_network(self, repo_id, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    status = peft_ssf_cli.main(["push", "--adapter", str(adapters / "no_base"), "--base", str(adapters / "base"),
                                "--repo_id", "a/b", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["peft-ssf push: error: the upload to a/b failed (ConnectionError: [Errno 111] "
                                   "Connection refused); nothing local was changed: check the network and your token "
                                   "(`hf auth login`), then retry"]


def test_one_option_convention_with_dash_aliases():
    """Issue 24.9: underscores (transformers' examples), dashes accepted, the same names in every command."""
    parser = peft_ssf_cli.build_parser()
    dashed = parser.parse_args(["train", "--model", "m", "--dataset", "d", "--output-dir", "o",
                                "--overwrite-output-dir", "--no-progress", "--batch-size", "4"])
    plain = parser.parse_args(["train", "--model", "m", "--dataset", "d", "--output_dir", "o",
                               "--overwrite_output_dir", "--no_progress", "--batch_size", "4"])
    assert vars(dashed) == vars(plain) and plain.batch_size == 4 and plain.overwrite_output_dir
    for command, required in (("train", ["--model", "m", "--dataset", "d"]), ("merge", ["--adapter", "a"]),
                              ("demo", [])):
        for out, overwrite in (("--output_dir", "--overwrite_output_dir"), ("--out", "--overwrite"),
                               ("--output-dir", "--overwrite-output-dir")):
            args = vars(parser.parse_args([command, *required, out, "o", overwrite, "--no_progress"]))
            assert "o" in args.values() and True in args.values(), (command, out, overwrite)
    # what the errors tell the user to pass exists in every command that writes an output directory
    from peft_ssf.io import OutputExistsError, check_output_dir

    try:
        check_output_dir(REPO, overwrite=False)
    except OutputExistsError as exc:
        named = exc.args[0].split("pass ")[1].rstrip(".")
    for command, required in (("train", ["--model", "m", "--dataset", "d", "--output_dir", "o"]),
                              ("merge", ["--adapter", "a", "--output_dir", "o"]), ("demo", [])):
        parser.parse_args([command, *required, named])


def test_one_cli_package_and_no_compatibility_leftovers():
    """Issue 24.10: one CLI package; no unused helpers of an unreleased package; PRESETS named like --preset."""
    import peft_ssf.presets
    import peft_ssf.train

    assert not (REPO / "peft_ssf" / "cli.py").exists()
    assert peft_ssf_cli.COMMANDS["merge"][0] == "peft_ssf_cli.commands:cmd_merge"
    assert not hasattr(peft_ssf.train, "_image_and_label_columns")
    assert peft_ssf.presets.PRESETS == ("paper", "all") and not hasattr(peft_ssf.presets, "PLACEMENTS")
    preset = next(a for a in _subparsers(peft_ssf_cli.build_parser())["train"]._actions if a.dest == "preset")
    assert tuple(preset.choices) == peft_ssf.presets.PRESETS


def test_unwritable_output_is_one_line_and_nothing_written(adapters, capsys, monkeypatch):
    """Issue 25.13: no write permission on the output's parent (simulated: the tests may run as root)."""
    import peft_ssf.io

    monkeypatch.setattr(peft_ssf.io.os, "access", lambda path, mode: False)
    before = _tree(adapters)
    status = peft_ssf_cli.main(["merge", "--no_progress", "--adapter", str(adapters / "no_base"), "--base",
                                str(adapters / "base"), "--output_dir", str(adapters / "new" / "deploy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"peft-ssf merge: error: cannot write output directory {adapters}/new/deploy: no "
                                   f"write permission on {adapters}"]
    assert _tree(adapters) == before


def test_python_api_wrong_hidden_size_names_the_first_mismatching_layer(adapters):
    """Issue 24.4: engine.load_model (the apps' loader) gives one line, not PyTorch's list of every mismatch."""
    from peft_ssf.engine import AdapterLoadError, load_model

    with pytest.raises(AdapterLoadError) as err:
        load_model(adapters / "no_base", adapters / "wide")
    message = str(err.value)
    assert "\n" not in message and "first mismatching layer" in message
    assert "adapter torch.Size([32]), base torch.Size([48]) (33 mismatching tensors)" in message


@pytest.mark.parametrize("family,task", [("bert", "SEQ_CLS"), ("roberta", "SEQ_CLS"), ("llama", "CAUSAL_LM"),
                                         ("t5", "SEQ_2_SEQ_LM")])
def test_merge_writes_a_deployable_text_model(tmp_path, capsys, family, task):
    """Text adapters merge through the CLI too: the base is loaded with the auto class of the adapter's task_type
    (a trained 3-class head for SEQ_CLS) and the merged model equals base + adapter."""
    import transformers
    from peft import PeftModel
    from text_models import text_inputs, tiny_text_model

    from peft_ssf.engine.loading import TEXT_TASK_CLASSES

    auto = getattr(transformers, TEXT_TASK_CLASSES[task])
    base = tiny_text_model(family, **({"num_labels": 2} if task == "SEQ_CLS" else {}))
    base.save_pretrained(tmp_path / "base")
    trained = tiny_text_model(family, seed=1, **({"num_labels": 3} if task == "SEQ_CLS" else {}))
    trained.load_state_dict({k: v for k, v in base.state_dict().items() if "classifier" not in k}, strict=False)
    model = get_peft_model(trained, SSFConfig(task_type=task, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    assert peft_ssf_cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                              "--out", str(out), "--no_progress"]) == 0
    assert "merged model written" in capsys.readouterr().out
    merged = auto.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(
        auto.from_pretrained(tmp_path / "base", **({"num_labels": 3, "ignore_mismatched_sizes": True}
                                                   if task == "SEQ_CLS" else {})),
        tmp_path / "adapter",
    ).eval()
    inputs = text_inputs(family)
    with torch.no_grad():
        want, got = reference(**inputs).logits, merged(**inputs).logits
    assert got.shape[-1] == (3 if task == "SEQ_CLS" else want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
