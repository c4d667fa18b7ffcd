"""geolora: GeoLoRA, a rank-adaptive low-rank adapter, as a PEFT method.

Importing this package registers ``GEOLORA`` with PEFT, so ``peft.get_peft_model(model, GeoLoRAConfig(...))``,
``PeftModel.from_pretrained``, the ``AutoPeftModel*`` classes and transformers' ``load_adapter`` work.
"""

from ._compat import register_geolora
from .callbacks import GeoLoRACallback, rank_statistics
from .config import GeoLoRAConfig
from .export import export_as_lora
from .layer import Conv2d, GeoLoRALayer, Linear, find_geolora_layers, unwrap_model
from .model import GeoLoRAModel, check_saved_adapter, get_ranks
from .optim import GeoLoRAOptimizer, create_geolora_optimizer, grow_capacity

register_geolora(GeoLoRAConfig, GeoLoRAModel, check_weights=check_saved_adapter)

__version__ = "0.1.0"

__all__ = [
    "GeoLoRAConfig",
    "GeoLoRAModel",
    "GeoLoRALayer",
    "Linear",
    "Conv2d",
    "find_geolora_layers",
    "unwrap_model",
    "get_ranks",
    "GeoLoRAOptimizer",
    "create_geolora_optimizer",
    "grow_capacity",
    "GeoLoRACallback",
    "rank_statistics",
    "export_as_lora",
]
