"""MetaLearner: adaptation, evaluation, meta-steps, state and hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.tasks import SinusoidTasks, Task


def learner(algorithm="maml", forward="auto", dtype=torch.float64, steps=2, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(1, 1, (16, 16))
    return MetaLearner(
        net, loss="mse", algorithm=algorithm, inner_lr=0.02, inner_steps=steps,
        forward=forward, dtype=dtype, **kw,
    )


TASKS = SinusoidTasks(5, 5, random_state=0).sample(6)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "anil", "metasgd"])
def test_forward_strategies_give_the_same_meta_steps(algorithm):
    results = []
    for forward in ("mlp", "vmap", "loop"):
        ml = learner(algorithm, forward)
        ml.init_optimizer(None, 10)
        losses = [ml.meta_step(ml.batches(TASKS)) for _ in range(3)]
        results.append((losses, ml.state_tensors()))
    for losses, state in results[1:]:
        np.testing.assert_allclose(losses, results[0][0], rtol=1e-9)
        for k, v in state.items():
            torch.testing.assert_close(v, results[0][1][k], rtol=1e-6, atol=1e-9)


def test_meta_training_reduces_the_post_adaptation_loss():
    ml = learner("maml", dtype=torch.float32, steps=1)
    ml.init_optimizer(3e-3, 150)
    held_out = SinusoidTasks(5, 20, random_state=1).sample(40)
    before = ml.evaluate(held_out)
    rng = np.random.default_rng(2)
    family = SinusoidTasks(5, 5)
    for _ in range(150):
        ml.meta_step([family.sample_batch(10, rng)])
    assert ml.evaluate(held_out) < 0.9 * before


def test_evaluate_and_predict_match_a_manual_computation():
    ml = learner()
    X, y = ml.as_tensors(
        np.stack([t.X_support for t in TASKS]), np.stack([t.y_support for t in TASKS])
    )
    phi = ml.adapt(X, y, track_graph=False, steps=3)
    assert all(v.shape[0] == len(TASKS) and not v.requires_grad for v in phi.values())
    Xq = torch.as_tensor(np.stack([t.X_query for t in TASKS]), dtype=torch.float64)
    yq = torch.as_tensor(np.stack([t.y_query for t in TASKS]), dtype=torch.float64)
    pred = ml.predict(phi, Xq)
    assert not pred.requires_grad
    want = float(((pred[..., 0] - yq) ** 2).mean())
    assert ml.evaluate(TASKS, steps=3) == pytest.approx(want, rel=1e-12)
    # Ragged evaluation averages over tasks, not over groups.
    ragged = [*TASKS[:2], Task(TASKS[2].X_support[:3], TASKS[2].y_support[:3], *list(TASKS[2])[2:])]
    per_task = [ml.evaluate([t]) for t in ragged]
    assert ml.evaluate(ragged) == pytest.approx(np.mean(per_task), rel=1e-12)


def test_adapt_works_under_no_grad_and_with_autograd_inner_gradient():
    a, b = learner(), learner(inner_grad="autograd")
    assert b.grad_fn is None and a.grad_fn is not None
    batch = a.batches(TASKS)[0]
    with torch.no_grad():
        pa = a.adapt(batch.X_support, batch.y_support, track_graph=False)
        pb = b.adapt(batch.X_support, batch.y_support, track_graph=False)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="inner_grad must be 'auto' or 'autograd'"):
        learner(inner_grad="analytic")


def test_state_tensors_round_trip_keeps_optimizer_references():
    ml = learner("metasgd")
    ml.init_optimizer(1e-2, 5)
    state = ml.state_tensors()
    assert any(k.startswith("extra.inner_lr.") for k in state)
    ml.meta_step(ml.batches(TASKS))
    changed = ml.state_tensors()
    assert any(not torch.equal(state[k], changed[k]) for k in state)
    ids = [id(p) for p in ml.meta_parameters()]
    ml.load_state_tensors(state)
    assert [id(p) for p in ml.meta_parameters()] == ids
    for k, v in ml.state_tensors().items():
        assert torch.equal(v, state[k])


def test_meta_step_hooks_clipping_and_errors():
    ml = learner()
    with pytest.raises(RuntimeError, match="init_optimizer"):
        ml.meta_step(ml.batches(TASKS))
    ml.init_optimizer(0.1, 5)
    seen = []

    def hook(grads):
        seen.append([g.clone() for g in grads])
        for g in grads:
            g.zero_()

    before = [p.detach().clone() for p in ml.meta_parameters()]
    ml.meta_step(ml.batches(TASKS), grad_hook=hook)
    assert len(seen) == 1 and len(seen[0]) == len(before)
    assert all(torch.equal(a, p) for a, p in zip(before, ml.meta_parameters()))  # zero grads
    captured = {}
    ml.optimizer.register_step_pre_hook(
        lambda *args: captured.update(
            norm=float(torch.sqrt(sum((p.grad**2).sum() for p in ml.meta_parameters())))
        )
    )
    ml.meta_step(ml.batches(TASKS), clip_grad_norm=1e-3)
    assert captured["norm"] == pytest.approx(1e-3, rel=1e-6)


def test_as_tensors_dtypes_and_device():
    ml = MetaLearner(MLP(2, 3, (4,)), loss="cross_entropy", algorithm="fomaml", inner_lr=0.1,
                     inner_steps=1, device="cpu")
    X, y = ml.as_tensors(np.zeros((2, 5, 2)), np.zeros((2, 5)))
    assert X.dtype == torch.float32 and y.dtype == torch.long and X.device.type == "cpu"
    assert ml.as_tensors(np.zeros((1, 2)))[1] is None
    assert ml.strategy == "mlp"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "anil", "metasgd"])
@pytest.mark.parametrize("forward", ["mlp", "vmap"])
def test_cuda_meta_steps_match_cpu(algorithm, forward):
    results = []
    for device in ("cpu", "cuda"):
        ml = learner(algorithm, forward, device=device)
        ml.init_optimizer(None, 10)
        batches = ml.batches(TASKS)
        assert batches[0].X_support.device.type == device
        losses = [ml.meta_step(batches) for _ in range(3)]
        assert all(p.device.type == device for p in ml.meta_parameters())
        losses.append(ml.evaluate(TASKS, steps=2))
        results.append((losses, {k: v.cpu() for k, v in ml.state_tensors().items()}))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-7)
    for k, v in results[1][1].items():
        torch.testing.assert_close(v, results[0][1][k], rtol=1e-6, atol=1e-9)
    family = SinusoidTasks(5, 5)
    batch = family.sample_batch(4, np.random.default_rng(0), device="cuda", dtype=torch.float64)
    assert batch.X_query.device.type == "cuda"


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_adapt_with_another_inner_lr_leaves_the_learner_alone(algorithm):
    ml, other = learner(algorithm), learner(algorithm)
    other.inner_lr = 0.1
    batch = ml.batches(TASKS)[0]
    for T in (1, len(TASKS)):  # the single-task path and the batched one
        X, y = batch.X_support[:T], batch.y_support[:T]
        got = ml.adapt(X, y, inner_lr=0.1, track_graph=False)
        assert ml.inner_lr == 0.02
        # Meta-SGD adapts with its learned rates whatever inner_lr says
        want = (ml if algorithm == "metasgd" else other).adapt(X, y, track_graph=False)
        plain = ml.adapt(X, y, track_graph=False)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
        changed = any(not torch.equal(got[k], plain[k]) for k in got)
        assert changed == (algorithm != "metasgd")


def test_params_follow_the_module_and_adapted_names_are_cached():
    ml = learner("anil")
    new = torch.nn.Parameter(torch.zeros_like(ml.module.layers[0].weight))
    ml.module.layers[0].weight = new
    assert ml.params()["layers.0.weight"] is new
    assert list(ml.params()) == [n for n, _ in ml.module.named_parameters()]
    names = ml.adapted_names()
    assert names == ["layers.2.weight", "layers.2.bias"] and ml.adapted_names() is names


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "mamlpp", "alpaca", "joint"])
def test_a_chunked_meta_gradient_equals_the_whole_one(algorithm):
    """meta_batch_chunk computes the meta-gradient a few tasks at a time (the memory of
    one piece); the pieces, weighted by their share, give the same numbers, also for a
    ragged meta-batch split across its shape groups."""
    import numpy as np

    from metafit.learner import MetaLearner
    from metafit.models import MLP
    from metafit.tasks import SinusoidTasks, Task

    rng = np.random.default_rng(0)
    tasks = SinusoidTasks(k_shot=5, random_state=0).sample(5)
    tasks += [Task(rng.normal(size=(3, 1)), rng.normal(size=3), rng.normal(size=(7, 1)),
                   rng.normal(size=7)) for _ in range(2)]  # a second shape group
    from metafit.algorithms import ALPACA

    if algorithm == "alpaca":
        algorithm = ALPACA(n_features=1)  # the network's one output is the feature
    grads = {}
    for chunk in (None, 3, 1):
        torch.manual_seed(0)
        learner = MetaLearner(MLP(1, 1, (8,)), loss="mse", algorithm=algorithm, inner_lr=0.05,
                              inner_steps=2, dtype=torch.float64, meta_batch_chunk=chunk)
        learner.init_optimizer(1e-3, 10)
        grads[chunk] = learner.meta_gradients(learner.batches(tasks))
    for chunk in (3, 1):
        torch.testing.assert_close(grads[chunk][0], grads[None][0], rtol=1e-10, atol=1e-12)
        for g, w in zip(grads[chunk][1], grads[None][1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_chunk_batches_covers_every_task_once_in_order():
    from metafit._task_types import TaskBatch, chunk_batches

    def batch(n, offset):
        X = torch.arange(offset, offset + n, dtype=torch.float64).view(n, 1, 1)
        return TaskBatch(X, X[..., 0], X, X[..., 0])

    pieces = chunk_batches([batch(5, 0), batch(3, 5)], 3)
    assert [[p.n_tasks for p in c] for c in pieces] == [[3], [2, 1], [2]]
    seen = torch.cat([p.X_support.flatten() for c in pieces for p in c])
    assert seen.tolist() == list(range(8))


def test_values_of_the_extras_are_kept_between_fits_until_the_extras_change():
    """``from_extras``: ALPACA's prior is computed once for many fits, recomputed after a
    meta-step or a load changed the extras, and never kept under autograd."""
    from metafit.algorithms import ALPACA

    ml = learner(ALPACA(n_features=1))
    calls, USES = [], ("alpaca_prior_mean",)

    def compute():
        calls.append(1)
        return ml.extras["alpaca_prior_mean"] * 2

    with torch.no_grad():
        first = ml.from_extras("probe", compute, USES)
        assert ml.from_extras("probe", compute, USES) is first and len(calls) == 1
    assert ml.from_extras("probe", compute, USES).requires_grad and len(calls) == 2
    X, y = ml.as_tensors(TASKS[0].X_support[None], TASKS[0].y_support[None])
    before = ml.adapt(X, y, track_graph=False)["alpaca.k"]
    ml.init_optimizer(1e-2, 10)
    ml.meta_step(ml.batches(TASKS))  # in place, and its version counter stays as it was
    with torch.no_grad():
        assert ml.from_extras("probe", compute, USES) is not first and len(calls) == 3
    after = ml.adapt(X, y, track_graph=False)["alpaca.k"]
    fresh = learner(ALPACA(n_features=1))
    fresh.load_state_tensors(ml.state_tensors())
    torch.testing.assert_close(fresh.adapt(X, y, track_graph=False)["alpaca.k"], after)
    assert not torch.allclose(before, after)
    # a load into the same learner changes the extras in place: the prior follows
    ml.load_state_tensors(learner(ALPACA(n_features=1)).state_tensors())
    torch.testing.assert_close(ml.adapt(X, y, track_graph=False)["alpaca.k"], before)
