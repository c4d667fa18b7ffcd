"""The task metrics: one ``evaluate.Metric`` computed with scikit-learn / scipy.

:class:`TaskMetric` is an ``evaluate`` module with one configuration per metric (``accuracy``, ``f1``,
``matthews_correlation``, ``pearson``, ``spearmanr``).  Its input features are the ones of the Hub's metric scripts
(``int32`` for the classification metrics, ``float32`` for the correlations), so ``evaluate`` applies the same casts
and the numbers are those of the Hub's scripts, which call the same scikit-learn / scipy functions.  Nothing is
fetched from the Hub and there is no second path.

    metric = load_metric("f1")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1], average="binary")   # {"f1": 0.8}

scikit-learn and scipy are imported when a metric is computed, so :func:`missing_metric_packages` can name a missing
one before any training.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import datasets
import evaluate

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearmanr")
METRIC_NAMES = CLASSIFICATION_METRICS + REGRESSION_METRICS
# where every metric is computed (what metric_sources() reports)
SOURCE = "geolora.app.metrics"
# the module each metric is computed with, and its pip name
METRIC_PACKAGES: dict[str, tuple[str, str]] = {
    "accuracy": ("sklearn.metrics", "scikit-learn"),
    "f1": ("sklearn.metrics", "scikit-learn"),
    "matthews_correlation": ("sklearn.metrics", "scikit-learn"),
    "pearson": ("scipy.stats", "scipy"),
    "spearmanr": ("scipy.stats", "scipy"),
}
_DESCRIPTIONS = {
    "accuracy": "Fraction of predictions equal to the references (sklearn.metrics.accuracy_score).",
    "f1": "F1 score (sklearn.metrics.f1_score); average='binary' by default, 'macro' for several classes.",
    "matthews_correlation": "Matthews correlation coefficient (sklearn.metrics.matthews_corrcoef).",
    "pearson": "Pearson correlation coefficient (scipy.stats.pearsonr).",
    "spearmanr": "Spearman rank correlation coefficient (scipy.stats.spearmanr).",
}


def _check_name(name: str) -> None:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric '{name}'; choose one of: {', '.join(METRIC_NAMES)}")


class TaskMetric(evaluate.Metric):
    """One of the task metrics, chosen by ``config_name`` (one of :data:`METRIC_NAMES`).

    ``compute(predictions=..., references=...)`` returns ``{config_name: float}``; ``f1`` also takes
    ``average`` (``"binary"``, ``"macro"``, ...).  Inputs are cast to ``int32`` (classification) or ``float32``
    (regression) by the input features, as the Hub's scripts do.
    """

    def _info(self) -> evaluate.MetricInfo:
        _check_name(self.config_name)
        dtype = "float32" if self.config_name in REGRESSION_METRICS else "int32"
        return evaluate.MetricInfo(
            description=_DESCRIPTIONS[self.config_name],
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references, average: str = "binary") -> dict[str, float]:
        name = self.config_name
        if name == "accuracy":
            from sklearn.metrics import accuracy_score

            value = accuracy_score(references, predictions)
        elif name == "f1":
            from sklearn.metrics import f1_score

            value = f1_score(references, predictions, average=average)
        elif name == "matthews_correlation":
            from sklearn.metrics import matthews_corrcoef

            value = matthews_corrcoef(references, predictions)
        elif name == "pearson":
            from scipy.stats import pearsonr

            value = pearsonr(references, predictions)[0]
        else:
            from scipy.stats import spearmanr

            value = spearmanr(references, predictions)[0]
        return {name: float(value)}


def load_metric(name: str) -> TaskMetric:
    """A :class:`TaskMetric` for ``name`` (one of :data:`METRIC_NAMES`), kept in memory (no cache files).

    Raises:
        ValueError: ``name`` is not a known metric.
    """
    _check_name(name)
    return TaskMetric(config_name=name, keep_in_memory=True)


def metric_sources(metric_names: Sequence[str]) -> dict[str, str]:
    """Where each metric is computed: always :data:`SOURCE` (``"geolora.app.metrics"``); kept for provenance."""
    for name in metric_names:
        _check_name(name)
    return {name: SOURCE for name in metric_names}


def _importable(module: str) -> bool:
    parts = module.split(".")
    try:
        for i in range(1, len(parts) + 1):  # the package too: a cached submodule alone does not make it importable
            importlib.import_module(".".join(parts[:i]))
    except ImportError:
        return False
    return True


def missing_metric_packages(metric_names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The packages that computing ``metric_names`` needs and that cannot be imported, as ``(pip name, [metrics])``
    in first-use order (empty when all are there), so a caller can stop before training instead of after it.

    Args:
        metric_names (`Sequence[str]`): Metric names as in :attr:`geolora.app.data.TaskData.metric_names`.
    """
    missing: dict[str, list[str]] = {}
    for name in metric_names:
        _check_name(name)
        module, pip_name = METRIC_PACKAGES[name]
        if pip_name in missing or not _importable(module):
            missing.setdefault(pip_name, []).append(name)
    return list(missing.items())


__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "METRIC_NAMES",
    "METRIC_PACKAGES",
    "SOURCE",
    "TaskMetric",
    "load_metric",
    "metric_sources",
    "missing_metric_packages",
]
