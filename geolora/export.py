"""export_as_lora: write a GeoLoRA adapter as a standard PEFT LoRA adapter (per-layer ranks via rank_pattern)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .io import atomic_save_safetensors, atomic_write_json
from .layer import GeoLoRALayer
from .model import strip_prefixes

_PREFIX = "base_model.model."


def export_as_lora(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the GeoLoRA adapter ``adapter_name`` of ``peft_model`` as a standard PEFT LoRA adapter in ``out_dir``.

    Each layer of rank k becomes a LoRA pair of rank k with ``lora_alpha = k`` (scaling 1) and
    ``B = s * U S`` (out, k), ``A = V^T`` (k, in) (Conv2d: A is the (k, in, kh, kw) kernel, B a 1x1 conv), so
    ``B A = s * U S V^T`` and outputs match.  Ranks go to ``rank_pattern``/``alpha_pattern``.  The result loads with
    stock PEFT (``PeftModel.from_pretrained``) in a process that never imports geolora.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(
            f"export_as_lora: {type(peft_model).__name__} has no PEFT adapters (peft_config); after merge_and_unload() "
            "the adapter is part of the base weights and there is nothing to export. Pass the PeftModel."
        )
    if adapter_name not in configs:
        raise ValueError(f"export_as_lora: no adapter named '{adapter_name}' (adapters: {sorted(configs)})")
    config = configs[adapter_name]
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, GeoLoRALayer) and adapter_name in module.geolora_U:
            if module.merged:
                raise ValueError(
                    f"export_as_lora: layer '{strip_prefixes(name)}' is merged into the base weights; call "
                    "model.unmerge_adapter() first (a merged adapter cannot be exported without the base)."
                )
            layers[name] = module
    if not layers:
        raise ValueError(f"export_as_lora: the model has no GeoLoRA layers for adapter '{adapter_name}'")

    # GeoLoRA never adapts embeddings: skip PEFT's "auto" vocabulary check (a Hub look-up of the base id)
    full = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    state = {k: v for k, v in full.items() if ".geolora_" not in k}
    rank_pattern, alpha_pattern = {}, {}
    for name, module in layers.items():
        U, S, V = (t.detach().float() for t in module.active_factors(adapter_name))
        k = module.r[adapter_name]
        U, S, V = U[:, :k], S[:k, :k], V[:, :k]
        B = module.scaling[adapter_name] * (U @ S)  # (out, k)
        A = V.transpose(0, 1)  # (k, in)
        base = module.get_base_layer()
        if isinstance(base, nn.Conv2d):
            A = A.reshape(k, base.in_channels, *base.kernel_size)
            B = B.reshape(base.out_channels, k, 1, 1)
        key = name if name.startswith(_PREFIX) else _PREFIX + name
        state[f"{key}.lora_A.weight"] = A.contiguous()
        state[f"{key}.lora_B.weight"] = B.contiguous()
        short = strip_prefixes(name)
        rank_pattern[short] = k
        alpha_pattern[short] = k
    target = config.target_modules
    # PEFT appends its task defaults (SEQ_CLS: classifier, score) on every get_peft_model/from_pretrained: name each
    # module once, in order
    modules_to_save = list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save is not None else None
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.r,
        target_modules=sorted(target) if isinstance(target, (set, list, tuple)) else target,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=modules_to_save,
        bias=config.bias.replace("geolora_only", "lora_only"),
        fan_in_fan_out=config.fan_in_fan_out,
        lora_dropout=config.lora_dropout,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_save_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = lora_config.to_dict()
    for k, v in cfg.items():
        if isinstance(v, set):
            cfg[k] = sorted(v)
    atomic_write_json(out / "adapter_config.json", cfg, sort_keys=True)
    return out


__all__ = ["export_as_lora"]
