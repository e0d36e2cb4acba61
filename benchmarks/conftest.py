"""pytest-benchmark suite options: the same sweep flags as ``marginkit bench``.

    pytest benchmarks --benchmark-only                              # default sizes for this device
    pytest benchmarks --benchmark-only --mk-C 100K,1M --mk-providers marginkit,floor-3gemm
    pytest benchmarks --benchmark-only --benchmark-json out.json   # extra_info holds the CSV fields
"""

from __future__ import annotations

import pytest

from marginkit.bench.config import DEFAULTS, METHODS, BenchConfig, parse_dtype, parse_sizes, resolve_device
from marginkit.bench.plan import FLOOR, select_providers, split_list


def pytest_addoption(parser):
    g = parser.getgroup("marginkit", "marginkit benchmark sweep")
    g.addoption("--mk-device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.addoption("--mk-C", default=None, help="classes, comma list (K/M suffixes)")
    g.addoption("--mk-B", default=None, help="batch rows, comma list")
    g.addoption("--mk-D", default=None, help="embedding dim, comma list")
    g.addoption("--mk-dtype", default=None, help="bf16, fp16, fp32, comma list")
    g.addoption("--mk-margin", default=None, help="arcface, cosface, sphereface, combined, none, comma list")
    g.addoption("--mk-scale", type=float, default=64.0)
    g.addoption("--mk-providers", default=None, help=f"comma list from {', '.join(METHODS)}")
    g.addoption("--mk-compile", action="store_true", help="include torch-compile on CPU")
    g.addoption("--mk-rounds", type=int, default=None, help="timed rounds per benchmark (default 10 CUDA, 5 CPU)")


def _cases(config):
    device = resolve_device(config.getoption("--mk-device"))
    dflt = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    opt = config.getoption
    Bs = parse_sizes(opt("--mk-B")) if opt("--mk-B") else dflt["B"]
    Ds = parse_sizes(opt("--mk-D")) if opt("--mk-D") else dflt["D"]
    Cs = parse_sizes(opt("--mk-C")) if opt("--mk-C") else dflt["C"]
    dtypes = [parse_dtype(t) for t in (split_list(opt("--mk-dtype")) or dflt["dtype"])]
    margins = split_list(opt("--mk-margin")) or dflt["margin"]
    names = select_providers(split_list(opt("--mk-providers")), None, device, opt("--mk-compile"))
    names.sort(key=lambda n: n != FLOOR)
    cases = []
    for margin in margins:
        for dtype in dtypes:
            for B in Bs:
                for D in Ds:
                    for C in sorted(Cs):
                        cfg = BenchConfig(device, B, D, C, dtype, margin, opt("--mk-scale"))
                        for n in names:
                            cid = f"{n}-{margin}-{str(dtype).replace('torch.', '')}-B{B}-D{D}-C{C}"
                            cases.append(pytest.param((cfg, n), id=cid))
    return cases


def pytest_generate_tests(metafunc):
    if "mk_case" in metafunc.fixturenames:
        metafunc.parametrize("mk_case", _cases(metafunc.config))


@pytest.fixture
def mk_rounds(request):
    return request.config.getoption("--mk-rounds")


def pytest_collection_modifyitems(config, items):
    """A plain `pytest` from the repository root must not run the sweep: these run when
    asked for (`pytest benchmarks ...` or `--benchmark-only`)."""
    from pathlib import Path

    here = Path(__file__).parent.resolve()
    asked = config.getoption("benchmark_only", default=False) or any(
        here == p or here in p.parents or p == here
        for p in (Path(a.split("::")[0]).resolve() for a in config.invocation_params.args if not a.startswith("-"))
    )
    if asked:
        return
    skip = pytest.mark.skip(reason="benchmark sweep: run `pytest benchmarks --benchmark-only`")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
