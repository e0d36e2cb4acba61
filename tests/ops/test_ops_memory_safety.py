"""Issue 18 through the public ops: pointers of non-contiguous tensors stay valid (range loss
backward under ``saved_tensors_hooks``), ``range_loss_backward`` called by name validates its
arguments, Python ints that the dispatcher would mangle are refused, and the old import path warns."""

import subprocess
import sys

import pytest
import torch

mo = pytest.importorskip("marginkit.ops")
if not mo.available():
    pytest.skip("marginkit._C is not built", allow_module_level=True)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """Equal values, non-contiguous storage (every other element of a wider buffer)."""
    if t.dim() == 0:
        return t.clone()
    out = torch.stack([t, torch.full_like(t, 7)], dim=-1)[..., 0]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _range_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_range_loss_backward_with_non_contiguous_saved_tensors_equals_contiguous(dtype):
    x, y = _range_inputs(dtype)
    x1 = x.clone().requires_grad_()
    mo.range_loss(x1, y, k=3, margin=40.0, alpha=0.7, beta=1.3).backward()

    x2 = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _strided_copy):
        mo.range_loss(x2, y, k=3, margin=40.0, alpha=0.7, beta=1.3).backward()
    assert x1.grad.abs().sum() > 0 and torch.isfinite(x1.grad).all()
    assert torch.equal(x2.grad, x1.grad)


def test_range_loss_gradient_matches_float64_autograd_reference():
    x, y = _range_inputs(torch.float64)
    xr = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _strided_copy):
        mo.range_loss(xr, y, k=2, margin=40.0).backward()
    # The same loss written in torch (k = 2 largest distances per class, hinge on class means).
    xt = x.clone().requires_grad_()
    intra = 0.0
    means = []
    for c in y.unique():
        rows = xt[y == c]
        means.append(rows.mean(0))
        d = torch.cdist(rows, rows).pow(2)
        iu = torch.triu_indices(len(rows), len(rows), 1)
        top = d[iu[0], iu[1]].topk(min(2, iu.shape[1])).values
        intra = intra + len(top) / (1.0 / top).sum()
    m = torch.stack(means)
    dm = torch.cdist(m, m).pow(2) + torch.eye(len(m), dtype=torch.float64) * 1e9
    (intra + torch.clamp(40.0 - dm.min(), min=0)).backward()
    torch.testing.assert_close(xr.grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_range_loss_backward_op_by_name_with_strided_inputs_equals_contiguous():
    x, y = _range_inputs()
    outs = torch.ops.marginkit.range_loss_forward(x, y, 3, 40.0, 1.0, 1.0)
    g = torch.tensor(1.5)
    contiguous = torch.ops.marginkit.range_loss_backward(g, x, *outs[1:])
    strided = torch.ops.marginkit.range_loss_backward(g, _strided_copy(x), *[_strided_copy(t) for t in outs[1:]])
    assert contiguous.abs().sum() > 0
    assert torch.equal(strided, contiguous)


def _backward_args():
    x, y = _range_inputs()
    loss, row_seg, sel, coef, closest, inter = torch.ops.marginkit.range_loss_forward(x, y, 3, 40.0, 1.0, 1.0)
    return dict(grad_loss=torch.tensor(1.0), embeddings=x, row_seg=row_seg, sel_pairs=sel, sel_coef=coef,
                closest=closest, inter_vec=inter)


BAD_BACKWARD = [
    ("row_seg", lambda a: torch.full_like(a["row_seg"], 10**6), ValueError, "row_seg"),
    ("row_seg", lambda a: a["row_seg"].int(), TypeError, "row_seg must have dtype int64"),
    ("row_seg", lambda a: a["row_seg"][:-1], ValueError, "row_seg must have shape"),
    ("sel_pairs", lambda a: a["sel_pairs"] + 100, ValueError, "sel_pairs"),
    ("sel_pairs", lambda a: a["sel_pairs"][:, :, :1], ValueError, "sel_pairs must have shape"),
    ("sel_coef", lambda a: a["sel_coef"].float(), TypeError, "sel_coef must have dtype float64"),
    ("sel_coef", lambda a: a["sel_coef"][:-1], ValueError, "sel_coef must have shape"),
    ("closest", lambda a: a["closest"][:2], ValueError, "closest must have shape"),
    ("closest", lambda a: torch.tensor([99, -1, 1, 0]), ValueError, "closest"),
    ("inter_vec", lambda a: a["inter_vec"][:2], ValueError, "inter_vec must have shape"),
    ("inter_vec", lambda a: a["inter_vec"].float(), TypeError, "inter_vec must have dtype float64"),
    ("grad_loss", lambda a: torch.ones(2), ValueError, "grad_loss must have shape ()"),
    ("grad_loss", lambda a: torch.tensor(1.0, dtype=torch.float64), TypeError, "grad_loss must have dtype"),
    ("embeddings", lambda a: a["embeddings"][:, :3], ValueError, "inter_vec must have shape"),
    ("embeddings", lambda a: a["embeddings"].long(), TypeError, "embeddings must have dtype"),
]


@pytest.mark.parametrize("name,make,error,text", BAD_BACKWARD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_BACKWARD)])
def test_range_loss_backward_by_name_rejects_each_bad_argument(name, make, error, text):
    args = _backward_args()
    args[name] = make(args)
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.marginkit.range_loss_backward(*args.values())


def test_range_loss_rejects_bool_k_and_ints_beyond_int64():
    x, y = _range_inputs()
    with pytest.raises(TypeError, match="k must be an int, got True"):
        mo.range_loss(x, y, k=True)
    with pytest.raises(ValueError, match=r"k = 18446744073709551616 does not fit in int64"):
        mo.range_loss(x, y, k=2**64)


def test_ints_beyond_int64_are_named_for_every_int_argument():
    centers = torch.randn(4, 3)
    with pytest.raises(ValueError, match="ignore_index = .* does not fit in int64"):
        mo.class_center_update_(centers, torch.randn(2, 3), torch.tensor([0, 1]), 0.5, ignore_index=2**70)
    with pytest.raises(ValueError, match="class_stop = .* does not fit in int64"):
        mo.partial_fc_sample(torch.tensor([1]), 0, 2**64, 2, 0)
    with pytest.raises(ValueError, match="num_sample = .* does not fit in int64"):
        mo.partial_fc_sample(torch.tensor([1]), 0, 10, -(2**64), 0)


def test_float_bool_and_tensor_arguments_are_checked_before_the_dispatcher():
    """A str or None for a float, a list for a tensor: a typed error naming the argument (they were
    torch's dispatcher RuntimeError); True for a float and 1 for a bool: refused (taken as 1.0 / True)."""
    w, g, buf, rows = torch.randn(10, 4), torch.randn(3, 4), torch.zeros(10, 4), torch.tensor([1, 2, 3])
    cases = [
        (lambda: mo.sparse_sgd_step_(w, g, buf, rows, "0.1"), "lr must be a real number, got '0.1'"),
        (lambda: mo.sparse_sgd_step_(w, g, buf, rows, True), "lr must be a real number, got True"),
        (lambda: mo.sparse_sgd_step_(w, g, buf, rows, 0.1, momentum=0.9, nesterov=1), "nesterov must be True or False, got 1"),
        (lambda: mo.class_center_update_(torch.randn(10, 4), g, rows, None), "momentum must be a real number, got None"),
        (lambda: mo.range_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), 2, "1.0"), "margin must be a real number"),
        (lambda: mo.partial_fc_sample([1, 2], 0, 10, 5, 0), "labels must be a torch.Tensor, got list"),
    ]
    for call, text in cases:
        with pytest.raises(TypeError, match=text):
            call()
    before = w.clone()
    mo.sparse_sgd_step_(w, g, buf, rows, 1, momentum=0.0, nesterov=False)  # an int lr is a real number
    assert not torch.equal(w, before)


def test_old_import_path_warns_and_nothing_internal_uses_it():
    code = (
        "import sys, warnings\n"
        "import marginkit, marginkit.nn, marginkit.distributed, marginkit.ops\n"
        "print('internal', 'marginkit.backends.cuda' in sys.modules)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import marginkit.backends.cuda as old\n"
        "print('warned', [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)])\n"
        "print('same', old.range_loss is marginkit.ops.range_loss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "internal False" in out.stdout
    assert "marginkit.ops instead" in out.stdout
    assert "same True" in out.stdout
