"""metafit: meta-learned initializations as scikit-learn estimators.

Learn *how to start* from many small related tasks (``meta_fit``), then fit a new task
from a handful of examples (``fit``), with MAML, first-order MAML, Reptile, ANIL or
Meta-SGD, inside any scikit-learn workflow.
"""

from __future__ import annotations

from metafit._version import __version__
from metafit.estimators import (  # noqa: E402
    MetaInitializedClassifier,
    MetaInitializedEstimator,
    MetaInitializedRegressor,
    NoMetaInitWarning,
)
from metafit.grouped import GroupedTable  # noqa: E402
from metafit.persistence import MetaInit  # noqa: E402
from metafit.tasks import (  # noqa: E402
    NWayKShotTasks,
    SinusoidTasks,
    Task,
    tasks_from_groups,
)
from metafit.training import (  # noqa: E402
    DivergenceError,
    InterruptedTrainingWarning,
    MetaHistory,
)

__all__ = [
    "DivergenceError",
    "GroupedTable",
    "InterruptedTrainingWarning",
    "MetaHistory",
    "MetaInit",
    "MetaInitializedClassifier",
    "MetaInitializedEstimator",
    "MetaInitializedRegressor",
    "NWayKShotTasks",
    "NoMetaInitWarning",
    "SinusoidTasks",
    "Task",
    "tasks_from_groups",
    "tune",
    "tuned_estimator",
    "__version__",
]


def __getattr__(name: str):
    # Optuna is imported only when tuning is used: the engine and the estimators stay
    # importable (and quick to import) without it.
    if name in ("tune", "tuned_estimator"):
        from metafit import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module 'metafit' has no attribute {name!r}")
