"""Where GeoLoRA's extra CPU memory goes: RSS over the steps of one run, in fresh processes side by side.

The evidence preset's Fashion-MNIST runs (EfficientNet-Lite0) show GeoLoRA's peak RSS rising with ``tau``: the smaller
the adapter it keeps, the more memory the process held. This probe trains the same network (random images and labels,
so it needs no data) and records the process's RSS and peak RSS (Linux ``VmHWM``) every ``--log-every`` steps, in one
fresh child process per variant:

* ``geolora``: GeoLoRA (``r = 8``, ``r_max = 32``, ``--tau``) with :func:`geolora.create_geolora_optimizer`;
* ``geolora-mmap``: the same run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so that every allocation of 64 KiB or
  more gets its own mapping and goes back to the OS when freed. Same seed, same data, so the same ranks: what the
  peak loses here is heap memory that glibc kept after the tensors were freed, not live tensors;
* ``lora``: LoRA ``r = 8`` with AdamW, the reference.

Each run also does an evaluation pass (``--eval-batches`` forward passes of 64 images, no grad) every
``--eval-every`` steps, as the benchmark runs do. The result (trajectories, peaks, wall times, the ratios to
``geolora``, provenance) goes to ``<output-dir>/rss-probe-tau<tau>.json``.

    python benchmarks/rss_probe.py --tau 0.35 --steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "geolora": ("geolora", {}),
    "geolora-mmap": ("geolora", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    "lora": ("lora", {}),
}
TARGETS = r".*_blocks\.\d+\._(expand|project)_conv|.*_conv_head"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tau", type=float, default=0.35, help="GeoLoRA's truncation tolerance (default 0.35)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run (default 500)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=50, help="record RSS every N steps (default 50)")
    p.add_argument("--eval-every", type=int, default=100, help="an evaluation pass every N steps (default 100)")
    p.add_argument("--eval-batches", type=int, default=5, help="batches of 64 images per evaluation pass (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["imagenet", "none"], default="imagenet", help="none: random init (tests)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "perf")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "image_size", "log_every", "eval_every", "eval_batches", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.tau < 1:
        p.error(f"--tau must be in [0, 1), got {args.tau}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    return args


def run_child(args: argparse.Namespace, method: str) -> None:
    """Train one run and write one JSON line per record to stdout (the parent reads them)."""
    import peft
    import torch

    import geolora
    from benchmarks import tasks
    from benchmarks.step_time import _vm_kib

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    spec = {"pretrained": "efficientnet-lite0", "image_size": args.image_size, "weights": args.weights}
    model = tasks.load_efficientnet(spec, 10)
    if method == "geolora":
        config = geolora.GeoLoRAConfig(
            r=8, r_max=32, tau=args.tau, lora_alpha=8, target_modules=TARGETS, modules_to_save=["_fc"]
        )
        model = peft.get_peft_model(model, config)
        opt = geolora.create_geolora_optimizer(model, lr=args.lr, num_training_steps=args.steps)
    else:
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, modules_to_save=["_fc"])
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(256, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(0, 10, (256,), generator=gen)
    start_rss = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        out = model(images[idx])
        logits = out.logits if hasattr(out, "logits") else out
        torch.nn.functional.cross_entropy(logits, labels[idx]).backward()
        opt.step()
        opt.zero_grad()
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                for _ in range(args.eval_batches):
                    model(torch.randn(64, 3, args.image_size, args.image_size, generator=gen))
            model.train()
        if step % args.log_every == 0 or step == args.steps:
            rank = sum(geolora.get_ranks(model).values()) if method == "geolora" else None
            row = {
                "step": step,
                "rss_mib": _vm_kib("VmRSS") / 1024,
                "peak_rss_mib": _vm_kib("VmHWM") / 1024,
                "total_rank": rank,
                "elapsed_s": time.perf_counter() - t0,
            }
            print(json.dumps(row), flush=True)
    print(json.dumps({"done": True, "rss_after_setup_mib": start_rss / 1024}), flush=True)


def run_variant(argv: list[str], variant: str, bar) -> dict:
    method, env_extra = VARIANTS[variant]
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", method]
    rows, final = [], None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            if row.get("done"):
                final = row
                continue
            rows.append(row)
            bar.update(row["step"] - bar.n)
            bar.set_postfix(rss=f"{row['rss_mib']:.0f} MiB", peak=f"{row['peak_rss_mib']:.0f} MiB")
        err = proc.stderr.read()
    if proc.returncode != 0 or final is None:
        raise RuntimeError(f"variant {variant!r} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {
        "method": method,
        "env": env_extra,
        "trajectory": rows,
        "peak_rss_mib": rows[-1]["peak_rss_mib"],
        "rss_after_setup_mib": final["rss_after_setup_mib"],
        "wall_s": rows[-1]["elapsed_s"],
    }


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        run_child(args, args.child)
        return None
    from tqdm.auto import tqdm

    from geolora.app import harness

    prov = harness.provenance(" ".join(["python", "benchmarks/rss_probe.py", *argv]), repo=ROOT)
    prov["hardware"]["loadavg_at_start"] = os.getloadavg()
    results = {}
    for variant in args.variants:
        with tqdm(total=args.steps, desc=variant, unit="step") as bar:
            results[variant] = run_variant(argv, variant, bar)
    prov["hardware"]["loadavg_at_end"] = os.getloadavg()
    ref = results.get("geolora")
    ratios = {}
    if ref is not None:
        for name, r in results.items():
            ratios[name] = {
                "peak_rss": r["peak_rss_mib"] / ref["peak_rss_mib"],
                "wall_time": r["wall_s"] / ref["wall_s"],
            }
    out = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "variants": results,
        "ratios_to_geolora": ratios,
        "provenance": prov,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"rss-probe-tau{args.tau:g}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    lines = [f"{'variant':14s} {'peak RSS MiB':>12s} {'wall s':>8s} {'peak / geolora':>15s} {'time / geolora':>15s}"]
    for name, r in results.items():
        q = ratios.get(name, {})
        lines.append(
            f"{name:14s} {r['peak_rss_mib']:12.0f} {r['wall_s']:8.0f} "
            f"{q.get('peak_rss', float('nan')):15.2f} {q.get('wall_time', float('nan')):15.2f}"
        )
    tqdm.write("\n".join(lines) + f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
