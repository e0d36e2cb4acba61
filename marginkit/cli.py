"""The ``marginkit`` command: ``marginkit bench ...`` and ``marginkit demo ...``.

Installed as a console script (``marginkit = marginkit.cli:main``) and also
reachable as ``python -m marginkit``.
"""

from __future__ import annotations

import argparse
import sys

from marginkit import __version__
from marginkit.demo import main as demo_main

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from marginkit.bench.runner import add_arguments

    parser = argparse.ArgumentParser(
        prog="marginkit",
        description="marginkit: fused large-class margin softmax (ArcFace, CosFace, ...).",
    )
    parser.add_argument("--version", action="version", version=f"marginkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,demo}")
    bench = sub.add_parser(
        "bench",
        help="benchmark marginkit against its peers and the three-GEMM floor",
        description="Benchmark one forward + backward step of marginkit and its peers over a sweep of C; "
        "writes a CSV (API.md schema), a PNG plot and a JSON sidecar, and prints a table.",
    )
    add_arguments(bench)
    sub.add_parser("demo", help="the long-tail training demo of examples/long_tail (arguments are passed on to it)", add_help=False)
    return parser


def _demo(argv) -> int:
    rc = demo_main(argv)
    return int(rc) if isinstance(rc, int) else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after `demo` belongs to the demo
        return _demo(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from marginkit.bench.runner import run_from_args

        return run_from_args(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
