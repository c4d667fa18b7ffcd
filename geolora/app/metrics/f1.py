"""geolora's offline `evaluate` module for `f1` (see geolora/metrics/__init__.py)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 score (sklearn.metrics.f1_score); average='binary' by default, 'macro' for several classes."


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        from sklearn.metrics import f1_score

        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight)
        return {"f1": float(score) if np.ndim(score) == 0 else score}
