"""Run under torchrun --nproc_per_node 2 (gloo, CPU): ddp_train.py MODE[,MODE...] OUT AUGMENT_EVERY[,AUGMENT_EVERY...].
Mode 'driver': accelerate loop with create_geolora_optimizer. Mode 'trainer': stock Trainer with GeoLoRACallback.
Mode 'nan': rank 1 alone sees a NaN gradient once, after the all-reduce.
One run per mode and AUGMENT_EVERY, in the same processes (one launch: each launch costs two fresh interpreters); each
process writes its final ranks and weights to OUT/<MODE>/<AUGMENT_EVERY>/rank{R}.pt."""

import os
import sys

import peft
import torch

import geolora

modes, out_root = sys.argv[1].split(","), sys.argv[2]
schedules = [int(k) for k in (sys.argv[3] if len(sys.argv) > 3 else "1").split(",")]


def build(mode, augment_every):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=2
    )
    model = BertForSequenceClassification(cfg)
    rank = int(os.environ.get("RANK", 0))
    # a perturbed tau on one process: ranks must still agree because process 0 decides them
    tau = 0.3 + (1e-3 if rank == 1 else 0.0)
    return peft.get_peft_model(
        model,
        geolora.GeoLoRAConfig(
            r=4,
            r_max=8,
            tau=tau,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
            sync_factors_every=3 if mode == "driver" else 0,
            augment_every=augment_every,
        ),
    )


def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 8), generator=g)
    return ids, (ids[:, 0] > 50).long()


def dump(model, accelerator_rank, out):
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if "geolora" in n}
    torch.save({"ranks": geolora.get_ranks(model), "state": state}, os.path.join(out, f"rank{accelerator_rank}.pt"))


def run(mode, augment_every, out):
    os.makedirs(out, exist_ok=True)
    if mode in ("driver", "nan"):
        from accelerate import Accelerator

        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = build(mode, augment_every)
        opt = geolora.create_geolora_optimizer(model, lr=5e-2)
        ids, labels = data()
        ds = torch.utils.data.TensorDataset(ids, labels)
        loader = torch.utils.data.DataLoader(ds, batch_size=8)
        model, opt, loader = acc.prepare(model, opt, loader)
        micro = 0
        truncating = 0  # optimizer steps that truncate (every step at augment_every=1, the last of each interval else)
        for _epoch in range(2):
            for x, y in loader:
                with acc.accumulate(model):
                    loss = model(input_ids=x, labels=y).loss
                    acc.backward(loss)
                    micro += 1
                    if mode == "nan" and micro == 4 and acc.process_index == 1:
                        # micro-batch 4 is a sync step: DDP has already all-reduced the gradients, so only THIS process
                        # sees the NaN; the processes must still agree to skip (distributed.agree_across_processes)
                        assert acc.sync_gradients
                        for n, p in model.named_parameters():
                            if "geolora_U" in n and p.grad is not None:
                                p.grad.fill_(float("nan"))
                                break
                    if acc.sync_gradients:
                        phase, skipped = opt.optimizer.phase, opt.optimizer.skipped_steps
                    opt.step()
                    if acc.sync_gradients and opt.optimizer.skipped_steps == skipped:
                        truncating += phase in ("step", "truncate")
                    opt.zero_grad()
        inner = opt.optimizer
        assert inner.truncations == truncating * 4 > 0, (inner.truncations, truncating)
        # 64 samples / 2 processes / batch 8 = 4 micro-batches per epoch -> 2 optimizer steps per epoch
        expected = 4 - (1 if mode == "nan" else 0)
        assert inner.num_steps == expected, inner.num_steps
        assert inner.skipped_steps == (1 if mode == "nan" else 0), inner.skipped_steps
        dump(acc.unwrap_model(model), acc.process_index, out)
    else:
        import datasets
        from transformers import Trainer, TrainingArguments

        model = build(mode, augment_every)
        ids, labels = data()
        ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
        args = TrainingArguments(
            os.path.join(out, "trainer"),
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            learning_rate=5e-2,
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        cb = geolora.GeoLoRACallback()
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
        trainer.train()
        assert cb.optimizer.num_steps == trainer.state.global_step > 0
        dump(model, trainer.args.process_index, out)


for mode in modes:
    for k in schedules:
        run(mode, k, os.path.join(out_root, mode, str(k)))
