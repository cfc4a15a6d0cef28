"""How `peft-ssf train --threads` changes the wall time of CPU training (issue 24.7: the default).

    python -m benchmarks.train_threads [--threads 1 2] [--steps 20] [--repeats 2]

Trains SSF on the demo backbone and a small generated orientation task for ``--steps`` steps (batch 32, no
checkpoints, no evaluation), each thread count in a fresh process, rounds interleaved, and prints the median
wall time per thread count. Results move with the machine's load: on a shared machine run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # --threads decides
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-c", "from peft_ssf.demo import make_task; "
                        f"make_task('orientation', {str(data)!r}, n_train=40, n_val=4, n_test=4)"],
                       check=True, env=env, capture_output=True)
        data = data / "orientation"
        times: dict[int, list[float]] = {t: [] for t in args.threads}
        for r in range(args.repeats):
            for threads in args.threads if r % 2 == 0 else reversed(args.threads):
                out = Path(tmp) / f"run-{threads}-{r}"
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "peft_ssf_cli", "train", "--model", "peft_ssf/demo/backbone",
                                "--dataset", str(data), "--output_dir", str(out), "--max_steps", str(args.steps),
                                "--batch_size", "32", "--no_checkpoints", "--no_epoch_eval", "--no_progress",
                                "--metric_backend", "builtin", "--threads", str(threads)],
                               check=True, env=env, capture_output=True)
                times[threads].append(time.perf_counter() - start)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"cores": cores, "steps": args.steps, "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "median_seconds": {t: round(statistics.median(v), 1) for t, v in times.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
