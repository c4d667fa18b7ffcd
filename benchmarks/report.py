"""Turn benchmark results (``benchmarks/results/<suite>/*.json`` from ``benchmarks/run.py``) into tables and plots.

    python benchmarks/report.py                                  # all suites under benchmarks/results
    python benchmarks/report.py --results-dir /tmp/smoke --suites smoke smoke-robust

Writes ``<results-dir>/summary.md`` (one table over all comparison suites, quoted in the README) and
``<results-dir>/report.md`` (mean ± std over seeds per method and task, the learning-rate grids, kept
parameters, adapter size, time per step, peak memory, which cells finished) and PNGs under ``<results-dir>/plots/``:

* ``ranks-<suite>-<task>.png``: rank per layer over training (heatmaps, GeoLoRA and AdaLoRA, first seed);
* ``metric-vs-params-<suite>.png``: test metric vs final trainable parameters, per method;
* ``robustness-<suite>-<task>.png``: learning rate x budget grid, GeoLoRA vs AdaLoRA, diverged runs marked;
* ``params-over-steps-<suite>-<task>.png``: adapter parameters over training from several initial ranks.

    python benchmarks/report.py --evidence benchmarks/results/evidence   # the evidence preset (benchmarks/evidence.py)
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import evidence  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cells import COLORS, METHOD_ORDER, adapter_params_over_steps, load_results, load_runs, save_figure  # noqa: E402

from geolora.io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _mean_std(values: list[float], digits: int = 4) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f} (n={len(vals)})"


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(vals) if vals else None


def _fmt_int(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _methods(cells) -> list[str]:
    present = {c["method"] for c in cells}
    return [m for m in METHOD_ORDER if m in present]


def compare_tables(suite: str, cells: list[dict]) -> list[str]:
    by = defaultdict(list)
    for c in cells:
        by[(c["task"], c["method"])].append(c)
    tasks = sorted({c["task"] for c in cells})
    methods = _methods(cells)
    lines = [f"### Suite `{suite}`", ""]
    reused = any(c.get("lr_selected_on_seed", c["seed"]) != c["seed"] for c in cells)
    how = (
        "learning rate selected per method on the first seed's validation split, reused for the other seeds"
        if reused
        else "learning rate selected per seed on the validation split"
    )
    lines += [f"Test metric ({how}), mean ± std over seeds:", ""]
    lines += ["| task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in tasks:
        metric = next(c["primary_metric"] for c in cells if c["task"] == task)
        row = [task, metric]
        for m in methods:
            row.append(_mean_std([(c["test"] or {}).get(metric) for c in by[(task, m)]]))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Cost of the selected runs (means over seeds): trainable parameters kept at the end (adapter + "
        "head) / adapter only, adapter file size, median time per optimizer step, train time, peak memory "
        "(RSS), selected learning rates per seed:",
        "",
    ]
    lines += [
        "| task | method | kept params | adapter params | adapter file | s/step | train s | peak RSS MB | "
        "lr (per seed) | grid |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        for m in methods:
            cs = sorted(by[(task, m)], key=lambda c: c["seed"])
            if not cs:
                continue
            f = lambda k, cs=cs: _mean([c.get(k) for c in cs])  # noqa: E731
            step = f("median_step_s")
            rss = f("peak_rss_bytes")
            size = f("adapter_file_bytes")
            lrs = ", ".join(f"{c['lr']:g}" if c.get("lr") is not None else "all diverged" for c in cs)
            grid = ", ".join(f"{x:g}" for x in cs[0]["lr_grid"])
            lines.append(
                f"| {task} | {m} | {_fmt_int(f('trainable_params_kept'))} | {_fmt_int(f('adapter_params_kept'))} | "
                f"{'n/a' if size is None else f'{size / 1024:.0f} KiB'} | {'n/a' if step is None else f'{step:.3f}'} | "
                f"{_fmt_int(f('train_time_s'))} | {'n/a' if rss is None else f'{rss / 2**20:.0f}'} | {lrs} | {grid} |"
            )
    lines.append("")
    lines += [
        "Learning-rate grid: validation metric of every grid point (seed that ran the whole grid; `div` = "
        "diverged, **bold** = selected):",
        "",
    ]
    lines += ["| task | method | seed | lr: val |", "|---|---|---|---|"]
    for task in tasks:
        metric = next(c["primary_metric"] for c in cells if c["task"] == task)
        for m in methods:
            for c in sorted(by[(task, m)], key=lambda c: c["seed"]):
                if len(c["runs"]) < 2:
                    continue
                chosen = c["runs"][c["selected"][str(c["budgets"][0])]] if c.get("selected") else None
                pts = []
                for run in c["runs"]:
                    v = "div" if run["diverged"] else f"{run['val'].get(metric, float('nan')):.3f}"
                    txt = f"{run['lr']:g}: {v}"
                    pts.append(f"**{txt}**" if run is chosen else txt)
                lines.append(f"| {task} | {m} | {c['seed']} | {', '.join(pts)} |")
    lines.append("")
    lines += ["Final ranks (mean over layers and seeds; min-max over layers):", ""]
    lines += ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task in tasks:
        row = [task]
        for m in methods:
            ranks = [r for c in by[(task, m)] for r in (c.get("final_ranks") or {}).values()]
            row.append(f"{statistics.mean(ranks):.2f} ({min(ranks)}-{max(ranks)})" if ranks else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def summary_table(suites: dict[str, list[dict]]) -> list[str]:
    """One table over every comparison suite: test metric mean ± std over seeds, adapter parameters kept at the end,
    saved adapter size and mean final rank per layer (means over seeds), per method. Best mean metric in bold."""
    comp = {s: cs for s, cs in suites.items() if not any(c.get("kind") == "grid" for c in cs)}
    if not comp:
        return []
    methods = [m for m in METHOD_ORDER if any(c["method"] == m for cs in comp.values() for c in cs)]
    lines = ["| suite / task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    cost = [
        "| suite / task | " + " | ".join(f"{m}: adapter params / file / mean rank" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for suite, cells in comp.items():
        for task in sorted({c["task"] for c in cells}):
            metric = next(c["primary_metric"] for c in cells if c["task"] == task)
            by = {
                m: sorted((c for c in cells if c["task"] == task and c["method"] == m), key=lambda c: c["seed"])
                for m in methods
            }
            means = {m: _mean([(c["test"] or {}).get(metric) for c in cs]) for m, cs in by.items()}
            present = [v for v in means.values() if v is not None]
            best = max(present) if len(present) > 1 else None  # bold only when there is something to compare
            row, crow = [f"{suite} / {task}", metric], [f"{suite} / {task}"]
            for m in methods:
                txt = _mean_std([(c["test"] or {}).get(metric) for c in by[m]], digits=3)
                row.append(f"**{txt}**" if best is not None and means[m] == best else txt)
                params = _mean([c.get("adapter_params_kept") for c in by[m]])
                size = _mean([c.get("adapter_file_bytes") for c in by[m]])
                ranks = [r for c in by[m] for r in (c.get("final_ranks") or {}).values()]
                crow.append(
                    "n/a"
                    if params is None
                    else f"{params / 1000:.0f}k / {size / 1024:.0f} KiB / {statistics.mean(ranks):.1f}"
                )
            lines.append("| " + " | ".join(row) + " |")
            cost.append("| " + " | ".join(crow) + " |")
    return lines + [""] + cost + [""]


def grid_tables(suite: str, cells: list[dict]) -> list[str]:
    lines = [f"### Suite `{suite}` (learning rate x budget grid)", ""]
    for task in sorted({c["task"] for c in cells}):
        for c in sorted((c for c in cells if c["task"] == task), key=lambda c: (c["method"], c["seed"])):
            metric = c["primary_metric"]
            lines += [
                f"`{c['method']}` on `{task}`, seed {c['seed']}: test {metric} (`div` = diverged: non-finite "
                "loss or outputs)",
                "",
            ]
            lrs = c["lr_grid"]
            lines += ["| r \\ lr | " + " | ".join(f"{x:g}" for x in lrs) + " |", "|---|" + "---|" * len(lrs)]
            for r in c["budgets"]:
                row = [str(r)]
                for lr in lrs:
                    run = next((x for x in c["runs"] if x["r"] == r and x["lr"] == lr), None)
                    if run is None:
                        row.append("-")
                    elif run["diverged"]:
                        row.append("div")
                    else:
                        row.append(f"{run['test'][metric]:.3f}")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------- plots
def _selected_run(cell: dict) -> Optional[dict]:
    idx = cell.get("selected", {}).get(str(cell["budgets"][0]))
    return cell["runs"][idx] if idx is not None else None


def plot_rank_heatmaps(suite: str, cells: list[dict], out: Path) -> list[Path]:
    paths = []
    for task in sorted({c["task"] for c in cells}):
        chosen = []
        for m in ("geolora", "adalora"):
            cs = sorted((c for c in cells if c["task"] == task and c["method"] == m), key=lambda c: c["seed"])
            run = _selected_run(cs[0]) if cs else None
            if run and run["rank_trajectory"]["steps"]:
                chosen.append((m, cs[0]["seed"], run))
        if not chosen:
            continue
        fig, axes = plt.subplots(
            1,
            len(chosen),
            figsize=(6 * len(chosen), 0.18 * max(len(run["rank_trajectory"]["layers"]) for _, _, run in chosen) + 2),
            squeeze=False,
        )
        vmax = max(max(max(row) for row in run["rank_trajectory"]["ranks"]) for _, _, run in chosen)
        for ax, (m, seed, run) in zip(axes[0], chosen):
            traj = run["rank_trajectory"]
            order = sorted(range(len(traj["layers"])), key=lambda i: _natural(traj["layers"][i]))  # L2 before L10
            data = np.array(traj["ranks"]).T[order]  # (layers, snapshots)
            im = ax.imshow(
                data,
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                vmin=0,
                vmax=vmax,
                extent=(traj["steps"][0] - 0.5, traj["steps"][-1] + 0.5, len(traj["layers"]) - 0.5, -0.5),
            )
            ax.set_yticks(range(len(traj["layers"])))
            ax.set_yticklabels([_short_layer(traj["layers"][i]) for i in order], fontsize=5)
            ax.set_xlabel("optimizer step")
            ax.set_title(f"{m}: rank per layer ({task}, seed {seed}, r={run['r']}, lr={run['lr']:g})", fontsize=9)
            fig.colorbar(im, ax=ax, label="rank")
        fig.tight_layout()
        path = out / f"ranks-{suite}-{task}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def _natural(name: str) -> list:
    """Sort key putting layer 2 before layer 10 (numbers and names never compared with each other)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _short_layer(name: str) -> str:
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        return ".".join(parts[-2:])
    return f"L{parts[idx]} " + ".".join(p for p in parts[idx + 1 :] if p not in ("self", "attn"))


def plot_metric_vs_params(suite: str, cells: list[dict], out: Path) -> Optional[Path]:
    tasks = sorted({c["task"] for c in cells})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = None
        for m in _methods(cells):
            cs = [c for c in cells if c["task"] == task and c["method"] == m and c.get("test")]
            if not cs:
                continue
            metric = cs[0]["primary_metric"]
            xs = [c["adapter_params_kept"] for c in cs]
            ys = [c["test"][metric] for c in cs]
            ax.scatter(xs, ys, color=COLORS[m], alpha=0.5, s=18)
            ax.errorbar(
                [np.mean(xs)],
                [np.mean(ys)],
                yerr=[np.std(ys)] if len(ys) > 1 else None,
                fmt="o",
                color=COLORS[m],
                markersize=8,
                capsize=3,
                label=m,
            )
        ax.set_xscale("log")
        ax.set_xlabel("final adapter parameters (kept)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{suite}: test metric vs final trainable adapter parameters (head excluded, same for all)", fontsize=10
    )
    fig.tight_layout()
    path = out / f"metric-vs-params-{suite}.png"
    save_figure(fig, path)
    return path


def plot_robustness(suite: str, cells: list[dict], out: Path) -> list[Path]:
    paths = []
    for task in sorted({c["task"] for c in cells}):
        cs = [c for c in cells if c["task"] == task and c["method"] in ("geolora", "adalora")]
        cs = sorted(cs, key=lambda c: (METHOD_ORDER.index(c["method"]), c["seed"]))
        cs = [c for i, c in enumerate(cs) if all(c["method"] != d["method"] for d in cs[:i])]  # first seed
        if not cs:
            continue
        fig, axes = plt.subplots(1, len(cs), figsize=(4.5 * len(cs), 3.4), squeeze=False)
        for ax, c in zip(axes[0], cs):
            metric, lrs, budgets = c["primary_metric"], c["lr_grid"], c["budgets"]
            grid = np.full((len(budgets), len(lrs)), np.nan)
            div = np.zeros_like(grid, dtype=bool)
            for run in c["runs"]:
                i, j = budgets.index(run["r"]), lrs.index(run["lr"])
                div[i, j] = run["diverged"]
                if not run["diverged"]:
                    grid[i, j] = run["test"][metric]
            ax.imshow(
                grid,
                cmap="RdYlGn",
                vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0,
                vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1,
                aspect="auto",
            )
            for i in range(len(budgets)):
                for j in range(len(lrs)):
                    if div[i, j]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="black"))
                        ax.text(j, i, "nan", ha="center", va="center", color="red", fontsize=9, weight="bold")
                    elif np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lrs)))
            ax.set_xticklabels([f"{x:g}" for x in lrs], fontsize=8)
            ax.set_yticks(range(len(budgets)))
            ax.set_yticklabels([str(b) for b in budgets])
            ax.set_xlabel("learning rate")
            ax.set_ylabel("budget r")
            ax.set_title(f"{c['method']} ({task}, seed {c['seed']}): test {metric}", fontsize=9)
        fig.tight_layout()
        path = out / f"robustness-{suite}-{task}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def plot_params_over_steps(suite: str, cells: list[dict], out: Path) -> list[Path]:
    paths = []
    for task in sorted({c["task"] for c in cells}):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        drawn = False
        for c in sorted(cells, key=lambda c: c["method"]):
            if c["task"] != task or c["method"] not in ("geolora", "adalora"):
                continue
            lr = c.get("trajectory_lr") or c["lr_grid"][0]
            runs = sorted((r for r in c["runs"] if r["lr"] == lr), key=lambda r: r["r"])
            for i, run in enumerate(runs):
                steps, totals = adapter_params_over_steps(run, c["method"])
                style = "-" if c["method"] == "geolora" else "--"
                cmap = plt.get_cmap("Blues" if c["method"] == "geolora" else "Greens")
                shade = cmap(0.4 + 0.6 * i / max(len(runs), 2))
                label = f"{c['method']} r0={run['r']}" + (" (diverged)" if run["diverged"] else "")
                ax.plot(steps, totals, style, color=shade, label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("adapter parameters (live ranks)")
        ax.set_title(f"{suite}/{task}: trainable adapter parameters over training (lr={lr:g})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"params-over-steps-{suite}-{task}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def cell_listing(suite: str, cells: list[dict]) -> list[str]:
    names = sorted(f"{c['method']}--{c['task']}--{c['seed']}" for c in cells)
    return [f"Finished cells in `{suite}` ({len(names)}): " + ", ".join(f"`{n}`" for n in names), ""]


def final_train_loss(run: dict, last: int = 3) -> Optional[float]:
    """Mean of the last ``last`` logged training losses (the Trainer logs every 5% of the run), None if none."""
    losses = [x[1] for x in run.get("train_loss") or [] if x[1] is not None and math.isfinite(x[1])]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


def runs_table(results_dir: Path, suites: Optional[list[str]] = None) -> list[str]:
    """A markdown table of every run under ``results_dir`` (:func:`cells.load_runs`): validation and test primary
    metric, adapter parameters kept, the final training loss and the median step time."""
    runs = load_runs(results_dir, suites)
    if not runs:
        raise SystemExit(f"no benchmark runs under {results_dir}")
    lines = [
        "| suite | method | task | seed | cell | r | lr | val | test | adapter params kept | final train loss "
        "| median step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def metric(scores):
        scores = scores or {}
        value = scores.get("accuracy", next((v for k, v in scores.items() if k != "loss"), None))
        return "diverged" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"

    for run in runs:
        loss = final_train_loss(run)
        lines.append(
            f"| {run['suite']} | {run['method']} | {run['task']} | {run['seed']} | {run['status']} | {run.get('r')} "
            f"| {run.get('lr'):g} | {metric(run.get('val'))} | {metric(run.get('test'))} "
            f"| {run.get('adapter_params_kept', 0):,} | {'n/a' if loss is None else f'{loss:.3f}'} "
            f"| {run.get('median_step_s', float('nan')):.3f} |"
        )
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--suites", nargs="*", help="only these suites")
    parser.add_argument("--out", help="report markdown path (default <results-dir>/report.md)")
    parser.add_argument(
        "--evidence",
        metavar="DIR",
        help="the evidence preset's report instead (benchmarks/evidence.py): DIR/evidence.md and DIR/plots/",
    )
    parser.add_argument(
        "--runs",
        action="store_true",
        help="one row per training run, interrupted cells included (a diagnostic sweep): <results-dir>/runs.md",
    )
    args = parser.parse_args(argv)
    if args.runs:
        out = Path(args.out) if args.out else Path(args.results_dir) / "runs.md"
        lines = runs_table(Path(args.results_dir), args.suites)
        command = "python benchmarks/report.py --runs --results-dir " + args.results_dir
        atomic_write_text(out, "\n".join([f"Generated by `{command}`.", ""] + lines) + "\n")
        print(f"wrote {out} ({len(lines) - 2} runs)")
        return 0
    if args.evidence:
        command = "python benchmarks/report.py --evidence " + args.evidence
        report, made = evidence.write_report(Path(args.evidence), command)
        print(f"wrote {report} and {len(made)} plots")
        return 0
    results_dir = Path(args.results_dir)
    suites = load_results(results_dir, args.suites)
    if not suites:
        raise SystemExit(f"no finished benchmark cells under {results_dir}")
    plots = results_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    report = Path(args.out) if args.out else results_dir / "report.md"
    lines = [
        "# Benchmark report",
        "",
        f"Generated by `python benchmarks/report.py --results-dir {args.results_dir}` "
        "from the cell files of `benchmarks/run.py`.",
        "",
    ]
    first = next(iter(suites.values()))[0]["provenance"]
    lines += [
        f"Provenance (first cell): git {first['git']}, preset `{first['preset']}` ({first['config_file']}), "
        f"versions {first['versions']}, hardware {first['hardware']}. {first.get('note', '')}",
        "",
    ]
    summary = summary_table(suites)
    if summary:
        atomic_write_text(report.parent / "summary.md", "\n".join(summary) + "\n")
        lines += ["## Summary (test metric, mean ± std over seeds; cost of the selected runs)", ""] + summary
    for suite, cells in suites.items():
        grid = any(c.get("kind") == "grid" for c in cells)
        lines += grid_tables(suite, cells) if grid else compare_tables(suite, cells)
        lines += cell_listing(suite, cells)
        made = []
        if grid:
            made += plot_robustness(suite, cells, plots)
            made += plot_params_over_steps(suite, cells, plots)
        else:
            made.append(plot_metric_vs_params(suite, cells, plots))
        made += plot_rank_heatmaps(suite, cells, plots)
        lines += [
            f"![{p.stem}]({p.relative_to(report.parent) if p.is_relative_to(report.parent) else p})"
            for p in made
            if p is not None
        ]
        lines.append("")
    atomic_write_text(report, "\n".join(lines) + "\n")
    print(f"wrote {report} and {len(list(plots.glob('*.png')))} plots under {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
