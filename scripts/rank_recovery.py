"""Synthetic rank recovery: a frozen Linear(32, 40) whose optimal update has rank 5 (singular values 3, 2, 1.5, 1,
0.7), trained with GeoLoRA from several initial ranks.  Prints the rank trajectory and the loss reduction.

    python scripts/rank_recovery.py                       # the defaults, r in {1, 12}
    python scripts/rank_recovery.py --r 1 2 8 12 --lr 3e-3 --augment_every 1 --set tau=0.1
"""

from __future__ import annotations

import argparse
import json
import sys

import peft
import torch
from torch import nn

import geolora

SINGULAR_VALUES = (3.0, 2.0, 1.5, 1.0, 0.7)


class Regression(nn.Module):
    def __init__(self, n_in: int = 32, n_out: int = 40):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def target_update(n_in: int = 32, n_out: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    U, _ = torch.linalg.qr(torch.randn(n_out, len(SINGULAR_VALUES), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_in, len(SINGULAR_VALUES), generator=g, dtype=torch.float64))
    return (U * torch.tensor(SINGULAR_VALUES, dtype=torch.float64)) @ V.T  # (out, in), rank 5


def run(r: int, lr: float, steps: int, seed: int = 0, batch: int = 64, log_every: int = 50, **config) -> dict:
    """Train from initial rank ``r``; returns ranks over steps (after each logged step), first and last loss."""
    torch.manual_seed(seed)
    base = Regression()
    delta = target_update(seed=seed).float()
    model = peft.get_peft_model(base, geolora.GeoLoRAConfig(r=r, target_modules=["lin"], **config))
    opt = geolora.create_geolora_optimizer(model, lr=lr, num_training_steps=steps)
    layer = next(m for m in model.modules() if isinstance(m, geolora.GeoLoRALayer))
    g = torch.Generator().manual_seed(seed)
    w0 = base.lin.weight.detach().clone()
    losses, trajectory = [], []
    for step in range(steps):
        x = torch.randn(batch, 32, generator=g)
        y = x @ (w0 + delta).T
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            trajectory.append((step + 1, layer.r["default"], opt.phase))
    tail = sum(losses[-20:]) / 20
    # the rank after the last truncation (inside an interval the live rank includes the augmented directions)
    return {
        "r0": r,
        "final_rank": layer.r["default"],
        "loss_first": losses[0],
        "loss_last": tail,
        "reduction": losses[0] / max(tail, 1e-30),
        "trajectory": trajectory,
    }


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, nargs="+", default=[1, 12])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="GeoLoRAConfig fields")
    p.add_argument("--json", action="store_true", help="print one JSON line per run")
    args = p.parse_args(argv)
    config = {}
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = _value(value)
    config.setdefault("r_max", 16)
    for r in args.r:
        out = run(r, args.lr, args.steps, seed=args.seed, **config)
        if args.json:
            print(json.dumps({**out, "config": config, "lr": args.lr}))
        else:
            ranks = " ".join(str(k) for _, k, ph in out["trajectory"] if ph in ("step", "augment"))
            loss = f"loss {out['loss_first']:.3g} -> {out['loss_last']:.3g} ({out['reduction']:.0f}x)"
            print(f"r0={r:2d} final rank {out['final_rank']:2d}  {loss}  ranks: {ranks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
