"""Kept import path: see :mod:`metafit.estimators.classifier`."""

from __future__ import annotations

from metafit.estimators.classifier import MetaInitializedClassifier, module_outputs

__all__ = ["MetaInitializedClassifier", "module_outputs"]
