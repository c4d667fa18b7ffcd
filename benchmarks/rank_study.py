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

from geolora.io import atomic_write, atomic_write_text


def load_runs(suite_dir: Path) -> dict[str, list[dict]]:
    """{task: [run, ...]} from ``geolora--<task>--<seed>[.partial].json`` (a finished file wins over a partial one)."""
    files = {}
    for path in sorted(suite_dir.glob("geolora--*.json")):
        key = path.name.replace(".partial.json", "").replace(".json", "")
        if key not in files or not path.name.endswith(".partial.json"):
            files[key] = path
    out: dict[str, list[dict]] = {}
    for key, path in files.items():
        task, seed = key.split("--")[1], int(key.split("--")[2])
        runs = [dict(run, seed=seed) for run in json.loads(path.read_text()).get("runs", [])]
        out.setdefault(task, []).extend(sorted(runs, key=lambda r: r["r"]))
    return out


def seed_table(runs_by_task: dict[str, list[dict]]) -> str:
    """Spread over training seeds at the same initial rank against the spread over initial ranks (of the seed
    means): the paper's Fig. 2 question, with the seed spread as the yardstick."""
    lines = ["| task | initial r | seeds | final total rank | test accuracy |", "|---|---|---|---|---|"]
    for task, runs in runs_by_task.items():
        by_r: dict[int, list[dict]] = {}
        for run in runs:
            by_r.setdefault(run["r"], []).append(run)
        seed_acc, seed_rank, mean_acc, mean_rank = [], [], [], []
        for r, group in sorted(by_r.items()):
            group = sorted(group, key=lambda g: g["seed"])
            accs = [g["test"].get("accuracy", float("nan")) for g in group]
            ranks = [totals(g)[-1][1] for g in group]
            lines.append(
                f"| {task} | {r} | {', '.join(str(g['seed']) for g in group)} | "
                f"{' / '.join(map(str, ranks))} | {' / '.join(f'{a:.3f}' for a in accs)} |"
            )
            mean_acc.append(sum(accs) / len(accs))
            mean_rank.append(sum(ranks) / len(ranks))
            if len(group) > 1:
                seed_acc.append(max(accs) - min(accs))
                seed_rank.append(max(ranks) / min(ranks))
        if seed_acc and len(mean_acc) > 1:
            lines.append(
                f"| {task} | spread | over seeds at the same r: up to {max(seed_acc) * 100:.1f} points, rank up to "
                f"{max(seed_rank):.2f}x | over initial r (seed means): {(max(mean_acc) - min(mean_acc)) * 100:.1f} "
                f"points, rank {max(mean_rank) / min(mean_rank):.2f}x | |"
            )
    return "\n".join(lines)


def totals(run: dict) -> list[tuple[int, int]]:
    tr = run["rank_trajectory"]
    return [(int(step), int(sum(ranks))) for step, ranks in zip(tr["steps"], tr["ranks"])]


def last_change(series: list[tuple[int, int]]) -> int:
    return max((s for (s, a), (_, b) in zip(series[1:], series[:-1]) if a != b), default=0)


def table(runs_by_task: dict[str, list[dict]]) -> str:
    lines = [
        "| task | initial r | total rank at step 100 / 300 / end | last change at step | adapter parameters kept "
        "| test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for task, runs in runs_by_task.items():
        for run in runs:
            series = dict(totals(run))
            end = totals(run)[-1][1]
            at = " / ".join(str(series.get(s, "-")) for s in (100, 300)) + f" / {end}"
            lines.append(
                f"| {task} | {run['r']} | {at} | {last_change(totals(run))} | "
                f"{run['adapter_params_kept']:,} | {run['test'].get('accuracy', float('nan')):.3f} |"
            )
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
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="benchmarks/results/rank-ramp")
    p.add_argument("--suite", default="rank-init")
    p.add_argument(
        "--seeds-with",
        nargs="*",
        default=[],
        metavar="SUITE",
        help="also read these suites (e.g. rank-init-seeds: the same cells with other training seeds) and "
        "add the seed-spread table",
    )
    args = p.parse_args(argv)
    suite_dir = Path(args.results_dir) / args.suite
    for name in [args.suite, *args.seeds_with]:
        if not (Path(args.results_dir) / name).is_dir():
            p.error(f"--results-dir/--suite: {Path(args.results_dir) / name} is not a directory of cell files")
    runs = load_runs(suite_dir)
    if not runs:
        p.error(f"{suite_dir}: no geolora cell files with finished runs")
    text = table(runs)
    if args.seeds_with:
        combined = {task: list(rs) for task, rs in runs.items()}
        for name in args.seeds_with:
            for task, rs in load_runs(Path(args.results_dir) / name).items():
                combined.setdefault(task, []).extend(rs)
        text += "\n\nSeed spread (" + ", ".join([args.suite, *args.seeds_with]) + "):\n\n" + seed_table(combined)
    atomic_write_text(suite_dir / "summary.md", text + "\n")
    try:
        plot(runs, suite_dir / "rank-over-steps.png")
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
