"""What the GeoLoRA step shares across processes: the agreement on the step's outcome, the periodic broadcast of the
factors, and the FSDP checks and shard helpers.  Without an initialised process group (or with one process) every
function here is a no-op; nothing imports from the rest of :mod:`geolora`.

Under DDP every process computes the same step from the same (all-reduced) gradients; rounding can still make the
rank decisions differ, so :func:`agree_across_processes` makes process 0's ranks everyone's, and an inf/NaN on any
process skips the step on all.  Under FSDP2 (``fully_shard``) the factors are row-sharded DTensors: the step runs on
full copies (``DTensor.full_tensor()``) and each process keeps its own rows (:func:`copy_into_shard`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without torch.distributed
    DTensor = distribute_tensor = None
try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch built without torch.distributed
    FSDPModule = None

__all__ = ["agree_across_processes", "broadcast_factors", "check_not_fsdp", "copy_into_shard", "is_sharded"]


def _multi_process() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_across_processes(flat: torch.Tensor) -> torch.Tensor:
    """``[nonfinite flag, ranks...]`` (int64, 1-D): the flags summed over processes, the ranks of process 0.

    Returns ``flat`` itself on a single process; else a new tensor, the same on every process (one all-reduce)."""
    if not _multi_process():
        return flat
    payload = flat.clone()
    if dist.get_rank() != 0:
        payload[1:] = 0
    dist.all_reduce(payload, op=dist.ReduceOp.SUM)
    return payload


def broadcast_factors(params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> None:
    """Broadcast factors and rank buffers from process 0, in place (periodic drift removal under DDP).

    FSDP2 shards are skipped: each element has one owner, so there is nothing to agree on."""
    if not _multi_process():
        return
    for t in [*params, *buffers]:
        if not is_sharded(t):
            dist.broadcast(t.data, src=0)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2's ``fully_shard``)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def copy_into_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write this process's part of ``full`` (the whole tensor, the same on every process) into the DTensor
    ``param``'s local shard, by ``param``'s own mesh and placements (no communication)."""
    shard = distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())


def _is_fsdp2(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def check_not_fsdp(model: nn.Module) -> None:
    """Refuse FSDP1 (``FullyShardedDataParallel``, flat parameters: GeoLoRA's factors lose their shapes) with a clear
    error; FSDP2 (``fully_shard``, per-parameter DTensors) is supported: the step gathers each factor (see
    :class:`geolora.GeoLoRAOptimizer`).

    Raises:
        RuntimeError: a module of ``model`` is FSDP1's ``FullyShardedDataParallel`` (or another ``FSDP*`` wrapper
            that is not FSDP2).
    """
    fsdp1 = any(
        type(m).__name__ == "FullyShardedDataParallel" or (type(m).__name__.startswith("FSDP") and not _is_fsdp2(m))
        for m in model.modules()
    )
    if fsdp1:
        raise RuntimeError(
            "GeoLoRA supports FSDP2 (torch.distributed.fsdp.fully_shard; TrainingArguments(fsdp=..., "
            "fsdp_config={'version': 2}), the default in transformers 5, or fsdp_version: 2 in an accelerate config), "
            "not FSDP1's FullyShardedDataParallel, whose flat parameters hide the factors' shapes. Switch to FSDP2, "
            "or use DDP (the adapter itself is small)."
        )
