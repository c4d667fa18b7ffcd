"""GeoLoRA on bitsandbytes-quantized bases (8-bit ``Linear8bitLt``, 4-bit nf4 ``Linear4bit``), on CPU.

A tiny Llama built from a config is saved once and loaded through transformers' ``BitsAndBytesConfig`` (bitsandbytes
runs on CPU), prepared with ``prepare_model_for_kbit_training`` and trained with GeoLoRA's step, as a QLoRA user
would. Merging is measured against the quantization error of the base itself, measured side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

import geolora  # noqa: E402
from geolora import bnb as geolora_bnb  # noqa: E402
from geolora.integrator import orthonormality_error  # noqa: E402

VOCAB = 96
QUANT = {
    "8bit": dict(load_in_8bit=True),
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}
LAYER_TYPES = {
    "8bit": (bnb.nn.Linear8bitLt, geolora_bnb.Linear8bitLt),
    "4bit": (bnb.nn.Linear4bit, geolora_bnb.Linear4bit),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _base(base_dir, kind=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind is None:
            return AutoModelForCausalLM.from_pretrained(base_dir)
        return AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu"
        )


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits.float()


@torch.no_grad()
def _logits_plain(model, x):
    return model.eval()(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _train(model, steps=6, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        model = get_peft_model(
            model, geolora.GeoLoRAConfig(r=4, r_max=8, target_modules="all-linear", task_type="CAUSAL_LM", **config)
        )
        opt = geolora.create_geolora_optimizer(model, lr=1e-2, num_training_steps=steps)
        losses = []
        for step in range(steps):
            ids = _ids(step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return model, losses


def _geolora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_dispatch_train_save_reload(kind, base_dir, tmp_path):
    bnb_cls, geolora_cls = LAYER_TYPES[kind]
    model, losses = _train(_base(base_dir, kind))
    layers = _geolora_layers(model)
    assert len(layers) == 14 and all(type(m) is geolora_cls for m in layers.values())
    assert all(isinstance(m.get_base_layer(), bnb_cls) for m in layers.values())
    assert all(not m.get_base_layer().weight.requires_grad for m in layers.values())  # the base stays frozen
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for m in layers.values():
        k = m.r["default"]
        assert orthonormality_error(m.geolora_U["default"], k) < 1e-4
        assert orthonormality_error(m.geolora_V["default"], k) < 1e-4
    ids = _ids(99)
    out = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(base_dir, kind), str(tmp_path))
    assert all(type(m) is geolora_cls for m in _geolora_layers(loaded).values())
    assert loaded.get_ranks() == model.get_ranks()
    torch.testing.assert_close(_logits(loaded, ids), out, rtol=0, atol=1e-5)


def test_8bit_merge_is_within_the_quantization_error_and_unmerge_is_exact(base_dir, tmp_path):
    model, _ = _train(_base(base_dir, "8bit"))
    ids = _ids(99)
    out = _logits(model, ids)
    # the quantization error of the base itself: the same adapter on the full-precision base
    model.save_pretrained(tmp_path)
    quant_err = _rel(out, _logits(PeftModel.from_pretrained(_base(base_dir), str(tmp_path)), ids))
    assert quant_err > 0

    with pytest.warns(UserWarning, match="requantizes its weight"):
        model.merge_adapter()
    merged_err = _rel(_logits(model, ids), out)
    assert merged_err <= 2 * quant_err, (merged_err, quant_err)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, ids), out, rtol=0, atol=0)  # the weights before the merge, exactly

    with pytest.warns(UserWarning, match="requantizes its weight"):
        unloaded = model.merge_and_unload()
    assert not _geolora_layers(unloaded)
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert _rel(_logits(unloaded, ids), out) <= 2 * quant_err


def test_4bit_merge_that_would_lose_the_update_is_refused_before_anything_changes(base_dir):
    model, _ = _train(_base(base_dir, "4bit"))
    ids = _ids(99)
    out = _logits(model, ids)
    weights = {n: m.get_base_layer().weight for n, m in _geolora_layers(model).items()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(
            ValueError,
            match=r"refusing to merge adapter 'default' into the 4-bit .* layer "
            r"'model\.layers\.0\.self_attn\.q_proj'.*unquantized base",
        ):
            merge()
        layers = _geolora_layers(model)
        assert len(layers) == 14 and not any(m.merged for m in layers.values())
        assert all(m.get_base_layer().weight is weights[n] for n, m in layers.items())
        torch.testing.assert_close(_logits(model, ids), out, rtol=0, atol=0)


def test_4bit_merge_is_refused_even_for_a_large_update(base_dir):
    model, _ = _train(_base(base_dir, "4bit"))
    layer = _geolora_layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.geolora_S["default"].mul_(200.0)  # an update well above the nf4 step
    with pytest.raises(ValueError, match="4-bit merges are not supported"):
        layer.merge()
    assert not layer.merged


def test_export_lora_from_a_quantized_run_loads_in_plain_peft(base_dir, tmp_path):
    model, _ = _train(_base(base_dir, "8bit"))
    ids = _ids(99)
    expected = _logits(model, ids)
    geolora.export_as_lora(model, tmp_path / "lora")
    code = textwrap.dedent(f"""
        import json, sys, warnings, torch
        warnings.simplefilter("ignore")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits.float(), {str(tmp_path / "out.pt")!r})
        print(json.dumps({{"geolora": "geolora" in sys.modules, "peft_type": model.peft_config["default"].peft_type,
                           "layer": type(model.base_model.model.model.layers[0].self_attn.q_proj).__module__}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"geolora": False, "peft_type": "LORA", "layer": "peft.tuners.lora.bnb"}
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-4)


def test_other_quantized_weights_train_and_refuse_to_merge_clearly():
    """torchao (a quantized tensor subclass on nn.Linear): GeoLoRA trains on it; a merge, which has no requantizing
    path here, is refused naming the layer before anything changes (it used to fail inside torchao's dispatch)."""
    torchao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    torchao.quantize_(net, torchao.Int8WeightOnlyConfig())
    model = get_peft_model(net, geolora.GeoLoRAConfig(r=4, target_modules=["0", "2"], tau_warmup_steps=0))
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    x = torch.randn(4, 64)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(m.geolora_S["default"].abs().sum() > 0 for m in _geolora_layers(model).values())
    out = _logits_plain(model, x)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge into layer '0': its weight is a Int8Tensor"):
            merge()
        assert not any(m.merged for m in _geolora_layers(model).values())
        torch.testing.assert_close(_logits_plain(model, x), out, rtol=0, atol=0)
