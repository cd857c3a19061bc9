"""Tests of the up-front memory estimate of second-order meta-training."""

from __future__ import annotations

import time

import pytest
import torch

from metafit import MetaInitializedRegressor, SinusoidTasks, _memory
from metafit._memory import check_inner_graph_memory, inner_graph_bytes
from metafit.models import MLP, Conv4


def _bytes(module, shape=(1,), **kw):
    args = {"n_support": 10, "n_query": 10, "n_tasks": 4, "steps": 5, **kw}
    return inner_graph_bytes(module, shape, **args)


def test_the_estimate_grows_with_steps_tasks_and_rows_and_leaves_the_module_alone():
    mlp = MLP(3, 1, hidden_sizes=(64, 64))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    one = _bytes(mlp, (3,), steps=1, n_query=0)
    assert one > 0
    assert _bytes(mlp, (3,), steps=10, n_query=0) == 10 * one
    assert _bytes(mlp, (3,), steps=1, n_tasks=8, n_query=0) == 2 * one
    assert _bytes(mlp, (3,), steps=1, n_support=20, n_query=0) > one
    # The adapted parameters alone, 4 tasks x 1 step x float32, are a lower bound.
    params = sum(p.numel() for p in mlp.parameters()) * 4
    assert one > 4 * params
    # Head-only adaptation keeps fewer parameters.
    head = [n for n, _ in mlp.named_parameters()][-2:]
    assert _bytes(mlp, (3,), adapted_names=head) < _bytes(mlp, (3,))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert next(mlp.parameters()).device.type == "cpu"


def test_conv4_is_measured_through_its_convolutions():
    small = _bytes(Conv4(5, hidden_channels=8), (1, 28, 28))
    large = _bytes(Conv4(5, hidden_channels=32), (1, 28, 28))
    assert 0 < small < large


def test_absurd_meta_inner_steps_are_refused_before_training():
    est = MetaInitializedRegressor(meta_iterations=1, meta_batch_size=25,
                                   meta_inner_steps=100_000, hidden_sizes=(400, 400))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"meta_inner_steps=100000 .* GiB.*fewer "
                       r"meta_inner_steps.*first-order.*Nothing was trained"):
        est.meta_fit(SinusoidTasks(k_shot=50, random_state=0))
    assert time.perf_counter() - start < 60  # refused up front, not after a long run
    assert not hasattr(est, "meta_init_")
    # First-order algorithms keep no graph across steps: not refused for memory.
    est.set_params(algorithm="reptile", meta_inner_steps=3).meta_fit(
        SinusoidTasks(k_shot=50, random_state=0))


def test_a_run_near_the_limit_warns_and_goes_on(monkeypatch):
    needed = _bytes(MLP(1, 1, hidden_sizes=(8,)), steps=2, n_tasks=2, n_support=5,
                    n_query=5)
    monkeypatch.setattr(_memory, "available_memory", lambda device: int(needed * 1.5))
    monkeypatch.setattr("metafit.estimators._meta_fit_run.available_memory",
                        lambda device: int(needed * 1.5))
    est = MetaInitializedRegressor(meta_iterations=2, meta_batch_size=2, inner_steps=2,
                                   hidden_sizes=(8,), random_state=0)
    with pytest.warns(ResourceWarning, match="more than half"):
        est.meta_fit(SinusoidTasks(k_shot=5, k_query=5, random_state=0))
    assert est.meta_init_.metadata["iteration"] == 2


def test_the_check_says_nothing_when_memory_is_unknown_or_ample():
    check_inner_graph_memory(10**15, None, steps=5, n_tasks=4, algorithm="maml")
    check_inner_graph_memory(10, 10**9, steps=5, n_tasks=4, algorithm="maml")
    with pytest.raises(ValueError, match="needs about"):
        check_inner_graph_memory(2 * 10**9, 10**9, steps=5, n_tasks=4, algorithm="maml")


def test_available_memory_of_the_cpu_is_known():
    free = _memory.available_memory("cpu")
    assert free is None or free > 0
    assert _memory.available_memory("meta") is None


def test_meta_batch_chunk_trains_the_same_and_fits_where_the_whole_batch_cannot(monkeypatch):
    kw = dict(meta_iterations=4, meta_batch_size=8, inner_steps=3, hidden_sizes=(16,),
              random_state=0, verbose=0)
    whole = MetaInitializedRegressor(**kw).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    chunked = MetaInitializedRegressor(**kw, meta_batch_chunk=3).meta_fit(
        SinusoidTasks(k_shot=5, random_state=0))
    for key, value in whole.meta_init_.tensors.items():
        torch.testing.assert_close(chunked.meta_init_.tensors[key], value, rtol=1e-4,
                                   atol=1e-6)
    one_task = _bytes(MLP(1, 1, hidden_sizes=(16,)), n_tasks=1, steps=3, n_support=5,
                      n_query=5)
    monkeypatch.setattr("metafit.estimators._meta_fit_run.available_memory",
                        lambda device: 5 * one_task)
    with pytest.raises(ValueError, match="meta_batch_chunk="):
        MetaInitializedRegressor(**kw).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    MetaInitializedRegressor(**kw, meta_batch_chunk=2).meta_fit(
        SinusoidTasks(k_shot=5, random_state=0))
