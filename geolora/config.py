"""GeoLoRAConfig: every knob of a GeoLoRA adapter and of its training step, validated."""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from ._compat import ensure_peft_type_member
from .io import atomic_write_bytes

S_UPDATES = ("adam", "adam_layer", "sgd")
SCALE_BY = ("r_max", "r")
BUDGET_TYPES = ("rank", "params")
DEFAULT_EXPLORE_RANK = 4  # probe directions per layer for new adapters (see GeoLoRAConfig.explore_rank)
BIAS_CHOICES = ("none", "all", "geolora_only")


def _fail(name: str, value, expected: str, exc: type[Exception] = ValueError):
    raise exc(f"GeoLoRAConfig.{name}={value!r} is invalid: {expected}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class GeoLoRAConfig(PeftConfig):
    """Configuration of a GeoLoRA adapter (Schotthöfer et al., "GeoLoRA: Geometric integration for parameter
    efficient fine-tuning", ICLR 2025).

    Each adapted weight is ``W0 + s * U S V^T`` with orthonormal ``U`` (out x r), ``V`` (in x r) and a small
    coefficient matrix ``S`` (r x r), ``s = lora_alpha / r_max``.  Every ``augment_every`` optimizer steps the bases
    are augmented with the gradient directions and ``S`` is truncated by SVD, so each layer finds its own rank in
    ``[r_min, r_max]``.

    Args:
        r (`int`): Initial rank of every adapted layer (unless `rank_pattern` says otherwise).
        r_max (`int`): Largest rank a layer may reach; the training capacity. Defaults to `2 * r`.
        r_min (`int`): Smallest rank a layer is truncated to.
        tau (`float`): Relative truncation tolerance in [0, 1): a layer keeps the fewest singular values whose
            discarded tail has norm <= tau * (norm of all singular values).
        tau_warmup_ratio (`float`): `tau` ramps linearly from 0 over this fraction of the training steps (default 0:
            no ramp; with the probe directions a layer grows without it); `tau_warmup_steps` (`int`) gives the ramp
            in steps instead.
        augment_every (`int`): Steps per augmentation interval (1 = the paper's Algorithm 1, every step).
        explore_rank (`int`): Random probe directions added to each layer's bases for every interval's augmentation
            (default 4; `augment_every` > 1), so a layer can grow toward gradient directions outside both of its
            current bases; 0 = GeoLoRA's augmentation alone.
        lora_alpha (`float`): Scaling numerator; `s = lora_alpha / r_max`, constant for the whole run.
        scale_by (`str`): `"r_max"` (default) or `"r"` (the initial rank; adapters saved before this field).
        lora_dropout (`float`): Dropout on the adapter input.
        s_update (`str`): How the coefficients are updated: `"sgd"` is the paper's Algorithm 1 exactly, `"adam"`
            is Adam on S with moments rotated into each new basis, `"adam_layer"` (default) the same with one second
            moment per layer (see `geolora.optim`).
        rank_budget (`int`): If set, a global budget replaces per-layer `tau` (the paper's budget variant).
    """

    r: int = field(
        default=8, metadata={"help": "Initial rank of every adapted layer (unless rank_pattern says otherwise)."}
    )
    r_max: Optional[int] = field(
        default=None,
        metadata={"help": "Largest rank a layer may reach during training (the capacity allocated). Default: 2 * r."},
    )
    r_min: int = field(default=1, metadata={"help": "Smallest rank a layer may be truncated to."})
    tau: float = field(
        default=0.1,
        metadata={
            "help": "Relative truncation tolerance in [0, 1). After each step a layer keeps the fewest singular values "
            "of its augmented coefficient matrix such that the discarded tail has norm <= tau * total norm. "
            "Larger tau gives smaller ranks. Rank growth is governed by lr * ||gradient|| versus tau * ||S||."
        },
    )
    lora_alpha: float = field(
        default=8,
        metadata={
            "help": "Scaling numerator: the update is scaled by s = lora_alpha / r_max (see scale_by), constant in "
            "training."
        },
    )
    scale_by: Optional[Literal["r_max", "r"]] = field(
        default=None,
        metadata={
            "help": "Denominator of the scale s = lora_alpha / (r_max or r). 'r_max' (the default for new adapters): "
            "the scale does not depend on the initial rank, which then only sets where each layer starts. 'r' "
            "(the initial rank, like LoRA): the rule of adapters saved before this field existed, which are loaded "
            "with it; it makes the effective step size depend on the initial rank."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability applied to the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (list: exact or suffix match) or a regex (str) of the modules to adapt; 'all-linear' "
            "selects every linear/Conv1D layer except the output layer. "
            "Default: PEFT's LoRA defaults for the model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules NOT to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (needs a list target_modules)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers (e.g. 'layers', 'h'); used with layers_to_transform."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapter layers to train and save in full, e.g. ['classifier']."},
    )
    bias: str = field(
        default="none",
        metadata={"help": "Which biases to train: 'none', 'all', or 'geolora_only' (biases of adapted layers)."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True if the base layer stores its weight as (in, out), like GPT-2's Conv1D (set automatically)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: S = 0, so the adapted model equals the base model at the start (U, V random orthonormal). "
            "False: S is a small random diagonal (for tests only)."
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module ranks {module name or regex: rank}. Written with the final per-layer ranks on save, "
            "and "
            "used on load to recreate every layer at exactly its saved rank."
        },
    )
    s_update: Literal["adam", "adam_layer", "sgd"] = field(
        default="adam_layer",
        metadata={
            "help": "Coefficient update. 'sgd': the paper's Algorithm 1 exactly (S <- S - lr * grad; needs a large "
            "lr). 'adam': Adam moments on S, rotated into each new basis after augmentation and truncation. "
            "'adam_layer': the same with one second moment per layer (the mean over its coefficients), so each "
            "coefficient moves in proportion to its momentum and the singular values rank directions by importance "
            "(per-entry Adam moves every coefficient by about lr per step, which flattens the spectrum)."
        },
    )
    adam_betas: tuple[float, float] = field(
        default=(0.9, 0.99), metadata={"help": "Adam betas of the 'adam' coefficient update."}
    )
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon of the 'adam' coefficient update."})
    rank_budget: Optional[int] = field(
        default=None,
        metadata={
            "help": "Global budget instead of per-layer tau: keep the largest singular values across all layers "
            "so that "
            "the total rank (budget_type='rank') or adapter parameter count (budget_type='params') stays within it."
        },
    )
    budget_type: Literal["rank", "params"] = field(
        default="rank",
        metadata={
            "help": "Unit of rank_budget: 'rank' (sum of ranks) or 'params' (adapter parameters kept and saved: "
            "k * (out + in + k) for a layer of rank k, i.e. U, V and the full k x k S)."
        },
    )
    augment_every: int = field(
        default=10,
        metadata={
            "help": "Steps per augmentation interval k. 1: the paper's Algorithm 1 (every step augments the bases "
            "with the gradient directions and truncates). k > 1: the first step of each interval augments (the rank "
            "grows to at most min(2r, r_max), nothing is discarded below the capacity), the next k - 2 steps update "
            "only the coefficients S with the augmented bases live in the forward, and the last step truncates by "
            "tau (or rank_budget): new directions get k steps to grow before they are judged. Each layer is "
            "truncated once per interval; the capacity stays r_max."
        },
    )
    explore_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Random probe directions per layer for every interval's augmentation (augment_every > 1; default "
            "4 for new adapters). The augmentation [U, G V] only finds gradient directions coupled to a current basis "
            "direction: once a layer fits the best approximation of its rank, the rest of the gradient lies outside "
            "both bases and the rank cannot grow. With explore_rank = p, the forward of the step whose gradient "
            "the augmentation reads uses p extra orthonormal random columns in U and in V (with zero coefficients, "
            "so the output is unchanged), the backward gives the gradient on them, and they enter the augmentation "
            "like the current bases: directions the task needs grow over the interval and pass the truncation, the "
            "others are cut. Costs p extra forward columns on one step per interval. 0 = GeoLoRA's augmentation "
            "alone (adapters saved before this field are loaded with 0)."
        },
    )
    tau_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Ramp tau linearly from 0 to its value over this fraction of the training steps (like the "
            "Trainer's warmup_ratio); 0 (the default) = no ramp. While tau is near 0 every layer may grow up to r_max; "
            "as tau rises the truncation removes what the task does not need. Before the probe directions "
            "(explore_rank) the ramp (0.25) was what let a layer started small grow; with them it is not needed, and "
            "on two real tasks adapters ended 2-33% smaller without it at the same accuracy. Needs the number of "
            "training steps: GeoLoRACallback takes it from the Trainer; in a custom loop pass num_training_steps to "
            "create_geolora_optimizer. Ignored when tau_warmup_steps is set. A rank_budget is not ramped."
        },
    )
    tau_warmup_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "The tau ramp in optimizer steps instead of a fraction (0 = no ramp); overrides tau_warmup_ratio."
        },
    )
    reorthonormalize_every: int = field(
        default=100,
        metadata={"help": "Re-orthonormalise U and V by QR every this many steps (0 = never); cheap, guards drift."},
    )
    sync_factors_every: int = field(
        default=0,
        metadata={
            "help": "Under torch.distributed, broadcast all factors from process 0 every this many steps (0 = never). "
            "Ranks are always decided on process 0 and broadcast every step."
        },
    )
    static_shapes: bool = field(
        default=False,
        metadata={
            "help": "Compute the forward over all r_max capacity columns (zeros beyond the rank) so torch.compile "
            "never recompiles when ranks change. Default False: slice to the live rank (faster in eager mode)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.scale_by is None:
            # A config read from adapter_config.json arrives with its peft_type set; one saved before scale_by existed
            # lacks the field and was trained with s = lora_alpha / r.  A new config (peft_type unset) gets r_max.
            self.scale_by = "r" if self.peft_type is not None else "r_max"
        if self.explore_rank is None:  # likewise: adapters saved before explore_rank trained without probes
            self.explore_rank = 0 if self.peft_type is not None else DEFAULT_EXPLORE_RANK
        self.peft_type = ensure_peft_type_member()
        self._validate()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)

    def _validate(self) -> None:
        if not _is_int(self.r):
            _fail("r", self.r, "expected a positive int", TypeError)
        if self.r <= 0:
            _fail("r", self.r, "must be > 0")
        if self.r_max is None:
            self.r_max = 2 * self.r
        if not _is_int(self.r_max):
            _fail("r_max", self.r_max, "expected a positive int or None", TypeError)
        if self.r_max <= 0:
            _fail("r_max", self.r_max, "must be > 0")
        if not _is_int(self.r_min):
            _fail("r_min", self.r_min, "expected a positive int", TypeError)
        if self.r_min <= 0:
            _fail("r_min", self.r_min, "must be >= 1")
        if self.r_min > self.r:
            _fail("r_min", self.r_min, f"must be <= r (r={self.r})")
        if self.r > self.r_max:
            _fail("r", self.r, f"must be <= r_max (r_max={self.r_max})")
        if not _is_real(self.tau):
            _fail("tau", self.tau, "expected a float in [0, 1)", TypeError)
        if not (0.0 <= self.tau < 1.0) or math.isnan(self.tau):
            _fail("tau", self.tau, "must be in [0, 1)")
        if not _is_real(self.lora_alpha):
            _fail("lora_alpha", self.lora_alpha, "expected a number", TypeError)
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "must be a finite number > 0")
        if not _is_real(self.lora_dropout):
            _fail("lora_dropout", self.lora_dropout, "expected a float in [0, 1)", TypeError)
        if not (0.0 <= self.lora_dropout < 1.0):
            _fail("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.bias not in BIAS_CHOICES:
            _fail("bias", self.bias, f"must be one of {BIAS_CHOICES}")
        for name in ("fan_in_fan_out", "init_weights", "static_shapes"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected a bool", TypeError)
        if self.scale_by not in SCALE_BY:
            _fail("scale_by", self.scale_by, f"must be one of {SCALE_BY}")
        if self.s_update not in S_UPDATES:
            _fail("s_update", self.s_update, f"must be one of {S_UPDATES}")
        betas = self.adam_betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            _fail("adam_betas", betas, "expected two floats in [0, 1)")
        if not _is_real(self.adam_eps) or not (self.adam_eps > 0):
            _fail("adam_eps", self.adam_eps, "must be a float > 0")
        if self.rank_budget is not None:
            if not _is_int(self.rank_budget):
                _fail("rank_budget", self.rank_budget, "expected a positive int or None", TypeError)
            if self.rank_budget <= 0:
                _fail("rank_budget", self.rank_budget, "must be > 0")
        if self.budget_type not in BUDGET_TYPES:
            _fail("budget_type", self.budget_type, f"must be one of {BUDGET_TYPES}")
        for name in ("reorthonormalize_every", "sync_factors_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(name, value, "expected an int >= 0")
        if not _is_real(self.tau_warmup_ratio) or not (0.0 <= self.tau_warmup_ratio <= 1.0):
            _fail("tau_warmup_ratio", self.tau_warmup_ratio, "expected a float in [0, 1] (0 = no ramp)")
        if self.tau_warmup_steps is not None and (not _is_int(self.tau_warmup_steps) or self.tau_warmup_steps < 0):
            _fail("tau_warmup_steps", self.tau_warmup_steps, "expected an int >= 0 (0 = no ramp) or None")
        if not _is_int(self.augment_every) or self.augment_every < 1:
            _fail("augment_every", self.augment_every, "expected an int >= 1 (1 = Algorithm 1, every step)")
        if not _is_int(self.explore_rank) or self.explore_rank < 0:
            _fail("explore_rank", self.explore_rank, "expected an int >= 0 (0 = no probe directions)")
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if not isinstance(self.rank_pattern, dict):
            _fail("rank_pattern", self.rank_pattern, "expected a dict {module name: rank}", TypeError)
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str):
                _fail("rank_pattern", key, "keys must be module names (str)", TypeError)
            if not _is_int(value) or not (1 <= value <= self.r_max):
                _fail(f"rank_pattern[{key!r}]", value, f"ranks must be ints in [1, r_max={self.r_max}]")
        if self.layers_pattern and self.layers_to_transform is None:
            _fail("layers_pattern", self.layers_pattern, "needs layers_to_transform to be set as well")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            _fail("layers_to_transform", self.layers_to_transform, "cannot be used when target_modules is a regex str")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, set, tuple)):
            _fail("target_modules", self.target_modules, "expected a list of names or a regex str", TypeError)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, (str, list, set, tuple)):
            _fail("exclude_modules", self.exclude_modules, "expected a list of names or a regex str", TypeError)
        ltt = self.layers_to_transform
        if ltt is not None and not (_is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(_is_int(i) for i in ltt))):
            _fail("layers_to_transform", ltt, "expected a layer index (int) or a list of them", TypeError)
        lp = self.layers_pattern
        str_list = isinstance(lp, (list, tuple)) and all(isinstance(i, str) for i in lp)
        if lp is not None and not (isinstance(lp, str) or str_list):
            _fail("layers_pattern", lp, "expected a str or a list of str", TypeError)
        if not isinstance(self.inference_mode, bool):
            _fail("inference_mode", self.inference_mode, "expected a bool", TypeError)
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple, set)):
            _fail("modules_to_save", self.modules_to_save, "expected a list of module names", TypeError)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)) and not all(isinstance(v, str) for v in value):
                _fail(name, value, "expected module names (str)", TypeError)

    def to_dict(self) -> dict:
        """The config as a dict, as adapter_config.json holds it: ``adam_betas`` is a list there (JSON has no
        tuples), so it is a list here too; the config itself keeps the tuple."""
        out = super().to_dict()
        out["adam_betas"] = list(out["adam_betas"])
        return out

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's ``save_pretrained``, written atomically: PEFT writes the JSON into a temporary folder inside
        ``save_directory``, and its bytes go to ``adapter_config.json`` through :func:`geolora.io.atomic_write_bytes`,
        so a killed save never leaves a half-written config (the previous one or the new one stays)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".adapter_config.", dir=save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)
            with open(os.path.join(tmp, CONFIG_NAME), "rb") as f:
                data = f.read()
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), data)

    @property
    def scaling(self) -> float:
        """``s = lora_alpha / r_max`` (``scale_by="r_max"``) or ``lora_alpha / r`` (``"r"``, the initial rank);
        constant during training: a truncation never changes it."""
        return self.lora_alpha / (self.r_max if self.scale_by == "r_max" else self.r)
