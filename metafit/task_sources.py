"""The built-in task sources: sinusoid regression, N-way K-shot episodes, grouped tables.

Each yields :class:`metafit.tasks.Task` objects: :class:`SinusoidTasks` and
:class:`NWayKShotTasks` endlessly and seeded, :func:`tasks_from_groups` once per group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from metafit._checks import check_int
from metafit._task_types import Task, TaskBatch, refuse_sparse

__all__ = ["NWayKShotTasks", "SinusoidTasks", "check_group_labels", "tasks_from_groups"]


def _rng(random_state) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    return np.random.default_rng(random_state)


class _TaskSource:
    """Shared behaviour of the endless, seeded task samplers."""

    def __init__(self, random_state):
        self.random_state = random_state

    def __iter__(self) -> Iterator[Task]:
        rng = _rng(self.random_state)
        while True:
            yield self._sample_one(rng)

    def sample(self, n: int, random_state=None) -> list[Task]:
        """Return ``n`` tasks.

        Parameters
        ----------
        n : int
            Number of tasks.
        random_state : int, numpy Generator or None, optional
            Seed for this draw; defaults to the sampler's own ``random_state``, so two
            calls with the same seed return the same tasks.
        """
        n = check_int("n", n)
        rng = _rng(self.random_state if random_state is None else random_state)
        return [self._sample_one(rng) for _ in range(int(n))]

    def _sample_one(self, rng: np.random.Generator) -> Task:  # pragma: no cover - abstract
        raise NotImplementedError


class SinusoidTasks(_TaskSource):
    """The sinusoid regression family of Finn et al. (2017).

    Each task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
    ``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``.

    Parameters
    ----------
    k_shot : int, default=10
        Support points per task.
    k_query : int, default=10
        Query points per task.
    amplitude_range, phase_range, input_range : tuple of float
        Ranges of the uniform distributions above.
    random_state : int, numpy Generator or None, default=None
        Seed of the endless stream; iterating twice with an int seed replays the same
        tasks.

    Examples
    --------
    >>> tasks = SinusoidTasks(k_shot=5, random_state=0)
    >>> task = next(iter(tasks))
    >>> task.X_support.shape, task.y_query.shape
    ((5, 1), (10,))
    """

    def __init__(
        self,
        k_shot: int = 10,
        k_query: int = 10,
        *,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
        random_state=None,
    ):
        super().__init__(random_state)
        self.k_shot = check_int("k_shot", k_shot)
        self.k_query = check_int("k_query", k_query)
        if self.k_shot + self.k_query > 10_000_000:
            raise ValueError(
                f"k_shot + k_query = {self.k_shot + self.k_query:,} points per task is beyond "
                "any few-shot task; use at most a few thousand."
            )
        for name, (lo, hi) in [
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("input_range", input_range),
        ]:
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"{name} must be finite (low, high) with low <= high.")
        self.amplitude_range = tuple(amplitude_range)
        self.phase_range = tuple(phase_range)
        self.input_range = tuple(input_range)

    def _sample_one(self, rng: np.random.Generator) -> Task:
        amplitude = rng.uniform(*self.amplitude_range)
        phase = rng.uniform(*self.phase_range)
        x = rng.uniform(*self.input_range, size=(self.k_shot + self.k_query, 1))
        y = amplitude * np.sin(x[:, 0] - phase)
        x, y = x.astype(np.float32), y.astype(np.float32)
        k = self.k_shot
        info = {"function": "sinusoid", "amplitude": float(amplitude), "phase": float(phase)}
        return Task(x[:k], y[:k], x[k:], y[k:], info=info)

    def meta_batches(self, size: int) -> Iterator[TaskBatch]:
        """The endless stream of :meth:`__iter__` as meta-batches of ``size`` tasks.

        The very tasks iteration yields, in the same order (the same draws from the same
        seed), stacked as float32 tensors without a :class:`Task` object each: what
        ``meta_fit`` reads from this source. Unlike :meth:`sample_batch`, which draws
        in another order.
        """
        size = check_int("size", size)
        rng = _rng(self.random_state)
        n, k = self.k_shot + self.k_query, self.k_shot

        def scaled(u, bounds):  # what Generator.uniform computes from the same doubles
            return bounds[0] + (bounds[1] - bounds[0]) * u

        while True:
            # _sample_one draws amplitude, phase and n inputs per task: one row each here
            u = rng.random((size, 2 + n))
            amplitude = scaled(u[:, :1], self.amplitude_range)
            phase = scaled(u[:, 1:2], self.phase_range)
            x = scaled(u[:, 2:], self.input_range)
            y = (amplitude * np.sin(x - phase)).astype(np.float32)
            x = x.astype(np.float32)[:, :, None]
            yield TaskBatch(torch.from_numpy(x[:, :k].copy()), torch.from_numpy(y[:, :k].copy()),
                            torch.from_numpy(x[:, k:].copy()), torch.from_numpy(y[:, k:].copy()),
                            list(range(size)))

    def sample_batch(
        self,
        n: int,
        random_state=None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TaskBatch:
        """Draw ``n`` tasks straight into one :class:`TaskBatch`, vectorized.

        Much faster than ``TaskBatch.from_tasks(self.sample(n))`` (no per-task objects),
        which matters when sampling is as costly as a meta-step. The draws come in another
        order than :meth:`sample`'s, so the tasks differ from those of the same seed there.

        Parameters
        ----------
        n : int
            Number of tasks.
        random_state : int, numpy Generator or None, optional
            Defaults to the sampler's own ``random_state``; pass one numpy Generator to
            successive calls for a seeded stream of batches.
        device, dtype : torch device and floating dtype of the tensors.
        """
        n = check_int("n", n)
        rng = _rng(self.random_state if random_state is None else random_state)
        amplitude = rng.uniform(*self.amplitude_range, size=(n, 1))
        phase = rng.uniform(*self.phase_range, size=(n, 1))
        x = rng.uniform(*self.input_range, size=(n, self.k_shot + self.k_query))
        y = amplitude * np.sin(x - phase)
        k = self.k_shot

        def tensor(a):
            return torch.as_tensor(a.astype(np.float32), device=device).to(dtype)

        return TaskBatch(
            tensor(x[:, :k, None]),
            tensor(y[:, :k]),
            tensor(x[:, k:, None]),
            tensor(y[:, k:]),
            list(range(n)),
        )

    def sample_functions(self, n: int, random_state=None) -> list[tuple[float, float]]:
        """Return ``n`` (amplitude, phase) pairs, for plots of the true functions."""
        rng = _rng(self.random_state if random_state is None else random_state)
        return [
            (rng.uniform(*self.amplitude_range), rng.uniform(*self.phase_range))
            for _ in range(n)
        ]


class NWayKShotTasks(_TaskSource):
    """Episodic N-way K-shot classification tasks over any labelled data set.

    Each episode draws ``n_way`` classes, then ``k_shot`` support and ``k_query`` query
    examples of each; labels are remapped to ``0..n_way-1`` in the order the classes were
    drawn, so no episode reveals the original label.

    Parameters
    ----------
    X : array-like of shape (n_samples, ...)
        Inputs (any trailing shape, e.g. images).
    y : array-like of shape (n_samples,)
        Class labels of any hashable kind.
    n_way : int
        Classes per episode.
    k_shot : int
        Support examples per class.
    k_query : int, default=15
        Query examples per class.
    random_state : int, numpy Generator or None, default=None
        Seed of the endless stream.

    Raises
    ------
    ValueError
        If there are fewer than ``n_way`` classes with at least ``k_shot + k_query``
        examples each.
    """

    def __init__(self, X, y, n_way: int, k_shot: int, k_query: int = 15, *, random_state=None):
        super().__init__(random_state)
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim < 2 or X.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(
                f"X must be (n_samples, ...) and y (n_samples,), got {X.shape} and {y.shape}."
            )
        if not np.issubdtype(X.dtype, np.number) or not np.all(np.isfinite(X)):
            raise ValueError("X must be finite real numbers.")
        self.n_way = check_int("n_way", n_way, minimum=2)
        self.k_shot = check_int("k_shot", k_shot)
        self.k_query = check_int("k_query", k_query)
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        need = self.k_shot + self.k_query
        if len(classes) < self.n_way:
            raise ValueError(
                f"n_way={self.n_way} but the data has only {len(classes)} classes; "
                "lower n_way or add classes."
            )
        too_small = classes[counts < need]
        if len(too_small):
            raise ValueError(
                f"{len(too_small)} classes have fewer than k_shot + k_query = {need} examples "
                f"(e.g. class {too_small[0]!r} has {counts[counts < need][0]}); lower k_shot "
                "or k_query, or drop those classes."
            )
        self.X = X
        self.classes_ = classes
        order = np.argsort(inverse, kind="stable")
        self._by_class = np.split(order, np.cumsum(counts)[:-1])

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One episode's rows of ``X``: ``(support (n_way, k_shot), query (n_way,
        k_query))``, class by class in the order the classes were drawn."""
        chosen = rng.choice(len(self._by_class), size=self.n_way, replace=False)
        picked = np.stack([
            rng.choice(self._by_class[c], size=self.k_shot + self.k_query, replace=False)
            for c in chosen
        ])
        return picked[:, : self.k_shot], picked[:, self.k_shot :]

    def _sample_one(self, rng: np.random.Generator) -> Task:
        support, query = self._draw(rng)
        ys = np.repeat(np.arange(self.n_way), self.k_shot)
        yq = np.repeat(np.arange(self.n_way), self.k_query)
        Xs = self.X[support.reshape(-1)].astype(np.float32, copy=False)
        Xq = self.X[query.reshape(-1)].astype(np.float32, copy=False)
        return Task(Xs, ys, Xq, yq)

    def meta_batches(self, size: int) -> Iterator[TaskBatch]:
        """The endless stream of :meth:`__iter__` as meta-batches of ``size`` episodes.

        The same episodes in the same order (the same draws from the same seed), drawn
        as index arrays and gathered from ``X`` once per meta-batch, without a
        :class:`Task` object each: what ``meta_fit`` reads from this source.
        """
        size = check_int("size", size)
        rng = _rng(self.random_state)
        way, trailing = self.n_way, self.X.shape[1:]
        ys = torch.from_numpy(np.tile(np.repeat(np.arange(way), self.k_shot), (size, 1)))
        yq = torch.from_numpy(np.tile(np.repeat(np.arange(way), self.k_query), (size, 1)))

        def gather(index):  # (size, n_way, n) rows -> (size, n_way * n, *trailing)
            rows = self.X[index.reshape(-1)].astype(np.float32, copy=False)
            return torch.from_numpy(rows.reshape(size, -1, *trailing))

        while True:
            support, query = zip(*(self._draw(rng) for _ in range(size)))
            yield TaskBatch(gather(np.stack(support)), ys, gather(np.stack(query)), yq,
                            list(range(size)))


def check_group_labels(groups) -> None:
    """Every row needs a group: None and NaN labels are refused, naming the first row.

    ``groups`` is an array or a list of labels (tuples stay whole in a list)."""
    labels = groups.tolist() if isinstance(groups, np.ndarray) else groups
    missing = [
        i for i, g in enumerate(labels)
        if g is None or (isinstance(g, float) and g != g)
    ]
    if missing:
        raise ValueError(
            f"groups has {len(missing)} missing label(s) (None or NaN), the first at row "
            f"{missing[0]}; every row needs its group: drop those rows or give them a label."
        )


def tasks_from_groups(
    X,
    y,
    groups,
    *,
    support_size: int | float = 0.5,
    min_query: int = 1,
    random_state=None,
) -> list[Task]:
    """Turn an ordinary table with a group column into one task per group.

    This is the usual shape of a scikit-learn user's data: one row per observation and a
    column naming the customer, site or sensor it belongs to. Each group's rows are
    shuffled and split into a support and a query set.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Features.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Targets.
    groups : array-like of shape (n_samples,)
        Group label of each row.
    support_size : int or float, default=0.5
        Support examples per task: an int is a count, a float in (0, 1) a fraction of the
        group's rows.
    min_query : int, default=1
        Groups that would keep fewer query rows than this are skipped.
    random_state : int, numpy Generator or None, default=None
        Seed of the shuffles.

    Returns
    -------
    list of Task
        One task per group large enough, in sorted group order. Tasks may differ in size.

    Raises
    ------
    ValueError
        If the arrays disagree in length, or no group is large enough.
    """
    refuse_sparse("tasks_from_groups", X=X, y=y, groups=groups)
    X = np.asarray(X)
    y = np.asarray(y)
    groups = np.asarray(groups)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}.")
    if not (len(X) == len(y) == len(groups)):
        raise ValueError(
            f"X, y and groups must have the same length, got {len(X)}, {len(y)}, {len(groups)}."
        )
    check_group_labels(groups)
    if isinstance(support_size, bool) or not isinstance(
        support_size, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"support_size must be an int or a float, got {support_size!r}.")
    if isinstance(support_size, (float, np.floating)) and not 0 < support_size < 1:
        raise ValueError(f"a fractional support_size must lie in (0, 1), got {support_size}.")
    if isinstance(support_size, (int, np.integer)) and support_size < 1:
        raise ValueError(f"support_size must be >= 1, got {support_size}.")
    rng = _rng(random_state)
    tasks = []
    for g in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == g))
        if isinstance(support_size, (int, np.integer)):
            k = int(support_size)
        else:
            k = max(1, int(round(support_size * len(rows))))
        if len(rows) - k < min_query:
            continue
        tasks.append(Task(X[rows[:k]], y[rows[:k]], X[rows[k:]], y[rows[k:]]))
    if not tasks:
        raise ValueError(
            f"no group has more than support_size={support_size} + min_query={min_query} rows; "
            "lower support_size or collect more rows per group."
        )
    return tasks
