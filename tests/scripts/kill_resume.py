"""Fault-injection helper for the SIGKILL-then-resume test of tests/training/test_callback.py
(test_sigkill_at_random_points_then_resume_equals_uninterrupted): a process that may be killed with SIGKILL at any
moment.

    python kill_resume.py train OUT TOTAL_STEPS CKPT_EVERY
        A GeoLoRA driver loop (create_geolora_optimizer, s_update="adam", a trained head) that checkpoints every
        CKPT_EVERY steps into OUT/ckpt-<step>/ (adapter via PeftModel.save_pretrained, optimizer state via torch.save
        to a temporary file + rename, then a COMPLETE marker) and, when started again, resumes from the newest complete
        checkpoint.  The batch of step t is drawn from a generator seeded with t, so a resumed run sees exactly the
        batches an uninterrupted run sees.  Prints "step <t>" after every step; at the end writes OUT/result.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import peft
import torch
from torch import nn

import geolora

torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _base() -> MLP:
    torch.manual_seed(0)
    return MLP()


def _config(augment_every: int) -> geolora.GeoLoRAConfig:
    return geolora.GeoLoRAConfig(
        r=2,
        r_max=6,
        tau=0.05,
        target_modules=["a", "b"],
        modules_to_save=["head"],
        s_update="adam",
        reorthonormalize_every=5,
        augment_every=augment_every,
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for d in out.glob("ckpt-*"):
        if (d / "COMPLETE").exists():
            found.append((int(d.name.split("-")[1]), d))
    return sorted(found)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(out: Path, total: int, every: int, augment_every: int = 10) -> None:
    """Train ``total`` steps with a checkpoint every ``every`` steps (with the default interval of 10 steps, most
    checkpoints fall inside an interval), resuming from the newest complete checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    ckpts = _complete_checkpoints(out)
    if ckpts:
        start, ckpt = ckpts[-1]
        model = peft.PeftModel.from_pretrained(_base(), ckpt / "adapter", is_trainable=True)
        opt = geolora.create_geolora_optimizer(model, lr=2e-2)
        # weights_only=True: a checkpoint is data, never code
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    else:
        start = 0
        model = peft.get_peft_model(_base(), _config(augment_every))
        opt = geolora.create_geolora_optimizer(model, lr=2e-2)
    print(f"start {start}", flush=True)
    for step in range(start, total):
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        done = step + 1
        if done % every == 0:
            d = out / f"ckpt-{done}"
            if d.exists():  # a partial checkpoint from a killed run: never marked COMPLETE
                shutil.rmtree(d)
            model.save_pretrained(d / "adapter")
            _atomic_torch_save(opt.state_dict(), d / "optimizer.pt")
            (d / "COMPLETE").write_text(str(done))
            for _, old in _complete_checkpoints(out)[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        print(f"step {done}", flush=True)
    x, y = _batch(10**6)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    result = {"ranks": geolora.get_ranks(model), "loss": loss, "start": start, "num_steps": opt.num_steps}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *[int(a) for a in sys.argv[5:6]])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
