"""The validation tasks :func:`metafit.tune` holds out itself when it is given none.

A study needs tasks that meta-training never saw. Where ``tune`` meta-trains (an estimator
without an initialization in adaptation mode, every trial in meta mode), it can set them
aside first, the way ``meta_fit(X, y, groups=)`` does:

- from a :class:`~metafit.grouped.GroupedTable`: whole groups (the estimator's
  ``validation_fraction``, 0.2 when that is None or 0), one episode per held-out group and
  support size at the ends and middle of ``support_range``, the group's other rows as
  query; meta-training gets the other groups' rows;
- from a finite list of tasks: the same fraction of the tasks.

The split depends only on the data and the estimator's ``random_state`` (0 when that is
None), so that every worker of a shared study (``metafit tune --storage URL``) scores its
trials on the same tasks. Where the estimator already holds an initialization, or
``tasks`` is an endless sampler, nothing tells which tasks are new: the caller must pass
``validation_tasks``.
"""

from __future__ import annotations

import numpy as np

from metafit._checks import is_number
from metafit.estimators._params import PARAMETERS
from metafit.grouped import GroupedTable, check_table, split_groups, validation_episodes

__all__ = ["DEFAULT_FRACTION", "hold_out_validation"]

#: the fraction held out when the estimator's ``validation_fraction`` is None or 0
DEFAULT_FRACTION = 0.2


def hold_out_validation(estimator, tasks, *, initialized: bool):
    """``(meta-training data, validation tasks)`` split from ``tasks``.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
        Its ``validation_fraction``, ``support_range`` and ``random_state`` are read.
    tasks : GroupedTable or list of Task
    initialized : bool
        Whether the estimator to tune already holds an initialization (adaptation mode).

    Raises
    ------
    ValueError
        When the held-out tasks could overlap what meta-training saw, or too few groups
        or tasks remain on either side.
    """
    if initialized:
        raise ValueError(
            "validation_tasks is required for an estimator that is already meta-fitted: "
            "tune cannot tell which tasks its meta-training saw. Pass held-out tasks "
            "(e.g. metafit.tasks_from_groups on groups left out of meta_fit), or tune an "
            "estimator that is not meta-fitted yet with a GroupedTable or a list of "
            "tasks, from which tune holds out validation tasks itself."
        )
    params = estimator.get_params()
    for name in ("validation_fraction", "support_range"):  # read before meta_fit checks them
        PARAMETERS[name].check(name, params[name])
    # None or 0 hold nothing out of meta_fit's groups; tune needs some all the same
    fraction = params["validation_fraction"] or DEFAULT_FRACTION
    seed = params.get("random_state")
    rng = np.random.default_rng(seed if is_number(seed) else 0)
    if isinstance(tasks, GroupedTable):
        return _split_table(tasks, fraction, params["support_range"], rng)
    if isinstance(tasks, (list, tuple)):
        return _split_list(list(tasks), fraction, rng)
    raise ValueError(
        "validation_tasks is required with tasks that are neither a GroupedTable nor a "
        f"list (got {type(tasks).__name__}): tune holds out validation tasks only from "
        "finite data. Pass held-out tasks, e.g. SinusoidTasks(random_state=2).sample(100)."
    )


def _split_table(table: GroupedTable, fraction: float, support_range, rng):
    X, y = table.X, table.y
    if hasattr(X, "select_dtypes") and len(X.select_dtypes(exclude=["number", "bool"]).columns):
        bad = list(X.select_dtypes(exclude=["number", "bool"]).columns)[:3]
        raise ValueError(
            f"tune: X has non-numeric columns {bad}, which held-out tasks (numeric arrays) "
            "cannot carry; pass validation_tasks built from the held-out groups' encoded "
            "rows, or encode the columns before tuning."
        )
    Xa, ya, codes = check_table(X, y, table.groups, "tune")
    train, val = split_groups(codes, fraction, rng)
    if not val.any():
        raise ValueError(
            f"tune: the table has {len(np.unique(codes))} group(s); holding out validation "
            "groups needs at least 3. Pass validation_tasks."
        )
    lo, hi = support_range
    sizes = sorted({lo, (lo + hi + 1) // 2, hi})  # as meta_fit's held-out groups
    validation = validation_episodes(Xa[val], ya[val], codes[val], support_sizes=sizes,
                                     rng=rng)
    if not validation:
        raise ValueError(
            "tune: every held-out group has a single row, too few for an episode; pass "
            "validation_tasks."
        )
    rows = np.flatnonzero(train)
    X_train = X.iloc[rows] if hasattr(X, "iloc") else Xa[rows]
    y_train = y.iloc[rows] if hasattr(y, "iloc") else ya[rows]
    return GroupedTable(X_train, y_train, codes[rows]), validation


def _split_list(tasks: list, fraction: float, rng):
    if len(tasks) < 3:
        raise ValueError(
            f"tune: {len(tasks)} task(s) cannot be split into meta-training and validation "
            "tasks (at least 3 are needed); pass validation_tasks."
        )
    n_val = min(max(1, round(fraction * len(tasks))), len(tasks) - 2)
    held = set(rng.permutation(len(tasks))[:n_val].tolist())
    train = [t for i, t in enumerate(tasks) if i not in held]
    return train, [tasks[i] for i in sorted(held)]
