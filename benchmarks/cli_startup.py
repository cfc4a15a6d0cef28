"""Wall-clock time of `peft-ssf --help` and friends (a benchmark, not a test: timings depend on the machine's load).

    python -m benchmarks.cli_startup [--repeats 5]

What keeps `--help` fast (no torch / transformers imported) is asserted in tests/test_cli.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["train", "--help"], ["demo", "--help"], ["merge", "--help"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "peft_ssf_cli", *command], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"peft-ssf {' '.join(command):<16} median {statistics.median(times):.3f} s  min {min(times):.3f} s")


if __name__ == "__main__":
    main()
