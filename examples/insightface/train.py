"""insightface ``arcface_torch/train_v2.py``-style training with marginkit's partitioned head.

What train_v2 does, spelled with marginkit: a DDP backbone, the class-sharded margin head
(``mk.PartitionedMarginSoftmax`` in place of ``PartialFC_V2``) with insightface's exact margin
(``mk.insightface_margin(margin_list)`` in place of ``CombinedMarginLoss``), ``grad_scale="ddp"``
(insightface's embedding-gradient convention), Partial FC (``--sample-rate`` < 1) stepped by the
row-sparse ``mk.distributed.PartialFCSGD`` or by a plain ``torch.optim.SGD`` as train_v2 does,
``torch.autocast`` with a GradScaler for fp16, gradient clipping, a warm-up + polynomial LR
schedule, and checkpoint save/resume. Synthetic identities stand in for the dataset.

    torchrun --standalone --nproc_per_node=2 examples/insightface/train.py --output /tmp/mk_insightface

gloo on CPU, NCCL on GPUs (one per process). The defaults are tiny: 20 steps in seconds on 2
CPU cores. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import marginkit as mk
from marginkit.distributed import PartialFCSGD

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, however launched
from synthetic_identities import SyntheticIdentities, make_backbone  # noqa: E402
from train_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--margin-list", default="1.0,0.5,0.0",
                   help="insightface's config.margin_list m1,m2,m3 (ArcFace 1,0.5,0; CosFace 1,0,0.4)")
    p.add_argument("--scale", type=float, default=64.0, help="s of CombinedMarginLoss")
    p.add_argument("--num-classes", type=int, default=64)
    p.add_argument("--embedding-size", type=int, default=32)
    p.add_argument("--input-dim", type=int, default=48, help="size of a synthetic sample")
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="per rank, as insightface's config.batch_size")
    p.add_argument("--sample-rate", type=float, default=0.5, help="Partial FC; 1.0 = every class every step")
    p.add_argument("--head-optimizer", choices=("partialfc-sgd", "sgd"), default="partialfc-sgd",
                   help="partialfc-sgd: row-sparse, unsampled rows stay put; sgd: torch.optim.SGD as train_v2")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="total steps of the schedule")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (simulates an interruption)")
    p.add_argument("--clip-grad", type=float, default=5.0, help="max norm of the backbone's gradient (train_v2: 5)")
    p.add_argument("--amp", choices=("auto", *AMP_DTYPES), default="auto",
                   help="torch.autocast dtype; auto: fp16 on CUDA (insightface's fp16=True), bf16 on CPU")
    p.add_argument("--grad-scale", choices=("ddp", "global"), default="ddp")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="output_insightface",
                   help="checkpoints go to <output>/step_<k>/ (relative to the current directory)")
    p.add_argument("--save-every", type=int, default=0, help="also save every k steps (0: only at the end)")
    p.add_argument("--checkpoint-format", choices=("sharded", "full"), default="sharded",
                   help="sharded: save_sharded/load_sharded (any world size); full: full_state_dict, rank 0 writes")
    p.add_argument("--resume", default=None, help="a <output>/step_<k> directory to continue from")
    p.add_argument("--log-json", default=None, help="rank 0 appends one JSON line per step here")
    args = p.parse_args(argv)
    problem = _check(args)
    if problem:
        p.error(problem)  # one usage line and exit status 2, before any process group or model
    return args


def _check(args) -> str:
    """What is wrong with ``args`` (naming the flag), or '' (bad values used to end in tracebacks,
    and --batch-size 0 "trained" with loss 0)."""
    for flag, value in (("--num-classes", args.num_classes), ("--embedding-size", args.embedding_size),
                        ("--input-dim", args.input_dim), ("--hidden-dim", args.hidden_dim),
                        ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    for flag, value in (("--warmup-steps", args.warmup_steps), ("--save-every", args.save_every)):
        if value < 0:
            return f"{flag} must be >= 0, got {value}"
    if args.stop_at is not None and args.stop_at < 1:
        return f"--stop-at must be >= 1, got {args.stop_at}"
    if not 0.0 < args.sample_rate <= 1.0:
        return f"--sample-rate must be in (0, 1], got {args.sample_rate}"
    if not 0.0 < args.scale < math.inf:
        return f"--scale must be finite and > 0, got {args.scale}"
    for flag, value in (("--lr", args.lr), ("--momentum", args.momentum), ("--weight-decay", args.weight_decay)):
        if not 0.0 <= value < math.inf:
            return f"{flag} must be finite and >= 0, got {value}"
    if not args.clip_grad > 0:
        return f"--clip-grad must be > 0, got {args.clip_grad}"
    try:
        margins = [float(v) for v in args.margin_list.split(",")]
    except ValueError:
        margins = []
    if len(margins) != 3 or not all(math.isfinite(v) for v in margins):
        return f"--margin-list must be three numbers m1,m2,m3 (e.g. 1.0,0.5,0.0), got {args.margin_list!r}"
    if args.resume is not None and not os.path.isdir(args.resume):
        return f"--resume {args.resume}: no such checkpoint directory (give <output>/step_<k>)"
    return ""


def init_distributed() -> torch.device:
    """torchrun's environment, or a one-process group when run with plain python."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def poly_with_warmup(warmup: int, total: int):
    """insightface's PolyScheduler shape: linear warm-up, then (1 - progress)^2."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup)) ** 2
    return factor


def _no_buffer_sync() -> dict:
    """train_v2's broadcast_buffers=False (BatchNorm statistics stay per rank), spelled as this torch wants."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    amp_dtype = AMP_DTYPES[("fp16" if device.type == "cuda" else "bf16") if args.amp == "auto" else args.amp]

    torch.manual_seed(args.seed)  # the same backbone on every rank (DDP would broadcast rank 0's anyway)
    backbone = make_backbone(args.input_dim, args.hidden_dim, args.embedding_size).to(device)
    margin = mk.insightface_margin(tuple(float(v) for v in args.margin_list.split(",")))
    head = mk.PartitionedMarginSoftmax(
        args.num_classes, args.embedding_size, margin, args.scale, sample_rate=args.sample_rate,
        grad_scale=args.grad_scale, backend=args.backend, seed=args.seed, device=device,
    )  # float32 weight: under autocast it is read as a master weight, weight.grad stays float32

    opt_backbone = torch.optim.SGD(backbone.parameters(), lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay)
    if args.head_optimizer == "partialfc-sgd":
        opt_head = PartialFCSGD(head, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:  # as train_v2: decay and momentum move unsampled rows too
        opt_head = torch.optim.SGD([head.weight], lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    factor = poly_with_warmup(args.warmup_steps, args.steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_backbone, opt_head)]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16, growth_interval=100)

    if rank == 0 and args.log_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_json)), exist_ok=True)
    start = 0
    if args.resume:
        start = load_checkpoint(args.resume, backbone, head, opt_backbone, opt_head, schedulers, scaler, args)
    ddp_backbone = DistributedDataParallel(backbone, **_no_buffer_sync())  # the head is not wrapped
    data = SyntheticIdentities(args.num_classes, args.input_dim, seed=args.seed)
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)

    if rank == 0:
        print(f"world {world} on {device}, margin {margin}, sample_rate {args.sample_rate}, "
              f"head optimizer {args.head_optimizer}, autocast {amp_dtype}, steps {start}..{stop}", flush=True)
    for step in range(start, stop):
        inputs, labels = data.batch(step, rank, args.batch_size)
        inputs, labels = inputs.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = head(ddp_backbone(inputs), labels)  # the global-batch mean, the same on every rank
        scaler.scale(loss).backward()
        scaler.unscale_(opt_backbone)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), args.clip_grad)
        scaler.step(opt_backbone)
        scaler.step(opt_head)
        scaler.update()
        opt_backbone.zero_grad()
        opt_head.zero_grad()
        lr = schedulers[0].get_last_lr()[0]
        for scheduler in schedulers:
            scheduler.step()

        value = float(loss.detach())
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {value:.6f} lr {lr:.5f}", flush=True)
            if args.log_json:
                with open(args.log_json, "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": value, "lr": lr, "world_size": world}) + "\n")
        done = step + 1
        if done == stop or (args.save_every and done % args.save_every == 0):
            save_checkpoint(os.path.join(args.output, f"step_{done}"), done, backbone, head, opt_backbone,
                            opt_head, schedulers, scaler, args)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
