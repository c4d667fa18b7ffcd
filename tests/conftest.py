"""Tiny models built from configs (no Hub access) and helpers shared by the test files.

This module must not import ``geolora``: subprocess helpers import it (``from conftest import ...``) in processes that
check behaviour WITHOUT geolora loaded (stock-PEFT loading of an exported LoRA adapter, the error seen when geolora was
not imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a shared 2-core machine: intra-op threads only contend (measured: the same tests ran ~4x slower
# with the default thread count under load).  Inherited by subprocesses; set again below in case torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
VOCAB = 64
NUM_LABELS = 3


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port <a free port> ARGS...`` (gloo on CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port"]
    return launcher + [str(port), *map(str, args)]


# ---------------------------------------------------------------------------------------------------- tiny models
def make_bert(seed: int = 0, intermediate_size: int = 37):
    """BertForSequenceClassification, hidden 32, 2 layers (intermediate 37 so no two Linear shapes coincide)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def make_gpt2(seed: int = 0):
    """GPT2LMHeadModel, 2 layers, hidden 32: ``c_attn``/``c_proj``/``c_fc`` are transformers ``Conv1D``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def make_vit(seed: int = 0):
    """ViTForImageClassification, hidden 32, 2 layers, 8x8 images with 4x4 patches.

    transformers 5 names: ``vit.layers.N.attention.{q,k,v,o}_proj`` and ``vit.layers.N.mlp.fc{1,2}``.
    """
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config).eval()


class TinyCNN(nn.Module):
    """conv (3x3, stride 2, padding 1) -> ReLU -> 1x1 conv -> ReLU -> global mean -> linear head."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(8, 6, kernel_size=1, groups=groups)
        self.head = nn.Linear(6, NUM_LABELS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(pixel_values))  # (N, 8, H/2, W/2)
        h = torch.relu(self.pointwise(h))  # (N, 6, H/2, W/2)
        return self.head(h.mean(dim=(2, 3)))  # (N, labels)


def make_cnn(seed: int = 0, groups: int = 1) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(groups=groups).eval()


# ---------------------------------------------------------------------------------------------------- inputs
def text_inputs(seed: int = 0, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def image_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + seed)
    return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}


def logits_of(output: Any) -> torch.Tensor:
    """The logits of an HF output object, or the tensor itself (TinyCNN)."""
    return output if isinstance(output, torch.Tensor) else output.logits


@dataclass(frozen=True)
class TinySpec:
    """How to build, feed and adapt one tiny model."""

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[..., dict]
    target_modules: tuple[str, ...]
    head: str  # the classification / output head (for modules_to_save)
    task_type: str | None
    labels: Callable[[dict], torch.Tensor]

    def forward(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return logits_of(model(**inputs))

    def loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        logits = self.forward(model, inputs)
        target = self.labels(inputs)
        if self.name == "gpt2":
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))
        return nn.functional.cross_entropy(logits, target)


def _class_labels(inputs: dict) -> torch.Tensor:
    first = next(iter(inputs.values()))
    return torch.arange(first.shape[0]) % NUM_LABELS


TINY_SPECS: dict[str, TinySpec] = {
    "bert": TinySpec(
        "bert",
        make_bert,
        text_inputs,
        ("query", "value", "dense"),
        "classifier",
        "SEQ_CLS",
        _class_labels,
    ),
    "gpt2": TinySpec(
        "gpt2",
        make_gpt2,
        text_inputs,
        ("c_attn", "c_proj", "c_fc"),
        "lm_head",
        "CAUSAL_LM",
        lambda inputs: inputs["input_ids"],
    ),
    "vit": TinySpec(
        "vit",
        make_vit,
        image_inputs,
        ("q_proj", "v_proj", "o_proj", "fc1", "fc2"),
        "classifier",
        None,
        _class_labels,
    ),
    "cnn": TinySpec("cnn", make_cnn, image_inputs, ("conv", "pointwise"), "head", None, _class_labels),
}


@pytest.fixture(scope="session")
def tiny_specs() -> dict[str, TinySpec]:
    """name -> :class:`TinySpec` for ``bert``, ``gpt2``, ``vit`` and ``cnn``."""
    return TINY_SPECS


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def cnn():
    return make_cnn()


# ---------------------------------------------------------------------------------------------------- subprocesses
def start_python(script: str, workdir: Path) -> subprocess.Popen:
    """Start ``script`` in a fresh Python process (cwd ``workdir``, ``conftest`` importable, Hub offline).

    Imports alone take several seconds, so a test module batches its checks into one script, and independent scripts
    can run side by side (start both, then :func:`wait_python_ok`)."""
    path = Path(workdir) / "job.py"
    path.write_text(script)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(path)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_python_ok(proc: subprocess.Popen, timeout: float = 180) -> dict:
    """Wait for a :func:`start_python` process; it must succeed and write ``result.json`` in its cwd (returned)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"subprocess timed out after {timeout} s:\n{stdout}\n{stderr}") from None
    assert proc.returncode == 0, f"subprocess failed (rc={proc.returncode}):\n{stdout}\n{stderr}"
    script = Path(proc.args[-1])
    return json.loads((script.parent / "result.json").read_text())


def run_python_ok(script: str, workdir: Path, timeout: float = 180) -> dict:
    """Run ``script`` in a fresh process; it must succeed and write ``result.json`` in its cwd, which is returned."""
    return wait_python_ok(start_python(script, workdir), timeout)


class FreshPython:
    """Runs scripts in fresh interpreters where ``from conftest import ...`` works (see :func:`start_python`)."""

    start = staticmethod(start_python)
    wait_ok = staticmethod(wait_python_ok)
    run_ok = staticmethod(run_python_ok)


@pytest.fixture(scope="session")
def fresh_python() -> type[FreshPython]:
    return FreshPython
