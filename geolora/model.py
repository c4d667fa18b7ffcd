"""GeoLoRAModel(BaseTuner): injection, save/load with per-layer ranks, rank queries."""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from .bnb import dispatch_bnb
from .config import GeoLoRAConfig
from .layer import TRAIN_WITH_GEOLORA, GeoLoRALayer, dispatch_layer

logger = logging.getLogger(__name__)

_FACTOR_NAMES = ("geolora_U", "geolora_S", "geolora_V")
_PEFT_PREFIX = "base_model.model."


def iter_geolora_layers(model: nn.Module) -> Iterator[tuple[str, GeoLoRALayer]]:
    """All GeoLoRA layers of ``model`` (found by type), with module names relative to the base model."""
    for name, module in model.named_modules():
        if isinstance(module, GeoLoRALayer):
            yield strip_prefixes(name), module


def strip_prefixes(name: str) -> str:
    """``name`` without the wrapper prefixes of DDP (``module.``), ``torch.compile`` (``_orig_mod.``) and
    ``PeftModel`` (``base_model.model.``): the layer name as ``rank_pattern`` and the error messages give it."""
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


def _split_factor_key(key: str, adapter_name: str | None) -> tuple[str, str] | None:
    """``'a.b.geolora_U.default'`` -> (``'a.b'``, ``'geolora_U'``); None if the key is not a factor."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _FACTOR_NAMES or part == "geolora_rank":
            return ".".join(parts[:i]), part
    return None


class GeoLoRAModel(BaseTuner):
    """GeoLoRA model (Schotthöfer et al., ICLR 2025): ``W0 + s * U S V^T`` on every targeted layer.

    Created by ``peft.get_peft_model(model, GeoLoRAConfig(...))`` once ``geolora`` is imported.  Layers are created
    at their configured rank (or at ``rank_pattern``'s rank when loading a saved adapter), so adapters load through
    PEFT and through transformers' own loader.  Training grows them once to ``r_max`` capacity (zero-padded); saving
    slices each layer back to its live rank and records the ranks in ``rank_pattern``.
    """

    prefix: str = "geolora_"
    tuner_layer_cls = GeoLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: GeoLoRAConfig) -> None:
        super()._check_new_adapter_config(config)
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            logger.info(
                "GeoLoRA: several adapters are not in inference mode (%s); only the active one is trained by the "
                "GeoLoRA step.",
                trainable,
            )

    def _check_merge_allowed(self) -> None:
        """PEFT's checks, then every GeoLoRA layer's ``check_mergeable`` (a quantized base that cannot take the
        update): raises before any layer is merged (``merge_adapter`` and ``merge_and_unload`` call this first)."""
        super()._check_merge_allowed()
        names = list(self.active_adapters)
        with torch.no_grad():
            for module_name, module in self.model.named_modules():
                if isinstance(module, GeoLoRALayer):
                    module.check_mergeable([n for n in names if n not in module.merged_adapters], module_name)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        r = config.rank_pattern.get(r_key, config.r)
        if isinstance(target, GeoLoRALayer):
            target.update_layer(adapter_name, r, config=config)
            return
        new_module = dispatch_bnb(target, adapter_name, config, r) or dispatch_layer(
            target, adapter_name, config, r, current_key
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``: ``True`` keeps the factors in float32 on a half-precision base (they are
        created so); ``False`` stores them in the base layer's dtype, as LoRA does.

        Args:
            adapter_name (`str`): The adapter name.
            autocast_adapter_dtype (`bool`): Whether to keep float32 factors on a float16/bfloat16 base.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for _, layer in iter_geolora_layers(self.model):
            if adapter_name in layer.geolora_U:
                layer.cast_factors_to_base_dtype(adapter_name)

    # ------------------------------------------------------------------ save / load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Slice every layer to its live rank, check the factors and write the ranks into ``config.rank_pattern``.

        PeftModel.save_pretrained builds the state dict (``get_peft_model_state_dict``) before it writes the weights
        and adapter_config.json (``peft_config.save_pretrained``), so the ranks recorded here end up in the JSON, and
        factors that GeoLoRA's step cannot have written (:func:`check_factors_before_save`) raise before either file
        is written (only PEFT's model card, README.md, is written earlier).
        """
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        ranks = {}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        by_module = {}
        for name, module in model.named_modules():
            if isinstance(module, GeoLoRALayer) and adapter_name in module.geolora_U:
                by_module[name] = module
        for key in list(to_return):
            split = _split_factor_key(key, adapter_name)
            if split is None:
                continue
            module_name, kind = split
            module = by_module.get(module_name)
            if module is None:
                continue
            k = module.r[adapter_name]
            tensor = to_return[key]
            if kind == "geolora_S":
                to_return[key] = tensor[:k, :k].contiguous()
            elif kind in ("geolora_U", "geolora_V"):
                to_return[key] = tensor[:, :k].contiguous()
            elif kind == "geolora_rank":
                to_return[key] = torch.tensor(k, dtype=torch.long)
            if kind in _FACTOR_NAMES:
                factors.setdefault(strip_prefixes(module_name), {})[kind] = to_return[key]
            ranks[strip_prefixes(module_name)] = k
        check_factors_before_save(factors, adapter_name)
        config.rank_pattern = dict(sorted(ranks.items()))
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Fit compact saved factors into the model's layers: zero-pad into grown capacity, or re-create a layer's
        factors at the saved rank.  Shapes that cannot fit (different base layer) raise an error naming the layer."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        modules = {}
        for name, module in model.named_modules():
            if isinstance(module, GeoLoRALayer) and adapter_name in module.geolora_U:
                modules[name] = module
        saved_rank: dict[str, int] = {}
        for key, tensor in remapped.items():
            split = _split_factor_key(key, adapter_name)
            if split is None or split[1] != "geolora_S":
                continue
            if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
                raise ValueError(f"GeoLoRA: '{key}' has shape {tuple(tensor.shape)}, expected a square (r, r) matrix")
            saved_rank[split[0]] = tensor.shape[0]
        for module_name, k in saved_rank.items():
            module = modules.get(module_name)
            if module is None:
                continue
            _check_saved_shapes(module, module_name, adapter_name, remapped, k)
            cap = module.capacity(adapter_name)
            if cap < k:
                _recreate_factors(module, adapter_name, k)
                cap = k
            if cap > k:
                for kind in _FACTOR_NAMES:
                    key = f"{module_name}.{kind}.{adapter_name}"
                    t = remapped[key]
                    padded = t.new_zeros(cap, cap) if kind == "geolora_S" else t.new_zeros(t.shape[0], cap)
                    if kind == "geolora_S":
                        padded[:k, :k] = t
                    else:
                        padded[:, :k] = t
                    remapped[key] = padded
            rank_key = f"{module_name}.geolora_rank.{adapter_name}"
            remapped[rank_key] = torch.tensor(k, dtype=torch.long)
            module.r[adapter_name] = k
        return remapped

    # ------------------------------------------------------------------ ranks
    def get_ranks(self, adapter_name: str | None = None) -> dict[str, int]:
        """The current rank of every layer of ``adapter_name`` (default: the active adapter), by module name; also
        reachable as ``peft_model.get_ranks()``."""
        if adapter_name is None:
            active = self.active_adapters
            if len(active) != 1:
                raise ValueError(f"get_ranks: {len(active)} adapters are active ({active}); pass adapter_name=...")
            adapter_name = active[0]
        return get_ranks(self.model, adapter_name)


def _check_saved_shapes(module: GeoLoRALayer, module_name: str, adapter_name: str, sd: dict, k: int) -> None:
    expected = {"geolora_U": (module.out_features, k), "geolora_V": (module.in_features, k), "geolora_S": (k, k)}
    for kind, shape in expected.items():
        key = f"{module_name}.{kind}.{adapter_name}"
        if key not in sd:
            raise ValueError(
                f"GeoLoRA: the adapter checkpoint has no '{kind}' for layer '{strip_prefixes(module_name)}'"
            )
        if tuple(sd[key].shape) != shape:
            raise ValueError(
                f"GeoLoRA: layer '{strip_prefixes(module_name)}' has {kind} of shape {tuple(sd[key].shape)} in the "
                f"checkpoint but the model expects {shape} (out={module.out_features}, in={module.in_features}, "
                f"rank={k}); was the adapter trained on a different base model?"
            )


# Saved bases are orthonormal to ~1e-6 (fp32) or ~1e-2 (bf16 factors); anything far off is not a GeoLoRA basis.
_SAVED_ORTHONORMALITY_TOL = 0.05


def check_saved_adapter(weights: dict, filename: str, rank_pattern: dict) -> None:
    """Check the tensors of a saved GeoLoRA adapter before they are loaded, with errors naming file and layer.

    Every layer must have ``geolora_U`` (out, k), ``geolora_S`` (k, k) and ``geolora_V`` (in, k) with one rank k,
    equal to its ``geolora_rank`` buffer and to ``rank_pattern`` (adapter_config.json) when that names the layer;
    values must be finite and the bases orthonormal (to 0.05).  A file that fails was truncated, corrupted, edited,
    or saved together with the config of another save (a save interrupted between the two files).

    Args:
        weights: the saved state dict (keys ``base_model.model.<layer>.geolora_U`` ...).
        filename: the weights file, for the messages.
        rank_pattern: ``rank_pattern`` of the adapter_config.json saved next to it.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        split = _split_factor_key(key, None)
        if split is not None:
            layers.setdefault(split[0], {})[split[1]] = tensor
    for module_name, parts in layers.items():
        layer = strip_prefixes(module_name)
        where = f"GeoLoRA: layer '{layer}' in '{filename}'"
        missing = [kind for kind in _FACTOR_NAMES if kind not in parts]
        if missing:
            raise ValueError(f"{where} has no {', '.join(missing)}; the file is incomplete or was edited.")
        U, S, V = (parts[kind] for kind in _FACTOR_NAMES)
        if S.dim() != 2 or S.shape[0] != S.shape[1] or U.dim() != 2 or V.dim() != 2:
            raise ValueError(
                f"{where} has factor shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}; expected "
                "U (out, k), S (k, k), V (in, k)."
            )
        k = S.shape[0]
        if U.shape[1] != k or V.shape[1] != k:
            raise ValueError(
                f"{where} has inconsistent ranks: U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}."
            )
        if "geolora_rank" in parts and parts["geolora_rank"].numel() == 1 and int(parts["geolora_rank"]) != k:
            raise ValueError(f"{where} stores rank {int(parts['geolora_rank'])} but its factors have rank {k}.")
        expected = rank_pattern.get(layer) if isinstance(rank_pattern, dict) else None
        if expected is not None and expected != k:
            raise ValueError(
                f"{where} has rank {k} but the rank_pattern of adapter_config.json (next to it) says {expected}: the "
                "two files come from different saves (an interrupted save?) or were edited. Save the adapter again "
                "or load an earlier checkpoint."
            )
        for kind, t in zip(_FACTOR_NAMES, (U, S, V)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: {kind} contains inf/NaN values; the file is corrupted.")
        for kind, t in (("geolora_U", U), ("geolora_V", V)):
            t = t.double()
            err = (t.T @ t - torch.eye(k, dtype=torch.float64, device=t.device)).abs().max().item() if k else 0.0
            if err > _SAVED_ORTHONORMALITY_TOL:
                raise ValueError(
                    f"{where}: {kind} is not orthonormal (max |X^T X - I| = {err:.3g}); the file is corrupted or was "
                    "not written by GeoLoRA's step (an adapter trained by a plain optimizer, e.g. a Trainer without "
                    "GeoLoRACallback, saved by a geolora version that did not check it at save)."
                )


# The save check (check_factors_before_save): max |X^T X - I| of the live bases.  GeoLoRA's step keeps them orthonormal
# to ~1e-6 in float32 (every step ends with a QR-based augmentation and an SVD truncation, and re-orthonormalises
# periodically) and to ~1e-2 when they are stored in bfloat16/float16 (autocast_adapter_dtype=False).  Values that are
# exactly bfloat16/float16 numbers in a float32 tensor (a half-precision adapter loaded with the default
# autocast_adapter_dtype=True) have half-precision error and get the half-precision tolerance.
_SAVE_TOL_FULL = 1e-3
_SAVE_TOL_HALF = 5e-2


def _basis_check(X: torch.Tensor) -> tuple[float, float]:
    """(max |X^T X - I|, tolerance) of one finite basis (out, k)."""
    k = X.shape[1]
    Xd = X.detach().double()
    err = (Xd.T @ Xd - torch.eye(k, dtype=torch.float64, device=X.device)).abs().max().item() if k else 0.0
    if err <= _SAVE_TOL_FULL:
        return err, _SAVE_TOL_FULL
    half = X.dtype in (torch.float16, torch.bfloat16) or any(
        torch.equal(X, X.to(dt).to(X.dtype)) for dt in (torch.bfloat16, torch.float16)
    )
    return err, _SAVE_TOL_HALF if half else _SAVE_TOL_FULL


def check_factors_before_save(factors: dict[str, dict[str, torch.Tensor]], adapter_name: str) -> None:
    """Refuse to save factors that GeoLoRA's step cannot have written: bases far from orthonormal, or inf/NaN.

    Such factors come from a plain optimizer step on U and V (whose ``.grad`` holds GeoLoRA's directions, not
    gradients): a Trainer without GeoLoRACallback, or torch.optim.AdamW(model.parameters()) in a custom loop.  Saved,
    they would be refused on load (bases off by more than 0.05) or resume as bases that are not bases; so the save
    fails here, before the weights and adapter_config.json are written.

    Args:
        factors: layer name -> {``"geolora_U"``: (out, k), ``"geolora_S"``: (k, k), ``"geolora_V"``: (in, k)}, the
            tensors about to be saved (at the live rank).
        adapter_name: the adapter being saved, for the message.
    """
    nonfinite, skewed = [], []
    for layer, parts in factors.items():
        if any(t.device.type == "meta" for t in parts.values()):
            continue
        bad = [kind for kind, t in sorted(parts.items()) if not torch.isfinite(t).all()]
        if bad:
            nonfinite.append((layer, bad))
            continue
        checks = [(kind, *_basis_check(parts[kind])) for kind in ("geolora_U", "geolora_V") if kind in parts]
        failed = [(err, kind, tol) for kind, err, tol in checks if err > tol]
        if failed:
            err, kind, tol = max(failed)
            skewed.append((layer, kind, err, tol, parts[kind].dtype))
    if not nonfinite and not skewed:
        return
    cause = f"The GeoLoRA factors were updated by a plain optimizer, not by GeoLoRA's step: {TRAIN_WITH_GEOLORA}."
    not_written = "The adapter weights and adapter_config.json were not written."
    if nonfinite:
        layer, kinds = nonfinite[0]
        raise ValueError(
            f"GeoLoRA: cannot save adapter '{adapter_name}': layer '{layer}' has inf/NaN values in "
            f"{', '.join(kinds)} ({len(nonfinite)} of {len(factors)} layers have NaN/inf factors; GeoLoRA's step "
            f"skips non-finite steps and never writes them). {cause} {not_written} The adapter's values are lost "
            "(merging them would write inf/NaN into the base weights): train again."
        )
    layer, kind, err, tol, dtype = max(skewed, key=lambda item: item[2])  # the worst layer
    raise ValueError(
        f"GeoLoRA: cannot save adapter '{adapter_name}': in layer '{layer}', {kind} is not orthonormal "
        f"(max |X^T X - I| = {err:.3g}; GeoLoRA's step keeps {str(dtype)[6:]} bases within {tol:g}); "
        f"{len(skewed)} of {len(factors)} layers fail. {cause} {not_written} What the adapter computes now is still "
        "usable without GeoLoRA: model.merge_and_unload() folds s * U S V^T into the base weights, whatever the bases."
    )


def _recreate_factors(module: GeoLoRALayer, adapter_name: str, k: int) -> None:
    for kind in _FACTOR_NAMES:
        params = getattr(module, kind)
        old = params[adapter_name]
        shape = (k, k) if kind == "geolora_S" else (old.shape[0], k)
        params[adapter_name] = nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad)
    module.mark_factors(adapter_name)


def get_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Map module name -> live rank of every GeoLoRA layer, for PEFT models and models loaded through
    transformers (``model.load_adapter`` / ``add_adapter``).

    Args:
        model: a ``PeftModel``, a ``GeoLoRAModel`` or any module with GeoLoRA layers injected.
        adapter_name: which adapter; default: each layer's first active adapter.
    """
    ranks = {}
    for name, layer in iter_geolora_layers(model):
        adapter = adapter_name
        if adapter is None:
            active = [a for a in layer.active_adapters if a in layer.geolora_U]
            if not active:
                continue
            adapter = active[0]
        if adapter in layer.r:
            ranks[name] = layer.r[adapter]
    return ranks


__all__ = [
    "GeoLoRAModel",
    "check_factors_before_save",
    "check_saved_adapter",
    "get_ranks",
    "iter_geolora_layers",
    "strip_prefixes",
]
