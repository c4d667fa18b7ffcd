"""geolora's offline `evaluate` module for `spearmanr` (see geolora/metrics/__init__.py)."""

import datasets
import evaluate

_DESCRIPTION = "Spearman rank correlation coefficient (scipy.stats.spearmanr)."


class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        from scipy.stats import spearmanr

        result = spearmanr(references, predictions)
        if return_pvalue:
            return {"spearmanr": float(result[0]), "spearmanr_pvalue": float(result[1])}
        return {"spearmanr": float(result[0])}
