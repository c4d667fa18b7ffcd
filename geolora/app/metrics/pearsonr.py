"""geolora's offline `evaluate` module for `pearsonr` (see geolora/metrics/__init__.py)."""

import datasets
import evaluate

_DESCRIPTION = "Pearson correlation coefficient (scipy.stats.pearsonr)."


class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: one value per example",
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        from scipy.stats import pearsonr

        result = pearsonr(references, predictions)
        if return_pvalue:
            return {"pearsonr": float(result[0]), "p-value": float(result[1])}
        return {"pearsonr": float(result[0])}
