"""Run PEFT's generic tests against GeoLoRA and write the counts the README quotes.

    python scripts/peft_conformance.py                   # -> benchmarks/results/peft-conformance/summary.{json,md}

Fetches PEFT's tests for the installed peft version if needed (``scripts/fetch_peft_tests.py``), runs
``tests/contract/test_peft_generic.py`` in this process and counts, per PEFT test class, the tests that passed, that
PEFT's own bodies skipped for GeoLoRA, that ``docs/peft-conformance.md`` lists as skipped or expected to fail, and
any failure. Versions and the machine are written next to the counts. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from fetch_peft_tests import default_dest, fetch  # noqa: E402

LISTED = "GeoLoRA difference"  # the prefix the test module gives to the reasons of listed skips and xfails


class _Counter:
    def __init__(self):
        self.rows = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            cls = report.nodeid.split("::")[1] if report.nodeid.count("::") >= 2 else "(module)"
            if report.passed and not hasattr(report, "wasxfail"):
                outcome = "passed"
            elif hasattr(report, "wasxfail"):
                outcome = "listed xfail" if report.skipped else "FAILED (unexpected pass)"
            elif report.skipped:
                reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcome = "listed skip" if LISTED in reason else "skipped by PEFT's body"
            else:
                outcome = "FAILED"
            self.rows.append((cls, report.nodeid, outcome))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "peft-conformance")
    args = parser.parse_args(argv)
    import pytest

    version = importlib.metadata.version("peft")
    fetch(version, default_dest(version))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GEOLORA_REQUIRE_PEFT_TESTS"] = "1"
    counter = _Counter()
    code = pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::UserWarning",
            str(REPO_ROOT / "tests" / "test_peft_generic.py"),
        ],
        plugins=[counter],
    )
    by_class = collections.defaultdict(collections.Counter)
    for cls, _, outcome in counter.rows:
        by_class[cls][outcome] += 1
    peft_rows = [r for r in counter.rows if r[0] != "(module)"]
    totals = collections.Counter(outcome for _, _, outcome in peft_rows)
    from geolora.app.harness import provenance
    from geolora.io import atomic_write_json, atomic_write_text

    prov = provenance(
        "python scripts/peft_conformance.py", repo=REPO_ROOT, packages=("peft", "transformers", "torch", "accelerate")
    )
    revision = prov["git"]["revision"]
    summary = {
        "command": prov["command"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": revision[:7] if revision else "unknown",
        "git_dirty": prov["git"]["dirty"],
        "versions": {p: v for p, v in prov["versions"].items() if p != "python"},
        "machine": f"{platform.machine()}, {prov['hardware']['cpu_count']} CPU cores, "
        f"{platform.python_implementation()} {prov['versions']['python']}",
        "peft_tests": {"total": len(peft_rows), **dict(totals)},
        "by_class": {cls: dict(c) for cls, c in sorted(by_class.items())},
        "failed": [nodeid for _, nodeid, outcome in counter.rows if outcome.startswith("FAILED")],
        "pytest_exit_code": int(code),
    }
    outcomes = ["passed", "skipped by PEFT's body", "listed skip", "listed xfail", "FAILED", "FAILED (unexpected pass)"]
    lines = [
        f"# PEFT's generic tests against GeoLoRA (peft {version})",
        "",
        f"`{summary['command']}` at git {summary['git']}, {summary['date']}; {summary['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
        + ".",
        "",
        "| PEFT test class | total | " + " | ".join(outcomes) + " |",
        "|---" * (len(outcomes) + 2) + "|",
    ]
    for cls, c in sorted(by_class.items()):
        if cls == "(module)":
            continue
        lines.append(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
    lines.append(f"| **all** | {len(peft_rows)} | " + " | ".join(str(totals.get(o, 0)) for o in outcomes) + " |")
    lines += ["", "Listed skips and expected failures, with their reasons: docs/peft-conformance.md.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", "\n".join(lines))
    print("\n".join(lines))
    return 1 if summary["failed"] or code not in (0,) else 0


if __name__ == "__main__":
    sys.exit(main())
