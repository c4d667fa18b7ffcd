"""Summarise a rank study (the ``rank`` preset of ``benchmarks/run.py``): total rank over steps from every initial
rank, per task, as a plot and a markdown table.  Reads finished and partial cell files (a partial file holds the runs
of a cell that finished before it was stopped), so a study can be reported while it is still being run.

    python benchmarks/rank_study.py --results-dir benchmarks/results/rank-ramp --suite rank-init

Writes ``<results-dir>/<suite>/rank-over-steps.png`` and ``<results-dir>/<suite>/summary.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(suite_dir: Path) -> dict[str, list[dict]]:
    """{task: [run, ...]} from ``geolora--<task>--<seed>[.partial].json`` (a finished file wins over a partial one)."""
    files = {}
    for path in sorted(suite_dir.glob("geolora--*.json")):
        key = path.name.replace(".partial.json", "").replace(".json", "")
        if key not in files or not path.name.endswith(".partial.json"):
            files[key] = path
    out: dict[str, list[dict]] = {}
    for key, path in files.items():
        task = key.split("--")[1]
        runs = json.loads(path.read_text()).get("runs", [])
        out.setdefault(task, []).extend(sorted(runs, key=lambda r: r["r"]))
    return out


def totals(run: dict) -> list[tuple[int, int]]:
    tr = run["rank_trajectory"]
    return [(int(step), int(sum(ranks))) for step, ranks in zip(tr["steps"], tr["ranks"])]


def last_change(series: list[tuple[int, int]]) -> int:
    return max((s for (s, a), (_, b) in zip(series[1:], series[:-1]) if a != b), default=0)


def table(runs_by_task: dict[str, list[dict]]) -> str:
    lines = ["| task | initial r | total rank at step 100 / 300 / end | last change at step | adapter parameters kept "
             "| test accuracy |", "|---|---|---|---|---|---|"]
    for task, runs in runs_by_task.items():
        for run in runs:
            series = dict(totals(run))
            end = totals(run)[-1][1]
            at = " / ".join(str(series.get(s, "-")) for s in (100, 300)) + f" / {end}"
            lines.append(f"| {task} | {run['r']} | {at} | {last_change(totals(run))} | "
                         f"{run['adapter_params_kept']:,} | {run['test'].get('accuracy', float('nan')):.3f} |")
        finals = [totals(r)[-1][1] for r in runs]
        if len(finals) > 1:
            mid = (max(finals) + min(finals)) / 2
            spread = f"max/min {max(finals) / min(finals):.2f}x (+-{(max(finals) - mid) / mid:.0%} around the midpoint)"
            lines.append(f"| {task} | spread | {spread} | | | |")
    return "\n".join(lines)


def plot(runs_by_task: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs_by_task), figsize=(5 * len(runs_by_task), 3.6), squeeze=False)
    for ax, (task, runs) in zip(axes[0], runs_by_task.items()):
        for run in runs:
            steps, tot = zip(*totals(run))
            ax.plot(steps, tot, label=f"r = {run['r']} (acc {run['test'].get('accuracy', float('nan')):.3f})")
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("total rank (after each interval's truncation)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="benchmarks/results/rank-ramp")
    p.add_argument("--suite", default="rank-init")
    args = p.parse_args(argv)
    suite_dir = Path(args.results_dir) / args.suite
    if not suite_dir.is_dir():
        p.error(f"--results-dir/--suite: {suite_dir} is not a directory of cell files")
    runs = load_runs(suite_dir)
    if not runs:
        p.error(f"{suite_dir}: no geolora cell files with finished runs")
    text = table(runs)
    (suite_dir / "summary.md").write_text(text + "\n")
    try:
        plot(runs, suite_dir / "rank-over-steps.png")
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
