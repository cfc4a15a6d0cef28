"""Data safety and option checking of ``peft-ssf analyze`` and of saved invariance reports (issue 25 items 7, 13).

Every refused invocation must print one line on stderr, exit with status 2 and write nothing. Tiny offline models.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
                    patch_size=8, num_labels=2)  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def _write_images(folder, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for k in range(count):
        array = (torch.rand(18, 18, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{k:03d}.png")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pretrained dir, two fine-tuned dirs and a folder of 6 images."""
    root = tmp_path_factory.mktemp("analysis_safety")
    _tiny_vit(0).save_pretrained(root / "pre")
    _tiny_vit(1).save_pretrained(root / "a")
    _tiny_vit(2).save_pretrained(root / "b")
    _write_images(root / "imgs", 6)
    return root


def _argv(root, out, *extra: str, finetuned=("a", "b")) -> list[str]:
    return [
        "--pretrained", str(root / "pre"), "--finetuned", *(str(root / f) for f in finetuned),
        "--images", str(root / "imgs"), "--out", str(out), "--steps", "2", "--n", "4", "--layers", "block1",
        "final", "--mean", "0.5", "--std", "0.5", "--quiet", "--no-plots", *extra,
    ]  # fmt: skip


def _analyze(argv: list[str]) -> int:
    from peft_ssf_cli import main

    return main(["analyze", *argv])


def _one_line_exit_2(capfd, argv: list[str]) -> str:
    assert _analyze(argv) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# --------------------------------------------------------------------------------------------------------------------
# 25.7: report files
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("ssf/x", "ssf_x"), ("SSF", "ssf"), ("a b", "a_b"), ("x", "Pretrained")])
def test_colliding_names_are_refused_before_anything_is_written(models, tmp_path, capfd, names):
    out = tmp_path / "out"
    err = _one_line_exit_2(capfd, _argv(models, out, "--names", *names))
    assert "--names" in err and "same report files" in err
    assert not out.exists()


def test_report_save_refuses_colliding_model_names(models, tmp_path):
    from peft_ssf_analysis import compare

    x = torch.rand(4, 3, 16, 16)
    report = compare(_tiny_vit(0), {"ssf/x": _tiny_vit(1)}, x, steps=1, layers=["final"], mean=0.5, std=0.5,
                     progress=False, reverse=False, within=False)  # fmt: skip
    report.finetuned.append("ssf_x")
    report.R["ssf_x"] = report.R["ssf/x"]
    with pytest.raises(ValueError, match="same report files"):
        report.save(tmp_path / "lib", plots=False)
    assert not (tmp_path / "lib").exists()


def _wrote(stdout: str) -> int:
    return int(re.search(r"wrote (\d+) files", stdout).group(1))


def test_wrote_count_matches_the_files_and_overwrite_leaves_nothing_stale(models, tmp_path, capfd):
    out = tmp_path / "out"
    assert _analyze(_argv(models, out, "--names", "first", "second")) == 0
    first = sorted(p.name for p in out.iterdir())
    assert _wrote(capfd.readouterr().out) == len(first) == len(json.loads((out / "report.json").read_text())["files"])
    assert "R_second.csv" in first
    (out / "my_notes.txt").write_text("keep me")
    assert _analyze(_argv(models, out, "--names", "only", "--overwrite", finetuned=("a",))) == 0
    second = sorted(p.name for p in out.iterdir())
    listed = json.loads((out / "report.json").read_text())["files"]
    assert _wrote(capfd.readouterr().out) == len(listed)
    # every file of the first report that the second does not write is gone; the user's own file stays
    assert sorted(listed) == [n for n in second if n != "my_notes.txt"]
    assert not any("first" in n or "second" in n for n in second)
    assert (out / "my_notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_too_few_images_is_one_line_before_any_work(models, tmp_path, capfd, count):
    _write_images(tmp_path / f"imgs{count}", count)
    argv = _argv(models, tmp_path / "out")
    argv[argv.index(str(models / "imgs"))] = str(tmp_path / f"imgs{count}")
    err = _one_line_exit_2(capfd, argv)
    assert "at least 4 images" in err and f"got {count}" in err
    assert not (tmp_path / "out").exists()


def test_compare_refuses_two_images():
    from peft_ssf_analysis import compare

    with pytest.raises(ValueError, match="at least 4 images"):
        compare(_tiny_vit(0), _tiny_vit(1), torch.rand(2, 3, 16, 16), steps=1, mean=0.5, std=0.5, progress=False)


def test_report_json_is_strict_json_with_null_for_nan(tmp_path):
    from peft_ssf_analysis import compare

    report = compare(_tiny_vit(0), {"ft": _tiny_vit(1)}, torch.rand(4, 3, 16, 16), steps=1, layers=["final"],
                     mean=0.5, std=0.5, progress=False)  # fmt: skip
    report.R["ft"][0, 0] = math.nan
    report.inversion_loss["pretrained"]["final"]["mean"] = math.nan
    report.elapsed_s = math.inf
    report.save(tmp_path, plots=False)
    text = (tmp_path / "report.json").read_text()

    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")

    data = json.loads(text, parse_constant=refuse)
    assert data["R"]["ft"] == [[None]] and data["inversions"]["rel_loss"]["pretrained"]["final"]["mean"] is None
    assert data["elapsed_s"] is None and "null" in data["null"]


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--step-size", "nan"), "--step-size"),
        (("--step-size", "-1"), "--step-size"),
        (("--step-size", "inf"), "--step-size"),
        (("--tau", "nan"), "--tau"),
        (("--tau", "1.5"), "--tau"),
        (("--n", "2"), "--n"),
        (("--mean", "nan", "--std", "0.5"), "--mean"),
    ],
)
def test_invalid_numeric_options_are_refused(models, tmp_path, capfd, extra, says):
    argv = _argv(models, tmp_path / "out")
    for flag in ("--mean", "--std"):  # replace the defaults of _argv when the case sets them
        if flag in extra:
            i = argv.index(flag)
            del argv[i : i + 2]
    err = _one_line_exit_2(capfd, [*argv, *extra])
    assert says in err
    assert not (tmp_path / "out").exists()


def test_library_refuses_nan_step_size_and_tau():
    from peft_ssf_analysis import compare, invert

    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(ValueError, match="step_size"):
        invert(_tiny_vit(0), "final", x, steps=1, step_size=math.nan, mean=0.5, std=0.5, progress=False)
    with pytest.raises(ValueError, match="tau"):
        compare(_tiny_vit(0), _tiny_vit(1), x, steps=1, tau=math.nan, mean=0.5, std=0.5, progress=False)


# --------------------------------------------------------------------------------------------------------------------
# 25.13: analysis options, corrupt images, unwritable output: one line on stderr, exit 2, nothing written
# --------------------------------------------------------------------------------------------------------------------


def _corrupt_images(root, tmp_path):
    folder = tmp_path / "corrupt"
    _write_images(folder, 5)
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return ["--images", str(folder)], "002.png"


def _out_under_a_file(root, tmp_path):
    (tmp_path / "a_file").write_text("x")
    return ["--out", str(tmp_path / "a_file" / "report")], "not a directory"


def _no_cuda(root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["--device", "cuda"], "--device cuda is not available"


INVALID = {
    "steps 0": lambda r, t: (["--steps", "0"], "--steps must be a positive integer"),
    "batch-size 0": lambda r, t: (["--batch-size", "0"], "--batch-size must be a positive integer"),
    "size 0": lambda r, t: (["--size", "0"], "--size must be a positive integer"),
    "threads 0": lambda r, t: (["--threads", "0"], "--threads must be a positive integer"),
    "layers nope": lambda r, t: (["--layers", "nope"], "--layers: unknown layer 'nope'"),
    "layers block9": lambda r, t: (["--layers", "block9"], "'block9' does not exist"),
    "device cuda without CUDA": _no_cuda,
    "device bogus": lambda r, t: (["--device", "bogus"], "is not a torch device"),
    "corrupt image": _corrupt_images,
    "out under a file": _out_under_a_file,
    "reference nope": lambda r, t: (["--reference", "nope"], "--reference 'nope' is not one of"),
    "out is a file": lambda r, t: ((t / "f").write_text("x") and ["--out", str(t / "f")], "not a directory"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_invocations_are_one_line_exit_2_nothing_written(models, tmp_path, capfd, case):
    extra, says = INVALID[case](models, tmp_path)
    argv = _argv(models, tmp_path / "out")
    for flag in ("--images", "--out", "--layers"):  # a case's own value replaces _argv's
        if flag in extra:
            i = argv.index(flag)
            end = i + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            del argv[i:end]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    err = _one_line_exit_2(capfd, [*argv, *extra])
    assert err.startswith("peft-ssf analyze: error: ") and says in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_saving_over_an_older_report_without_a_file_list_removes_its_report_files(tmp_path):
    from peft_ssf_analysis import compare

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"layers": ["final"]}')  # written before report.json listed its files
    for name in ("R_old.png", "W_old.csv", "closeness.png", "notes.txt", "R_old.png.bak"):
        (out / name).write_text("x")
    report = compare(_tiny_vit(0), {"new": _tiny_vit(1)}, torch.rand(4, 3, 16, 16), steps=1, layers=["final"],
                     mean=0.5, std=0.5, progress=False, reverse=False, within=False)  # fmt: skip
    written = report.save(out, plots=False)
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([p.name for p in written] + ["notes.txt", "R_old.png.bak"])
