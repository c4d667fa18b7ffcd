"""Benchmark runner: GeoLoRA vs LoRA vs AdaLoRA with the stock ``transformers.Trainer``.

    python benchmarks/run.py --preset smoke                 # tiny models, tiny data written to a temp dir (~1-2 min)
    nice -n 5 python benchmarks/run.py --preset cpu         # real offline models and data on CPU
    accelerate launch benchmarks/run.py --preset full       # paper-scale GLUE (DeBERTa-v3-base) and ViT-B/16 on GPUs
    python benchmarks/run.py --preset full --data-dir DIR   # the same tasks from local files: DIR/<task>/...

A preset is ``configs/bench/<preset>.yaml``: suites of (methods x tasks x seeds) cells. Every method of a cell sees the
same base model, data, splits, optimizer steps, batch, schedule and evaluation; only the adapter differs:

* budget ``r``: LoRA rank ``r``; AdaLoRA ``init_r = ceil(1.5 r)`` -> ``target_r = r``; GeoLoRA starts at ``r`` and may
  grow to ``r_max = 2 r`` (truncation tolerance ``tau``);
* a small learning-rate grid per method; every grid point is trained, the one with the best validation metric (a
  split carved from the training data) is selected and its test metric reported; the grid is in the results.

Every run goes through the application's one training harness (:func:`geolora.app.harness.train_and_evaluate`):
AdaLoRA is driven by its ``AdaLoRACallback`` (``update_and_allocate(global_step)`` after ``optimizer.step()`` and
before ``zero_grad()``, every step, with ``total_step`` = the run's optimizer steps), GeoLoRA by
``geolora.GeoLoRACallback``; provenance comes from :func:`geolora.app.harness.provenance`.

Each cell writes ``<results>/<suite>/<method>--<task>--<seed>.json``; a rerun skips finished cells, and finished grid
points of an interrupted cell (kept in ``*.partial.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as T  # noqa: E402

from geolora.app import data as gdata  # noqa: E402
from geolora.app import harness  # noqa: E402
from geolora.app.models import adapter_parameters, layer_ranks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs" / "bench"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
METHODS = ("geolora", "lora", "adalora")
logger = logging.getLogger("benchmarks.run")


# ----------------------------------------------------------------------------------------------- callbacks
class RecorderCallback(TrainerCallback):
    """Per-step wall time, per-layer ranks and peak memory of one run (overhead excluded from timing)."""

    def __init__(self, method: str, rank_every: int = 1) -> None:
        import psutil

        self.method, self.rank_every = method, rank_every
        self.process = psutil.Process()
        self.step_times: list[float] = []
        self.rank_steps: list[int] = []
        self.rank_rows: list[list[int]] = []
        self.layers: list[str] = []
        self.peak_rss = 0
        self.curve: list[dict[str, float]] = []  # validation metrics every ``eval_every`` steps (train.eval_every)
        self._t = 0.0

    def _snapshot(self, model, step: int) -> None:
        ranks = layer_ranks(model, self.method)
        if not self.layers:
            self.layers = sorted(ranks)
        self.rank_steps.append(step)
        self.rank_rows.append([ranks.get(n, 0) for n in self.layers])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = self.process.memory_info().rss
        self._snapshot(model, 0)
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_times.append(time.perf_counter() - self._t)
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        if state.global_step % self.rank_every == 0 or state.global_step == state.max_steps:
            self._snapshot(model, state.global_step)
        self._t = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # the Trainer's periodic evaluations on the validation split ("eval_" keys); the harness's final ones are named
        # "val_"/"test_" and are in the run's val/test scores
        row = {k[len("eval_") :]: float(v) for k, v in (metrics or {}).items() if k.startswith("eval_")}
        if row:
            self.curve.append({"step": state.global_step, **row})
        self._t = time.perf_counter()  # the evaluation is not part of the next step's time

    def peak_memory(self) -> dict[str, Any]:
        out = {"peak_rss_bytes": int(self.peak_rss)}
        if torch.cuda.is_available():
            out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        return out


# ----------------------------------------------------------------------------------------------- config
def load_preset(preset: Optional[str], config: Optional[str]) -> dict:
    path = Path(config) if config else CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"no benchmark config '{path}' (presets: {sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))})")
    cfg = yaml.safe_load(path.read_text())
    resolved = path.resolve()  # a relative --config is relative to the working directory, not to the repository
    cfg["_path"] = str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else path)
    return cfg


def plan_cells(cfg: dict, only: dict[str, Optional[set]]) -> list[dict]:
    """Every (suite, seed, task, method) cell with its resolved settings, seed-major so that seed 0 finishes first."""
    cells = []
    for suite_name, suite in cfg["suites"].items():
        if only["suites"] and suite_name not in only["suites"]:
            continue
        all_seeds = sorted(set(suite["seeds"]).union(*[(t or {}).get("seeds", []) for t in suite["tasks"].values()]))
        for seed in all_seeds:
            for task_name, task_over in suite["tasks"].items():
                task_over = task_over or {}
                if only["tasks"] and task_name not in only["tasks"]:
                    continue
                if seed not in task_over.get("seeds", suite["seeds"]) or (only["seeds"] and seed not in only["seeds"]):
                    continue
                for method in task_over.get("methods", suite["methods"]):
                    if only["methods"] and method not in only["methods"]:
                        continue
                    hp = T.deep_merge(suite.get("train", {}), task_over.get("train"))
                    model = T.deep_merge(suite["model"], task_over.get("model"))
                    budgets = task_over.get("budgets", suite["budgets"])
                    if isinstance(budgets, dict):  # per method: budgets: {lora: [1, 2, 4], geolora: [8]}
                        if method not in budgets:
                            raise SystemExit(f"suite '{suite_name}': budgets has no entry for method '{method}'")
                        budgets = budgets[method]
                    task_seeds = sorted(task_over.get("seeds", suite["seeds"]))
                    selection = task_over.get("lr_selection", suite.get("lr_selection", "per_seed"))
                    if selection not in ("per_seed", "first_seed"):
                        raise SystemExit(
                            f"suite '{suite_name}': lr_selection must be 'per_seed' or 'first_seed', not {selection!r}"
                        )
                    lr_seed = task_seeds[0] if selection == "first_seed" and seed != task_seeds[0] else None
                    cells.append(
                        dict(
                            suite=suite_name,
                            kind=suite.get("kind", "compare"),
                            task=task_name,
                            method=method,
                            seed=seed,
                            hp=hp,
                            model=model,
                            budgets=list(budgets),
                            lrs=lr_grid(suite, task_over, method),
                            lr_extra=extra_lrs(suite, task_over, method),
                            lr_widen=int(task_over.get("lr_widen", suite.get("lr_widen", 0))),
                            data=task_over.get("data", {}),
                            trajectory_lr=suite.get("trajectory_lr"),
                            lr_from_seed=lr_seed,
                        )
                    )
    return cells


def cell_path(out_dir: Path, method: str, task: str, seed: int) -> Path:
    return out_dir / f"{method}--{task}--{seed}.json"


def runs_to_do(cell: dict, out_dir: Path) -> list[tuple[int, float]]:
    """The (budget, lr) runs of a cell: the whole grid, or, with ``lr_selection: first_seed`` on a later seed, only the
    learning rate the first seed's cell selected on its validation split (per budget)."""
    if cell.get("lr_from_seed") is None:
        extra = cell.get("lr_extra", {})
        return [(r, lr) for r in cell["budgets"] for lr in sorted(set(cell["lrs"]) | set(extra.get(r, [])))]
    first = cell_path(out_dir, cell["method"], cell["task"], cell["lr_from_seed"])
    if not first.is_file():
        raise SystemExit(
            f"{cell['suite']}/{cell['method']}--{cell['task']}--{cell['seed']}: lr_selection is "
            f"'first_seed', so it needs {first} (run seed {cell['lr_from_seed']} first)"
        )
    ref = json.loads(first.read_text())
    out = []
    for r in cell["budgets"]:
        i = ref.get("selected", {}).get(str(r))
        if i is None:  # every grid point of the first seed diverged: nothing to select, run the whole grid
            out += [(r, lr) for lr in cell["lrs"]]
        else:
            out.append((r, float(ref["runs"][i]["lr"])))
    return out


def lr_grid(suite: dict, task_over: dict, method: str) -> list[float]:
    """Per-method grid (``lr_grid: {method: [...]}``), or the task's ``lr`` times ``lr_scale`` for every method."""
    grid = T.deep_merge(suite.get("lr_grid", {}), task_over.get("lr_grid"))
    if method in grid:
        return [float(x) for x in grid[method]]
    lr = task_over.get("lr", suite.get("lr"))
    scale = task_over.get("lr_scale", suite.get("lr_scale", [1.0]))
    if lr is None:
        raise SystemExit(f"no learning rate for method '{method}': set lr_grid.{method} or lr (+ lr_scale)")
    return [float(lr) * float(s) for s in scale]


def extra_lrs(suite: dict, task_over: dict, method: str) -> dict[int, list[float]]:
    """Learning rates added to the grid for some budgets only (``lr_extra: {method: {r: [...]}}``): the robustness
    sweep over a wide lr range at two sizes, trained in the same cells as the main grid (so the selection sees them
    too)."""
    extra = T.deep_merge(suite.get("lr_extra", {}), task_over.get("lr_extra")).get(method, {})
    return {int(r): [float(x) for x in lrs] for r, lrs in extra.items()}


LR_LADDER = sorted(m * 10.0**k for k in range(-7, 2) for m in (1.0, 3.0))  # 1e-7, 3e-7, ..., 1e1, 3e1


def widen_lrs(runs: list[dict], r: int, metric: str) -> Optional[float]:
    """The next learning rate to try at budget ``r`` when the best validation metric among the runs at ``r`` sits at
    an edge of the learning rates tried (``lr_widen``): the next value beyond that edge on the 1-3-10 ladder
    (:data:`LR_LADDER`); None when the best is inside the tried range (or every run at ``r`` diverged)."""
    at_r = [run for run in runs if run["r"] == r]
    tried = sorted({float(run["lr"]) for run in at_r})
    best = _select(at_r, metric).get(r)
    if best is None or len(tried) < 2:
        return None
    lr = float(at_r[best]["lr"])
    if lr == tried[-1]:
        return next((x for x in LR_LADDER if x > lr * 1.01), None)
    if lr == tried[0]:
        return next((x for x in reversed(LR_LADDER) if x < lr / 1.01), None)
    return None


# ----------------------------------------------------------------------------------------------- data per task
_PREPARED: dict[tuple, dict] = {}


def label_counts(task: gdata.TaskData, splits) -> Optional[dict[str, list[int]]]:
    """Examples per class id in each split (None for regression): what a constant prediction would score."""
    if task.is_regression:
        return None
    n = len(task.label_names)
    out = {}
    for name in ("train", "val", "test"):
        counts = [0] * n
        for label in getattr(splits, name)["label"]:
            counts[int(label)] += 1
        out[name] = counts
    return out


def _split_sizes(splits) -> dict[str, int]:
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}


def _splits(cell: dict, data_dir: Optional[str]):
    d = cell["data"]
    task = T.load_raw_task(d.get("source", cell["task"]), data_dir, d.get("data_seed", 0))
    splits = T.make_splits(
        task, d.get("n_train"), d.get("n_val", max(1, len(task.train) // 10)), d.get("n_test"), d.get("data_seed", 0)
    )
    return task, splits


def backfill_label_counts(cell: dict, path: Path, data_dir: Optional[str]) -> None:
    """Add ``provenance.label_counts`` to a cell finished before it was recorded (from the data, not the runs)."""
    result = json.loads(path.read_text())
    if "label_counts" in result.get("provenance", {}):
        return
    task, splits = _splits(cell, data_dir)
    if dict(result["provenance"].get("split_sizes", {})) != _split_sizes(splits):
        raise ValueError(f"{path}: split sizes differ from the config's; cannot add label_counts")
    result["provenance"]["label_counts"] = label_counts(task, splits)
    _write(path, result)


def prepare(cell: dict, data_dir: Optional[str], cache_root: Path) -> dict:
    """Splits, encoded datasets, collator and metric settings of a task (cached per suite/task in this process)."""
    key = (cell["suite"], cell["task"])
    if key in _PREPARED:
        return _PREPARED[key]
    spec = cell["model"]
    task, splits = _splits(cell, data_dir)
    prepared: dict[str, Any] = {
        "task": task,
        "sizes": _split_sizes(splits),
        "label_counts": label_counts(task, splits),
        "source": task.source,
    }
    if task.modality == "text":
        from transformers import AutoTokenizer, DataCollatorWithPadding

        if "pretrained" in spec:
            tokenizer = AutoTokenizer.from_pretrained(T.resolve_pretrained(spec["pretrained"]))
        else:
            texts = list(splits.train["text"]) + (list(splits.train["text_pair"]) if task.has_pair else [])
            tokenizer = T.word_level_tokenizer(texts, spec["from_config"]["vocab_size"])
        max_length = cell["hp"].get("max_length", 128)
        prepared["train"], prepared["val"], prepared["test"] = T.tokenize(splits, tokenizer, max_length)
        prepared["collator"] = DataCollatorWithPadding(tokenizer)
    else:
        processor = None
        if "pretrain" in spec:
            prepared["pretrained_dir"] = T.pretrain_in_benchmark(spec, cache_root / "_pretrained")
        if "pretrained" in spec and not T.is_efficientnet(spec):
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(T.resolve_pretrained(spec["pretrained"]))
        fc = spec.get("from_config", {})
        transform = gdata.ImageTransform(
            processor,
            spec.get("image_size", fc.get("image_size", 224)),
            fc.get("num_channels", 3),
            tuple(spec.get("normalize", (127.5, 127.5))),
        )
        prepared["train"], prepared["val"], prepared["test"] = T.prepare_images(splits, transform)
        prepared["collator"] = gdata.image_collator
    _PREPARED[key] = prepared
    return prepared


def _scores(evaluation: harness.Evaluation) -> dict[str, float]:
    """A run's ``val`` / ``test`` entry: the task's metrics and the loss (NaN metrics and no loss when diverged)."""
    out = dict(evaluation.metrics)
    if not evaluation.diverged and evaluation.loss is not None:
        out["loss"] = evaluation.loss
    return out


# ----------------------------------------------------------------------------------------------- one training run
def train_one(cell: dict, prepared: dict, r: int, lr: float, verbose: bool) -> dict[str, Any]:
    import peft
    from transformers import TrainingArguments, set_seed

    hp, spec, method, seed = cell["hp"], cell["model"], cell["method"], cell["seed"]
    task: gdata.TaskData = prepared["task"]
    batch, accum = hp.get("batch_size", 32), hp.get("grad_accum", 1)
    steps_per_epoch = max(math.ceil(len(prepared["train"]) / (batch * T.world_size())) // accum, 1)
    total_steps = int(hp.get("max_steps") or steps_per_epoch * hp.get("epochs", 1))
    set_seed(seed)
    base = T.load_base_model(spec, task.num_labels, prepared.get("pretrained_dir"))
    task_type = "SEQ_CLS" if task.modality == "text" else None
    config = T.adapter_config(method, r, spec, hp, total_steps, task_type)
    model = peft.get_peft_model(base, config)
    recorder = RecorderCallback(method, hp.get("rank_log_every", 1))
    use_cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=total_steps,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=hp.get("eval_batch_size", 2 * batch),
            gradient_accumulation_steps=accum,
            learning_rate=lr,
            lr_scheduler_type=hp.get("scheduler", "linear"),
            warmup_steps=hp.get("warmup", 0.1),
            weight_decay=hp.get("weight_decay", 0.0),
            max_grad_norm=hp.get("max_grad_norm", 1.0),
            seed=seed,
            data_seed=seed,
            logging_steps=max(1, total_steps // 20),
            save_strategy="no",
            eval_strategy="steps" if hp.get("eval_every") else "no",
            eval_steps=hp.get("eval_every"),
            report_to="none",
            disable_tqdm=not verbose,
            remove_unused_columns=task.modality == "text",
            use_cpu=not use_cuda,
            bf16=bool(hp.get("bf16", False)) and use_cuda,
            fp16=bool(hp.get("fp16", False)) and use_cuda,
            dataloader_num_workers=hp.get("num_workers", 0),
            label_names=["labels"],
        )
        load_start = os.getloadavg()
        result = harness.train_and_evaluate(
            model,
            args,
            prepared["train"],
            {"val": prepared["val"], "test": prepared["test"]},
            method=method,
            metric_names=task.metric_names,
            is_regression=task.is_regression,
            num_labels=task.num_labels,
            data_collator=prepared["collator"],
            callbacks=[recorder],
            console_log=verbose,
            repo=REPO,
        )
        kept = adapter_parameters(model, method)
        size = 0
        if result.trainer.is_world_process_zero():
            save_dir = Path(tmp) / "adapter"
            model.save_pretrained(save_dir)
            size = T.directory_bytes(save_dir)
    timed = recorder.step_times[2:] or recorder.step_times  # first steps are warm-up
    return {
        "r": r,
        "lr": lr,
        "total_steps": total_steps,
        "diverged": result.diverged,
        "val": _scores(result.evaluations["val"]),
        "test": _scores(result.evaluations["test"]),
        "trainable_params_kept": kept["kept"],
        "adapter_params_kept": kept["adapter"],
        "head_params": kept["head"],
        "trainable_params_during_training": kept["capacity"],
        "adapter_file_bytes": size,
        "train_time_s": result.train_seconds,
        "median_step_s": statistics.median(timed) if timed else None,
        **recorder.peak_memory(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "final_ranks": result.ranks,
        "per_rank_params": kept["per_rank"],
        "rank_trajectory": {"layers": recorder.layers, "steps": recorder.rank_steps, "ranks": recorder.rank_rows},
        "train_loss": result.losses,
        "val_curve": recorder.curve,
        "adapter_config": {k: v for k, v in config.to_dict().items() if k not in ("rank_pattern",)},
    }


def _primary(task: gdata.TaskData) -> str:
    return task.metric_names[0]


def _select(runs: list[dict], metric: str) -> dict[int, int]:
    """Per budget: index of the run with the best validation metric among runs that did not diverge."""
    best: dict[int, int] = {}
    for i, run in enumerate(runs):
        v = run["val"].get(metric, float("nan"))
        if run["diverged"] or not math.isfinite(v):
            continue
        j = best.get(run["r"])
        if j is None or v > runs[j]["val"][metric]:
            best[run["r"]] = i
    return best


def _write(path: Path, obj: dict) -> None:
    harness.write_results(path, obj, indent=1)  # atomic: an interrupted write leaves the previous file


def run_cell(
    cell: dict, out_dir: Path, data_dir: Optional[str], common: dict, progress, verbose: bool, is_main: bool
) -> Optional[dict]:
    path = cell_path(out_dir, cell["method"], cell["task"], cell["seed"])
    partial_path = path.with_name(path.stem + ".partial.json")
    runs: list[dict] = []
    if partial_path.is_file():
        runs = json.loads(partial_path.read_text()).get("runs", [])
    done = {(run["r"], run["lr"]) for run in runs}
    prepared = prepare(cell, data_dir, out_dir)

    def train_and_keep(r: int, lr: float, label: str) -> None:
        """Train one (r, lr) run, append it, and keep the cell's finished runs on disk (*.partial.json)."""
        progress.set_postfix_str(f"{cell['method']} {cell['task']} seed {cell['seed']} r {r} {label}")
        runs.append(train_one(cell, prepared, r, lr, verbose))
        if is_main:
            _write(partial_path, {"runs": runs})
        progress.update(1)

    for r, lr in runs_to_do(cell, out_dir):
        if (r, lr) in done:
            progress.update(1)
        else:
            train_and_keep(r, lr, f"lr {lr:g}")
    metric = _primary(prepared["task"])
    if cell.get("lr_from_seed") is None and cell.get("lr_widen"):
        for r in cell["budgets"]:
            for _ in range(cell["lr_widen"]):
                lr = widen_lrs(runs, r, metric)
                if lr is None:
                    break
                lr = float(f"{lr:.3g}")
                if (r, lr) not in {(run["r"], run["lr"]) for run in runs}:
                    progress.total += 1
                    train_and_keep(r, lr, f"widening: lr {lr:g}")
    selected = _select(runs, metric)
    main_r = cell["budgets"][0]
    best = runs[selected[main_r]] if main_r in selected else None
    result = {
        "suite": cell["suite"],
        "kind": cell["kind"],
        "method": cell["method"],
        "task": cell["task"],
        "seed": cell["seed"],
        "status": "done",
        "primary_metric": metric,
        "budget_rule": "LoRA r; AdaLoRA init_r=ceil(1.5r) -> target_r=r; "
        + (
            f"GeoLoRA r -> r_max={cell['hp']['geolora_r_max']}"
            if cell["hp"].get("geolora_r_max")
            else f"GeoLoRA r -> r_max={cell['hp'].get('geolora_r_max_factor', 2):g}r"
        ),
        "lr_grid": cell["lrs"],
        "lr_grid_by_budget": {
            str(r): sorted({float(run["lr"]) for run in runs if run["r"] == r}) for r in cell["budgets"]
        },
        "lr_widen": cell.get("lr_widen", 0),
        "budgets": cell["budgets"],
        "trajectory_lr": cell.get("trajectory_lr"),
        "selected": {str(k): v for k, v in selected.items()},
        "selection": (
            "best validation metric (val split carved from train) among non-diverged grid points; test reported"
            if cell.get("lr_from_seed") is None
            else f"the lr selected on seed {cell['lr_from_seed']}'s validation split (lr_selection: first_seed)"
        ),
        "lr_selected_on_seed": cell["seed"] if cell.get("lr_from_seed") is None else cell["lr_from_seed"],
        "val": best["val"] if best else None,
        "test": best["test"] if best else None,
        "lr": best["lr"] if best else None,
        **(
            {
                k: best[k]
                for k in (
                    "trainable_params_kept",
                    "adapter_params_kept",
                    "head_params",
                    "trainable_params_during_training",
                    "adapter_file_bytes",
                    "train_time_s",
                    "median_step_s",
                    "peak_rss_bytes",
                    "final_ranks",
                )
            }
            if best
            else {}
        ),
        "runs": runs,
        "provenance": {
            **common,
            "task_source": prepared["source"],
            "split_sizes": prepared["sizes"],
            "label_counts": prepared["label_counts"],
            "pretrained_in_benchmark": prepared.get("pretrained_dir"),
            "metric_sources": gdata.metric_sources(prepared["task"].metric_names),
            "settings": {k: cell[k] for k in ("hp", "model", "data")},
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    if is_main:
        _write(path, result)
        partial_path.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smoke", help="configs/bench/<preset>.yaml (smoke, cpu, full)")
    parser.add_argument("--config", help="a benchmark YAML instead of a preset")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="default benchmarks/results")
    parser.add_argument("--data-dir", help="read every task from DIR/<task>/ (local files in the task's format)")
    parser.add_argument("--suites", nargs="*", help="only these suites")
    parser.add_argument("--tasks", nargs="*", help="only these tasks")
    parser.add_argument("--methods", nargs="*", choices=METHODS, help="only these methods")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: the config's, else 2)")
    parser.add_argument("--verbose", action="store_true", help="show the Trainer's own progress bars and logs")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:  # one progress bar, not a model-loading report and deprecation notes per run
        import warnings

        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_preset(args.preset, args.config)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or cfg.get("threads", 2))
    only = {
        "suites": set(args.suites or []),
        "tasks": set(args.tasks or []),
        "methods": set(args.methods or []),
        "seeds": set(args.seeds or []),
    }
    cells = plan_cells(cfg, only)
    data_dir = args.data_dir
    tmp_data = None
    if cfg.get("smoke_data") and data_dir is None:
        tmp_data = tempfile.TemporaryDirectory(prefix="geolora-smoke-data-")
        data_dir = tmp_data.name
        T.write_smoke_fixtures(Path(data_dir))
    results = Path(args.results_dir)
    todo = [c for c in cells if not cell_path(results / c["suite"], c["method"], c["task"], c["seed"]).is_file()]
    if args.dry_run:
        for c in cells:
            state = "todo" if c in todo else "done"
            lrs = c["lrs"] if c["lr_from_seed"] is None else f"selected on seed {c['lr_from_seed']} from {c['lrs']}"
            print(f"{state}  {c['suite']}/{c['method']}--{c['task']}--{c['seed']}  r={c['budgets']} lr={lrs}")
        return 0
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:  # a one-off annotation: a cell it cannot annotate is reported and left as it is, not a reason to stop
        for c in cells:
            if c not in todo:
                try:
                    backfill_label_counts(
                        c, cell_path(results / c["suite"], c["method"], c["task"], c["seed"]), data_dir
                    )
                except ValueError as e:
                    logger.warning("%s", e)
    command = " ".join(["benchmarks/run.py"] + (sys.argv[1:] if argv is None else list(argv)))
    common = {
        "preset": None if args.config else args.preset,  # --config wins over --preset's default
        "config_file": cfg["_path"],
        **harness.provenance(command, repo=REPO),
        "data_dir": args.data_dir,
        "note": cfg.get("note", ""),
    }
    n_runs = sum(
        sum(len(set(c["lrs"]) | set(c["lr_extra"].get(r, []))) for r in c["budgets"])
        if c["lr_from_seed"] is None
        else len(c["budgets"])
        for c in todo
    )
    label = Path(args.config).stem if args.config else args.preset
    progress = tqdm(
        total=n_runs, desc=f"{label}: {len(todo)}/{len(cells)} cells to run", unit="run", disable=not is_main
    )
    try:
        for cell in todo:
            out_dir = results / cell["suite"]
            out_dir.mkdir(parents=True, exist_ok=True)
            run_cell(cell, out_dir, data_dir, common, progress, args.verbose, is_main)
            if T.world_size() > 1:
                from accelerate import PartialState

                PartialState().wait_for_everyone()
    finally:
        progress.close()
        if tmp_data is not None:
            tmp_data.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
