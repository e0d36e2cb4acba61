"""`marginkit bench`: the CSV schema, rows, plot, OOM rows and skipped providers (CPU, tiny sizes)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marginkit.bench import providers as bench_providers
from marginkit.bench.providers import PROVIDERS, Case
from marginkit.cli import main

# API.md, "Benchmark results files": the header, verbatim.
API_HEADER = "device,date,method,B,D,C,dtype,margin,ms_median,ms_p20,ms_p80,peak_extra_mib,floor_ms"
API_METHODS = {"marginkit", "marginkit-fast", "marginkit-torch", "torch-textbook", "torch-compile", "pml", "cce", "liger", "floor-3gemm"}
API_MARGINS = {"arcface", "cosface", "sphereface", "combined", "none"}

TINY = ["--device", "cpu", "--C", "500", "--B", "8", "--D", "16", "--reps", "3", "--no-progress"]


def _read(path: Path):
    text = path.read_text()
    header = text.splitlines()[0]
    rows = list(csv.DictReader(text.splitlines()))
    return header, rows


def _bench(tmp_path, *extra, name="r.csv"):
    out = tmp_path / name
    rc = main(["bench", *TINY, "--out", str(out), *extra])
    return rc, out


def test_cli_writes_api_csv_plot_and_sidecar(tmp_path, capsys):
    rc, out = _bench(tmp_path)
    assert rc == 0
    header, rows = _read(out)
    assert header == API_HEADER
    assert rows, "no rows written"
    methods = {r["method"] for r in rows}
    assert methods <= API_METHODS
    assert {"floor-3gemm", "torch-textbook"} <= methods
    floor = [r for r in rows if r["method"] == "floor-3gemm"]
    assert len(floor) == 1
    floor_ms = float(floor[0]["ms_median"])
    assert floor_ms > 0
    for r in rows:
        assert r["device"] == "cpu"
        assert (r["B"], r["D"], r["C"], r["dtype"]) == ("8", "16", "500", "float32")
        assert r["margin"] in API_MARGINS
        med, p20, p80 = float(r["ms_median"]), float(r["ms_p20"]), float(r["ms_p80"])
        assert 0 < p20 <= med <= p80
        assert float(r["floor_ms"]) == pytest.approx(floor_ms)  # the floor of the same run
        assert float(r["peak_extra_mib"]) >= 0  # measured on the CPU too (a live-tensor tracker)
        assert len(r["date"]) == 10 and r["date"][4] == "-"
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".json").exists()
    text = capsys.readouterr().out
    assert "floor-3gemm" in text and "TFLOP/s" in text  # the terminal table
    assert "resolves to the torch backend on CPU" in text or "marginkit" not in methods
    assert "cannot say anything about GPU speed" in text and "benchmarks/results/" in text  # the framing line
    assert "TorchDispatchMode" in text  # how the CPU memory was measured


def test_plot_path_and_no_plot(tmp_path):
    rc, out = _bench(tmp_path, "--plot", str(tmp_path / "p" / "fig.png"), "--providers", "torch-textbook")
    assert rc == 0 and (tmp_path / "p" / "fig.png").exists()
    rc, out = _bench(tmp_path, "--no-plot", "--providers", "torch-textbook", name="q.csv")
    assert rc == 0 and not out.with_suffix(".png").exists()


def test_out_dir_names_file_by_device_and_date(tmp_path):
    rc = main(["bench", *TINY, "--providers", "torch-textbook", "--out-dir", str(tmp_path), "--no-plot"])
    assert rc == 0
    files = list(tmp_path.glob("cpu-????-??-??.csv"))
    assert len(files) == 1
    assert _read(files[0])[0] == API_HEADER


class _OOMProvider(bench_providers.Provider):
    """Builds fine, runs out of memory in the first step (like a CUDA OOM mid-backward)."""

    name = "torch-textbook"

    def __init__(self, exc):
        self.exc = exc

    def build(self, inputs, spec):
        def boom():
            raise self.exc

        return Case(boom, boom, [], inputs.cfg.margin)


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"),
    ],
    ids=["cuda-oom", "cpu-oom"],
)
def test_oom_is_recorded_as_a_row(tmp_path, monkeypatch, capsys, exc):
    monkeypatch.setitem(PROVIDERS, "torch-textbook", _OOMProvider(exc))
    rc, out = _bench(tmp_path, "--providers", "torch-textbook,marginkit-torch", "--C", "300,600")
    assert rc == 0  # running out of memory is a result, not a failure
    _, rows = _read(out)
    oom = [r for r in rows if r["method"] == "torch-textbook"]
    assert [r["C"] for r in oom] == ["300", "600"]  # one row per shape, none dropped
    for r in oom:
        assert r["ms_median"] == r["ms_p20"] == r["ms_p80"] == "nan"
        assert r["peak_extra_mib"] == "oom"
        assert float(r["floor_ms"]) > 0
    # the sweep went on after the OOM
    assert len([r for r in rows if r["method"] == "marginkit-torch" and r["ms_median"]]) == 2 or (
        PROVIDERS["marginkit-torch"].unavailable() is not None
    )
    assert "oom torch-textbook" in capsys.readouterr().out


def test_oom_while_building_is_recorded(tmp_path, monkeypatch):
    def build(self, inputs, spec):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(type(PROVIDERS["pml"]), "build", build)
    rc, out = _bench(tmp_path, "--providers", "pml")
    assert rc == 0
    rows = [r for r in _read(out)[1] if r["method"] == "pml"]
    assert len(rows) == 1 and rows[0]["peak_extra_mib"] == "oom" and rows[0]["ms_median"] == "nan"


def test_other_errors_are_rows_and_exit_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PROVIDERS, "torch-textbook", _OOMProvider(ValueError("kernel bug")))
    rc, out = _bench(tmp_path, "--providers", "torch-textbook")
    assert rc == 3
    rows = [r for r in _read(out)[1] if r["method"] == "torch-textbook"]
    assert len(rows) == 1 and rows[0]["peak_extra_mib"] == "error" and rows[0]["ms_median"] == "nan"
    assert "ValueError: kernel bug" in capsys.readouterr().out


def test_absent_packages_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    # make pytorch-metric-learning look uninstalled
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.losses", None)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    rc, out = _bench(tmp_path, "--providers", "pml,cce,liger,torch-textbook")
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("pml", "cce", "liger"):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"skip {name}:")]
        assert len(lines) == 1, text
        assert "not importable" in lines[0] and "pip install" in lines[0]
    methods = {r["method"] for r in _read(out)[1]}
    assert methods == {"floor-3gemm", "torch-textbook"}


def test_torch_compile_is_opt_in_on_cpu():
    from marginkit.bench.runner import select_providers

    assert "torch-compile" not in select_providers(None, None, "cpu", include_compile=False)
    assert "torch-compile" in select_providers(None, None, "cpu", include_compile=True)
    assert "torch-compile" in select_providers(["torch-compile"], None, "cpu", include_compile=False)
    assert select_providers(["pml"], None, "cpu", False) == ["pml", "floor-3gemm"]  # the floor always runs
    with pytest.raises(ValueError):
        select_providers(["nope"], None, "cpu", False)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["bench", *TINY, "--margin", "bogus", "--out", str(tmp_path / "x.csv")]) == 2
    assert "unknown margin" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--skip", "pmll", "--skip: unknown provider 'pmll'; choose from"),
    ("--warmup", "-1", "--warmup must be >= 0, got -1"),
    ("--budget-s", "0", "--budget-s must be > 0, got 0.0"),
    ("--rep-ms", "-5", "--rep-ms must be > 0, got -5.0"),
    ("--time-limit-s", "-1", "--time-limit-s must be >= 0, got -1.0"),
    ("--B", "-1", "--B: not a size: '-1'"),
    # an empty list planned nothing and exited 0
    ("--C", "", "--C: no size given in ''"),
    ("--C", ",", "--C: no size given in ','"),
    ("--dtype", "", "--dtype: empty list ''"),
    ("--providers", ",", "--providers: empty list ','"),
    # each error names its flag
    ("--dtype", "fp64", "--dtype: unknown dtype 'fp64'"),
    ("--margin", "bogus", "--margin: unknown margin 'bogus'"),
    ("--providers", "pmll", "--providers: unknown provider 'pmll'"),
    ("--scale", "0", "--scale must be finite and > 0, got 0.0"),
    ("--scale", "inf", "--scale must be finite and > 0, got inf"),  # used to fail every marginkit row
    ("--skip", "floor-3gemm", "--skip: floor-3gemm always runs"),  # used to be added back silently
    ("--device", "cuda:abc", "--device must be auto, cpu, cuda or cuda:N"),
])
def test_every_bad_flag_is_one_line_naming_it_before_any_timing(tmp_path, capsys, flag, value, message):
    assert main(["bench", *TINY, flag, value, "--out", str(tmp_path / "x.csv")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written


def test_an_output_path_that_cannot_be_written_is_refused_before_any_timing(tmp_path, capsys):
    """A directory, a path under a file, a read-only directory: one line naming the way out, and no
    stray files (it used to be a traceback after the first row had been timed)."""
    (tmp_path / "a_file").write_text("")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [(["--out", str(tmp_path)], "is a directory"),
             (["--out", str(tmp_path / "a_file" / "x.csv")], "cannot create the output directory"),
             (["--out-dir", str(tmp_path / "a_file" / "d")], "cannot create the output directory")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", str(read_only / "x.csv")], "cannot write"))
    for args, message in cases:
        assert main(["bench", *TINY, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "--out" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ro"] and not list(read_only.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--out", "r.png"], "--out {d}/r.png names the CSV, but ends in .png"),  # the plot overwrote the CSV
    (["--out", "r.json"], "--out {d}/r.json names the CSV, but ends in .json"),  # the CSV overwrote the JSON
    (["--out", "r.csv", "--plot", "r.json"], "--plot {d}/r.json is the CSV or the JSON sidecar"),
    (["--out", "r.csv", "--plot", "r.csv"], "--plot {d}/r.csv is the CSV or the JSON sidecar"),
    (["--out", "r.csv", "--out-dir", "d"], "give --out (the CSV path) or --out-dir"),  # --out won silently
])
def test_output_files_that_would_collide_are_refused(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if not a.startswith("--") else a for a in args]
    assert main(["bench", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_an_out_path_without_suffix_keeps_three_distinct_files(tmp_path):
    from marginkit.bench.plan import output_paths

    assert output_paths(tmp_path / "r", True) == (tmp_path / "r", tmp_path / "r.json", tmp_path / "r.png")
    assert output_paths(tmp_path / "r.csv", False) == (tmp_path / "r.csv", tmp_path / "r.json", None)


def test_cuda_device_strings_are_checked_against_the_devices_torch_sees(monkeypatch):
    """`cuda:abc` and an index past the device count were RuntimeError tracebacks (torch.device) after
    the ValueError handler; simulated here with one fake CUDA device."""
    from marginkit.bench.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    for name, message in (("cuda:abc", "--device must be auto, cpu, cuda or cuda:N"), ("cuda:-1", "--device must"),
                          ("cuda:1", "--device cuda:1: torch sees 1 CUDA device(s), indices 0..0")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve_device(name)
    assert main(["bench", "--device", "cuda:abc", "--no-progress"]) == 2


def test_repeated_sizes_dtypes_and_margins_plan_each_shape_once(tmp_path):
    from marginkit.bench.plan import plan_sweep
    from marginkit.bench.runner import SweepOptions

    plan = plan_sweep(SweepOptions(device="cpu", B="8,8", D="16,16", C="500,1K,500", dtype="fp32,float32",
                                   margin="arcface,arcface", out=tmp_path / "r.csv"))
    assert [(c.B, c.D, c.C, c.dtype, c.margin) for c in plan.configs] == [
        (8, 16, 500, torch.float32, "arcface"), (8, 16, 1000, torch.float32, "arcface")]


def test_progress_bar_counts_a_run_when_it_has_finished(tmp_path, monkeypatch):
    import tqdm.auto

    from marginkit.bench import runner

    class Bar:
        def __init__(self, *args, total=0, **kwargs):
            self.n, self.total = 0, total
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text):
            pass

        def write(self, text):
            pass

        def close(self):
            pass

    bars, done_when_started = [], []
    real_run_cell = runner.run_cell

    def run_cell(cell, row, inputs, timing):
        done_when_started.append(bars[0].n)
        return real_run_cell(cell, row, inputs, timing)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(runner, "run_cell", run_cell)
    rc = main(["bench", *TINY[:-1], "--providers", "torch-textbook", "--no-plot", "--out", str(tmp_path / "r.csv")])
    assert rc == 0
    assert done_when_started == [0, 1] and bars[0].n == bars[0].total == 2  # floor, then textbook


def test_every_method_has_its_own_plot_style():
    from marginkit.bench.config import METHODS
    from marginkit.bench.plot import _STYLE

    assert set(_STYLE) == set(METHODS)
    assert len({_STYLE[m]["color"] for m in METHODS}) == len(METHODS)  # marginkit-fast was torch-textbook's blue


def test_version_flag(capsys):
    import marginkit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"marginkit {marginkit.__version__}"


def test_cuda_only_peers_are_not_chosen_by_default_on_cpu():
    """cce and liger run only on CUDA: a CPU run leaves them out instead of printing "install it"."""
    from marginkit.bench.runner import select_providers

    assert not {"cce", "liger"} & set(select_providers(None, None, "cpu", False))
    assert {"cce", "liger"} <= set(select_providers(None, None, "cuda", False))


def test_parse_sizes():
    from marginkit.bench.config import parse_sizes

    assert parse_sizes("100K,1M,4m,1e6,2**20,1_000") == [100_000, 1_000_000, 4_000_000, 1_000_000, 1 << 20, 1000]
    with pytest.raises(ValueError):
        parse_sizes("1.5")


def test_demo_missing_exits_2(monkeypatch, capsys):
    import marginkit.demo

    monkeypatch.setattr(marginkit.demo, "example_path", lambda: None)  # an install without examples/
    assert main(["demo"]) == 2
    assert "demo is not available" in capsys.readouterr().err


def test_python_dash_m_marginkit(tmp_path):
    out = tmp_path / "m.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "marginkit", "bench", *TINY, "--providers", "torch-textbook", "--no-plot",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _read(out)[0] == API_HEADER
    assert math.isfinite(float(_read(out)[1][0]["ms_median"]))


def test_time_limit_lists_runs_not_started(tmp_path):
    import json

    rc, out = _bench(tmp_path, "--providers", "torch-textbook", "--time-limit-s", "0", "--no-plot")
    assert rc == 0
    header, rows = _read(out)
    assert header == API_HEADER and rows == []
    not_run = json.loads(out.with_suffix(".json").read_text())["not_run"]
    assert any(s.startswith("torch-textbook B=8 D=16 C=500") for s in not_run)


def test_replot_from_csv(tmp_path, monkeypatch):
    from marginkit.bench.plot import main as plot_main, rows_from_csv

    monkeypatch.setitem(PROVIDERS, "pml", _OOMProvider(torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    rc, out = _bench(tmp_path, "--providers", "torch-textbook,pml", "--no-plot")
    assert rc == 0
    rows = rows_from_csv(out)
    assert {(r.method, r.status) for r in rows} == {("floor-3gemm", "ok"), ("torch-textbook", "ok"), ("pml", "oom")}
    assert plot_main([str(out), str(tmp_path / "re.png")]) == 0
    assert (tmp_path / "re.png").read_bytes()[:4] == b"\x89PNG"


def test_a_broken_device_stops_the_sweep_and_keeps_the_files(tmp_path, monkeypatch):
    """A peer that breaks the CUDA context (cce's illegal address at C = 10M on an H200) must not
    take the rows already measured with it: its row is an error, later runs are listed as not run,
    and the CSV, JSON and plot are still written. Simulated on the CPU with a failing cleanup."""
    import json

    from marginkit.bench import cell

    broken = {"now": False}
    real_cleanup = cell.cleanup

    class BreaksTheDevice(bench_providers.Provider):
        def build(self, inputs, spec):
            broken["now"] = True
            return PROVIDERS["torch-textbook"].build(inputs, spec)

    def cleanup(device):
        if broken["now"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real_cleanup(device)

    monkeypatch.setitem(PROVIDERS, "pml", BreaksTheDevice())
    monkeypatch.setattr(cell, "cleanup", cleanup)
    rc, out = _bench(tmp_path, "--providers", "torch-textbook,pml", "--C", "500,600")
    assert rc == 3  # the broken run is an error row
    rows = {(r["method"], r["C"]): r for r in _read(out)[1]}
    assert set(rows) == {("floor-3gemm", "500"), ("torch-textbook", "500"), ("pml", "500")}
    assert rows[("pml", "500")]["peak_extra_mib"] == "error"
    assert math.isfinite(float(rows[("torch-textbook", "500")]["ms_median"]))
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["stop_reason"] == "the device failed during pml at C=500"
    assert [s.split(" B=")[0] for s in sidecar["not_run"]] == ["floor-3gemm", "torch-textbook", "pml"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_cce_is_skipped_past_its_32_bit_classifier_offsets():
    from marginkit.bench.config import BenchConfig

    def cfg(C):
        return BenchConfig(device="cuda", B=1024, D=512, C=C, dtype=torch.bfloat16, margin="arcface", scale=64.0)

    assert PROVIDERS["cce"].too_large(cfg(4_000_000)) is None  # 2.05e9 < 2^31: ran on the H200
    assert "2^31" in PROVIDERS["cce"].too_large(cfg(10_000_000))
    assert PROVIDERS["marginkit"].too_large(cfg(10_000_000)) is None


def test_tune_sweep_times_every_variant():
    """benchmarks/tune_sweep.py (the GPU A/B of the Triton launch choices) runs its plumbing on CPU."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_sweep.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--C", "600", "--B", "8", "--D", "16", "--dtype", "fp32",
         "--chunk-classes", "0,256", "--dx-splits", "0,2", "--tma", "0,1", "--reps", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()[2:]
    assert [line[:40].strip() for line in lines] == [
        "launcher's choice", "tma=True", "dx_splits=2", "dx_splits=2, tma=True", "chunk_classes=256",
        "chunk_classes=256, tma=True", "chunk_classes=256, dx_splits=2", "chunk_classes=256, dx_splits=2, tma=True"]
    assert all(math.isfinite(float(line[40:].split()[0])) for line in lines)
    assert all(float(line.split()[-1]) < 1e-3 for line in lines)  # each variant checked against float64 first


def test_tune_sweep_prints_error_not_a_time_for_a_variant_that_fails_the_float64_check(monkeypatch, capsys):
    """A variant that computes something else must not win an A/B: it gets an error line, and no timing."""
    import importlib.util

    from marginkit.bench.check import CheckResult

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_sweep.py"
    spec = importlib.util.spec_from_file_location("tune_sweep_under_test", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    timed = []
    monkeypatch.setattr(sweep, "check_against_float64", lambda case, inputs, spec: CheckResult(
        0.5, 0.5, 0.0, 0.0, tolerance=1e-3, step_s=0.0))
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: timed.append(a))
    sweep.main(["--device", "cpu", "--C", "300", "--B", "4", "--D", "8", "--dtype", "fp32", "--reps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(lines) == 1 and "error: max rel err 0.5" in lines[0] and not timed


def test_cuda_graph_ab_imports_and_says_it_needs_cuda():
    """benchmarks/cuda_graph_ab.py runs only on a GPU session: here its imports and flags must work and it
    must stop with a message, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_run.sh runs the script itself")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_graph_ab.py"
    proc = subprocess.run([sys.executable, str(script), "--C", "100K", "--providers", "marginkit,marginkit-fast"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == "cuda_graph_ab.py needs a CUDA device", proc.stderr[-2000:]
