"""geolora's offline `evaluate` module for `accuracy` (see geolora/metrics/__init__.py)."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the references (sklearn.metrics.accuracy_score)."


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        from sklearn.metrics import accuracy_score

        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize,
                                                 sample_weight=sample_weight))}
