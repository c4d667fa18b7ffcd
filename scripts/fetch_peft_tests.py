"""Fetch PEFT's own test suite (``tests/`` of the peft sdist on PyPI) for the installed peft version.

    python scripts/fetch_peft_tests.py            # into .cache/peft-tests/<version>/peft_tests/
    python scripts/fetch_peft_tests.py --dest DIR

``tests/contract/test_peft_generic.py`` runs PEFT's generic tests (``PeftCommonTester`` over the custom models,
the config tests) against GeoLoRA from that folder. The sdist comes from the package registry pip is configured for
(``pip download --no-binary :all: --no-deps peft==<installed>``); nothing is committed. The folder is renamed
``peft_tests`` (PEFT names it ``tests``, which is also ours) and written atomically: a killed fetch leaves no
half-extracted folder. A rerun with the folder present does nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "testing_common.py"


def default_dest(version: str) -> Path:
    return REPO_ROOT / ".cache" / "peft-tests" / version


def fetch(version: str, dest: Path) -> Path:
    target = dest / "peft_tests"
    if (target / MARKER).is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=dest) as tmp:
        tmp = Path(tmp)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"peft=={version}",
            "-d",
            str(tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(tmp.glob("peft-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SystemExit(f"could not download the peft {version} sdist ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
        prefix = f"{archives[0].name[: -len('.tar.gz')]}/tests/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if not any(m.name == prefix + MARKER for m in members):
                raise SystemExit(f"{archives[0].name} has no {prefix}{MARKER}: not a peft sdist with its tests")
            tar.extractall(tmp / "x", members=members, filter="data")
        shutil.move(str(tmp / "x" / prefix.rstrip("/")), str(tmp / "peft_tests"))
        (tmp / "peft_tests" / "FETCHED_FROM").write_text(f"{archives[0].name} via {' '.join(cmd[2:])}\n")
        try:
            (tmp / "peft_tests").rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # another process finished first: keep its copy
                raise
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None, help="peft version (default: the installed one)")
    parser.add_argument("--dest", type=Path, default=None, help="folder to hold peft_tests/ (default: .cache/...)")
    args = parser.parse_args(argv)
    version = args.version or importlib.metadata.version("peft")
    target = fetch(version, args.dest or default_dest(version))
    print(f"PEFT {version} tests in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
