"""``marginkit demo`` / ``python -m marginkit.demo``: runs the long-tail demo of ``examples/long_tail``.

The demo is example code, not library code: it lives in the repository's
``examples/long_tail`` (run it there as ``python -m examples.long_tail``). This launcher
finds it beside the installed package, which holds for a source checkout and an
editable install; a wheel has no examples and the command says so (exit status 2).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

__all__ = ["main", "example_path", "load_demo"]

# Imported by its checkout name with the checkout first on sys.path, so that the study's spawned
# worker processes (which inherit sys.path) can import it too.
EXAMPLE_PACKAGE = "examples.long_tail"


def example_path() -> Optional[Path]:
    """``<checkout>/examples/long_tail`` when it exists beside the package, else None."""
    path = Path(__file__).resolve().parent.parent / "examples" / "long_tail"
    return path if (path / "__init__.py").is_file() and (path / "demo.py").is_file() else None


def load_demo() -> ModuleType:
    """The example's ``demo`` module (its ``main(argv)`` is the command). ImportError when absent."""
    path = example_path()
    if path is None:
        raise ImportError("the long-tail demo lives in examples/long_tail of a source checkout of marginkit; "
                          "install from a checkout (pip install -e .) to run it")
    checkout = str(path.parent.parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    return importlib.import_module(f"{EXAMPLE_PACKAGE}.demo")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        demo = load_demo()
    except ImportError as exc:
        print(f"marginkit demo is not available in this install ({exc}).", file=sys.stderr)
        return 2
    return demo.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
