"""PEFT's own generic tests, run against GeoLoRA.

PEFT tests every method with one contract: ``PeftCommonTester`` over the tiny models of ``test_custom_models.py``
(save/load, ``from_pretrained``, merge/unmerge/safe-merge, ``merge_and_unload``, disabling, several adapters, deleting,
``modules_to_save``, dtypes, training) and ``test_config.py``. Those files ship in the peft sdist;
``scripts/fetch_peft_tests.py`` (run by ``make test``) puts the installed version's copy in
``.cache/peft-tests/<version>/peft_tests``. This module takes PEFT's test classes unchanged and only swaps their
parametrisation: wherever a test is parametrised over PEFT methods (``config_cls``), it runs over GeoLoRA cases,
chosen like PEFT's own LoRA cases on the same models. Tests that do not take a config class are about one other
method (IA3, LoRA variants, ...) and are not collected.

Every GeoLoRA-specific skip or expected failure is listed, with its reason, in ``docs/peft-conformance.md`` (the table
between the ``differences`` markers); this module reads that table. A listed expected failure that passes fails
(strict xfail), an unlisted failure fails, and a listed pattern that matches no collected test fails
``test_every_listed_difference_matches_a_test``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest
from peft import LoraConfig

from geolora import GeoLoRAConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
PEFT_VERSION = importlib.metadata.version("peft")
CACHE = Path(os.environ.get("GEOLORA_PEFT_TESTS", REPO_ROOT / ".cache" / "peft-tests" / PEFT_VERSION))
pytestmark = pytest.mark.slow  # PEFT's whole generic suite: `make test-fast` leaves it out
DIFFERENCES_DOC = REPO_ROOT / "docs" / "peft-conformance.md"

if not (CACHE / "peft_tests" / "testing_common.py").is_file():
    message = (
        f"PEFT {PEFT_VERSION}'s tests are not in {CACHE}/peft_tests: run `python scripts/fetch_peft_tests.py` "
        "(make test does)"
    )
    if os.environ.get("GEOLORA_REQUIRE_PEFT_TESTS") == "1":
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)

if str(CACHE) not in sys.path:
    sys.path.insert(0, str(CACHE))
if importlib.util.find_spec("diffusers") is None:
    # testing_common imports StableDiffusionPipeline at module level for its diffusers tests, which are not run here.
    _diffusers = types.ModuleType("diffusers")
    _diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # an isinstance() target only
    sys.modules["diffusers"] = _diffusers

import peft_tests.test_config as peft_config  # noqa: E402
import peft_tests.test_custom_models as peft_custom  # noqa: E402
import peft_tests.test_decoder_models as peft_decoder  # noqa: E402

# The GeoLoRA cases: PEFT's LoRA cases on the layer types GeoLoRA adapts (Linear, transformers' Conv1D, Conv2d with
# groups=1). Embedding, Conv1d/Conv3d, grouped convs, MHA and target_parameters are not GeoLoRA layer types.
GEOLORA_CASES = [
    ("Vanilla MLP 1 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 GeoLoRA", "MLP", GeoLoRAConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 GeoLoRA", "EmbConv1D", GeoLoRAConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d 1 GeoLoRA", "Conv2d", GeoLoRAConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 GeoLoRA", "Conv2d", GeoLoRAConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1x1 GeoLoRA", "Conv2d1x1", GeoLoRAConfig, {"target_modules": ["conv2d"]}),
]
MULTIPLE_ACTIVE_ADAPTERS_CASES = [
    (
        "GeoLoRA Same",
        "geolora",
        GeoLoRAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "GeoLoRA Different",
        "geolora",
        GeoLoRAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]


# ------------------------------------------------------------------------------------------- the differences list
def read_differences(path: Path = DIFFERENCES_DOC) -> list[dict]:
    """The rows of the table between ``<!-- differences:begin -->`` and ``<!-- differences:end -->``:
    ``| pattern | kind | reason |`` where pattern matches ``Class::test[id]`` (``*``: any text), kind is ``skip``
    (not run: a LoRA-only feature) or ``xfail`` (runs, must fail: an intended difference)."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"<!-- differences:begin -->(.*?)<!-- differences:end -->", text, re.S)
    if match is None:
        raise ValueError(f"{path}: no table between <!-- differences:begin --> and <!-- differences:end -->")
    rows = []
    for lineno, line in enumerate(match.group(1).splitlines(), 1):
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == ["pattern", "kind"]:
            continue
        if len(cells) != 3 or not all(cells):
            raise ValueError(f"{path}: differences row {lineno} needs | pattern | kind | reason |, got {line!r}")
        pattern, kind, reason = cells
        pattern = pattern.strip("`")
        if kind not in ("skip", "xfail"):
            raise ValueError(f"{path}: differences row {pattern!r}: kind must be 'skip' or 'xfail', got {kind!r}")
        rows.append({"pattern": pattern, "kind": kind, "reason": reason})
    return rows


DIFFERENCES = read_differences()


def _matches(nodename: str, pattern: str) -> bool:
    """``*`` matches any text; everything else (brackets included) is literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), nodename) is not None


def _difference_for(nodename: str):
    for row in DIFFERENCES:
        if _matches(nodename, row["pattern"]):
            return row
    return None


# ------------------------------------------------------------------------------------------- re-parametrisation
def _argnames(mark) -> list[str]:
    names = mark.args[0]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return list(names)


METHOD_ARGS = ("config_cls", "config_class")  # how PEFT's tests name the PEFT method they are parametrised over
# Tests that take no method parameter but cover every registered PEFT type, GeoLoRA's included.
ALL_TYPES_TESTS = {"TestPeftConfig": ["test_from_peft_type"]}


DECODER_CONFIG = {
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 32,
    "target_modules": None,
    "lora_dropout": 0.05,
    "bias": "none",
}  # PEFT's LoRA entry of the decoder tests, for GeoLoRA


def _mentions_lora(values) -> bool:
    """Whether PEFT runs this parametrisation for LoRA: then GeoLoRA takes LoRA's place. A test parametrised only over
    other methods (prompt tuning, IA3, ...) is about them and is not collected."""
    return any(v is LoraConfig or (isinstance(v, (tuple, list)) and LoraConfig in v) for v in values)


def _geolora_values(names: list[str]):
    if names in (["config_cls"], ["config_class"]):
        return [GeoLoRAConfig], ["GeoLoRAConfig"]
    if names == ["config_class", "mandatory_kwargs"]:
        return [(GeoLoRAConfig, {})], ["GeoLoRAConfig"]
    if names == ["config_cls", "config_kwargs"]:
        return [(GeoLoRAConfig, DECODER_CONFIG)], ["GeoLoRAConfig"]
    if names == ["test_name", "model_id", "config_cls", "config_kwargs"]:
        return GEOLORA_CASES, [c[0] for c in GEOLORA_CASES]
    if names == ["test_name", "tuner_method", "config_cls", "config_kwargs_1", "config_kwargs_2"]:
        return MULTIPLE_ACTIVE_ADAPTERS_CASES, [c[0] for c in MULTIPLE_ACTIVE_ADAPTERS_CASES]
    raise NotImplementedError(f"parametrisation {names} of a PEFT test is not mapped to GeoLoRA cases")


def _for_geolora(func):
    """A copy of PEFT's test function (same code object: the body is PEFT's) whose parametrisation over PEFT methods
    is replaced by the GeoLoRA cases; None if the test is not parametrised over methods."""
    marks = list(getattr(func, "pytestmark", []))
    method_marks = [m for m in marks if m.name == "parametrize" and set(METHOD_ARGS) & set(_argnames(m))]
    if not method_marks or not all(_mentions_lora(m.args[1]) for m in method_marks):
        return None
    new_marks = []
    for mark in marks:
        if any(mark is m for m in method_marks):
            values, ids = _geolora_values(_argnames(mark))
            mark = pytest.mark.parametrize(mark.args[0], values, ids=ids).mark
        new_marks.append(mark)
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update({k: v for k, v in func.__dict__.items() if k != "pytestmark"})
    copy.pytestmark = new_marks
    return copy


def geolora_class(name: str, peft_cls: type, **extra) -> type:
    """A subclass of PEFT's test class whose method-parametrised tests run over the GeoLoRA cases; its other tests
    (about one other method) are set to None so that pytest does not collect them."""
    namespace = {"__module__": __name__, "__doc__": f"PEFT's {peft_cls.__name__}, GeoLoRA cases."}
    for attr in dir(peft_cls):
        if not attr.startswith("test"):
            continue
        func = getattr(peft_cls, attr)
        if not callable(func):
            continue
        namespace[attr] = func if attr in ALL_TYPES_TESTS.get(name, ()) else _for_geolora(func)

    def _apply_difference(self, request):
        row = _difference_for(f"{type(self).__name__}::{request.node.name}")
        if row is None:
            return
        if row["kind"] == "skip":
            pytest.skip(f"GeoLoRA difference (docs/peft-conformance.md): {row['reason']}")
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"GeoLoRA difference: {row['reason']}"))

    namespace["_geolora_difference"] = pytest.fixture(autouse=True)(_apply_difference)
    namespace.update(extra)
    return type(name, (peft_cls,), namespace)


TestPeftCustomModel = geolora_class("TestPeftCustomModel", peft_custom.TestPeftCustomModel)
TestMultipleActiveAdapters = geolora_class("TestMultipleActiveAdapters", peft_custom.TestMultipleActiveAdapters)
TestPeftConfig = geolora_class("TestPeftConfig", peft_config.TestPeftConfig)


# ------------------------------------------------------------------------------------------- decoder models, offline
def _decoder_configs(vocab: int = 128) -> dict:
    """Tiny decoders in the shapes of the Hub models PEFT's decoder tests name, built from configs (no Hub)."""
    from transformers import Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig, OPTConfig, Qwen2Config

    small = dict(
        vocab_size=vocab,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    configs = {
        "peft-internal-testing/tiny-random-OPTForCausalLM": OPTConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=4,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
        ),
        "peft-internal-testing/tiny-random-GPT2LMHeadModel": GPT2Config(
            vocab_size=vocab, n_embd=16, n_layer=2, n_head=4, n_positions=64
        ),
        "peft-internal-testing/tiny-random-GPTJForCausalLM": GPTJConfig(
            vocab_size=vocab, n_embd=16, n_layer=2, n_head=4, rotary_dim=4, n_positions=64
        ),
        "trl-internal-testing/tiny-random-LlamaForCausalLM": LlamaConfig(num_key_value_heads=2, **small),
        "peft-internal-testing/tiny-dummy-qwen2": Qwen2Config(num_key_value_heads=2, **small),
        "hf-internal-testing/tiny-random-Gemma3ForCausalLM": Gemma3TextConfig(
            num_key_value_heads=2, head_dim=4, **small
        ),
    }
    return configs


_DECODER_ROOT: list[Path] = []


def decoder_models_root(tmp_factory) -> Path:
    """A folder holding ``<hub id>/`` for each decoder of PEFT's tests, saved from a seeded random init; the decoder
    tests run with it as the working directory, so each Hub id resolves to the local folder of the same name."""
    if _DECODER_ROOT:
        return _DECODER_ROOT[0]
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_factory.mktemp("peft-decoders")
    for model_id, config in _decoder_configs().items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / model_id)
    _DECODER_ROOT.append(root)
    return root


def _offline_decoders(self, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(decoder_models_root(tmp_path_factory))


TestDecoderModels = geolora_class(
    "TestDecoderModels",
    peft_decoder.TestDecoderModels,
    _geolora_offline_models=pytest.fixture(autouse=True)(_offline_decoders),
)

GEOLORA_CLASSES = ("TestPeftCustomModel", "TestMultipleActiveAdapters", "TestPeftConfig", "TestDecoderModels")


def test_every_listed_difference_matches_a_test(request):
    """A row of docs/peft-conformance.md that matches no collected test is stale: fail."""
    if request.config.option.keyword or request.config.option.markexpr:
        pytest.skip("a -k/-m selection is active: not every test is collected")
    ours = [
        f"{item.cls.__name__}::{item.name}"
        for item in request.session.items
        if item.cls is not None and item.module.__name__ == __name__ and item.cls.__name__ in GEOLORA_CLASSES
    ]
    for cls in GEOLORA_CLASSES:
        if not any(n.startswith(cls + "::") for n in ours):
            pytest.skip(f"{cls} was not collected in full (a node-id selection)")
    stale = [row["pattern"] for row in DIFFERENCES if not any(_matches(n, row["pattern"]) for n in ours)]
    assert not stale, f"docs/peft-conformance.md lists differences that match no collected test: {stale}"


def test_differences_table_is_parsed_strictly(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text(
        "<!-- differences:begin -->\n| pattern | kind | reason |\n|---|---|---|\n"
        "| `A::t[x*]` | xfail | why |\n<!-- differences:end -->\n"
    )
    assert read_differences(doc) == [{"pattern": "A::t[x*]", "kind": "xfail", "reason": "why"}]
    assert _matches("A::t[x 1]", "A::t[x*]") and not _matches("A::t[y]", "A::t[x*]")  # brackets are literal
    doc.write_text("<!-- differences:begin -->\n| `A::t` | maybe | why |\n<!-- differences:end -->\n")
    with pytest.raises(ValueError, match="kind must be 'skip' or 'xfail'"):
        read_differences(doc)
    doc.write_text("no table")
    with pytest.raises(ValueError, match="no table between"):
        read_differences(doc)
