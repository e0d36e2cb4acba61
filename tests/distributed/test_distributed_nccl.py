"""PartitionedMarginSoftmax over NCCL on GPUs (skipped without CUDA).

World size 1 on any GPU machine (plus 2 where two GPUs are visible): the head with
the default backend (Triton on CUDA) must match the single-GPU ``margin_cross_entropy``
over the same batch, in float32 and bfloat16; Partial FC must run on the CUDA sampling
and row-sparse ops; full and DCP checkpoints must round-trip through NCCL.
"""

from __future__ import annotations

import os

import pytest
import torch

import marginkit as mk
from tests.distributed.harness import run_world, save_results
from tests.helpers import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and NCCL")]

WORLDS = [1] + ([2] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])


def _case_results(world, rank, dev, dtype):
    from tests.distributed.cases import CASES, case_batch, class_margins, full_weight, local_rows, make_head

    out = {}
    for case, spec in CASES.items():
        x, labels = case_batch(case, 1)
        head = make_head(case).to(device=dev, dtype=dtype)
        if head.class_margins is not None:  # margins stay float32 (.to cast them)
            head.class_margins = class_margins()[head.class_start : head.class_stop].to(dev)
        xl = local_rows(x, world, rank).to(dev, dtype).clone().requires_grad_(True)
        loss = head(xl, local_rows(labels, world, rank).to(dev))
        loss.backward()
        # The single-GPU fused loss over the global batch, same device and dtype.
        xg = x.to(dev, dtype).clone().requires_grad_(True)
        wg = full_weight().to(dev, dtype).clone().requires_grad_(True)
        cm = class_margins().to(dev) if spec.get("class_margins") else None
        ref = mk.margin_cross_entropy(xg, wg, labels.to(dev), spec["margin"], spec["scale"], class_margins=cm,
                                      reduction=spec.get("reduction", "mean"), ignore_index=spec.get("ignore_index", -100),
                                      interclass_filtering_threshold=spec.get("interclass_filtering_threshold", 0.0))
        ref.backward()
        start, stop = head.class_start, head.class_stop
        out[case] = dict(
            loss=loss.detach().cpu(), ref_loss=ref.detach().cpu(),
            grad_x=xl.grad.float().cpu(), ref_grad_x=local_rows(xg.grad, world, rank).float().cpu(),
            grad_w=head.weight.grad.float().cpu(), ref_grad_w=wg.grad[start:stop].float().cpu(),
        )
    return out


def _partial_fc(world, rank, dev):
    from marginkit.distributed import PartialFCSGD
    from tests.distributed.cases import global_batch, local_rows, make_head

    head = make_head("arcface", sample_rate=0.2).to(dev)  # .to moves every buffer, the updated-rows mask too
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, labels = global_batch(2)
    ok = []
    for _ in range(2):
        before_w, before_m = head.weight.detach().clone(), head.momentum_buffer.clone()
        head(local_rows(x, world, rank).to(dev), local_rows(labels, world, rank).to(dev)).backward()
        keep = torch.zeros(head.num_local, dtype=torch.bool, device=dev)
        keep[head.last_sampled] = True
        opt.step()
        opt.zero_grad()
        ok.append(bool(torch.equal(head.weight.detach()[~keep], before_w[~keep]))
                  and bool(torch.equal(head.momentum_buffer[~keep], before_m[~keep])))
    positives = labels[(labels >= head.class_start) & (labels < head.class_stop)] - head.class_start
    return dict(unchanged=ok, positives_kept=bool(torch.isin(positives.to(dev), head.last_sampled).all()))


def _checkpoints(world, rank, dev, outdir):
    from marginkit.distributed import PartitionedMarginSoftmax, load_sharded, save_sharded
    from tests.distributed.cases import C, D
    from tests.distributed.test_distributed import _checkpoint_head

    head = _checkpoint_head(seed=world, device=dev)
    full = head.full_state_dict(device="cpu")
    path = os.path.join(outdir, f"nccl_dcp_w{world}")
    save_sharded(head, path)
    fresh = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.5, seed=99, device=dev)
    load_sharded(fresh, path)
    again = fresh.full_state_dict(device="cpu")
    return dict(equal=all(torch.equal(full[k], again[k]) for k in full), keys=sorted(full))


def _nccl_worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    save_results(lambda: dict(
        fp32=_case_results(world, rank, dev, torch.float32),
        bf16=_case_results(world, rank, dev, torch.bfloat16),
        partial_fc=_partial_fc(world, rank, dev),
        checkpoints=_checkpoints(world, rank, dev, outdir),
    ), world, rank, outdir)


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("nccl"))
    # spawned, not forked: this module's torch.cuda.is_available() initialises CUDA in whatever imports it,
    # and a fork server that preloaded it could not give its children a working CUDA
    return {w: run_world(w, outdir, timeout=300.0, worker=_nccl_worker, start_method="spawn") for w in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_nccl_matches_single_gpu_fp32(nccl_runs, world):
    for res in nccl_runs[world]:
        for case, r in res["fp32"].items():
            assert rel_err(r["loss"], r["ref_loss"]) < 1e-5, case
            if r["grad_x"].numel():
                assert rel_err(r["grad_x"], r["ref_grad_x"]) < 1e-5, case
            assert rel_err(r["grad_w"], r["ref_grad_w"]) < 1e-5, case


@pytest.mark.parametrize("world", WORLDS)
def test_nccl_matches_single_gpu_bf16(nccl_runs, world):
    for res in nccl_runs[world]:
        for case, r in res["bf16"].items():
            assert torch.isfinite(r["loss"]).all(), case
            assert rel_err(r["loss"], r["ref_loss"]) < 1e-3, case
            if r["grad_x"].numel():
                assert rel_err(r["grad_x"], r["ref_grad_x"]) < 2e-2, case
            assert rel_err(r["grad_w"], r["ref_grad_w"]) < 2e-2, case


@pytest.mark.parametrize("world", WORLDS)
def test_nccl_partial_fc_and_checkpoints(nccl_runs, world):
    for res in nccl_runs[world]:
        assert res["partial_fc"]["unchanged"] == [True, True]
        assert res["partial_fc"]["positives_kept"]
        assert res["checkpoints"]["equal"]
        assert "momentum_buffer" in res["checkpoints"]["keys"]
