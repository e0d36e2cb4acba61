"""The TMA operand path (``tuning(tma=True)``): the four GEMM-shaped kernels (forward partials,
backward recompute, dX, dW) fetch their operand tiles through tensor descriptors instead of masked
pointer loads.

Under TRITON_INTERPRET=1 the descriptors' loads are emulated (zero-fill outside the described
block included), so the CPU proves the arithmetic: the same bits as the pointer path with the
same tiles, float64-reference accuracy, the fallback for operands the copy engine cannot read,
and that each launch's descriptors carry its config's tile. What the compiler makes of it for
sm_90a (UTMALDG, no cp.async, no spill) is guarded in test_triton_compile.py; the GPU twin is
``test_gpu_tma_operands_give_the_pointer_paths_bits`` here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import marginkit as mk  # noqa: E402
from marginkit.backends import triton as tb  # noqa: E402
from marginkit.backends.triton import launch, launchers, passes  # noqa: E402
from marginkit.backends.triton.configs import SCORES_TMA_CONFIGS  # noqa: E402
from tests.backends.test_triton_backend import gpu, make, reference_rows, rel, run, triton_rows  # noqa: E402
from tests.helpers import SPECS, spec_id  # noqa: E402

#: Several forward splits and backward chunks (the last partial: its tiles read past C), split-K of dX.
SMALL = dict(class_splits=3, chunk_classes=64, dx_splits=2)
LAUNCHERS = ("FWD", "FWD_STORE", "SCORES", "DX", "DW")
#: The tile of each descriptor argument, as the kernels read it (the storing forward has no TMA set).
TILES = {
    "FWD": {"x_desc": ("BLOCK_B", "BLOCK_K"), "w_desc": ("BLOCK_C", "BLOCK_K")},
    "SCORES": {"x_desc": ("BLOCK_B", "BLOCK_K"), "w_desc": ("BLOCK_C", "BLOCK_K")},
    "DX": {"a_desc": ("BLOCK_M", "BLOCK_K"), "b_desc": ("BLOCK_K", "BLOCK_N")},
    "DW": {"a_desc": ("BLOCK_K", "BLOCK_M"), "b_desc": ("BLOCK_K", "BLOCK_N")},
}


class TmaLaunches:
    """Counts, per launcher, the launches that took the TMA tile set (descriptors passed)."""

    def __init__(self, monkeypatch):
        self.calls = dict.fromkeys(LAUNCHERS, 0)
        for name in LAUNCHERS:
            original = getattr(launchers, name)  # the KernelLauncher (passes' name may be a wrapper already)

            def counted(grid, *args, _name=name, _original=original, **kwargs):
                self.calls[_name] += _original.tile_set(args, kwargs) == "tma"
                return _original(grid, *args, **kwargs)

            monkeypatch.setattr(passes, name, counted)


def both_paths(monkeypatch, fn, *args, **kwargs):
    """fn(*args, **kwargs) with pointer loads, then with TMA operands: (pointer, tma, TMA launches)."""
    with tb.tuning(**SMALL):
        pointer = fn(*args, **kwargs)
        counter = TmaLaunches(monkeypatch)
        with tb.tuning(tma=True):
            tma = fn(*args, **kwargs)
    return pointer, tma, counter.calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_tma_operands_give_the_pointer_paths_bits(monkeypatch, dtype, deterministic, normalize):
    """Odd B (a partial row tile), D not a multiple of the K tile, three forward splits, a partial last
    chunk (zero-filled past C), split-K of dX: every kernel reads through descriptors what its masked
    loads read, so the bits are the pointer path's, and both match float64."""
    x, w, y = make(B=33, C=200, D=48, dtype=dtype, seed=61, ignored=3)
    scale = 64.0 if normalize else 0.5  # raw logits x·w reach ~±100 here
    pointer, tma, calls = both_paths(
        monkeypatch, run, triton_rows, x, w, y, mk.ArcFace(0.5), scale, None, normalize, deterministic
    )
    # one forward; 200 classes in chunks of 64: every chunk's three kernels took TMA operands
    assert calls == {"FWD": 1, "FWD_STORE": 0, "SCORES": 4, "DX": 4, "DW": 4}
    for a, b in zip(pointer, tma):
        assert torch.equal(a, b)
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), scale, None, normalize)
    errs = [rel(o, r) for o, r in zip(tma, ref)]
    assert all(e < 1e-2 for e in errs), f"relative errors (loss, dX, dW) against float64 = {errs}"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("margins", ["class", "sample"])
def test_every_spec_with_adaptive_margins_and_the_filter_gives_the_pointer_paths_bits(monkeypatch, spec, margins):
    """The public API with ignored rows, per-class or per-sample margins where the spec takes them, and
    insightface's inter-class filter (a MODULATE kernel variant): the TMA path changes only where the
    operand tiles come from, so every output keeps the pointer path's bits (which the float64 tests of
    test_triton_backend.py pin for each spec)."""
    x, w, y = make(B=12, C=100, D=32, dtype=torch.bfloat16, seed=66, ignored=2)
    kwargs = dict(reduction="none", backend="triton", interclass_filtering_threshold=0.2)
    if type(spec) in (mk.CosFace, mk.ArcFace, mk.CombinedMargin) and not getattr(spec, "easy_margin", False):
        values = torch.rand(100 if margins == "class" else 12, generator=torch.Generator().manual_seed(1)) * 0.4
        kwargs[f"{margins}_margins"] = values.to(x.device)
    pointer, tma, calls = both_paths(
        monkeypatch, run, lambda x, w, y: mk.margin_cross_entropy(x, w, y, spec, 30.0, **kwargs), x, w, y
    )
    assert calls == {"FWD": 1, "FWD_STORE": 0, "SCORES": 2, "DX": 2, "DW": 2}
    for a, b in zip(pointer, tma):
        assert torch.equal(a, b)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_tiles_that_read_into_the_next_split_or_chunk_give_the_pointer_paths_bits(monkeypatch, normalize):
    """Splits of 40 classes and chunks of 56 (neither a multiple of the tiles, as the launcher never
    makes them): the forward's last tile of a split and the recompute's and dX's last tile of a chunk
    read the next range's real W rows, which the −inf column bias, the unstored columns and E's zeros
    past n_chunk must leave out (raw logits: a column let in would move the loss visibly)."""
    monkeypatch.setattr(launch, "class_splits", lambda rows, classes, device: (launch.cdiv(classes, 40), 40))
    x, w, y = make(B=20, C=170, D=40, dtype=torch.bfloat16, seed=65, ignored=2)
    args = (mk.ArcFace(0.5), 64.0 if normalize else 0.5, None, normalize)
    with tb.tuning(chunk_classes=56, dx_splits=1):  # 56 bf16: rows of 112 bytes, TMA-aligned
        pointer = run(triton_rows, x, w, y, *args)
        counter = TmaLaunches(monkeypatch)
        with tb.tuning(tma=True):
            tma = run(triton_rows, x, w, y, *args)
    assert counter.calls == {"FWD": 1, "FWD_STORE": 0, "SCORES": 4, "DX": 4, "DW": 4}
    for a, b in zip(pointer, tma):
        assert torch.equal(a, b)
    ref = run(reference_rows, x, w, y, *args)
    assert all(rel(o, r) < 1e-2 for o, r in zip(tma, ref))


def test_no_dx_tile_crosses_a_split_k_boundary():
    """dX's TMA loop reads whole BLOCK_K tiles from each split's start with no mask: split sizes
    (multiples of the launcher's granule) must be multiples of every dX BLOCK_K, or a split's last
    tile would add the next split's E a second time."""
    from marginkit.backends.triton.configs import INTERPRETER_META

    assert all(launch.GPU_GRANULE % c.kwargs["BLOCK_K"] == 0 for c in passes.DX.configs["tma"])
    assert launch.GRANULE % INTERPRETER_META["dx"]["BLOCK_K"] == 0
    assert launch.split_k_size(1000, 3) % launch.GRANULE == 0


@pytest.mark.parametrize("budget_chunks", [None, 2], ids=["store-all", "two-chunks"])
def test_stored_chunks_take_tma_operands_too(monkeypatch, budget_chunks):
    """memory_budget: the storing forward keeps its pointer loads (no TMA tile set); stored chunks feed dX
    from the store's slice (its own descriptor base) and dW through the stored path's fp32 GEMM; the
    rest recompute. Same bits as the pointer path."""
    from marginkit.backends.triton.budget import stored_bytes

    x, w, y = make(B=24, C=200, D=32, dtype=torch.bfloat16, seed=62, ignored=2)
    budget = None if budget_chunks is None else stored_bytes(24, budget_chunks * 64, 2)

    def loss_and_grads():
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = mk.margin_cross_entropy(xr, wr, y, mk.ArcFace(0.5), 64.0, backend="triton", memory_budget=budget)
        loss.backward()
        return loss.detach(), xr.grad, wr.grad

    pointer, tma, calls = both_paths(monkeypatch, loss_and_grads)
    recomputed = 0 if budget_chunks is None else 4 - budget_chunks
    assert calls == {"FWD": 0, "FWD_STORE": 0, "SCORES": recomputed, "DX": 4, "DW": 4}
    for a, b in zip(pointer, tma):
        assert torch.equal(a, b)
    ref_x, ref_w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = mk.reference.margin_cross_entropy(ref_x, ref_w, y, mk.ArcFace(0.5), 64.0)
    ref.backward()
    assert rel(tma[0], ref) < 1e-3 and rel(tma[1], ref_x.grad) < 1e-2 and rel(tma[2], ref_w.grad) < 1e-2


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "master-fp32"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
def test_the_deferred_stored_path_gives_the_pointer_paths_bits(monkeypatch, w_dtype, normalize, pieces):
    """The two-phase protocol with a store and ``grad_x_ready`` (the partitioned head's path): stored
    chunks' dS overwrites the store in place and their dW runs after grad_x is final, reading E from the
    store's own slice (its own descriptor base) and, normalised, through ``stored_weight_grad`` (in
    pieces when STORED_DW_BYTES is small). Same bits as the pointer path."""
    x = make(B=24, C=200, D=32, seed=67)[0].bfloat16()
    w = make(B=24, C=200, D=32, seed=68)[1].to(w_dtype)
    y = torch.randint(0, 200, (24,), generator=torch.Generator().manual_seed(2))
    if pieces:
        monkeypatch.setattr(passes, "STORED_DW_BYTES", 32 * 4 * 32)  # pieces of 32 classes
    slices = []
    descriptor = launch.descriptor
    monkeypatch.setattr(launch, "descriptor", lambda t, shape=None: slices.append(t) or descriptor(t, shape))

    def two_phase():
        store = []
        row_max, row_sumexp = tb.lse_partials(x, w, y, 64.0, normalize, memory_budget=None, store=store)
        lse = (row_max + torch.log(row_sumexp)).float()
        grad_rows = torch.linspace(0.5, 1.5, 24)
        out = tb.grads_from_lse(x, w, y, lse, grad_rows, 64.0, normalize, store=store,
                                grad_x_ready=lambda grad_x: None)
        return out, store[0]

    (pointer, _), (tma, stored), _ = both_paths(monkeypatch, two_phase)
    assert torch.equal(pointer[0], tma[0]) and torch.equal(pointer[1], tma[1])
    base, end = stored.data_ptr(), stored.data_ptr() + stored.shape[0] * stored.stride(0) * stored.element_size()
    assert any(base <= t.data_ptr() < end for t in slices)  # E read through descriptors of the store's slices


def test_operands_the_copy_engine_cannot_read_take_the_pointer_path(monkeypatch):
    """A row stride that is not a multiple of 16 bytes (bf16, D = 50) and fp32 operands: no descriptor,
    the pointer path. fp32 master weights (W fp32, X bf16): only dW, which reads E and X, takes
    descriptors. Still the float64 answer."""
    for dtype, w_dtype, dim in ((torch.bfloat16, None, 50), (torch.bfloat16, torch.float32, 48),
                                (torch.float32, None, 48)):
        x, w, y = make(B=12, C=100, D=dim, dtype=dtype, seed=63, ignored=1)
        if w_dtype is not None:
            w = w.to(w_dtype)
        pointer, tma, calls = both_paths(monkeypatch, run, triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
        expected = dict.fromkeys(LAUNCHERS, 0) | ({"DW": 2} if w_dtype is not None else {})  # 100 classes: 2 chunks
        assert calls == expected, (dtype, w_dtype, dim)
        assert all(torch.equal(a, b) for a, b in zip(pointer, tma))
        ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0)
        assert rel(tma[1], ref[1]) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_tma_operand_rules():
    """What ``tma_operands`` accepts: only with tuning(tma=True), 16-bit, one dtype, 16-byte aligned
    base and row stride, unit inner stride."""
    a = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not launch.tma_operands(a)  # off by default
    with tb.tuning(tma=True):
        assert launch.tma_operands(a, torch.zeros(4, 8, dtype=torch.bfloat16))
        assert launch.tma_operands(a[:, 8:24])  # a column slice: base 16 bytes in, row stride unchanged
        assert not launch.tma_operands(a[:, 1:])  # base 2 bytes in
        assert not launch.tma_operands(torch.zeros(8, 60, dtype=torch.bfloat16))  # 120-byte rows
        assert not launch.tma_operands(a.t())  # inner stride 8
        assert not launch.tma_operands(a, a.half())
        assert not launch.tma_operands(a.float())
        assert not launch.tma_operands(a[:0])


@pytest.mark.parametrize("name", list(TILES))
def test_each_launch_gives_the_descriptors_its_configs_tile(name):
    """A launcher's "tma" tile set is its tensor-core tiles with TMA=True. Triton's autotuner runs a
    config's pre_hook before timing or launching it; the launcher's own launches (cached handles,
    pinned configs, the interpreter) set the tile themselves. Either way each descriptor gets the
    tile its kernel loads."""
    launcher = getattr(passes, name)
    names = launcher.fn.arg_names
    tma_configs = launcher.configs["tma"]
    source = SCORES_TMA_CONFIGS if name == "SCORES" else launcher.configs["mma"]  # scores leaves out a spilling tile
    assert [c.kwargs for c in tma_configs] == [{**c.kwargs, "TMA": True} for c in source]
    operand = torch.zeros(256, 256, dtype=torch.bfloat16)
    last = max(names.index(arg) for arg in TILES[name])
    for config in tma_configs:
        meta = {"BLOCK_B": 128, **config.kwargs}  # the scores kernel's BLOCK_B comes from the call
        for route in ("pre_hook", "launcher"):
            descriptors = {arg: launch.descriptor(operand) for arg in TILES[name]}
            if route == "pre_hook":
                config.pre_hook({**dict.fromkeys(names), **descriptors, **meta})
            else:
                launcher.set_descriptor_tiles([descriptors.get(arg) for arg in names[: last + 1]], meta)
            for arg, dims in TILES[name].items():
                assert descriptors[arg].block_shape == [meta[d] for d in dims], (route, config, arg)


def test_descriptors_for_some_operands_but_not_all_are_an_error():
    names = passes.DX.fn.arg_names
    operand = launch.descriptor(torch.zeros(64, 64, dtype=torch.bfloat16))
    for a_desc, b_desc in ((operand, None), (None, operand)):
        named = {"a_desc": a_desc, "b_desc": b_desc}
        args = [named.get(n) for n in names[: names.index("b_desc") + 1]]
        with pytest.raises(ValueError, match="every operand or for none"):
            passes.DX.tile_set(args, {})


def test_a_cached_or_direct_launch_sets_the_tiles_of_its_config(monkeypatch):
    """The launcher's own route on a GPU (``launch_config``: pinned configs, recorded picks), here with the
    kernel replaced by a recorder: each descriptor carries the config's tile when the kernel is called."""
    launcher = passes.DW
    seen = []

    class Recorder:
        arg_names = launcher.fn.arg_names

        def __getitem__(self, grid):
            def launch_(*args, **meta):
                named = dict(zip(self.arg_names, args))
                seen.append((named["a_desc"].block_shape, named["b_desc"].block_shape, meta["BLOCK_M"]))
            return launch_

    monkeypatch.setattr(launcher, "fn", Recorder())
    names = launcher.fn.arg_names
    for config in launcher.configs["tma"][:3]:
        descriptors = {"a_desc": launch.descriptor(torch.zeros(256, 256, dtype=torch.bfloat16)),
                       "b_desc": launch.descriptor(torch.zeros(256, 512, dtype=torch.bfloat16))}
        args = [descriptors.get(n, 0) for n in names[: names.index("b_desc") + 1]]
        with tb.tuning(compiled_launch=False):
            launcher.launch_config(config, (1, 1), args, dict(NORMALIZE=True, DOT_PRECISION="ieee", UPCAST=False))
        k, m, n = (config.kwargs[d] for d in ("BLOCK_K", "BLOCK_M", "BLOCK_N"))
        assert seen[-1] == ([k, m], [k, n], m)


@gpu
@pytest.mark.gpu
def test_gpu_tma_operands_give_the_pointer_paths_bits():
    """CPU twin: test_tma_operands_give_the_pointer_paths_bits. Deterministic mode pins the first config
    that fits: the same forward tile in both tile sets (the loss bits must agree); the recompute's first
    TMA tile is another (SCORES_TMA_CONFIGS leaves one out), so the gradients may differ by roundings
    of bf16 outputs only. Autotuned (the TMA tile sets timed on the GPU; the pointer ones are other
    GPU tests' business): within the bf16 pipeline's error of float64."""
    x, w, y = make(B=512, C=30011, D=256, dtype=torch.bfloat16, seed=64, ignored=5)
    pinned = {}
    for tma in (False, True):
        with tb.tuning(tma=tma):
            pinned[tma] = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
    for launcher in (passes.FWD, passes.SCORES, passes.DX, passes.DW):  # each pinned a TMA config
        assert any(key[0] == "tma" for key in launcher.pinned_configs), launcher.name
    assert torch.equal(pinned[False][0], pinned[True][0])
    assert rel(pinned[True][1], pinned[False][1]) < 1e-3 and rel(pinned[True][2], pinned[False][2]) < 1e-3
    with tb.tuning(tma=True):
        tuned = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    errs = [rel(o, r) for o, r in zip(tuned, ref)]
    assert all(e < 1e-2 for e in errs), errs
