"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU, gloo. Usage: fsdp_train.py OUT MODE:AUGMENT_EVERY[,...], e.g.

    torchrun --nproc_per_node 2 fsdp_train.py OUT driver:1,driver:2,resume:2
    python fsdp_train.py OUT reference:1,reference:2

Modes: ``driver`` (custom loop, each process half a batch), ``reference`` (the same run in one process, no FSDP),
``resume`` (driver: 3 steps, dcp checkpoint, new model and optimizer, dcp load, 3 more). The runs share the processes
(one launch: each launch costs fresh interpreters). Each process writes OUT/<AUGMENT_EVERY>/<mode>-rank{R}.pt: the
ranks (host mirror and rank buffers), the full factors (gathered from the shards) and the per-step losses; process 0
saves the adapter to OUT/<AUGMENT_EVERY>/<mode>-adapter (under FSDP2 from the full state dict, as the Trainer does).
"""

import os
import sys

import peft
import torch

import geolora

out_root = sys.argv[1]
RUNS = [(m, int(k)) for m, k in (item.split(":") for item in sys.argv[2].split(","))]
STEPS, BATCH = 6, 8


def build(augment_every):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    # the LM head trained in full (modules_to_save): a sharded non-GeoLoRA trainable, stepped by the wrapped AdamW
    return peft.get_peft_model(
        model,
        geolora.GeoLoRAConfig(
            r=2,
            r_max=8,
            tau=0.2,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            augment_every=augment_every,
            tau_warmup_steps=0,
            modules_to_save=["lm_head"],
        ),
    )


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (BATCH, 12), generator=g) for _ in range(STEPS)]


def dump(model, rank, losses, mode, out):
    from torch.distributed.tensor import DTensor

    layers = {n: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}
    factors = {}
    for n, p in model.named_parameters():
        if "geolora_" in n:
            factors[n] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    torch.save(
        {
            "ranks": {n: m.r["default"] for n, m in layers.items()},
            "rank_buffers": {n: int(m.geolora_rank["default"]) for n, m in layers.items()},
            "sharded": any(isinstance(p, DTensor) for n, p in model.named_parameters() if "geolora_" in n),
            "factors": factors,
            "losses": losses,
        },
        os.path.join(out, f"{mode}-rank{rank}.pt"),
    )


def sharded_model_and_optimizer(augment_every):
    from torch.distributed.fsdp import fully_shard

    model = build(augment_every)
    geolora.grow_capacity(model)  # before sharding: fully_shard keeps the shapes it sees
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, geolora.create_geolora_optimizer(model, lr=5e-2, num_training_steps=STEPS)  # after sharding


def train(model, opt, steps, rank, world):
    losses = []
    for ids in steps:
        part = ids.chunk(world)[rank]  # each process half the batch; FSDP averages the gradients
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def run_reference(augment_every, out):
    model = build(augment_every)
    opt = geolora.create_geolora_optimizer(model, lr=5e-2, num_training_steps=STEPS)
    losses = train(model, opt, batches(), 0, 1)
    assert opt.num_steps == STEPS and opt.skipped_steps == 0
    opt.finish_interval()
    dump(model, 0, losses, "reference", out)
    model.save_pretrained(os.path.join(out, "reference-adapter"))


def run_sharded(mode, augment_every, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = sharded_model_and_optimizer(augment_every)
    if mode == "driver":
        losses = train(model, opt, batches(), rank, world)
    else:  # resume: what the Trainer's FSDP2 checkpointing does, through torch.distributed.checkpoint
        losses = train(model, opt, batches()[:3], rank, world)
        ckpt = os.path.join(out, "dcp-checkpoint")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt
        )
        del model, opt
        model, opt = sharded_model_and_optimizer(augment_every)
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        assert opt.num_steps == 3, opt.num_steps
        losses += train(model, opt, batches()[3:], rank, world)
    assert opt.num_steps == STEPS and opt.skipped_steps == 0
    opt.finish_interval()
    dump(model, rank, losses, mode, out)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out, f"{mode}-adapter"), state_dict=full)
    dist.barrier()


sharded = any(m != "reference" for m, _ in RUNS)
if sharded:
    import torch.distributed as dist

    dist.init_process_group("gloo")
for mode, augment_every in RUNS:
    folder = os.path.join(out_root, str(augment_every))
    os.makedirs(folder, exist_ok=True)
    if mode == "reference":
        run_reference(augment_every, folder)
    else:
        run_sharded(mode, augment_every, folder)
if sharded:
    dist.destroy_process_group()
