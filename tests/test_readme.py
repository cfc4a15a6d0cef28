"""README.md and CONTRIBUTING.md are executable: every shell command and Python snippet in them runs here.

The blocks are read from the documents themselves (no second copy), in order, in one scratch directory per
document that links the repository's folders (so `examples/...` and `peft_ssf/demo/backbone` resolve), offline.
Two things are allowed to differ from what a reader types, and both are listed here:

* ``STAND_INS``: a Hub id becomes a tiny local checkpoint, `make demo` its quick form, epochs and steps fewer;
* a line whose comment says ``[untested: REASON]`` is not run (it needs the network, a GPU, or is the test suite
  itself); the reason is required.

A ```` ```text ```` block is what the code block before it prints: its output must match, with ``...`` standing for
anything (a score, a class name that depends on the training run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_vit
from text_models import write_readme_stand_ins

REPO = Path(__file__).resolve().parents[1]
UNTESTED = re.compile(r"#\s*\[untested:\s*(?P<reason>[^\]]*)\]")
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)
STAND_INS = [  # (pattern, replacement): tiny and offline instead of big or online
    (r"google/vit-base-patch16-224-in21k", "{tiny_vit}"),
    (r"^make demo\b.*$", "peft-ssf demo --quick --overwrite --no_progress --out ssf-demo-output"),
    (r"--epochs \d+", "--epochs 1"),
    (r"--steps \d+", "--steps 2"),
    (r"HuggingFaceTB/SmolLM2-135M", "{tiny_llama}"),  # text stand-ins: tests/text_models.write_readme_stand_ins
    (r"distilbert/distilbert-base-uncased", "{tiny_distilbert}"),
    (r"stanfordnlp/imdb", "{tiny_imdb}"),
]
LINKED = ("peft_ssf", "peft_ssf_cli", "examples", "benchmarks", "scripts", "docs", "pyproject.toml")


def snippets(text: str) -> list[tuple[str, str]]:
    """``(kind, code)`` in document order: each shell command (continuations joined), each Python block, and each
    expected output (``text``)."""
    found = []
    for block in FENCE.finditer(text):
        lang, body = block["lang"], block["body"]
        if lang in ("python", "text"):
            found.append((lang, body))
        elif lang in ("bash", "sh", "shell"):
            for command in body.replace("\\\n", " ").splitlines():
                if command.strip() and not command.lstrip().startswith("#"):
                    found.append(("bash", command.strip()))
    return found


def runnable(kind: str, code: str) -> str | None:
    """The code to run (untested lines dropped; None if nothing is left), after checking every mark has a reason."""
    lines = []
    for line in code.splitlines():
        mark = UNTESTED.search(line)
        if mark:
            assert mark["reason"].strip(), f"[untested: ...] needs a reason: {line}"
            continue
        lines.append(line)
    code = "\n".join(lines)
    return code if code.strip() and (kind == "bash" or any(not ln.startswith("#") for ln in lines if ln.strip())) \
        else None


def output_matches(expected: str, printed: str) -> bool:
    """``printed`` is ``expected`` (whitespace at the ends aside), where ``...`` in ``expected`` matches anything."""
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, printed.strip(), re.S) is not None


def stand_in(code: str, values: dict[str, str], used: set[int]) -> str:
    for i, (pattern, replacement) in enumerate(STAND_INS):
        new = re.sub(pattern, replacement.format(**values), code, flags=re.M)
        if new != code:
            used.add(i)
        code = new
    return code


def _workspace(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    tiny_vit(num_labels=5).save_pretrained(tmp_path / "tiny-vit")
    return tmp_path, {"tiny_vit": str(tmp_path / "tiny-vit"), **write_readme_stand_ins(tmp_path / "text")}


def run_document(doc: Path, tmp_path: Path) -> tuple[int, set[int]]:
    """Run every snippet of ``doc``; returns (how many ran, which stand-ins were used)."""
    cwd, values = _workspace(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran, used, last = 0, set(), None
    for kind, code in snippets(doc.read_text()):
        if kind == "text":
            assert last is not None, f"{doc.name}: an output block before any code:\n{code}"
            assert output_matches(code, last.stdout), f"{doc.name}: README says\n{code}\nbut it printed\n{last.stdout}"
            continue
        code = runnable(kind, code)
        if code is None:
            continue
        code = stand_in(code, values, used)
        command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        res = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{doc.name}: this {kind} snippet failed:\n{code}\n---\n{res.stdout[-3000:]}\n" \
                                    f"{res.stderr[-5000:]}"
        ran, last = ran + 1, res
    return ran, used


def test_snippet_parsing_and_marks():
    text = "```bash\nmake demo   # the demo\nmake test  # [untested: it is the suite]\na \\\n  b\n```\n" \
           "```python\nx = 1\ny = f()  # [untested: needs the Hub]\n```\n"
    found = snippets(text)
    assert found == [("bash", "make demo   # the demo"), ("bash", "make test  # [untested: it is the suite]"),
                     ("bash", "a    b"), ("python", "x = 1\ny = f()  # [untested: needs the Hub]\n")]
    assert [runnable(k, c) for k, c in found] == ["make demo   # the demo", None, "a    b", "x = 1"]
    with pytest.raises(AssertionError, match="needs a reason"):
        runnable("bash", "make x  # [untested: ]")
    assert snippets("```python\nprint(1)\n```\nprints\n```text\n[1, ...]\n```\n")[1] == ("text", "[1, ...]\n")
    assert output_matches("[{'label': 'deg_...', 'score': ...}]", "[{'label': 'deg_090', 'score': 0.93}]\n")
    assert not output_matches("[{'label': 'deg_...', 'score': ...}]", "[{'label': 'LABEL_0', 'score': 0.93}]")


@pytest.mark.slow
def test_readme_runs_verbatim(tmp_path):
    ran, used = run_document(REPO / "README.md", tmp_path)
    assert ran >= 8
    assert used == set(range(len(STAND_INS))), "a stand-in no longer matches anything in README.md: remove it"


@pytest.mark.slow
def test_contributing_runs_verbatim(tmp_path):
    ran, _ = run_document(REPO / "CONTRIBUTING.md", tmp_path)
    assert ran >= 1


def test_references_to_readme_sections_exist():
    """`README.md, section "X"` in a docstring or --help text names a real README heading."""
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M)}
    refs = []
    for path in [*REPO.glob("examples/*.py"), *REPO.glob("peft_ssf/**/*.py"), *REPO.glob("peft_ssf_cli/*.py")]:
        text = path.read_text()
        refs += [(path.name, m.group(1)) for m in re.finditer(r'README(?:\.md)?,? section "([^"]+)"', text)]
    assert refs, "expected at least the accelerate example's reference"
    for name, section in refs:
        assert section in headings, f"{name} points to README section {section!r}, which does not exist"
