"""The evidence preset (configs/bench/evidence.yaml): its plan, the learning-rate widening of the runner, and the
evidence report (benchmarks/evidence.py) on cell files written here in the runner's format."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import evidence  # noqa: E402
import run as R  # noqa: E402

ALL = {"suites": set(), "tasks": set(), "methods": set(), "seeds": set()}


def _run(r, lr, val, test=None, diverged=False, params=1000, curve=None):
    return {
        "r": r,
        "lr": lr,
        "diverged": diverged,
        "val": {"accuracy": val},
        "test": {"accuracy": val if test is None else test},
        "adapter_params_kept": params,
        "trainable_params_kept": params + 10,
        "head_params": 10,
        "trainable_params_during_training": params + 10,
        "adapter_file_bytes": 4 * params,
        "train_time_s": 100.0,
        "final_ranks": {"a": r, "b": r},
        "median_step_s": 0.1,
        "peak_rss_bytes": 2**30,
        "val_curve": curve or [],
        "rank_trajectory": {"layers": ["a", "b"], "steps": [0, 10, 20], "ranks": [[r, r], [r + 2, r], [r + 1, r]]},
        "per_rank_params": {"a": 10, "b": 10},
    }


# ----------------------------------------------------------------------------------------------- the plan
def test_evidence_preset_meets_the_issue_minimums():
    cells = R.plan_cells(R.load_preset("evidence", None), ALL)
    tasks = {c["task"] for c in cells}
    assert {"election-tweets", "reuters-r8", "20newsgroups", "fashion-mnist"} <= tasks
    seeds = {c["seed"] for c in cells if c["suite"] != evidence.RANK_INIT_SUITE}
    assert seeds == {0, 1}
    for c in cells:
        assert c["hp"]["max_steps"] >= 1000 and c["hp"]["eval_every"]
        if c["task"] != "fashion-mnist":
            assert c["data"]["n_train"] >= 2000 and c["model"]["pretrained"] == "minilm"
        else:
            assert c["model"]["pretrained"] == "efficientnet-lite0"
    lora = [c for c in cells if c["method"] == "lora" and c["task"] == "reuters-r8" and c["seed"] == 0]
    adalora = [c for c in cells if c["method"] == "adalora" and c["task"] == "reuters-r8" and c["seed"] == 0]
    assert lora[0]["budgets"] == [1, 2, 4, 8, 16] and adalora[0]["budgets"] == [1, 4, 16]
    geo = [c for c in cells if c["method"] == "geolora" and c["task"] == "reuters-r8" and c["seed"] == 0]
    geo = [c for c in geo if c["suite"] != evidence.RANK_INIT_SUITE]
    assert len({c["hp"]["tau"] for c in geo}) >= 4 and {c["hp"]["geolora_r_max"] for c in geo} == {32}
    assert all(len(c["lrs"]) >= 3 and c["lr_widen"] >= 1 for c in lora + adalora + geo)
    # the robustness sweep: two sizes of each method over >= 2.5 decades, in the seed-0 cells of election tweets
    for method in ("lora", "adalora", "geolora"):
        sweeps = []
        for c in cells:
            if c["method"] == method and c["task"] == "election-tweets" and c["seed"] == 0:
                for r, lr in {(r, lr) for r, lr in R.runs_to_do(c, Path("/nonexistent"))}:
                    sweeps.append((c["suite"], r, lr))
        sizes = {(s, r) for s, r, _ in sweeps if sum(1 for s2, r2, _ in sweeps if (s2, r2) == (s, r)) >= 6}
        assert len(sizes) == 2, (method, sizes)
        for s, r in sizes:
            lrs = [lr for s2, r2, lr in sweeps if (s2, r2) == (s, r)]
            assert math.log10(max(lrs) / min(lrs)) >= 2.5
    rank_init = [c for c in cells if c["suite"] == evidence.RANK_INIT_SUITE]
    assert rank_init and sorted(rank_init[0]["budgets"]) == [2, 4, 8, 16]


def test_budgets_per_method_must_name_every_method():
    cfg = R.load_preset("evidence", None)
    del cfg["suites"]["evidence"]["budgets"]["adalora"]
    with pytest.raises(SystemExit, match="budgets has no entry for method 'adalora'"):
        R.plan_cells(cfg, ALL)


# ----------------------------------------------------------------------------------------------- lr widening
def test_widen_lrs_steps_beyond_the_edge_on_the_ladder():
    runs = [_run(4, 1e-3, 0.6), _run(4, 3e-3, 0.7), _run(4, 1e-2, 0.8)]
    assert R.widen_lrs(runs, 4, "accuracy") == pytest.approx(3e-2)
    runs = [_run(4, 1e-3, 0.9), _run(4, 3e-3, 0.7), _run(4, 1e-2, 0.8)]
    assert R.widen_lrs(runs, 4, "accuracy") == pytest.approx(3e-4)
    runs = [_run(4, 1e-3, 0.6), _run(4, 3e-3, 0.9), _run(4, 1e-2, 0.8)]
    assert R.widen_lrs(runs, 4, "accuracy") is None  # best inside
    runs = [_run(4, 3e-3, 0.6), _run(4, 1e-2, 0.8), _run(4, 3e-2, float("nan"), diverged=True)]
    assert R.widen_lrs(runs, 4, "accuracy") is None  # the edge above diverged: the best is inside what was tried
    assert R.widen_lrs([_run(8, 1e-3, 0.5)] + runs, 4, "accuracy") is None  # other budgets do not count


def test_run_cell_widens_until_the_selected_lr_is_inside(tmp_path, monkeypatch):
    """A response peaking at lr = 0.1: the 3-point grid ends at 0.01, so the cell trains 0.03 and 0.1 (lr_widen: 2)
    and records the grid it tried; seed 1 then reruns only the selected lr."""

    class FakeTask:
        metric_names = ["accuracy"]
        source = "fake"

    trained = []

    def fake_train_one(cell, prepared, r, lr, verbose):
        trained.append((cell["seed"], r, lr))
        return _run(r, lr, 1.0 - abs(math.log10(lr) + 1.2) / 10)

    monkeypatch.setattr(
        R, "prepare", lambda cell, d, c: {"task": FakeTask(), "source": "fake", "sizes": {}, "label_counts": None}
    )
    monkeypatch.setattr(R, "train_one", fake_train_one)
    cfg = R.load_preset("evidence", None)
    cells = [
        c
        for c in R.plan_cells(cfg, {**ALL, "suites": {"evidence"}, "tasks": {"reuters-r8"}, "methods": {"lora"}})
        if c["seed"] in (0, 1)
    ]
    for c in cells:
        c["budgets"], c["lrs"] = [4], [1e-3, 3e-3, 1e-2]  # this test's grid, whatever the preset's is
    progress = type("P", (), {"total": 0, "update": lambda *a: None, "set_postfix_str": lambda *a: None})()
    first = R.run_cell(cells[0], tmp_path, None, {}, progress, False, True)
    assert [lr for _, _, lr in trained] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    assert first["lr"] == pytest.approx(1e-1)  # still the edge, but lr_widen (2) is spent
    assert first["lr_grid_by_budget"]["4"] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    trained.clear()
    second = R.run_cell(cells[1], tmp_path, None, {}, progress, False, True)
    assert trained == [(1, 4, first["lr"])] and second["lr"] == first["lr"]


# ----------------------------------------------------------------------------------------------- the report
def _cell(suite, method, task, seed, runs, selected, tau=None, lr_from_seed=None):
    hp = {"tau": tau, "geolora_r_max": 32} if tau is not None else {}
    return {
        "suite": suite,
        "kind": "compare",
        "method": method,
        "task": task,
        "seed": seed,
        "status": "done",
        "primary_metric": "accuracy",
        "budgets": sorted({r["r"] for r in runs}),
        "lr_grid": sorted({r["lr"] for r in runs}),
        "lr_grid_by_budget": {
            str(b): sorted({r["lr"] for r in runs if r["r"] == b}) for b in sorted({r["r"] for r in runs})
        },
        "selected": {str(k): v for k, v in selected.items()},
        "lr_from_seed": lr_from_seed,
        "lr_selected_on_seed": 0,
        "runs": runs,
        "provenance": {
            "git": {"revision": "x"},
            "config_file": "configs/bench/evidence.yaml",
            "versions": {},
            "hardware": {},
            "settings": {"hp": hp},
        },
    }


def _write_cells(root: Path, cells):
    for c in cells:
        d = root / c["suite"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{c['method']}--{c['task']}--{c['seed']}.json").write_text(json.dumps(c))


def test_evidence_report_finds_the_smallest_adapter_within_half_a_point(tmp_path):
    curve = [{"step": s, "accuracy": a} for s, a in ((100, 0.5), (500, 0.79), (700, 0.80), (1000, 0.805))]
    lora0 = [
        _run(1, 1e-3, 0.70, params=100, curve=curve),
        _run(4, 1e-3, 0.80, params=400),
        _run(16, 1e-3, 0.81, params=1600),
    ]
    lora1 = [_run(1, 1e-3, 0.72, params=100), _run(4, 1e-3, 0.80, params=400), _run(16, 1e-3, 0.81, params=1600)]
    geo_small = [_run(8, 1e-2, 0.806, params=300), _run(8, 3e-2, 0.79, params=280), _run(8, 3e-3, 0.6, params=290)]
    geo_big = [_run(8, 1e-2, 0.79, params=900)]
    cells = [
        _cell("evidence", "lora", "t", 0, lora0, {1: 0, 4: 1, 16: 2}),
        _cell("evidence", "lora", "t", 1, lora1, {1: 0, 4: 1, 16: 2}, lr_from_seed=0),
        _cell("evidence-geo-tau0.2", "geolora", "t", 0, geo_small, {8: 0}, tau=0.2),
        _cell("evidence-geo-tau0.05", "geolora", "t", 0, geo_big, {8: 0}, tau=0.05),
        _cell(
            "evidence",
            "adalora",
            "t",
            0,
            [_run(4, lr, 0.7, params=500) for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)]
            + [_run(4, 1e-1, float("nan"), diverged=True, params=500)],
            {4: 1},
        ),
        _cell(evidence.RANK_INIT_SUITE, "geolora", "t", 0, [_run(2, 1e-2, 0.8), _run(16, 1e-2, 0.8)], {2: 0}, tau=0.1),
    ]
    _write_cells(tmp_path, cells)
    report, made = evidence.write_report(tmp_path, "python benchmarks/report.py --evidence X")
    text = report.read_text()
    # best mean: LoRA r=16 at 81.0; within 0.5 points: GeoLoRA tau=0.2 (80.6, 300 params) and LoRA r=16 (81.0) only
    assert "| t | unknown | 6 | x |" in text.splitlines()  # the provenance table: the fixture records no CPU
    verdict = text.split("## Smallest adapter", 1)[1]
    row = next(line for line in verdict.splitlines() if line.startswith("| t | "))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[1] == "81.00 (lora, r=16)"
    assert cols[2] == "300 params (tau=0.2, 80.60)"
    assert cols[3] == "1,600 params (r=16, 81.00)"
    assert cols[4] == "none (its best: 70.00)"
    # per setting: LoRA r=1 over two seeds (70, 72); its curve moved +0.5 points over the last 30% of the steps
    # (0.800 at step 700 -> 0.805 at 1000)
    r1 = next(line for line in text.splitlines() if line.startswith("| lora | r=1 |"))
    assert "71.00 ± 1.41" in r1 and "+0.50" in r1
    assert "| adalora | target_r=4 | 1 | 70.00 ± 0.00 | 500 | 0.001 |" in text
    assert "diverged" in text  # the robustness table (adalora: six learning rates)
    # the initial-rank runs: final size and total rank per initial r
    assert "| t | 0 | 0.01 | 2 | 1,000 | 4 (2-2) | 80.0 |" in text
    assert "| t | 0 | 0.01 | 16 | 1,000 | 32 (16-16) | 80.0 |" in text
    names = {p.name for p in made}
    assert {
        "evidence-pareto-t.png",
        "evidence-curves-t.png",
        "evidence-robustness-t.png",
        "evidence-rank-init-t.png",
    } <= names
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in names)
    assert "## Cost of the preset" in text and "| t | **all** | 18 |" in text  # 3 + 3 + 3 + 1 + 6 + 2 runs


def test_cost_table_sums_every_run_of_every_suite_per_task_and_method():
    """Runs, hours of training and the median step, per task and method and per task in all: every run counts
    (every lr tried, every suite), the step is the median of the runs' medians."""
    lora = [dict(_run(1, lr, 0.7), train_time_s=1800.0, median_step_s=s) for lr, s in ((1e-3, 0.1), (3e-3, 0.3))]
    lora.append(dict(_run(4, 1e-3, 0.7), train_time_s=3600.0, median_step_s=0.2))
    geo = [dict(_run(8, 1e-2, 0.8), train_time_s=1080.0, median_step_s=0.5)]
    cells = [
        _cell("evidence", "lora", "t", 0, lora, {1: 0, 4: 2}),
        _cell("evidence-geo-tau0.2", "geolora", "t", 0, geo, {8: 0}, tau=0.2),
        _cell(evidence.RANK_INIT_SUITE, "geolora", "u", 0, [dict(geo[0], train_time_s=360.0)], {8: 0}, tau=0.1),
    ]
    lines = evidence.cost_table(cells)
    assert "| t | geolora | 1 | 0.3 | 0.500 |" in lines  # 1080 s
    assert "| t | lora | 3 | 2.0 | 0.200 |" in lines  # 1800 + 1800 + 3600 s; median of 0.1, 0.3, 0.2
    assert "| t | **all** | 4 | 2.3 | 0.250 |" in lines  # median of 0.1, 0.2, 0.3, 0.5
    assert "| u | geolora | 1 | 0.1 | 0.500 |" in lines
    assert lines.index("| t | geolora | 1 | 0.3 | 0.500 |") < lines.index("| t | lora | 3 | 2.0 | 0.200 |")
    assert "In all: 5 runs, 2.4 hours of training." in lines  # 8640 s
    assert evidence.cost_table([]) == []


def test_provenance_table_lists_each_tasks_cpus_and_revisions_and_marks_dirty_trees():
    """Cells of one preset come from several machines and sittings: the report says which, per task and CPU, and
    tells a tree dirty only with result files from one with code changes."""
    run = [_run(1, 1e-3, 0.7)]
    cells = [_cell("evidence", "lora", "t", seed, run, {1: 0}) for seed in (0, 1, 2)]
    cells.append(_cell("evidence", "lora", "u", 0, run, {1: 0}))
    gits = [
        {"revision": "aaaaaaa1234", "dirty": False, "dirty_paths": []},
        {"revision": "bbbbbbb1234", "dirty": True, "dirty_paths": ["benchmarks/results/evidence/x.partial.json"]},
        {"revision": "ccccccc1234", "dirty": True, "dirty_paths": ["geolora/optim.py"]},
        {"revision": "ddddddd1234", "dirty": False, "dirty_paths": []},
    ]
    cpus = ["Xeon", "Xeon", "EPYC", "EPYC"]
    versions = [{"torch": "2.13.0"}, {"torch": "2.13.0"}, {"torch": "2.13.0"}, {"torch": "2.12.0"}]
    for cell, git, cpu, v in zip(cells, gits, cpus, versions):
        cell["provenance"].update(git=git, hardware={"cpu": cpu}, versions=v)
    lines = evidence.provenance_table(cells)
    assert "| t | EPYC | 1 | ccccccc (dirty: code) |" in lines
    assert "| t | Xeon | 2 | aaaaaaa, bbbbbbb (dirty: results files only) |" in lines
    assert "| u | EPYC | 1 | ddddddd |" in lines
    assert lines.index("| t | EPYC | 1 | ccccccc (dirty: code) |") < lines.index("| u | EPYC | 1 | ddddddd |")
    assert "Versions (3 cells): {'torch': '2.13.0'}." in lines and "Versions (1 cells): {'torch': '2.12.0'}." in lines
    assert "Versions (every cell): {'torch': '2.13.0'}." in evidence.provenance_table(cells[:3])
    assert evidence.provenance_table([]) == []
    cells[3]["provenance"]["git"] = {"revision": None, "dirty": None, "dirty_paths": None}  # ran outside a checkout
    assert "| u | EPYC | 1 | no git checkout |" in evidence.provenance_table(cells)


def test_pareto_front_keeps_only_undominated_points():
    pts = []
    for params, acc in ((100, 70), (200, 69), (300, 75), (400, 75), (500, 80)):
        p = evidence.Point("t", "lora", f"r={params}", params, "accuracy")
        p.runs = [_run(1, 1e-3, acc / 100, params=params)]
        pts.append(p)
    assert [p.params for p in evidence.front(pts)] == [100, 300, 500]


def test_step_time_is_the_fastest_seeds_median_and_memory_the_mean():
    p = evidence.Point("t", "lora", "r=4", 4, "accuracy")
    p.runs = [dict(_run(4, 1e-3, 0.9), median_step_s=0.21), dict(_run(4, 1e-3, 0.9), median_step_s=0.12)]
    p.runs[0]["peak_rss_bytes"], p.runs[1]["peak_rss_bytes"] = 2**30, 3 * 2**30
    assert p.step_time() == 0.12 and p.mean_of("peak_rss_bytes") == 2 * 2**30
    row = evidence.setting_table("t", [p])[-2]
    assert "| 0.120 |" in row and "| 2,048 |" in row
    assert evidence.Point("t", "lora", "r=8", 8, "accuracy").step_time() is None


def test_robustness_marks_runs_no_better_than_the_most_frequent_class(tmp_path):
    """A run that predicts one class scores that class's share of the test set; the robustness table marks it
    ``constant`` (not a trained run), as it marks non-finite runs ``diverged``; counts from provenance.label_counts."""
    runs = [
        _run(4, 3e-4, 0.80, test=0.81),
        _run(4, 1e-3, 0.90, test=0.92),
        _run(4, 3e-3, 0.51, test=0.524),  # the majority class (524 of 1000)
        _run(4, 1e-2, 0.49, test=0.476),  # the minority class: no better either
        _run(4, 3e-2, 0.53, test=0.528),  # within half a point of the majority share
        _run(4, 1e-1, float("nan"), diverged=True),
    ]
    cell = _cell("evidence", "lora", "t", 0, runs, {4: 1})
    cell["provenance"]["label_counts"] = {"train": [950, 1050], "val": [140, 160], "test": [476, 524]}
    assert evidence.constant_accuracy(cell) == pytest.approx(0.524)
    states = [evidence.run_state(r, "accuracy", 0.524) for r in runs]
    assert states == ["trained", "trained", "constant", "constant", "constant", "diverged"]
    _write_cells(tmp_path, [cell])
    report, made = evidence.write_report(tmp_path, "python benchmarks/report.py --evidence X")
    row = next(line for line in report.read_text().splitlines() if line.startswith("| lora r=4 |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[1:] == ["81.0", "92.0", "constant (52.4)", "constant (47.6)", "constant (52.8)", "diverged", "2/6"]
    assert "most frequent class (52.4)" in report.read_text()
    assert (tmp_path / "plots" / "evidence-robustness-t.png").stat().st_size > 1000
    # without label counts (a cell from before they were recorded) only non-finite runs are marked
    del cell["provenance"]["label_counts"]
    assert evidence.constant_accuracy(cell) is None
    assert [evidence.run_state(r, "accuracy", None) for r in runs][2:5] == ["trained"] * 3


def test_label_counts_are_recorded_and_backfilled_from_the_data(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from geolora.app import data as gdata

    train = datasets.Dataset.from_dict({"text": ["a"] * 6, "label": [0, 1, 1, 2, 2, 2]})
    test = datasets.Dataset.from_dict({"text": ["b"] * 4, "label": [2, 2, 0, 2]})
    task = gdata.TaskData("t", train, test, ["x", "y", "z"])
    splits = type("S", (), {"train": train.select([0, 1, 3, 4]), "val": train.select([2, 5]), "test": test})()
    assert R.label_counts(task, splits) == {"train": [1, 1, 2], "val": [0, 1, 1], "test": [1, 0, 3]}
    regression = gdata.TaskData("r", train, test, [])
    assert R.label_counts(regression, splits) is None

    monkeypatch.setattr(R, "_splits", lambda cell, data_dir: (task, splits))
    path = tmp_path / "lora--t--0.json"
    path.write_text(json.dumps({"runs": [], "provenance": {"split_sizes": {"train": 4, "val": 2, "test": 4}}}))
    R.backfill_label_counts({"task": "t"}, path, None)
    assert json.loads(path.read_text())["provenance"]["label_counts"]["test"] == [1, 0, 3]
    # split sizes that differ from the data's: refused, the file left as it was
    path.write_text(json.dumps({"runs": [], "provenance": {"split_sizes": {"train": 5, "val": 2, "test": 4}}}))
    with pytest.raises(ValueError, match="split sizes differ"):
        R.backfill_label_counts({"task": "t"}, path, None)
    assert "label_counts" not in json.loads(path.read_text())["provenance"]
