"""The engine's task types: a task, a stacked batch of tasks, meta-batches of a stream.

A *task* is one small supervised problem: a support set the learner adapts on and a
query set it is judged on. Meta-training consumes tasks meta-batch by meta-batch; a
:class:`TaskBatch` stacks the tasks of one meta-batch into tensors so that the engine can
vectorize over them, and splits a ragged batch into groups of equal shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Task", "TaskBatch", "as_task", "chunk_batches", "iter_meta_batches"]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def refuse_sparse(where: str, **arrays) -> None:
    """Raise a TypeError naming the array if one of ``arrays`` is a scipy.sparse matrix.

    ``np.asarray`` would wrap a sparse matrix in a 0-d object array and the error would
    come later as "got shape ()".
    """
    for what, value in arrays.items():
        if hasattr(value, "toarray") and hasattr(value, "nnz"):
            raise TypeError(
                f"{where}: {what} is a sparse matrix; few-shot tasks are small, pass a dense "
                f"array ({what}.toarray())."
            )


def _check_part(name: str, X, y) -> tuple[np.ndarray, np.ndarray]:
    refuse_sparse(name, X=X, y=y)
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2:
        raise ValueError(
            f"{name}: X must be at least 2-D (n_samples, n_features), got shape {X.shape}; "
            "reshape a single feature with X.reshape(-1, 1)."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name}: X is empty (0 samples); every task needs examples.")
    if y.ndim == 0 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name}: X has {X.shape[0]} samples but y has shape {y.shape}; they must match."
        )
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{name}: X must be real numbers, got dtype {X.dtype}.")
    for what, value in (("X", X), ("y", y)):
        if value.dtype.kind not in "fc" or not value.size:
            continue  # integers and booleans are finite
        # One pass for both checks: the largest |value| is NaN or inf if any entry is.
        largest = float(np.max(np.abs(value)))
        if not np.isfinite(largest):
            raise ValueError(f"{name}: {what} contains NaN or infinity; clean or impute it first.")
        if value.dtype.itemsize > 4 and largest > _FLOAT32_MAX:
            raise ValueError(
                f"{name}: {what} reaches {largest:.3g}, beyond float32's range "
                f"({_FLOAT32_MAX:.3g}), in which metafit computes; rescale it (e.g. "
                "StandardScaler, or a change of units)."
            )
    return X, y


@dataclass(frozen=True)
class Task:
    """One few-shot task: a support set to adapt on and a query set to evaluate on.

    Parameters
    ----------
    X_support : array-like of shape (n_support, ...)
        Support inputs, at least 2-D.
    y_support : array-like of shape (n_support,) or (n_support, n_outputs)
        Support targets.
    X_query : array-like of shape (n_query, ...)
        Query inputs, with the same trailing shape as ``X_support``.
    y_query : array-like of shape (n_query,) or (n_query, n_outputs)
        Query targets.
    info : dict, optional
        What is known about the task beyond its data, e.g. the amplitude and phase of a
        :class:`~metafit.tasks.SinusoidTasks` task (the plots draw its true curve). Not
        compared, not part of the 4-tuple.

    Raises
    ------
    ValueError
        If an array is empty, not finite, X is not at least 2-D, lengths differ, or the
        support and query sets disagree on the feature shape.

    Examples
    --------
    >>> import numpy as np
    >>> t = Task(np.zeros((5, 1)), np.zeros(5), np.ones((3, 1)), np.ones(3))
    >>> t.n_support, t.n_query
    (5, 3)
    """

    X_support: np.ndarray
    y_support: np.ndarray
    X_query: np.ndarray
    y_query: np.ndarray
    info: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        Xs, ys = _check_part("support set", self.X_support, self.y_support)
        Xq, yq = _check_part("query set", self.X_query, self.y_query)
        if Xs.shape[1:] != Xq.shape[1:]:
            raise ValueError(
                f"support X has feature shape {Xs.shape[1:]} but query X has {Xq.shape[1:]}; "
                "both sets of a task must have the same features."
            )
        if ys.shape[1:] != yq.shape[1:]:
            raise ValueError(
                f"support y has shape {ys.shape[1:]} per sample but query y has "
                f"{yq.shape[1:]}; both sets of a task must have the same targets."
            )
        object.__setattr__(self, "X_support", Xs)
        object.__setattr__(self, "y_support", ys)
        object.__setattr__(self, "X_query", Xq)
        object.__setattr__(self, "y_query", yq)

    @classmethod
    def from_tuple(cls, data: Sequence) -> Task:
        """Build a task from ``(X_support, y_support, X_query, y_query)``."""
        if len(data) != 4:
            raise ValueError(
                "a task tuple must be (X_support, y_support, X_query, y_query); "
                f"got {len(data)} items."
            )
        return cls(*data)

    @property
    def n_support(self) -> int:
        """Number of support examples."""
        return int(self.X_support.shape[0])

    @property
    def n_query(self) -> int:
        """Number of query examples."""
        return int(self.X_query.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.X_support.shape[1:])

    def __iter__(self):
        return iter((self.X_support, self.y_support, self.X_query, self.y_query))


def as_task(obj) -> Task:
    """Return ``obj`` as a :class:`Task`, accepting a task or a 4-tuple.

    Raises
    ------
    TypeError
        If ``obj`` is neither a task nor a sequence of four arrays.
    """
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, (tuple, list)):
        return Task.from_tuple(obj)
    raise TypeError(
        f"expected a metafit.tasks.Task or a 4-tuple (X_support, y_support, X_query, "
        f"y_query), got {type(obj).__name__}."
    )


@dataclass
class TaskBatch:
    """A meta-batch of tasks stacked as tensors.

    Tasks of equal shapes share one tensor per field with a leading task dimension, which
    lets the engine vectorize over tasks. A ragged batch is kept as several groups of
    equal shape (:meth:`groups`), each vectorized on its own.

    Parameters
    ----------
    X_support, y_support, X_query, y_query : torch.Tensor
        Stacked tensors with a leading task dimension.
    """

    X_support: torch.Tensor
    y_support: torch.Tensor
    X_query: torch.Tensor
    y_query: torch.Tensor
    _index: list[int] = field(default_factory=list, repr=False)

    @property
    def n_tasks(self) -> int:
        """Number of tasks in the batch."""
        return int(self.X_support.shape[0])

    def take(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` of this batch (views, no copy)."""
        return TaskBatch(self.X_support[start:stop], self.y_support[start:stop],
                         self.X_query[start:stop], self.y_query[start:stop])

    @staticmethod
    def from_tasks(
        tasks: Sequence[Task],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        target_dtype: torch.dtype | None = None,
    ) -> list[TaskBatch]:
        """Stack tasks into as few equal-shape batches as possible.

        Parameters
        ----------
        tasks : sequence of Task
            The tasks of one meta-batch.
        device, dtype : torch device and floating dtype of the inputs.
        target_dtype : torch.dtype, optional
            Dtype of the targets; defaults to ``dtype`` (use ``torch.long`` for class
            indices).

        Returns
        -------
        list of TaskBatch
            One batch per distinct shape signature, in order of first appearance; each
            remembers the positions of its tasks in ``tasks``.
        """
        target_dtype = dtype if target_dtype is None else target_dtype
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tasks):
            key = (t.X_support.shape, t.y_support.shape, t.X_query.shape, t.y_query.shape)
            groups.setdefault(key, []).append(i)
        out = []
        for index in groups.values():
            def stack(attr, dt, index=index):
                arr = np.stack([getattr(tasks[i], attr) for i in index])
                return torch.as_tensor(arr, dtype=dt, device=device)

            out.append(
                TaskBatch(
                    stack("X_support", dtype),
                    stack("y_support", target_dtype),
                    stack("X_query", dtype),
                    stack("y_query", target_dtype),
                    list(index),
                )
            )
        return out


def iter_meta_batches(tasks: Iterable, batch_size: int) -> Iterator[list[Task]]:
    """Yield lists of ``batch_size`` tasks (the last one may be shorter) from any iterable."""
    batch: list[Task] = []
    for obj in tasks:
        batch.append(as_task(obj))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def chunk_batches(batches: list[TaskBatch], size: int) -> list[list[TaskBatch]]:
    """Split equal-shape groups into chunks of at most ``size`` tasks each."""
    chunks: list[list[TaskBatch]] = [[]]
    room = size
    for batch in batches:
        start = 0
        while start < batch.n_tasks:
            if room == 0:
                chunks.append([])
                room = size
            stop = min(batch.n_tasks, start + room)
            chunks[-1].append(batch.take(start, stop))
            room -= stop - start
            start = stop
    return chunks
