"""GeoLoRA on bitsandbytes-quantized linear layers (``Linear8bitLt``, ``Linear4bit``), QLoRA style.

The base weight stays quantized and frozen; the GeoLoRA factors U, S, V are ordinary float tensors (float32 unless
the user casts them), so the step (augment, coefficient update, truncate) is the same as on an ``nn.Linear`` base: it
only reads the factor gradients, which the layer's autograd function writes whatever the base.

Merging cannot add ``s * U S V^T`` to an int8/nf4 tensor in place. As PEFT's LoRA does (``tuners/lora/bnb.py``), a
merge dequantizes the base weight, adds the update in float32 and quantizes the sum again into a new parameter of the
same kind (``Int8Params`` / ``Params4bit`` with the original quantization settings). Two differences from LoRA:

* unmerge puts back the very weight object that was there before the merge, so merge + unmerge is exact (LoRA
  subtracts and requantizes again, which adds a second rounding);
* merging into a 4-bit layer is refused, and so is an 8-bit merge whose rounding would change a layer's update by
  more than half (``MAX_LOST_FRACTION``), with an error naming the layer, before any layer is changed
  (``GeoLoRAModel`` checks every quantized layer first): merge onto an unquantized base instead. Measured on a tiny
  Llama (scripts/quantized_merge_errors.py): an nf4 requantization of W + dW loses 74-100% of a layer's fine-tuning
  update, and with an update large enough to survive the merged model was 53% off the unmerged one, against 3.7% for
  the 4-bit quantization of the base itself; an 8-bit merge was 1.08% off, against the base's own 1.03%. Merges
  that go through warn with how much the rounding changed the update.

``export_as_lora`` / ``geolora export-lora`` work from a quantized run (the factors are full precision).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import GeoLoRAConfig
from .layer import Linear


def is_bnb_available() -> bool:
    """Whether bitsandbytes is installed (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def bnb_layer_types() -> tuple[type, ...]:
    """``(bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)``, or ``()`` without bitsandbytes."""
    if not is_bnb_available():
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


# A merge that would keep less than this fraction of the update is refused (the update is below the rounding step).
MAX_LOST_FRACTION = 0.5


def _int8_scale(weight: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
    """The row scales (SCB) of an ``Int8Params``: on the weight until ``Linear8bitLt``'s first forward moves them into
    its ``state``."""
    scb = getattr(weight, "SCB", None)
    return scb if scb is not None else getattr(getattr(base, "state", None), "SCB", None)


def dequantize(weight: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """A bitsandbytes weight (``Params4bit`` or ``Int8Params``) as a float32 (out, in) tensor."""
    import bitsandbytes as bnb

    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = _int8_scale(weight, base)
    if scb is None:
        raise ValueError(
            f"cannot dequantize the 8-bit weight of {type(base).__name__}: it has no scale (SCB); move "
            "the model to its device first, which quantizes it"
        )
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


def quantized_like(weight: torch.Tensor, data: torch.Tensor) -> nn.Parameter:
    """A new bitsandbytes parameter of ``weight``'s kind and settings holding ``data`` (float, (out, in))."""
    import bitsandbytes as bnb

    device = weight.device
    if isinstance(weight, bnb.nn.Params4bit):
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        dtype = getattr(weight.quant_state, "dtype", None) or torch.float32
        return bnb.nn.Params4bit(data.to("cpu", dtype), **kwargs).to(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    new = bnb.nn.Int8Params(data.to("cpu", dtype), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
    return new.to(device)


class _QuantizedLinear(Linear):
    """GeoLoRA on a bitsandbytes linear layer: forward and step as for ``nn.Linear``; merge by dequantize, add,
    requantize; unmerge restores the weight saved at the merge (see the module docstring)."""

    _kind = "quantized"
    _merge_supported = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GeoLoRAConfig, r: int, **kwargs) -> None:
        if config.fan_in_fan_out:  # bitsandbytes layers store (out, in), as nn.Linear (same warning as there)
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is a bitsandbytes linear layer. "
                "Setting it to False.",
                stacklevel=2,
            )
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, **kwargs)
        self._weights_before_merge: list[tuple[nn.Parameter, Optional[torch.Tensor]]] = []

    def _weight_is_transposed(self) -> bool:
        return False

    def check_mergeable(self, adapter_names: list[str], module_name: Optional[str] = None) -> None:
        """:meth:`merge_candidate`'s refusal for each of ``adapter_names`` this layer holds; changes nothing. (The
        model's pre-check thus requantizes each layer once more than the merge itself: the price of refusing before
        any layer changes without holding every layer's candidate weight in memory at once.)"""
        for name in adapter_names:
            if name in self.geolora_U:
                self.merge_candidate(name, module_name=module_name)

    def _install(self, weight: nn.Parameter, scb: Optional[torch.Tensor] = None) -> None:
        """Make ``weight`` the base layer's weight. An ``Int8Params`` gets its int8 data and scale back as ``CB`` /
        ``SCB``: ``Linear8bitLt`` moves them into its ``state`` on the first forward and reads them from there."""
        base = self.get_base_layer()
        if scb is not None:
            weight.CB, weight.SCB = weight.data, scb
        base.weight = weight
        state = getattr(base, "state", None)
        if state is not None and hasattr(state, "reset_grads"):
            state.reset_grads()
            state.CB, state.SCB = None, None

    def merge_candidate(
        self, adapter_name: str, safe_merge: bool = False, module_name: Optional[str] = None
    ) -> tuple[nn.Parameter, float]:
        """The requantized merged weight for ``adapter_name`` and the fraction of the update the rounding loses
        (``||deq(Q(W + dW)) - W - dW|| / ||dW||``); raises ``ValueError`` naming the layer if that fraction exceeds
        ``MAX_LOST_FRACTION`` or (``safe_merge``) the merged weight is not finite. Changes nothing."""
        base = self.get_base_layer()
        w = dequantize(base.weight, base)
        delta = self.get_delta_weight(adapter_name).float().to(w.device)
        target = w + delta
        if safe_merge and not torch.isfinite(target).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        candidate = quantized_like(base.weight, target)
        norm = float(delta.norm())
        lost = float((dequantize(candidate, base) - target).norm()) / norm if norm > 0 else 0.0
        if lost > MAX_LOST_FRACTION or not self._merge_supported:
            name = f"'{module_name}'" if module_name else f"({type(base).__name__})"
            why = f"requantizing the merged weight would change the adapter's update by {lost:.0%}" + (
                ""
                if self._merge_supported
                else " (4-bit merges are not supported: the nf4/fp4 rounding step "
                "is larger than a fine-tuning update, so a merge either loses the update or adds 4-bit "
                "rounding error to a larger weight)"
            )
            raise ValueError(
                f"GeoLoRA: refusing to merge adapter '{adapter_name}' into the {self._kind} layer {name}: {why}, so "
                f"the merged model would silently differ from the trained one. Merge onto an unquantized base "
                f"instead: load the base model without quantization_config, then "
                f"PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(). Nothing was changed."
            )
        return candidate, lost

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names or []:
            if name not in self.geolora_U:
                continue
            with torch.no_grad():
                candidate, lost = self.merge_candidate(name, safe_merge=safe_merge)
            warnings.warn(
                f"GeoLoRA: merging into a {self._kind} layer requantizes its weight; the rounding changes "
                f"the update by {lost:.1%} in this layer.",
                stacklevel=2,
            )
            base = self.get_base_layer()
            self._weights_before_merge.append((base.weight, _int8_scale(base.weight, base)))
            self._install(candidate)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.geolora_U and self._weights_before_merge:
                self._install(*self._weights_before_merge.pop())  # exactly the weight before the merge


class Linear8bitLt(_QuantizedLinear):
    """GeoLoRA on ``bitsandbytes.nn.Linear8bitLt``."""

    _kind = "8-bit (bitsandbytes Linear8bitLt)"


class Linear4bit(_QuantizedLinear):
    """GeoLoRA on ``bitsandbytes.nn.Linear4bit`` (nf4 or fp4)."""

    _kind = "4-bit (bitsandbytes Linear4bit)"
    _merge_supported = False


def dispatch_bnb(target: nn.Module, adapter_name: str, config: GeoLoRAConfig, r: int) -> Optional[nn.Module]:
    """The GeoLoRA layer for a bitsandbytes base, or None if ``target`` is not one."""
    types = bnb_layer_types()
    if not types:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    int8, four_bit = types
    if isinstance(base, four_bit):
        return Linear4bit(target, adapter_name, config=config, r=r)
    if isinstance(base, int8):
        return Linear8bitLt(target, adapter_name, config=config, r=r)
    return None


__all__ = [
    "MAX_LOST_FRACTION",
    "Linear4bit",
    "Linear8bitLt",
    "bnb_layer_types",
    "dequantize",
    "dispatch_bnb",
    "is_bnb_available",
    "quantized_like",
]
