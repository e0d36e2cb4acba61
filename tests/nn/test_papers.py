"""IRSoftmax and RangeLoss against float64 versions written here from API.md's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit.nn.fair_loss import FairLoss
from marginkit.nn.ir_softmax import IRSoftmax
from marginkit.nn.range_loss import RangeLoss

TOL = 1e-5


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    d = ref.norm()
    return float((out - ref).norm() / d) if d > 0 else float((out - ref).norm())


def textbook_ce(x, w, y, target_fn, scale, ignore_index=-100):
    """Float64 textbook margin softmax: (B, C) logits, target column replaced by target_fn(cos_y, rows)."""
    x, w = x.double(), w.double()
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    keep = y != ignore_index
    safe = torch.where(keep, y, torch.zeros_like(y))
    cos_y = cos.gather(1, safe[:, None]).squeeze(1)
    psi = target_fn(cos_y, safe)
    onehot = F.one_hot(safe, w.shape[0]).bool()
    logits = scale * torch.where(onehot, psi[:, None], cos)
    rows = torch.logsumexp(logits, dim=1) - scale * psi
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows.sum() / keep.sum().clamp_min(1)


def cosface_target(m):
    return lambda c, cls: c - (m if not torch.is_tensor(m) else m.double()[cls])


def sphereface_target(m):
    def fn(c, cls):
        theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
        k = torch.floor(m * theta / math.pi).detach()
        return (1 - 2 * torch.remainder(k, 2)) * torch.cos(m * theta) - 2 * k

    return fn


def inputs(B=24, C=11, D=12, seed=0, ignored=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 3.0
    y = torch.randint(0, C, (B,), generator=g)
    y[:ignored] = -100
    return x, y


def center_update_oracle(centers, x, y, momentum, ignore_index=-100):
    c = centers.double().clone()
    xn = F.normalize(x.double(), dim=1)
    for cls in y.unique().tolist():
        if cls == ignore_index:
            continue
        mean = xn[y == cls].mean(dim=0)
        c[cls] = F.normalize(momentum * c[cls] + (1 - momentum) * mean, dim=0)
    return c


# ----------------------------------------------------------------------------------------- IRSoftmax
@pytest.mark.parametrize(
    "margin,target",
    [(mk.CosFace(0.35), cosface_target(0.35)), (mk.SphereFace(4.0), sphereface_target(4.0)),
     (mk.SphereFace(1.5), sphereface_target(1.5))],
    ids=["IR-AM", "IR-A-m4", "IR-A-m1.5"],
)
@pytest.mark.parametrize("training", [True, False])
def test_ir_softmax_loss_and_gradient(margin, target, training):
    torch.manual_seed(1)
    C, D = 11, 12
    head = IRSoftmax(C, D, margin, scale=30.0, momentum=0.7).train(training)
    x, y = inputs(C=C, D=D)
    old = head.centers.clone()
    x64 = x.double().requires_grad_(True)
    ref = textbook_ce(x64, old, y, target, 30.0)
    (ref_gx,) = torch.autograd.grad(ref, x64)
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    loss.backward()  # after the in-place center update: backward must still see the old centers
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < TOL
    assert rel_err(xx.grad, ref_gx) < TOL
    assert head.centers.grad is None and not head.centers.requires_grad
    assert list(head.parameters()) == []
    if training:
        assert torch.allclose(head.centers.double(), center_update_oracle(old, x, y, 0.7), atol=1e-6, rtol=0)
    else:
        assert torch.equal(head.centers, old)


def test_ir_softmax_center_update_exact():
    torch.manual_seed(2)
    C, D = 9, 7
    head = IRSoftmax(C, D, momentum=0.9)
    x, y = inputs(B=40, C=6, D=D, seed=3, ignored=5)  # classes 6..8 absent
    for step in range(3):
        old = head.centers.clone()
        xs = x * (step + 1) + step
        head(xs, y)
        want = center_update_oracle(old, xs, y, 0.9)
        assert (head.centers.double() - want).abs().max() < 1e-6
        assert torch.equal(head.centers[6:], old[6:])  # absent classes untouched
        assert torch.allclose(head.centers.norm(dim=1), torch.ones(C), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_ir_softmax_momentum_extremes(momentum):
    torch.manual_seed(3)
    head = IRSoftmax(5, 4, momentum=momentum)
    old = head.centers.clone()
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 2, 2, 2, 4])
    head(x, y)
    if momentum == 1.0:
        assert torch.allclose(head.centers, old, atol=1e-7)
    else:
        want = F.normalize(F.normalize(x, dim=1)[y == 2].mean(0), dim=0)
        assert torch.allclose(head.centers[2], want, atol=1e-6)


def test_ir_softmax_eval_never_moves_centers():
    head = IRSoftmax(7, 5).eval()
    old = head.centers.clone()
    x, y = inputs(C=7, D=5)
    for _ in range(3):
        head(x.requires_grad_(True), y).backward()
    assert torch.equal(head.centers, old)
    sd = head.state_dict()
    assert set(sd) == {"centers"}


# ----------------------------------------------------------------------------------------- RangeLoss
def range_oracle(x, y, k, margin, alpha, beta):
    """API.md's range loss in float64 with autograd (loops, no shortcuts)."""
    x = x.double()
    intra = x.new_zeros(())
    means = []
    for cls in sorted(set(y.tolist())):
        rows = x[y == cls]
        means.append(rows.mean(dim=0))
        n = rows.shape[0]
        if n < 2:
            continue
        d = torch.stack([((rows[i] - rows[j]) ** 2).sum() for i in range(n) for j in range(i + 1, n)])
        kk = min(k, d.numel())
        top = torch.topk(d, kk).values
        intra = intra + kk / (1.0 / top).sum()
    inter = x.new_zeros(())
    if len(means) >= 2:
        dm = torch.stack([((means[i] - means[j]) ** 2).sum() for i in range(len(means)) for j in range(i + 1, len(means))])
        inter = torch.clamp(margin - dm.min(), min=0.0)
    return alpha * intra + beta * inter


@pytest.mark.parametrize("k,margin,alpha,beta", [(2, 1.0, 1.0, 1.0), (3, 50.0, 0.5, 2.0), (1, 0.0, 1.0, 1.0), (5, 400.0, 1.0, 0.1)])
def test_range_loss_vs_formula(k, margin, alpha, beta):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(30, 6, generator=g) * 2.0
    y = torch.randint(0, 7, (30,), generator=g)
    y[-1] = 99  # a singleton class: no intra term, but its mean counts for inter
    x64 = x.double().requires_grad_(True)
    ref = range_oracle(x64, y, k, margin, alpha, beta)
    (ref_g,) = torch.autograd.grad(ref, x64)
    xx = x.clone().requires_grad_(True)
    loss = RangeLoss(k, margin, alpha, beta)(xx, y)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref) < TOL
    assert rel_err(xx.grad, ref_g) < TOL


def test_range_loss_of_a_large_finite_half_batch_is_finite():
    # un-normalised fp16 features whose sum passes 65504: the NaN-propagation factor overflowed to NaN
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 64, generator=g) * 100).relu().half()
    y = torch.arange(16).repeat_interleave(4)
    assert float(x.float().sum()) > 65504
    xx = x.clone().requires_grad_(True)
    loss = RangeLoss()(xx, y)
    loss.backward()
    x64 = x.double().requires_grad_(True)
    ref = range_oracle(x64, y, 2, 1.0, 1.0, 1.0)
    (ref_g,) = torch.autograd.grad(ref, x64)
    assert rel_err(loss, ref) < 1e-3 and rel_err(xx.grad, ref_g) < 1e-2


def test_range_loss_ignore_index_and_beside_softmax():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    y[:4] = -100
    keep = y != -100
    assert torch.allclose(RangeLoss()(x, y), RangeLoss()(x[keep], y[keep]))
    assert torch.allclose(RangeLoss(ignore_index=None)(x[keep], y[keep]), range_oracle(x[keep], y[keep], 2, 1.0, 1, 1).float())
    # The documented pattern: margin softmax + λ·range loss on normalised embeddings.
    head = mk.MarginSoftmax(4, 8, mk.CosFace(0.35))
    lam = 0.1
    xx = x.clone().requires_grad_(True)
    total = head(xx, y) + lam * RangeLoss()(F.normalize(xx, dim=1), y)
    total.backward()
    x64 = x.double().requires_grad_(True)
    ref = textbook_ce(x64, head.weight.detach(), y, cosface_target(0.35), 64.0) + lam * range_oracle(
        F.normalize(x64, dim=1)[keep], y[keep], 2, 1.0, 1.0, 1.0
    )
    (ref_g,) = torch.autograd.grad(ref, x64)
    assert rel_err(total, ref) < TOL and rel_err(xx.grad, ref_g) < TOL


def test_range_loss_single_class_and_no_pairs():
    x = torch.randn(3, 4, requires_grad=True)
    loss = RangeLoss()(x, torch.tensor([0, 1, 2]))  # no class with 2 rows: only the hinge
    ref = range_oracle(x, torch.tensor([0, 1, 2]), 2, 1.0, 1.0, 1.0)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss2 = RangeLoss()(x, torch.tensor([0, 0, 0]))  # one class: no inter term
    assert abs(loss2.item() - range_oracle(x, torch.tensor([0, 0, 0]), 2, 1.0, 1.0, 1.0).item()) < 1e-4


def test_modules_keep_state_dtypes_under_bfloat16():
    x = (torch.randn(12, 6) * 3).to(torch.bfloat16)
    y = torch.randint(0, 5, (12,))
    ir = IRSoftmax(5, 6).to(torch.bfloat16)
    assert ir.centers.dtype == torch.float32
    old = ir.centers.clone()
    ir(x, y)
    assert torch.allclose(ir.centers.double(), center_update_oracle(old, x.float(), y, 0.9), atol=1e-6)
    fl = FairLoss(5, 6, update_every=1).to(torch.bfloat16)
    assert fl.weight.dtype == torch.bfloat16 and fl.class_margins.dtype == torch.float32
    assert fl.window_sq_sum.dtype == torch.float64
    assert torch.isfinite(fl(x, y))
    assert int(fl.agent_moves) == 1


@pytest.mark.parametrize("head", [mk.IRSoftmax, mk.FairLoss, mk.LDAMSoftmax])
def test_sync_arguments_are_checked(head):
    with pytest.raises(TypeError, match="sync_statistics"):
        head(10, 4, sync_statistics=1)
    with pytest.raises(TypeError, match="process_group"):
        head(10, 4, process_group="world")
    # Without torch.distributed a training forward gathers nothing and needs no group.
    m = head(10, 4)
    loss = m(torch.randn(6, 4), torch.randint(0, 10, (6,)))
    assert torch.isfinite(loss)


def test_ir_softmax_embedding_dim_mismatch_names_its_centers():
    head = mk.IRSoftmax(10, 8)
    for mode in (head.train, head.eval):
        mode()
        with pytest.raises(ValueError, match=r"D = 6 but IRSoftmax was built with embedding_dim = 8 .*\(10, 8\)"):
            head(torch.randn(4, 6), torch.arange(4))
