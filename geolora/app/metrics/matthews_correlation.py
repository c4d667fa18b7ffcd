"""geolora's offline `evaluate` module for `matthews_correlation` (see geolora/metrics/__init__.py)."""

import datasets
import evaluate

_DESCRIPTION = "Matthews correlation coefficient (sklearn.metrics.matthews_corrcoef)."


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        from sklearn.metrics import matthews_corrcoef

        return {"matthews_correlation": float(matthews_corrcoef(references, predictions,
                                                                sample_weight=sample_weight))}
