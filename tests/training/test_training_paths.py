"""Every documented way of running GeoLoRA trains the adapter, at the learning rate the scheduler sets.

Each path records the learning rate of the GeoLoRA param group that the scheduler set before every optimizer step
and the λ the GeoLoRA step actually read, and checks that S moved.  The bug these guard against: the step cached
the param-group dicts, and ``Optimizer.load_state_dict`` (run by accelerate when it wraps an optimizer, and by the
Trainer on resume) replaces them, so the step kept reading the lr of the moment of caching: 0 for a warm-up from 0,
and S stayed exactly 0 for the whole run.
"""

import warnings

import datasets
import peft
import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import geolora
from geolora.optim import NEVER_TRAINED_STEPS, GeoLoRAOptimizer

STEPS = 8
LR = 1e-2


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=2
    )
    return peft.get_peft_model(
        BertForSequenceClassification(cfg),
        geolora.GeoLoRAConfig(
            r=2, r_max=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
        ),
    )


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 50).long().tolist()})


def _S(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "geolora_S" in n}


def _max_change(model, before):
    """max |S_after - S_before| over layers (S_before zero-padded: capacity grows to r_max before training)."""
    change = 0.0
    for n, p in model.named_parameters():
        if n in before:
            b = before[n]
            padded = torch.nn.functional.pad(b, (0, p.shape[1] - b.shape[1], 0, p.shape[0] - b.shape[0]))
            change = max(change, (p.detach() - padded).abs().max().item())
    return change


@pytest.fixture
def read_lrs(monkeypatch):
    """The λ the GeoLoRA step reads, one entry per optimizer step (the groups share one param group here)."""
    seen = []
    original = GeoLoRAOptimizer._lrs

    def spy(self, g, device, dtype):
        lr, wd = original(self, g, device, dtype)
        if g is self._groups[0]:
            seen.append(float(lr))
        return lr, wd

    monkeypatch.setattr(GeoLoRAOptimizer, "_lrs", spy)
    return seen


class _RecordLR(TrainerCallback):
    """The lr of the GeoLoRA param group as the scheduler set it, just before each optimizer step."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = [pg for pg in optimizer.param_groups if pg.get("geolora")] or optimizer.param_groups
        self.lrs.append(float(groups[0]["lr"]))


def _args(out, **kw):
    kw.setdefault("learning_rate", LR)
    return TrainingArguments(
        str(out),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        **kw,
    )


def _check(model, before, scheduled, read, warmup_from_zero):
    assert len(read) == STEPS and len(scheduled) == STEPS
    assert read == pytest.approx(scheduled, rel=1e-12, abs=0.0)  # the step follows the scheduler
    assert (scheduled[0] == 0.0) == warmup_from_zero
    assert max(scheduled) > 0
    assert _max_change(model, before) > 1e-4, "S did not move: the adapter did not train"


@pytest.mark.parametrize("warmup_from_zero", [True, False], ids=["warmup-from-0", "constant"])
def test_callback_alone(tmp_path, read_lrs, warmup_from_zero):
    model = _model()
    before = _S(model)
    rec = _RecordLR()
    kw = {"warmup_steps": 2, "lr_scheduler_type": "linear"} if warmup_from_zero else {"lr_scheduler_type": "constant"}
    Trainer(
        model=model, args=_args(tmp_path, **kw), train_dataset=_data(), callbacks=[geolora.GeoLoRACallback(), rec]
    ).train()
    _check(model, before, rec.lrs, read_lrs, warmup_from_zero)


@pytest.mark.parametrize("scheduler", ["warmup-from-0", "warmup-from-positive", "none"])
@pytest.mark.parametrize("s_update", ["adam", "sgd"])
def test_callback_with_explicit_optimizer(tmp_path, read_lrs, scheduler, s_update):
    model = _model()
    opt = geolora.create_geolora_optimizer(
        model, lr=LR, geolora_lr=LR if s_update == "adam" else 1.0, s_update=s_update
    )
    if scheduler == "warmup-from-0":
        sched = transformers.get_linear_schedule_with_warmup(opt, 2, STEPS)
    elif scheduler == "warmup-from-positive":
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=4)
    else:
        sched = None  # the Trainer builds its own (linear decay) on this optimizer
    before = _S(model)
    rec = _RecordLR()
    Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_data(),
        optimizers=(opt, sched),
        callbacks=[geolora.GeoLoRACallback(), rec],
    ).train()
    _check(model, before, rec.lrs, read_lrs, scheduler == "warmup-from-0")
    if sched is None:
        assert read_lrs[-1] < read_lrs[0]  # the Trainer's decay reached the step


def test_trainer_optimizers_without_callback(tmp_path, read_lrs):
    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, STEPS)
    before = _S(model)
    rec = _RecordLR()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), optimizers=(opt, sched), callbacks=[rec]).train()
    _check(model, before, rec.lrs, read_lrs, True)
    assert opt.num_steps == STEPS


def _batches(n=STEPS, size=8):
    data = _data()
    for i in range(n):
        rows = data[(i * size) % len(data) : (i * size) % len(data) + size]
        yield {"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["labels"])}


@pytest.mark.parametrize("warmup_from_zero", [True, False])
def test_plain_loop(read_lrs, warmup_from_zero):
    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    start = 0.0 if warmup_from_zero else 0.25
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, start + (1 - start) * t / 2))
    before, scheduled = _S(model), []
    for batch in _batches():
        model(**batch).loss.backward()
        scheduled.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
    _check(model, before, scheduled, read_lrs, warmup_from_zero)


def test_accelerate_loop(read_lrs):
    from accelerate import Accelerator

    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, STEPS)
    accelerator = Accelerator(cpu=True)
    model, opt_acc, sched = accelerator.prepare(model, opt, sched)  # load_state_dict replaces the param groups
    before, scheduled = _S(model), []
    for batch in _batches():
        accelerator.backward(model(**batch).loss)
        scheduled.append(opt_acc.param_groups[0]["lr"])
        opt_acc.step()
        sched.step()
        opt_acc.zero_grad()
    _check(model, before, scheduled, read_lrs, True)


def test_param_groups_replaced_by_load_state_dict_are_followed():
    """The unit version: after load_state_dict the step reads the new dicts' lr."""
    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=0.0)
    opt.load_state_dict(opt.state_dict())  # new param-group dicts, as accelerate does
    for pg in opt.param_groups:
        pg["lr"] = LR
    before = _S(model)
    batch = next(_batches())
    model(**batch).loss.backward()
    opt.step()
    assert _max_change(model, before) > 0


# ------------------------------------------------------------------------------------------------ the guard
def _run_steps(model, opt, n):
    for batch in _batches(n):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _never_trained_warnings(record):
    return [w for w in record if "is not training" in str(w.message) or "no longer the model's" in str(w.message)]


def test_guard_warns_once_when_S_stays_zero():
    model = _model()
    # no gradient reaches the adapter: its layers are bypassed by a loss on the classifier only
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    head = model.base_model.model.classifier

    def steps(n):
        for _ in range(n):
            x = torch.randn(4, 32)
            head(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        steps(NEVER_TRAINED_STEPS + 3)
    found = _never_trained_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    assert "still exactly 0" in str(found[0].message) and "GeoLoRACallback" in str(found[0].message)


def test_guard_silent_when_training_and_during_a_zero_lr_warmup():
    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    for pg in opt.param_groups:
        pg["lr"] = 0.0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(NEVER_TRAINED_STEPS + 2):  # λ = 0: the guard does not count these steps
            model(**next(_batches())).loss.backward()
            opt.step()
            opt.zero_grad()
        for pg in opt.param_groups:
            pg["lr"] = LR
        _run_steps(model, opt, STEPS)
        _run_steps(model, opt, STEPS)
    assert opt._positive_lr_steps == 2 * STEPS > NEVER_TRAINED_STEPS
    assert not _never_trained_warnings(record), [str(w.message) for w in record]


def test_guard_warns_when_the_model_parameters_were_replaced():
    model = _model()
    opt = geolora.create_geolora_optimizer(model, lr=LR)
    for module in model.modules():  # e.g. a reload after the optimizer was built
        if isinstance(module, geolora.GeoLoRALayer):
            module.geolora_S["default"] = torch.nn.Parameter(module.geolora_S["default"].detach().clone())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _run_steps(model, opt, NEVER_TRAINED_STEPS + 1)
    found = _never_trained_warnings(record)
    assert len(found) == 1 and "no longer the model's" in str(found[0].message)
