"""The long-tail demo: a tiny end-to-end run, its outputs, and its pieces."""

import csv
import math
import os
import subprocess
import sys
import time

import torch

from marginkit import demo
from marginkit.demo_data import DataConfig, make_dataset, zipf_counts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in demo.METHODS:
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_tiny_end_to_end(tmp_path, capsys):
    csv_path, png_path = tmp_path / "r.csv", tmp_path / "r.png"
    start = time.perf_counter()
    rc = demo.main(["--tiny", "--csv", str(csv_path), "--plot", str(png_path), "--no-progress"])
    elapsed = time.perf_counter() - start
    assert rc == 0
    assert elapsed < 20.0, elapsed
    out = capsys.readouterr().out
    table = _table_rows(out)
    assert set(table) == set(demo.DEFAULT_METHODS)
    for method, cells in table.items():
        for v in cells[:5]:  # TAR@1e-3, TAR@1e-2, tail, head, all
            assert 0.0 <= float(v) <= 1.0, (method, cells)
        assert float(cells[5]) >= 0.0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(demo.DEFAULT_METHODS)
    assert {r["seed"] for r in rows} == {"0", "mean", "std"}
    for r in rows:
        if r["seed"] != "std":
            for key in ("tar@far=1e-3", "tar@far=1e-2", "tail_acc", "head_acc", "all_acc"):
                assert 0.0 <= float(r[key]) <= 1.0
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fairloss final class margins" in out


def test_demo_module_entry_point(tmp_path):
    """`python -m marginkit.demo` works (one extra head, to exercise --methods)."""
    csv_path = tmp_path / "m.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "marginkit.demo", "--tiny", "--no-plot", "--no-progress", "--methods",
         "softmax,curricularface", "--csv", str(csv_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(_table_rows(proc.stdout)) == {"softmax", "curricularface"}
    assert csv_path.exists()


def test_demo_rejects_unknown_methods(capsys):
    assert demo.main(["--methods", "nope", "--no-plot"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_tar_at_far_on_a_known_case():
    # Points on a circle: cos similarity = cos(φ_i − φ_j). Genuine pairs (same id) are 0.1, 0.6
    # and 1.5 rad apart; the closest impostor pair (ids 0 and 1) is 1.0 rad apart.
    phi = torch.tensor([0.0, 0.1, 1.1, 1.7, 3.5, 5.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.stack([phi.cos(), phi.sin()], dim=1) * 3.0  # norms do not matter
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    cos = {p: math.cos(float(phi[p[0]] - phi[p[1]])) for p in pairs}
    impostor = sorted((cos[p] for p in pairs if labels[p[0]] != labels[p[1]]), reverse=True)
    genuine = [cos[p] for p in pairs if labels[p[0]] == labels[p[1]]]
    assert len(impostor) == 12 and impostor[0] == math.cos(1.0)
    # FAR = 1/12: the threshold is the largest impostor score, cos 1.0 = 0.54: only 0.1 and 0.6 rad pass
    assert abs(demo.tar_at_far(emb, labels, 1.0 / 12) - 2.0 / 3) < 1e-12
    assert sum(g > impostor[0] for g in genuine) == 2
    # FAR = 1e-3 on 12 impostors still takes the largest one (at least one impostor defines it)
    assert abs(demo.tar_at_far(emb, labels, 1e-3) - 2.0 / 3) < 1e-12
    # A FAR large enough to go below cos 1.5 = 0.07 accepts every genuine pair
    k = next(i for i, v in enumerate(impostor) if v < math.cos(1.5)) + 1
    assert abs(demo.tar_at_far(emb, labels, k / 12) - 1.0) < 1e-12


def test_dataset_is_long_tailed_and_seeded():
    counts = zipf_counts(10, 100, 1.0, 2)
    assert counts.tolist() == [100, 50, 33, 25, 20, 17, 14, 12, 11, 10]
    cfg = DataConfig(num_classes=30, max_per_class=40, open_classes=5, open_per_class=3, test_per_class=2)
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.open_x, b.open_x)
    assert a.train_x.shape == (int(a.class_counts.sum()), cfg.input_dim)
    assert torch.equal(torch.bincount(a.train_y, minlength=30), a.class_counts)
    assert a.closed_y.numel() == 60 and a.open_y.unique().numel() == 5
    assert int(a.class_counts[0]) == 40 and int(a.class_counts.min()) >= 2
    c = make_dataset(DataConfig(num_classes=30, max_per_class=40, open_classes=5, open_per_class=3, test_per_class=2, seed=1))
    assert not torch.equal(a.train_x, c.train_x)
