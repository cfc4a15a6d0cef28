"""``make docs``: refresh the generated blocks of README.md from the results files, and nothing else.

A generated block sits between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->`` markers. Each block has one
source file, committed next to the numbers it was rendered from:

* ``performance``: targets + training-cost summary, rendered from ``benchmarks/results/*.json`` (the whole set also
  goes to ``benchmarks/results/README_performance.md``);
* ``param_counts``: ``benchmarks/results/param_counts.md`` (``python -m benchmarks.param_counts``);
* ``decoder_cost``: ``benchmarks/results/decoder_cost.md`` (``python -m benchmarks.decoder_cost``), followed by
  ``decoder_cost_cuda.md`` when a GPU run (``--device cuda``) has been committed;
* ``demo``: ``benchmarks/results/demo.md``, the table a full ``make demo`` run wrote. ``--demo DIR`` first copies
  ``DIR/results.md`` there (``make docs`` passes ``ssf-demo-output`` when it exists); a ``--quick`` demo is refused.

Benchmarks and the demo only write their own results files; this is the one place that rewrites README.md.

    python -m benchmarks.docs                       # rewrite what is stale
    python -m benchmarks.docs --check               # exit 1 (and name the blocks) when README.md is stale
    python -m benchmarks.docs --demo ssf-demo-output
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import common as C

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_RESULTS = C.RESULTS_DIR / "demo.md"
_GENERATED_HEADER = re.compile(r"\A<!--.*?-->\n")


class DocsError(Exception):
    """A block or a source file is missing or malformed."""


def splice(text: str, name: str, body: str) -> str:
    """``text`` with the lines between the ``name`` start and end markers replaced by ``body``."""
    start = re.search(rf"^<!-- {re.escape(name)}:start\b[^\n]*-->\n", text, flags=re.M)
    end = text.find(f"<!-- {name}:end -->")
    if start is None or end < start.end():
        raise DocsError(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return text[: start.end()] + body.strip("\n") + "\n" + text[end:]


def _source(path: Path) -> str:
    """A generated Markdown file without its ``<!-- generated ... -->`` first line."""
    if not path.is_file():
        raise DocsError(f"{path.relative_to(REPO)} is missing: generate it first (see benchmarks/README.md)")
    return _GENERATED_HEADER.sub("", path.read_text())


def import_demo_results(demo_dir: Path) -> bool:
    """Copy ``demo_dir/results.md`` to ``benchmarks/results/demo.md`` if it is from a full demo run."""
    results = demo_dir / "results.json"
    if not results.is_file():
        return False
    if json.loads(results.read_text()).get("quick"):
        print(f"docs: {demo_dir} holds a --quick demo run; the README keeps the last full run's table")
        return False
    text = (demo_dir / "results.md").read_text()
    DEMO_RESULTS.write_text(f"<!-- written by `peft-ssf demo` ({demo_dir.name}/results.md); copied by make docs -->\n"
                            + text)
    return True


def blocks() -> dict[str, str]:
    """The body of every generated README block, from the committed results files."""
    return {
        "performance": C.readme_performance_block(C.RESULTS_DIR),
        "param_counts": _source(C.RESULTS_DIR / "param_counts.md"),
        "decoder_cost": "\n\n".join(_source(p) for p in (C.RESULTS_DIR / "decoder_cost.md",
                                                          C.RESULTS_DIR / "decoder_cost_cuda.md")
                                     if p.name == "decoder_cost.md" or p.is_file()),
        "demo": _source(DEMO_RESULTS),
    }


def render(readme: Path = README) -> tuple[str, str]:
    """(current README text, README text with every block refreshed)."""
    text = readme.read_text()
    new = text
    for name, body in blocks().items():
        new = splice(new, name, body)
    return text, new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    parser.add_argument("--demo", type=Path, default=None,
                        help="a `peft-ssf demo` output directory whose results.md becomes the README's demo table")
    parser.add_argument("--targets", type=Path, default=None, metavar="DIR",
                        help="only print the targets table (met or not) of the results in DIR, e.g. a GPU run's")
    args = parser.parse_args(argv)
    if args.targets is not None:
        table = C.targets_markdown(args.targets)
        if table is None:
            print(f"docs: error: no benchmark results with targets in {args.targets}", file=sys.stderr)
            return 2
        print(table)
        return 0
    try:
        if args.demo is not None and not args.check:
            import_demo_results(args.demo)
        old, new = render()
    except DocsError as exc:
        print(f"docs: error: {exc}", file=sys.stderr)
        return 2
    performance = C.performance_section(C.RESULTS_DIR)
    perf_file = C.RESULTS_DIR / "README_performance.md"
    stale = [str(p.relative_to(REPO)) for p, fresh in ((README, old == new),
                                                         (perf_file, perf_file.is_file() and
                                                          perf_file.read_text() == performance)) if not fresh]
    if args.check:
        for name in stale:
            print(f"docs: {name} is stale: run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    README.write_text(new)
    perf_file.write_text(performance)
    print("docs: " + (f"refreshed {', '.join(stale)}" if stale else "README.md was already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
