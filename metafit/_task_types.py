"""The engine's task types: a task, a stacked batch of tasks, meta-batches of a stream.

A *task* is one small supervised problem: a support set the learner adapts on and a
query set it is judged on. Meta-training consumes tasks meta-batch by meta-batch; a
:class:`TaskBatch` stacks the tasks of one meta-batch into tensors so that the engine can
vectorize over them, padding tasks of unequal sizes with row masks (or, for networks with
batch statistics, one batch per shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from metafit import _torch_compat as compat

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

    Tasks share one tensor per field with a leading task dimension, which lets the engine
    vectorize over them. Tasks with different numbers of rows (real groups) are padded to
    the largest: ``support_mask`` and ``query_mask`` then hold 1 for a real row and 0 for
    padding, and every loss, gradient and sufficient statistic of the engine weighs rows by
    them, so a padded batch computes what the tasks computed one by one would. Without
    padding (``None`` masks) all rows are real.

    Parameters
    ----------
    X_support, y_support, X_query, y_query : torch.Tensor
        Stacked tensors with a leading task dimension.
    support_mask, query_mask : torch.Tensor of shape (T, n), optional
        Which rows are real (1) and which padding (0); None when none is padding.
    """

    X_support: torch.Tensor
    y_support: torch.Tensor
    X_query: torch.Tensor
    y_query: torch.Tensor
    _index: list[int] = field(default_factory=list, repr=False)
    support_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None

    @property
    def n_tasks(self) -> int:
        """Number of tasks in the batch."""
        return int(self.X_support.shape[0])

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, i: int) -> Task:
        """Task ``i`` as a :class:`Task` of numpy arrays (its real rows only)."""
        i = range(self.n_tasks)[i]

        def rows(x, mask):
            part = x[i] if mask is None else x[i][: int(mask[i].sum())]
            return part.detach().cpu().numpy()

        support, query = self.support_mask, self.query_mask
        return Task(rows(self.X_support, support), rows(self.y_support, support),
                    rows(self.X_query, query), rows(self.y_query, query))

    def __iter__(self) -> Iterator[Task]:
        """The tasks one by one (:meth:`__getitem__`): a batch serves as a sequence of
        tasks where one is read, e.g. to describe a meta-batch that diverged."""
        return (self[i] for i in range(self.n_tasks))

    def select(self, indices: Sequence[int]) -> TaskBatch:
        """The tasks at ``indices``, in that order (copies)."""
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.X_support.device)

        def part(t):
            return None if t is None else t.index_select(0, index)

        return TaskBatch(part(self.X_support), part(self.y_support), part(self.X_query),
                         part(self.y_query), [self._index[i] for i in indices] if self._index
                         else list(indices), part(self.support_mask), part(self.query_mask))

    def to(self, device, dtype: torch.dtype, target_dtype: torch.dtype) -> TaskBatch:
        """This batch on ``device``, inputs and masks in ``dtype``, targets in
        ``target_dtype`` (the tensors themselves where nothing changes)."""

        def move(t, dt):
            return None if t is None else t.to(device=device, dtype=dt)

        return TaskBatch(move(self.X_support, dtype), move(self.y_support, target_dtype),
                         move(self.X_query, dtype), move(self.y_query, target_dtype),
                         self._index, move(self.support_mask, dtype), move(self.query_mask, dtype))

    def take(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` of this batch (views, no copy)."""

        def part(mask):
            return None if mask is None else mask[start:stop]

        return TaskBatch(self.X_support[start:stop], self.y_support[start:stop],
                         self.X_query[start:stop], self.y_query[start:stop],
                         self._index[start:stop], part(self.support_mask),
                         part(self.query_mask))

    @staticmethod
    def gather(X: np.ndarray, y: np.ndarray, support: np.ndarray, query: np.ndarray
               ) -> TaskBatch:
        """Episodes of one table by row indices: task ``t`` has the support rows
        ``support[t]`` and the query rows ``query[t]`` of ``(X, y)`` (index arrays of shape
        (T, n_support) and (T, n_query)), gathered at once."""
        X, y = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(y))
        s, q = torch.from_numpy(support), torch.from_numpy(query)
        return TaskBatch(X[s], y[s], X[q], y[q], list(range(len(support))))

    @staticmethod
    def from_tasks(
        tasks: Sequence[Task],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        target_dtype: torch.dtype | None = None,
        pad: bool = False,
    ) -> list[TaskBatch]:
        """Stack tasks into as few batches as possible.

        Parameters
        ----------
        tasks : sequence of Task
            The tasks of one meta-batch.
        device, dtype : torch device and floating dtype of the inputs.
        target_dtype : torch.dtype, optional
            Dtype of the targets; defaults to ``dtype`` (use ``torch.long`` for class
            indices).
        pad : bool, default=False
            Pad tasks that differ only in their numbers of rows into one batch with row
            masks (for networks that treat rows independently: no BatchNorm). Without it,
            each distinct shape becomes its own batch.

        Returns
        -------
        list of TaskBatch
            One batch per distinct shape signature (per feature and target shape with
            ``pad``), in order of first appearance; each remembers the positions of its
            tasks in ``tasks``.
        """
        target_dtype = dtype if target_dtype is None else target_dtype
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tasks):
            if pad:  # rows may differ; what a row is may not
                key = (t.X_support.shape[1:], t.y_support.shape[1:])
            else:
                key = (t.X_support.shape, t.y_support.shape, t.X_query.shape,
                       t.y_query.shape)
            groups.setdefault(key, []).append(i)
        return [_stack([tasks[i] for i in index], index, device, dtype, target_dtype)
                for index in groups.values()]


def _stack(tasks, index, device, dtype, target_dtype) -> TaskBatch:
    """One batch of ``tasks`` (equal feature and target shapes), padded where rows differ."""
    fields = []
    masks = []
    for x_name, y_name in (("X_support", "y_support"), ("X_query", "y_query")):
        counts = [getattr(t, x_name).shape[0] for t in tasks]
        n = max(counts)
        mask = None
        if min(counts) != n:
            rows = torch.arange(n, device=device)
            mask = (rows < torch.tensor(counts, device=device)[:, None]).to(dtype)
        for name, dt in ((x_name, dtype), (y_name, target_dtype)):
            parts = [getattr(t, name) for t in tasks]
            first = parts[0]
            arr = np.zeros((len(parts), n, *first.shape[1:]), dtype=np.result_type(*parts))
            for j, part in enumerate(parts):
                arr[j, : part.shape[0]] = part
            fields.append(torch.as_tensor(arr, dtype=dt, device=device))
        masks.append(mask)
    return TaskBatch(*fields, list(index), *masks)


_FIELDS = ("X_support", "y_support", "X_query", "y_query")


def check_finite_batch(batch: TaskBatch) -> dict[str, float]:
    """Raise a ValueError if a stacked meta-batch holds NaN or infinity (what
    :class:`Task` checks task by task); return each field's largest magnitude.

    One reduction per tensor and a single synchronization for the four.
    """
    tensors = [getattr(batch, name) for name in _FIELDS]
    if all(t.numel() and t.is_floating_point() for t in tensors):
        largest = torch.stack(compat.foreach_norm(tensors, math.inf)).tolist()  # one kernel
    else:  # integer class labels, or an empty field (the inf-norm has no identity)
        largest = torch.stack([
            t.abs().amax().double() if t.numel() else t.new_zeros((), dtype=torch.float64)
            for t in tensors
        ]).tolist()
    for what, value in zip(_FIELDS, largest):
        if not np.isfinite(value):
            raise ValueError(
                f"a meta-batch's {what} contains NaN or infinity; clean or impute it first."
            )
    return dict(zip(_FIELDS, largest))


def iter_meta_batches(
    tasks: Iterable, batch_size: int, *, stacked: bool = False
) -> Iterator[list[Task] | TaskBatch]:
    """Yield lists of ``batch_size`` tasks (the last one may be shorter) from any iterable.

    With ``stacked``, a source that has a ``meta_batches(batch_size)`` method (the
    built-in samplers) yields its whole :class:`TaskBatch` es instead: the same tasks,
    drawn and stacked without one :class:`Task` object each (meta-training's data path).
    """
    if stacked and callable(getattr(tasks, "meta_batches", None)):
        yield from tasks.meta_batches(batch_size)
        return
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
