"""Few-shot tasks from scikit-learn's bundled 8x8 digits (no download).

A small, fast N-way K-shot source for tests, examples and smoke runs; it is not a
benchmark (10 classes of ~180 images each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metafit.task_sources import NWayKShotTasks

__all__ = ["load_digits_tasks", "load_digits_split"]

_SPLITS = ("train", "test", "all")


def load_digits_split(
    split: str = "train",
    *,
    split_by: str = "class",
    test_classes: Sequence[int] = (5, 6, 7, 8, 9),
    as_images: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(X, y)`` of one split of the digits data.

    Parameters
    ----------
    split : {"train", "test", "all"}, default="train"
        Which part.
    split_by : {"class", "sample"}, default="class"
        ``"class"``: the test split holds the digits in ``test_classes`` and the train
        split the others, so test tasks show unseen classes (the meta-learning setting).
        ``"sample"``: both splits hold all 10 digits; each digit's images are shuffled
        with a fixed seed (0) and halved, the first half for train, the second for test.
    test_classes : sequence of int, default=(5, 6, 7, 8, 9)
        Digits held out for testing when ``split_by="class"``.
    as_images : bool, default=False
        Return X as images ``(n, 1, 8, 8)`` instead of flat ``(n, 64)``.

    Returns
    -------
    X : ndarray, float32 in [0, 1]
    y : ndarray of shape (n,), int64
        The digit of each row.
    """
    from sklearn.datasets import load_digits

    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    if split_by not in ("class", "sample"):
        raise ValueError(f"split_by must be 'class' or 'sample', got {split_by!r}.")
    test = np.unique(np.asarray(test_classes))
    if split_by == "class" and (
        test.size == 0 or test.size == 10 or not np.isin(test, np.arange(10)).all()
    ):
        raise ValueError(
            f"test_classes must be some but not all of the digits 0..9, got {test_classes!r}."
        )
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if split != "all":
        if split_by == "class":
            keep = np.isin(y, test) == (split == "test")
        else:
            rng = np.random.default_rng(0)
            keep = np.zeros(len(y), dtype=bool)
            for c in range(10):
                rows = rng.permutation(np.flatnonzero(y == c))
                half = rows[: len(rows) // 2] if split == "train" else rows[len(rows) // 2 :]
                keep[half] = True
        X, y = X[keep], y[keep]
    if as_images:
        X = X.reshape(-1, 1, 8, 8)
    return X, y


def load_digits_tasks(
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 5,
    split: str = "train",
    random_state=None,
    *,
    split_by: str = "class",
    test_classes: Sequence[int] = (5, 6, 7, 8, 9),
    as_images: bool = False,
) -> NWayKShotTasks:
    """N-way K-shot tasks over scikit-learn's 8x8 digits.

    Parameters
    ----------
    n_way, k_shot, k_query : int
        Classes per task, support and query examples per class. With the default class
        split each split has 5 digits, so ``n_way <= 5``; with ``split_by="sample"``
        ``n_way <= 10``.
    split : {"train", "test", "all"}, default="train"
        See :func:`load_digits_split`.
    random_state : int, numpy Generator or None
        Seed of the task stream.
    split_by, test_classes, as_images
        See :func:`load_digits_split`.

    Returns
    -------
    NWayKShotTasks
        X of shape ``(n_way * k, 64)`` (or ``(n_way * k, 1, 8, 8)``), labels ``0..n_way-1``.

    Examples
    --------
    >>> tasks = load_digits_tasks(n_way=5, k_shot=1, k_query=5, random_state=0)
    >>> task = tasks.sample(1)[0]
    >>> task.X_support.shape, task.X_query.shape
    ((5, 64), (25, 64))
    """
    X, y = load_digits_split(
        split, split_by=split_by, test_classes=test_classes, as_images=as_images
    )
    n_classes = len(np.unique(y))
    if isinstance(n_way, (int, np.integer)) and not isinstance(n_way, bool) and n_way > n_classes:
        raise ValueError(
            f"n_way={n_way} but the {split!r} split (split_by={split_by!r}) has only "
            f"{n_classes} digits; lower n_way, change test_classes, or use "
            "split_by='sample' (10 digits in each split)."
        )
    return NWayKShotTasks(X, y, n_way, k_shot, k_query, random_state=random_state)
