"""Hyperparameter tuning of the meta-learned estimators with Optuna.

The tuning wing, above the estimators: :func:`tune` runs a study (:mod:`._study`), whose
objective fits and scores clones of the estimator on held-out tasks
(:mod:`._objectives`); :mod:`.search_space` holds the search spaces and :mod:`.storage`
the Optuna storages (SQLite by default, PostgreSQL or journal files for many workers).
Only the estimators' public API is used.
"""

from __future__ import annotations

from metafit.tuning._objectives import (
    BLOWUP_FACTOR,
    META_RUNGS,
    evaluate,
    make_objective,
    metric_name,
    score_spread,
    task_scores,
    trivial_mse,
)
from metafit.tuning._study import default_study_name, tune, tuned_estimator
from metafit.tuning.search_space import (
    ADAPTATION_PARAMS,
    default_search_space,
    parse_search_space,
    to_estimator_params,
)
from metafit.tuning.storage import make_storage

__all__ = [
    "ADAPTATION_PARAMS",
    "BLOWUP_FACTOR",
    "META_RUNGS",
    "default_search_space",
    "default_study_name",
    "evaluate",
    "make_objective",
    "make_storage",
    "metric_name",
    "parse_search_space",
    "score_spread",
    "task_scores",
    "trivial_mse",
    "to_estimator_params",
    "tune",
    "tuned_estimator",
]
