"""Tasks, task batches and the built-in task sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metafit.tasks import (
    NWayKShotTasks,
    SinusoidTasks,
    Task,
    TaskBatch,
    as_task,
    iter_meta_batches,
    tasks_from_groups,
)


def _fit_sinusoid(x, y):
    """Amplitude and phase of y = A sin(x - phase) = A cos(p) sin(x) - A sin(p) cos(x)."""
    design = np.stack([np.sin(x), -np.cos(x)], 1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = np.abs(design @ np.array([a, b]) - y).max()
    return math.hypot(a, b), math.atan2(b, a), residual


# --------------------------------------------------------------------------- Task


def test_task_validation_messages():
    ok = (np.zeros((3, 2)), np.zeros(3), np.zeros((2, 2)), np.zeros(2))
    t = Task(*ok)
    assert (t.n_support, t.n_query, t.feature_shape) == (3, 2, (2,))
    assert [a.shape for a in t] == [(3, 2), (3,), (2, 2), (2,)]
    with pytest.raises(ValueError, match=r"support set: X must be at least 2-D.*reshape\(-1, 1\)"):
        Task(np.zeros(3), np.zeros(3), *ok[2:])
    with pytest.raises(ValueError, match="query set: X has 2 samples but y has shape"):
        Task(*ok[:3], np.zeros(3))
    with pytest.raises(ValueError, match="support set: X is empty"):
        Task(np.zeros((0, 2)), np.zeros(0), *ok[2:])
    bad = np.zeros((3, 2))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="support set: X contains NaN or infinity"):
        Task(bad, *ok[1:])
    with pytest.raises(ValueError, match="query set: y contains NaN"):
        Task(*ok[:3], np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="X must be real numbers"):
        Task(np.array([["a", "b"]] * 3), *ok[1:])
    with pytest.raises(ValueError, match=r"feature shape \(2,\) but query X has \(3,\)"):
        Task(*ok[:2], np.zeros((2, 3)), ok[3])
    with pytest.raises(ValueError, match="same targets"):
        Task(*ok[:3], np.zeros((2, 4)))


def test_task_from_tuple_and_as_task():
    arrays = (np.zeros((3, 1)), np.zeros(3), np.ones((2, 1)), np.ones(2))
    assert as_task(arrays).n_support == 3
    assert as_task(list(arrays)).n_query == 2
    t = Task(*arrays)
    assert as_task(t) is t
    with pytest.raises(ValueError, match="got 3 items"):
        Task.from_tuple(arrays[:3])
    with pytest.raises(TypeError, match="got dict"):
        as_task({"X": 1})


def test_task_batch_groups_ragged_tasks_and_keeps_positions():
    def task(n_s, n_q):
        return Task(np.zeros((n_s, 1)), np.zeros(n_s), np.zeros((n_q, 1)), np.zeros(n_q))

    tasks = [task(2, 3), task(4, 3), task(2, 3), task(4, 5)]
    batches = TaskBatch.from_tasks(tasks, dtype=torch.float64, target_dtype=torch.long)
    assert [b._index for b in batches] == [[0, 2], [1], [3]]
    assert [b.n_tasks for b in batches] == [2, 1, 1]
    assert batches[0].X_support.shape == (2, 2, 1) and batches[0].X_support.dtype == torch.float64
    assert batches[0].y_query.dtype == torch.long


def test_iter_meta_batches():
    arrays = (np.zeros((3, 1)), np.zeros(3), np.ones((2, 1)), np.ones(2))
    sizes = [len(b) for b in iter_meta_batches([arrays] * 7, 3)]
    assert sizes == [3, 3, 1]


# --------------------------------------------------------------------------- sinusoids


def test_sinusoid_tasks_are_the_finn_family():
    tasks = SinusoidTasks(k_shot=5, k_query=15, random_state=0).sample(200)
    amplitudes, phases = [], []
    for t in tasks:
        assert t.X_support.shape == (5, 1) and t.y_query.shape == (15,)
        x = np.concatenate([t.X_support[:, 0], t.X_query[:, 0]]).astype(np.float64)
        y = np.concatenate([t.y_support, t.y_query]).astype(np.float64)
        assert np.all((-5 <= x) & (x <= 5))
        amplitude, phase, residual = _fit_sinusoid(x, y)
        assert residual < 1e-5
        amplitudes.append(amplitude)
        phases.append(phase % (2 * np.pi))
    assert 0.1 <= min(amplitudes) and max(amplitudes) <= 5.0
    assert 0.0 <= min(phases) and max(phases) <= np.pi + 1e-6
    # Spread over the whole ranges (uniform), not a constant.
    assert np.std(amplitudes) > 1.0 and np.std(phases) > 0.6


def test_sinusoid_seeding():
    a = SinusoidTasks(random_state=3)
    first = a.sample(4)
    again = a.sample(4)
    assert all(np.array_equal(x.y_query, y.y_query) for x, y in zip(first, again))
    other = SinusoidTasks(random_state=4).sample(4)
    assert not np.array_equal(first[0].y_query, other[0].y_query)
    stream = iter(a)
    assert np.array_equal(next(stream).X_support, first[0].X_support)
    assert np.array_equal(next(iter(a)).X_support, first[0].X_support)  # replays
    assert np.array_equal(a.sample(1, random_state=9)[0].y_support, a.sample(1, 9)[0].y_support)
    assert len(a.sample_functions(3)) == 3


def test_sinusoid_sample_batch_is_vectorized_family_and_seeded():
    family = SinusoidTasks(k_shot=4, k_query=6)
    rng = np.random.default_rng(0)
    b1 = family.sample_batch(50, rng, dtype=torch.float64)
    b2 = family.sample_batch(50, rng)
    assert b1.X_support.shape == (50, 4, 1) and b1.y_query.shape == (50, 6)
    assert b1.X_support.dtype == torch.float64 and b2.X_support.dtype == torch.float32
    assert not torch.equal(b1.X_support.float(), b2.X_support)  # the stream advances
    again = family.sample_batch(50, np.random.default_rng(0), dtype=torch.float64)
    assert torch.equal(b1.y_query, again.y_query)
    for t in range(50):
        x = torch.cat([b1.X_support[t, :, 0], b1.X_query[t, :, 0]]).numpy()
        y = torch.cat([b1.y_support[t], b1.y_query[t]]).numpy()
        amplitude, phase, residual = _fit_sinusoid(x, y)
        assert residual < 1e-5 and 0.1 - 1e-6 <= amplitude <= 5.0 + 1e-6
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        family.sample_batch(0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k_shot": 0}, ValueError, "k_shot must be an int >= 1, got 0"),
        ({"k_query": 2.5}, TypeError, "k_query must be an int >= 1, got 2.5"),
        ({"amplitude_range": (5.0, 0.1)}, ValueError, "amplitude_range must be finite"),
        ({"input_range": (-np.inf, 1.0)}, ValueError, "input_range must be finite"),
    ],
)
def test_sinusoid_parameter_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SinusoidTasks(**kwargs)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        SinusoidTasks().sample(0)
    with pytest.raises(TypeError, match="n must be an int >= 1, got True"):
        SinusoidTasks().sample(True)


# --------------------------------------------------------------------------- N-way K-shot


def _labelled(n_classes=6, per_class=8):
    X = np.arange(n_classes * per_class, dtype=np.float32).reshape(-1, 1)
    y = np.repeat([f"c{i}" for i in range(n_classes)], per_class)
    return X, y


def test_nway_kshot_remaps_labels_per_episode():
    X, y = _labelled()
    sampler = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=4, random_state=0)
    seen = set()
    for task in sampler.sample(20):
        assert task.X_support.shape == (6, 1) and task.X_query.shape == (12, 1)
        assert list(task.y_support) == [0, 0, 1, 1, 2, 2]
        assert list(task.y_query) == [0] * 4 + [1] * 4 + [2] * 4
        rows_s = task.X_support[:, 0].astype(int)
        rows_q = task.X_query[:, 0].astype(int)
        assert not set(rows_s) & set(rows_q)
        for label in range(3):  # one original class per new label, in both sets
            original = {y[r] for r in rows_s[task.y_support == label]}
            original |= {y[r] for r in rows_q[task.y_query == label]}
            assert len(original) == 1
        seen.add(tuple(y[rows_s[::2]]))
    assert len(seen) > 5  # classes and their order vary between episodes


def test_nway_kshot_errors():
    X, y = _labelled(n_classes=3, per_class=5)
    with pytest.raises(ValueError, match="n_way=4 but the data has only 3 classes"):
        NWayKShotTasks(X, y, n_way=4, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="fewer than k_shot \\+ k_query = 6 examples"):
        NWayKShotTasks(X, y, n_way=2, k_shot=3, k_query=3)
    with pytest.raises(ValueError, match="n_way must be an int >= 2"):
        NWayKShotTasks(X, y, n_way=1, k_shot=1)
    with pytest.raises(ValueError, match=r"X must be \(n_samples, \.\.\.\)"):
        NWayKShotTasks(X[:, 0], y, n_way=2, k_shot=1)
    with pytest.raises(ValueError, match="finite"):
        NWayKShotTasks(np.full_like(X, np.nan), y, n_way=2, k_shot=1, k_query=1)


# --------------------------------------------------------------------------- groups


def test_tasks_from_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(["b", "a", "c"], [10, 4, 7])
    X = rng.normal(size=(21, 3))
    y = np.arange(21.0)
    tasks = tasks_from_groups(X, y, groups, support_size=0.5, random_state=0)
    assert [(t.n_support, t.n_query) for t in tasks] == [(2, 2), (5, 5), (4, 3)]  # sorted a, b, c
    for t, g in zip(tasks, ["a", "b", "c"]):
        rows = np.concatenate([t.y_support, t.y_query]).astype(int)
        assert set(groups[rows]) == {g}
        assert len(set(rows)) == len(rows)
    counted = tasks_from_groups(X, y, groups, support_size=4, random_state=0)
    assert [t.n_support for t in counted] == [4, 4]  # group "a" (4 rows) keeps no query
    again = tasks_from_groups(X, y, groups, support_size=4, random_state=0)
    assert np.array_equal(counted[0].y_query, again[0].y_query)
    with pytest.raises(ValueError, match="same length"):
        tasks_from_groups(X, y[:-1], groups)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\)"):
        tasks_from_groups(X, y, groups, support_size=1.5)
    with pytest.raises(TypeError, match="int or a float"):
        tasks_from_groups(X, y, groups, support_size="half")
    with pytest.raises(ValueError, match="support_size must be >= 1"):
        tasks_from_groups(X, y, groups, support_size=0)
    with pytest.raises(ValueError, match="no group has more than"):
        tasks_from_groups(X, y, groups, support_size=20)
    with pytest.raises(ValueError, match="X must be 2-D"):
        tasks_from_groups(X[:, 0], y, groups)


def test_task_batch_pads_tasks_that_differ_only_in_rows_and_masks_the_padding():
    rng = np.random.default_rng(0)
    tasks = [Task(rng.normal(size=(n_s, 2)), rng.normal(size=n_s), rng.normal(size=(n_q, 2)),
                  rng.normal(size=n_q)) for n_s, n_q in [(2, 5), (4, 1), (3, 3)]]
    other_features = Task(np.ones((2, 3)), np.ones(2), np.ones((1, 3)), np.ones(1))
    batches = TaskBatch.from_tasks([*tasks, other_features], dtype=torch.float64, pad=True)
    assert [b._index for b in batches] == [[0, 1, 2], [3]]  # features differ: not padded
    b = batches[0]
    assert b.X_support.shape == (3, 4, 2) and b.y_query.shape == (3, 5)
    assert b.support_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert b.query_mask.sum(1).tolist() == [5, 1, 3]
    for t, xs, yq in zip(tasks, b.X_support, b.y_query):  # real rows first, zeros after
        np.testing.assert_array_equal(xs[: t.n_support].numpy(), t.X_support)
        assert float(xs[t.n_support:].abs().sum()) == 0.0
        np.testing.assert_array_equal(yq[: t.n_query].numpy(), t.y_query)
    assert batches[1].support_mask is None and batches[1].query_mask is None
    part = b.take(1, 3)
    assert part._index == [1, 2] and part.support_mask.shape == (2, 4)
    # equal shapes need no masks; without pad, one batch per shape as before
    (same,) = TaskBatch.from_tasks([tasks[0], tasks[0]], pad=True)
    assert same.support_mask is None and same.query_mask is None
    assert len(TaskBatch.from_tasks(tasks)) == 3


# --------------------------------------------------------------------------- stacked sources


def _same_tasks(batch: TaskBatch, tasks: list[Task]) -> None:
    assert batch.n_tasks == len(tasks) == len(batch)
    for got, want in zip(batch, tasks):
        for name in ("X_support", "y_support", "X_query", "y_query"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape and a.dtype.kind == b.dtype.kind
            np.testing.assert_array_equal(a, b)  # the very same draws


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("size", [1, 4])
def test_sinusoid_meta_batches_are_the_tasks_of_iteration_in_order(seed, size):
    source = SinusoidTasks(3, 5, amplitude_range=(0.5, 2.0), input_range=(-1.0, 3.0),
                           random_state=seed)
    stream, batches = iter(source), source.meta_batches(size)
    for _ in range(3):
        batch = next(batches)
        assert batch.X_support.dtype == torch.float32 and batch.support_mask is None
        _same_tasks(batch, [next(stream) for _ in range(size)])


def test_nway_kshot_meta_batches_are_the_episodes_of_iteration_in_order():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2, 3))  # image-like trailing shape
    y = np.repeat(np.arange(6), 10)
    source = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=3, random_state=4)
    stream, batches = iter(source), source.meta_batches(5)
    for _ in range(2):
        batch = next(batches)
        assert tuple(batch.X_support.shape) == (5, 6, 2, 3)
        _same_tasks(batch, [next(stream) for _ in range(5)])


def test_iter_meta_batches_takes_a_sources_stacked_batches_only_when_asked():
    source = SinusoidTasks(2, 2, random_state=0)
    assert isinstance(next(iter_meta_batches(source, 3, stacked=True)), TaskBatch)
    plain = next(iter_meta_batches(source, 3))
    assert isinstance(plain, list) and len(plain) == 3
    _same_tasks(next(iter_meta_batches(source, 3, stacked=True)), plain)
    with pytest.raises(ValueError, match="size"):
        next(source.meta_batches(0))


def test_task_batch_as_a_sequence_of_tasks_select_and_to():
    tasks = [Task(np.full((n, 1), n, np.float32), np.arange(n, dtype=np.float32),
                  np.zeros((2, 1), np.float32), np.ones(2, np.float32)) for n in (2, 4, 3)]
    (batch,) = TaskBatch.from_tasks(tasks, pad=True)
    _same_tasks(batch, tasks)  # padding rows dropped again
    assert batch[-1].n_support == 3
    with pytest.raises(IndexError):
        batch[3]
    picked = batch.select([2, 0])
    _same_tasks(picked, [tasks[2], tasks[0]])
    assert picked.support_mask.shape == (2, 4)
    moved = batch.to("cpu", torch.float64, torch.long)
    assert moved.X_support.dtype == torch.float64 and moved.y_support.dtype == torch.long
    assert moved.support_mask.dtype == torch.float64
