"""The only module that touches PEFT, transformers and accelerate internals.

Every private name, undocumented attribute or call-time lookup of those packages that geolora relies on is here, each
function saying which internal it uses, so that a new PEFT/transformers/accelerate release is checked in one place.
(Overriding the ``BaseTuner``/``BaseTunerLayer`` hook methods in :mod:`geolora.model` and :mod:`geolora.layer` is
PEFT's documented way to add a method, not internals access.)  The functions here are public names: the leading
underscore of the module says that it is not part of geolora's API.

PEFT's :class:`peft.utils.PeftType` is a closed ``str`` enum and :func:`peft.utils.register_peft_method` refuses a name
that is not a member.  transformers' adapter integration also calls ``peft_type.value`` and assumes the parameter
prefix equals ``peft_type.value.lower() + "_"``.  So GeoLoRA adds a *real* member ``GEOLORA`` to the enum at import
time (version guarded) and registers with the prefix ``geolora_``.  Registration is idempotent.

It also wraps two module-level names of ``peft.peft_model`` (version guarded, idempotent, GeoLoRA adapters only):

* ``safe_save_file``: ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` through it.  For a state dict
  with GeoLoRA factors the file is written with :func:`geolora.io.atomic_save_safetensors` (a temporary file in the
  same folder, fsynced and renamed over the target), so a process killed while saving leaves the previous file or the
  new one, never a half-written one.  Other PEFT methods keep PEFT's own writer.
* ``load_peft_weights``: for a local adapter folder whose ``adapter_config.json`` says ``GEOLORA``, an unreadable
  weights file (truncated, corrupted header: ``safetensors.SafetensorError``) raises a ``ValueError`` naming the file,
  and the loaded tensors are checked against the config by the ``check_weights`` function given to
  :func:`register_geolora` (geolora passes :func:`geolora.model.check_saved_adapter`: every layer complete, shapes
  consistent, ranks equal to ``rank_pattern``, finite values, orthonormal bases) before PEFT loads them into the model.

Both are names PEFT looks up at call time, so wrapping them changes nothing else; the wrappers are installed only
for the PEFT versions this module was checked against (``PEFT_MIN`` <= version < ``PEFT_MAX`` below, the same
range :func:`register_geolora` accepts and pyproject.toml pins).

This module imports nothing from geolora but :mod:`geolora.io`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Callable, Optional

import peft
from packaging.version import Version
from peft.tuners._buffer_dict import BufferDict  # PEFT's private module: re-exported for geolora.layer
from peft.utils import PeftType
from safetensors import SafetensorError

from .io import atomic_save_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "BufferDict",
    "GEOLORA_NAME",
    "GEOLORA_PREFIX",
    "PEFT_MAX",
    "PEFT_MIN",
    "ensure_peft_type_member",
    "install_on_accelerated_optimizer",
    "install_save_load_hooks",
    "register_geolora",
    "run_callback_early",
]

GEOLORA_NAME = "geolora"
GEOLORA_PREFIX = "geolora_"
# Versions whose internals this module was checked against; pyproject pins the same range.
PEFT_MIN, PEFT_MAX = Version("0.21.0"), Version("0.22.0")

# check_weights(weights, filename, rank_pattern): raises a ValueError naming the file and layer for a bad adapter
CheckWeights = Callable[[dict, str, dict], None]


def check_peft_version() -> None:
    """Raise an ``ImportError`` with the install command unless the installed PEFT is in ``[PEFT_MIN, PEFT_MAX)``."""
    version = Version(peft.__version__)
    if not (PEFT_MIN <= Version(version.base_version) < PEFT_MAX):
        raise ImportError(
            f"geolora supports peft>={PEFT_MIN},<{PEFT_MAX} (it extends PEFT's PeftType enum); found peft "
            f"{peft.__version__}. Install a supported version: pip install 'peft>={PEFT_MIN},<{PEFT_MAX}'."
        )


def ensure_peft_type_member() -> PeftType:
    """Add ``PeftType.GEOLORA`` to PEFT's closed enum, once.  Returns the member.

    Relies on the internals of Python's ``enum`` (``_member_map_``, ``_value2member_map_``, ``_member_names_``) as
    PEFT's ``PeftType`` (a ``str`` enum) uses them.
    """
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


def register_geolora(config_cls: type, model_cls: type, *, check_weights: Optional[CheckWeights]) -> None:
    """Register GeoLoRA with PEFT and install the save/load hooks.  Safe to call any number of times (imports,
    reloads): a later call rebinds the classes and the checker.

    Args:
        config_cls: the config class (``GeoLoRAConfig``).
        model_cls: the tuner class (``GeoLoRAModel``).
        check_weights: ``check_weights(weights, filename, rank_pattern)``, run on the tensors of every local GeoLoRA
            adapter PEFT loads (see :func:`install_save_load_hooks`); None: no check.  Keyword-only and required, so
            that a second registration cannot drop the check by omission.
    """
    check_peft_version()
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
    else:
        peft.utils.register_peft_method(
            name=GEOLORA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=GEOLORA_PREFIX
        )
    install_save_load_hooks(check_weights)


# ------------------------------------------------------------------------------------- atomic save / checked load
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


def install_save_load_hooks(check_weights: Optional[CheckWeights] = None) -> None:
    """Wrap ``peft.peft_model.safe_save_file`` and ``load_peft_weights`` for GeoLoRA adapters (idempotent).

    Relies on ``PeftModel.save_pretrained`` and ``PeftModel.load_adapter`` looking these two names up in the module
    ``peft.peft_model`` at call time.  ``check_weights`` (see :func:`register_geolora`) replaces the checker of a hook
    installed earlier.
    """
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
    if original_load is not None and getattr(original_load, "_geolora_hook", False):
        original_load.check_weights = check_weights  # type: ignore[attr-defined]
    elif original_load is not None:

        def load_peft_weights(model_id, device=None, *args, **kwargs):
            subfolder = kwargs.get("subfolder")
            path = os.path.join(model_id, subfolder) if subfolder else model_id
            config = _local_geolora_config(path) if isinstance(path, (str, os.PathLike)) else None
            if config is None:
                return original_load(model_id, device, *args, **kwargs)
            filename = os.path.join(path, "adapter_model.safetensors")
            try:
                weights = original_load(model_id, device, *args, **kwargs)
            except SafetensorError as exc:
                if not os.path.isfile(filename):
                    raise
                raise ValueError(
                    f"GeoLoRA: cannot read the adapter weights file '{filename}' ({exc}). The file is truncated or "
                    "corrupted (an interrupted copy or save?): save the adapter again or load an earlier checkpoint."
                ) from exc
            check = load_peft_weights.check_weights  # type: ignore[attr-defined]
            if check is not None:
                if not os.path.isfile(filename):
                    filename = os.path.join(path, "adapter_model.bin")  # read by PEFT with torch.load(weights_only)
                check(weights, filename, config.get("rank_pattern") or {})
            return weights

        load_peft_weights._geolora_hook = True  # type: ignore[attr-defined]
        load_peft_weights.__wrapped__ = original_load  # type: ignore[attr-defined]
        load_peft_weights.check_weights = check_weights  # type: ignore[attr-defined]
        peft_model.load_peft_weights = load_peft_weights
    else:  # pragma: no cover
        logger.warning("geolora: peft.peft_model.load_peft_weights not found; saved adapters are not checked on load.")


# ---------------------------------------------------------------------------------------------------- accelerate
def install_on_accelerated_optimizer(accelerated_optimizer: Any, new_inner: Any) -> None:
    """Swap the optimizer inside accelerate's ``AcceleratedOptimizer``.

    With a GradScaler, ``AcceleratedOptimizer`` caches the inner optimizer's bound ``step`` at construction
    (accelerate/optimizer.py: the private attributes ``_accelerate_step_called``, ``_optimizer_original_step_method``,
    ``_optimizer_patched_step_method`` and ``patch_optimizer_step``), so the cache must be rebuilt or the old
    optimizer's step would keep running.
    """
    from accelerate.optimizer import patch_optimizer_step

    accelerated_optimizer.optimizer = new_inner
    if getattr(accelerated_optimizer, "scaler", None) is not None:
        accelerated_optimizer._accelerate_step_called = False
        accelerated_optimizer._optimizer_original_step_method = new_inner.step
        accelerated_optimizer._optimizer_patched_step_method = patch_optimizer_step(
            accelerated_optimizer, new_inner.step
        )


# ---------------------------------------------------------------------------------------------------- transformers
def run_callback_early(callback: Any, depth: int = 8) -> bool:
    """Move ``callback`` to position 1 (after ``DefaultFlowCallback``) of the ``transformers.Trainer``'s callback list,
    so that it runs before the ``report_to`` integrations (which then see what it adds to the logs in ``on_log``).

    Call it from inside a callback event (``on_init_end``).  transformers passes a callback neither the Trainer nor
    its ``CallbackHandler``, so this relies on transformers internals: the handler is the ``self`` of a calling frame
    (``CallbackHandler.call_event``, at most ``depth`` frames up) and its ``callbacks`` list is the order in which
    events are called.  Returns whether the callback was moved (False: no handler found, or ``callback`` not in it).
    """
    from transformers.trainer_callback import CallbackHandler

    handler = None
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler):
                handler = candidate
                break
    finally:
        del frame
    if handler is None or callback not in handler.callbacks:
        return False
    handler.callbacks.remove(callback)
    handler.callbacks.insert(1 if handler.callbacks else 0, callback)
    return True
