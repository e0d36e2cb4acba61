"""``python -m examples.long_tail`` (from the repository root): the long-tail demo."""

from .demo import main

raise SystemExit(main())
