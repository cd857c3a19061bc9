"""iMAML: the proximal inner loop, and the implicit meta-gradient against finite
differences of the converged inner problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafit import MetaInitializedRegressor
from metafit.algorithms import IMAML
from metafit.functional import inner_loop, make_forward, make_grad_fn, reference_inner_loop
from metafit.learner import MetaLearner
from metafit.losses import mse_loss
from metafit.models import MLP
from metafit.tasks import SinusoidTasks


def _learner(steps=300, lr=0.05, lam=2.0, cg_steps=40, activation="tanh"):
    torch.manual_seed(0)
    net = MLP(1, 1, (6,), activation=activation)
    return MetaLearner(net, loss="mse", algorithm=IMAML(lam=lam, cg_steps=cg_steps),
                       inner_lr=lr, inner_steps=steps, dtype=torch.float64)


def _tasks(n=3):
    return SinusoidTasks(k_shot=8, k_query=8, random_state=4).sample(n)


@pytest.mark.parametrize("forward", ["mlp", "vmap"])
def test_the_proximal_inner_loop_matches_its_reference(forward):
    torch.manual_seed(1)
    net = MLP(1, 1, (5,)).double()
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    fwd = make_forward(net, forward)
    fast = inner_loop(fwd, mse_loss, params, X, y, steps=4, lr=0.1, track_graph=False,
                      shared=True, grad_fn=make_grad_fn(net, forward, mse_loss), proximal=3.0)
    batched = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in params.items()}
    ref = reference_inner_loop(fwd, mse_loss, batched, X, y, steps=4, lr=0.1, proximal=3.0)
    plain = reference_inner_loop(fwd, mse_loss, batched, X, y, steps=4, lr=0.1)
    for k in params:
        torch.testing.assert_close(fast[k], ref[k].detach(), rtol=1e-10, atol=1e-12)
    assert any(float((ref[k] - plain[k]).abs().max()) > 1e-3 for k in params)
    with pytest.raises(ValueError, match="proximal inner loop serves implicit"):
        inner_loop(fwd, mse_loss, params, X, y, steps=1, lr=0.1, create_graph=True,
                   shared=True, proximal=1.0)


def test_the_implicit_meta_gradient_matches_finite_differences_at_the_optimum():
    learner = _learner()
    tasks = _tasks()
    (batch,) = learner.batches(tasks)
    _, grads = learner.algorithm.meta_gradients(learner, [batch])
    theta = {k: v.detach().clone() for k, v in learner.params().items()}

    def meta_loss(shift):
        with torch.no_grad():
            for (k, p), d in zip(learner.module.named_parameters(), shift):
                p.copy_(theta[k] + d)
        phi = learner.adapt(batch.X_support, batch.y_support, track_graph=False)
        out = learner.forward(phi, batch.X_query)
        return float(mse_loss(out, batch.y_query).mean())

    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64)
                     for p in theta.values()]
        eps = 1e-5
        fd = (meta_loss([eps * d for d in direction])
              - meta_loss([-eps * d for d in direction])) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
        assert analytic == pytest.approx(fd, rel=2e-4, abs=1e-8)
    meta_loss([torch.zeros_like(p) for p in theta.values()])


def test_a_task_with_negative_curvature_falls_back_without_nan():
    learner = _learner(steps=1, lam=1e-3, cg_steps=10, activation="relu")
    tasks = SinusoidTasks(k_shot=5, k_query=5, random_state=0).sample(8)
    loss, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    assert np.isfinite(float(loss))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_imaml_in_the_estimator_fits_saves_and_keeps_no_inner_graph(tmp_path):
    est = MetaInitializedRegressor(algorithm=IMAML(lam=0.5), hidden_sizes=(16,),
                                   inner_lr=0.05, inner_steps=5, meta_batch_size=4,
                                   meta_iterations=30, random_state=0, verbose=0)
    est.meta_fit(SinusoidTasks(random_state=0))
    assert not IMAML().keeps_inner_graph  # the memory estimate treats it as flat
    task = SinusoidTasks(random_state=9).sample(1)[0]
    pred = est.fit(task.X_support, task.y_support).predict(task.X_query)
    path = tmp_path / "imaml.safetensors"
    est.save_meta_init(path)
    loaded = MetaInitializedRegressor(meta_init=path, hidden_sizes=(16,), inner_lr=0.05,
                                      inner_steps=5)
    np.testing.assert_allclose(loaded.fit(task.X_support, task.y_support).predict(task.X_query),
                               pred, rtol=1e-6)
    assert loaded._learner.algorithm == IMAML(lam=0.5)
    with pytest.raises(ValueError, match="lam must be a number > 0"):
        IMAML(lam=0)
