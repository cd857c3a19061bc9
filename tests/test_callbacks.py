"""The ready-made training callbacks, on their own and inside meta_train."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch

from metafit.callbacks import BestState, Checkpoint, EarlyStopping, ProgressBar
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.persistence import MetaInit, module_spec
from metafit.tasks import SinusoidTasks
from metafit.training import HistoryRecord, StopTraining, meta_train


@pytest.fixture
def learner():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = MLP(1, 1, hidden_sizes=[8])
    out = MetaLearner(module, loss="mse", algorithm="maml", inner_lr=0.01, inner_steps=1)
    out.init_optimizer(None, 10)
    return out


def batches():
    source = iter(SinusoidTasks(k_shot=5, random_state=0))
    while True:
        yield [next(source) for _ in range(2)]


def rec(i, val=None, loss=1.0):
    return HistoryRecord(i, loss, val, 0.01 * i)


def test_early_stopping_counts_evaluations_without_improvement(learner):
    stop = EarlyStopping(patience=2, min_delta=0.1)
    stop.on_iteration_end(learner, rec(1, 1.0))  # improves on inf
    stop.on_iteration_end(learner, rec(2))  # no validation: ignored
    stop.on_iteration_end(learner, rec(3, 0.95))  # better, but not by min_delta
    assert stop.wait == 1 and stop.best_loss == 1.0
    stop.on_iteration_end(learner, rec(4, 0.8))  # improvement resets
    assert stop.wait == 0 and stop.best_loss == 0.8
    stop.on_iteration_end(learner, rec(5, 0.9))
    with pytest.raises(StopTraining):
        stop.on_iteration_end(learner, rec(6, 0.85))
    assert stop.stopped_iteration == 6


def test_early_stopping_resumes_its_counter():
    stop = EarlyStopping(patience=2, best_loss=0.5, wait=1)
    with pytest.raises(StopTraining):
        stop.on_iteration_end(None, rec(9, 0.6))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"patience": 0}, ValueError),
        ({"patience": 1.5}, TypeError),
        ({"patience": True}, TypeError),
        ({"patience": 2, "min_delta": -1}, ValueError),
    ],
)
def test_early_stopping_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="patience must be an int >= 1|min_delta"):
        EarlyStopping(**kwargs)


def test_best_state_tracks_the_lowest_validation_loss(learner):
    best = BestState()
    best.on_iteration_end(learner, rec(1, 2.0))
    first = best.best_tensors
    with torch.no_grad():
        next(learner.module.parameters()).add_(1.0)
    best.on_iteration_end(learner, rec(2, 3.0))  # worse: kept
    assert best.best_iteration == 1 and best.best_tensors is first
    best.on_iteration_end(learner, rec(3, 1.0))
    assert best.best_iteration == 3 and best.best_loss == 1.0
    assert not torch.equal(best.best_tensors["layers.0.weight"], first["layers.0.weight"])


def test_best_state_inside_meta_train(learner):
    val = SinusoidTasks(k_shot=5, random_state=1).sample(3)
    best = BestState()
    res = meta_train(learner, batches(), iterations=6, validation_tasks=val, callbacks=[best])
    losses = [r.validation_loss for r in res.history]
    assert best.best_loss == min(losses)
    assert best.best_iteration == losses.index(min(losses)) + 1


def test_progress_bar_shows_losses_and_warm_start_offset(learner):
    out = io.StringIO()
    bar = ProgressBar(file=out)
    bar.on_train_begin(learner, 10)
    bar.on_iteration_end(learner, rec(5, 0.25, loss=1.5))
    bar.on_iteration_end(learner, rec(6, None, loss=1.25))
    assert bar.bar.n == 6
    bar.on_train_end(learner, [])
    text = out.getvalue()
    assert "6/10" in text and "meta_loss=1.25" in text and "val_loss=0.25" in text
    assert bar.bar is None


def test_progress_bar_without_begin_is_harmless(learner):
    bar = ProgressBar(file=io.StringIO())
    bar.on_iteration_end(learner, rec(1))
    bar.on_train_end(learner, [])


def make_init_factory(learner):
    spec = module_spec(learner.module, {"n_inputs": 1, "n_outputs": 1, "hidden_sizes": [8]})

    def make(lrn, iteration):
        return MetaInit(
            lrn.state_tensors(), spec, {"iteration": iteration, "n_features": 1, "n_outputs": 1}
        )

    return make


def test_checkpoint_interval_and_final_write(learner, tmp_path):
    path = tmp_path / "sub" / "c.safetensors"
    ckpt = Checkpoint(path, 4, make_init_factory(learner))
    res = meta_train(learner, batches(), iterations=10, callbacks=[ckpt])
    assert ckpt.last_written == 10 and len(res.history) == 10
    loaded = MetaInit.load(path)
    assert loaded.metadata["iteration"] == 10
    assert all(torch.equal(loaded.tensors[k], v) for k, v in learner.state_tensors().items())
    assert os.listdir(path.parent) == ["c.safetensors"]


def test_checkpoint_after_interrupt_holds_the_restored_state(learner, tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt = Checkpoint(path, 100, make_init_factory(learner))

    class Stop:
        def on_train_begin(self, learner, total):
            pass

        def on_iteration_end(self, learner, record):
            if record.iteration == 3:
                raise KeyboardInterrupt

        def on_train_end(self, learner, history):
            pass

    res = meta_train(
        learner, batches(), iterations=10, callbacks=[Stop(), ckpt], catch_interrupt=True
    )
    assert res.interrupted and MetaInit.load(path).metadata["iteration"] == 3


@pytest.mark.parametrize(
    "interval, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_checkpoint_rejects_bad_interval(interval, error, tmp_path):
    with pytest.raises(error, match="checkpoint interval must be an int >= 1"):
        Checkpoint(tmp_path / "x", interval, lambda lrn, it: None)
    assert not (tmp_path / "x").exists()


def test_best_state_defaults():
    best = BestState()
    assert best.best_loss == math.inf and best.best_tensors is None


# ------------------------------------------------------------- callbacks= of the estimators


def _est(**kw):
    from metafit import MetaInitializedRegressor

    params = dict(hidden_sizes=(8,), meta_iterations=6, meta_batch_size=2,
                  validation_interval=2, random_state=0, verbose=0)
    return MetaInitializedRegressor(**{**params, **kw})


VAL = SinusoidTasks(k_shot=5, random_state=1).sample(3)


def test_estimator_callbacks_are_copied_named_and_kept():
    from sklearn.base import clone

    from metafit.callbacks import LRScheduler

    sched = LRScheduler("StepLR", step_size=2, gamma=0.5)
    est = _est(callbacks=[sched, ("second", LRScheduler("StepLR", step_size=1, gamma=0.9))])
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    assert est.callbacks[0] is sched and sched.lr_ == []  # the parameter is untouched
    names = [name for name, _ in est.callbacks_]
    assert names == ["LRScheduler", "second"]
    fitted = dict(est.callbacks_)["LRScheduler"]
    assert len(fitted.lr_) == 6
    # both schedulers act on one optimizer: 0.5 every 2 steps times 0.9 every step
    assert dict(est.callbacks_)["second"].lr_[-1] == pytest.approx(1e-3 * 0.5**3 * 0.9**6)
    twin = clone(est)
    assert twin.callbacks[0] is not sched and twin.callbacks[0].kwargs == sched.kwargs
    twin.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    np.testing.assert_allclose(dict(twin.callbacks_)["LRScheduler"].lr_, fitted.lr_)


def test_plateau_scheduler_steps_with_the_validation_loss():
    from metafit.callbacks import LRScheduler

    est = _est(callbacks=[LRScheduler("ReduceLROnPlateau", patience=0, factor=0.5)],
               meta_lr=1e-6)  # no improvement beyond the default threshold
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0), VAL)
    lrs = dict(est.callbacks_)["LRScheduler"].lr_
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] < lrs[0]


def test_estimator_early_stopping_and_checkpoint_callbacks(tmp_path):
    from metafit import MetaInit

    path = tmp_path / "ck.safetensors"
    est = _est(meta_iterations=50, meta_lr=1e-9,
               callbacks=[EarlyStopping(patience=2), Checkpoint(path, interval=2)])
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0), VAL)
    assert len(est.meta_history_) < 50
    saved = MetaInit.load(path)
    assert saved.metadata["iteration"] == len(est.meta_history_)
    assert saved.metadata["estimator"] == "regressor"


def test_bad_callbacks_fail_before_any_work():
    from metafit.callbacks import LRScheduler

    with pytest.raises(TypeError, match="TrainingCallback"):
        _est(callbacks=[object()]).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    with pytest.raises(TypeError, match="list of TrainingCallback"):
        _est(callbacks=LRScheduler()).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    with pytest.raises(ValueError, match="validation_tasks"):
        _est(callbacks=[EarlyStopping(patience=2)]).meta_fit(
            SinusoidTasks(k_shot=5, random_state=0))
    with pytest.raises(ValueError, match="not a scheduler"):
        _est(callbacks=[LRScheduler("NoSuchLR")]).meta_fit(
            SinusoidTasks(k_shot=5, random_state=0))
    est = _est(callbacks=[object()])
    with pytest.raises(TypeError):
        est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    assert not hasattr(est, "meta_init_")


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metafit.callbacks import TensorBoard

    est = _est(callbacks=[TensorBoard(tmp_path / "runs")])
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0), VAL)
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"meta_loss", "validation_loss", "meta_lr"} <= set(tags)
    steps = [e.step for e in acc.Scalars("meta_loss")]
    assert steps == list(range(1, 7))
    losses = [e.value for e in acc.Scalars("meta_loss")]
    np.testing.assert_allclose(losses, est.meta_history_[:, "meta_loss"], rtol=1e-6)


def test_history_slices_like_skorch():
    est = _est().meta_fit(SinusoidTasks(k_shot=5, random_state=0), VAL)
    h = est.meta_history_
    assert h[:, "iteration"] == list(range(1, 7))
    assert h[-1, "validation_loss"] == h[-1]["validation_loss"]
    assert h[1:3, "meta_loss"] == [h[1]["meta_loss"], h[2]["meta_loss"]]
    with pytest.raises(KeyError, match="no column"):
        h[:, "train_loss"]


# ---------------------------------------------------------------- progress and threads


def test_progress_bar_by_default_only_on_a_terminal(capsys, monkeypatch):
    _est().set_params(verbose=None).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    assert capsys.readouterr().err == ""  # stderr is captured: not a terminal

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    _est().set_params(verbose=None).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    assert "6/6" in term.getvalue()


@pytest.mark.parametrize("n_threads, module, expected", [
    (None, None, 1), (3, None, 3), (None, "conv", "cores"),
])
def test_threads_are_set_for_the_call_and_restored(monkeypatch, n_threads, module, expected):
    from metafit import _threads
    from metafit.models import Conv4

    seen = []
    real = _threads.torch_threads

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr("metafit.estimators._meta_fit_run.torch_threads", spy)
    monkeypatch.setattr("metafit.estimators._base.torch_threads", spy)
    monkeypatch.setattr("metafit.estimators.regressor.torch_threads", spy)
    before = torch.get_num_threads()
    if module == "conv":
        from metafit import MetaInitializedClassifier
        from metafit.tasks import Task

        rng = np.random.default_rng(0)
        task = Task(rng.normal(size=(4, 1, 6, 6)), np.array([0, 1, 0, 1]),
                    rng.normal(size=(4, 1, 6, 6)), np.array([0, 1, 0, 1]))
        est = MetaInitializedClassifier(
            module=Conv4, module__n_outputs=2, module__input_shape=(1, 6, 6),
            module__hidden_channels=2, module__n_blocks=1, meta_iterations=2,
            meta_batch_size=1, random_state=0, verbose=0, n_threads=n_threads,
        ).meta_fit([task, task])
        est.fit(task.X_support, task.y_support)
    else:
        est = _est(n_threads=n_threads).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
        task = SinusoidTasks(random_state=2).sample(1)[0]
        est.fit(task.X_support, task.y_support)
    est.predict(task.X_support)
    want = _threads._cores() if expected == "cores" else expected
    assert seen == [want, want, want]  # meta_fit, fit, predict
    assert torch.get_num_threads() == before


def test_concurrent_estimators_restore_the_callers_threads():
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    est = _est(meta_iterations=3).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    task = SinusoidTasks(random_state=2).sample(1)[0]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda r: est.__sklearn_clone__().set_params(inner_lr=r, n_threads=1)
                      .fit(task.X_support, task.y_support), [0.01, 0.02] * 20))
    assert torch.get_num_threads() == before


def test_fit_without_meta_init_warns_once_per_estimator():
    import warnings

    from metafit import MetaInitializedRegressor, NoMetaInitWarning

    task = SinusoidTasks(random_state=2).sample(1)[0]
    est = MetaInitializedRegressor(hidden_sizes=(8,), random_state=0)
    with pytest.warns(NoMetaInitWarning, match="no meta-learned initialization"):
        est.fit(task.X_support, task.y_support)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit(task.X_support, task.y_support)  # once
        _est(meta_iterations=2).meta_fit(SinusoidTasks(k_shot=5, random_state=0)).fit(
            task.X_support, task.y_support)  # never with a meta-init
