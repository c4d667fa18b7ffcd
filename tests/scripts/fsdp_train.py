"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU, gloo. Usage:

    torchrun --nproc_per_node 2 fsdp_train.py driver OUT AUGMENT_EVERY     # custom loop, each process half a batch
    python fsdp_train.py reference OUT AUGMENT_EVERY                       # the same run in one process, no FSDP
    torchrun --nproc_per_node 2 fsdp_train.py resume OUT AUGMENT_EVERY     # driver: 3 steps, dcp checkpoint, new
                                                                           # model and optimizer, dcp load, 3 more

Each process writes OUT/<mode>-rank{R}.pt: the ranks (host mirror and rank buffers), the full factors (gathered from
the shards) and the per-step losses; process 0 saves the adapter to OUT/<mode>-adapter (under FSDP2 from the full
state dict, as the Trainer does).
"""

import os
import sys

import peft
import torch

import geolora

mode, out = sys.argv[1], sys.argv[2]
augment_every = int(sys.argv[3]) if len(sys.argv) > 3 else 1
STEPS, BATCH = 6, 8


def build():
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


def dump(model, rank, losses):
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


def sharded_model_and_optimizer():
    from torch.distributed.fsdp import fully_shard

    model = build()
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


if mode == "reference":
    model = build()
    opt = geolora.create_geolora_optimizer(model, lr=5e-2, num_training_steps=STEPS)
    losses = train(model, opt, batches(), 0, 1)
    assert opt.num_steps == STEPS and opt.skipped_steps == 0
    opt.finish_interval()
    dump(model, 0, losses)
    model.save_pretrained(os.path.join(out, f"{mode}-adapter"))
else:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = sharded_model_and_optimizer()
    if mode == "driver":
        losses = train(model, opt, batches(), rank, world)
    else:  # resume: what the Trainer's FSDP2 checkpointing does, through torch.distributed.checkpoint
        losses = train(model, opt, batches()[:3], rank, world)
        ckpt = os.path.join(out, "dcp-checkpoint")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt
        )
        del model, opt
        model, opt = sharded_model_and_optimizer()
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        assert opt.num_steps == 3, opt.num_steps
        losses += train(model, opt, batches()[3:], rank, world)
    assert opt.num_steps == STEPS and opt.skipped_steps == 0
    opt.finish_interval()
    dump(model, rank, losses)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out, f"{mode}-adapter"), state_dict=full)
    dist.barrier()
    dist.destroy_process_group()
