"""Kept import path: see :mod:`metafit.estimators.regressor`."""

from __future__ import annotations

from metafit.estimators.regressor import MetaInitializedRegressor

__all__ = ["MetaInitializedRegressor"]
