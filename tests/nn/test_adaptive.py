"""Adaptive heads against float64 versions of their papers' formulas written here
(CurricularFace, AdaCos, LDAM, MagFace, AdaFace, sub-center ArcFace)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit.backends import torch_chunked
from marginkit.nn import (
    AdaCos,
    AdaFace,
    AdaFaceMargin,
    CurricularFace,
    LDAMSoftmax,
    MagFace,
    SubCenterArcFace,
    curricular_cross_entropy,
    ldam_margins,
    sub_center_cross_entropy,
)

TOL = 1e-5


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    d = ref.norm()
    return float((out - ref).norm() / d) if d > 0 else float((out - ref).norm())


def data(B=24, C=13, D=10, seed=0, ignored=2, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * scale
    w = torch.randn(C, D, generator=g) * 0.5
    y = torch.randint(0, C, (B,), generator=g)
    y[:ignored] = -100
    return x, w, y


def arcface_psi(cos_y, m):
    """ArcFace target with its fallback (θ + m > π: cos θ − m·sin m), float64, autograd."""
    c = cos_y.clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(c)
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * torch.sin(m))


def ce_from_logits(logits, y, ignore_index=-100, target_logit=None):
    keep = y != ignore_index
    safe = torch.where(keep, y, torch.zeros_like(y))
    rows = torch.logsumexp(logits, dim=1) - logits.gather(1, safe[:, None]).squeeze(1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows.sum() / keep.sum().clamp_min(1)


def cos_matrix(x, w):
    return F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T


def with_targets(cos, y, psi):
    safe = torch.where(y >= 0, y, torch.zeros_like(y))
    onehot = F.one_hot(safe, cos.shape[1]).bool()
    return torch.where(onehot, psi[:, None], cos), onehot


def check_against(module_loss_fn, oracle_fn, x, w):
    """module_loss_fn(x, w) and oracle_fn(x64, w64): loss and both gradients within TOL."""
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = module_loss_fn(xx, ww)
    gx, gw = torch.autograd.grad(loss, (xx, ww))
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = oracle_fn(x64, w64)
    rgx, rgw = torch.autograd.grad(ref, (x64, w64))
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < TOL, (float(loss), float(ref))
    assert rel_err(gx, rgx) < TOL, rel_err(gx, rgx)
    assert rel_err(gw, rgw) < TOL, rel_err(gw, rgw)


# ------------------------------------------------------------------------------------ CurricularFace
def curricular_oracle(x, w, y, t, m, s):
    """Huang et al. 2020, eq. 8-10: hard negatives (cos θ_j > T(cos θ_y)) become cos θ_j (t + cos θ_j)."""
    cos = cos_matrix(x, w).clamp(-1, 1)
    safe = torch.where(y >= 0, y, torch.zeros_like(y))
    cos_y = cos.gather(1, safe[:, None]).squeeze(1)
    psi = arcface_psi(cos_y, m)
    onehot = F.one_hot(safe, w.shape[0]).bool()
    hard = (cos > psi.detach()[:, None]) & ~onehot
    neg = torch.where(hard, cos * (t + cos), cos)
    logits = s * torch.where(onehot, psi[:, None], neg)
    return ce_from_logits(logits, y), hard


@pytest.mark.parametrize("t,chunk", [(0.0, None), (0.35, 24 * 3), (0.8, 24 * 5)])
def test_curricular_loss_and_grads(t, chunk, monkeypatch):
    if chunk:  # a few classes per chunk: the modulation must hold across chunk edges
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk)
    x, w, y = data()
    _, hard = curricular_oracle(x, w, y, t, 0.5, 64.0)
    assert bool(hard.any())  # the data exercises the hard-negative branch
    check_against(
        lambda a, b: curricular_cross_entropy(a, b, y, t, mk.ArcFace(0.5), 64.0),
        lambda a, b: curricular_oracle(a, b, y, t, 0.5, 64.0)[0],
        x, w,
    )


def test_curricular_face_t_schedule_and_fallback_rows():
    torch.manual_seed(0)
    x, w, y = data(B=20, C=9, seed=1, ignored=1)
    x[3] = -w[y[3]] * 4 + 0.01 * torch.randn(10)  # θ_y ≈ π: the ArcFace fallback branch
    head = CurricularFace(9, 10)
    with torch.no_grad():
        head.weight.copy_(w)
        head.t.fill_(0.3)
    keep = y != -100
    cos_y = cos_matrix(x, w)[torch.arange(20), y.clamp_min(0)][keep]
    t_new = 0.99 * 0.3 + 0.01 * float(cos_y.clamp(-1, 1).mean())
    loss = head(x, y)
    assert abs(float(head.t) - t_new) < 1e-12
    ref, _ = curricular_oracle(x.double(), w.double(), y, t_new, 0.5, 64.0)
    assert rel_err(loss, ref) < TOL
    head.eval()
    head(x, y)
    assert abs(float(head.t) - t_new) < 1e-12  # eval never moves t


# ------------------------------------------------------------------------------------------- AdaCos
def adacos_new_scale(x, w, y, s_prev):
    """Zhang et al. 2019, eq. 15-16: s = log B_avg / cos(min(π/4, θ_med))."""
    cos = cos_matrix(x, w)
    keep = y != -100
    cos, yk = cos[keep], y[keep]
    onehot = F.one_hot(yk, w.shape[0]).bool()
    b_avg = torch.where(onehot, torch.zeros_like(cos), torch.exp(s_prev * cos)).sum() / yk.numel()
    theta_y = torch.acos(cos.gather(1, yk[:, None]).squeeze(1).clamp(-1 + 1e-7, 1 - 1e-7))
    theta_med = theta_y.sort().values[(theta_y.numel() - 1) // 2]  # lower median
    return float(torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))


def test_adacos_scale_and_loss():
    x, w, y = data(B=31, C=40, D=12, seed=2, ignored=3)
    head = AdaCos(40, 12)
    with torch.no_grad():
        head.weight.copy_(w)
    s0 = math.sqrt(2) * math.log(39)
    assert abs(float(head.scale) - s0) < 1e-12
    s1 = adacos_new_scale(x, w, y, s0)
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    assert abs(float(head.scale) - s1) / s1 < 1e-6
    (gx,) = torch.autograd.grad(loss, xx)
    x64 = x.double().requires_grad_(True)
    ref = ce_from_logits(s1 * cos_matrix(x64, w), y)
    (rgx,) = torch.autograd.grad(ref, x64)
    assert rel_err(loss, ref) < TOL and rel_err(gx, rgx) < TOL
    # second step: B_avg uses the updated scale
    x2 = x.flip(0) * 0.5
    s2 = adacos_new_scale(x2, w, y, float(head.scale))
    head(x2, y)
    assert abs(float(head.scale) - s2) / s2 < 1e-6
    head.eval()
    head(x, y)
    assert abs(float(head.scale) - s2) / s2 < 1e-6  # eval never moves the scale


def test_adacos_chunked_b_avg_matches_small_chunks(monkeypatch):

    x, w, y = data(B=16, C=50, D=8, seed=3)
    head = AdaCos(50, 8)
    with torch.no_grad():
        head.weight.copy_(w)
    big = head.dynamic_scale(x, y)
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 16 * 3)  # 17 class chunks
    small = head.dynamic_scale(x, y)
    assert abs(big - small) / big < 1e-6


# --------------------------------------------------------------------------------------------- LDAM
def test_ldam_margins_and_loss():
    counts = torch.tensor([1000, 300, 50, 10, 10, 3, 1, 0, 200, 7, 40, 5, 2])
    m = ldam_margins(counts, 0.5)
    n = counts.double().clamp_min(1)
    want = n.pow(-0.25) * (0.5 / n.pow(-0.25).max())
    assert torch.allclose(m.double(), want, atol=1e-7)
    assert abs(float(m.max()) - 0.5) < 1e-7 and int(m.argmax()) in (6, 7)
    x, w, y = data(C=13)
    head = LDAMSoftmax(13, 10, class_counts=counts, max_margin=0.5, scale=30.0)
    with torch.no_grad():
        head.weight.copy_(w)

    def oracle(a, b):
        cos = cos_matrix(a, b)
        psi = cos.gather(1, y.clamp_min(0)[:, None]).squeeze(1) - want[y.clamp_min(0)]
        logits, _ = with_targets(cos, y, psi)
        return ce_from_logits(30.0 * logits, y)

    check_against(lambda a, b: mk.margin_cross_entropy(a, b, y, mk.CosFace(), 30.0, class_margins=head.class_margins), oracle, x, w)
    assert torch.allclose(head(x, y), mk.margin_cross_entropy(x, w, y, mk.CosFace(), 30.0, class_margins=head.class_margins))


def test_ldam_online_counts():
    head = LDAMSoftmax(5, 4, max_margin=0.4)
    assert torch.allclose(head.class_margins, torch.full((5,), 0.4))
    y = torch.tensor([0, 0, 0, 0, 1, 1, -100, 3])
    head(torch.randn(8, 4), y)
    assert head.class_counts.tolist() == [4, 2, 0, 1, 0]
    assert torch.allclose(head.class_margins, ldam_margins(torch.tensor([4, 2, 0, 1, 0]), 0.4))
    head.eval()
    head(torch.randn(8, 4), y)
    assert head.class_counts.tolist() == [4, 2, 0, 1, 0]


# ------------------------------------------------------------------------------------------ MagFace
def magface_oracle(x, w, y, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lam=35.0, easy_margin=True):
    """Meng et al. 2021: ArcFace with m(a) linear in a = clamp(‖x‖, l_a, u_a), + λ_g·g(a),
    g(a) = a/u_a² + 1/a; the gradient flows through m(a) as in the authors' code (``MagLinear``,
    whose default is easy_margin=True)."""
    a = x.norm(dim=1).clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = cos_matrix(x, w).clamp(-1, 1)
    keep = y != -100
    safe = torch.where(keep, y, torch.zeros_like(y))
    cos_y = cos.gather(1, safe[:, None]).squeeze(1)
    sin_y = torch.sqrt(1.0 - cos_y**2)
    cos_m = cos_y * torch.cos(m) - sin_y * torch.sin(m)
    if easy_margin:
        target = torch.where(cos_y > 0, cos_m, cos_y)
    else:
        target = torch.where(cos_y > torch.cos(math.pi - m), cos_m, cos_y - torch.sin(math.pi - m) * m)
    logits, _ = with_targets(cos, y, target)
    g = a / u_a**2 + 1.0 / a
    return ce_from_logits(s * logits, y) + lam * (g * keep).sum() / keep.sum()


@pytest.mark.parametrize("easy_margin", [None, False], ids=["default-easy-margin", "fallback"])
def test_magface_loss_and_grads(easy_margin):
    torch.manual_seed(0)
    x, w, y = data(B=28, C=11, D=10, seed=4, ignored=2)
    norms = torch.linspace(4.0, 130.0, 28)  # below l_a, inside, above u_a
    x = F.normalize(x, dim=1) * norms[:, None]
    for i in (5, 9):  # θ_y ≈ π − 0.1 (θ + m > π): the fallback branch (cos θ_y < 0: easy margin's other one)
        d = F.normalize(torch.randn(10), dim=0)
        wy = F.normalize(w[y[i]], dim=0)
        d = F.normalize(d - (d @ wy) * wy, dim=0)
        x[i] = (-wy * math.cos(0.1) + d * math.sin(0.1)) * 50.0
    head = MagFace(11, 10) if easy_margin is None else MagFace(11, 10, easy_margin=easy_margin)
    head.weight = torch.nn.Parameter(w.clone())
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    gx, gw = torch.autograd.grad(loss, (xx, head.weight))
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = magface_oracle(x64, w64, y, easy_margin=easy_margin is None)
    rgx, rgw = torch.autograd.grad(ref, (x64, w64))
    assert rel_err(loss, ref) < TOL
    assert rel_err(gx, rgx) < TOL, rel_err(gx, rgx)
    assert rel_err(gw, rgw) < TOL
    # the margin's own gradient (through m(a)) matters: leaving it out is far off
    a = head.feature_norm(x)
    xd = x64.detach().requires_grad_(True)
    ce = mk.reference.margin_cross_entropy(xd, w64.detach(), y, head.margin, 64.0, sample_margins=head.margin_for_norm(a).double().detach())
    (g_ce,) = torch.autograd.grad(ce, xd)
    assert rel_err(g_ce, rgx) > 1e-3


# ------------------------------------------------------------------------------------------ AdaFace
def adaface_oracle(x, w, y, bm, bs, m=0.4, h=0.333, s=64.0, eps=1e-3):
    """Kim et al. 2022 as the authors' code: ẑ from detached norms and batch statistics,
    g_angle = −m·ẑ, g_add = m·ẑ + m, θ clipped to [ε, π − ε], cos clamped to [−1 + ε, 1 − ε]."""
    norms = x.detach().norm(dim=1).clip(0.001, 100)
    z = ((norms - bm) / (bs + eps) * h).clip(-1, 1)
    cos = cos_matrix(x, w).clamp(-1 + eps, 1 - eps)
    safe = torch.where(y >= 0, y, torch.zeros_like(y))
    onehot = F.one_hot(safe, w.shape[0]).double()
    theta = torch.acos(cos)
    theta_m = torch.clip(theta + onehot * (-m * z)[:, None], min=eps, max=math.pi - eps)
    logits = torch.cos(theta_m) - onehot * (m + m * z)[:, None]
    return ce_from_logits(s * logits, y), z


def test_adaface_loss_grads_and_statistics():
    torch.manual_seed(1)
    x, w, y = data(B=30, C=12, D=10, seed=5, ignored=2)
    x = F.normalize(x, dim=1) * torch.linspace(2.0, 30.0, 30)[:, None]
    for i in (4, 20):  # θ_y small and ẑ > 0: θ − m·ẑ clipped at ε (zero target gradient)
        x[i] = F.normalize(w[y[i]], dim=0) * (26.0 + i * 0.1) + 0.005 * torch.randn(10)
    head = AdaFace(12, 10)
    with torch.no_grad():
        head.batch_mean.fill_(15.0)
        head.batch_std.fill_(3.0)
    keep = y != -100
    norms = x.double().norm(dim=1)
    bm = 0.01 * norms[keep].mean() + 0.99 * 15.0
    bs = 0.01 * norms[keep].std() + 0.99 * 3.0
    head.weight = torch.nn.Parameter(w.clone())
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    assert abs(float(head.batch_mean) - float(bm)) < 1e-9 and abs(float(head.batch_std) - float(bs)) < 1e-9
    gx, gw = torch.autograd.grad(loss, (xx, head.weight))
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, z = adaface_oracle(x64, w64, y, bm, bs)
    assert float(z.min()) == -1.0 and float(z.max()) == 1.0  # the data reaches both clips
    rgx, rgw = torch.autograd.grad(ref, (x64, w64))
    assert rel_err(loss, ref) < TOL
    assert rel_err(gx, rgx) < TOL, rel_err(gx, rgx)
    assert rel_err(gw, rgw) < TOL
    assert torch.allclose(head.norm_quality(x), z, atol=1e-12)
    head.eval()
    head(x, y)
    assert abs(float(head.batch_mean) - float(bm)) < 1e-9  # eval never moves the statistics


def test_adaface_margin_spec_reduces_to_cosface_and_arcface_mix():
    c = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64)
    spec = AdaFaceMargin(m=0.4)
    # ẑ = 0 (u = 1): CosFace(0.4); ẑ = −1 (u = 0): ArcFace-like angular margin 0.4, no additive part
    assert torch.allclose(spec.psi(c, torch.ones_like(c)), c - 0.4)
    assert torch.allclose(spec.psi(c, torch.zeros_like(c)), torch.cos(torch.acos(c) + 0.4))
    # ẑ = 1 (u = 2): angular −0.4 and additive 0.8
    assert torch.allclose(spec.psi(c, 2 * torch.ones_like(c)), torch.cos(torch.acos(c) - 0.4) - 0.8)
    # analytic derivative = autograd
    u = torch.rand(7, dtype=torch.float64) * 2
    cc = c.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(spec.psi(cc, u).sum(), cc)
    assert torch.allclose(spec.dpsi_exact(c, u), g)


# ------------------------------------------------------------------------------ sub-center ArcFace
def sub_center_oracle(x, w, y, k, m=0.5, s=64.0):
    """Deng et al. 2020: cos θ_{i,c} = max_k cos(x_i, w_{c,k}); ArcFace on the class cosines."""
    cos = cos_matrix(x, w).view(x.shape[0], -1, k).max(dim=2).values
    safe = torch.where(y >= 0, y, torch.zeros_like(y))
    psi = arcface_psi(cos.gather(1, safe[:, None]).squeeze(1), m)
    logits, _ = with_targets(cos, y, psi)
    return ce_from_logits(s * logits, y)


@pytest.mark.parametrize("k,chunk", [(1, None), (3, None), (3, 24 * 3 * 2), (4, 24 * 4)])
def test_sub_center_loss_and_grads(k, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk)
    x, w, y = data(C=11 * k, seed=6 + k)
    y = torch.where(y >= 0, y % 11, y)
    check_against(
        lambda a, b: sub_center_cross_entropy(a, b, y, k, mk.ArcFace(0.5), 64.0),
        lambda a, b: sub_center_oracle(a, b, y, k),
        x, w,
    )


def test_sub_center_k1_is_arcface_and_dominant_weight():
    x, w, y = data(C=9, seed=8)
    a = sub_center_cross_entropy(x, w, y, 1, mk.ArcFace(0.5), 64.0)
    b = mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0)
    assert torch.allclose(a, b, rtol=1e-6)
    head = SubCenterArcFace(4, 6, k=3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(12, 6))
    yy = torch.tensor([0, 0, 0, 2, 2, 3])
    xx = head.weight.detach()[torch.tensor([1, 1, 2, 8, 8, 9])] * 2  # rows sit on chosen sub-centers
    dom = head.dominant_weight(xx, yy)
    W = head.weight.detach().view(4, 3, 6)
    assert torch.equal(dom[0], W[0, 1]) and torch.equal(dom[2], W[2, 2]) and torch.equal(dom[3], W[3, 0])
    assert torch.equal(dom[1], W[1, 0])  # no rows: the first sub-center


# ------------------------------------------------------------------------------------------ generic
@pytest.mark.parametrize("make", [
    lambda: AdaCos(7, 5), lambda: LDAMSoftmax(7, 5), lambda: MagFace(7, 5), lambda: AdaFace(7, 5),
    lambda: CurricularFace(7, 5), lambda: SubCenterArcFace(7, 5, k=2),
], ids=["adacos", "ldam", "magface", "adaface", "curricular", "subcenter"])
def test_heads_ignored_rows_empty_batch_and_reduction(make):
    head = make()
    x = torch.randn(6, 5, requires_grad=True) * 20
    y = torch.tensor([0, 1, -100, 3, 4, -100])
    loss = head(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    head.reduction = "none"
    rows = head(x.detach(), y).detach()
    assert rows.shape == (6,) and float(rows[2]) == 0.0 and float(rows[5]) == 0.0
    head.reduction = "mean"
    empty = torch.zeros(0, 5, requires_grad=True)
    e = head(empty, torch.zeros(0, dtype=torch.int64))
    assert e.item() == 0.0
    e.backward()


def test_state_buffers_keep_their_dtype_under_half():
    heads = [AdaCos(7, 5), LDAMSoftmax(7, 5), AdaFace(7, 5), CurricularFace(7, 5), MagFace(7, 5), SubCenterArcFace(7, 5)]
    x = (torch.randn(8, 5) * 20).to(torch.bfloat16)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    for head in heads:
        before = {n: b.dtype for n, b in head.named_buffers()}
        head.to(torch.bfloat16)
        assert head.weight.dtype == torch.bfloat16
        assert {n: b.dtype for n, b in head.named_buffers()} == before
        loss = head(x, y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_adacos_scale_under_autocast_equals_the_scale_of_the_rounded_inputs():
    # its scale search ran the loss's logits under the caller's autocast: bf16 GEMMs (8.6460 vs 8.6453)
    torch.manual_seed(1)
    plain = mk.AdaCos(200, 32)
    mixed = copy.deepcopy(plain)
    x, y = torch.randn(24, 32), torch.randint(0, 200, (24,))
    plain(x.bfloat16().float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed(x, y)
    assert torch.equal(mixed.scale, plain.scale) and float(plain.scale) != mk.AdaCos.initial_scale(200)
