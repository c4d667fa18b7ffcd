"""The only module that touches PEFT and accelerate internals.

PEFT's :class:`peft.utils.PeftType` is a closed ``str`` enum and :func:`peft.utils.register_peft_method` refuses a name
that is not a member.  transformers' adapter integration also calls ``peft_type.value`` and assumes the parameter
prefix equals ``peft_type.value.lower() + "_"``.  So GeoLoRA adds a *real* member ``GEOLORA`` to the enum at import
time (version guarded) and registers with the prefix ``geolora_``.  Registration is idempotent.

It also wraps two module-level names of ``peft.peft_model`` (version guarded, idempotent, GeoLoRA adapters only):

* ``safe_save_file``: ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` through it.  For a state dict
  with GeoLoRA factors the file is written to a temporary file in the same folder, flushed, fsynced and renamed over
  the target (``os.replace`` is atomic), so a process killed while saving leaves the previous file or the new one,
  never a half-written one.  Other PEFT methods keep PEFT's own writer.
* ``load_peft_weights``: for a local adapter folder whose ``adapter_config.json`` says ``GEOLORA``, an unreadable
  weights file (truncated, corrupted header) raises a ``ValueError`` naming the file, and the loaded tensors are
  checked against the config (:func:`geolora.model.check_saved_adapter`: every layer complete, shapes consistent,
  ranks equal to ``rank_pattern``, finite values, orthonormal bases) before PEFT loads them into the model.

Both are names PEFT looks up at call time, so wrapping them changes nothing else; the wrappers are installed only
for the PEFT versions this module was checked against (``_PEFT_MIN`` <= version < ``_PEFT_MAX`` below, the same
range :func:`register_geolora` accepts and pyproject.toml pins).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import peft
from packaging.version import Version
from peft.utils import PeftType

logger = logging.getLogger(__name__)

GEOLORA_NAME = "geolora"
GEOLORA_PREFIX = "geolora_"
# Versions whose internals this module was checked against; pyproject pins the same range.
_PEFT_MIN, _PEFT_MAX = Version("0.21.0"), Version("0.22.0")


def _check_peft_version() -> None:
    version = Version(peft.__version__)
    if not (_PEFT_MIN <= Version(version.base_version) < _PEFT_MAX):
        raise ImportError(
            f"geolora supports peft>={_PEFT_MIN},<{_PEFT_MAX} (it extends PEFT's PeftType enum); found peft "
            f"{peft.__version__}. Install a supported version: pip install 'peft>={_PEFT_MIN},<{_PEFT_MAX}'."
        )


def ensure_peft_type_member() -> PeftType:
    """Add ``PeftType.GEOLORA`` to PEFT's closed enum, once.  Returns the member."""
    name = GEOLORA_NAME.upper()
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing  # type: ignore[return-value]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses to rebind members; a new name is set on the class through type.__setattr__.
    type.__setattr__(PeftType, name, member)
    return member


def register_geolora(config_cls: type, model_cls: type) -> None:
    """Register GeoLoRA with PEFT.  Safe to call any number of times (imports, reloads)."""
    _check_peft_version()
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    member = ensure_peft_type_member()
    if member in PEFT_TYPE_TO_CONFIG_MAPPING:
        # Already registered (a second import or an importlib.reload): rebind to the newest classes so that
        # isinstance checks against the reloaded module keep working.
        PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[member] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[member] = GEOLORA_PREFIX
        install_save_load_hooks()
        return
    peft.utils.register_peft_method(
        name=GEOLORA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=GEOLORA_PREFIX
    )
    install_save_load_hooks()


# ------------------------------------------------------------------------------------- atomic save / checked load
def atomic_save_safetensors(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file in the same folder and an atomic rename."""
    from safetensors.torch import save_file

    filename = os.fspath(filename)
    folder = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(filename)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _has_geolora_factors(tensors: Any) -> bool:
    return isinstance(tensors, dict) and any(GEOLORA_PREFIX in str(k) for k in tensors)


def _local_geolora_config(path: str) -> dict | None:
    """The parsed ``adapter_config.json`` of a local GeoLoRA adapter folder, else None (Hub ids, other methods)."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    try:
        with open(config_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # PeftConfig.from_pretrained has already reported an unreadable config
    if not isinstance(data, dict) or data.get("peft_type") != GEOLORA_NAME.upper():
        return None
    return data


def install_save_load_hooks() -> None:
    """Wrap ``peft.peft_model.safe_save_file`` and ``load_peft_weights`` for GeoLoRA adapters (idempotent)."""
    import peft.peft_model as peft_model

    original_save = getattr(peft_model, "safe_save_file", None)
    if original_save is not None and not getattr(original_save, "_geolora_hook", False):

        def safe_save_file(tensors, filename, metadata=None):
            if _has_geolora_factors(tensors):
                return atomic_save_safetensors(tensors, filename, metadata=metadata)
            return original_save(tensors, filename, metadata=metadata)

        safe_save_file._geolora_hook = True  # type: ignore[attr-defined]
        safe_save_file.__wrapped__ = original_save  # type: ignore[attr-defined]
        peft_model.safe_save_file = safe_save_file
    elif original_save is None:  # pragma: no cover - a PEFT outside the checked range
        logger.warning("geolora: peft.peft_model.safe_save_file not found; adapters are saved non-atomically.")

    original_load = getattr(peft_model, "load_peft_weights", None)
    if original_load is not None and not getattr(original_load, "_geolora_hook", False):

        def load_peft_weights(model_id, device=None, *args, **kwargs):
            subfolder = kwargs.get("subfolder")
            path = os.path.join(model_id, subfolder) if subfolder else model_id
            config = _local_geolora_config(path) if isinstance(path, (str, os.PathLike)) else None
            if config is None:
                return original_load(model_id, device, *args, **kwargs)
            filename = os.path.join(path, "adapter_model.safetensors")
            try:
                weights = original_load(model_id, device, *args, **kwargs)
            except Exception as exc:
                if not os.path.isfile(filename) or type(exc).__name__ != "SafetensorError":
                    raise
                raise ValueError(
                    f"GeoLoRA: cannot read the adapter weights file '{filename}' ({exc}). The file is truncated or "
                    "corrupted (an interrupted copy or save?): save the adapter again or load an earlier checkpoint."
                ) from exc
            from .model import check_saved_adapter

            if not os.path.isfile(filename):
                filename = os.path.join(path, "adapter_model.bin")  # read by PEFT with torch.load(weights_only=True)
            check_saved_adapter(weights, filename, config.get("rank_pattern") or {})
            return weights

        load_peft_weights._geolora_hook = True  # type: ignore[attr-defined]
        load_peft_weights.__wrapped__ = original_load  # type: ignore[attr-defined]
        peft_model.load_peft_weights = load_peft_weights
    elif original_load is None:  # pragma: no cover
        logger.warning("geolora: peft.peft_model.load_peft_weights not found; saved adapters are not checked on load.")


def install_on_accelerated_optimizer(accelerated_optimizer: Any, new_inner: Any) -> None:
    """Swap the optimizer inside accelerate's ``AcceleratedOptimizer``.

    With a GradScaler, ``AcceleratedOptimizer`` caches the inner optimizer's bound ``step`` at construction
    (accelerate/optimizer.py), so the cache must be rebuilt or the old optimizer's step would keep running.
    """
    from accelerate.optimizer import patch_optimizer_step

    accelerated_optimizer.optimizer = new_inner
    if getattr(accelerated_optimizer, "scaler", None) is not None:
        accelerated_optimizer._accelerate_step_called = False
        accelerated_optimizer._optimizer_original_step_method = new_inner.step
        accelerated_optimizer._optimizer_patched_step_method = patch_optimizer_step(
            accelerated_optimizer, new_inner.step
        )
