"""Kept import path: see :mod:`metafit.tuning.search_space`."""

from __future__ import annotations

from metafit.tuning.search_space import *  # noqa: F403
from metafit.tuning.search_space import __all__  # noqa: F401
