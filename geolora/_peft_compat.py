"""The only module that touches PEFT and accelerate internals.

PEFT's :class:`peft.utils.PeftType` is a closed ``str`` enum and :func:`peft.utils.register_peft_method` refuses a name
that is not a member.  transformers' adapter integration also calls ``peft_type.value`` and assumes the parameter
prefix equals ``peft_type.value.lower() + "_"``.  So GeoLoRA adds a *real* member ``GEOLORA`` to the enum at import
time (version guarded) and registers with the prefix ``geolora_``.  Registration is idempotent.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import peft
from packaging.version import Version
from peft.utils import PeftType

logger = logging.getLogger(__name__)

GEOLORA_NAME = "geolora"
GEOLORA_PREFIX = "geolora_"
# Versions whose internals this module was checked against (PEFT-INTEGRATION.md); pyproject pins the same range.
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
        return
    peft.utils.register_peft_method(
        name=GEOLORA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=GEOLORA_PREFIX
    )


def is_enum_member(value: Any) -> bool:
    return isinstance(value, enum.Enum) and value is PeftType._member_map_.get(GEOLORA_NAME.upper())


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
