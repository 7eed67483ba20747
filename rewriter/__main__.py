"""``python -m peftfx``: the same command line as the ``peftfx`` console script."""
from __future__ import annotations

import sys

from peftfx.inspect.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
