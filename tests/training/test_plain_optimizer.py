"""Training without GeoLoRA's step does not go unnoticed.

``U.grad`` and ``V.grad`` hold GeoLoRA's update directions, not gradients.  A plain optimizer that steps them (a stock
Trainer without GeoLoRACallback, ``torch.optim.AdamW(model.parameters())`` in a loop) drives U and V far from
orthonormal.  Its first step warns (once per optimizer), and saving such factors raises before the adapter files are
written.  Every legitimate way of training (the callback, create_geolora_optimizer, bf16 factors) is not flagged.
"""

import json
import os
import warnings

import datasets
import peft
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import geolora
from geolora.integrator import orthonormality_error

GUIDANCE = r"geolora\.GeoLoRACallback\(\) on the Trainer or geolora\.create_geolora_optimizer\(model, lr=\.\.\.\)"
SAVE_ERROR = r"updated by a plain optimizer, not by GeoLoRA's step: train with " + GUIDANCE
STEP_WARNING = r"plain optimizer step, not GeoLoRA's step"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _net_model():
    torch.manual_seed(0)
    config = geolora.GeoLoRAConfig(r=2, r_max=4, init_weights=False, target_modules=["a", "b"])
    return peft.get_peft_model(Net(), config)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)


def _train(model, opt, steps):
    for i in range(steps):
        x, y = _batch(i)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _geolora_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "GeoLoRA" in str(w.message)]


def _layers(model):
    return [m for m in model.modules() if isinstance(m, geolora.GeoLoRALayer)]


def _max_basis_error(model):
    return max(
        orthonormality_error(getattr(m, kind)["default"].detach(), m.r["default"])
        for m in _layers(model)
        for kind in ("geolora_U", "geolora_V")
    )


def _bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=2
    )
    return BertForSequenceClassification(cfg).to(dtype)


def _bert_model(dtype=torch.float32, autocast=True):
    return peft.get_peft_model(
        _bert(dtype),
        geolora.GeoLoRAConfig(
            r=4,
            r_max=8,
            tau=0.3,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
        autocast_adapter_dtype=autocast,
    )


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 50).long().tolist()})


def _args(out, max_steps):
    return TrainingArguments(
        str(out),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ------------------------------------------------------------------------------------------- a plain optimizer
@pytest.mark.parametrize("impl", ["foreach", "for-loop", "fused"])
def test_plain_adamw_loop_warns_once_and_save_raises_before_writing(impl, tmp_path):
    model = _net_model()
    out = tmp_path / "adapter"
    model.save_pretrained(out)  # an earlier, good save in the same folder
    before = {name: (out / name).read_bytes() for name in _files(out)}
    kw = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}[impl]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)  # fused AdamW leaves the version counters alone
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, opt, 1)
        assert len(_geolora_warnings(record)) == 1  # at the very first step
        _train(model, opt, 5)
    flagged = _geolora_warnings(record)
    assert len(flagged) == 1, [str(w.message) for w in flagged]  # once per optimizer
    message = str(flagged[0].message)
    assert "AdamW.step()" in message and STEP_WARNING in message
    assert "GeoLoRACallback() on the Trainer or geolora.create_geolora_optimizer(model, lr=...)" in message
    assert _max_basis_error(model) > 1e-2  # what the warning is about: the bases are no longer orthonormal
    with pytest.raises(ValueError, match=SAVE_ERROR) as info:
        model.save_pretrained(out)
    assert "not orthonormal (max |X^T X - I| = " in str(info.value) and "in layer '" in str(info.value)
    assert "merge_and_unload()" in str(info.value)
    # nothing half-written: the earlier save is untouched, byte for byte (PEFT rewrites only its README.md first)
    after = {name: (out / name).read_bytes() for name in _files(out)}
    assert set(after) == set(before)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert after[name] == before[name], name
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=SAVE_ERROR):
        model.save_pretrained(fresh)
    assert set(_files(fresh)) <= {"README.md"}


def test_factors_replaced_outside_geolora_are_guarded_from_their_first_forward():
    """Parameters put in by other code (PEFT's assign-load, a user) are marked by the training forward."""
    model = _net_model()
    for layer in _layers(model):
        for kind in ("geolora_U", "geolora_V"):
            old = getattr(layer, kind)["default"]
            getattr(layer, kind)["default"] = nn.Parameter(old.detach().clone())
    with pytest.warns(UserWarning, match=STEP_WARNING):
        _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 1)


def test_the_function_survives_merge_and_unload_as_the_error_says():
    model = _net_model()
    with pytest.warns(UserWarning, match=STEP_WARNING):
        _train(model, torch.optim.SGD(model.parameters(), lr=0.5), 5)
    assert _max_basis_error(model) > 1e-3
    x, _ = _batch(99)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload()
        assert torch.allclose(merged(x), expected, atol=1e-5)


def test_non_finite_factors_are_refused_at_save(tmp_path):
    model = _net_model()
    with torch.no_grad():
        _layers(model)[0].geolora_V["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"has inf/NaN values in geolora_V .*" + SAVE_ERROR):
        model.save_pretrained(tmp_path)
    assert set(_files(tmp_path)) <= {"README.md"}


def test_stock_trainer_without_the_callback_warns_and_save_model_raises(tmp_path):
    model = _bert_model()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_data())
    with pytest.warns(UserWarning, match=STEP_WARNING + r".*" + GUIDANCE):
        trainer.train()
    out = tmp_path / "final"
    with pytest.raises(ValueError, match=SAVE_ERROR):
        trainer.save_model(str(out))
    assert set(_files(out)) <= {"README.md"}
    with pytest.raises(ValueError, match=SAVE_ERROR):
        model.save_pretrained(tmp_path / "direct")


# ------------------------------------------------------------------------------------------- legitimate runs
def test_geolora_callback_run_is_not_flagged(tmp_path):
    model = _bert_model()
    cb = geolora.GeoLoRACallback()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 24), train_dataset=_data(), callbacks=[cb])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
    assert cb.optimizer.num_steps == 24
    assert not _geolora_warnings(record), [str(w.message) for w in _geolora_warnings(record)]
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "final"))


def test_create_geolora_optimizer_loop_is_not_flagged_across_model_operations(tmp_path):
    """Between GeoLoRA steps: .to(), load_state_dict, merge/unmerge, a training forward of a copy: no warning."""
    model = _net_model()
    opt = geolora.create_geolora_optimizer(model, lr=1e-2, num_training_steps=30)  # grows capacity (new Parameters)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(30):
            _train(model, opt, 1)
            if i == 5:
                model.to(torch.float32)
                model.load_state_dict(model.state_dict())
            if i == 10:
                model.merge_adapter()
                model.unmerge_adapter()
        model.save_pretrained(tmp_path / "adapter")
    assert not _geolora_warnings(record), [str(w.message) for w in _geolora_warnings(record)]
    assert _max_basis_error(model) < 1e-5
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]


def test_bf16_factors_trained_by_geolora_save_and_resave_in_float32(tmp_path):
    """bf16 factors (autocast_adapter_dtype=False) are orthonormal only to bf16 precision; loaded into float32
    factors (the default autocast_adapter_dtype=True) they keep that error and must still save."""
    model = _bert_model(torch.bfloat16, autocast=False)
    assert {layer.geolora_U["default"].dtype for layer in _layers(model)} == {torch.bfloat16}
    opt = geolora.create_geolora_optimizer(model, lr=5e-2, num_training_steps=24)
    data = _data(32)
    ids = torch.tensor(data["input_ids"])
    labels = torch.tensor(data["labels"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(24):
            rows = slice(8 * (i % 4), 8 * (i % 4) + 8)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids[rows], labels=labels[rows]).loss
            loss.float().backward()
            opt.step()
            opt.zero_grad()
        error = _max_basis_error(model)
        assert 1e-3 < error < 5e-2, error  # bf16-level: above the float32 tolerance, inside the bf16 one
        model.save_pretrained(tmp_path / "bf16")
        loaded = peft.PeftModel.from_pretrained(_bert(torch.bfloat16), str(tmp_path / "bf16"), is_trainable=True)
        assert {layer.geolora_U["default"].dtype for layer in _layers(loaded)} == {torch.float32}
        assert _max_basis_error(loaded) > 1e-3
        loaded.save_pretrained(tmp_path / "fp32")
    assert not _geolora_warnings(record), [str(w.message) for w in _geolora_warnings(record)]
    assert (tmp_path / "fp32" / "adapter_model.safetensors").is_file()
