"""Smoke test of benchmarks/step_time.py on a tiny BERT: it runs every method, writes the results file with
provenance, the ratios and the memory comparison (fresh subprocesses)."""

import json
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
            "--memory-repeats",
            "1",
            "--memory-steps",
            "1",
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
    assert result["memory"]["geolora_capacity_r_max_over_lora_r_max"] > 0
    prov = result["provenance"]
    assert prov["git"]["revision"] and prov["versions"]["torch"] and prov["seed"] == 0
    assert prov["hardware"]["device"] == "cpu" and prov["command"]
    storage = result["adapter_storage"]
    assert storage["geolora_capacity_r_max_params"] < storage["research_code_min_in_out_params"]
