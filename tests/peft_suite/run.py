"""Run PEFT's generic tuner test-suite (from the sdist of the installed peft version) against SSF.

    python tests/peft_suite/run.py [pytest args...]

The first run downloads ``peft==<installed version>`` as an sdist from the package index (needs the network once)
and keeps its ``tests/test_custom_models.py``, ``testing_common.py`` and ``testing_utils.py`` in ``.peft-suite/``;
later runs are offline. ``ssf_suite_plugin.py`` adds SSF's cases to PEFT's case lists and deselects the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SUITE_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")


def fetch_suite(peft_version: str, cache: Path) -> Path:
    """The folder holding PEFT's test files for ``peft_version`` (downloaded and unpacked once)."""
    target = cache / f"peft-{peft_version}" / "peft_tests"
    if all((target / name).is_file() for name in SUITE_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"peft=={peft_version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise SystemExit(
                f"Could not download the peft {peft_version} sdist (needed once for PEFT's test-suite):\n"
                f"{result.stderr.strip()}\nRun this once with network access, or skip it with `make test-own`."
            )
        staging = Path(tempfile.mkdtemp(dir=cache))
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in SUITE_FILES:
                    member.name = parts[2]
                    tar.extract(member, staging, filter="data")
        missing = [n for n in SUITE_FILES if not (staging / n).is_file()]
        if missing:
            raise SystemExit(f"The peft {peft_version} sdist has no tests/{', tests/'.join(missing)}.")
        (staging / "__init__.py").write_text("")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)  # atomic: a half-unpacked suite is never used
    return target


def main(argv: list[str]) -> int:
    cache = ROOT / ".peft-suite"
    cache.mkdir(exist_ok=True)
    suite = fetch_suite(version("peft"), cache)
    (suite.parent / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "pytest", str(suite / "test_custom_models.py"), "-p", "ssf_suite_plugin",
           "-c", str(suite.parent / "pytest.ini"), "--rootdir", str(suite.parent), "-p", "no:cacheprovider", *argv]
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
