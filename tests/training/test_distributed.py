"""DDP on CPU with 2 processes (torchrun, gloo): every process ends with the same ranks and factors.  And the
cross-process helpers of geolora.distributed on a single process (no process group): no-ops."""

import ast
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import geolora.distributed as D
from tests.conftest import torchrun_command

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_train.py"
ROOT = Path(__file__).resolve().parents[2]


SCHEDULES = (1, 2)
MODES = ("driver", "trainer", "nan")
_LAUNCHES: dict[str, Path] = {}


def _launch(out: Path) -> Path:
    """One torchrun launch runs every mode and schedule in the same 2 processes (a launch costs two fresh
    interpreters); the parametrized test below reads its mode's and schedule's files."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = torchrun_command(SCRIPT, ",".join(MODES), out, ",".join(map(str, SCHEDULES)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _run(mode, tmp_path_factory, augment_every):
    if "all" not in _LAUNCHES:
        _LAUNCHES["all"] = _launch(tmp_path_factory.mktemp("ddp"))
    folder = _LAUNCHES["all"] / mode / str(augment_every)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("augment_every", SCHEDULES)
@pytest.mark.parametrize("mode", MODES)
def test_ddp_processes_agree(mode, tmp_path_factory, augment_every):
    a, b = _run(mode, tmp_path_factory, augment_every)
    assert a["ranks"] == b["ranks"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.allclose(a["state"][k], b["state"][k], atol=1e-6), k


def test_without_a_process_group_the_helpers_do_nothing():
    flat = torch.tensor([0, 3, 2], dtype=torch.int64)
    assert D.agree_across_processes(flat) is flat
    params = [torch.randn(3, 2)]
    before = params[0].clone()
    D.broadcast_factors(params, [torch.tensor(2)])
    assert torch.equal(params[0], before)
    assert not D.is_sharded(params[0])


def test_check_not_fsdp_refuses_fsdp1_and_accepts_plain_modules():
    class FullyShardedDataParallel(nn.Module):  # stands for FSDP1's wrapper (matched by its name)
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    D.check_not_fsdp(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="supports FSDP2 .* not FSDP1's FullyShardedDataParallel"):
        D.check_not_fsdp(nn.Sequential(FullyShardedDataParallel()))


def test_distributed_imports_nothing_from_geolora():
    tree = ast.parse(Path(D.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert all(not name.startswith("geolora") for name in imported) and not [
        n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0
    ], imported
