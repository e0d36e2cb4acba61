"""Checkpoint save/resume for train.py: the backbone side once (rank 0), the head sharded or whole.

A checkpoint directory ``<output>/step_<k>/`` holds:

* ``trainer.pt`` (rank 0): the step, the backbone (identical on every rank under DDP), its
  optimizer, both LR schedulers, the GradScaler, the row-sparse head optimizer's
  hyper-parameters, and the world size it was written at;
* the head: ``head/`` (``mk.distributed.save_sharded``: each rank writes its own rows, any world
  size can load it) or ``head_full.pt`` (``head.full_state_dict()``, whole tensors, written by
  rank 0). Both carry the weight, the row-sparse optimizer's per-row momentum, the Partial FC
  step counter and seed;
* ``head_optimizer_rank<r>.pt`` with a plain ``torch.optim`` head optimizer: its momentum is
  per shard, so such a checkpoint resumes only at the world size that wrote it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from marginkit.distributed import load_sharded, save_sharded

TRAINER_FILE = "trainer.pt"
HEAD_DIR = "head"
HEAD_FULL_FILE = "head_full.pt"


def _head_optimizer_file(rank: int) -> str:
    return f"head_optimizer_rank{rank}.pt"


def save_checkpoint(directory, step, backbone, head, opt_backbone, opt_head, schedulers, scaler, args) -> None:
    """Every rank calls it (the head's save is collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    plain_head_optimizer = args.head_optimizer == "sgd"
    if args.checkpoint_format == "sharded":
        save_sharded(head, os.path.join(directory, HEAD_DIR))
    else:
        full = head.full_state_dict(device="cpu")  # collective: every rank takes part
        if rank == 0:
            torch.save(full, os.path.join(directory, HEAD_FULL_FILE))
    if plain_head_optimizer:
        torch.save(opt_head.state_dict(), os.path.join(directory, _head_optimizer_file(rank)))
    if rank == 0:
        trainer = {
            "step": step,
            "world_size": world,
            "head_optimizer": args.head_optimizer,
            "backbone": backbone.state_dict(),
            "opt_backbone": opt_backbone.state_dict(),
            "schedulers": [s.state_dict() for s in schedulers],
            "scaler": scaler.state_dict(),
            # PartialFCSGD keeps its per-row state in the head; its state_dict is hyper-parameters only
            "opt_head": None if plain_head_optimizer else opt_head.state_dict(),
        }
        torch.save(trainer, os.path.join(directory, TRAINER_FILE))
    dist.barrier()  # nobody resumes from (or deletes) a half-written checkpoint


def load_checkpoint(directory, backbone, head, opt_backbone, opt_head, schedulers, scaler, args) -> int:
    """Restore everything ``save_checkpoint`` wrote into freshly built objects; returns the step
    to continue from. Call it before wrapping the backbone in DDP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = torch.load(os.path.join(directory, TRAINER_FILE), map_location="cpu", weights_only=False)
    if trainer["head_optimizer"] != args.head_optimizer:
        raise ValueError(
            f"--head-optimizer is {args.head_optimizer!r} but {directory} was written with "
            f"{trainer['head_optimizer']!r}"
        )
    plain_head_optimizer = args.head_optimizer == "sgd"
    if plain_head_optimizer and trainer["world_size"] != world:
        raise ValueError(
            f"{directory} holds a plain torch optimizer's per-shard state for world size "
            f"{trainer['world_size']}; resume at that world size, not {world} (or train with "
            f"--head-optimizer partialfc-sgd, whose state reshards with the head)"
        )
    backbone.load_state_dict(trainer["backbone"])
    opt_backbone.load_state_dict(trainer["opt_backbone"])
    for scheduler, state in zip(schedulers, trainer["schedulers"]):
        scheduler.load_state_dict(state)
    scaler.load_state_dict(trainer["scaler"])
    if os.path.isdir(os.path.join(directory, HEAD_DIR)):
        load_sharded(head, os.path.join(directory, HEAD_DIR))
    else:
        full = torch.load(os.path.join(directory, HEAD_FULL_FILE), map_location="cpu", weights_only=False)
        head.load_full_state_dict({k: v.to(head.weight.device) for k, v in full.items()})
    if plain_head_optimizer:
        state = torch.load(os.path.join(directory, _head_optimizer_file(rank)), map_location=head.weight.device,
                           weights_only=False)
        opt_head.load_state_dict(state)
    else:  # a row-sparse optimizer's state_dict is its hyper-parameters (its momentum lives in the head)
        opt_head.load_state_dict(trainer["opt_head"])
    return int(trainer["step"])
