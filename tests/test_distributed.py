"""DDP on CPU with 2 processes (torchrun, gloo): every process ends with the same ranks and factors."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, tmp_path, augment_every=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(SCRIPT), mode, str(tmp_path), str(augment_every)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("augment_every", [1, 2])
@pytest.mark.parametrize("mode", ["driver", "trainer", "nan"])
def test_ddp_processes_agree(mode, tmp_path, augment_every):
    a, b = _run(mode, tmp_path, augment_every)
    assert a["ranks"] == b["ranks"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.allclose(a["state"][k], b["state"][k], atol=1e-6), k
