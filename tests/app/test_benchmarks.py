"""Benchmark runner and report: the smoke preset end to end, and the Hub code paths on tiny offline fixtures.

The smoke preset (configs/bench/smoke.yaml) trains tiny BERT / DeBERTa-v2 / ViT models built from configs on data the
runner writes to a temp dir in the real tasks' formats, for all three methods, then the report turns the cell files
into tables and plots. The GLUE / CIFAR Hub paths are exercised with ``datasets.load_dataset`` replaced by fixtures
with the Hub sets' columns and features.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import tasks as T  # noqa: E402

from geolora.app import data as gdata  # noqa: E402
from tests.conftest import torchrun_command  # noqa: E402

CELL_FIELDS = (
    "provenance",
    "test",
    "val",
    "lr",
    "lr_grid",
    "trainable_params_kept",
    "adapter_params_kept",
    "adapter_file_bytes",
    "train_time_s",
    "median_step_s",
    "peak_rss_bytes",
    "final_ranks",
    "runs",
)


def _env():
    return dict(
        os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )


def _main(script: str, *argv: str) -> int:
    """``benchmarks/<script>.py`` run in this process (``main(argv)``): the same code path as the command without a
    fresh interpreter (importing torch, transformers and peft again costs about 12 s per start on 2 cores). The
    process-wide settings the runner changes (torch threads, transformers' verbosity and progress bars) are restored.
    The torchrun test still launches the real command."""
    import importlib

    import transformers

    module = importlib.import_module(script)
    threads, verbosity = torch.get_num_threads(), transformers.utils.logging.get_verbosity()
    try:
        return module.main(list(argv))
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("smoke-results")
    for k, v in _env().items():
        monkeypatch_module.setenv(k, v)
    assert _main("run", "--preset", "smoke", "--results-dir", str(out), "--threads", "1") == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_smoke_preset_writes_every_cell_with_provenance(smoke_results):
    cells = sorted((smoke_results / "smoke").glob("*.json"))
    names = {p.stem for p in cells}
    for method in ("geolora", "lora", "adalora"):
        for task, seed in (("sentiment", 0), ("sentiment", 1), ("rte", 0), ("stsb", 0), ("cifar10", 0)):
            assert f"{method}--{task}--{seed}" in names
    for path in cells:
        cell = json.loads(path.read_text())
        assert cell["status"] == "done"
        for key in CELL_FIELDS:
            assert key in cell, (path.name, key)
        prov = cell["provenance"]
        assert prov["git"]["revision"] and prov["versions"]["peft"] and prov["hardware"]["cpu_count"]
        assert set(prov["metric_sources"].values()) <= {"hub", "geolora.app.metrics", "sklearn"}
        assert cell["adapter_file_bytes"] > 0 and cell["median_step_s"] > 0 and cell["peak_rss_bytes"] > 0
        run = cell["runs"][cell["selected"][str(cell["budgets"][0])]]
        curve = run["val_curve"]  # eval_every: 2 in the smoke preset
        assert [c["step"] for c in curve] == list(range(2, run["total_steps"] + 1, 2))
        assert all(cell["primary_metric"] in c for c in curve)
        traj = run["rank_trajectory"]
        assert len(traj["steps"]) == run["total_steps"] + 1 and len(traj["layers"]) == len(cell["final_ranks"])
        r = cell["budgets"][0]
        ranks = list(cell["final_ranks"].values())
        if cell["method"] == "lora":
            assert set(ranks) == {r}
        elif cell["method"] == "adalora":  # masked to the target budget: average rank r, init_r = 1.5 r at step 0
            assert sum(ranks) == r * len(ranks) and set(traj["ranks"][0]) == {3}
        else:
            assert all(1 <= k <= 2 * r for k in ranks) and set(traj["ranks"][0]) == {r}
    here = json.loads((smoke_results / "smoke" / "geolora--cifar10-pretrained-here--0.json").read_text())
    pretrained = Path(here["provenance"]["pretrained_in_benchmark"])
    assert (pretrained / "PRETRAINED_HERE.txt").is_file() and (pretrained / "config.json").is_file()
    stsb = json.loads((smoke_results / "smoke" / "geolora--stsb--0.json").read_text())
    assert set(stsb["test"]) >= {"pearson", "spearmanr"}
    mrpc_like = json.loads((smoke_results / "smoke" / "lora--rte--0.json").read_text())
    assert "accuracy" in mrpc_like["test"]


def test_first_seed_lr_selection_reruns_only_the_selected_lr(smoke_results):
    for method in ("geolora", "lora"):
        first = json.loads((smoke_results / "smoke" / f"{method}--cifar10-efficientnet--0.json").read_text())
        later = json.loads((smoke_results / "smoke" / f"{method}--cifar10-efficientnet--1.json").read_text())
        assert sorted(run["lr"] for run in first["runs"]) == [0.01, 0.03]
        assert [run["lr"] for run in later["runs"]] == [first["lr"]]
        assert later["lr_selected_on_seed"] == 0 and first["lr_selected_on_seed"] == 0
        assert len(later["final_ranks"]) == 32  # every 1x1 conv of EfficientNet-Lite0 carries an adapter


def test_first_seed_lr_selection_needs_the_first_seed(tmp_path):
    with pytest.raises(SystemExit, match="run seed 0 first"):
        _main(
            "run",
            "--preset",
            "smoke",
            "--results-dir",
            str(tmp_path),
            "--tasks",
            "cifar10-efficientnet",
            "--methods",
            "lora",
            "--seeds",
            "1",
        )


def test_config_given_as_a_relative_path(tmp_path, monkeypatch):
    """A relative ``--config`` is read from the working directory, inside the repository or outside it, and a run
    from it records the config file, not the default preset's name."""
    import run as R

    monkeypatch.chdir(REPO)
    assert R.load_preset(None, "configs/bench/smoke.yaml")["_path"] == "configs/bench/smoke.yaml"
    (tmp_path / "mine.yaml").write_text((REPO / "configs" / "bench" / "smoke.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert R.load_preset(None, "mine.yaml")["_path"] == "mine.yaml"
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "results"
    argv = ["--config", "mine.yaml", "--results-dir", str(out), "--threads", "1"]
    assert _main("run", *argv, "--tasks", "sentiment", "--methods", "lora", "--seeds", "0") == 0
    cell = json.loads((out / "smoke" / "lora--sentiment--0.json").read_text())
    assert cell["provenance"]["preset"] is None and cell["provenance"]["config_file"] == "mine.yaml"


def test_runs_table_lists_every_run_interrupted_cells_included(tmp_path):
    """``report.py --runs``: one row per run, an interrupted cell's (its file holds only ``runs``: the rest comes
    from its path) as well as a finished one's; other JSON files are skipped and a broken cell file is named."""
    suite = tmp_path / "sweep"
    suite.mkdir()
    run = {"r": 8, "lr": 1e-3, "val": {"accuracy": 0.9}, "test": {"accuracy": 0.8}, "adapter_params_kept": 1234}
    run |= {"train_loss": [[1, 0.5], [2, 0.4], [3, 0.3], [4, 0.2]], "median_step_s": 0.1}
    (suite / "geolora--tweets--0.partial.json").write_text(json.dumps({"runs": [run]}))
    collapsed = run | {"lr": 0.1, "val": {"accuracy": float("nan")}, "test": {"accuracy": float("nan")}}
    done = {"suite": "sweep", "method": "lora", "task": "tweets", "seed": 1, "status": "done", "runs": [collapsed]}
    (suite / "lora--tweets--1.json").write_text(json.dumps(done))
    (suite / "notes.json").write_text(json.dumps({"runs": "not a cell"}))
    assert _main("report", "--runs", "--results-dir", str(tmp_path)) == 0
    rows = [line for line in (tmp_path / "runs.md").read_text().splitlines() if line.startswith("| sweep")]
    assert rows == [
        "| sweep | geolora | tweets | 0 | partial | 8 | 0.001 | 90.0 | 80.0 | 1,234 | 0.300 | 0.100 |",
        "| sweep | lora | tweets | 1 | done | 8 | 0.1 | diverged | diverged | 1,234 | 0.300 | 0.100 |",
    ]
    (suite / "adalora--tweets--0.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match=r"adalora--tweets--0\.json: not a valid cell file"):
        _main("report", "--runs", "--results-dir", str(tmp_path))


def test_efficientnet_pointwise_swap_keeps_outputs_and_freezes_batchnorm():
    import copy

    import peft
    import yaml
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    swapped = copy.deepcopy(net)
    assert T.plain_pointwise_convs(swapped) == 32
    assert all(
        type(m) is torch.nn.Conv2d for n, m in swapped.named_modules() if n.endswith(("_expand_conv", "_project_conv"))
    )
    torch.testing.assert_close(swapped(x), net(x))

    cnn = yaml.safe_load((REPO / "configs" / "bench" / "cpu.yaml").read_text())["suites"]["cpu-vision-cnn"]["model"]
    spec = dict(cnn, weights="none", image_size=32)
    model = T.load_base_model(spec, 10)
    cfg = T.adapter_config("geolora", 2, spec, {}, 10, None)
    pm = peft.get_peft_model(model, cfg)
    from geolora import find_geolora_layers, unwrap_model

    layers = find_geolora_layers(unwrap_model(pm))
    assert len(layers) == 32 and all(isinstance(layer.get_base_layer(), torch.nn.Conv2d) for _, layer in layers)
    bn = next(m for m in pm.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    pm.train()
    assert not bn.training
    out = pm(pixel_values=x, labels=torch.tensor([1, 2]))
    out.loss.backward()
    torch.testing.assert_close(bn.running_mean, before)
    assert out.logits.shape == (2, 10) and all(
        p.grad is not None for n, p in pm.named_parameters() if p.requires_grad and "geolora_S" in n
    )


def test_smoke_grid_suite_marks_divergence_and_selects_on_val(smoke_results):
    cell = json.loads((smoke_results / "smoke-robust" / "adalora--sentiment--0.json").read_text())
    assert {(run["r"], run["lr"]) for run in cell["runs"]} == {(2, 0.01), (2, 30.0), (4, 0.01), (4, 30.0)}
    for r, idx in cell["selected"].items():
        chosen = cell["runs"][idx]
        assert not chosen["diverged"]
        same_budget = [run for run in cell["runs"] if run["r"] == int(r) and not run["diverged"]]
        assert chosen["val"]["accuracy"] == max(run["val"]["accuracy"] for run in same_budget)


def test_rerun_skips_finished_cells_and_resumes_partial_ones(smoke_results, capsys):
    assert _main("run", "--preset", "smoke", "--results-dir", str(smoke_results), "--dry-run") == 0
    stdout = capsys.readouterr().out
    assert "todo" not in stdout and stdout.count("done") == 16 + 4 + 2
    # an interrupted cell: its finished grid points are kept in *.partial.json and not trained again
    cell_path = smoke_results / "smoke" / "lora--sentiment--1.json"
    cell = json.loads(cell_path.read_text())
    cell_path.unlink()
    partial = cell_path.with_name("lora--sentiment--1.partial.json")
    partial.write_text(json.dumps({"runs": cell["runs"][:1]}))
    rc = _main(
        "run",
        "--preset",
        "smoke",
        "--results-dir",
        str(smoke_results),
        "--tasks",
        "sentiment",
        "--methods",
        "lora",
        "--seeds",
        "1",
        "--threads",
        "1",
    )
    assert rc == 0
    redone = json.loads(cell_path.read_text())
    assert redone["runs"][0] == cell["runs"][0]  # reused, not retrained
    assert len(redone["runs"]) == 2 and not partial.exists()


def test_rerun_adds_label_counts_to_finished_cells_and_warns_where_it_cannot(smoke_results, caplog):
    """A cell finished before label counts were recorded gets them from the data on the next run (nothing trained,
    nothing else in the file changed); one whose recorded split sizes differ from the data's is left as it was."""
    args = ("run", "--preset", "smoke", "--results-dir", str(smoke_results), "--tasks", "sentiment", "--threads", "1")
    path = smoke_results / "smoke" / "lora--sentiment--0.json"
    cell = json.loads(path.read_text())
    counts = cell["provenance"].pop("label_counts")
    path.write_text(json.dumps(cell))
    assert _main(*args, "--methods", "lora", "--seeds", "0") == 0
    again = json.loads(path.read_text())
    assert again["provenance"].pop("label_counts") == counts and again == cell
    cell["provenance"]["split_sizes"]["train"] += 1
    path.write_text(json.dumps(cell))
    with caplog.at_level(logging.WARNING, logger="benchmarks.run"):
        assert _main(*args, "--methods", "lora", "--seeds", "0") == 0
    assert "split sizes differ" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text()) == cell  # untouched
    cell["provenance"]["split_sizes"]["train"] -= 1
    cell["provenance"]["label_counts"] = counts
    path.write_text(json.dumps(cell))


def test_report_writes_tables_and_plots(smoke_results):
    assert _main("report", "--results-dir", str(smoke_results)) == 0
    report = (smoke_results / "report.md").read_text()
    assert "| task | metric | geolora | lora | adalora |" in report and "± " in report
    assert "| r \\ lr | 0.01 | 30 |" in report
    summary = (smoke_results / "summary.md").read_text()
    assert summary.startswith("| suite / task | metric | geolora | lora | adalora |")
    assert "smoke / stsb | pearson" in summary
    assert "## Summary" in report and "Learning-rate grid: validation metric" in report
    plots = {p.name for p in (smoke_results / "plots").glob("*.png")}
    assert {
        "metric-vs-params-smoke.png",
        "ranks-smoke-sentiment.png",
        "robustness-smoke-robust-sentiment.png",
        "params-over-steps-smoke-robust-sentiment.png",
    } <= plots


# ----------------------------------------------------------------------------------------------- Hub code paths
@pytest.mark.parametrize("task", sorted(t for t in gdata.GLUE_TASKS if t != "wnli"))
def test_glue_tasks_from_data_dir(tmp_path, task):
    T.write_glue_fixture(tmp_path, task)
    data = T.load_raw_task(task, data_dir=str(tmp_path))
    first, second, num_labels, metrics = gdata.GLUE_TASKS[task]
    assert data.has_pair == (second is not None) and data.num_labels == num_labels
    assert data.metric_names == metrics and len(data.train) == 48
    splits = T.make_splits(data, None, 8, None, 0)
    assert len(splits.train) == 40 and len(splits.val) == 8 and len(splits.test) == 16


def _glue_dataset_dict(tmp_path, task):
    import datasets
    import pandas as pd

    first, second, num_labels, _ = gdata.GLUE_TASKS[task]
    folder = T.write_glue_fixture(tmp_path, task)
    feats = {first: datasets.Value("string")} | ({second: datasets.Value("string")} if second else {})
    feats["label"] = (
        datasets.Value("float32")
        if num_labels == 1
        else datasets.ClassLabel(names=[f"c{i}" for i in range(num_labels)])
    )
    feats["idx"] = datasets.Value("int32")
    features = datasets.Features(feats)
    split = lambda name: datasets.Dataset.from_pandas(pd.read_csv(folder / f"{name}.csv"), features=features)  # noqa: E731
    eval_name = gdata.GLUE_EVAL_SPLIT.get(task, "validation")
    return datasets.DatasetDict({"train": split("train"), eval_name: split("validation")})


@pytest.mark.parametrize("task", ["mnli", "stsb", "cola"])
def test_glue_hub_path_calls_load_dataset(tmp_path, monkeypatch, task):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append(args)
        return _glue_dataset_dict(tmp_path, task)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = T.load_raw_task(task)
    assert calls == [("glue", task)]
    assert "text" in data.train.column_names and "idx" not in data.train.column_names
    assert data.is_regression == (task == "stsb")


def test_cifar_hub_path_and_lazy_pixels(tmp_path, monkeypatch):
    import datasets

    folder = T.write_image_fixture(tmp_path, "cifar10", per_class=2, test_per_class=1)
    local = gdata.load_image_folder(folder)

    def fake_load_dataset(name, *args, **kwargs):
        assert name == "cifar10"
        labels = datasets.ClassLabel(names=local.label_names)  # the Hub set's feature type
        rename = lambda ds: ds.rename_column("image", "img").cast_column("label", labels)  # noqa: E731
        return datasets.DatasetDict({"train": rename(local.train), "test": rename(local.eval)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = T.load_raw_task("cifar10")
    splits = T.make_splits(data, None, 4, None, 0)
    transform = gdata.ImageTransform(None, image_size=16, channels=3)
    eager = T.prepare_images(splits, transform)
    lazy = T.prepare_images(splits, transform, precompute_limit=0)
    a = gdata.image_collator([eager[0][i] for i in range(3)])
    b = gdata.image_collator([lazy[0][i] for i in range(3)])
    assert a["pixel_values"].shape == (3, 3, 16, 16)
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert a["labels"].tolist() == b["labels"].tolist()


def test_budget_rule_and_full_preset_plan():
    import run as R

    spec = {"targets": ["q_proj"], "modules_to_save": ["classifier"]}
    ada = T.adapter_config("adalora", 8, spec, {}, 100, None)
    geo = T.adapter_config("geolora", 8, spec, {"tau": 0.1}, 100, None)
    lora = T.adapter_config("lora", 8, spec, {}, 100, None)
    assert (ada.init_r, ada.target_r, ada.total_step, ada.tinit, ada.tfinal) == (12, 8, 100, 10, 20)
    assert (geo.r, geo.r_max, geo.tau, lora.r) == (8, 16, 0.1, 8)
    capped = T.adapter_config("geolora", 8, spec, {"geolora_r_max_factor": 1}, 100, None)
    assert capped.r_max == 8
    # a knob a suite leaves unset is GeoLoRAConfig's default, not a benchmark-only one
    import geolora

    default = geolora.GeoLoRAConfig()
    assert (capped.tau, capped.s_update) == (default.tau, default.s_update)
    stated = T.adapter_config("geolora", 8, spec, {"tau": 0.35, "s_update": "sgd"}, 100, None)
    assert (stated.tau, stated.s_update) == (0.35, "sgd")
    with pytest.raises(ValueError, match="geolora_r_max_factor"):
        T.adapter_config("geolora", 8, spec, {"geolora_r_max_factor": 0.5}, 100, None)

    cfg = R.load_preset("full", None)
    cells = R.plan_cells(cfg, {"suites": set(), "tasks": set(), "methods": set(), "seeds": set()})
    glue = [c for c in cells if c["suite"] == "glue"]
    assert {c["task"] for c in glue} == {"cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"}
    assert len(glue) == 8 * 3 * 5
    rte = next(c for c in glue if c["task"] == "rte")
    assert rte["lrs"] == pytest.approx([6e-4, 1.2e-3, 2.4e-3]) and rte["hp"]["epochs"] == 80
    assert rte["hp"]["batch_size"] == 32 and rte["model"]["pretrained"] == "microsoft/deberta-v3-base"
    vit = [c for c in cells if c["suite"] == "vit"]
    assert {c["task"] for c in vit} == {"cifar10", "cifar100"}
    assert vit[0]["model"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


@pytest.mark.slow
def test_runner_under_torchrun_two_processes(tmp_path):
    """DDP with 2 CPU processes (gloo) through torchrun, the launcher `accelerate launch --multi_gpu` runs on GPUs
    (`accelerate launch --cpu` starts a single process on one machine): every cell is trained by both processes,
    written once by the main process, and records the world size; the step count accounts for the sharded batches."""
    proc = subprocess.run(
        torchrun_command(
            "benchmarks/run.py",
            "--preset",
            "smoke",
            "--suites",
            "smoke",
            "--tasks",
            "sentiment",
            "--methods",
            "geolora",
            "adalora",
            "--seeds",
            "0",
            "--results-dir",
            str(tmp_path),
            "--threads",
            "1",
        ),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in (tmp_path / "smoke").iterdir())
    assert files == ["adalora--sentiment--0.json", "geolora--sentiment--0.json"]
    single = None
    for name in files:
        cell = json.loads((tmp_path / "smoke" / name).read_text())
        assert cell["provenance"]["hardware"]["world_size"] == 2 and cell["test"] is not None
        assert cell["adapter_file_bytes"] > 0
        single = cell["runs"][0]["total_steps"]
    n_train = cell["provenance"]["split_sizes"]["train"]
    counts = cell["provenance"]["label_counts"]  # what a constant prediction scores, per split
    assert {k: sum(v) for k, v in counts.items()} == cell["provenance"]["split_sizes"]
    assert single == 2 * -(-n_train // (16 * 2))  # 2 epochs of batch 16 per process, 2 processes


def test_rank_study_summary_reads_partial_cells_and_prefers_finished_ones(tmp_path):
    import rank_study

    def run(r, finals, acc):
        ranks = [[r, r], [r + 3, r + 3], finals]
        return {
            "r": r,
            "adapter_params_kept": 100 * sum(finals),
            "test": {"accuracy": acc},
            "rank_trajectory": {"layers": ["a", "b"], "steps": [0, 100, 300], "ranks": ranks},
        }

    suite = tmp_path / "rank-init"
    suite.mkdir()
    (suite / "geolora--t1--0.partial.json").write_text(json.dumps({"runs": [run(2, [5, 5], 0.5)]}))
    (suite / "geolora--t1--0.json").write_text(json.dumps({"runs": [run(16, [6, 6], 0.9), run(2, [4, 6], 0.8)]}))
    (suite / "geolora--t2--0.partial.json").write_text(json.dumps({"runs": [run(4, [3, 3], 0.7)]}))
    assert rank_study.main(["--results-dir", str(tmp_path), "--suite", "rank-init"]) == 0
    text = (suite / "summary.md").read_text()
    assert "| t1 | 2 | 10 / 10 / 10 | 100 | 1,000 | 0.800 |" in text  # the finished file, not the partial one
    assert "| t1 | 16 | 38 / 12 / 12 | 300 | 1,200 | 0.900 |" in text
    assert "max/min 1.20x (+-9% around the midpoint)" in text
    assert "| t2 | 4 | 14 / 6 / 6 | 300 | 600 | 0.700 |" in text and text.count("spread") == 1
    assert (suite / "rank-over-steps.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        rank_study.main(["--results-dir", str(tmp_path), "--suite", "missing"])

    seeds = tmp_path / "rank-init-seeds"  # the same cells with another training seed: the seed-spread table
    seeds.mkdir()
    (seeds / "geolora--t1--1.json").write_text(json.dumps({"runs": [run(16, [6, 5], 0.88), run(2, [5, 5], 0.84)]}))
    assert (
        rank_study.main(["--results-dir", str(tmp_path), "--suite", "rank-init", "--seeds-with", "rank-init-seeds"])
        == 0
    )
    text = (suite / "summary.md").read_text()
    assert "| t1 | 2 | 0, 1 | 10 / 10 | 0.800 / 0.840 |" in text
    assert "| t1 | 16 | 0, 1 | 12 / 11 | 0.900 / 0.880 |" in text
    # seeds: 4.0 and 2.0 points, ranks 1.00x and 1.09x; initial r: means 0.82 vs 0.89 -> 7.0 points, 11.5 / 10
    assert (
        "| t1 | spread | over seeds at the same r: up to 4.0 points, rank up to 1.09x | over initial r (seed "
        "means): 7.0 points, rank 1.15x | |"
    ) in text
