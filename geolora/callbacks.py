"""GeoLoRACallback: GeoLoRA on a stock ``transformers.Trainer``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[geolora.GeoLoRACallback()])

The callback only schedules; the step itself is :class:`geolora.GeoLoRAOptimizer`:

* ``on_init_end`` (inside ``Trainer.__init__``, before any optimizer or DDP wrapper exists): grows every GeoLoRA
  layer to ``r_max`` capacity.
* ``on_train_begin`` (after the Trainer built its optimizer and scheduler and loaded a checkpoint): wraps the
  Trainer's optimizer in a ``GeoLoRAOptimizer`` inside accelerate's ``AcceleratedOptimizer``.  The Trainer then
  calls it at exactly the right place: once per optimizer step (not on accumulation micro-steps), after gradient
  clipping, on unscaled gradients (GradScaler unscales every param group, and skips the whole step on inf/NaN),
  before ``zero_grad``; the lr scheduler keeps moving the learning rate that the step reads.  AdamW never sees the
  factor gradients, so it puts no momentum or weight decay on U and V.
* ``on_log``: adds rank statistics to the logs (``log_history`` and the ``report_to`` integrations).
"""

from __future__ import annotations

import logging
from typing import Optional

from transformers import TrainerCallback

from ._compat import install_on_accelerated_optimizer, run_callback_early
from .distributed import check_not_fsdp
from .layer import find_geolora_layers, unwrap_model
from .model import get_ranks
from .optim import GeoLoRAOptimizer, grow_capacity, trainable_adapter

logger = logging.getLogger(__name__)


def rank_statistics(model, adapter_name: Optional[str] = None) -> dict[str, float]:
    """Mean, min and max rank and the adapter parameter count (U, S, V at the live ranks)."""
    layers = find_geolora_layers(unwrap_model(model))
    ranks, params = [], 0
    for _, layer in layers:
        names = [adapter_name] if adapter_name else [a for a in layer.active_adapters if a in layer.r]
        for a in names[:1]:
            r = layer.r[a]
            ranks.append(r)
            params += r * (layer.out_features + layer.in_features + r)
    if not ranks:
        return {}
    return {
        "geolora/mean_rank": sum(ranks) / len(ranks),
        "geolora/min_rank": float(min(ranks)),
        "geolora/max_rank": float(max(ranks)),
        "geolora/adapter_params": float(params),
    }


class GeoLoRACallback(TrainerCallback):
    """Runs GeoLoRA's augmentation and truncation on every optimizer step of a stock ``transformers.Trainer``.

    Args:
        s_update: override the adapter config's coefficient update (``"adam"`` or ``"sgd"``).
        log_ranks: add ``geolora/{mean,min,max}_rank`` and ``geolora/adapter_params`` to the Trainer's logs.
    """

    def __init__(self, s_update: Optional[str] = None, log_ranks: bool = True) -> None:
        self.s_update = s_update
        self.log_ranks = log_ranks
        self.optimizer: Optional[GeoLoRAOptimizer] = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        inner = unwrap_model(model)
        layers = find_geolora_layers(inner)
        if not layers:
            raise ValueError(
                "GeoLoRACallback: the model has no GeoLoRA layers. Wrap it with "
                "peft.get_peft_model(model, geolora.GeoLoRAConfig(...)) (after `import geolora`) or "
                "model.add_adapter(GeoLoRAConfig(...)) before creating the Trainer."
            )
        check_not_fsdp(inner)
        grow_capacity(inner, trainable_adapter(layers))
        run_callback_early(self)  # before the report_to integrations, so that they see the rank statistics in on_log

    def _check_s_update(self, optimizer: GeoLoRAOptimizer) -> GeoLoRAOptimizer:
        built = optimizer.settings["s_update"]
        if self.s_update is not None and self.s_update != built:
            raise ValueError(
                f"GeoLoRACallback(s_update={self.s_update!r}) conflicts with the GeoLoRAOptimizer passed to the "
                f"Trainer, built with s_update={built!r}. Set it in one place: GeoLoRAConfig(s_update=...) or "
                "create_geolora_optimizer(..., s_update=...)."
            )
        return optimizer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fsdp", None) and int((getattr(args, "fsdp_config", None) or {}).get("version", 2)) != 2:
            raise RuntimeError(
                "GeoLoRA supports FSDP2 only: TrainingArguments(fsdp=..., fsdp_config={'version': 2}) (transformers' "
                "default) or fsdp_version: 2 in the accelerate config; FSDP1's flat parameters hide the factors' "
                "shapes. Or use DDP: drop the fsdp options."
            )
        if optimizer is None:
            raise RuntimeError("GeoLoRACallback: the Trainer passed no optimizer to on_train_begin.")
        inner_model = unwrap_model(model)
        check_not_fsdp(inner_model)
        grow_capacity(inner_model)  # no-op when on_init_end already did it
        if hasattr(optimizer, "optimizer") and hasattr(optimizer, "scaler"):  # accelerate's AcceleratedOptimizer
            current = optimizer.optimizer
            if isinstance(current, GeoLoRAOptimizer):
                self.optimizer = self._check_s_update(current)
            else:
                self.optimizer = GeoLoRAOptimizer(current, inner_model, s_update=self.s_update)
                install_on_accelerated_optimizer(optimizer, self.optimizer)
        elif isinstance(optimizer, GeoLoRAOptimizer):
            self.optimizer = self._check_s_update(optimizer)
        else:
            raise RuntimeError(
                f"GeoLoRACallback: unexpected optimizer type {type(optimizer).__name__}; expected the Trainer's "
                "accelerate-wrapped optimizer. Build one with geolora.create_geolora_optimizer(model, lr=...) and pass "
                "Trainer(optimizers=(optimizer, None))."
            )
        self.optimizer.num_steps = state.global_step
        if state.max_steps > 0:
            self.optimizer.num_training_steps = int(state.max_steps)  # what tau_warmup_ratio is a fraction of
        logger.info(
            "GeoLoRA: %d layers, s_update=%s, ranks %s",
            len(find_geolora_layers(inner_model)),
            self.optimizer.settings["s_update"],
            sorted(set(get_ranks(inner_model).values())),
        )

    def on_train_end(self, args, state, control, **kwargs):
        # an open augmentation interval is truncated, so the adapter saved after training holds judged ranks only
        if self.optimizer is not None and self.optimizer.finish_interval():
            logger.info("GeoLoRA: training ended inside an augmentation interval; it was truncated.")
        if self.optimizer is not None:
            self.optimizer.clear_probes()  # evaluation and inference after training: the live ranks only

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_ranks or logs is None or model is None:
            return
        stats = rank_statistics(model)
        if self.optimizer is not None:
            stats["geolora/skipped_steps"] = float(self.optimizer.skipped_steps)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


__all__ = ["GeoLoRACallback", "rank_statistics"]
