"""TRL's SFTTrainer with a GeoLoRA adapter (scripts/sft_trl.py) on a tiny Llama built from a config, offline."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")

from peft import PeftModel  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

import geolora  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sft_trl  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, and a .jsonl of short sentences."""
    root = tmp_path_factory.mktemp("sft")
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(64):
            n = int(torch.randint(4, 12, (1,), generator=gen))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return root


@torch.no_grad()
def _logits(model, ids):
    return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize(
    "flags",
    [[], ["--gradient-checkpointing", "--reentrant", "--packing", "--bf16"], ["--gradient-checkpointing", "--bf16"]],
    ids=["plain", "gc-reentrant-packing-bf16", "gc-bf16"],
)
def test_sft_with_geolora_trains_saves_reloads_and_exports(flags, assets, tmp_path):
    out, lora = tmp_path / "adapter", tmp_path / "lora"
    args = sft_trl.build_parser().parse_args(
        [
            "--model",
            str(assets / "model"),
            "--data",
            str(assets / "train.jsonl"),
            "--output-dir",
            str(out),
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--r",
            "2",
            "--r-max",
            "8",
            "--export-lora",
            str(lora),
            *flags,
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = sft_trl.run(args)
    model = trainer.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}
    assert len(layers) == 14  # all-linear: q, k, v, o, gate, up, down in 2 layers (not lm_head)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert trainer.state.global_step == 8
    assert all(h.get("geolora/skipped_steps", 0) == 0 for h in trainer.state.log_history)
    assert all(m.geolora_S["default"].abs().sum() > 0 for m in layers.values())  # GeoLoRA's step moved S
    assert trainer.args.gradient_checkpointing == ("--gradient-checkpointing" in flags)
    assert trainer.args.packing == ("--packing" in flags)

    ids = AutoTokenizer.from_pretrained(assets / "model")(["the cat sat on the mat"], return_tensors="pt").input_ids
    # accelerate wraps forward in bf16 autocast under --bf16: compare the adapter's float32 function
    expected = _logits(trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False), ids)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "model"), str(out))
    assert loaded.peft_config["default"].peft_type == "GEOLORA"
    assert geolora.get_ranks(loaded) == geolora.get_ranks(model)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)
    as_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "model"), str(lora))
    assert as_lora.peft_config["default"].peft_type == "LORA"
    torch.testing.assert_close(_logits(as_lora, ids), expected, rtol=0, atol=1e-4)
