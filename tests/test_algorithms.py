"""Meta-gradients of every algorithm against float64 references written out by hand.

Each reference loops over tasks one by one with plain ``torch.autograd`` and
``functional_call``, independent of metafit's batched inner loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from metafit.algorithms import ALGORITHMS, MetaAlgorithm, get_algorithm
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.tasks import SinusoidTasks, Task

LR = 0.05


def make_learner(algorithm, steps=1, forward="auto", inner_grad="auto", seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    net = MLP(1, 1, (8, 8))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return MetaLearner(
        net,
        loss="mse",
        algorithm=algorithm,
        inner_lr=LR,
        inner_steps=steps,
        forward=forward,
        inner_grad=inner_grad,
        dtype=torch.float64,
        **kw,
    )


def sinusoids(n=5, seed=1, k_shot=6, k_query=7):
    return SinusoidTasks(k_shot, k_query, random_state=seed).sample(n)


def ragged_tasks():
    rng = np.random.default_rng(3)
    tasks = []
    for n_s, n_q in [(4, 5), (6, 3), (4, 5), (2, 8), (6, 3)]:
        x = rng.uniform(-3, 3, (n_s + n_q, 1))
        y = np.sin(x[:, 0] * rng.uniform(0.5, 2))
        tasks.append(Task(x[:n_s], y[:n_s], x[n_s:], y[n_s:]))
    return tasks


def reference(learner, tasks, steps, *, first_order=False, adapt=None, lrs=None):
    """Mean query loss gradient, per task, with an explicit Python loop over steps."""
    net = learner.module
    theta = dict(net.named_parameters())
    extras = list(learner.extras.values())
    total = 0.0
    for task in tasks:
        Xs, ys = (torch.as_tensor(a, dtype=torch.float64) for a in (task.X_support, task.y_support))
        Xq, yq = (torch.as_tensor(a, dtype=torch.float64) for a in (task.X_query, task.y_query))
        p = dict(theta)
        names = list(p) if adapt is None else adapt
        for _ in range(steps):
            loss = ((functional_call(net, p, (Xs,))[:, 0] - ys) ** 2).mean()
            grads = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True)
            for n, g in zip(names, grads):
                if first_order:
                    g = g.detach()
                p[n] = p[n] - (LR if lrs is None else lrs[n]) * g
        query = ((functional_call(net, p, (Xq,))[:, 0] - yq) ** 2).mean()
        total = total + query / len(tasks)
    return torch.autograd.grad(total, [*theta.values(), *extras], allow_unused=True)


def assert_close(got, want, rtol=1e-6):
    for g, w in zip(got, want, strict=True):
        w = torch.zeros_like(g) if w is None else w
        scale = max(float(w.abs().max()), 1e-12)
        assert float((g - w).abs().max()) <= rtol * scale, (g, w)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("forward", ["mlp", "vmap", "loop"])
@pytest.mark.parametrize("inner_grad", ["auto", "autograd"])
def test_maml_second_order_matches_unrolled_reference(steps, forward, inner_grad):
    learner = make_learner("maml", steps, forward, inner_grad)
    tasks = sinusoids()
    _, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    want = reference(learner, tasks, steps)
    assert_close(grads, want)
    # The second-order terms matter here: the first-order reference is far off.
    fo = reference(learner, tasks, steps, first_order=True)
    assert max(float((g - w).abs().max()) for g, w in zip(grads, fo)) > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("forward", ["mlp", "vmap"])
def test_fomaml_matches_reference_with_detached_inner_gradient(steps, forward):
    learner = make_learner("fomaml", steps, forward)
    tasks = sinusoids()
    _, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    assert_close(grads, reference(learner, tasks, steps, first_order=True))


def test_ragged_meta_batch_matches_per_task_reference():
    learner = make_learner("maml", 2)
    tasks = ragged_tasks()
    batches = learner.batches(tasks)
    assert len(batches) == 1 and batches[0].support_mask is not None  # padded, one batch
    loss, grads = learner.algorithm.meta_gradients(learner, batches)
    assert_close(grads, reference(learner, tasks, 2))
    # Equal to averaging the tasks computed one by one (vectorized vs per-task path).
    per_task = [learner.algorithm.meta_gradients(learner, learner.batches([t])) for t in tasks]
    mean = [sum(g[i] for _, g in per_task) / len(tasks) for i in range(len(grads))]
    assert_close(grads, mean)
    assert float(loss) == pytest.approx(np.mean([float(lo) for lo, _ in per_task]), rel=1e-9)


def _ragged_learner(name, forward="auto", steps=2, loss="mse"):
    """A float64 learner of ``name`` on a network it can adapt (ALPACA's features, CAVIA's
    context), with distinct random weights."""
    from metafit.algorithms import ALPACA
    from metafit.models import ContextMLP

    n_out = 3 if loss == "cross_entropy" else 1
    algorithm = name
    if name == "alpaca":
        algorithm, net = ALPACA(n_features=3), MLP(1, 3, (8,))
    elif name == "cavia":
        net = ContextMLP(1, n_out, (8,), context_size=2)
        forward = "vmap" if forward == "mlp" else forward
    else:
        net = MLP(1, n_out, (8, 8))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return MetaLearner(net, loss=loss, algorithm=algorithm, inner_lr=LR, inner_steps=steps,
                       forward=forward, dtype=torch.float64)


def _per_task_mean(learner, tasks):
    parts = [learner.algorithm.meta_gradients(learner, learner.batches([t])) for t in tasks]
    grads = [sum(g[i] for _, g in parts) / len(tasks) for i in range(len(parts[0][1]))]
    return float(np.mean([float(lo) for lo, _ in parts])), grads


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("forward", ["mlp", "vmap", "loop"])
def test_a_padded_ragged_batch_equals_the_tasks_one_by_one_for_every_algorithm(name, forward):
    """Losses, inner gradients (analytic and autograd) and ALPACA's sufficient statistics
    all ignore the padding rows: the padded batch, the per-shape groups and the per-task
    loop give the same meta-loss and meta-gradients."""
    learner = _ragged_learner(name, forward)
    tasks = ragged_tasks()
    (padded,) = learner.batches(tasks)
    assert padded.X_support.shape[:2] == (5, 6) and padded.X_query.shape[:2] == (5, 8)
    loss, grads = learner.algorithm.meta_gradients(learner, [padded])
    want_loss, want = _per_task_mean(learner, tasks)
    assert_close(grads, want, rtol=1e-9)
    assert float(loss) == pytest.approx(want_loss, rel=1e-9)
    learner.pad_ragged = False  # one batch per shape: the path of BatchNorm networks
    groups = learner.batches(tasks)
    assert len(groups) == 3 and all(b.support_mask is None for b in groups)
    _, grouped = learner.algorithm.meta_gradients(learner, groups)
    assert_close(grouped, want, rtol=1e-9)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile"])
def test_padded_classification_tasks_equal_the_tasks_one_by_one(name):
    rng = np.random.default_rng(4)
    tasks = []
    for n_s, n_q in [(3, 6), (6, 3), (4, 4)]:
        x = rng.normal(size=(n_s + n_q, 1))
        y = rng.integers(0, 3, n_s + n_q)
        tasks.append(Task(x[:n_s], y[:n_s], x[n_s:], y[n_s:]))
    learner = _ragged_learner(name, loss="cross_entropy")
    loss, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    want_loss, want = _per_task_mean(learner, tasks)
    assert_close(grads, want, rtol=1e-9)
    assert float(loss) == pytest.approx(want_loss, rel=1e-9)


def test_evaluate_and_chunks_of_a_padded_batch_equal_the_tasks_one_by_one():
    learner = _ragged_learner("maml")
    tasks = ragged_tasks()
    per_task = np.mean([learner.evaluate([t]) for t in tasks])
    assert learner.evaluate(tasks) == pytest.approx(per_task, rel=1e-9)
    _, want = _per_task_mean(learner, tasks)
    learner.meta_batch_chunk = 2  # pieces of a padded batch keep their masks
    _, chunked = learner.meta_gradients(learner.batches(tasks))
    assert_close(chunked, want, rtol=1e-9)


def test_networks_with_batch_statistics_are_not_padded():
    from metafit.models import Conv4

    bn = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4),
                             torch.nn.Linear(4, 1))
    learner = MetaLearner(bn, loss="mse", algorithm="maml", inner_lr=LR, inner_steps=1)
    assert not learner.pad_ragged
    assert len(learner.batches(ragged_tasks())) == 3
    assert not MetaLearner(Conv4(2, (1, 28, 28), hidden_channels=4), loss="cross_entropy",
                           algorithm="maml", inner_lr=LR, inner_steps=1).pad_ragged
    assert MetaLearner(MLP(1, 1, (4,)), loss="mse", algorithm="maml", inner_lr=LR,
                       inner_steps=1).pad_ragged


def test_anil_adapts_only_the_head_and_still_meta_learns_the_body():
    learner = make_learner("anil", 3)
    tasks = sinusoids()
    batch = learner.batches(tasks)[0]
    head = learner.algorithm.adapted_names(learner)
    assert head == ["layers.2.weight", "layers.2.bias"]
    phi = learner.adapt(batch.X_support, batch.y_support)
    theta = learner.params()
    for name, value in phi.items():
        same = torch.equal(value, theta[name].detach().expand_as(value))
        assert same == (name not in head), name
    _, grads = learner.algorithm.meta_gradients(learner, [batch])
    assert_close(grads, reference(learner, tasks, 3, adapt=head))
    body = [g for (n, _), g in zip(learner.module.named_parameters(), grads) if n not in head]
    assert all(float(g.abs().max()) > 0 for g in body)


def test_metasgd_learning_rates_get_gradients_and_change():
    learner = make_learner("metasgd", 2)
    tasks = sinusoids()
    assert set(learner.extras) == {f"inner_lr.{n}" for n, _ in learner.module.named_parameters()}
    with torch.no_grad():  # distinct rates per entry, so a mix-up shows
        for v in learner.extras.values():
            v.mul_(1 + torch.rand(v.shape, generator=torch.Generator().manual_seed(5)))
    lrs = {k[len("inner_lr.") :]: v for k, v in learner.extras.items()}
    _, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    assert_close(grads, reference(learner, tasks, 2, lrs=lrs))
    n_theta = len(list(learner.module.parameters()))
    assert all(float(g.abs().max()) > 0 for g in grads[n_theta:])
    before = {k: v.detach().clone() for k, v in learner.extras.items()}
    learner.init_optimizer(1e-2, 10)
    learner.meta_step(learner.batches(tasks))
    assert all(not torch.equal(before[k], v) for k, v in learner.extras.items())


def _sgd_adapt(learner, task, steps):
    net = learner.module
    p = {k: v.detach().clone() for k, v in net.named_parameters()}
    Xs, ys = (torch.as_tensor(a, dtype=torch.float64) for a in (task.X_support, task.y_support))
    for _ in range(steps):
        p = {k: v.requires_grad_(True) for k, v in p.items()}
        loss = ((functional_call(net, p, (Xs,))[:, 0] - ys) ** 2).mean()
        grads = torch.autograd.grad(loss, list(p.values()))
        p = {k: (v - LR * g).detach() for (k, v), g in zip(p.items(), grads)}
    return p


def test_reptile_update_is_interpolation_with_linearly_annealed_step():
    learner = make_learner("reptile", 4)
    meta_lr, total = 0.5, 4
    learner.init_optimizer(meta_lr, total)
    for it in range(3):
        tasks = ragged_tasks() if it == 1 else sinusoids(seed=it)
        theta = {k: v.detach().clone() for k, v in learner.module.named_parameters()}
        phis = [_sgd_adapt(learner, t, 4) for t in tasks]
        eps = meta_lr * (1 - it / total)
        learner.meta_step(learner.batches(tasks))
        for name, value in learner.module.named_parameters():
            mean_phi = sum(p[name] for p in phis) / len(phis)
            want = theta[name] + eps * (mean_phi - theta[name])
            torch.testing.assert_close(value.detach(), want, rtol=1e-9, atol=1e-12)


def test_reptile_keeps_no_graph():
    learner = make_learner("reptile", 3)
    batch = learner.batches(sinusoids())[0]
    phi = learner.adapt(batch.X_support, batch.y_support, track_graph=False)
    assert all(v.grad_fn is None and not v.requires_grad for v in phi.values())


def test_joint_pretraining_is_the_gradient_of_the_pooled_loss():
    """Per task, the mean over its support and query rows; tasks weigh equally. Ragged
    meta-batches (several shape groups) give the same gradient as the per-task loop."""
    learner = make_learner("joint", 3)
    tasks = ragged_tasks()
    net = learner.module
    theta = dict(net.named_parameters())
    losses = []
    for t in tasks:
        X = torch.as_tensor(np.vstack([t.X_support, t.X_query]), dtype=torch.float64)
        y = torch.as_tensor(np.concatenate([t.y_support, t.y_query]), dtype=torch.float64)
        losses.append(((functional_call(net, theta, (X,))[:, 0] - y) ** 2).mean())
    want = torch.autograd.grad(torch.stack(losses).mean(), list(theta.values()))
    loss, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    torch.testing.assert_close(loss, torch.stack(losses).mean().detach())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_get_algorithm_by_name_and_errors():
    assert {"maml", "fomaml", "reptile", "anil", "metasgd"} <= set(ALGORITHMS)
    assert get_algorithm("MAML").name == "maml"
    inst = get_algorithm("anil")
    assert get_algorithm(inst) is inst
    with pytest.raises(ValueError, match="one of alpaca, anil, cavia, fomaml, imaml, joint, "):
        get_algorithm("mamll")
    with pytest.raises(NotImplementedError):
        MetaAlgorithm().meta_gradients(None, [])


def test_lean_adam_matches_torch_adam_and_its_state_dict():
    from metafit.algorithms.base import LeanAdam

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 3, generator=gen).requires_grad_(True) for _ in range(2)]
    b = [x.detach().clone().requires_grad_(True) for x in a]
    reference_opt = torch.optim.Adam(a, lr=0.01, fused=True)
    lean = LeanAdam(b, lr=0.01, fused=True)
    LambdaLR = torch.optim.lr_scheduler.LambdaLR
    schedules = [LambdaLR(o, lambda i: 1 - i / 10) for o in (reference_opt, lean)]
    for _ in range(4):
        grads = [torch.randn(4, 3, generator=gen) for _ in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        reference_opt.step()
        lean.fast_step() if _ % 2 else lean.step()
        for s in schedules:
            s.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert float(lean.state_dict()["state"][0]["step"]) == 4
    called = []
    lean.register_step_post_hook(lambda *args: called.append(True))
    lean.fast_step()  # with a hook registered, the ordinary path runs it
    assert called == [True]


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (their sum)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize(("name", "forward"), [("maml", "mlp"), ("maml", "vmap"),
                                               ("mamlpp", "mlp")])
def test_checkpointed_inner_steps_give_the_same_meta_gradients_with_less_graph(name, forward):
    from metafit.algorithms import MAML, MAMLPlusPlus

    tasks = sinusoids(n=4, k_shot=10, k_query=10)
    results = {}
    for checkpoint in (False, True):
        algorithm = MAML(checkpoint=checkpoint) if name == "maml" else MAMLPlusPlus(
            checkpoint=checkpoint)
        learner = make_learner(algorithm, 8, forward)
        batches = learner.batches(tasks)
        saved = _saved_bytes(lambda ln=learner, bs=batches: ln.algorithm.meta_gradients(ln, bs))
        results[checkpoint] = (learner.algorithm.meta_gradients(learner, batches), saved)
        assert learner.algorithm.keeps_inner_graph is (not checkpoint)
    (loss, grads), plain_bytes = results[False]
    (ck_loss, ck_grads), ck_bytes = results[True]
    assert float(ck_loss) == pytest.approx(float(loss), rel=1e-12)
    assert_close(ck_grads, grads, rtol=1e-10)
    assert ck_bytes < 0.7 * plain_bytes, (ck_bytes, plain_bytes)
