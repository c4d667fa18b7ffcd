"""The one training harness: build the ``transformers.Trainer`` of a PEFT model, train, evaluate, record provenance.

    from geolora.app.harness import train_and_evaluate

    result = train_and_evaluate(
        peft_model, TrainingArguments("runs/x", max_steps=100), train_ds, {"eval": eval_ds},
        method="geolora", metric_names=["accuracy", "f1"], num_labels=2, data_collator=collator,
    )
    result.metrics        # {"accuracy": ..., "f1": ...} of the first evaluation set
    result.ranks          # live rank of every adapted layer
    result.write("runs/x/results.json")   # atomically, with provenance()

The command line (``geolora train`` / ``geolora eval``), the benchmark runner (``benchmarks/run.py``) and the studies
(``scripts/``) all train through :func:`train_and_evaluate` (or :func:`build_trainer` + :func:`evaluate`), so every
method sees the same Trainer, the same evaluation (predictions from
:func:`geolora.app.data.predictions_from_logits`, metrics from :func:`geolora.app.data.compute_metrics`) and the
same provenance record (:func:`provenance`).  Methods:

* ``"geolora"``: :class:`geolora.GeoLoRACallback` (augmentation and truncation on every optimizer step);
* ``"adalora"``: :class:`AdaLoRACallback` (PEFT's ``update_and_allocate`` on every optimizer step);
* ``"lora"`` (or ``None``: evaluation only): no callback.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from transformers import TrainerCallback

from geolora.io import atomic_write_json

METHODS = ("geolora", "lora", "adalora")
# the packages whose versions provenance() records (plus Python's)
PROVENANCE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "geolora", "numpy")


# ----------------------------------------------------------------------------------------------- callbacks
class AdaLoRACallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate(global_step)`` once per optimizer step.

    After ``optimizer.step()`` (gradients and the update are available for the sensitivity scores) and before
    ``zero_grad()`` (PEFT's documented contract).  ``state.global_step`` is still the 0-based index of the step being
    taken, as in PEFT's example loop.  The adapter config's ``total_step`` must be the run's optimizer steps.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def method_callbacks(method: Optional[str]) -> list[TrainerCallback]:
    """The callbacks a method needs on a stock Trainer: ``[GeoLoRACallback()]``, ``[AdaLoRACallback()]`` or ``[]``.

    Raises:
        ValueError: ``method`` is not one of :data:`METHODS` or ``None``.
    """
    if method == "geolora":
        from geolora import GeoLoRACallback

        return [GeoLoRACallback()]
    if method == "adalora":
        return [AdaLoRACallback()]
    if method in ("lora", None):
        return []
    raise ValueError(f"method={method!r} is not one of {list(METHODS)} (or None for evaluation only)")


# ----------------------------------------------------------------------------------------------- metrics
class TaskMetrics:
    """``compute_metrics`` of a Trainer for a task: predictions from the logits, then the task's metrics.

    Non-finite logits (a diverged run) give NaN for every metric instead of metrics of garbage predictions; the flag
    and the predictions of the latest call are kept (:attr:`finite`, :attr:`predictions`) for :func:`evaluate`.

    Args:
        metric_names: the task's metrics, as :func:`geolora.app.data.compute_metrics` names them.
        is_regression: one output per example (squeezed) instead of class logits (argmax).
        num_labels: number of classes (``f1`` is binary for two, macro-averaged otherwise).
    """

    def __init__(self, metric_names: Sequence[str], is_regression: bool = False, num_labels: int = 2) -> None:
        self.metric_names = list(metric_names)
        self.is_regression = bool(is_regression)
        self.num_labels = int(num_labels)
        self.finite = True
        self.predictions: Optional[np.ndarray] = None

    def __call__(self, eval_pred) -> dict[str, float]:
        from .data import compute_metrics, predictions_from_logits

        logits = eval_pred.predictions
        if isinstance(logits, tuple):  # (logits, hidden states, ...)
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float64)
        self.finite = bool(np.all(np.isfinite(logits)))
        if not self.finite:
            self.predictions = None
            return {name: float("nan") for name in self.metric_names}
        self.predictions = predictions_from_logits(logits, self.is_regression)
        return compute_metrics(self.metric_names, self.predictions, eval_pred.label_ids, self.num_labels)


@dataclass
class Evaluation:
    """One evaluation set's results.

    Attributes:
        name: the set's name, also the prefix of the Trainer's keys (``eval`` -> ``eval_loss``, ``eval_accuracy``).
        metrics: the task's metrics (NaN when the logits were not finite).
        loss: the evaluation loss (``None`` when the model returned none).
        diverged: the logits were not finite.
        trainer_metrics: ``Trainer.evaluate``'s own dict (prefixed metrics, loss, runtime, epoch, ...).
        predictions: the predicted labels (or values), ``None`` when diverged; not written by ``to_dict``.
    """

    name: str
    metrics: dict[str, float]
    loss: Optional[float]
    diverged: bool
    trainer_metrics: dict[str, Any]
    predictions: Optional[np.ndarray] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "loss": self.loss, "diverged": self.diverged}


def evaluate(trainer, dataset=None, name: str = "eval") -> Evaluation:
    """Evaluate ``trainer`` on ``dataset`` (default: its ``eval_dataset``) with its :class:`TaskMetrics`.

    Runs ``Trainer.evaluate(metric_key_prefix=name)``, so callbacks and loggers see the evaluation as usual.

    Raises:
        TypeError: the Trainer's ``compute_metrics`` is not a :class:`TaskMetrics` (build it with
            :func:`build_trainer` and ``compute_metrics=TaskMetrics(...)``).
    """
    task = trainer.compute_metrics
    if not isinstance(task, TaskMetrics):
        raise TypeError(
            f"evaluate: trainer.compute_metrics is {type(task).__name__}, expected a geolora.app.harness.TaskMetrics"
        )
    task.finite, task.predictions = True, None
    raw = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=name)
    prefix = f"{name}_"
    metrics = {k[len(prefix) :]: v for k, v in raw.items() if k[len(prefix) :] in task.metric_names}
    loss = raw.get(f"{name}_loss")
    return Evaluation(
        name=name,
        metrics={n: float(metrics[n]) for n in task.metric_names if n in metrics},
        loss=None if loss is None else float(loss),
        diverged=not task.finite,
        trainer_metrics=dict(raw),
        predictions=task.predictions,
    )


# ----------------------------------------------------------------------------------------------- trainer
def build_trainer(
    model,
    args,
    method: Optional[str] = "geolora",
    *,
    train_dataset=None,
    eval_dataset=None,
    data_collator=None,
    processing_class=None,
    compute_metrics=None,
    callbacks: Sequence[TrainerCallback] = (),
    console_log: bool = True,
):
    """The stock ``transformers.Trainer`` for a PEFT ``model`` trained with ``method``.

    Args:
        model: a PEFT model (``peft.get_peft_model``) with the method's adapter.
        args: ``transformers.TrainingArguments``.
        method: ``"geolora"``, ``"lora"``, ``"adalora"``, or ``None`` (no training callback: evaluation only).
        callbacks: further callbacks, placed before the method's own.
        console_log: keep the Trainer's ``PrinterCallback`` (the log dicts printed when ``disable_tqdm`` is set);
            ``False`` removes it.
        train_dataset, eval_dataset, data_collator, processing_class, compute_metrics: as for the Trainer.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
        compute_metrics=compute_metrics,
        callbacks=[*callbacks, *method_callbacks(method)],
    )
    if not console_log:
        trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """What :func:`train_and_evaluate` returns.

    Attributes:
        method: ``"geolora"``, ``"lora"`` or ``"adalora"``.
        evaluations: name -> :class:`Evaluation`, in the order given.
        train_metrics: ``Trainer.train``'s metrics (``train_loss``, ``train_runtime``, ...).
        train_seconds: wall time of ``Trainer.train``.
        ranks: live rank of every adapted layer (:func:`geolora.app.models.layer_ranks`).
        losses: ``(step, loss)`` of every logged training loss.
        provenance: :func:`provenance` of the run.
        trainer: the Trainer (for saving or further evaluation); not written.
    """

    method: str
    evaluations: dict[str, Evaluation]
    train_metrics: dict[str, Any]
    train_seconds: float
    ranks: dict[str, int]
    losses: list[tuple[int, float]]
    provenance: dict[str, Any]
    trainer: Any = field(default=None, repr=False, compare=False)

    @property
    def evaluation(self) -> Optional[Evaluation]:
        """The first evaluation set's results (``None`` without evaluation sets)."""
        return next(iter(self.evaluations.values()), None)

    @property
    def metrics(self) -> dict[str, float]:
        """The task's metrics on the first evaluation set (``{}`` without one)."""
        return dict(self.evaluation.metrics) if self.evaluation else {}

    @property
    def diverged(self) -> bool:
        """Non-finite logits on an evaluation set or a non-finite logged training loss."""
        return any(e.diverged for e in self.evaluations.values()) or any(not math.isfinite(v) for _, v in self.losses)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record of the run (everything but the Trainer and the predictions)."""
        first = self.evaluation
        return {
            "method": self.method,
            "metrics": self.metrics,
            "eval": dict(first.trainer_metrics) if first else {},
            "evaluations": {name: e.to_dict() for name, e in self.evaluations.items()},
            "train": dict(self.train_metrics),
            "train_wall_seconds": round(self.train_seconds, 2),
            "ranks": dict(self.ranks),
            "train_loss": [list(x) for x in self.losses],
            "diverged": self.diverged,
            "provenance": self.provenance,
        }

    def write(self, path: str | os.PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write :meth:`to_dict` (plus ``extra``'s keys) to ``path`` as JSON, atomically (:func:`write_results`)."""
        return write_results(path, {**self.to_dict(), **(extra or {})})


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o, key=str) if isinstance(o, (set, frozenset)) else list(o)
    return str(o)


def write_results(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a failure leaves the previous file); numpy scalars and arrays
    become numbers and lists, sets sorted lists, anything else its ``str``.  Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=indent, default=_json_default)
    return path


def train_and_evaluate(
    model,
    args,
    train_dataset,
    eval_datasets=None,
    *,
    method: str = "geolora",
    metric_names: Sequence[str] = ("accuracy",),
    is_regression: bool = False,
    num_labels: int = 2,
    data_collator=None,
    processing_class=None,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: Optional[str] = None,
    console_log: bool = True,
    command: Optional[str] = None,
    repo: Optional[str | os.PathLike] = None,
) -> RunResult:
    """Train ``model`` with ``method`` on a stock Trainer, evaluate it on every evaluation set, record provenance.

    Args:
        model: a PEFT model carrying the method's adapter.
        args: ``transformers.TrainingArguments`` (its ``seed`` is the Trainer's; call ``transformers.set_seed``
            before building the model for a reproducible initialisation).
        train_dataset: the training set.
        eval_datasets: name -> dataset (evaluated in this order; the first is also the Trainer's ``eval_dataset``,
            used by ``eval_strategy``), a single dataset (named ``eval``), or ``None``.
        method: ``"geolora"``, ``"lora"`` or ``"adalora"`` (see :func:`build_trainer`).
        metric_names, is_regression, num_labels: the task's metrics (see :class:`TaskMetrics`).
        callbacks: further Trainer callbacks (before the method's own).
        resume_from_checkpoint: a ``checkpoint-*`` folder to resume from.
        console_log: see :func:`build_trainer`.
        command, repo: passed to :func:`provenance`.
    """
    if method not in METHODS:
        raise ValueError(f"train_and_evaluate: method={method!r} is not one of {list(METHODS)}")
    if eval_datasets is None:
        eval_datasets = {}
    elif not isinstance(eval_datasets, Mapping):
        eval_datasets = {"eval": eval_datasets}
    task = TaskMetrics(metric_names, is_regression, num_labels)
    trainer = build_trainer(
        model,
        args,
        method,
        train_dataset=train_dataset,
        eval_dataset=next(iter(eval_datasets.values()), None),
        data_collator=data_collator,
        processing_class=processing_class,
        compute_metrics=task,
        callbacks=callbacks,
        console_log=console_log,
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    train_seconds = time.perf_counter() - start
    evaluations = {name: evaluate(trainer, ds, name) for name, ds in eval_datasets.items()}
    from .models import layer_ranks

    losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    return RunResult(
        method=method,
        evaluations=evaluations,
        train_metrics=dict(train_output.metrics),
        train_seconds=train_seconds,
        ranks=layer_ranks(model, method),
        losses=losses,
        provenance=provenance(command, repo=repo),
        trainer=trainer,
    )


# ----------------------------------------------------------------------------------------------- provenance
def _git(repo: Path, *cmd: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout


def git_state(repo: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """``{"revision", "dirty", "dirty_paths"}`` of the git checkout ``repo`` (tracked files only).

    ``repo`` defaults to the checkout geolora runs from (an editable install); everything is ``None`` when that is
    not the top of a git work tree (an installed package), so an enclosing repository is never reported.
    """
    none = {"revision": None, "dirty": None, "dirty_paths": None}
    if repo is None:
        import geolora

        repo = Path(geolora.__file__).resolve().parent.parent
    repo = Path(repo).resolve()
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != repo:
        return none
    rev = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if rev is None or status is None:
        return none
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {"revision": rev.strip(), "dirty": bool(paths), "dirty_paths": paths}


def package_versions(packages: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    """Python's version and each package's installed version (``"not installed"`` when absent)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def hardware() -> dict[str, Any]:
    """Platform, CPU model and counts, torch threads, the launcher's world size and the CUDA devices."""
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if hasattr(os, "sched_getaffinity"):
        hw["cpu_affinity"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        hw["cuda_device"] = torch.cuda.get_device_name(0)
        hw["cuda_count"] = torch.cuda.device_count()
    return hw


def provenance(
    command: Optional[str] = None,
    *,
    repo: Optional[str | os.PathLike] = None,
    packages: Sequence[str] = PROVENANCE_PACKAGES,
) -> dict[str, Any]:
    """Where a result comes from: ``{"command", "git", "versions", "hardware"}``.

    Args:
        command: the command line that produced the result (default: ``sys.argv`` joined).
        repo: the git checkout whose revision is recorded (see :func:`git_state`).
        packages: the packages whose versions are recorded (see :func:`package_versions`).
    """
    return {
        "command": command if command is not None else " ".join(sys.argv),
        "git": git_state(repo),
        "versions": package_versions(packages),
        "hardware": hardware(),
    }


__all__ = [
    "METHODS",
    "PROVENANCE_PACKAGES",
    "AdaLoRACallback",
    "Evaluation",
    "RunResult",
    "TaskMetrics",
    "build_trainer",
    "evaluate",
    "git_state",
    "hardware",
    "method_callbacks",
    "package_versions",
    "provenance",
    "train_and_evaluate",
    "write_results",
]
