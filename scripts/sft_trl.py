"""Supervised fine-tuning of a causal LM with TRL's SFTTrainer and a GeoLoRA adapter.

    pip install "geolora[trl]"
    python scripts/sft_trl.py --model Qwen/Qwen2.5-0.5B --data trl-lib/Capybara --output-dir sft-geolora
    python scripts/sft_trl.py --model ./my-model --data train.jsonl --packing --gradient-checkpointing --bf16

The only GeoLoRA-specific lines are the ``GeoLoRAConfig`` passed as ``peft_config`` and ``GeoLoRACallback()`` in the
callbacks: SFTTrainer builds the PEFT model, the callback runs GeoLoRA's step on the Trainer's optimizer. ``--data``
is a dataset on the Hub or a local ``.jsonl``/``.json``/``.parquet`` file whose rows have ``text`` (language
modelling) or ``messages`` (conversations, with the tokenizer's chat template), as SFTTrainer expects. The adapter is
saved to ``--output-dir``; ``--export-lora DIR`` also writes it as a plain LoRA adapter that stock PEFT loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="causal LM: a Hub id or a local folder")
    p.add_argument("--data", required=True, help="dataset on the Hub, or a local .jsonl/.json/.parquet file")
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (GeoLoRA's step and other trainables)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--packing", action="store_true", help="pack several examples into each sequence")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing (default: not)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--r", type=int, default=8, help="initial rank")
    p.add_argument("--r-max", type=int, default=32, help="largest rank a layer may reach")
    p.add_argument("--tau", type=float, default=None, help="truncation tolerance (default: GeoLoRAConfig's)")
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--export-lora", type=Path, default=None, help="also write a plain LoRA adapter here")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_data(spec: str, split: str):
    from datasets import load_dataset

    path = Path(spec)
    if path.exists():
        kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        if path.suffix not in kinds:
            raise SystemExit(f"--data {spec}: expected a .jsonl, .json or .parquet file, got '{path.suffix}'")
        data = load_dataset(kinds[path.suffix], data_files=str(path), split="train")
    else:
        data = load_dataset(spec, split=split)
    if not ({"text", "messages", "prompt"} & set(data.column_names)):
        raise SystemExit(
            f"--data {spec}: rows need a 'text', 'messages' or 'prompt'/'completion' column; found {data.column_names}"
        )
    return data


def run(args: argparse.Namespace):
    """Train, save (and export); returns the SFTTrainer."""
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise SystemExit("scripts/sft_trl.py needs TRL: pip install 'geolora[trl]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import geolora

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    extra = {} if args.tau is None else {"tau": args.tau}
    peft_config = geolora.GeoLoRAConfig(
        r=args.r, r_max=args.r_max, target_modules=args.target_modules, task_type="CAUSAL_LM", **extra
    )
    config = SFTConfig(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_length=args.max_length,
        packing=args.packing,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": args.reentrant},
        bf16=args.bf16,
        seed=args.seed,
        logging_steps=max(1, args.max_steps // 20),
        save_strategy="no",
        report_to="none",
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),  # bf16 autocast on CPU too
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_data(args.data, args.split),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[geolora.GeoLoRACallback()],
    )
    trainer.train()
    trainer.save_model(str(args.output_dir))
    ranks = geolora.get_ranks(trainer.model)
    print(f"saved the GeoLoRA adapter to {args.output_dir}: {len(ranks)} layers, total rank {sum(ranks.values())}")
    if args.export_lora is not None:
        geolora.export_as_lora(trainer.model, args.export_lora)
        print(f"exported as a plain LoRA adapter to {args.export_lora}")
    return trainer


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
