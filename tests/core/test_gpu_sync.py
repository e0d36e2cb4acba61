"""No blocking host sync in a training step on CUDA, checked by CUDA itself
(``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call).

GPU only; the CPU twins count host reads with a dispatch mode (tests/core/test_pipeline.py for
the single-device step, tests/distributed/test_step_guards.py for the partitioned head).
"""

import contextlib

import pytest
import torch

import marginkit as mk

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (CPU twins: test_pipeline.py, distributed/test_step_guards.py)", allow_module_level=True)


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _batch(B=256, C=50_000, D=128, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(C, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    y[::7] = -100
    return x, w, y


@pytest.mark.parametrize("per_class", [False, True], ids=["spec-margin", "class-margins"])
def test_default_cuda_training_step_has_no_host_sync(per_class):
    x, w, y = _batch()
    kwargs = {"class_margins": torch.rand(w.shape[0], device="cuda") * 0.5} if per_class else {}
    for _ in range(2):  # first calls compile and autotune (which times kernels: syncs are fine there)
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, **kwargs).backward()
    torch.cuda.synchronize()
    with syncs_are_errors():
        loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, **kwargs)
        loss.backward()
    assert torch.isfinite(loss).item() and torch.isfinite(w.grad).all().item()


def test_a_margin_schedule_adds_no_host_sync():
    """A new ArcFace margin every step (warm-up schedules): its float64 constants reach the fused
    target kernel by a non-blocking copy from pinned memory."""
    x, w, y = _batch(C=1000)
    mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.2), 64.0).backward()
    torch.cuda.synchronize()
    with syncs_are_errors():
        for step in range(3):
            mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.3 + 0.01 * step), 64.0).backward()
    assert torch.isfinite(w.grad).all().item()


def test_bad_label_on_cuda_raises_at_the_next_call_and_changes_no_weight():
    x, w, y = _batch(C=1000)
    bad = y.clone()
    bad[3] = 1000
    with torch.no_grad():
        ignored = bad.clone()
        ignored[3] = -100
    loss = mk.margin_cross_entropy(x, w, bad)
    loss.backward()
    grad_bad = w.grad.clone()
    w.grad = None
    with pytest.raises(ValueError, match="labels contains 1000"):
        mk.functional.check_pending_labels(wait=True)
    mk.margin_cross_entropy(x, w, ignored).backward()
    assert torch.equal(grad_bad, w.grad)


def test_partitioned_head_nccl_world_one_step_has_no_host_sync():
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        head = mk.PartitionedMarginSoftmax(50_000, 128, mk.ArcFace(0.5), 64.0, max_local_batch=256,
                                           device="cuda", dtype=torch.bfloat16)
        x, _, y = _batch()
        for _ in range(2):
            head(x, y).backward()
        torch.cuda.synchronize()
        with syncs_are_errors():
            loss = head(x, y)
            loss.backward()
        assert torch.isfinite(loss).item()
    finally:
        dist.destroy_process_group()
