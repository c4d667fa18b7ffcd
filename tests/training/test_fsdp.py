"""FSDP2 (fully_shard) on CPU with 2 gloo processes: GeoLoRA's step on sharded factors equals the unsharded step.

Each process trains on half of every batch (FSDP averages the gradients); the reference runs the same steps in one
process on the whole batches. ``tests/scripts/fsdp_train.py`` does both.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun_command

SCRIPT = Path(__file__).parents[1] / "scripts" / "fsdp_train.py"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # multi-process / end to end: `make test-fast` leaves it out
pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")


_RESULTS: dict[str, Path] = {}  # one folder of runs shared by the tests


def _results(tmp_path_factory) -> Path:
    """Every run the tests read, in two launches (each launch costs fresh interpreters): the one-process reference at
    augment_every 1 and 2, then one torchrun launch for the FSDP2 driver at 1 and 2 and the resume at 2. Run r at
    augment_every k is in ``<folder>/<k>/``."""
    if "root" not in _RESULTS:
        root = tmp_path_factory.mktemp("fsdp")
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        for cmd in (
            [sys.executable, str(SCRIPT), str(root), "reference:1,reference:2"],
            torchrun_command(SCRIPT, root, "driver:1,driver:2,resume:2"),
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        _RESULTS["root"] = root
    return _RESULTS["root"]


def _deltas(factors):
    return {
        k.replace(".geolora_U.", "."): factors[k]
        @ factors[k.replace("geolora_U", "geolora_S")]
        @ factors[k.replace("geolora_U", "geolora_V")].T
        for k in factors
        if ".geolora_U." in k
    }


@pytest.mark.parametrize("augment_every", [1, 2])
def test_fsdp2_step_equals_the_unsharded_step_and_processes_agree(augment_every, tmp_path_factory):
    tmp_path = _results(tmp_path_factory) / str(augment_every)
    ref = torch.load(tmp_path / "reference-rank0.pt", weights_only=True)
    a, b = (torch.load(tmp_path / f"driver-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["sharded"] and b["sharded"] and not ref["sharded"]  # the factors really were DTensors
    assert a["ranks"] == b["ranks"] == a["rank_buffers"] == b["rank_buffers"] == ref["ranks"]
    if augment_every == 2:
        assert len(set(ref["ranks"].values())) > 1  # ranks moved, differently per layer
    for k in a["factors"]:
        assert torch.equal(a["factors"][k], b["factors"][k]), k
    for losses in (a["losses"], b["losses"]):
        assert len(losses) == len(ref["losses"])
    # the processes' half-batch losses average to the whole-batch loss
    torch.testing.assert_close(
        torch.tensor(a["losses"]) / 2 + torch.tensor(b["losses"]) / 2, torch.tensor(ref["losses"]), rtol=0, atol=1e-5
    )
    da, dr = _deltas(a["factors"]), _deltas(ref["factors"])
    assert da.keys() == dr.keys() and len(da) == 14
    for k in da:
        torch.testing.assert_close(da[k], dr[k], rtol=0, atol=1e-5)

    # the adapter saved from the full state dict on process 0 (as the Trainer does) loads in one process
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    import geolora  # noqa: F401  (registers the GEOLORA type with PEFT)

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        )

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = PeftModel.from_pretrained(base(), str(tmp_path / "driver-adapter")).eval()(input_ids=ids).logits
        want = PeftModel.from_pretrained(base(), str(tmp_path / "reference-adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fsdp2_resume_through_torch_distributed_checkpoint_equals_the_uninterrupted_run(tmp_path_factory):
    """3 steps, a dcp checkpoint of the model and the optimizer (as the Trainer's FSDP2 checkpoints), a new model and
    optimizer loaded from it, 3 more steps: the same factors and ranks as 6 uninterrupted steps, mid-interval."""
    tmp_path = _results(tmp_path_factory) / "2"  # augment_every 2: the checkpoint after step 3 falls inside an interval
    a, b = (torch.load(tmp_path / f"{m}-rank0.pt", weights_only=True) for m in ("driver", "resume"))
    assert a["ranks"] == b["ranks"] and a["rank_buffers"] == b["rank_buffers"]
    assert a["losses"] == b["losses"]
    for k in a["factors"]:
        assert torch.equal(a["factors"][k], b["factors"][k]), k
