"""Long differential search: many generated models, fused SSF vs ``fused=False`` (see tests/differential.py).

    python scripts/differential_search.py --examples 500 --seed 0

Prints how many graphs it tried / passed / refused (a clear error naming SSF) / failed (a silent difference or an
unclear error), and each failure's spec as a repro for ``differential.check``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import differential  # noqa: E402
from differential import Mismatch, check, draw_spec  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = {"tried": 0, "passed": 0, "refused": 0, "failed": 0}
    failures = []
    reasons: dict[str, int] = {}
    for i in range(args.examples):
        rng = random.Random(args.seed * 1_000_003 + i)
        spec = draw_spec(lambda name, options, rng=rng: rng.choice(options))
        counts["tried"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdict = check(spec)
            counts[verdict] += 1
            if verdict == "refused":
                reason = differential.last_refusal[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        except Mismatch as exc:
            counts["failed"] += 1
            failures.append((str(exc), spec))
        except Exception as exc:  # noqa: BLE001 - any other crash is a failure to report, not to stop on
            counts["failed"] += 1
            failures.append((f"{type(exc).__name__}: {exc}", spec))
    for message, spec in failures:
        print(f"FAILED {message}\n  spec = {json.dumps(spec)}")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"refused {n:4d}x  {reason}")
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
