"""Kept import path: the estimators live in :mod:`metafit.estimators`."""

from __future__ import annotations

from metafit.estimators import (
    MetaInitializedClassifier,
    MetaInitializedEstimator,
    MetaInitializedRegressor,
)

__all__ = ["MetaInitializedEstimator", "MetaInitializedRegressor", "MetaInitializedClassifier"]
