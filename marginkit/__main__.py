"""``python -m marginkit ...``: the same as the ``marginkit`` command."""

import sys

from marginkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
