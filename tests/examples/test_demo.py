"""The long-tail demo (examples/long_tail): a tiny end-to-end run through `marginkit demo`, its
outputs, and its pieces (metrics, the frequency schedule, the Fair Loss offline phase, the study cell)."""

import csv
import math
import subprocess
import sys

import pytest
import torch

import marginkit.demo as launcher
from examples.long_tail import demo, heads, report, study, train
from examples.long_tail.data import DataConfig, make_dataset, zipf_counts
from examples.long_tail.fair_paper import offline_phase
from marginkit.nn.fair_loss_paper import fixed_count_bins


def _table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] in heads.METHODS:
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_tiny_end_to_end(tmp_path, capsys):
    csv_path, png_path = tmp_path / "r.csv", tmp_path / "r.png"
    assert launcher.main(["--tiny", "--csv", str(csv_path), "--plot", str(png_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = _table_rows(out)
    assert set(table) == set(heads.DEFAULT_METHODS)
    for method, cells in table.items():
        for v in cells[:6]:  # TAR@1e-3, TAR@1e-2, tail, mid, head, all
            assert 0.0 <= float(v) <= 1.0, (method, cells)
        assert -1.0 <= float(cells[6]) <= 1.0  # head − tail gap
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(heads.DEFAULT_METHODS) and {r["seed"] for r in rows} == {"0"}
    for r in rows:
        acc = {k: float(r[k]) for k in ("head_acc", "tail_acc", "gap")}
        assert abs(acc["head_acc"] - acc["tail_acc"] - acc["gap"]) < 2e-4
    margins = {r["method"]: r for r in rows if r["margin_head"]}
    assert set(margins) == {"cosface-freq", "fairloss", "fairloss-paper"}
    assert float(margins["cosface-freq"]["margin_size_spearman"]) == -1.0  # the schedule falls with class size
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Spearman(class size, margin)" in out and "offline phase: 22 sample networks" in out


def test_marginkit_demo_runs_from_any_directory(tmp_path):
    """`python -m marginkit.demo` finds examples/long_tail from another working directory."""
    csv_path = tmp_path / "m.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "marginkit.demo", "--tiny", "--no-plot", "--no-progress", "--methods",
         "cosface,curricularface", "--csv", str(csv_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(_table_rows(proc.stdout)) == {"cosface", "curricularface"}
    assert csv_path.exists()


def test_demo_rejects_bad_arguments(capsys):
    assert launcher.main(["--methods", "nope", "--no-plot"]) == 2
    assert "marginkit demo: error: --methods: unknown method(s) nope" in capsys.readouterr().err
    assert launcher.main(["--study", "--methods", "fairloss", "--no-plot"]) == 2
    assert "cosface-freq" in capsys.readouterr().err
    assert launcher.main(["--study", "--skews", "steep", "--no-plot"]) == 2
    assert "steep" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),  # trained nothing, printed tables
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--classes", "0"], "--classes must be >= 3, got 0"),  # a torch traceback
    (["--classes", "-5"], "--classes must be >= 3, got -5"),
    (["--csv", "/proc/no/x.csv"], "--csv /proc/no/x.csv: cannot write it"),  # failed after all the training
    (["--study", "--from-csv", "{tmp}/missing.csv"], "--from-csv {tmp}/missing.csv: no such file"),  # a traceback
    (["--from-csv", "{tmp}/r.csv"], "--from-csv applies only with --study"),  # ignored
    (["--skews", "0.5"], "--skews applies only with --study"),
    (["--jobs", "3"], "--jobs applies only with --study"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),  # ignored
    (["--study", "--threads", "2"], "--threads applies only without --study"),
    (["--methods", ","], "--methods: no method in ','"),  # "unknown method(s) ; known"
    (["--seeds", ","], "--seeds: no seed in ','"),
])
def test_demo_refuses_bad_values_before_training(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(demo, "make_dataset", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    assert launcher.main(["--tiny", "--no-progress", "--no-plot", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"marginkit demo: error: {message.format(tmp=tmp_path)}") and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_launcher_without_the_examples(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "example_path", lambda: None)
    monkeypatch.delitem(sys.modules, launcher.EXAMPLE_PACKAGE, raising=False)
    assert launcher.main(["--tiny"]) == 2
    assert "source checkout" in capsys.readouterr().err


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
    assert abs(train.tar_at_far(emb, labels, 1.0 / 12) - 2.0 / 3) < 1e-12
    assert sum(g > impostor[0] for g in genuine) == 2
    assert abs(train.tar_at_far(emb, labels, 1e-3) - 2.0 / 3) < 1e-12
    k = next(i for i, v in enumerate(impostor) if v < math.cos(1.5)) + 1
    assert abs(train.tar_at_far(emb, labels, k / 12) - 1.0) < 1e-12


def test_thirds_spearman_and_margin_summary():
    counts = torch.tensor([5, 50, 2, 20, 2, 9])
    assert train.thirds(counts).tolist() == [1, 0, 2, 0, 2, 1]  # head: 50, 20; middle: 9, 5; tail: the two 2s
    # ranks of a: 1, 2.5, 2.5, 4; of b: 4, 3, 2, 1 -> Pearson of the ranks = −0.9487
    a, b = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert abs(train.spearman(a, b) - (-3 / math.sqrt(10))) < 1e-12
    assert math.isnan(train.spearman(a, torch.ones(4)))
    m = train.margin_summary(torch.tensor([0.3, 0.1, 0.45, 0.2, 0.45, 0.3]), counts)
    assert abs(m["margin_head"] - 0.15) < 1e-7 and abs(m["margin_mid"] - 0.3) < 1e-7 and abs(m["margin_tail"] - 0.45) < 1e-7
    assert m["margin_size_spearman"] < -0.9


def test_frequency_margins():
    got = heads.frequency_margins(torch.tensor([1, 16, 81]))  # n^(-1/4) = 1, 1/2, 1/3
    assert torch.allclose(got, torch.tensor([0.45, 0.15 + 0.3 * (1 / 2 - 1 / 3) / (2 / 3), 0.15]))
    assert torch.equal(heads.frequency_margins(torch.tensor([7, 7, 7])), torch.full((3,), 0.45))


def test_paired_gains_counts_wins_per_seed():
    rows = []
    for seed, (ref_tail, m_tail, ref_gap, m_gap) in enumerate([(0.8, 0.85, 0.2, 0.1), (0.8, 0.78, 0.2, 0.25)]):
        for method, tail, gap in (("ref", ref_tail, ref_gap), ("m", m_tail, m_gap)):
            rows.append({"skew": "0.75", "method": method, "seed": seed, "tail_acc": tail, "gap": gap,
                         "tar@far=1e-3": 0.5, "all_acc": 0.9})
    (g,) = report.paired_gains(rows, "ref")
    assert g["method"] == "m" and g["seeds"] == 2
    assert abs(g["tail_acc"] - 0.015) < 1e-12 and g["tail_acc_wins"] == 1
    assert abs(g["gap"] - (-0.025)) < 1e-12 and g["gap_wins"] == 1  # a lower gap is the better one
    assert g["tar@far=1e-3_wins"] == 0


def test_dataset_is_long_tailed_seeded_and_has_a_validation_split():
    counts = zipf_counts(10, 100, 1.0, 2)
    assert counts.tolist() == [100, 50, 33, 25, 20, 17, 14, 12, 11, 10]
    cfg = DataConfig(num_classes=30, max_per_class=40, open_classes=5, open_per_class=3, test_per_class=2, val_per_class=3)
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.open_x, b.open_x) and torch.equal(a.val_x, b.val_x)
    assert a.train_x.shape == (int(a.class_counts.sum()), cfg.input_dim)
    assert torch.equal(torch.bincount(a.train_y, minlength=30), a.class_counts)
    assert a.closed_y.numel() == 60 and a.open_y.unique().numel() == 5
    assert torch.equal(torch.bincount(a.val_y), torch.full((30,), 3)) and not torch.equal(a.val_x[:2], a.closed_x[:2])
    assert int(a.class_counts[0]) == 40 and int(a.class_counts.min()) >= 2
    c = make_dataset(DataConfig(num_classes=30, max_per_class=40, open_classes=5, open_per_class=3, test_per_class=2, seed=1))
    assert not torch.equal(a.train_x, c.train_x)
    balanced = study.skew_config(DataConfig(), "balanced", 3)
    assert balanced.zipf_exponent == 0.0 and balanced.seed == 3
    assert zipf_counts(5, balanced.max_per_class, 0.0, 2).tolist() == [study.BALANCED_PER_CLASS] * 5


def test_offline_phase_and_frozen_policy_on_tiny_data():
    data = make_dataset(demo.TINY_DATA)
    cfg = demo.TINY_TRAIN
    paper = offline_phase(data, cfg)
    assert torch.equal(paper["count_bins"], fixed_count_bins(data.class_counts))
    G = paper["count_bins"].unique().numel()
    assert paper["finetunes"] == 4 * (1 + 2 * G) - 2 * G  # a clamped move reuses the keep copy
    assert paper["tuples"].states.numel() == 4 * 3 * G
    t1, t2 = paper["spread_thresholds"]
    assert 0.0 <= t1 <= t2 <= 4.0
    assert set(paper["tables"]) == {"local", "global"}
    row = train.train_one("fairloss-paper", data, cfg, progress=False, paper=paper)
    assert 0.0 <= row["tail_acc"] <= 1.0 and row["train_s"] >= paper["seconds"]


def test_study_cell_rows():
    rows = study.run_cell("balanced", 0, ("cosface-freq", "fairloss"), demo.TINY_DATA, demo.TINY_TRAIN)
    assert [(r["skew"], r["method"], r["seed"]) for r in rows] == [("balanced", "cosface-freq", 0), ("balanced", "fairloss", 0)]
    assert rows[0]["margin_head"] == rows[0]["margin_tail"] == pytest.approx(0.45)  # equal sizes: one margin, the top
    assert torch.get_num_threads() == 1
