"""``evaluate`` metric modules of geolora's own, loaded by path with ``evaluate.load`` when the Hub's metric scripts
cannot be fetched (offline). They take the same inputs as the Hub's ``accuracy``, ``f1``, ``matthews_correlation``,
``pearsonr`` and ``spearmanr`` (the same feature types, so the same int32 / float32 casts) and compute with the same
scikit-learn / scipy functions, so the numbers are the same. ``module_path(name)`` gives the file to load."""

from __future__ import annotations

from pathlib import Path

NAMES = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")


def module_path(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"no offline evaluate module for metric '{name}' (have: {', '.join(NAMES)})")
    return str(Path(__file__).with_name(f"{name}.py"))
