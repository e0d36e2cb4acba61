"""FairLoss: the loss against a float64 textbook version, the online agent's schedule and
state, the paper's offline phase and frozen policy, and state kept bit-identical on bad batches."""

import io

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit.nn.fair_loss import FairLoss
from marginkit.nn.fair_loss_stats import nearest_other_sqdist
from tests.helpers import rel_err

TOL = 1e-5


def textbook_ce(x, w, y, margins, scale, ignore_index=-100):
    """Float64 textbook CosFace with per-class margins: (B, C) logits, s·(cos_y − m_y) on the target."""
    x, w = x.double(), w.double()
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    keep = y != ignore_index
    safe = torch.where(keep, y, torch.zeros_like(y))
    psi = cos.gather(1, safe[:, None]).squeeze(1) - margins.double()[safe]
    logits = scale * torch.where(F.one_hot(safe, w.shape[0]).bool(), psi[:, None], cos)
    rows = torch.where(keep, torch.logsumexp(logits, dim=1) - scale * psi, torch.zeros_like(psi))
    return rows.sum() / keep.sum().clamp_min(1)


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
    ref = textbook_ce(x64, w64, y, fl.class_margins.clone(), 32.0)
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


@pytest.mark.parametrize("batch_rows", [0, 6])
def test_a_move_on_an_empty_window_is_no_move(batch_rows):
    # all-ignored (or empty) batches carry no statistics: the agent must not act on them nor decay ε
    fl = FairLoss(10, 6, update_every=1, epsilon_decay=0.5)
    g = torch.Generator().manual_seed(3)
    x, _ = fair_batch(g, batch_rows, 10, 6)
    before = {k: v.clone() for k, v in fl.state_dict().items() if torch.is_tensor(v) and k != "forward_calls"}
    for _ in range(3):
        fl(x, torch.full((batch_rows,), -100))
    assert int(fl.forward_calls) == 3 and fl.epsilon == 1.0
    for k, v in before.items():
        assert torch.equal(fl.state_dict()[k], v), k
    fl(*fair_batch(g, 16, 10, 6))  # a labelled batch moves at once
    assert int(fl.agent_moves) == 1 and fl.epsilon == 0.5


@pytest.mark.parametrize("other", [dict(hidden=16), dict(margin_levels=(0.25, 0.35, 0.45))])
def test_loading_another_agents_checkpoint_names_the_arguments_and_loads_nothing(other):
    trained = FairLoss(10, 6, update_every=1)
    g = torch.Generator().manual_seed(4)
    trained(*fair_batch(g, 16, 10, 6))
    fresh = FairLoss(10, 6, update_every=1, **other)
    before = {k: v.clone() for k, v in fresh.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="build the module with the checkpoint's hidden and margin_levels"):
        fresh.load_state_dict(trained.state_dict())
    for k, v in before.items():  # checked before torch copies the buffers
        assert torch.equal(fresh.state_dict()[k], v), k


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


def test_agent_is_not_a_submodule():
    fl = FairLoss(7, 5)
    assert [name for name, _ in fl.named_parameters()] == ["weight"]
    assert list(fl.children()) == []
    assert sum(p.numel() for p in fl.q_network.parameters()) > 0  # the agent exists, outside the module tree


# --------------------------------------------------------------------- state kept on bad batches
def full_state(fl):
    """Every buffer and the agent's extra state, cloned (bitwise comparison)."""
    buffers = {k: v.clone() for k, v in fl.named_buffers()}
    buf = io.BytesIO()
    torch.save(fl.get_extra_state(), buf)
    return buffers, buf.getvalue(), fl.weight.detach().clone()


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]  # agent: networks, Adam, replay, generator, byte for byte
    assert torch.allclose(a[2], b[2], rtol=0, atol=0, equal_nan=True)


def warmed_up(every=3, calls=7, **kw):
    torch.manual_seed(12)
    fl = FairLoss(9, 6, update_every=every, min_replay=2, replay_batch=4, epsilon_decay=0.8, **kw)
    g = torch.Generator().manual_seed(4)
    for _ in range(calls):
        fl(*fair_batch(g, 12, 9, 6))
    return fl, g


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("on_move", [False, True])
def test_non_finite_batch_is_refused_and_state_kept(bad, on_move):
    fl, g = warmed_up(calls=8 if on_move else 6)  # call 9 would be a move
    before = full_state(fl)
    x, y = fair_batch(g, 12, 9, 6)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="embeddings") as err:
        fl(x, y)
    assert "non-finite" in str(err.value)
    assert_same_state(before, full_state(fl))
    fl(*fair_batch(g, 12, 9, 6))  # a good batch afterwards trains normally
    assert int(fl.forward_calls) == (9 if on_move else 7)
    assert bool(torch.isfinite(fl.class_margins).all())


def test_non_finite_embeddings_in_eval_propagate_like_torch():
    fl = FairLoss(5, 4).eval()
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    assert torch.isnan(fl(x, torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 9]), torch.tensor([[0], [1], [2]]), torch.tensor([0.0, 1.0, 2.0])])
def test_rejected_batch_keeps_state(labels):
    fl, _ = warmed_up(calls=8)
    before = full_state(fl)
    with pytest.raises((ValueError, TypeError)):
        fl(torch.randn(3, 6), labels)
    assert_same_state(before, full_state(fl))


def test_raising_loss_kernel_keeps_state(monkeypatch):
    fl, g = warmed_up(calls=8)
    before = full_state(fl)

    def boom(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr("marginkit.nn.fair_loss.margin_cross_entropy", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        fl(*fair_batch(g, 12, 9, 6))
    assert_same_state(before, full_state(fl))


def test_raising_move_rolls_back_the_whole_call(monkeypatch):
    """A failure inside the agent's move (after the statistics update and the DQN's learning
    round) leaves the window, counters, margins and agent as they were before the call."""
    fl, g = warmed_up(calls=8)  # call 9 moves
    before = full_state(fl)
    calls = []

    def fail_inter_search(weight, rows, chunk=None):
        calls.append(1)
        raise RuntimeError("inter-class search failed")

    real_choose = fl._agent.choose

    def choose_then_fail(states, moves):
        real_choose(states, moves)  # advances the generator
        raise RuntimeError("agent failed")

    monkeypatch.setattr(fl._agent, "choose", choose_then_fail)
    with pytest.raises(RuntimeError, match="agent failed"):
        fl(*fair_batch(g, 12, 9, 6))
    assert_same_state(before, full_state(fl))
    monkeypatch.setattr("marginkit.nn.fair_loss.nearest_other_sqdist", fail_inter_search)
    with pytest.raises(RuntimeError, match="inter-class"):
        fl(*fair_batch(g, 12, 9, 6))
    assert calls and int(fl.forward_calls) == 8
    assert_same_state(before, full_state(fl))


def test_non_finite_weight_at_a_move_is_refused_and_state_kept():
    fl, g = warmed_up(calls=8)
    x, y = fair_batch(g, 12, 9, 6)
    with torch.no_grad():
        fl.weight[y[0]] = float("nan")  # the loss itself is NaN (stateless); the move must not store it
    before = full_state(fl)
    with pytest.raises(ValueError, match="weight"):
        fl(x, y)
    assert_same_state(before, full_state(fl))


def test_non_finite_weight_between_moves_is_refused_and_the_next_moves_work():
    # accepted between moves, NaN statistics sat in the window and every later move refused them
    fl, g = warmed_up(calls=7)  # moved at calls 3 and 6; call 9 moves
    x, y = fair_batch(g, 12, 9, 6)
    good = fl.weight.detach().clone()
    with torch.no_grad():
        fl.weight[y[0]] = float("nan")
    before = full_state(fl)
    with pytest.raises(ValueError, match="weight has non-finite rows"):
        fl(x, y)
    assert_same_state(before, full_state(fl))
    with torch.no_grad():
        fl.weight.copy_(good)
    for _ in range(2):  # calls 8, 9: the move happens
        fl(*fair_batch(g, 12, 9, 6))
    assert int(fl.agent_moves) == 3 and torch.isfinite(fl.window_cos_sum).all()


# -------------------------------------------------------------------- the paper's procedure
from marginkit.nn.fair_loss_agent import encode_states  # noqa: E402
from marginkit.nn.fair_loss_paper import (  # noqa: E402
    FairLossTable, GroupMeasure, Transitions, collect_transitions, fixed_count_bins, tertile_edges,
)


def test_fixed_count_bins_and_edges():
    counts = torch.tensor([300, 2, 2, 40, 9, 13, 3, 100, 5])
    assert tertile_edges(counts) == (3.0, 13.0)  # sorted: 2 2 3 5 9 13 40 100 300 -> indices 2 and 5
    assert fixed_count_bins(counts).tolist() == [2, 0, 0, 2, 1, 1, 0, 2, 1]
    assert fixed_count_bins(counts, (10, 50)).tolist() == [2, 0, 0, 1, 0, 1, 0, 2, 0]


def fake_finetune(log):
    """A 'fine-tune' whose outcome is a fixed function of the levels: group g's compactness
    rises with its own level, accuracy falls when group 0 (the head) is raised."""

    def run(levels):
        log.append(levels.tolist())
        lv = levels.to(torch.float64)
        return GroupMeasure(spread=0.5 - 0.1 * lv, compactness=0.2 * lv, accuracy=0.8 - 0.05 * float(lv[0]) + 0.01 * float(lv[2]))

    return run


def test_offline_phase_tuples_on_a_tiny_problem():
    log = []
    bins = torch.tensor([2, 1, 0])  # group 0 is the head (count bin 2), group 2 the tail
    checkpoint = GroupMeasure(spread=torch.tensor([0.05, 0.25, 0.45], dtype=torch.float64),
                              compactness=torch.zeros(3, dtype=torch.float64), accuracy=0.7)
    edges = (0.2, 0.4)
    t = collect_transitions(checkpoint, fake_finetune(log), bins, edges, [torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0])], 4)
    # base (1,1,1): keep + 3 groups × 2 moves = 7 fine-tunes; base (0,0,0): keep + 3 raises (lower is clamped) = 4
    assert len(log) == 11 and log[0] == [1, 1, 1] and log[7] == [0, 0, 0]
    assert sorted(map(tuple, log[1:7])) == sorted([(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)])
    assert t.states.numel() == 2 * 3 * 3
    # first tuple: group 0 (count bin 2, spread 0.05 -> bin 0, level 1) lowered
    assert int(t.states[0]) == int(encode_states(torch.tensor(2), torch.tensor(0), torch.tensor(1), 4))
    assert int(t.actions[0]) == 0
    # after lowering, group 0 has level 0 and spread 0.5 -> bin 2
    assert int(t.next_states[0]) == int(encode_states(torch.tensor(2), torch.tensor(2), torch.tensor(0), 4))
    local, glob = t.rewards["local"], t.rewards["global"]
    assert torch.allclose(local[:3], torch.tensor([-0.2, 0.0, 0.2], dtype=torch.float64))  # lower / keep / raise
    assert torch.allclose(glob[:3], torch.tensor([0.05, 0.0, -0.05], dtype=torch.float64))
    assert torch.allclose(glob[6:9], torch.tensor([-0.01, 0.0, 0.01], dtype=torch.float64))  # the tail group
    assert float(local[9]) == 0.0 and float(glob[9]) == 0.0  # a clamped lower is scored as keep


def test_table_is_a_deterministic_function_of_the_tuples():
    s = torch.tensor([5, 5, 5, 7, 7])
    a = torch.tensor([2, 2, 0, 1, 2])
    s2 = torch.tensor([7, 6, 4, 7, 8])
    r = torch.tensor([1.0, 3.0, -1.0, 0.5, 0.25], dtype=torch.float64)
    t = Transitions(s, a, s2, {"global": r})
    greedy = FairLossTable.fit(t, "global", gamma=0.0)
    assert float(greedy.q[5, 2]) == 2.0 and float(greedy.q[5, 0]) == -1.0 and float(greedy.q[5, 1]) == 0.0
    assert float(greedy.q[7, 1]) == 0.5 and float(greedy.q[7, 2]) == 0.25
    assert int(greedy.q.count_nonzero()) == 4
    # γ = 0.5: Q(7, keep) = 0.5 + 0.5·max Q(7) -> fixed point 1.0; Q(7, raise) = 0.25 (state 8 unvisited)
    # Q(5, raise) = mean(1 + 0.5·1.0, 3 + 0) = 2.25; Q(5, lower) = −1
    q = FairLossTable.fit(t, "global", gamma=0.5, iterations=200).q
    assert abs(float(q[7, 1]) - 1.0) < 1e-12 and float(q[7, 2]) == 0.25
    assert abs(float(q[5, 2]) - 2.25) < 1e-12 and float(q[5, 0]) == -1.0
    again = FairLossTable.fit(Transitions(s.clone(), a.clone(), s2.clone(), {"global": r.clone()}), "global", gamma=0.5, iterations=200)
    assert torch.equal(again.q, q)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = FairLossTable.fit(Transitions(s[perm], a[perm], s2[perm], {"global": r[perm]}), "global", gamma=0.5, iterations=200)
    assert torch.allclose(shuffled.q, q, rtol=0, atol=1e-12)
    acts = FairLossTable(4, q).act(torch.tensor([5, 7, 0]))
    assert acts.tolist() == [2, 1, 1]  # raise; keep; unvisited state: all zero, ties go to keep
    with pytest.raises(ValueError, match="reward"):
        FairLossTable.fit(t, "local")


def policy_table(num_levels=4):
    """Count bin 2 (head) -> lower, bin 0 (tail) -> raise, bin 1 -> keep, whatever the spread and level."""
    q = torch.zeros(9 * num_levels, 3, dtype=torch.float64)
    for s in range(9 * num_levels):
        count_bin = s // (3 * num_levels)
        q[s, {2: 0, 1: 1, 0: 2}[count_bin]] = 1.0
    return FairLossTable(num_levels, q)


def test_frozen_policy_moves_each_group_once_per_epoch():
    torch.manual_seed(3)
    C, D, steps_per_epoch = 12, 6, 4
    bins = torch.tensor([2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0])
    fl = FairLoss(C, D, scale=16.0, update_every=steps_per_epoch, policy=policy_table(), class_count_bins=bins,
                  spread_thresholds=(0.1, 0.5), initial_margin=0.25)
    assert fl.q_network is None and fl.epsilon == 0.0
    assert [n for n, _ in fl.named_parameters()] == ["weight"]
    g = torch.Generator().manual_seed(0)
    expected = [1, 1, 1]  # group levels (head, mid, tail): start at 0.25 = level 1
    for epoch in range(3):
        for step in range(steps_per_epoch):
            x, y = fair_batch(g, 10, C, D)
            if epoch == 2:
                y = torch.where(bins[y] == 1, torch.full_like(y, 0), y)  # no mid-group sample this epoch
            before = fl.class_margins.clone()
            loss = fl(x, y)
            ref = mk.margin_cross_entropy(x, fl.weight, y, mk.CosFace(0.0), 16.0, class_margins=before)
            assert torch.equal(loss, ref)
            if step < steps_per_epoch - 1:
                assert torch.equal(fl.class_margins, before)  # no move inside an epoch
        # one move per epoch: the tail up, the head down, the mid kept; clamped at the ends
        expected = [max(expected[0] - 1, 0), expected[1], min(expected[2] + 1, 3)]
        assert fl.group_level.tolist() == [expected[2], expected[1], expected[0]]  # indexed by count bin 0, 1, 2
        assert torch.equal(fl.margin_level, fl.group_level[bins])
        assert torch.allclose(fl.class_margins, torch.tensor(fl.margin_levels)[fl.group_level[bins]])
        assert int(fl.agent_moves) == epoch + 1 and int(fl.window_counts.sum()) == 0
    assert fl.group_level.tolist() == [3, 1, 0]


def test_frozen_policy_absent_group_does_not_move():
    C, D = 6, 4
    bins = torch.tensor([0, 0, 1, 1, 2, 2])
    fl = FairLoss(C, D, update_every=1, policy=policy_table(), class_count_bins=bins, spread_thresholds=(0.1, 0.5))
    fl(torch.randn(4, D), torch.tensor([0, 1, 4, 5]))  # tail and head present, mid absent
    assert fl.group_level.tolist() == [3, 2, 1]
    fl(torch.randn(2, D), torch.tensor([2, 3]))  # only the mid group: keep
    assert fl.group_level.tolist() == [3, 2, 1]


def test_frozen_policy_state_round_trip_and_argument_checks():
    bins = torch.tensor([0, 1, 2, 2])
    kw = dict(update_every=1, class_count_bins=bins, spread_thresholds=(0.1, 0.5))
    a = FairLoss(4, 3, policy=policy_table(), **kw)
    a(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    b = FairLoss(4, 3, policy=FairLossTable(4), **kw)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.policy.q, a.policy.q) and torch.equal(b.group_level, a.group_level)
    with pytest.raises(ValueError, match="online agent"):
        FairLoss(4, 3).load_state_dict(a.state_dict(), strict=False)
    with pytest.raises(ValueError, match="spread_thresholds"):
        FairLoss(4, 3, policy=policy_table(), class_count_bins=bins)
    with pytest.raises(ValueError, match="class_count_bins"):
        FairLoss(4, 3, policy=policy_table(), class_count_bins=torch.tensor([0, 1, 3, 0]), spread_thresholds=(0.1, 0.5))
    with pytest.raises(ValueError, match="class_count_bins"):
        FairLoss(4, 3, policy=policy_table(), class_count_bins=bins[:3], spread_thresholds=(0.1, 0.5))
    with pytest.raises(ValueError, match="class_count_bins"):
        FairLoss(4, 3, class_count_bins=bins)
    with pytest.raises(ValueError, match="3 margin levels|margin levels"):
        FairLoss(4, 3, policy=policy_table(), margin_levels=(0.1, 0.2, 0.3), initial_margin=0.2, **kw)
    with pytest.raises(TypeError, match="policy"):
        FairLoss(4, 3, policy="paper", **kw)


def test_nearest_other_class_distance_ignores_the_callers_autocast():
    from marginkit.nn.fair_loss_stats import nearest_other_sqdist

    w, rows = torch.randn(50, 16), torch.tensor([0, 7, 49])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nearest_other_sqdist(w, rows, 64)
    assert torch.equal(mixed, nearest_other_sqdist(w, rows, 64))
