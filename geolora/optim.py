"""The GeoLoRA training step for any loop: an optimizer wrapper.

``GeoLoRAOptimizer.step()``:

1. takes the GeoLoRA directions out of ``U.grad``, ``S.grad``, ``V.grad`` (see :mod:`geolora.layer`), so the wrapped
   optimizer never touches the bases (no momentum, no weight decay on U, V: torch optimizers skip params whose
   ``.grad`` is None);
2. checks every gradient for inf/NaN; computes, batched over layers of the same shape, the augmentation (QR),
   the augmented coefficients and their SVD; decides every layer's new rank with ONE host synchronisation (under
   torch.distributed the ranks of process 0 are used by all, and a non-finite gradient on any process skips the
   step on all);
3. if anything was non-finite: skips the whole step (factors and the other parameters untouched) and logs a
   rate-limited warning; else runs the wrapped optimizer on the other trainables (heads, biases) and writes the
   truncated factors: each layer is augmented and truncated exactly once.

The math of the step (augmentation, the SGD and Adam coefficient updates, truncation, the budget, the rotation of
the Adam moments) is :mod:`geolora.integrator`; what is shared across processes is :mod:`geolora.distributed`.  This
module orchestrates: it stacks the layers, calls the integrator, agrees on the outcome and writes the results.

λ (the step size of the factors) is the current ``lr`` of the param group holding the layer's ``S``, as moved by any
lr scheduler.  A custom loop::

    import geolora, peft, torch
    model = peft.get_peft_model(base_model, geolora.GeoLoRAConfig(r=8, target_modules=["query", "value"]))
    opt = geolora.create_geolora_optimizer(model, lr=1e-3)          # grows capacity, wraps AdamW
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=1000)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step(); sched.step(); opt.zero_grad()                    # one GeoLoRA step per optimizer step
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.profiler import record_function

from . import integrator as I
from .config import GeoLoRAConfig
from .distributed import agree_across_processes, broadcast_factors, check_not_fsdp, copy_into_shard, is_sharded
from .layer import GeoLoRALayer, find_geolora_layers, unwrap_model

__all__ = ["NEVER_TRAINED_STEPS", "GeoLoRAOptimizer", "create_geolora_optimizer", "grow_capacity", "trainable_adapter"]

logger = logging.getLogger(__name__)

# After this many optimizer steps with λ > 0, a GeoLoRA adapter whose coefficients are all still exactly 0 has not
# trained (the step reads λ = 0, or no gradient reaches the adapter): warn once.
NEVER_TRAINED_STEPS = 10


@dataclass
class _LayerGroup:
    """Layers with the same (out, in, capacity, dtype, device): their step is batched."""

    names: list[str]
    layers: list[GeoLoRALayer]
    U: list[nn.Parameter]
    S: list[nn.Parameter]
    V: list[nn.Parameter]
    rank_buffers: list[torch.Tensor]
    r_min: int
    r_max: int
    cap: int
    cost: int  # parameters per unit of rank (for a parameter budget)
    # indices into ``param_groups`` of the groups holding the layers' S (for λ and weight decay): one index when all
    # share it (the usual case).  Indices, not the dicts: ``Optimizer.load_state_dict`` (which accelerate's
    # ``AcceleratedOptimizer`` calls when it wraps an optimizer, and the Trainer on resume) replaces every param-group
    # dict, so a cached dict would keep reading the lr of the moment it was cached while the scheduler moves the new.
    owners: list[int] | None = None


class _Probes(NamedTuple):
    """A group's probe directions for the forward of an augmentation step (see ``_refresh_probes``)."""

    U: torch.Tensor  # (B, m, c) orthonormal columns r .. r + p' - 1 orthogonal to U_r, zero elsewhere
    V: torch.Tensor  # (B, n, c) the same for V
    ranks: torch.Tensor  # (B,) int64 widened ranks r + p'


class _Decomposition(NamedTuple):
    """The SVD of a group's new coefficients ``Ub.basis @ (P diag(sigma) Qh) @ Vb.basis^T``: what a truncation
    needs."""

    Ub: I.AugmentedBasis  # (B, m, kU) the left basis the coefficients are in (augmented, or fixed in an interval)
    Vb: I.AugmentedBasis  # (B, n, kV) the right basis
    P: torch.Tensor  # (B, kU, k) left singular vectors
    sigma: torch.Tensor  # (B, k) singular values, non-increasing
    Qh: torch.Tensor  # (B, k, kV) right singular vectors, transposed


class _GroupWork(NamedTuple):
    """One group's step as computed before the ranks are agreed across processes and the results written.

    Exactly one of ``decomposition`` (the step truncates) and ``coefficients`` (a coefficient step inside an interval:
    bases and ranks unchanged) is set."""

    ranks: torch.Tensor  # (B,) int64: the new ranks by tau (the budget's replace them), or the unchanged ranks
    nonfinite: torch.Tensor  # 0-dim bool: the new coefficients have an inf/NaN (the whole step is then skipped)
    moments: Optional[I.Moments]  # the updated Adam moments, in the coordinates of the new coefficients; None: sgd
    decomposition: Optional[_Decomposition] = None
    coefficients: Optional[torch.Tensor] = None  # (B, ρ, ρ) the new S


def _geolora_config(model: nn.Module, adapter_name: str):
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict) and adapter_name in cfg and isinstance(cfg[adapter_name], GeoLoRAConfig):
        return cfg[adapter_name]
    for module in model.modules():
        cfg = getattr(module, "peft_config", None)
        if isinstance(cfg, dict) and isinstance(cfg.get(adapter_name), GeoLoRAConfig):
            return cfg[adapter_name]
    return None


def trainable_adapter(layers: list[tuple[str, GeoLoRALayer]]) -> str:
    """The single adapter whose factors require grad; clear errors for none or several."""
    names = set()
    for _, layer in layers:
        for adapter, p in layer.geolora_S.items():
            if p.requires_grad:
                names.add(adapter)
    if not names:
        raise ValueError(
            "No trainable GeoLoRA factors found: the GeoLoRA adapter is frozen (inference mode?). Load it with "
            "is_trainable=True or call model.set_adapter(name)."
        )
    if len(names) > 1:
        raise ValueError(
            f"Several GeoLoRA adapters are trainable at once ({sorted(names)}); GeoLoRA trains one adapter at a "
            "time. Freeze the others, e.g. model.set_adapter('name')."
        )
    return names.pop()


def grow_capacity(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Zero-pad every GeoLoRA layer to ``r_max`` columns (new Parameter objects).  Call before building an optimizer
    or a DDP wrapper (it creates new Parameter objects); create_geolora_optimizer and GeoLoRACallback do it for you."""
    layers = find_geolora_layers(unwrap_model(model))
    adapter_name = adapter_name or trainable_adapter(layers)
    for name, layer in layers:
        if adapter_name in layer.geolora_U:
            if is_sharded(layer.geolora_U[adapter_name]):
                if layer.capacity(adapter_name) < layer.r_max[adapter_name]:
                    raise RuntimeError(
                        f"GeoLoRA layer '{name}' is sharded by FSDP2 at capacity {layer.capacity(adapter_name)} < "
                        f"r_max {layer.r_max[adapter_name]}: call geolora.grow_capacity(model) before fully_shard "
                        "(GeoLoRACallback does it in Trainer.__init__, before the Trainer shards the model)."
                    )
                continue
            layer.sync_rank_mirror(layer)
            layer.grow_capacity(adapter_name)


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer: it steps the non-GeoLoRA trainables, then augments and truncates every GeoLoRA layer
    once.  ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's (GeoLoRA's
    own state, the Adam moments of S, lives in ``state[S]`` of the first layer of each group of same-shape layers,
    stacked ``(B, c, c)`` under ``geolora_*`` keys, so checkpoints round-trip through any code that saves the
    optimizer).

    ``runs_geolora_step`` (class attribute, True) marks an optimizer that runs GeoLoRA's step: the layers' guard
    against plain optimizers (:mod:`geolora.layer`) looks for it on an optimizer and on the optimizers it wraps,
    without importing this module.

    Args:
        base_optimizer: a torch optimizer whose param groups contain the GeoLoRA factors (and any other trainables).
        model: the model holding the GeoLoRA layers (PeftModel, or any module with layers injected).
        s_update: ``"sgd"`` (Algorithm 1 exactly), ``"adam"`` or ``"adam_layer"``; default: the adapter config's.
        num_training_steps: the run's total optimizer steps, which ``tau_warmup_ratio`` is a fraction of (settable
            later as the attribute of that name; ``GeoLoRACallback`` sets it from the Trainer).
        tau, rank_budget, budget_type, reorthonormalize_every, sync_factors_every, adam_betas, adam_eps,
            augment_every, explore_rank, tau_warmup_ratio, tau_warmup_steps: default to the adapter config's values.
    """

    runs_geolora_step = True

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        s_update: Optional[str] = None,
        adapter_name: Optional[str] = None,
        num_training_steps: Optional[int] = None,
        **overrides: Any,
    ) -> None:
        if isinstance(base_optimizer, GeoLoRAOptimizer):
            raise ValueError("base_optimizer is already a GeoLoRAOptimizer")
        self.base_optimizer = base_optimizer
        model = unwrap_model(model)
        check_not_fsdp(model)
        layers = find_geolora_layers(model)
        if not layers:
            raise ValueError(
                "The model has no GeoLoRA layers. Create it with peft.get_peft_model(model, GeoLoRAConfig(...)) "
                "(after `import geolora`) or model.add_adapter(GeoLoRAConfig(...))."
            )
        self.adapter_name = adapter_name or trainable_adapter(layers)
        cfg = _geolora_config(model, self.adapter_name)
        from_config = cfg
        if cfg is None:
            cfg = GeoLoRAConfig()
            logger.warning("No GeoLoRAConfig found on the model; using default step settings.")
        settings = {
            "s_update": s_update or cfg.s_update,
            "tau": cfg.tau,
            "rank_budget": cfg.rank_budget,
            "budget_type": cfg.budget_type,
            "reorthonormalize_every": cfg.reorthonormalize_every,
            "sync_factors_every": cfg.sync_factors_every,
            "adam_betas": tuple(cfg.adam_betas),
            "adam_eps": cfg.adam_eps,
            "augment_every": cfg.augment_every,
            "explore_rank": cfg.explore_rank,
            "tau_warmup_ratio": getattr(cfg, "tau_warmup_ratio", 0.0),
            "tau_warmup_steps": getattr(cfg, "tau_warmup_steps", None),
        }
        unknown = set(overrides) - set(settings)
        if unknown:
            raise TypeError(f"Unknown GeoLoRAOptimizer arguments: {sorted(unknown)}")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        probe = GeoLoRAConfig(
            r=1,
            tau=settings["tau"],
            s_update=settings["s_update"],
            rank_budget=settings["rank_budget"],
            budget_type=settings["budget_type"],
            adam_betas=settings["adam_betas"],
            adam_eps=settings["adam_eps"],
            reorthonormalize_every=settings["reorthonormalize_every"],
            sync_factors_every=settings["sync_factors_every"],
            augment_every=settings["augment_every"],
            explore_rank=settings["explore_rank"],
            tau_warmup_ratio=settings["tau_warmup_ratio"],
            tau_warmup_steps=settings["tau_warmup_steps"],
        )  # validates the overrides with the config's messages
        del probe
        self.settings = settings
        if from_config is not None:
            # the config is what adapter_config.json records: write the values this run really trains with back
            # into it, so an adapter trained with an override is never saved as if trained with the default
            changed = {k: v for k, v in settings.items() if getattr(from_config, k) != v}
            for key, value in changed.items():
                setattr(from_config, key, value)
            if changed:
                logger.info("GeoLoRA: overrides written into the adapter config (saved with it): %s", changed)
        self._groups = self._build_groups(layers)
        self._sharded = any(is_sharded(p) for g in self._groups for p in (*g.U, *g.S, *g.V))
        self._alias: dict[int, nn.Parameter] = {}  # during a gathered step: id(full copy) -> the sharded parameter
        self._param_to_group = self._map_param_groups()
        self._s_group_indices = sorted({self._param_to_group[id(p)] for g in self._groups for p in g.S})
        self.num_steps = 0
        self.skipped_steps = 0
        self.truncations = 0
        self._last_warn = -math.inf
        self._suppressed = 0
        self._num_training_steps: Optional[int] = None
        self.num_training_steps = num_training_steps
        self._warned_no_total = False
        self._interval_offset = 0  # shifts the interval so that the step after finish_interval() augments
        self._positive_lr_steps = 0  # steps taken with λ > 0, for the "adapter never trained" guard
        self._guard_done = False
        self.last_ranks: dict[str, int] = {}
        self._probes: list[Optional[_Probes]] = [None] * len(self._groups)  # per group, for the next forward
        self._zero_probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # static_shapes: per group, when off
        # torch.optim.Optimizer's hook machinery (register_step_pre_hook / post hooks, state-dict hooks), without
        # Optimizer.__init__, whose param_groups/state/defaults assignments would overwrite the wrapped optimizer's
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        with torch.no_grad(), self._full_factors():
            self._refresh_probes()

    # --- delegate the Optimizer interface to the wrapped optimizer (like accelerate's AcceleratedOptimizer) ---
    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base_optimizer.param_groups = value

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, value):
        self.base_optimizer.state = value

    @property
    def defaults(self):
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.base_optimizer.defaults = value

    def add_param_group(self, param_group):
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.base_optimizer.state_dict()
        counters = {
            "num_steps": self.num_steps,
            "skipped_steps": self.skipped_steps,
            "positive_lr_steps": self._positive_lr_steps,
            "interval_offset": self._interval_offset,
            "num_training_steps": self._num_training_steps,
        }
        sd["geolora"] = counters
        # also in the param group of the first S: torch.distributed.checkpoint's optimizer state dict (FSDP2) keeps
        # only "state" and "param_groups", and param groups keep their extra keys through every loader
        if self._s_group_indices:
            sd["param_groups"][self._s_group_indices[0]]["geolora"] = dict(counters)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict):
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        extra = state_dict.pop("geolora", None)
        if extra is None:
            extra = next((pg["geolora"] for pg in state_dict.get("param_groups", []) if "geolora" in pg), None)
        self.base_optimizer.load_state_dict(state_dict)
        if extra:
            self.num_steps = int(extra.get("num_steps", 0))
            self.skipped_steps = int(extra.get("skipped_steps", 0))
            self._positive_lr_steps = int(extra.get("positive_lr_steps", self.num_steps))
            self._guard_done = self._positive_lr_steps > NEVER_TRAINED_STEPS
            self._interval_offset = int(extra.get("interval_offset", 0))
            if extra.get("num_training_steps") is not None and self._num_training_steps is None:
                self._num_training_steps = int(extra["num_training_steps"])
        with torch.no_grad(), self._full_factors():
            self._refresh_probes()  # a function of the factors and the step count: as in the uninterrupted run
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self):
        return f"GeoLoRAOptimizer(s_update={self.settings['s_update']!r}, base={self.base_optimizer!r})"

    # --- setup ---
    def _build_groups(self, layers) -> list[_LayerGroup]:
        buckets: dict[tuple, _LayerGroup] = {}
        for name, layer in layers:
            a = self.adapter_name
            if a not in layer.geolora_U:
                continue
            U, S, V = layer.geolora_U[a], layer.geolora_S[a], layer.geolora_V[a]
            if layer.capacity(a) < layer.r_max[a]:
                raise RuntimeError(
                    f"GeoLoRA layer '{name}' has capacity {layer.capacity(a)} < r_max {layer.r_max[a]}: call "
                    "geolora.grow_capacity(model) before building the optimizer (create_geolora_optimizer does it)."
                )
            key = (U.shape[0], V.shape[0], U.shape[1], U.dtype, U.device, layer.r_min[a], layer.r_max[a])
            group = buckets.get(key)
            if group is None:
                group = buckets[key] = _LayerGroup(
                    [], [], [], [], [], [], layer.r_min[a], layer.r_max[a], U.shape[1], U.shape[0] + V.shape[0] + 1
                )
            group.names.append(name)
            group.layers.append(layer)
            group.U.append(U)
            group.S.append(S)
            group.V.append(V)
            group.rank_buffers.append(layer.geolora_rank[a])
        return list(buckets.values())

    def _map_param_groups(self) -> dict[int, int]:
        """id(parameter) -> index of its param group (indices stay valid across ``load_state_dict``)."""
        owner = {}
        for index, pg in enumerate(self.base_optimizer.param_groups):
            for p in pg["params"]:
                owner[id(p)] = index
        for g in self._groups:
            for name, p in zip(g.names, g.S):
                if id(p) not in owner:
                    raise ValueError(
                        f"The optimizer does not hold the GeoLoRA factors of '{name}'. Build it over all trainable "
                        "parameters (e.g. geolora.create_geolora_optimizer(model, lr=...)); GeoLoRA reads the "
                        "learning rate of their param group and keeps the optimizer's own update off U and V."
                    )
        return owner

    def geolora_parameters(self) -> list[nn.Parameter]:
        return [p for g in self._groups for p in (*g.U, *g.S, *g.V)]

    # --- the step ---
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._full_factors():
            self._geolora_step()
        if self._sharded:
            self._ensure_checkpoint_state()
        return loss

    def _ensure_checkpoint_state(self) -> None:
        """FSDP2: a step counter in the optimizer state of every factor. torch.distributed.checkpoint (the
        Trainer's FSDP2 checkpoints, or dcp in a custom loop) requires state for every trainable parameter; the
        wrapped optimizer never steps the factors, and GeoLoRA keeps its S moments on the first S of each layer group.
        Added after each step, not when the optimizer is built: dcp fills a fresh optimizer's state with one
        zero-gradient, lr-0 step only when that state is empty, and the structure it creates then (the wrapped
        optimizer's state, GeoLoRA's moments, these counters) is what a checkpoint holds."""
        state = self.base_optimizer.state
        for g in self._groups:
            for p in (*g.U, *g.S, *g.V):
                if "step" not in state[p]:
                    state[p]["step"] = torch.zeros((), dtype=torch.float32)

    @contextmanager
    def _full_factors(self):
        """FSDP2: run the step on full copies of the sharded factors, then keep each process's shard.

        ``fully_shard`` stores U, S, V as row-sharded DTensors and reduce-scatters (averages) their gradients. The
        step needs whole factors (QR, SVD, the rank decision), so each factor and its gradient are all-gathered, the
        step runs on the full copies exactly as without FSDP (ranks decided on process 0 and shared), and every
        process writes back its own rows. Each element has one owner, so the processes cannot disagree; what is
        gathered is the adapter, r_max * (out + in + r_max) values per layer, never the base weights. Without
        sharded factors this does nothing."""
        if not self._sharded:
            yield
            return
        state = self.base_optimizer.state
        real_lists = [(g.U, g.S, g.V) for g in self._groups]
        real_grads = []
        for g in self._groups:
            for attr in ("U", "S", "V"):
                fulls = []
                for p in getattr(g, attr):
                    full = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
                    full.grad = None if p.grad is None else p.grad.full_tensor()
                    real_grads.append((p, p.grad))
                    p.grad = None  # the wrapped optimizer must skip the factors
                    self._alias[id(full)] = p
                    self._param_to_group[id(full)] = self._param_to_group[id(p)]
                    if p in state:
                        state[full] = state[p]  # the same dict: the S moments are read and written through it
                    fulls.append(full)
                setattr(g, attr, fulls)
        try:
            yield
        finally:
            for g, (U, S, V) in zip(self._groups, real_lists):
                for reals, fulls in ((U, g.U), (S, g.S), (V, g.V)):
                    for p, full in zip(reals, fulls):
                        if full in state:
                            state[p] = state.pop(full)
                        copy_into_shard(p, full)
                        self._param_to_group.pop(id(full), None)
                g.U, g.S, g.V = U, S, V
            for p, grad in real_grads:
                p.grad = grad
            self._alias.clear()

    def _stash_grads(self):
        """Take the GeoLoRA directions out of ``.grad`` (so the wrapped optimizer skips U, S, V)."""
        stash = []
        for g in self._groups:
            entry = ([p.grad for p in g.U], [p.grad for p in g.S], [p.grad for p in g.V])
            for plist in (g.U, g.S, g.V):
                for p in plist:
                    p.grad = None
            stash.append(entry)
        return stash

    def _restore_grads(self, stash):
        for g, entry in zip(self._groups, stash):
            for plist, grads in zip((g.U, g.S, g.V), entry):
                for p, gr in zip(plist, grads):
                    p.grad = gr

    def _geolora_step(self) -> None:
        # Host synchronisations: exactly one per step (``flat.tolist()`` below).  Everything else stays on the
        # device: ranks come from the rank buffers, λ from host floats, the new ranks' width from the host mirror.
        st = self.settings
        with record_function("geolora::check_finite"):
            stash = self._stash_grads()
            # every gradient the step reads or the wrapped optimizer will apply
            pgs = self.base_optimizer.param_groups
            other_grads = [p.grad for pg in pgs for p in pg["params"] if p.grad is not None]
            geo_grads = [gr for entry in stash for grads in entry for gr in grads if gr is not None]
            all_grads = other_grads + geo_grads
            if self._sharded:  # FSDP2: sharded trainables' gradients are checked shard by shard (flags are shared)
                all_grads = [gr.to_local() if is_sharded(gr) else gr for gr in all_grads]
            device = self._groups[0].U[0].device if self._groups else None
            if all_grads:
                norms = torch._foreach_norm(all_grads)
                nonfinite = ~torch.isfinite(torch.stack([n.to(device) for n in norms])).all()
            else:
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)

        phase = self.phase
        work: list[_GroupWork] = []
        for g, (gU, gS, gV), probe in zip(self._groups, stash, self._probes):
            if phase in ("step", "augment"):
                work.append(self._augment_group(g, gU, gS, gV, augment_only=phase == "augment", probe=probe))
            else:
                work.append(self._coefficient_group(g, gS, truncate=phase == "truncate"))

        with record_function("geolora::rank_decision"):
            for w in work:
                nonfinite = nonfinite | w.nonfinite
            ranks_local = [w.ranks for w in work]
            if st["rank_budget"] is not None and work and phase in ("step", "truncate"):
                ranks_local = self._budget_ranks(work, device)
            sizes = [len(g.layers) for g in self._groups]
            pieces = [nonfinite.to(torch.int64).view(1)] + [r.to(torch.int64) for r in ranks_local]
            check_guard = not self._guard_done and self._positive_lr_steps >= NEVER_TRAINED_STEPS
            if check_guard:  # rides on the same host read: 1 if every S is still exactly zero
                pieces.append(self._all_coefficients_zero(device).view(1))
            flat = agree_across_processes(torch.cat(pieces))
            host = flat.tolist()  # the one host synchronisation of the step
        if check_guard:
            self._guard_done = True
            self._warn_if_never_trained(bool(host[-1]))
        if host[0]:
            self._restore_grads(stash)
            self._on_skip()
            self._refresh_probes()
            return
        agreed = torch.split(flat[1 : 1 + sum(sizes)], sizes)
        if any(float(pgs[i]["lr"]) > 0 for i in self._s_group_indices):
            self._positive_lr_steps += 1
        with record_function("geolora::wrapped_step"):
            self.base_optimizer.step()
        # re-orthonormalise on a step that rewrites the bases: every reorthonormalize_every-th step (Algorithm 1), or
        # the truncation that closes an interval containing such a step (a function of the step count alone, so a
        # resumed run re-orthonormalises where the uninterrupted one does)
        every, n = st["reorthonormalize_every"], self.num_steps + 1
        span = 1 if phase == "step" else st["augment_every"]
        do_reortho = bool(every) and phase in ("step", "truncate") and n // every > (n - span) // every
        with record_function("geolora::write"):
            self._write_all(work, agreed, host[1:], do_reortho, truncating=phase in ("step", "truncate"))
        self.num_steps += 1
        if st["sync_factors_every"] and self.num_steps % st["sync_factors_every"] == 0:
            buffers = [b for g in self._groups for b in g.rank_buffers]
            broadcast_factors(self.geolora_parameters(), buffers)
            layers = [layer for g in self._groups for layer in g.layers]
            for layer, k in zip(layers, torch.stack(buffers).tolist()):  # one sync, only on broadcast steps
                layer.r[self.adapter_name] = k
        self._refresh_probes()
        self._restore_grads(stash)

    @property
    def phase(self) -> str:
        """What the next ``step()`` does: ``"step"`` (``augment_every=1``: Algorithm 1, augment and truncate), or,
        within an interval of ``augment_every = k > 1`` steps, ``"augment"`` (first step), ``"coefficients"`` (the
        steps in between) and ``"truncate"`` (last step).  Counted over every call of ``step()``, skipped ones
        included, so the phase follows the Trainer's ``global_step`` and a resumed run continues mid-interval."""
        k = self.settings["augment_every"]
        if k == 1:
            return "step"
        position = self._interval_position()
        return "augment" if position == 0 else "truncate" if position == k - 1 else "coefficients"

    def _all_coefficients_zero(self, device) -> torch.Tensor:
        """0-dim int64 on the device: 1 if every layer's S is exactly zero (no host synchronisation)."""
        if not self._groups:
            return torch.zeros((), dtype=torch.int64, device=device)
        peaks = torch.stack([torch.stack(g.S).abs().amax().to(device) for g in self._groups])
        return (peaks.amax() == 0).to(torch.int64)

    def _warn_if_never_trained(self, all_zero: bool) -> None:
        """The guard: after ``NEVER_TRAINED_STEPS`` steps with λ > 0, S still exactly 0 or orphaned factors."""
        a = self.adapter_name
        orphaned = [
            name
            for g in self._groups
            for name, layer, S in zip(g.names, g.layers, g.S)
            if a in layer.geolora_S and layer.geolora_S[a] is not self._alias.get(id(S), S)
        ]
        if orphaned:
            warnings.warn(
                f"GeoLoRA: this optimizer updates factors that are no longer the model's (e.g. '{orphaned[0]}', "
                f"{len(orphaned)} layers): the model's GeoLoRA parameters were replaced after the optimizer was built "
                "(capacity grown, adapter reloaded, model copied), so the adapter does not train. Build the optimizer "
                "(geolora.create_geolora_optimizer) after the last change to the model.",
                UserWarning,
                stacklevel=3,
            )
        elif all_zero:
            warnings.warn(
                f"GeoLoRA: after {self._positive_lr_steps} optimizer steps with a learning rate above 0, the "
                "coefficients S of every GeoLoRA layer are still exactly 0: the adapter is not training. Likely "
                "causes: no gradient reaches the adapter (the loss does not depend on it, or its factors were frozen), "
                "or the step reads a learning rate of 0 (the param group holding the GeoLoRA factors). Check that "
                "the optimizer is geolora.create_geolora_optimizer(model, lr=...) or that GeoLoRACallback is among the "
                "Trainer's callbacks.",
                UserWarning,
                stacklevel=3,
            )

    def _on_skip(self) -> None:
        self.skipped_steps += 1
        now = time.monotonic()
        if now - self._last_warn >= 10.0:
            extra = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            logger.warning(
                "GeoLoRA: inf/NaN gradient at step %d; the whole optimizer step was skipped and the factors are "
                "unchanged (%d skipped so far)%s.",
                self.num_steps,
                self.skipped_steps,
                extra,
            )
            self._last_warn = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def _lrs(self, g: _LayerGroup, device, dtype) -> tuple[Any, Any]:
        """λ and weight decay of the group's layers: Python floats when one param group holds all their S (no
        device tensor, no host-to-device copy), else (B, 1, 1) tensors."""
        if g.owners is None:
            g.owners = [self._param_to_group[id(p)] for p in g.S]
            if all(i == g.owners[0] for i in g.owners):
                g.owners = g.owners[:1]
        pgs = self.base_optimizer.param_groups  # read every step: the scheduler moves these very dicts
        if len(g.owners) == 1:
            pg = pgs[g.owners[0]]
            return float(pg["lr"]), float(pg.get("weight_decay", 0.0))
        owners = [pgs[i] for i in g.owners]
        vals = torch.tensor([[float(pg["lr"]), float(pg.get("weight_decay", 0.0))] for pg in owners], dtype=dtype)
        if device.type == "cuda":
            vals = vals.pin_memory().to(device, non_blocking=True)  # no stream synchronisation
        else:
            vals = vals.to(device)
        return vals[:, 0, None, None], vals[:, 1, None, None]

    def _augment_group(
        self, g: _LayerGroup, gU, gS, gV, augment_only: bool = False, probe: Optional[_Probes] = None
    ) -> _GroupWork:
        """QR of the augmented bases, the augmented coefficients and their SVD for one group.

        Works at width ``ρ`` = the largest live rank in the group (host mirror, no sync) instead of the capacity:
        columns beyond a layer's rank are zero and the augmented matrix has rank <= 2r, so the QR (m x 2ρ instead of
        m x 2c) and the SVD (2ρ x 2ρ instead of 2c x 2c) give the same step at a fraction of the cost.

        With probe directions (``explore_rank``; set by :meth:`_refresh_probes` for the forward of this step), the
        step starts from the widened bases ``[U_r, probes]``, ``[V_r, probes]`` at rank ``r + p`` with zero
        coefficients on the probes (the same adapter): the gradient on them is in ``gU``, ``gS``, ``gV`` already, so
        this is GeoLoRA's augmentation of that point.  Adam treats the probe coefficients as new (no history)."""
        st = self.settings
        a = self.adapter_name
        history = None
        with record_function("geolora::stack"):
            # one stack per factor (under no_grad, no per-layer detach/slice ops), then one slice to the width ρ
            U = torch.stack(g.U)  # (B, m, c)
            V = torch.stack(g.V)  # (B, n, c)
            ranks = torch.stack(g.rank_buffers).to(device=U.device, dtype=torch.int64)  # (B,) no host copy
            if probe is None:
                rho = max(layer.r[a] for layer in g.layers)
            else:
                U, V = U + probe.U.to(U.dtype), V + probe.V.to(V.dtype)
                history, ranks = ranks, probe.ranks
                rho = max(layer.geolora_probe[a][2] for layer in g.layers)
            U, V = U[..., :rho], V[..., :rho]  # (B, m, ρ), (B, n, ρ)
            S = torch.stack(g.S)[..., :rho, :rho]  # (B, ρ, ρ)
            K = torch.stack(_or_zeros(gU, g.U))[..., :rho]  # (B, m, ρ)
            L = torch.stack(_or_zeros(gV, g.V))[..., :rho]  # (B, n, ρ)
            GS = torch.stack(_or_zeros(gS, g.S))[..., :rho, :rho]  # (B, ρ, ρ)
        with record_function("geolora::qr"):
            Ub = I.augment_basis(U, K, ranks)
            Vb = I.augment_basis(V, L, ranks)
        with record_function("geolora::coefficients"):
            G_aug = I.augmented_gradient(GS, K, L, Ub, Vb)  # (B, kU, kV)
            lr, wd = self._lrs(g, U.device, G_aug.dtype)
            moments = None
            if st["s_update"] == "sgd":
                S_aug = I.augmented_coefficients(S, G_aug, lr)
            else:
                S_aug, moments = self._adam(g, S, G_aug, Ub, Vb, lr, wd, plain_new=augment_only, history=history)
            # lr * G can overflow from finite gradients: that must skip the step too, not pass silently as zeros
            nonfinite = ~torch.isfinite(S_aug).all()
            # a non-finite step is a no-op below; keep the SVD itself from raising
            S_aug = torch.nan_to_num(S_aug, nan=0.0, posinf=0.0, neginf=0.0)
        with record_function("geolora::svd"):
            P, sigma, Qh = torch.linalg.svd(S_aug, full_matrices=False)
        # augmentation of an interval keeps every direction that fits the capacity (τ = 0): the truncation by τ comes
        # at the interval's last step, after the new directions had the interval to grow or fade
        tau = 0.0 if augment_only else self.current_tau
        current = ranks if history is None else history
        new_ranks = I.truncation_rank(sigma, tau, g.r_min, min(g.r_max, g.cap), current=current)
        return _GroupWork(new_ranks, nonfinite, moments, decomposition=_Decomposition(Ub, Vb, P, sigma, Qh))

    def clear_probes(self) -> None:
        """Remove the probe directions from the layers' forward (``GeoLoRACallback`` does it when training ends, so
        evaluation and inference after training run at the live ranks).  Harmless mid-run: the next augmentation then
        runs without probes, and the step after it sets them again."""
        self._probes = [None] * len(self._groups)
        for g in self._groups:
            for layer in g.layers:
                layer.geolora_probe.pop(self.adapter_name, None)

    def _refresh_probes(self) -> None:
        """Set (or clear) every layer's probe directions for the forward of the next step: set when that step is an
        interval's augmentation and ``explore_rank > 0``, cleared otherwise.

        A layer of rank ``r`` gets ``p = min(explore_rank, c - r)`` orthonormal random columns orthogonal to its
        ``U_r`` (and to ``V_r``), in columns ``r .. r + p - 1``.  They are drawn from a generator seeded by the step
        count, and the factors are identical on every process (and after resuming), so every process and a resumed
        run draw the same probes.  No host synchronisation: the widths come from the host rank mirror."""
        st = self.settings
        a = self.adapter_name
        p = int(st.get("explore_rank") or 0)
        want = p > 0 and st["augment_every"] > 1 and self.phase == "augment"
        for index, g in enumerate(self._groups):
            if not want:
                self._probes[index] = None
                for layer in g.layers:
                    if layer.static_shapes and p > 0:  # zero probes: the compiled forward keeps one graph
                        if index not in self._zero_probes:  # allocated once, shared by the group's layers
                            self._zero_probes[index] = (torch.zeros_like(g.U[0]), torch.zeros_like(g.V[0]))
                        layer.geolora_probe[a] = (*self._zero_probes[index], layer.r[a])
                    else:
                        layer.geolora_probe.pop(a, None)
                continue
            U, V = torch.stack(g.U), torch.stack(g.V)
            ranks = torch.stack(g.rank_buffers).to(device=U.device, dtype=torch.int64)
            seed = (self.num_steps + self.skipped_steps) * 1_000_003 + index
            gen = torch.Generator(device=U.device).manual_seed(seed)
            PU, widened = I.probe_directions(U, ranks, p, gen)
            PV, _ = I.probe_directions(V, ranks, p, gen)
            self._probes[index] = _Probes(PU, PV, widened)
            for layer, pu, pv in zip(g.layers, PU.unbind(0), PV.unbind(0)):
                layer.geolora_probe[a] = (pu, pv, min(layer.r[a] + p, g.cap))

    @property
    def num_training_steps(self) -> Optional[int]:
        """The run's total optimizer steps, which a ``tau_warmup_ratio`` is a fraction of (``GeoLoRACallback`` sets it
        from the Trainer's ``max_steps``; ``create_geolora_optimizer(num_training_steps=...)`` in a custom loop)."""
        return self._num_training_steps

    @num_training_steps.setter
    def num_training_steps(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"num_training_steps={value!r} is invalid: expected an int >= 0 or None")
        self._num_training_steps = value

    @property
    def tau_warmup(self) -> int:
        """Length of the tau ramp in optimizer steps (0: none)."""
        st = self.settings
        if st["tau_warmup_steps"] is not None:
            return int(st["tau_warmup_steps"])
        ratio = float(st["tau_warmup_ratio"] or 0.0)
        if ratio <= 0:
            return 0
        if self._num_training_steps is None:
            if not self._warned_no_total:
                self._warned_no_total = True
                warnings.warn(
                    f"GeoLoRA: tau_warmup_ratio={ratio} is a fraction of the training steps, but the optimizer was not "
                    "told how many there are, so tau is applied in full from the first step (no ramp; from a small "
                    "initial rank the layers may then stay small). Pass num_training_steps to "
                    "create_geolora_optimizer (GeoLoRACallback does it for the Trainer), or set tau_warmup_steps "
                    "in the GeoLoRAConfig (0 to silence this).",
                    UserWarning,
                    stacklevel=4,
                )
            return 0
        return int(round(ratio * self._num_training_steps))

    @property
    def current_tau(self) -> float:
        """The truncation tolerance of the current step: ``tau`` ramped linearly from 0 over the first
        ``tau_warmup`` optimizer steps (a plain float from the step counter: identical on every process and after
        resuming)."""
        tau, warm = self.settings["tau"], self.tau_warmup
        if warm <= 0:
            return tau
        return tau * min(1.0, (self.num_steps + 1) / warm)

    @property
    def mid_interval(self) -> bool:
        """True between an interval's augmentation and its truncation (``augment_every > 1``): the live ranks then
        include augmented directions that have not been judged yet."""
        return self.settings["augment_every"] > 1 and self._interval_position() != 0

    def _interval_position(self) -> int:
        return (self.num_steps + self.skipped_steps + self._interval_offset) % self.settings["augment_every"]

    @torch.no_grad()
    def finish_interval(self) -> bool:
        """Truncate now (by ``tau`` or the budget) if an interval is open, without a coefficient step; returns
        whether it did.  ``GeoLoRACallback`` calls it when training ends, so the saved adapter holds the truncated
        ranks; call it yourself before ``save_pretrained`` in a custom loop (a checkpoint for resuming should keep
        the open interval instead: resuming continues it).  The next ``step()`` starts a new interval."""
        if not self.mid_interval:
            return False
        with torch.no_grad(), self._full_factors():
            self._finish_interval()
            self._refresh_probes()
        return True

    def _finish_interval(self) -> None:
        st = self.settings
        work = [self._coefficient_group(g, [None] * len(g.S), truncate=True, update=False) for g in self._groups]
        ranks = [w.ranks for w in work]
        device = self._groups[0].U[0].device
        if st["rank_budget"] is not None and work:
            ranks = self._budget_ranks(work, device)
        sizes = [len(g.layers) for g in self._groups]
        flat = agree_across_processes(
            torch.cat([torch.zeros(1, dtype=torch.int64, device=device)] + [r.to(torch.int64) for r in ranks])
        )
        host = flat.tolist()
        self._write_all(work, torch.split(flat[1:], sizes), host[1:], reortho=False, truncating=True)
        self._interval_offset = (self._interval_offset - self._interval_position()) % st["augment_every"]

    def _write_all(
        self, work: list[_GroupWork], ranks: list[torch.Tensor], host_ranks: list[int], reortho: bool, truncating: bool
    ) -> None:
        """Write every group's new factors and ranks (device ``ranks``, and their host copy for the layers' mirror)."""
        offset = 0
        for g, w, r_new in zip(self._groups, work, ranks):
            self._write_group(g, w, r_new, reortho)
            for layer, k in zip(g.layers, host_ranks[offset : offset + len(g.layers)]):
                layer.r[self.adapter_name] = k
            offset += len(g.layers)
            if truncating:
                self.truncations += len(g.layers)

    def _budget_ranks(self, work: list[_GroupWork], device) -> list[torch.Tensor]:
        """The global budget's ranks from every group's singular values (no host synchronisation)."""
        st = self.settings
        # params: rank k of an (m, n) layer keeps k (m + n + k) values (U, V and the full k x k S)
        full = lambda v: torch.full((), v, dtype=torch.int64, device=device)  # noqa: E731  (no H2D copy)
        costs = [full(1 if st["budget_type"] == "rank" else g.cost) for g in self._groups]
        return I.budget_truncation_ranks(
            [w.decomposition.sigma for w in work],
            costs,
            float(st["rank_budget"]),
            [full(g.r_min) for g in self._groups],
            [full(min(g.r_max, g.cap)) for g in self._groups],
            cost_growth=0.0 if st["budget_type"] == "rank" else 2.0,
        )

    def _coefficient_group(self, g: _LayerGroup, gS, truncate: bool, update: bool = True) -> _GroupWork:
        """A step on the coefficients only, bases fixed (inside an interval of ``augment_every > 1`` steps).

        ``S <- S - λ U^T G V`` (``"sgd"``) or an Adam step on ``S`` (``"adam"``) at the live rank.  With ``truncate``
        (the interval's last step) the result is then diagonalised by an SVD and truncated by ``τ`` (or the budget):
        ``U <- U P[:, :r1]``, ``S <- diag(σ[:r1])``, ``V <- V Q[:, :r1]``, moments rotated as after Algorithm 1.
        Without ``update`` (``finish_interval``) S is truncated as it is and the moments only follow the rotation."""
        st = self.settings
        a = self.adapter_name
        rho = max(layer.r[a] for layer in g.layers)
        with record_function("geolora::stack"):
            U = torch.stack(g.U)[..., :rho]  # (B, m, ρ)
            V = torch.stack(g.V)[..., :rho]  # (B, n, ρ)
            dt = I.compute_dtype(U.dtype)
            S = torch.stack(g.S)[..., :rho, :rho].to(dt)  # (B, ρ, ρ)
            G = torch.stack(_or_zeros(gS, g.S))[..., :rho, :rho].to(dt)  # (B, ρ, ρ) = U^T G_M V
            ranks = torch.stack(g.rank_buffers).to(device=U.device, dtype=torch.int64)  # (B,)
        live = I.column_mask(ranks, rho)  # (B, ρ)
        with record_function("geolora::coefficients"):
            moments = None
            if not update:
                S_new = S
                if st["s_update"] != "sgd":
                    moments = I.fit_moments(self._load_moments(g, dt, U.device), rho, rho)
            elif st["s_update"] == "sgd":
                lr, _ = self._lrs(g, U.device, dt)
                S_new = I.augmented_coefficients(S, G, lr)
            else:
                # every live entry has history (no new directions): Adam on all of them
                lr, wd = self._lrs(g, U.device, dt)
                S_new, moments = self._adam(g, S, G, I.fixed_basis(U, live), I.fixed_basis(V, live), lr, wd)
            nonfinite = ~torch.isfinite(S_new).all()
            S_new = torch.nan_to_num(S_new, nan=0.0, posinf=0.0, neginf=0.0)
        if not truncate:
            return _GroupWork(ranks, nonfinite, moments, coefficients=S_new)
        with record_function("geolora::svd"):
            P, sigma, Qh = torch.linalg.svd(S_new, full_matrices=False)
        decomposition = _Decomposition(I.fixed_basis(U.to(dt), live), I.fixed_basis(V.to(dt), live), P, sigma, Qh)
        new_ranks = I.truncation_rank(sigma, self.current_tau, g.r_min, min(g.r_max, g.cap), current=ranks)
        return _GroupWork(new_ranks, nonfinite, moments, decomposition=decomposition)

    # Adam moments of S: ONE stacked tensor per group, (B, c, c), in the optimizer state of the group's first S
    # (keys geolora_exp_avg / geolora_exp_avg_sq, and "step" (B,) because AdamW.__setstate__ expects "step" in
    # any non-empty state).  Checkpoints written with one moment per layer are read too.
    def _load_moments(self, g: _LayerGroup, dtype, device) -> I.Moments:
        B, c = len(g.S), g.cap
        s0 = self.base_optimizer.state[g.S[0]]
        m = s0.get("geolora_exp_avg")
        if m is not None and m.dim() == 3 and tuple(m.shape) == (B, c, c):
            t = s0["step"]
            return I.Moments(
                m.to(device, dtype), s0["geolora_exp_avg_sq"].to(device, dtype), t.to(device, dtype).reshape(B)
            )
        if m is None:
            return I.zero_moments(B, c, c, dtype, device)
        if m.dim() == 2:  # legacy per-layer layout
            states = [self.base_optimizer.state[p] for p in g.S]
            get = lambda s, k: s[k].to(device, dtype) if k in s else torch.zeros(c, c, dtype=dtype, device=device)  # noqa: E731
            m = torch.stack([get(s, "geolora_exp_avg") for s in states])
            v = torch.stack([get(s, "geolora_exp_avg_sq") for s in states])
            t = torch.stack([torch.as_tensor(s.get("step", 0.0), dtype=dtype).to(device).reshape(()) for s in states])
            for p in g.S[1:]:
                self.base_optimizer.state.pop(p, None)
            return I.Moments(m, v, t)
        logger.warning(
            "GeoLoRA: Adam moments of shape %s do not fit group (%d, %d, %d); restarting them.", tuple(m.shape), B, c, c
        )
        return I.zero_moments(B, c, c, dtype, device)

    def _store_moments(self, g: _LayerGroup, moments: I.Moments) -> None:
        """Keep the group's (B, c, c) moments in the optimizer state (float32, whatever the compute precision)."""
        s0 = self.base_optimizer.state[g.S[0]]
        s0["geolora_exp_avg"] = moments.exp_avg.to(torch.float32)
        s0["geolora_exp_avg_sq"] = moments.exp_avg_sq.to(torch.float32)
        s0["step"] = moments.step.to(torch.float32)  # (B,); AdamW.__setstate__ expects "step" in any non-empty state

    def _adam(self, g: _LayerGroup, S, G_aug, Ub, Vb, lr, wd, plain_new: bool = False, history=None):
        """:func:`geolora.integrator.adam_coefficients` with the group's moments and the run's Adam settings."""
        st = self.settings
        return I.adam_coefficients(
            S,
            G_aug,
            Ub,
            Vb,
            self._load_moments(g, G_aug.dtype, G_aug.device),
            lr,
            wd,
            betas=st["adam_betas"],
            eps=st["adam_eps"],
            capacity=g.cap,
            per_layer=st["s_update"] == "adam_layer",
            plain_new=plain_new,
            history=history,
        )

    def _write_group(self, g: _LayerGroup, w: _GroupWork, ranks: torch.Tensor, reortho: bool) -> None:
        c = g.cap
        if w.decomposition is None:  # a coefficient step: bases and ranks unchanged
            torch._foreach_copy_(g.S, list(I.fit_block(w.coefficients, c, c).to(g.S[0].dtype).unbind(0)))
            if w.moments is not None:
                self._store_moments(g, I.fit_moments(w.moments, c, c))
            return
        d = w.decomposition
        tr = I.truncate(d.Ub.basis, d.Vb.basis, d.P, d.sigma, d.Qh, ranks, c)
        U_new, S_new, V_new = tr.U, tr.S, tr.V
        if reortho:
            U_new, S_new, V_new = I.reorthonormalize(U_new, S_new, V_new, ranks)
        torch._foreach_copy_(g.U, list(U_new.to(g.U[0].dtype).unbind(0)))
        torch._foreach_copy_(g.S, list(S_new.to(g.S[0].dtype).unbind(0)))
        torch._foreach_copy_(g.V, list(V_new.to(g.V[0].dtype).unbind(0)))
        torch._foreach_copy_(g.rank_buffers, list(ranks.unbind(0)))
        if w.moments is not None:
            self._store_moments(g, I.rotate_moments(w.moments, tr.P, tr.Q))  # (B, c, c)


def _or_zeros(grads: list, params: list) -> list:
    """The gradients, with zeros for a layer that got none (e.g. not reached by this batch)."""
    if all(gr is not None for gr in grads):
        return grads
    return [gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, params)]


def create_geolora_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    geolora_lr: Optional[float] = None,
    s_update: Optional[str] = None,
    num_training_steps: Optional[int] = None,
    **optimizer_kwargs: Any,
) -> GeoLoRAOptimizer:
    """Build the optimizer for GeoLoRA training in any loop.

    Grows every GeoLoRA layer to ``r_max`` capacity, puts the GeoLoRA factors in their own param group
    (``lr=geolora_lr`` or ``lr``) and all other trainable parameters in another, builds ``optimizer_cls`` on them,
    and wraps it in a :class:`GeoLoRAOptimizer`.  See the module docstring for a custom loop.

    Args:
        model: a PeftModel (or module with GeoLoRA layers).
        optimizer_cls: the optimizer for the non-GeoLoRA trainables (heads, biases); it never updates U or V.
        lr: learning rate of the other trainables, and of the factors unless ``geolora_lr`` is given.
        geolora_lr: λ of the GeoLoRA step.
        s_update: ``"adam"``, ``"adam_layer"`` or ``"sgd"`` (default: the adapter config's ``s_update``).
        num_training_steps: the run's total optimizer steps; the config's ``tau_warmup_ratio`` is a fraction of them
            (without it, and without ``tau_warmup_steps``, tau applies in full from the first step, with a warning).
        optimizer_kwargs: passed to ``optimizer_cls`` (e.g. ``weight_decay``, ``fused``).
    """
    for name, value in (("lr", lr), ("geolora_lr", geolora_lr)):
        if value is None and name == "geolora_lr":
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")
    inner = unwrap_model(model)
    grow_capacity(inner)
    geo_ids = set()
    for _, layer in find_geolora_layers(inner):
        for name in ("geolora_U", "geolora_S", "geolora_V"):
            for p in getattr(layer, name).values():
                geo_ids.add(id(p))
    geo, other = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (geo if id(p) in geo_ids else other).append(p)
    groups = [{"params": geo, "lr": geolora_lr if geolora_lr is not None else lr, "geolora": True}]
    if other:
        groups.append({"params": other, "lr": lr})
    base = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
    return GeoLoRAOptimizer(base, model, s_update=s_update, num_training_steps=num_training_steps)
