"""geolora.app: the application built on the GeoLoRA PEFT method.

The ``geolora`` command line (:mod:`geolora.app.cli`), the task loaders (:mod:`geolora.app.data`), the metrics
(:mod:`geolora.app.metrics`), the one training harness (:mod:`geolora.app.harness`) and the model card
(:mod:`geolora.app.modelcard`).  It uses only the public API of :mod:`geolora`; the library never imports it.
Its dependencies are optional: ``pip install 'geolora[cli]'``.
"""

from __future__ import annotations

import importlib.util

# import name -> pip name of every package the application needs beyond the library's own dependencies (all in the
# `cli` extra; matplotlib too, but without it `geolora train` only skips the rank plot, with a warning up front)
REQUIREMENTS = {
    "datasets": "datasets",
    "evaluate": "evaluate",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "pandas": "pandas",
}


def missing_requirements() -> list[str]:
    """The pip names of the application's dependencies that are not installed."""
    return [pip for module, pip in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def check_requirements() -> None:
    """Raise ``ImportError`` naming the missing packages and the install command when the extra is incomplete."""
    missing = missing_requirements()
    if missing:
        raise ImportError(
            f"the geolora command line needs {', '.join(missing)}, which are not installed. "
            "Install the application's dependencies with: pip install 'geolora[cli]'"
        )


check_requirements()
