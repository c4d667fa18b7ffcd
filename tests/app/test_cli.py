"""The ``geolora`` command line end to end on tiny models built from configs and data written here (no Hub).

Every subcommand runs in-process through ``geolora.app.cli.main``; the console script itself, the error exit of a
fresh process and a two-process ``torchrun`` launch (gloo on CPU) run as subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from geolora.app import cli, models

REPO = Path(__file__).resolve().parents[2]
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "movie", "was", "very", "plot", "a"]
FAST = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--r",
    "4",
    "--r_max",
    "8",
    "--lora_alpha",
    "4",
    "--max_length",
    "16",
    "--learning_rate",
    "1e-2",
    "--target_modules",
    "query",
    "value",
    "intermediate.dense",
]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help and usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------------ fixtures
def _sentence(rng, positive: bool) -> str:
    cue = rng.choice(WORDS[:4] if positive else WORDS[4:8])
    filler = list(rng.choice(WORDS[8:], size=4))
    filler.insert(int(rng.integers(0, 5)), cue)
    return " ".join(filler)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT + tokenizer, a tiny ViT + image processor, and text/pair data files."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
        ViTConfig,
        ViTForImageClassification,
    )

    root = tmp_path_factory.mktemp("cli")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    bert = root / "tiny-bert"
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=5 + len(WORDS),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        )
    ).save_pretrained(bert)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(bert)
    headless = root / "tiny-bert-headless"  # an encoder checkpoint without a classification head, like MiniLM's
    BertModel.from_pretrained(bert).save_pretrained(headless)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(headless)

    vit = root / "tiny-vit"
    ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
        )
    ).save_pretrained(vit)
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(vit)

    rng = np.random.default_rng(0)
    text = root / "text"
    text.mkdir()
    for split, n in (("train", 48), ("validation", 16)):
        labels = [["neg", "pos"][i % 2] for i in range(n)]
        rows = [{"text": _sentence(rng, y == "pos"), "label": y} for y in labels]
        import pandas as pd

        pd.DataFrame(rows).to_csv(text / f"{split}.csv", index=False)
    pairs = root / "pairs"
    pairs.mkdir()
    for split, n in (("train", 32), ("validation", 12)):
        with open(pairs / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(
                    json.dumps(
                        {"sentence1": _sentence(rng, True), "sentence2": _sentence(rng, i % 2 == 0), "label": i % 2}
                    )
                    + "\n"
                )
    return {"root": root, "bert": bert, "headless": headless, "vit": vit, "text": text, "pairs": pairs}


@pytest.fixture(scope="module")
def trained(assets):
    """One text adapter trained through the CLI, shared by the tests of the other subcommands."""
    out = assets["root"] / "run-text"
    rc, stdout, stderr = run_cli(  # no --task: the data dir alone selects the local task
        "train",
        "--model_name_or_path",
        assets["bert"],
        "--data_dir",
        assets["text"],
        "--output_dir",
        out,
        *FAST,
    )
    assert rc == 0, stderr
    return out, stdout


# ------------------------------------------------------------------------------------------------ help
def test_help_lists_commands_and_options():
    rc, out, _ = run_cli("--help")
    assert rc == 0 and "usage: geolora" in out
    for command in ("train", "eval", "inspect", "export-lora", "merge"):
        assert command in out
    rc, out, _ = run_cli("train", "--help")
    assert rc == 0 and "--tau" in out and "--task" in out and "--learning_rate" in out and "--config" in out
    for command in ("eval", "inspect", "export-lora", "merge"):
        rc, out, _ = run_cli(command, "--help")
        assert rc == 0 and "usage: geolora " + command in out


# ------------------------------------------------------------------------------------------------ train + others
def test_train_writes_adapter_metrics_plot_and_card(trained):
    out, stdout = trained
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.json",
        "ranks.png",
        "README.md",
        "tokenizer_config.json",
        cli.RUN_INFO,
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert cfg["peft_type"] == "GEOLORA" and cfg["rank_pattern"] == metrics["ranks"]
    assert len(metrics["ranks"]) == 2 * 3 and all(1 <= r <= 8 for r in metrics["ranks"].values())
    assert set(metrics["metrics"]) == {"accuracy", "f1"}
    assert metrics["sizes"]["lora_initial_rank_params"] == 2 * 4 * ((32 + 32) * 2 + (32 + 37))
    assert "ranks per layer" in stdout and "accuracy" in stdout and "for LoRA r=4" in stdout
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["tags"] == ["geolora", "peft"]
    assert meta["base_model"] == cfg["base_model_name_or_path"]
    assert "import geolora" in card and "export-lora" in card and '"tau": 0.1' in card


def test_data_files_on_the_command_line_select_the_local_task(trained, assets):
    out, _ = trained
    info = json.loads((out / cli.RUN_INFO).read_text())
    assert info["task"] == "local" and info["data_args"]["task"] == "local"
    assert info["label_names"] == ["neg", "pos"] and str(assets["text"]) in info["data_source"]
    assert info["num_train_examples"] == 48


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--train_file", "{root}/nope.csv", "--validation_file", "{root}/nope.csv"], r"'.*nope\.csv': no such file"),
        (["--train_file", "{text}/train.csv", "--validation_file", "{root}/nope.csv"], r"'.*nope\.csv': no such file"),
        (["--data_dir", "{root}/no_such_dir"], r"--data_dir '.*no_such_dir' is not a readable directory"),
        (["--train_file", "{text}/train.csv"], r"task 'local' needs --validation_file"),
        (["--task", "election-tweets", "--data_dir", "{text}"], r"task 'election-tweets' does not read --data_dir"),
        (["--task", "digits", "--train_file", "{text}/train.csv"], r"task 'digits' does not read --train_file"),
        (["--task", "imagefolder", "--data_dir", "{text}", "--train_file", "{text}/train.csv"], r"does not read"),
    ],
    ids=[
        "missing-both",
        "missing-validation",
        "missing-dir",
        "train-only",
        "builtin-with-dir",
        "builtin-with-file",
        "imagefolder-with-file",
    ],
)
def test_data_paths_are_used_or_rejected_never_ignored(argv, pattern, assets, tmp_path):
    """Files given on the command line are never silently replaced by the default tweets."""
    import re

    fmt = {k: str(v) for k, v in assets.items()}
    rc, _, err = run_cli(
        "train",
        "--model_name_or_path",
        assets["bert"],
        "--output_dir",
        tmp_path,
        *[a.format(**fmt) for a in argv],
        *FAST,
    )
    lines = [line for line in err.splitlines() if line.startswith("geolora train: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "adapter_config.json").exists()


def test_eval_reproduces_training_metric(trained):
    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    rc, stdout, stderr = run_cli("eval", out, "--output_json", out / "eval.json")
    assert rc == 0, stderr
    again = json.loads((out / "eval.json").read_text())["metrics"]
    assert again == pytest.approx(metrics)
    assert f"accuracy {metrics['accuracy']:.4f}" in stdout


@contextlib.contextmanager
def _load_reports():
    """Records what transformers logs from ``from_pretrained`` (its LOAD REPORT among them)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_loading_a_trained_adapter_shows_no_missing_head_report(assets, tmp_path):
    """The base checkpoint has no head; the adapter trained and saved one (modules_to_save): loading it for eval,
    export-lora or merge must not print transformers' "classifier.weight MISSING ... Consider training" report."""
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", assets["headless"], "--data_dir", assets["text"], "--output_dir", out]
    rc, _, stderr = run_cli(*argv, *FAST)
    assert rc == 0, stderr
    for argv in (["eval", out], ["export-lora", out, tmp_path / "lora"], ["merge", out, tmp_path / "merged"]):
        with _load_reports() as records:
            rc, stdout, stderr = run_cli(*argv)
        assert rc == 0, stderr
        messages = [r.getMessage() for r in records]
        assert not any("LOAD REPORT" in m or "MISSING" in m for m in messages), messages
        assert "MISSING" not in stdout + stderr and "warning" not in stderr


def test_a_weight_nothing_provides_is_still_reported(assets, tmp_path):
    from safetensors.torch import load_file, save_file

    with _load_reports() as records:  # nothing provides the head: transformers' own report stays
        models.load_base_model(str(assets["headless"]), "text", ["neg", "pos"])
    assert any("LOAD REPORT" in r.getMessage() and "classifier.weight" in r.getMessage() for r in records)

    broken = tmp_path / "broken-bert"  # the checkpoint also lacks an encoder weight: a real problem
    shutil.copytree(assets["headless"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if k.endswith("layer.0.attention.self.query.weight"))]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    err = io.StringIO()
    with _load_reports() as records, contextlib.redirect_stderr(err):
        models.load_base_model(str(broken), "text", ["neg", "pos"], provided=["classifier"])
    assert not any("LOAD REPORT" in r.getMessage() for r in records)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("geolora: warning:")]
    assert len(lines) == 1, err.getvalue()
    line = lines[0]
    assert "bert.encoder.layer.0.attention.self.query.weight" in line
    assert "classifier" not in line


def test_inspect_without_base_model(trained, tmp_path):
    out, _ = trained
    moved = tmp_path / "adapter"  # only the adapter files: no base model, no run info
    moved.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / name, moved / name)
    rc, stdout, stderr = run_cli("inspect", moved, "--json")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["ranks"] == json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert summary["geolora_params"] == sum(
        r * (64 + r) if "intermediate" not in n else r * (69 + r) for n, r in summary["ranks"].items()
    )
    assert (moved / "ranks.png").is_file()
    rc, stdout, _ = run_cli("inspect", moved, "--no-plot")
    assert rc == 0 and "layer" in stdout and "GeoLoRA parameters" in stdout


def _logits(model, tokenizer):
    batch = tokenizer(["good movie", "the plot was awful"], ["a", "sad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_export_lora_and_merge_match_the_adapter(trained, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = trained
    model, tokenizer, _ = cli.load_adapter_model(str(out))
    reference = _logits(model, tokenizer)

    rc, stdout, stderr = run_cli("export-lora", out, tmp_path / "lora")
    assert rc == 0, stderr
    assert "LoRA adapter" in stdout
    lora_cfg = LoraConfig.from_pretrained(tmp_path / "lora")
    assert lora_cfg.rank_pattern == json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    base = models.load_base_model(lora_cfg.base_model_name_or_path, "text", ["neg", "pos"])
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(lora, tokenizer), reference, atol=1e-5, rtol=1e-4)

    rc, stdout, stderr = run_cli("merge", out, tmp_path / "merged")
    assert rc == 0, stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, tok), reference, atol=1e-5, rtol=1e-4)


def test_packaged_base_model_is_recorded_by_its_hub_id_and_still_loads_offline(assets, tmp_path, monkeypatch):
    """A model that ships in a package (here a fake package holding the tiny BERT) is recorded in
    adapter_config.json by its portable Hub id, not the installed folder; loading resolves the id back to the
    packaged copy, so eval, export-lora and merge work offline from the adapter folder alone."""
    import types

    package = types.ModuleType("geolora_test_packaged_model")
    package.get_model_path = lambda: assets["bert"]
    monkeypatch.setitem(sys.modules, package.__name__, package)
    entry = (package.__name__, "geolora-test-packaged-model==0.1", "someone/tiny-bert")
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-packaged", entry)
    monkeypatch.setitem(models.BUILTIN_MODELS, "someone/tiny-bert", entry)
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", "tiny-packaged", "--data_dir", assets["text"], "--output_dir", out]
    rc, _, stderr = run_cli(*argv, *FAST)
    assert rc == 0, stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "someone/tiny-bert"
    assert "base_model: someone/tiny-bert" in (out / "README.md").read_text()

    moved = tmp_path / "adapter-only"  # what a Hub download of the adapter gives: no geolora_run.json
    moved.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / name, moved / name)
    model, _, _ = cli.load_adapter_model(str(moved))
    assert model.peft_config["default"].base_model_name_or_path == "someone/tiny-bert"
    rc, stdout, stderr = run_cli("eval", out)
    assert rc == 0 and "accuracy" in stdout, stderr
    rc, _, stderr = run_cli("export-lora", moved, tmp_path / "lora")
    assert rc == 0, stderr
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "someone/tiny-bert"
    )
    rc, _, stderr = run_cli("merge", moved, tmp_path / "merged")
    assert rc == 0 and (tmp_path / "merged" / "config.json").is_file(), stderr


def test_without_matplotlib_train_warns_up_front_and_skips_only_the_plot(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli(
        "train", "--model_name_or_path", assets["bert"], "--data_dir", assets["text"], "--output_dir", out, *FAST
    )
    assert rc == 0 and "Traceback" not in stderr, stderr
    warning = [line for line in stderr.splitlines() if line.startswith("geolora train: warning:")]
    assert len(warning) == 1 and "matplotlib" in warning[0] and "pip install matplotlib" in warning[0], stderr
    assert (out / "metrics.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "ranks.png").exists() and "ranks.png" not in (out / "README.md").read_text()
    assert "ranks.png" not in stdout
    rc, stdout, stderr = run_cli("inspect", out)
    assert rc == 0 and "pip install matplotlib" in stderr and not (out / "ranks.png").exists()


def test_without_scikit_learn_train_stops_before_training(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    out = tmp_path / "run"
    rc, _, stderr = run_cli(
        "train", "--model_name_or_path", assets["bert"], "--data_dir", assets["text"], "--output_dir", out, *FAST
    )
    lines = [line for line in stderr.splitlines() if line.startswith("geolora train: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "scikit-learn" in lines[0] and "pip install scikit-learn" in lines[0] and "accuracy" in lines[0]
    assert not out.exists()


def test_train_sentence_pairs_in_glue_format(assets, tmp_path):
    rc, stdout, stderr = run_cli(
        "train",
        "--model_name_or_path",
        assets["bert"],
        "--task",
        "mrpc",
        "--data_dir",
        assets["pairs"],
        "--output_dir",
        tmp_path,
        *FAST,
    )
    assert rc == 0, stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"accuracy", "f1"} and metrics["num_eval_examples"] == 12
    assert json.loads((tmp_path / cli.RUN_INFO).read_text())["data_args"]["task"] == "mrpc"


def test_train_image_classification_tiny_vit(assets, tmp_path):
    rc, stdout, stderr = run_cli(
        "train",
        "--model_name_or_path",
        assets["vit"],
        "--task",
        "digits",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "16",
        "--output_dir",
        tmp_path,
        "--target_modules",
        "q_proj",
        "v_proj",
        "fc1",
        "fc2",
        *FAST[:-4],
    )
    assert rc == 0, stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"accuracy", "f1"} and len(metrics["ranks"]) == 2 * 4
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "AutoModelForImageClassification" in card
    rc, stdout, stderr = run_cli("eval", tmp_path)
    assert rc == 0, stderr
    assert f"accuracy {metrics['metrics']['accuracy']:.4f}" in stdout


def test_push_to_hub_uploads_the_adapter_folder(assets, tmp_path, monkeypatch):
    """The Hub at its network boundary: HfApi.create_repo / upload_folder record what would be sent."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        remote = tmp_path / "remote"
        shutil.copytree(folder_path, remote)
        calls["upload_folder"] = (repo_id, kwargs)
        return "commit"

    def no_network(*args, **kwargs):
        raise AssertionError("unexpected Hub call")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli(
        "train",
        "--model_name_or_path",
        assets["bert"],
        "--task",
        "local",
        "--data_dir",
        assets["text"],
        "--output_dir",
        out,
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "me/tiny-geolora",
        *FAST,
    )
    assert rc == 0, stderr
    assert calls["create_repo"][0] == "me/tiny-geolora" and calls["upload_folder"][0] == "me/tiny-geolora"
    remote = tmp_path / "remote"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json", "ranks.png"} <= {
        p.name for p in remote.iterdir()
    }
    assert "library_name: peft" in (remote / "README.md").read_text()
    assert "pushed" in stdout and "me/tiny-geolora" in stdout


# ------------------------------------------------------------------------------------------------ configs
def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "task: local\nlearning_rate: 3e-4\ntau: 0.2\ntarget_modules: [query, value]\n"
        "num_train_epochs: 5\nmax_train_samples: null\n"
    )
    model, data, geo, training = cli.parse_train_args(["--config", str(cfg), "--tau", "0.3"])
    assert data.task == "local" and training.learning_rate == 3e-4 and training.num_train_epochs == 5
    assert geo.tau == 0.3 and geo.target_modules == ["query", "value"] and data.max_train_samples is None
    assert model.model_name_or_path == "all-MiniLM-L6-v2"


# a non-default value for every GeoLoRAConfig option of `geolora train`: (command-line values, config value)
KNOB_VALUES = {
    "r": (["4"], 4),
    "r_max": (["12"], 12),
    "r_min": (["2"], 2),
    "tau": (["0.25"], 0.25),
    "lora_alpha": (["16"], 16),
    "lora_dropout": (["0.1"], 0.1),
    "target_modules": (["query", "value"], {"query", "value"}),
    "exclude_modules": (["key"], {"key"}),
    "layers_to_transform": (["0", "1"], [0, 1]),
    "layers_pattern": (["layer"], ["layer"]),
    "modules_to_save": (["classifier", "pooler"], ["classifier", "pooler"]),
    "bias": (["geolora_only"], "geolora_only"),
    "s_update": (["sgd"], "sgd"),
    "adam_betas": (["0.8", "0.99"], (0.8, 0.99)),
    "adam_eps": (["1e-6"], 1e-6),
    "rank_budget": (["20"], 20),
    "budget_type": (["params"], "params"),
    "reorthonormalize_every": (["7"], 7),
    "augment_every": (["10"], 10),
    "explore_rank": (["2"], 2),
    "tau_warmup_ratio": (["0.5"], 0.5),
    "tau_warmup_steps": (["40"], 40),
    "scale_by": (["r"], "r"),
    "sync_factors_every": (["3"], 3),
    "static_shapes": (["true"], True),
}


def test_every_geolora_config_knob_is_a_train_option_with_the_config_default():
    """The GeoLoRA options are GeoLoRAConfig's own fields: same names, help texts and defaults."""
    import dataclasses

    from peft.config import PeftConfig

    from geolora import GeoLoRAConfig

    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    knobs = {f.name: f for f in dataclasses.fields(GeoLoRAConfig) if f.name not in peft_fields}
    assert set(knobs) - set(cli.NOT_CLI_FIELDS) == set(KNOB_VALUES)
    assert set(cli.NOT_CLI_FIELDS) == {"rank_pattern", "fan_in_fan_out", "init_weights"}
    _, _, geo, _ = cli.parse_train_args([])
    for name in KNOB_VALUES:
        f = knobs[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        expected = cli.CLI_DEFAULTS.get(name, list(default) if isinstance(default, tuple) else default)
        assert getattr(geo, name) == expected, name
    assert set(cli.CLI_DEFAULTS) == {"target_modules", "modules_to_save"}
    # the resolved config equals GeoLoRAConfig's defaults (r_max = 2r, not a second default of the CLI)
    ours = geo.to_config("SEQ_CLS").to_dict()
    theirs = GeoLoRAConfig(task_type="SEQ_CLS", **cli.CLI_DEFAULTS).to_dict()
    assert ours == theirs and ours["r_max"] == 16
    _, _, geo, _ = cli.parse_train_args(["--r", "4"])
    assert geo.to_config("SEQ_CLS").r_max == 8
    # every knob settable from the command line, each with the config's help text
    argv = [a for name, (values, _) in KNOB_VALUES.items() for a in (f"--{name}", *values)]
    _, _, geo, _ = cli.parse_train_args(argv)
    config = geo.to_config("SEQ_CLS")
    for name, (_, value) in KNOB_VALUES.items():
        assert getattr(config, name) == value, name
    rc, out, _ = run_cli("train", "--help")
    flat = " ".join(out.split())
    for name, f in knobs.items():
        if name in KNOB_VALUES:
            assert f"--{name}" in out and " ".join(f.metadata["help"].split()) in flat, name


def test_a_single_regex_or_all_linear_target_is_passed_as_a_string():
    _, _, geo, _ = cli.parse_train_args(["--target_modules", r".*\.(query|value)"])
    assert geo.to_config("SEQ_CLS").target_modules == r".*\.(query|value)"
    _, _, geo, _ = cli.parse_train_args(["--target_modules", "all-linear"])
    assert geo.to_config("SEQ_CLS").target_modules == "all-linear"
    _, _, geo, _ = cli.parse_train_args(["--target_modules", "attention.output.dense"])
    assert geo.to_config("SEQ_CLS").target_modules == {"attention.output.dense"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_say_how_to_run(path):
    text = path.read_text()
    assert text.startswith("#") and f"geolora train --config configs/{path.name}" in text.split("\n\n")[0]
    model, data, geo, training = cli.parse_train_args(["--config", str(path)])
    geo.to_config("SEQ_CLS")  # validates the GeoLoRA values


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("learning_rate: 1e-3\nlearnin_rate: 2\n")
    return p


ERROR_CASES = {
    "unknown task": (["train", "--task", "sst3"], r"unknown task 'sst3'"),
    "unknown model": (
        ["train", "--model_name_or_path", "{root}/no-such-model", "--task", "local", "--data_dir", "{text}"],
        r"cannot load (model|the tokenizer of) '.*no-such-model'",
    ),
    "missing column": (
        [
            "train",
            "--model_name_or_path",
            "{bert}",
            "--task",
            "local",
            "--data_dir",
            "{text}",
            "--text_column",
            "review",
        ],
        r"no column\(s\) \['review'\]",
    ),
    "wrong label count": (
        ["train", "--model_name_or_path", "{bert}", "--task", "local", "--data_dir", "{text}", "--num_labels", "3"],
        r"--num_labels 3 but task 'local' has 2",
    ),
    "unreadable path": (
        ["train", "--task", "local", "--train_file", "{root}/nope.csv", "--validation_file", "{root}/nope.csv"],
        r"cannot read data file .*nope\.csv.*no such file",
    ),
    "bad yaml key": (["train", "--config", "{bad_yaml}"], r"unknown key\(s\) \['learnin_rate'\]"),
    "missing config": (["train", "--config", "{root}/missing.yaml"], r"cannot read config .*missing\.yaml"),
    "missing checkpoint": (["train", "--resume_from_checkpoint", "{root}/checkpoint-9"], r"no such checkpoint"),
    "bad geolora value": (
        ["train", "--model_name_or_path", "{bert}", "--task", "local", "--data_dir", "{text}", "--tau", "1.5"],
        r"GeoLoRAConfig\.tau=1\.5 is invalid",
    ),
    "target not found": (
        [
            "train",
            "--model_name_or_path",
            "{bert}",
            "--task",
            "local",
            "--data_dir",
            "{text}",
            "--target_modules",
            "q_proj",
        ],
        r"cannot apply GeoLoRA",
    ),
    "inspect missing dir": (["inspect", "{root}/nothing"], r"is not a folder"),
    "eval non-adapter": (["eval", "{text}"], r"has no adapter_config\.json"),
    "merge missing": (["merge", "{root}/nothing", "{root}/out"], r"is not a folder"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_without_traceback(case, assets, bad_yaml):
    argv, pattern = ERROR_CASES[case]
    fmt = {k: str(v) for k, v in assets.items()} | {"bad_yaml": str(bad_yaml)}
    rc, out, err = run_cli(*[a.format(**fmt) for a in argv])
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("geolora ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.slow
def test_python_dash_m_geolora_error_exit_in_a_fresh_process(tmp_path):
    """``python -m geolora`` in a fresh interpreter (one start, about 10 s here): a user error exits 2 with one line and
    no traceback. The console script runs the same ``main`` (next test)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "geolora", "inspect", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("geolora inspect: error:")


def test_console_script_and_version():
    """The installed ``geolora`` console script is ``geolora.app.cli:main``; ``--version`` prints the package's."""
    from importlib.metadata import entry_points

    import geolora
    from geolora.app import cli

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "geolora"]
    assert script.value == "geolora.app.cli:main" and script.load() is cli.main
    rc, out, _ = run_cli("--version")
    assert rc == 0 and out.strip() == f"geolora {geolora.__version__}"


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
@pytest.mark.slow
def test_train_under_two_process_torchrun(assets, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU with gloo: the CLI runs unchanged; process 0 writes the adapter."""
    out = tmp_path / "ddp"
    # torchrun's own parser reads `--r` as an ambiguous abbreviation of its --rdzv*/--role/... options, so the
    # GeoLoRA options go in the config file (the documented way to launch under torchrun)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({"r": 4, "r_max": 8, "lora_alpha": 4, "target_modules": ["query", "value"]}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = f"train --config {config} --model_name_or_path {assets['bert']} --task local --data_dir {assets['text']}"
    train += f" --output_dir {out} --use_cpu true --ddp_backend gloo --max_steps 3 --per_device_train_batch_size 4"
    train += " --disable_tqdm true --max_length 16"
    cmd = launcher + ["-m", "geolora.app.cli"] + train.split()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / cli.RUN_INFO).read_text())["world_size"] == 2
    assert metrics["ranks"] == json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert proc.stdout.count("ranks per layer") == 1  # only process 0 reports


def test_without_the_cli_extra_the_error_names_the_packages_and_the_install_command(monkeypatch):
    import geolora.app

    assert geolora.app.missing_requirements() == []  # the test extra installs the cli extra
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert geolora.app.missing_requirements() == ["pyyaml", "scikit-learn"]
    with pytest.raises(ImportError, match=r"needs pyyaml, scikit-learn, .*pip install 'geolora\[cli\]'"):
        geolora.app.check_requirements()
