"""How far a merged model on a bitsandbytes base is from the unmerged one: the numbers behind GeoLoRA's quantized
merge rules (README "A quantized base", geolora/bnb.py).

    python scripts/quantized_merge_errors.py      # -> benchmarks/results/quantized-merge/errors.json

A tiny Llama from a config (hidden 64, 2 layers, all seven projections adapted), loaded through transformers'
``BitsAndBytesConfig`` on CPU, GeoLoRA r = 4 / r_max = 8 trained 6 steps (as tests/contract/test_quantized.py). Relative
errors of the logits, ||a - b|| / ||b||, on one fixed batch:

* 8-bit: the merge as it was before GeoLoRA had bitsandbytes layer types (the plain ``Linear`` wrapped the bnb layer
  and added the update to its int8 storage; today the generic integer-weight refusal would also stop it), a random
  ``init_weights=False`` adapter; today's merge of the same
  adapter; today's merge of the trained adapter, against the base's own 8-bit error (the same adapter on the
  full-precision base);
* 4-bit: the fraction of each layer's update an nf4 requantization of W + dW loses (why 4-bit merges are refused),
  and with S x 200 (an update large enough to survive) the merged model's error against the base's own 4-bit error.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


def main() -> int:
    warnings.simplefilter("ignore")
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    import geolora
    import geolora.model as geolora_model
    from geolora.bnb import dequantize, quantized_like

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(work / "base")
    quant = {
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    }

    def base(kind=None):
        if kind is None:
            return AutoModelForCausalLM.from_pretrained(work / "base")
        return AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=quant[kind], device_map="cpu")

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(99))

    @torch.no_grad()
    def logits(model):
        return model.eval()(input_ids=ids).logits.float()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def layers(model):
        return {n: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}

    def trained(kind):
        model = peft.prepare_model_for_kbit_training(base(kind), use_gradient_checkpointing=False)
        torch.manual_seed(1)
        model = peft.get_peft_model(
            model, geolora.GeoLoRAConfig(r=4, r_max=8, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        opt = geolora.create_geolora_optimizer(model, lr=1e-2, num_training_steps=6)
        for step in range(6):
            x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        return model

    def own_error(model):  # the same adapter on the full-precision base
        model.save_pretrained(work / "adapter")
        return rel(logits(model), logits(peft.PeftModel.from_pretrained(base(), str(work / "adapter"))))

    out = {}
    # 8-bit: before and after the bitsandbytes layer types, one random adapter
    # (before: no bnb dispatch, and no refusal of integer weights, which now also catches that path)
    for before in (True, False):
        original = geolora_model.dispatch_bnb, geolora.GeoLoRALayer.check_mergeable
        if before:
            geolora_model.dispatch_bnb = lambda *a, **k: None
            geolora.GeoLoRALayer.check_mergeable = lambda *a, **k: None
        try:
            torch.manual_seed(1)
            model = peft.get_peft_model(
                base("8bit"),
                geolora.GeoLoRAConfig(r=4, target_modules="all-linear", init_weights=False, task_type="CAUSAL_LM"),
            )
            unmerged = logits(model)
            merged = logits(model.merge_and_unload())
        finally:
            geolora_model.dispatch_bnb, geolora.GeoLoRALayer.check_mergeable = original
        label = "plain_linear_before" if before else "bnb_layer_type"
        out[f"8bit_random_adapter_merge_and_unload_error_{label}"] = rel(merged, unmerged)
    model = trained("8bit")
    unmerged = logits(model)
    out["8bit_trained_base_own_quantization_error"] = own_error(model)
    model.merge_adapter()
    out["8bit_trained_merge_error"] = rel(logits(model), unmerged)

    # 4-bit: what requantizing W + dW loses, per layer; then an update large enough to survive
    model = trained("4bit")
    lost = []
    with torch.no_grad():
        for m in layers(model).values():
            b = m.get_base_layer()
            target = dequantize(b.weight, b) + m.get_delta_weight("default").float()
            lost.append(
                float(
                    (dequantize(quantized_like(b.weight, target), b) - target).norm()
                    / m.get_delta_weight("default").norm()
                )
            )
    out["4bit_trained_lost_fraction_per_layer"] = {"min": min(lost), "max": max(lost), "first_layer": lost[0]}
    with torch.no_grad():
        for m in layers(model).values():
            m.geolora_S["default"].mul_(200.0)
    unmerged = logits(model)
    out["4bit_large_update_base_own_quantization_error"] = own_error(model)
    with torch.no_grad():  # the merge the refusal prevents: dequantize, add, requantize, every layer
        for m in layers(model).values():
            b = m.get_base_layer()
            b.weight = quantized_like(b.weight, dequantize(b.weight, b) + m.get_delta_weight("default").float())
            m.merged_adapters.append("default")
    out["4bit_large_update_merge_error"] = rel(logits(model), unmerged)

    from geolora.app.harness import provenance, write_results

    prov = provenance(
        "python scripts/quantized_merge_errors.py",
        repo=ROOT,
        packages=("torch", "transformers", "peft", "bitsandbytes"),
    )
    code_paths = [p for p in prov["git"]["dirty_paths"] or () if p.startswith(("geolora/", "scripts/"))]
    result = {
        "command": prov["command"],
        "git_revision": prov["git"]["revision"],
        "git_dirty": bool(code_paths),
        "versions": {p: v for p, v in prov["versions"].items() if p != "python"},
        "machine": f"{platform.machine()}, {prov['versions']['python']}",
        "relative_logit_errors": out,
    }
    write_results(ROOT / "benchmarks" / "results" / "quantized-merge" / "errors.json", result)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
