"""benchmarks/rss_probe.py: its arguments, one real run of two variants in fresh child processes on a randomly
initialised EfficientNet-Lite0 (the results file, its trajectories and ratios), and a failing child's error."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import rss_probe  # noqa: E402

TINY = ["--weights", "none", "--image-size", "32", "--threads", "1", "--eval-batches", "1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "geolora,bogus"], "--variants: unknown ['bogus']"),
        (["--variants", ","], "--variants: unknown empty list"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--tau", "1.5"], "--tau must be in [0, 1), got 1.5"),
    ],
)
def test_bad_arguments_are_refused_with_the_option_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        rss_probe.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_probe_runs_each_variant_in_a_fresh_process_and_writes_the_results(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    argv = [*TINY, "--steps", "4", "--log-every", "2", "--eval-every", "2", "--tau", "0.2"]
    argv += ["--variants", "geolora,geolora-mmap", "--output-dir", str(tmp_path)]
    out = rss_probe.main(argv)
    saved = json.loads((tmp_path / "rss-probe-tau0.2.json").read_text())
    assert saved["ratios_to_geolora"] == out["ratios_to_geolora"]
    assert set(saved["variants"]) == {"geolora", "geolora-mmap"}
    assert saved["variants"]["geolora-mmap"]["env"] == {"MALLOC_MMAP_THRESHOLD_": "65536"}
    assert saved["variants"]["geolora"]["env"] == {}
    for variant in saved["variants"].values():
        assert variant["method"] == "geolora"
        assert [row["step"] for row in variant["trajectory"]] == [2, 4]
        for row in variant["trajectory"]:
            # VmHWM is the peak of VmRSS: never below it. The rank is a live count of the GeoLoRA layers' ranks.
            assert row["peak_rss_mib"] >= row["rss_mib"] > 0
            assert isinstance(row["total_rank"], int) and row["total_rank"] > 0
        assert variant["peak_rss_mib"] == variant["trajectory"][-1]["peak_rss_mib"] >= variant["rss_after_setup_mib"]
    assert saved["ratios_to_geolora"]["geolora"] == {"peak_rss": 1.0, "wall_time": 1.0}
    mmap = saved["variants"]["geolora-mmap"]
    assert saved["ratios_to_geolora"]["geolora-mmap"]["peak_rss"] == pytest.approx(
        mmap["peak_rss_mib"] / saved["variants"]["geolora"]["peak_rss_mib"]
    )
    assert saved["settings"]["steps"] == 4 and saved["settings"]["tau"] == 0.2
    assert {"command", "git", "versions", "hardware"} <= set(saved["provenance"])
    assert "loadavg_at_end" in saved["provenance"]["hardware"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_a_failing_child_raises_with_its_error(tmp_path):
    # the parent validated nothing here: the child refuses --steps 0 and exits 2, and the parent reports its stderr
    class Bar:
        n = 0

        def update(self, k):
            pass

        def set_postfix(self, **kw):
            pass

    with pytest.raises(RuntimeError, match=r"variant 'lora' failed \(exit 2\)(.|\n)*--steps must be >= 1"):
        rss_probe.run_variant(["--steps", "0"], "lora", Bar())
