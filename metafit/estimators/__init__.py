"""The scikit-learn shell: estimators that hold parameters, validate data and delegate.

- :class:`MetaInitializedRegressor` and :class:`MetaInitializedClassifier`, thin
  subclasses of :class:`MetaInitializedEstimator` that differ by a target kind
  (:mod:`metafit.estimators._targets`);
- :mod:`~metafit.estimators._params`: the one table of parameter rules;
- :mod:`~metafit.estimators._learners`: the one place that builds a ``MetaLearner``;
- :mod:`~metafit.estimators._meta_fit_run`: the body of ``meta_fit``.
"""

from __future__ import annotations

from metafit.estimators._base import MetaInitializedEstimator, NoMetaInitWarning
from metafit.estimators._learners import LearnerFactory, learner_factory
from metafit.estimators._params import PARAMETERS
from metafit.estimators.classifier import MetaInitializedClassifier
from metafit.estimators.regressor import MetaInitializedRegressor

__all__ = [
    "PARAMETERS",
    "LearnerFactory",
    "learner_factory",
    "MetaInitializedClassifier",
    "MetaInitializedEstimator",
    "MetaInitializedRegressor",
    "NoMetaInitWarning",
]
