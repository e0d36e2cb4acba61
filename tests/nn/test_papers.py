"""IRSoftmax, RangeLoss and FairLoss against float64 versions written here from API.md's formulas."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit.nn.fair_loss import FairLoss, nearest_other_sqdist
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


# ----------------------------------------------------------------------------------------- FairLoss
def fair_batch(g, B, C, D, probs=None, weight=None, noise=None):
    y = torch.multinomial(probs, B, replacement=True, generator=g) if probs is not None else torch.randint(0, C, (B,), generator=g)
    if weight is None:
        return torch.randn(B, D, generator=g) * 3, y
    sig = 0.3 if noise is None else noise[y][:, None]
    return F.normalize(weight.detach()[y], dim=1) + sig * torch.randn(B, D, generator=g), y


def test_fair_loss_matches_cosface_with_class_margins():
    torch.manual_seed(4)
    C, D = 13, 10
    fl = FairLoss(C, D, scale=32.0, update_every=2, seed=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # let the agent move margins first
        x, y = fair_batch(g, 16, C, D)
        fl(x, y)
    assert len(set(fl.class_margins.tolist())) > 1
    x, y = fair_batch(g, 16, C, D)
    y[:2] = -100
    fl.eval()
    xx = x.clone().requires_grad_(True)
    loss = fl(xx, y)
    loss.backward()
    x64, w64 = x.double().requires_grad_(True), fl.weight.detach().double().requires_grad_(True)
    ref = textbook_ce(x64, w64, y, cosface_target(fl.class_margins.clone()), 32.0)
    rgx, rgw = torch.autograd.grad(ref, (x64, w64))
    assert rel_err(loss, ref) < TOL
    assert rel_err(xx.grad, rgx) < TOL and rel_err(fl.weight.grad, rgw) < TOL
    # and the API.md definition, literally
    api = mk.margin_cross_entropy(x, fl.weight, y, mk.CosFace(0.0), 32.0, class_margins=fl.class_margins)
    assert torch.allclose(loss, api)


def test_fair_loss_schedule_range_and_window():
    torch.manual_seed(5)
    C, D, every = 20, 8, 3
    fl = FairLoss(C, D, update_every=every, seed=2, epsilon_decay=1.0)  # ε stays 1: random moves every time
    g = torch.Generator().manual_seed(1)
    lo, hi = min(fl.margin_levels), max(fl.margin_levels)
    window = None
    assert fl.margin_levels == (0.15, 0.25, 0.35, 0.45) and fl.margin_range == (0.15, 0.45)
    assert torch.allclose(fl.class_margins, torch.full((C,), 0.35))
    for call in range(1, 31):
        before, before_level = fl.class_margins.clone(), fl.margin_level.clone()
        x, y = fair_batch(g, 8, C, D)
        fl(x, y)
        moved = not torch.equal(before, fl.class_margins)
        assert int((fl.margin_level - before_level).abs().max()) <= 1  # one action per class per move
        window = torch.bincount(y, minlength=C) if call % every == 1 else window + torch.bincount(y, minlength=C)
        if call % every == 0:  # only classes seen since the last move may move
            assert torch.equal(fl.margin_level[window == 0], before_level[window == 0])
        assert int(fl.forward_calls) == call
        assert int(fl.agent_moves) == call // every
        if call % every:
            assert not moved
            assert int(fl.window_counts.sum()) == 8 * (call % every)  # statistics gathered since the last move
        else:
            assert moved  # ~15 active classes × random actions: something moves
            assert bool((window == 0).any())  # and some classes were absent (they must not move)
            assert int(fl.window_counts.sum()) == 0  # window cleared at the move
        m = fl.class_margins
        assert bool(((m >= lo - 1e-7) & (m <= hi + 1e-7)).all())
        assert torch.allclose(m, torch.tensor(fl.margin_levels)[fl.margin_level])
    assert int(fl.seen_counts.sum()) == 30 * 8
    assert fl.replay_size > 0


def test_fair_loss_window_statistics_are_the_csrc_op():
    torch.manual_seed(6)
    C, D = 6, 5
    fl = FairLoss(C, D, update_every=100)
    x = torch.randn(10, D)
    y = torch.tensor([0, 0, 1, 3, 3, 3, -100, 5, 5, 1])
    fl(x, y)
    xn, wn = F.normalize(x.double(), dim=1), F.normalize(fl.weight.detach().double(), dim=1)
    for c in range(C):
        rows = xn[y == c]
        assert int(fl.window_counts[c]) == rows.shape[0]
        assert abs(float(fl.window_cos_sum[c]) - float((rows @ wn[c]).sum())) < 1e-6
        assert abs(float(fl.window_sq_sum[c]) - float(((rows - wn[c]) ** 2).sum())) < 1e-6
    # inter statistic: nearest other class weight, against a (C, C) float64 version
    d = torch.cdist(wn, wn) ** 2
    d.fill_diagonal_(float("inf"))
    rows = torch.tensor([0, 2, 5])
    got = nearest_other_sqdist(fl.weight, rows, chunk_elements=4)
    assert torch.allclose(got, d.min(dim=1).values[rows], atol=1e-6)


def test_fair_loss_eval_never_moves():
    fl = FairLoss(10, 6, update_every=1, epsilon_decay=1.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        fl(*fair_batch(g, 16, 10, 6))
    fl.eval()
    snap = {k: v.clone() for k, v in fl.state_dict().items() if torch.is_tensor(v)}
    for _ in range(5):
        fl(*fair_batch(g, 16, 10, 6))
    for k, v in fl.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, snap[k]), k


def _run(fl, g, calls, C, D, probs=None, noise=None):
    for _ in range(calls):
        fl(*fair_batch(g, 32, C, D, probs=probs, weight=fl.weight, noise=noise))


def test_fair_loss_state_round_trip_acts_identically():
    torch.manual_seed(7)
    C, D = 24, 8
    kw = dict(update_every=2, min_replay=8, replay_batch=16, replay_capacity=256, epsilon_decay=0.8, target_sync=2)
    a = FairLoss(C, D, seed=3, **kw)
    _run(a, torch.Generator().manual_seed(0), 20, C, D)  # 10 moves: replay, learning, target syncs
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = FairLoss(C, D, seed=99, **kw)  # another seed: everything must come from the checkpoint
    b.load_state_dict(torch.load(buf))
    assert b.epsilon == a.epsilon and b.replay_size == a.replay_size
    ga, gb = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(16):
        _run(a, ga, 1, C, D)
        _run(b, gb, 1, C, D)
        assert torch.equal(a.class_margins, b.class_margins)
    assert int(a.agent_moves) == int(b.agent_moves) == 18
    for pa, pb in zip(a.q_network.parameters(), b.q_network.parameters()):
        assert torch.equal(pa, pb)
    for k, v in a.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, b.state_dict()[k]), k


def test_fair_loss_seeded():
    C, D = 16, 6

    def run(seed):
        torch.manual_seed(0)
        fl = FairLoss(C, D, update_every=2, seed=seed, epsilon_decay=0.7)
        _run(fl, torch.Generator().manual_seed(0), 20, C, D)
        return fl.class_margins.clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_fair_loss_imbalanced_stream_separates_head_and_tail():
    """Zipf-like stream: 8 head classes get most samples and a tight cluster, the tail is
    rare and spread out. The head acts at every move, the tail rarely and from other
    states, so the two groups end with different margins."""
    torch.manual_seed(8)
    C, D = 32, 12
    probs = torch.ones(C) * 0.001
    probs[:8] = 1.0
    probs /= probs.sum()
    noise = torch.full((C,), 0.9)
    noise[:8] = 0.2
    fl = FairLoss(C, D, update_every=4, seed=0, min_replay=16, replay_batch=32, epsilon_decay=0.85)
    _run(fl, torch.Generator().manual_seed(3), 240, C, D, probs=probs, noise=noise)
    head, tail = fl.class_margins[:8], fl.class_margins[16:]
    lo, hi = min(fl.margin_levels), max(fl.margin_levels)
    assert bool(((fl.class_margins >= lo) & (fl.class_margins <= hi)).all())
    assert int(fl.seen_counts[:8].min()) > 20 * int(fl.seen_counts[16:].max())
    assert abs(float(head.mean()) - float(tail.mean())) >= 0.05, (head, tail)


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


@pytest.mark.parametrize("head", [mk.IRSoftmax, mk.FairLoss])
def test_sync_arguments_are_checked(head):
    with pytest.raises(TypeError, match="sync_statistics"):
        head(10, 4, sync_statistics=1)
    with pytest.raises(TypeError, match="process_group"):
        head(10, 4, process_group="world")
    # Without torch.distributed a training forward gathers nothing and needs no group.
    m = head(10, 4)
    loss = m(torch.randn(6, 4), torch.randint(0, 10, (6,)))
    assert torch.isfinite(loss)
