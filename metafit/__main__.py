"""``python -m metafit``: the ``metafit`` command line."""

from __future__ import annotations

import sys

from metafit.cli import main

if __name__ == "__main__":
    sys.exit(main())
