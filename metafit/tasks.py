"""Tasks, batches of tasks, and the built-in task sources (the documented module path).

The engine's types live in :mod:`metafit._task_types` (:class:`Task`, :class:`TaskBatch`,
:func:`iter_meta_batches`), the data sources in :mod:`metafit.task_sources`
(:class:`SinusoidTasks`, :class:`NWayKShotTasks`, :func:`tasks_from_groups`); both are
importable from here.

A *task* is one small supervised problem: a support set the learner adapts on and a
query set it is judged on. Meta-training consumes tasks meta-batch by meta-batch; a
:class:`TaskBatch` stacks the tasks of one meta-batch into tensors so that the engine can
vectorize over them, padding tasks of unequal sizes with row masks.
"""

from __future__ import annotations

from metafit._task_types import Task, TaskBatch, as_task, iter_meta_batches
from metafit.task_sources import NWayKShotTasks, SinusoidTasks, tasks_from_groups

__all__ = [
    "Task",
    "TaskBatch",
    "SinusoidTasks",
    "NWayKShotTasks",
    "tasks_from_groups",
    "as_task",
    "iter_meta_batches",
]
