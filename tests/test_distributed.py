"""examples/train_accelerate.py on 2 CPU processes (gloo): DDP through Accelerate and torch FSDP2.

Asserts that the SSF parameters are identical on both ranks, and that 2 processes with per-process batch b end
with the same parameters as 1 process with batch 2b.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_accelerate.py"
COMMON = ["--tiny", "--synthetic", "64", "--cpu", "--steps", "6", "--seed", "0"]


def _run(out: Path, nproc: int, batch: int, *extra: str) -> dict[str, torch.Tensor]:
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT)]
    cmd += [*COMMON, "--batch_size", str(batch), "--output_dir", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {r: load_file(out / f"rank{r}.safetensors") for r in range(nproc)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1, 8, "--skip_key_shift")[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_trained(params: dict) -> None:
    scales = [v for k, v in params.items() if ".ssf_scale" in k]
    assert scales and max((v - 1).abs().max().item() for v in scales) > 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_each_other_and_one_process_with_double_batch(strategy, single, tmp_path):
    extra = ["--skip_key_shift"] + (["--fsdp"] if strategy == "fsdp" else [])
    ranks = _run(tmp_path, 2, 4, *extra)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["num_processes"] == 2
    assert info["distributed_type"] == ("FSDP2 (torch, gloo)" if strategy == "fsdp" else "DistributedType.MULTI_CPU")
    assert _max_diff(ranks[0], ranks[1]) == 0.0
    _assert_trained(ranks[0])
    # issue 24.6: OUTPUT_DIR/adapter is written with FSDP too, and holds the trained values
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    scales = {k: v for k, v in ranks[0].items() if ".ssf_scale" in k}
    assert len(adapter) >= len(scales) > 0
    for name, value in scales.items():
        torch.testing.assert_close(adapter[name.replace(".default", "")], value, rtol=0, atol=0)
    diff = _max_diff(ranks[0], single)
    print(f"{strategy}: max |2 procs x batch 4 - 1 proc x batch 8| = {diff:.2e}")
    assert diff <= 1e-5


def test_labels_come_from_the_data_and_a_too_small_head_fails_before_training(tmp_path):
    """--num_labels smaller than the dataset's labels: one line naming the label and the head size, exit 2."""
    import numpy as np
    from PIL import Image

    for i, name in enumerate(("a", "b", "c")):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "data" / "train" / name / "0.png")
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--dataset", str(tmp_path / "data"), "--cpu", "--steps", "1",
           "--batch_size", "1", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*cmd, "--num_labels", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("train_accelerate.py: error: label 2 in split")
    assert "outside the classifier head's 2 classes" in res.stderr and not (tmp_path / "out").exists()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)  # 3 classes, read from the data
    assert res.returncode == 0, res.stderr[-3000:]
    params = load_file(tmp_path / "out" / "rank0.safetensors")
    assert params["base_model.model.classifier.modules_to_save.default.weight"].shape[0] == 3
