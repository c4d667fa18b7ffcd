"""The evidence report (``python benchmarks/report.py --evidence DIR``): what the ``evidence`` preset's cells say.

Reads the cell files that ``benchmarks/run.py --preset evidence`` writes (``configs/bench/evidence.yaml``) and writes
``DIR/evidence.md`` and PNGs under ``DIR/plots/``:

* per task, a Pareto plot of the test metric against the adapter parameters kept after training, mean and spread over
  seeds, with each method's front (``evidence-pareto-<task>.png``);
* a table stating, per task, the smallest adapter of each method whose mean test metric is within 0.5 points of the
  best mean any method reached (and the full per-setting table: lr grid tried and selected, test metric, parameters,
  step time and peak memory of the same runs);
* the validation curves of the selected runs (``evidence-curves-<task>.png``) and, in the table, how much the
  validation metric still moved over the last 30% of the steps;
* the learning-rate robustness heat map (``evidence-robustness-<task>.png``): test metric per lr and size, for every
  size trained at five or more learning rates, with the runs that failed marked: diverged (non-finite loss) or no
  better than a constant prediction (test accuracy within half a point of the most frequent class's share);
* GeoLoRA's adapter size over steps from several initial ranks (``evidence-rank-init-<task>.png``).
* the preset's cost per task and method: runs, hours of training and the median step (every run counts).

A size *setting* is LoRA's ``r``, AdaLoRA's ``target_r`` or GeoLoRA's ``tau`` (one ``r_max``, one initial ``r``).
Only finished cells count (``status == "done"``); the listing at the end names what is missing from a full preset.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from cells import COLORS, METHOD_ORDER, adapter_params_over_steps, load_results, save_figure  # noqa: E402

from geolora.io import atomic_write_text  # noqa: E402

WITHIN_POINTS = 0.5  # "equal accuracy": within this many points (metric x 100) of the best mean
ROBUST_MIN_LRS = 5  # a size with at least this many learning rates is drawn in the robustness heat map
RANK_INIT_SUITE = "evidence-rank-init"
CONSTANT_MARGIN = 0.005  # a run within this of the most-frequent-class accuracy learned nothing usable


@dataclass
class Point:
    """One (task, method, size setting): its selected run on every seed."""

    task: str
    method: str
    setting: str  # "r=4", "target_r=4", "tau=0.1"
    order: float  # sorts the settings of a method from small to large adapters
    metric: str
    runs: list[dict] = field(default_factory=list)  # the selected run of each seed
    seeds: list[int] = field(default_factory=list)
    lrs_tried: list[float] = field(default_factory=list)  # on the seed that selected the lr

    def scores(self) -> list[float]:
        vals = [100.0 * r["test"].get(self.metric, float("nan")) for r in self.runs]
        return [v for v in vals if math.isfinite(v)]

    @property
    def mean(self) -> Optional[float]:
        s = self.scores()
        return statistics.mean(s) if s else None

    @property
    def std(self) -> float:
        s = self.scores()
        return statistics.stdev(s) if len(s) > 1 else 0.0

    @property
    def params(self) -> float:
        return statistics.mean(r["adapter_params_kept"] for r in self.runs)

    @property
    def lr(self) -> float:
        return float(self.runs[0]["lr"])

    @property
    def lr_at_edge(self) -> bool:
        return bool(self.lrs_tried) and self.lr in (min(self.lrs_tried), max(self.lrs_tried))

    def mean_of(self, key: str) -> Optional[float]:
        vals = [r.get(key) for r in self.runs if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    def step_time(self) -> Optional[float]:
        """The fastest seed's median step time: other work on the machine only ever slows a run down, so the least
        disturbed of the same setting's runs is the closest to what the method costs."""
        vals = [r["median_step_s"] for r in self.runs if r.get("median_step_s") is not None]
        return min(vals) if vals else None

    def late_change(self) -> Optional[float]:
        """Mean change (points) of the validation metric over the last 30% of the steps: ~0 when it plateaued."""
        changes = []
        for run in self.runs:
            curve = [c for c in run.get("val_curve") or [] if self.metric in c]
            if len(curve) < 3:
                continue
            last = curve[-1]
            cut = 0.7 * last["step"]
            earlier = [c for c in curve if c["step"] <= cut]
            if earlier:
                changes.append(100.0 * (last[self.metric] - earlier[-1][self.metric]))
        return statistics.mean(changes) if changes else None


def setting_of(cell: dict, r: int) -> tuple[str, float]:
    if cell["method"] == "geolora":
        tau = float(cell["provenance"]["settings"]["hp"].get("tau", 0.1))
        return f"tau={tau:g}", -tau  # larger tau, smaller adapter
    if cell["method"] == "adalora":
        return f"target_r={r}", float(r)
    return f"r={r}", float(r)


def collect_points(cells: list[dict]) -> dict[str, list[Point]]:
    """task -> its points, from the comparison cells (every suite but the rank-init one)."""
    points: dict[tuple, Point] = {}
    for cell in sorted(cells, key=lambda c: c["seed"]):
        if cell["suite"] == RANK_INIT_SUITE:
            continue
        for r_str, idx in (cell.get("selected") or {}).items():
            r = int(r_str)
            setting, order = setting_of(cell, r)
            key = (cell["task"], cell["method"], setting)
            p = points.setdefault(key, Point(cell["task"], cell["method"], setting, order, cell["primary_metric"]))
            p.runs.append(cell["runs"][idx])
            p.seeds.append(cell["seed"])
            if cell.get("lr_from_seed") is None and cell.get("lr_selected_on_seed") == cell["seed"]:
                p.lrs_tried = (cell.get("lr_grid_by_budget") or {}).get(r_str, cell.get("lr_grid", []))
    out: dict[str, list[Point]] = defaultdict(list)
    for p in points.values():
        out[p.task].append(p)
    for task in out:
        out[task].sort(key=lambda p: (METHOD_ORDER.index(p.method), p.order))
    return dict(out)


def front(points: list[Point]) -> list[Point]:
    """The Pareto front: points that no other point beats on both size (fewer parameters) and metric."""
    ranked = sorted((p for p in points if p.mean is not None), key=lambda p: (p.params, -p.mean))
    out, best = [], -math.inf
    for p in ranked:
        if p.mean > best:
            out.append(p)
            best = p.mean
    return out


def smallest_within(points: list[Point], best: float, points_margin: float = WITHIN_POINTS) -> Optional[Point]:
    ok = [p for p in points if p.mean is not None and p.mean >= best - points_margin]
    return min(ok, key=lambda p: p.params) if ok else None


def verdict_table(by_task: dict[str, list[Point]]) -> list[str]:
    lines = [
        "| task | best mean (method, setting) | "
        + " | ".join(f"smallest {m} within {WITHIN_POINTS} pts" for m in METHOD_ORDER)
        + " |",
        "|---|---|" + "---|" * len(METHOD_ORDER),
    ]
    for task, points in sorted(by_task.items()):
        scored = [p for p in points if p.mean is not None]
        if not scored:
            continue
        top = max(scored, key=lambda p: p.mean)
        row = [task, f"{top.mean:.2f} ({top.method}, {top.setting})"]
        for m in METHOD_ORDER:
            mine = [p for p in scored if p.method == m]
            if not mine:
                row.append("no finished cell")
                continue
            p = smallest_within(mine, top.mean)
            row.append(
                f"{p.params:,.0f} params ({p.setting}, {p.mean:.2f})"
                if p
                else f"none (its best: {max(q.mean for q in mine):.2f})"
            )
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def setting_table(task: str, points: list[Point]) -> list[str]:
    lines = [
        f"### {task}",
        "",
        "| method | setting | seeds | test (mean ± std) | adapter params kept | lr selected | lrs tried (seed 0) "
        "| val change, last 30% (pts) | step s (fastest seed) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        mean = "n/a" if p.mean is None else f"{p.mean:.2f} ± {p.std:.2f}"
        late = p.late_change()
        step = p.step_time()
        rss = p.mean_of("peak_rss_bytes")
        tried = ", ".join(f"{x:g}" for x in p.lrs_tried)
        edge = " (edge)" if p.lr_at_edge else ""
        lines.append(
            f"| {p.method} | {p.setting} | {len(p.runs)} | {mean} | {p.params:,.0f} | {p.lr:g}{edge} | {tried} | "
            f"{'n/a' if late is None else f'{late:+.2f}'} | {'n/a' if step is None else f'{step:.3f}'} | "
            f"{'n/a' if rss is None else f'{rss / 2**20:,.0f}'} |"
        )
    return lines + [""]


def plot_pareto(task: str, points: list[Point], out: Path) -> Optional[Path]:
    scored = [p for p in points if p.mean is not None]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in METHOD_ORDER:
        mine = [p for p in scored if p.method == m]
        if not mine:
            continue
        ax.errorbar(
            [p.params for p in mine],
            [p.mean for p in mine],
            yerr=[p.std for p in mine],
            fmt="o",
            color=COLORS[m],
            alpha=0.8,
            capsize=3,
            label=m,
        )
        for p in mine:
            ax.annotate(p.setting, (p.params, p.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
        f = front(mine)
        ax.plot([p.params for p in f], [p.mean for p in f], "-", color=COLORS[m], alpha=0.6)
    ax.set_xscale("log")
    # thousands on the log axis, labels only at 1-2-5 decades (matplotlib's default crowds 3e5 and 4e5)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax.set_xlabel("adapter parameters kept after training (log scale)")
    ax.set_ylabel(f"test {scored[0].metric} (x100), mean ± std over seeds")
    ax.set_title(f"{task}: accuracy vs adapter size (lines: each method's front)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / f"evidence-pareto-{task}.png")


def plot_curves(task: str, points: list[Point], out: Path) -> Optional[Path]:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for p in points:
        if not p.runs:
            continue
        curve = [c for c in p.runs[0].get("val_curve") or [] if p.metric in c]
        if not curve:
            continue
        ax.plot(
            [c["step"] for c in curve],
            [100 * c[p.metric] for c in curve],
            color=COLORS[p.method],
            alpha=0.3 + 0.7 * (1 + METHOD_ORDER.index(p.method)) / 4,
            lw=1,
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for m in METHOD_ORDER:
        ax.plot([], [], color=COLORS[m], label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {points[0].metric} (x100)")
    ax.set_title(f"{task}: validation curves of the selected runs (first seed, every setting)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / f"evidence-curves-{task}.png")


def constant_accuracy(cell: dict) -> Optional[float]:
    """Test accuracy of always predicting the test split's most frequent class (None when the cell does not say)."""
    counts = (cell.get("provenance", {}).get("label_counts") or {}).get("test")
    return max(counts) / sum(counts) if counts else None


def run_state(run: dict, metric: str, constant: Optional[float]) -> str:
    """``"diverged"`` (non-finite loss or metric), ``"constant"`` (test accuracy no better than ``constant``, the
    most-frequent-class prediction, within CONSTANT_MARGIN) or ``"trained"``."""
    if run["diverged"] or not math.isfinite(run["test"].get(metric, float("nan"))):
        return "diverged"
    acc = run["test"].get("accuracy")
    if constant is not None and acc is not None and acc <= constant + CONSTANT_MARGIN:
        return "constant"
    return "trained"


@dataclass
class RobustRow:
    """One (method, size) trained at ROBUST_MIN_LRS or more learning rates on one seed."""

    label: str
    runs: dict[float, dict]
    metric: str
    constant: Optional[float]

    def state(self, lr: float) -> Optional[str]:
        run = self.runs.get(lr)
        return None if run is None else run_state(run, self.metric, self.constant)


def robustness_rows(cells: list[dict]) -> dict[str, list[RobustRow]]:
    """task -> a row for every (method, size) of a cell trained at ROBUST_MIN_LRS or more lrs."""
    out: dict[str, list] = defaultdict(list)
    for cell in sorted(cells, key=lambda c: (METHOD_ORDER.index(c["method"]), c["suite"])):
        if cell["suite"] == RANK_INIT_SUITE or cell.get("lr_from_seed") is not None:
            continue
        by_r: dict[int, dict[float, dict]] = defaultdict(dict)
        for run in cell["runs"]:
            by_r[run["r"]][float(run["lr"])] = run
        for r, runs in sorted(by_r.items()):
            if len(runs) >= ROBUST_MIN_LRS:
                label = f"{cell['method']} {setting_of(cell, r)[0]}"
                out[cell["task"]].append(RobustRow(label, runs, cell["primary_metric"], constant_accuracy(cell)))
    return dict(out)


FAILED_MARK = {"diverged": "div", "constant": "const"}


def plot_robustness(task: str, rows: list[RobustRow], out: Path) -> Optional[Path]:
    if not rows:
        return None
    lrs = sorted({lr for row in rows for lr in row.runs})
    grid = np.full((len(rows), len(lrs)), np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lrs), 1.1 + 0.45 * len(rows)))
    for i, row in enumerate(rows):
        for j, lr in enumerate(lrs):
            state = row.state(lr)
            if state is None:
                continue
            if state in FAILED_MARK:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="#f2d4d4", zorder=0))
                ax.text(j, i, FAILED_MARK[state], ha="center", va="center", fontsize=7, color="#b00000")
                continue
            v = 100 * row.runs[lr]["test"][row.metric]
            grid[i, j] = v
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
    ax.set_yticks(range(len(rows)), [row.label for row in rows], fontsize=7)
    ax.set_xlabel("learning rate")
    ax.set_title(
        f"{task}: test {rows[0].metric} (x100) per learning rate\n"
        "div: diverged; const: no better than predicting the most frequent class; blank: not run",
        fontsize=8,
    )
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return save_figure(fig, out / f"evidence-robustness-{task}.png")


def robustness_table(task: str, rows: list[RobustRow]) -> list[str]:
    lrs = sorted({lr for row in rows for lr in row.runs})
    lines = [
        f"| {task} | " + " | ".join(f"{lr:g}" for lr in lrs) + " | lrs that trained |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for row in rows:
        cells, trained = [], 0
        for lr in lrs:
            state = row.state(lr)
            if state is None:
                cells.append("")
            elif state == "trained":
                trained += 1
                cells.append(f"{100 * row.runs[lr]['test'][row.metric]:.1f}")
            elif state == "constant":
                cells.append(f"constant ({100 * row.runs[lr]['test']['accuracy']:.1f})")
            else:
                cells.append(state)
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {trained}/{len(row.runs)} |")
    constants = sorted({row.constant for row in rows if row.constant is not None})
    note = (
        "*diverged*: non-finite loss; *constant*: test accuracy no better than always predicting the test set's most "
        f"frequent class ({', '.join(f'{100 * c:.1f}' for c in constants)}) plus {100 * CONSTANT_MARGIN:g} points."
        if constants
        else "*diverged*: non-finite loss (these cells do not record their label counts, so runs that collapsed to a "
        "constant prediction are not marked)."
    )
    return lines + ["", note, ""]


def plot_rank_init(cells: list[dict], out: Path) -> list[Path]:
    paths = []
    for task in sorted({c["task"] for c in cells if c["suite"] == RANK_INIT_SUITE}):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for cell in cells:
            if cell["suite"] != RANK_INIT_SUITE or cell["task"] != task:
                continue
            runs = sorted(cell["runs"], key=lambda r: r["r"])
            for i, run in enumerate(runs):
                steps, totals = adapter_params_over_steps(run, "geolora")
                shade = plt.get_cmap("Blues")(0.35 + 0.65 * i / max(len(runs) - 1, 1))
                acc = 100 * run["test"].get(cell["primary_metric"], float("nan"))
                ax.plot(steps, totals, color=shade, label=f"initial r={run['r']} (test {acc:.1f})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("adapter parameters (live ranks)")
        r_max = cell["provenance"]["settings"]["hp"].get("geolora_r_max")
        ax.set_title(f"{task}: GeoLoRA adapter size over training, one r_max = {r_max}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"evidence-rank-init-{task}.png"))
    return paths


def rank_init_table(cells: list[dict]) -> list[str]:
    """Per task and initial rank: the adapter parameters and total rank at the end, and the test metric."""
    lines = [
        "| task | seed | lr | initial r | final adapter params | final total rank (min-max per layer) | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in sorted(cells, key=lambda c: (c["task"], c["seed"])):
        if cell["suite"] != RANK_INIT_SUITE:
            continue
        for run in sorted(cell["runs"], key=lambda r: r["r"]):
            ranks = list(run["final_ranks"].values())
            test = 100 * run["test"].get(cell["primary_metric"], float("nan"))
            lines.append(
                f"| {cell['task']} | {cell['seed']} | {run['lr']:g} | {run['r']} | {run['adapter_params_kept']:,} | "
                f"{sum(ranks)} ({min(ranks)}-{max(ranks)}) | {test:.1f} |"
            )
    return lines + [""]


def cost_table(cells: list[dict]) -> list[str]:
    """What the preset cost, per task and method, over every run of every finished cell (every suite, every lr
    tried, widening included): runs, hours of training (sum of ``train_time_s``: wall time, so pauses and other
    work on the machine count) and the median of the runs' median step times (pauses do not move it)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in cells:
        for run in cell.get("runs") or []:
            groups[(cell["task"], cell["method"])].append(run)
            groups[(cell["task"], "all")].append(run)
    if not groups:
        return []

    def hours(runs: list[dict]) -> float:
        return sum(r.get("train_time_s") or 0.0 for r in runs) / 3600

    lines = [
        "| task | method | runs | training hours | median step s |",
        "|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHOD_ORDER + ("all",))}
    for task, method in sorted(groups, key=lambda k: (k[0], order.get(k[1], len(order)))):
        runs = groups[(task, method)]
        steps = [r["median_step_s"] for r in runs if r.get("median_step_s") is not None]
        step = f"{statistics.median(steps):.3f}" if steps else "n/a"
        name = "**all**" if method == "all" else method
        lines.append(f"| {task} | {name} | {len(runs)} | {hours(runs):.1f} | {step} |")
    every = [run for (_, method), runs in groups.items() if method == "all" for run in runs]
    lines += ["", f"In all: {len(every)} runs, {hours(every):.1f} hours of training.", ""]
    return lines


def _revision(git: dict) -> str:
    """A short revision, marked where the tree had uncommitted changes (and whether they were only result files)."""
    if not git.get("revision"):  # run outside a git checkout (or git missing): nothing to name
        return "no git checkout"
    rev = str(git["revision"])[:7]
    if not git.get("dirty"):
        return rev
    paths = git.get("dirty_paths") or []
    only_results = bool(paths) and all(str(p).startswith("benchmarks/results/") for p in paths)
    return f"{rev} (dirty: {'results files only' if only_results else 'code'})"


def provenance_table(cells: list[dict]) -> list[str]:
    """Where and at which revision the cells ran, per task and CPU (cells of one preset may come from different
    machines and sittings), and the package versions, once if every cell agrees, else per distinct set."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        cpu = str((cell["provenance"].get("hardware") or {}).get("cpu", "unknown"))
        groups.setdefault((cell["task"], cpu), []).append(cell)
    if not groups:
        return []
    lines = [
        "| task | CPU | cells | git revisions (dirty: uncommitted changes when the cell ran) |",
        "|---|---|---|---|",
    ]
    for (task, cpu), group in sorted(groups.items()):
        revs = sorted({_revision(g["provenance"].get("git") or {}) for g in group})
        lines.append(f"| {task} | {cpu} | {len(group)} | {', '.join(revs)} |")
    versions: dict[str, int] = defaultdict(int)
    for cell in cells:
        versions[json.dumps(cell["provenance"].get("versions", {}), sort_keys=True)] += 1
    lines.append("")
    for v, n in sorted(versions.items()):
        lines.append(f"Versions ({'every cell' if len(versions) == 1 else f'{n} cells'}): {json.loads(v)}.")
    lines.append("")
    return lines


def write_report(results_dir: Path, command: str) -> tuple[Path, list[Path]]:
    """``results_dir/evidence.md`` and its plots; returns the report's path and the plots written."""
    suites = load_results(results_dir)
    cells = [c for cs in suites.values() for c in cs]
    if not cells:
        raise SystemExit(f"no finished benchmark cells under {results_dir}")
    plots = results_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    by_task = collect_points(cells)
    robust = robustness_rows(cells)
    made: list[Path] = []
    config_files = sorted({str(c["provenance"].get("config_file")) for c in cells})
    lines = [
        "# Evidence: accuracy vs adapter size, and learning-rate robustness",
        "",
        f"Generated by `{command}` from the cell files of `benchmarks/run.py --preset evidence` "
        f"({len(cells)} finished cells).",
        "",
        f"Config: {', '.join(config_files)}. Where each task's cells ran (each cell file records its git revision, "
        "versions and hardware):",
        "",
        *provenance_table(cells),
        f"## Smallest adapter within {WITHIN_POINTS} points of the best mean test metric",
        "",
        "Metric x 100, mean over seeds; parameters are the adapter parameters kept after training (AdaLoRA's masked "
        "ranks count only if removed on save; the classifier head, the same for every method, is not counted).",
        "",
    ]
    lines += verdict_table(by_task)
    lines += [
        "## Every setting",
        "",
        "Step s: the run's median optimizer step in seconds, from the fastest of the setting's seeds (other work on "
        "the machine only slows a run down); peak RSS: the training process's peak resident memory, mean over seeds. "
        "Both come from the same runs as the metric.",
        "",
    ]
    for task, points in sorted(by_task.items()):
        lines += setting_table(task, points)
        for path in (plot_pareto(task, points, plots), plot_curves(task, points, plots)):
            if path is not None:
                made.append(path)
                lines.append(f"![{path.stem}](plots/{path.name})")
        lines.append("")
    if robust:
        lines += ["## Learning-rate robustness (test metric x 100 per lr; first seed)", ""]
        for task, rows in sorted(robust.items()):
            lines += robustness_table(task, rows)
            path = plot_robustness(task, rows, plots)
            if path is not None:
                made.append(path)
                lines += [f"![{path.stem}](plots/{path.name})", ""]
    rank_plots = plot_rank_init(cells, plots)
    if rank_plots:
        lines += ["## GeoLoRA from several initial ranks under one r_max", ""]
        lines += rank_init_table(cells)
        lines += [f"![{p.stem}](plots/{p.name})" for p in rank_plots] + [""]
        made += rank_plots
    lines += [
        "## Cost of the preset",
        "",
        "Every run of every finished cell (all suites, every learning rate tried). Training hours are wall time "
        "summed over runs; the median step is the median over runs of each run's median optimizer step.",
        "",
    ]
    lines += cost_table(cells)
    names = sorted(f"{c['suite']}/{c['method']}--{c['task']}--{c['seed']}" for c in cells)
    lines += [f"Finished cells ({len(names)}): " + ", ".join(f"`{n}`" for n in names), ""]
    report = results_dir / "evidence.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report, made
