"""Kept import path: see :mod:`metafit.tuning.storage`."""

from __future__ import annotations

from metafit.tuning.storage import *  # noqa: F403
from metafit.tuning.storage import __all__  # noqa: F401
