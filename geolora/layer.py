"""GeoLoRA layers: storage of ``U, S, V``, the one-backward directions, forward and merge.

For a frozen map ``y = x W0^T`` the adapted map is ``y = x W0^T + s * x V S^T U^T`` (``ΔW = s * U S V^T``).

The backward of the adapter does NOT write ``dL/dU``, ``dL/dV`` into ``.grad`` (those contain ``S`` and vanish at
``S = 0``).  It writes the three directions the GeoLoRA step needs, from one backward pass (the notation of
:mod:`geolora.integrator`)::

    U.grad = G_M V      = s * dY^T (x V)       (out, r)   K-direction
    V.grad = G_M^T U    = s * x^T (dY U)       (in, r)    L-direction
    S.grad = U^T G_M V  = s * (dY U)^T (x V)   (r, r)     S-direction

with ``G_M = s * dL/dΔW``.  The input gradient is the true one, ``dL/dx = s * (dY U) S V^T``.  All are thin matmuls;
``S`` is never inverted.  These "gradients" are linear in ``dL/dΔW``, so DDP averaging, accumulation and clipping act
on them as on ordinary gradients.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._compat import BufferDict
from .config import GeoLoRAConfig

logger = logging.getLogger(__name__)

# the eager forward computes with the live rank rounded up to a multiple of this many columns (see forward_factors)
_MATMUL_WIDTH = 16


def random_orthonormal(rows: int, cols: int, *, dtype=torch.float32, device=None, generator=None) -> torch.Tensor:
    """A random (rows, cols) matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    a = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    # contiguous: QR returns column-major Q; a layer created at full capacity (loaded from rank_pattern) would keep
    # that layout and round its matmuls differently from a grown (row-major) one, so resumed runs would drift
    return q.to(dtype=dtype, device=device).contiguous()


def delta_matrix(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * U S V^T`` (out, in): the one formula shared by merge, unmerge and export."""
    return scale * (U @ S @ V.transpose(0, 1))


class _LinearDirections(torch.autograd.Function):
    """``y = s * (x V) S^T U^T`` whose backward returns the GeoLoRA directions as the factor gradients."""

    @staticmethod
    def forward(ctx, x, U, S, V, scale):
        xv = x @ V  # (..., r)
        # s * U S folded into one (out, r) matrix: one thin matmul over the tokens, no extra pass over (..., out)
        y = xv @ ((U @ S) * scale).transpose(0, 1)  # (..., out)
        ctx.save_for_backward(x, xv, U, S, V)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xv, U, S, V = ctx.saved_tensors
        s = ctx.scale
        dt = xv.dtype  # the forward's compute dtype (bf16/fp16 under autocast)
        U_, S_, V_ = U.to(dt), S.to(dt), V.to(dt)
        r = xv.shape[-1]
        # flatten dy once: it often arrives non-contiguous (attention heads), and every product below reads it
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)  # (T, out)
        xv2 = xv.reshape(-1, r)  # (T, r)
        dyu2 = dy2 @ U_  # (T, r)
        dx = gU = gS = gV = None
        if ctx.needs_input_grad[0]:
            dx = (dyu2 @ ((S_ @ V_.transpose(0, 1)) * s)).reshape(x.shape)  # (..., in) = s (dY U) S V^T
        if ctx.needs_input_grad[1]:
            gU = (dy2.transpose(0, 1) @ xv2) * s  # (out, r)
        if ctx.needs_input_grad[2]:
            gS = (dyu2.transpose(0, 1) @ xv2) * s  # (r, r)
        if ctx.needs_input_grad[3]:
            gV = (x.reshape(-1, x.shape[-1]).to(dt).transpose(0, 1) @ dyu2) * s  # (in, r)
        return dx, gU, gS, gV, None


class _Conv2dDirections(torch.autograd.Function):
    """Conv2d version on the (out, in*kh*kw) matrix view: ``z = conv(x, V^T)``, ``y = s * (U S) z`` per pixel."""

    @staticmethod
    def forward(ctx, x, U, S, V, scale, kernel_size, stride, padding, dilation):
        r = V.shape[1]
        vk = V.transpose(0, 1).reshape(r, x.shape[1], *kernel_size)  # (r, in, kh, kw)
        z = F.conv2d(x, vk, None, stride, padding, dilation)  # (N, r, H', W')
        y = F.conv2d(z, (U @ S)[:, :, None, None])  # (N, out, H', W')
        ctx.save_for_backward(x, z, U, S, V)
        ctx.conf = (scale, kernel_size, stride, padding, dilation)
        return y * scale

    @staticmethod
    def backward(ctx, dy):
        x, z, U, S, V = ctx.saved_tensors
        s, kernel_size, stride, padding, dilation = ctx.conf
        dt = z.dtype
        U_, S_, V_, dy = U.to(dt), S.to(dt), V.to(dt), dy.to(dt)
        r = V.shape[1]
        dyu = F.conv2d(dy, U_.transpose(0, 1)[:, :, None, None])  # (N, r, H', W') = U^T dY per pixel
        dx = gU = gS = gV = None
        if ctx.needs_input_grad[0]:
            dz = torch.einsum("nrhw,rs->nshw", dyu, S_) * s
            vk = V_.transpose(0, 1).reshape(r, x.shape[1], *kernel_size)
            dx = torch.nn.grad.conv2d_input(x.shape, vk, dz, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            gU = torch.einsum("nohw,nrhw->or", dy, z) * s  # (out, r)
        if ctx.needs_input_grad[2]:
            gS = torch.einsum("nrhw,nshw->rs", dyu, z) * s  # (r, r)
        if ctx.needs_input_grad[3]:
            w = torch.nn.grad.conv2d_weight(
                x.to(dt), (r, x.shape[1], *kernel_size), dyu * s, stride, padding, dilation
            )  # (r, in, kh, kw)
            gV = w.reshape(r, -1).transpose(0, 1)  # (in*kh*kw, r)
        return dx, gU, gS, gV, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- plain-optimizer guard
# ``U.grad`` and ``V.grad`` hold the GeoLoRA directions above, not gradients: only GeoLoRA's step (GeoLoRAOptimizer,
# which takes them out of ``.grad`` before its wrapped optimizer runs) may consume them.  A plain optimizer that steps
# U and V with them (a Trainer without GeoLoRACallback, torch.optim.AdamW(model.parameters()) in a loop) drives the
# bases far from orthonormal.  Every U, V Parameter is marked (attribute below) where it is created and in every
# eager forward, and a global optimizer step pre-hook warns, once per optimizer, when an optimizer other than
# GeoLoRA's is about to step a marked Parameter that has a ``.grad``.  Python attribute checks only: no device work.
TRAIN_WITH_GEOLORA = (
    "train with geolora.GeoLoRACallback() on the Trainer or geolora.create_geolora_optimizer(model, lr=...) in a "
    "custom loop"
)
_DIRECTION_MARK = "_geolora_direction"
_step_hook = None
_warned_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
# attributes under which optimizer wrappers (accelerate's AcceleratedOptimizer, GeoLoRAOptimizer) hold the wrapped one
_WRAPPED_ATTRS = ("optimizer", "base_optimizer", "optim")


def mark_direction_factors(*params: torch.Tensor) -> None:
    """Mark ``params`` (GeoLoRA U, V Parameters) as holding directions in ``.grad``; installs the step guard once."""
    global _step_hook
    for p in params:
        if not getattr(p, _DIRECTION_MARK, False):
            setattr(p, _DIRECTION_MARK, True)
    if _step_hook is None:
        _step_hook = register_optimizer_step_pre_hook(_plain_step_pre_hook)


def _runs_geolora_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` runs GeoLoRA's step (its class says so with ``runs_geolora_step = True``, as
    GeoLoRAOptimizer does) or is a wrapper around one."""
    for _ in range(4):
        if getattr(optimizer, "runs_geolora_step", False):
            return True
        optimizer = next((getattr(optimizer, a) for a in _WRAPPED_ATTRS if hasattr(optimizer, a)), None)
        if optimizer is None:
            return False
    return False


def _plain_step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: warn once per optimizer that applies GeoLoRA directions as gradients.

    GeoLoRAOptimizer's own wrapped optimizer never sees them (they are out of ``.grad`` while it steps)."""
    if optimizer in _warned_optimizers:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and getattr(p, _DIRECTION_MARK, False):
                if _runs_geolora_step(optimizer):
                    return
                _warned_optimizers.add(optimizer)
                warnings.warn(
                    f"GeoLoRA: {type(optimizer).__name__}.step() is updating GeoLoRA factors U, V with their .grad, "
                    "which holds GeoLoRA's update directions, not gradients: this is a plain optimizer step, not "
                    "GeoLoRA's step. It drives U and V away from orthonormal bases, the adapter does not train as "
                    f"GeoLoRA, and save_pretrained will refuse it. To fix it, {TRAIN_WITH_GEOLORA}.",
                    UserWarning,
                    stacklevel=3,
                )
                return


class GeoLoRALayer(BaseTunerLayer):
    """Storage and shared logic of a GeoLoRA-adapted layer.

    Per adapter: parameters ``geolora_U`` (out, c), ``geolora_S`` (c, c), ``geolora_V`` (in, c) and a persistent
    buffer ``geolora_rank`` (the live rank, part of the state dict).  ``c`` is the capacity: the live rank when the
    layer is created or loaded, ``r_max`` after :meth:`grow_capacity` (done once, before an optimizer or DDP sees the
    parameters).  Columns beyond the live rank are exactly zero, so shapes never change during training.
    """

    adapter_layer_names = ("geolora_U", "geolora_S", "geolora_V")
    other_param_names = ("r", "r_max", "r_min", "scaling", "geolora_dropout", "geolora_rank")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}  # host mirror of geolora_rank, for slicing without a device sync
        self.r_max: dict[str, int] = {}
        self.r_min: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.geolora_dropout = nn.ModuleDict({})
        self.geolora_U = nn.ParameterDict({})
        self.geolora_S = nn.ParameterDict({})
        self.geolora_V = nn.ParameterDict({})
        self.geolora_rank = BufferDict({}, persistent=True)
        self.static_shapes = False
        # per adapter, set by GeoLoRAOptimizer for the forward whose gradient an augmentation reads: (U probe,
        # V probe, width) with orthonormal random columns r..width-1 (zero elsewhere) added to U and V in the forward
        # only (S is zero there, so the output is unchanged); never part of the parameters or the state dict
        self.geolora_probe: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Conv2d):
            self.in_features = base.in_channels * math.prod(base.kernel_size)
            self.out_features = base.out_channels
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif hasattr(base, "nf") and hasattr(base, "nx"):  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"Unsupported layer type {type(base).__name__}")
        self.register_load_state_dict_post_hook(GeoLoRALayer.sync_rank_mirror)

    # ------------------------------------------------------------------ storage
    def update_layer(self, adapter_name: str, r: int, config: GeoLoRAConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` at rank ``r`` (capacity = r; see :meth:`grow_capacity`)."""
        full = min(self.in_features, self.out_features)
        r_max = min(config.r_max, full)
        r = min(r, r_max)
        if r <= 0:
            raise ValueError(f"GeoLoRA rank must be positive, got {r}")
        self.r[adapter_name] = r
        self.r_max[adapter_name] = r_max
        self.r_min[adapter_name] = min(config.r_min, r_max)
        self.scaling[adapter_name] = config.scaling  # constant: a rank change never rescales
        self.static_shapes = config.static_shapes
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.geolora_dropout[adapter_name] = dropout
        self.geolora_U[adapter_name] = nn.Parameter(random_orthonormal(self.out_features, r))
        self.geolora_V[adapter_name] = nn.Parameter(random_orthonormal(self.in_features, r))
        if config.init_weights:
            S = torch.zeros(r, r)
        else:
            S = torch.diag(torch.rand(r) * 0.1 + 0.05)
        self.geolora_S[adapter_name] = nn.Parameter(S)
        self.geolora_rank[adapter_name] = torch.tensor(r, dtype=torch.long)
        self._move_adapter_to_device_of_base_layer(adapter_name)  # also marks U, V (mark_factors)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def mark_factors(self, adapter_name: str) -> None:
        """Mark U, V of ``adapter_name`` for the plain-optimizer guard (see ``mark_direction_factors``)."""
        if adapter_name in self.geolora_U and adapter_name in self.geolora_V:
            mark_direction_factors(self.geolora_U[adapter_name], self.geolora_V[adapter_name])

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Factors stay in float32 when the base is half precision (QR/SVD and the step run in >= float32 anyway), as
        # PEFT's autocast_adapter_dtype=True (its default) would upcast them afterwards anyway.  PEFT casts them to
        # the base dtype first, so restore the ORIGINAL values: a round trip through bf16 leaves U^T U - I ~ 4e-3.
        # With autocast_adapter_dtype=False, GeoLoRAModel._cast_adapter_dtype casts them to the base dtype (as LoRA).
        names = [n for n in self.adapter_layer_names if adapter_name in getattr(self, n)]
        originals = {n: getattr(self, n)[adapter_name] for n in names}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        for name, original in originals.items():
            params = getattr(self, name)
            if params[adapter_name].dtype in (torch.float16, torch.bfloat16):
                value = original.data.to(params[adapter_name].device)
                if value.dtype in (torch.float16, torch.bfloat16):
                    value = value.float()
                params[adapter_name] = nn.Parameter(value, requires_grad=params[adapter_name].requires_grad)
        self.mark_factors(adapter_name)

    @torch.no_grad()
    def cast_factors_to_base_dtype(self, adapter_name: str) -> None:
        """Store ``U, S, V`` of ``adapter_name`` in the base layer's floating dtype (PEFT's
        ``autocast_adapter_dtype=False``).  The GeoLoRA step still computes in at least float32; the bases are then
        orthonormal only to the precision of that dtype (bf16: ``|U^T U - I|`` ~ 1e-2)."""
        dtype = self.get_base_layer().weight.dtype
        if not dtype.is_floating_point:
            return
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            p = params[adapter_name]
            if p.dtype != dtype:
                params[adapter_name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        self.mark_factors(adapter_name)

    @staticmethod
    def sync_rank_mirror(module: "GeoLoRALayer", incompatible_keys=None) -> None:
        """After a state dict load, refresh the host rank mirror from the (loaded) ``geolora_rank`` buffer."""
        for name, buf in module.geolora_rank.items():
            if buf.device.type != "meta":
                module.r[name] = int(buf)

    def capacity(self, adapter_name: str) -> int:
        return self.geolora_U[adapter_name].shape[1]

    def set_rank(self, adapter_name: str, rank: int) -> None:
        self.r[adapter_name] = rank
        self.geolora_rank[adapter_name].fill_(rank)

    @torch.no_grad()
    def grow_capacity(self, adapter_name: str, capacity: Optional[int] = None) -> None:
        """Zero-pad the factors of ``adapter_name`` to ``capacity`` columns (default ``r_max``).

        Creates new Parameter objects (an autograd graph still alive from an earlier forward keeps referring to the
        old ones, so it cannot pin their shapes).  Must run before an optimizer or DDP wrapper is built on the
        parameters; an optimizer built earlier would not hold the new factors, and GeoLoRAOptimizer says so."""
        cap = self.r_max[adapter_name] if capacity is None else capacity
        old = self.capacity(adapter_name)
        if cap <= old:
            return
        # check before changing anything, so a refused call leaves all three factors at the same capacity
        if any(getattr(self, name)[adapter_name].grad is not None for name in self.adapter_layer_names):
            raise RuntimeError("grow_capacity() must run before the first backward pass")
        for name, rows in (("geolora_U", None), ("geolora_V", None), ("geolora_S", "square")):
            params = getattr(self, name)
            p = params[adapter_name]
            if rows == "square":
                new = p.new_zeros(cap, cap)
                new[:old, :old] = p
            else:
                new = p.new_zeros(p.shape[0], cap)
                new[:, :old] = p
            params[adapter_name] = nn.Parameter(new, requires_grad=p.requires_grad)
        self.mark_factors(adapter_name)

    def active_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U, S, V`` sliced to the live rank, or the full capacity in static-shape mode."""
        U, S, V = self.geolora_U[adapter_name], self.geolora_S[adapter_name], self.geolora_V[adapter_name]
        if self.static_shapes:
            return U, S, V
        r = self.r[adapter_name]
        if r == U.shape[1]:
            return U, S, V
        return U[:, :r], S[:r, :r], V[:, :r]

    def forward_factors(self, adapter_name: str, round_width: bool = True):
        """``U, S, V`` for the forward: the live rank rounded up to a multiple of ``_MATMUL_WIDTH`` columns (capped
        at the capacity; ``round_width=False``: the live rank), or the full capacity in static-shape mode.  Columns
        beyond the rank are exactly zero, so the output and the directions are the same as at the live rank; thin
        matmuls with 8 or fewer columns run at a third of the speed of 16-column ones on CPU BLAS
        (benchmarks/results/perf/history.md).  While the optimizer has set probe directions (``geolora_probe``),
        they are added to U and V and the width covers them."""
        U, S, V = self.geolora_U[adapter_name], self.geolora_S[adapter_name], self.geolora_V[adapter_name]
        cap = U.shape[1]
        probe = self.geolora_probe.get(adapter_name)
        if self.static_shapes:  # no integer read: torch.compile would guard on it (and recompile as it changes)
            width = cap
        else:
            live = self.r[adapter_name] if probe is None else max(self.r[adapter_name], probe[2])
            width = min(cap, -(-live // _MATMUL_WIDTH) * _MATMUL_WIDTH) if round_width else min(cap, live)
        if width < cap:
            U, S, V = U[:, :width], S[:width, :width], V[:, :width]
        if probe is not None:
            U = U + probe[0][:, :width].to(U.device, U.dtype)
            V = V + probe[1][:, :width].to(V.device, V.dtype)
        return U, S, V

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s * U S V^T`` in the base layer's weight layout."""
        U, S, V = self.active_factors(adapter_name)
        delta = delta_matrix(U.float(), S.float(), V.float(), self.scaling[adapter_name])  # (out, in)
        base = self.get_base_layer()
        if isinstance(base, nn.Conv2d):
            return delta.reshape(base.weight.shape)
        if self._weight_is_transposed():
            return delta.transpose(0, 1)
        return delta

    def _weight_is_transposed(self) -> bool:
        base = self.get_base_layer()
        return not isinstance(base, (nn.Linear, nn.Conv2d))  # Conv1D stores (in, out)

    def check_mergeable(self, adapter_names: list[str], module_name: Optional[str] = None) -> None:
        """Raise a ``ValueError`` naming the layer if merging ``adapter_names`` (those this layer holds) would fail or
        be silently wrong; changes nothing. Here: a base weight that cannot take ``W += s U S V^T`` in place (a
        quantized tensor subclass such as torchao's, or an integer weight). bitsandbytes layers override it
        (:mod:`geolora.bnb`). ``GeoLoRAModel`` calls it on every layer before merging any."""
        if not any(name in self.geolora_U for name in adapter_names):
            return
        weight = self.get_base_layer().weight
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
            name = f"'{module_name}'" if module_name else type(self.get_base_layer()).__name__
            raise ValueError(
                f"GeoLoRA cannot merge into layer {name}: its weight is a {type(weight.data).__name__} "
                f"({weight.dtype}), a quantized weight GeoLoRA has no merge for (bitsandbytes 8-bit is supported). "
                "Merge onto an unquantized base instead: load the base model without quantization, then "
                "PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(). Nothing was changed."
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.check_mergeable(adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.geolora_U:
                continue
            delta = self.get_delta_weight(name)
            with torch.no_grad():
                if safe_merge:
                    merged = base.weight.data.float() + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                    base.weight.data = merged.to(base.weight.dtype)
                else:
                    base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.geolora_U:
                with torch.no_grad():
                    base.weight.data = (base.weight.data.float() - self.get_delta_weight(name)).to(base.weight.dtype)

    # ------------------------------------------------------------------ forward
    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _geolora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.geolora_U:
                continue
            if not torch.compiler.is_compiling():
                self.mark_factors(name)  # Parameters replaced by code outside this class (PEFT's assign-load)
            result = result + self._adapter_output(x, name).to(result.dtype)
        return result


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers of DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def find_geolora_layers(model: nn.Module) -> list[tuple[str, GeoLoRALayer]]:
    """Every GeoLoRA layer of ``model`` with its full module name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GeoLoRALayer)]


class Linear(nn.Module, GeoLoRALayer):
    """GeoLoRA on ``nn.Linear`` or transformers' ``Conv1D`` (weight stored (in, out))."""

    forward = GeoLoRALayer._geolora_forward

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GeoLoRAConfig, r: int, **kwargs) -> None:
        super().__init__()
        GeoLoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config=config)

    def __repr__(self) -> str:
        return "geolora." + super().__repr__()

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        U, S, V = self.forward_factors(adapter_name)
        x = self._cast_input_dtype(x, U.dtype)
        x = self.geolora_dropout[adapter_name](x)
        return _LinearDirections.apply(x, U, S, V, self.scaling[adapter_name])


class Conv2d(nn.Module, GeoLoRALayer):
    """GeoLoRA on ``nn.Conv2d`` (groups=1, zero padding) on the (out, in*kh*kw) matrix view of the kernel."""

    forward = GeoLoRALayer._geolora_forward

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GeoLoRAConfig, r: int, **kwargs) -> None:
        super().__init__()
        GeoLoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config=config)

    def __repr__(self) -> str:
        return "geolora." + super().__repr__()

    def _conv_padding(self):
        base = self.get_base_layer()
        padding = base.padding
        if isinstance(padding, str):
            if padding == "valid":
                return (0, 0)
            # "same" with stride 1: total padding dilation*(k-1) per dim; symmetric when it is even
            pads = []
            for k, d in zip(base.kernel_size, base.dilation):
                total = d * (k - 1)
                if total % 2:
                    raise ValueError("GeoLoRA Conv2d supports padding='same' only with symmetric padding")
                pads.append(total // 2)
            return tuple(pads)
        return padding

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        U, S, V = self.forward_factors(adapter_name, round_width=False)
        base = self.get_base_layer()
        x = self._cast_input_dtype(x, U.dtype)
        x = self.geolora_dropout[adapter_name](x)
        return _Conv2dDirections.apply(
            x, U, S, V, self.scaling[adapter_name], base.kernel_size, base.stride, self._conv_padding(), base.dilation
        )


def dispatch_layer(target: nn.Module, adapter_name: str, config: GeoLoRAConfig, r: int, module_name: str) -> nn.Module:
    """Create the GeoLoRA layer for ``target`` or raise a clear error naming the module and its type."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TypeError(
                f"GeoLoRA cannot adapt module '{module_name}' (nn.Conv2d with groups={base.groups}): only groups=1 "
                "convolutions are supported. Remove it from target_modules."
            )
        if base.padding_mode != "zeros":
            raise TypeError(
                f"GeoLoRA cannot adapt module '{module_name}' (nn.Conv2d with padding_mode={base.padding_mode!r}): "
                "only padding_mode='zeros' is supported."
            )
        return Conv2d(target, adapter_name, config=config, r=r)
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False.",
                stacklevel=2,
            )
            config.fan_in_fan_out = False
        return Linear(target, adapter_name, config=config, r=r)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    if Conv1D and isinstance(base, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.", stacklevel=2
            )
            config.fan_in_fan_out = True
        return Linear(target, adapter_name, config=config, r=r)
    raise TypeError(
        f"GeoLoRA cannot adapt module '{module_name}' of type {type(base).__module__}.{type(base).__name__}: supported "
        "types are torch.nn.Linear, transformers' Conv1D and torch.nn.Conv2d (groups=1). Remove it from target_modules."
    )
