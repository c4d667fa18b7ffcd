"""Smoke test of benchmarks/step_time.py on a tiny BERT: it runs every method and writes the results file with
provenance and the ratios; the memory comparison is tested as one real fresh child process plus the aggregation of
the children's rows (each child is a fresh interpreter, about 12 s to start here)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_step_time_benchmark_runs_on_a_tiny_model(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import step_time

    step_time.main(
        [
            "--size",
            "tiny",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--no-memory",
            "--profile-steps",
            "10",
            "--methods",
            "lora,adalora,geolora,geolora-trainer",
            "--output-dir",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert set(result["timing"]) == {"lora", "adalora", "geolora", "geolora-trainer"}
    geo = result["timing"]["geolora"]
    assert {"forward", "backward", "optimizer", "wrapped", "geolora", "cpu_total"} <= set(geo["median_ms"])
    assert geo["ratio_to_lora_median_of_round_ratios"] > 0
    assert "geolora::qr" in result["geolora_step_breakdown"]
    assert "memory" not in result or result["memory"] is None
    prov = result["provenance"]
    assert prov["git"]["revision"] and prov["versions"]["torch"] and prov["seed"] == 0
    assert prov["hardware"]["device"] == "cpu" and prov["command"]
    storage = result["adapter_storage"]
    assert storage["geolora_capacity_r_max_params"] < storage["research_code_min_in_out_params"]


@pytest.mark.slow
def test_memory_child_is_a_fresh_process_reporting_its_peak():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--size", "tiny", "--memory-child", "geolora"]
        + ["--memory-rank", "4", "--memory-steps", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["method"] == "geolora" and row["rank"] == 4
    assert row["peak"] >= row["before"] > 0 and row["delta"] == row["peak"] - row["before"]


def test_memory_comparison_takes_the_median_of_the_children(monkeypatch):
    """measure_memory launches one child per (method, rank) and repeat, and compares the medians."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import step_time

    deltas = iter([100, 50, 40, 60, 300, 70, 20, 80])  # two repeats of lora r_max, geolora r, lora r, adalora r
    launched = []

    def fake_run(cmd, **kwargs):
        method, rank = cmd[cmd.index("--memory-child") + 1], int(cmd[cmd.index("--memory-rank") + 1])
        launched.append((method, rank))
        row = {"method": method, "rank": rank, "before": 1, "peak": 1, "delta": next(deltas), "measure": "m"}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(step_time.subprocess, "run", fake_run)
    args = argparse.Namespace(size="tiny", memory_repeats=2, memory_steps=1, seed=0, lr=1e-3, device="cpu", threads=1)
    size = step_time.SIZES["tiny"]
    out = step_time.measure_memory(args, size)
    r, r_max = size["r"], size["r_max"]
    assert launched == [("lora", r_max), ("geolora", r), ("lora", r), ("adalora", r)] * 2
    assert out["median_delta_bytes"][f"lora_r{r_max}"] == 200 and out["median_delta_bytes"][f"geolora_r{r}"] == 60
    assert out["geolora_capacity_r_max_over_lora_r_max"] == pytest.approx(60 / 200)
