"""Reports of a trained GeoLoRA adapter: rank tables, parameter counts, the rank plot and the model card.

Everything here reads plain data (rank dicts, layer shapes, JSON), so ``geolora inspect`` works from the adapter
folder alone, without the base model.  The sizes come from the one formula of :mod:`geolora.app.models`
(:func:`~geolora.app.models.parameter_counts`, re-exported here with :class:`~geolora.app.models.LayerShape`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import yaml

from geolora.io import atomic_write

from .models import LayerShape, parameter_counts

_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def adapter_shapes(adapter_dir: str | Path) -> list[LayerShape]:
    """Per-layer shapes and ranks from ``adapter_model.safetensors`` (GeoLoRA ``U``/``V`` or LoRA ``A``/``B``)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    layers: dict[str, dict] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = re.match(
                r"^(?:base_model\.model\.)?(.+)\.(geolora_U|geolora_V|lora_A|lora_B)(?:\.[^.]+)?\.?(?:weight)?$", key
            )
            if not m:
                continue
            name, kind = m.groups()
            shape = f.get_slice(key).get_shape()
            entry = layers.setdefault(name, {})
            if kind == "geolora_U":
                entry["out"], entry["rank"] = shape[0], shape[1]
            elif kind == "geolora_V":
                entry["in"] = shape[0]
            elif kind == "lora_A":  # (r, in[, kh, kw])
                entry["rank"] = shape[0]
                entry["in"] = math.prod(shape[1:])
            else:  # lora_B: (out, r[, 1, 1])
                entry["out"] = shape[0]
    return [
        LayerShape(name, e["out"], e["in"], e["rank"])
        for name, e in sorted(layers.items(), key=lambda kv: _natural_key(kv[0]))
        if {"out", "in", "rank"} <= set(e)
    ]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def modules_to_save_params(adapter_dir: str | Path) -> int:
    """Parameters of the fully trained modules (``modules_to_save``, e.g. the classifier) in the adapter file."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not re.search(r"\.(geolora_|lora_)", key):
                total += math.prod(f.get_slice(key).get_shape())
    return total


def rank_table(ranks: dict[str, int]) -> str:
    """Ranks as text: a (layer index x module) grid when the names are ``<prefix>.<i>.<module>``, else one per line."""
    if not ranks:
        return "(no adapted layers)"
    parsed = [_LAYER_RE.match(n) for n in ranks]
    if all(parsed) and len({m.group(1) for m in parsed}) == 1:
        columns: list[str] = []
        rows: dict[int, dict[str, int]] = {}
        for m, r in zip(parsed, ranks.values()):
            _, idx, suffix = m.groups()
            if suffix not in columns:
                columns.append(suffix)
            rows.setdefault(int(idx), {})[suffix] = r
        header = f"{'layer':>5}  " + "  ".join(f"{c:>{len(c)}}" for c in columns)
        lines = [f"{'':>5}  ({parsed[0].group(1)}.<i>.*)", header]
        for idx in sorted(rows):
            lines.append(f"{idx:>5}  " + "  ".join(f"{str(rows[idx].get(c, '-')):>{len(c)}}" for c in columns))
        return "\n".join(lines)
    width = max(len(n) for n in ranks)
    return "\n".join(f"{n:<{width}}  {r}" for n, r in ranks.items())


PLOT_HINT = "matplotlib is not installed, so no rank plot (ranks.png) is written: pip install matplotlib"


def can_plot() -> bool:
    """True if matplotlib (needed by :func:`plot_ranks`, and only by it) can be imported."""
    try:
        import matplotlib  # noqa: F401
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        return False
    return True


def plot_ranks(
    ranks: dict[str, int],
    path: str | Path,
    initial_rank: Optional[int] = None,
    r_max: Optional[int] = None,
    title: str = "GeoLoRA ranks per layer",
) -> Path:
    """Bar chart of the final rank of every adapted layer (PNG, matplotlib's Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.0))
    try:
        ax.bar(range(len(names)), [ranks[n] for n in names], color="tab:blue")
        if initial_rank:
            ax.axhline(initial_rank, color="tab:gray", ls="--", lw=1, label=f"initial r = {initial_rank}")
        if r_max:
            ax.axhline(r_max, color="tab:red", ls=":", lw=1, label=f"r_max = {r_max}")
        short = [n.split("layer.")[-1] if "layer." in n else n for n in names]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(short, rotation=90, fontsize=6)
        ax.set_ylabel("rank")
        ax.set_title(title)
        if initial_rank or r_max:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def render_model_card(
    *,
    base_model: str,
    geolora_config: dict,
    ranks: dict[str, int],
    metrics: dict[str, float],
    sizes: dict[str, int],
    task: str = "",
    dataset: str = "",
    pipeline_tag: Optional[str] = None,
    command: str = "",
    num_labels: Optional[int] = None,
    plot: bool = True,
) -> str:
    """README.md of an adapter folder: Hub YAML metadata, the GeoLoRA config, the final ranks, metrics, how to load.

    ``plot``: the folder has the rank plot ``ranks.png`` (False: the card does not link it).
    """
    meta = {
        "library_name": "peft",
        "base_model": base_model,
        "tags": ["geolora", "peft"],
    }
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    if metrics and task:
        meta["model-index"] = [
            {
                "name": f"geolora-{task}",
                "results": [
                    {
                        "task": {"type": pipeline_tag or "classification"},
                        "dataset": {"name": dataset or task, "type": task},
                        "metrics": [{"type": k, "value": round(float(v), 4)} for k, v in metrics.items()],
                    }
                ],
            }
        ]
    auto = (
        "AutoModelForImageClassification"
        if pipeline_tag == "image-classification"
        else ("AutoModelForSequenceClassification")
    )
    shown_config = {k: v for k, v in geolora_config.items() if k not in ("rank_pattern",)}
    metric_lines = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in metrics.items()) or "| (none) | |"
    ratio = sizes["geolora_params"] / max(1, sizes["lora_initial_rank_params"])
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# GeoLoRA adapter for `{base_model}`{f" on {task}" if task else ""}

A [GeoLoRA](https://openreview.net/forum?id=bsFWJ0Kget) adapter (Schotthöfer et al., "GeoLoRA: Geometric
integration for parameter efficient fine-tuning", ICLR 2025): every adapted weight is `W0 + s * U S V^T`, and each
layer found its own rank during training.

## Results

| metric | value |
|---|---|
{metric_lines}

Data: {dataset or task or "(not recorded)"}.

## Adapter size

{sizes["num_layers"]} adapted layers, total rank {sizes["total_rank"]}: {sizes["geolora_params"]:,} GeoLoRA parameters
(U, S, V) against {sizes["lora_initial_rank_params"]:,} for a LoRA at the initial rank {geolora_config.get("r")}
({ratio:.2f}x). Exported as a plain LoRA: {sizes["exported_lora_params"]:,} parameters.

## Final rank per layer

```
{rank_table(ranks)}
```
{chr(10) + "![ranks per layer](ranks.png)" + chr(10) if plot else ""}
## How to load

With geolora installed (`import geolora` registers the method with PEFT):

```python
import geolora  # noqa: F401  (registers GeoLoRA with PEFT)
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained("{base_model}", num_labels={num_labels or "N"})
model = PeftModel.from_pretrained(base, "path/or/hub-id-of-this-adapter")
```

Without geolora: export it once as a standard LoRA (`geolora export-lora <this folder> <out>`) and load that with
stock PEFT.

## GeoLoRA configuration

```json
{json.dumps(shown_config, indent=2, sort_keys=True, default=str)}
```
{f"{chr(10)}## Command{chr(10)}{chr(10)}```{chr(10)}{command}{chr(10)}```{chr(10)}" if command else ""}"""


__all__ = [
    "LayerShape",
    "adapter_shapes",
    "modules_to_save_params",
    "parameter_counts",
    "rank_table",
    "plot_ranks",
    "can_plot",
    "render_model_card",
]
