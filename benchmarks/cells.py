"""What both reports (``report.py``, ``evidence.py``) share: reading the finished cells ``benchmarks/run.py`` wrote,
adapter size over training from a run's rank snapshots, and the plot conventions (method order and colours, PNGs
written atomically)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from geolora.app.models import layer_parameters  # noqa: E402
from geolora.io import atomic_write  # noqa: E402

METHOD_ORDER = ("geolora", "lora", "adalora")
COLORS = {"geolora": "tab:blue", "lora": "tab:orange", "adalora": "tab:green"}


def load_results(results_dir: Path, suites: Optional[list[str]] = None) -> dict[str, list[dict]]:
    """suite -> finished cells (files written by run.py: ``status == "done"``; other JSON files are ignored)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(results_dir.glob("*/*.json")):
        if path.name.endswith(".partial.json") or (suites and path.parent.name not in suites):
            continue
        try:
            cell = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(cell, dict) and cell.get("status") == "done" and "method" in cell:
            cell["_file"] = str(path)
            out[cell["suite"]].append(cell)
    return dict(out)


def load_runs(results_dir: Path, suites: Optional[list[str]] = None) -> list[dict]:
    """Every run of every cell under ``results_dir``, interrupted cells (``*.partial.json``) included: one dict per
    run with its cell's ``suite``, ``method``, ``task``, ``seed`` and ``status`` (``done`` or ``partial``) added.

    Raises:
        ValueError: a cell file that is not valid JSON (named).
    """
    out = []
    for path in sorted(results_dir.glob("*/*.json")):
        if suites and path.parent.name not in suites:
            continue
        try:
            cell = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid cell file ({e})") from None
        partial = path.name.endswith(".partial.json")
        stem = path.name[: -len(".partial.json")] if partial else path.stem
        parts = stem.split("--")  # <method>--<task>--<seed>, the runner's cell file name
        if not (isinstance(cell, dict) and isinstance(cell.get("runs"), list) and len(parts) == 3):
            continue  # other JSON files (hand-written notes, other tools' output)
        # an interrupted cell's file holds only its finished runs: the rest of its identity is in its path
        row = {"suite": path.parent.name, "method": parts[0], "task": parts[1], "seed": int(parts[2])}
        row.update({k: cell[k] for k in ("suite", "method", "task", "seed") if k in cell})
        status = "partial" if partial else cell.get("status", "done")
        for run in cell["runs"]:
            out.append({**row, "status": status, **run})
    return out


def adapter_params_over_steps(run: dict, method: str) -> tuple[list[int], list[int]]:
    """Adapter parameters at every rank snapshot: :func:`geolora.app.models.layer_parameters` of each layer's rank
    with the run's ``per_rank_params`` (what one rank costs in that layer)."""
    traj, cost = run["rank_trajectory"], run.get("per_rank_params") or {}
    totals = []
    for row in traj["ranks"]:
        totals.append(sum(layer_parameters(method, r, cost.get(name, 0)) for name, r in zip(traj["layers"], row)))
    return traj["steps"], totals


def save_figure(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically, and closed."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
