"""The one training harness (geolora.app.harness) on a tiny BERT built from a config: short GeoLoRA and LoRA runs give
metrics, ranks and provenance; results files are written atomically; diverged logits are flagged, not scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geolora.app import harness
from tests.conftest import NUM_LABELS, VOCAB, make_bert

TARGETS = ["query", "value", "intermediate.dense"]


class Tokens(torch.utils.data.Dataset):
    """Fixed-length random token ids whose label is the first token's id modulo the number of labels."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0]) % NUM_LABELS}


def _args(tmp_path: Path, steps: int = 3):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
    )


def _model(method: str):
    import peft

    import geolora

    if method == "geolora":
        config = geolora.GeoLoRAConfig(r=2, r_max=4, lora_alpha=2, target_modules=TARGETS, task_type="SEQ_CLS")
    else:
        config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, task_type="SEQ_CLS")
    return peft.get_peft_model(make_bert(), config)


@pytest.mark.parametrize("method", ["geolora", "lora"])
def test_a_short_run_gives_metrics_ranks_and_provenance(method, tmp_path):
    model = _model(method)
    result = harness.train_and_evaluate(
        model,
        _args(tmp_path),
        Tokens(24, 0),
        {"val": Tokens(16, 1), "test": Tokens(16, 2)},
        method=method,
        metric_names=["accuracy", "f1"],
        num_labels=NUM_LABELS,
        console_log=False,
        command="pytest test_harness",
    )
    assert list(result.evaluations) == ["val", "test"] and result.evaluation is result.evaluations["val"]
    for ev in result.evaluations.values():
        assert set(ev.metrics) == {"accuracy", "f1"} and 0.0 <= ev.metrics["accuracy"] <= 1.0
        assert ev.loss is not None and np.isfinite(ev.loss) and not ev.diverged
        assert ev.predictions.shape == (16,) and f"{ev.name}_loss" in ev.trainer_metrics
    assert result.metrics == result.evaluations["val"].metrics
    # one rank per adapted layer: 2 BERT layers x 3 targets; LoRA keeps r, GeoLoRA stays within [1, r_max]
    assert len(result.ranks) == 2 * len(TARGETS)
    if method == "lora":
        assert set(result.ranks.values()) == {2}
    else:
        import geolora

        assert result.ranks == geolora.get_ranks(model) and all(1 <= r <= 4 for r in result.ranks.values())
    assert [step for step, _ in result.losses] == [1, 2, 3] and not result.diverged
    assert result.train_seconds > 0 and result.train_metrics["train_loss"] > 0
    prov = result.provenance
    assert prov["command"] == "pytest test_harness"
    assert prov["git"]["revision"] and isinstance(prov["git"]["dirty"], bool)
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["peft"]
    assert prov["hardware"]["cpu_count"] and prov["hardware"]["world_size"] == 1

    path = result.write(tmp_path / "out" / "results.json", extra={"task": "tiny"})
    written = json.loads(path.read_text())
    assert written["method"] == method and written["task"] == "tiny"
    assert written["metrics"] == pytest.approx(result.metrics) and written["ranks"] == result.ranks
    assert written["provenance"] == prov and written["evaluations"]["test"]["diverged"] is False
    assert written["train_loss"] == [list(x) for x in result.losses]


def test_results_are_written_atomically(tmp_path, monkeypatch):
    import geolora.io

    path = tmp_path / "results.json"
    harness.write_results(path, {"a": np.float32(0.5), "n": np.int64(3), "s": {"y", "x"}, "arr": np.arange(2)})
    assert json.loads(path.read_text()) == {"a": 0.5, "n": 3, "s": ["x", "y"], "arr": [0, 1]}

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(geolora.io.os, "fsync", fail)  # the new file is written, then the write fails
    with pytest.raises(OSError, match="disk full"):
        harness.write_results(path, {"a": 1.0})
    assert json.loads(path.read_text())["a"] == 0.5  # the previous file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_non_finite_logits_are_flagged_not_scored():
    from transformers import EvalPrediction

    task = harness.TaskMetrics(["accuracy"], num_labels=2)
    good = task(EvalPrediction(predictions=np.array([[0.0, 1.0], [2.0, 0.0]]), label_ids=np.array([1, 0])))
    assert good == {"accuracy": 1.0} and task.finite and task.predictions.tolist() == [1, 0]
    bad = task(EvalPrediction(predictions=(np.array([[np.nan, 1.0], [2.0, 0.0]]),), label_ids=np.array([1, 0])))
    assert np.isnan(bad["accuracy"]) and not task.finite and task.predictions is None


def test_provenance_outside_a_checkout_and_unknown_methods(tmp_path):
    prov = harness.provenance("x", repo=tmp_path, packages=("torch", "no-such-package-geolora"))
    assert prov["git"] == {"revision": None, "dirty": None, "dirty_paths": None}
    assert prov["versions"]["no-such-package-geolora"] == "not installed" and prov["versions"]["python"]
    with pytest.raises(ValueError, match="method='dora'"):
        harness.method_callbacks("dora")
    assert [type(c).__name__ for c in harness.method_callbacks("adalora")] == ["AdaLoRACallback"]
    assert harness.method_callbacks("lora") == [] and harness.method_callbacks(None) == []
