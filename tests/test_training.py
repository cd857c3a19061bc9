"""The meta-training loop and meta_fit's training wiring: interrupts, warm starts,
checkpoints, divergence, early stopping, progress and history."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import metafit.estimators._meta_fit_run as meta_fit_run_module
from metafit import MetaInit, MetaInitializedRegressor, SinusoidTasks
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.training import (
    DivergenceError,
    InterruptedTrainingWarning,
    MetaHistory,
    StopTraining,
    TrainingCallback,
    TrainingState,
    meta_train,
)

VAL = SinusoidTasks(k_shot=5, random_state=1).sample(4)


def make(**kw):
    params = dict(
        hidden_sizes=(8, 8),
        meta_iterations=10,
        meta_batch_size=3,
        inner_steps=2,
        validation_interval=1,
        random_state=0,
    )
    params.update(kw)
    return MetaInitializedRegressor(**params)


def tasks(seed=0):
    return SinusoidTasks(k_shot=5, random_state=seed)


def same_tensors(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class RaiseAt(TrainingCallback):
    """Raise ``exc`` from on_iteration_end of iteration ``k``."""

    def __init__(self, k, exc=KeyboardInterrupt):
        self.k, self.exc = k, exc

    def on_iteration_end(self, learner, record):
        if record.iteration == self.k:
            raise self.exc


def inject(monkeypatch, *extra):
    """Make meta_fit's meta_train also run ``extra`` callbacks."""
    real = meta_fit_run_module.meta_train

    def wrapped(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, *extra], **kwargs)

    monkeypatch.setattr(meta_fit_run_module, "meta_train", wrapped)


def learner(algorithm="maml", seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MLP(1, 1, hidden_sizes=[8])
    out = MetaLearner(module, loss="mse", algorithm=algorithm, inner_lr=0.01, inner_steps=1)
    out.init_optimizer(None, 20)
    return out


def batches(seed=0, size=3):
    source = iter(tasks(seed))
    while True:
        yield [next(source) for _ in range(size)]


# ---------------------------------------------------------------------------- meta_train


def test_meta_train_numbers_iterations_from_start_and_continues_time():
    res = meta_train(learner(), batches(), iterations=7, start_iteration=4, start_time=100.0)
    assert [r.iteration for r in res.history] == [5, 6, 7]
    assert all(r.time >= 100.0 for r in res.history)
    assert res.last_iteration == 7 and not res.interrupted


def test_interrupt_inside_meta_step_restores_learner_and_optimizer():
    lrn = learner()
    snapshots = {}

    class Snap(TrainingCallback):
        def on_iteration_end(self, learner, record):
            snapshots[record.iteration] = TrainingState.capture(learner, record.iteration)

    calls = {"n": 0}

    def hook(grads):
        calls["n"] += 1
        if calls["n"] == 4:
            # Corrupt the parameters first: a half-done step must not survive.
            with torch.no_grad():
                for p in lrn.meta_parameters():
                    p.add_(1.0)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta_train(lrn, batches(), iterations=10, callbacks=[Snap()], grad_hook=hook)
    assert same_tensors(lrn.state_tensors(), snapshots[3].tensors)
    opt_state = lrn.optimizer.state_dict()["state"]
    saved = snapshots[3].optimizer["state"]
    assert all(torch.equal(opt_state[i]["exp_avg"], saved[i]["exp_avg"]) for i in saved)
    assert all(float(opt_state[i]["step"]) == 3 for i in saved)


def test_catch_interrupt_returns_result_with_completed_iterations():
    res = meta_train(
        learner(), batches(), iterations=10, callbacks=[RaiseAt(5)], catch_interrupt=True
    )
    assert res.interrupted and res.last_iteration == 5
    assert [r.iteration for r in res.history] == [1, 2, 3, 4, 5]


def test_stop_training_from_a_callback_ends_cleanly():
    res = meta_train(learner(), batches(), iterations=10, callbacks=[RaiseAt(2, StopTraining)])
    assert res.stopped_early and len(res.history) == 2


def test_nonfinite_gradient_raises_divergence_and_restores_state():
    lrn = learner()
    calls = {"n": 0}

    def hook(grads):
        calls["n"] += 1
        if calls["n"] == 3:
            grads[0].fill_(float("nan"))

    before = {}

    class Snap(TrainingCallback):
        def on_iteration_end(self, learner, record):
            before["state"] = learner.state_tensors()

    with pytest.raises(DivergenceError, match="iteration 3") as info:
        meta_train(lrn, batches(), iterations=10, grad_hook=hook, callbacks=[Snap()])
    assert isinstance(info.value, ValueError)
    assert same_tensors(lrn.state_tensors(), before["state"])
    assert info.value.result.last_iteration == 2


def test_check_finite_false_lets_nan_through():
    def hook(grads):
        grads[0].fill_(float("nan"))

    res = meta_train(learner(), batches(), iterations=2, grad_hook=hook, check_finite=False)
    assert len(res.history) == 2


def test_clip_grad_norm_bounds_the_update():
    lrn = learner("reptile")
    theta = lrn.state_tensors()
    meta_train(lrn, batches(), iterations=3, clip_grad_norm=1e-9)
    moved = max(float((lrn.state_tensors()[k] - theta[k]).abs().max()) for k in theta)
    assert moved < 1e-7
    lrn2 = learner("reptile")
    meta_train(lrn2, batches(), iterations=3)
    assert max(float((lrn2.state_tensors()[k] - theta[k]).abs().max()) for k in theta) > 1e-4


def test_training_state_restore_keep_lr_uses_the_new_learning_rate():
    a = learner()
    meta_train(a, batches(), iterations=3)
    state = TrainingState.capture(a, 3)
    b = MetaLearner(
        MLP(1, 1, hidden_sizes=[8]), loss="mse", algorithm="maml", inner_lr=0.01, inner_steps=1
    )
    b.init_optimizer(0.5, 20)
    state.restore(b, keep_lr=True)
    assert b.optimizer.param_groups[0]["lr"] == 0.5
    assert float(b.optimizer.state_dict()["state"][0]["step"]) == 3
    assert same_tensors(b.state_tensors(), state.tensors)


def test_training_state_pickles_and_moves_to_cpu():
    a = learner("reptile")
    meta_train(a, batches(), iterations=2)
    state = pickle.loads(pickle.dumps(TrainingState.capture(a, 2).to_cpu()))
    assert state.iteration == 2 and state.scheduler["last_epoch"] == 2


# ---------------------------------------------------------------------------- interrupts


def test_interrupt_keeps_last_iteration_warns_once_and_equals_shorter_run(monkeypatch):
    inject(monkeypatch, RaiseAt(4))
    est = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert est.meta_fit(tasks()) is est
    interrupts = [w for w in caught if issubclass(w.category, InterruptedTrainingWarning)]
    assert len(interrupts) == 1
    assert "warm_start=True" in str(interrupts[0].message)
    assert [r["iteration"] for r in est.meta_history_] == [1, 2, 3, 4]
    monkeypatch.undo()
    short = make(meta_iterations=4).meta_fit(tasks())
    assert same_tensors(est.meta_init_.tensors, short.meta_init_.tensors)
    task = SinusoidTasks(random_state=5).sample(1)[0]
    assert est.fit(task.X_support, task.y_support).predict(task.X_query).shape == (10,)


def test_interrupt_with_validation_keeps_the_best_state(monkeypatch):
    inject(monkeypatch, RaiseAt(6))
    with pytest.warns(InterruptedTrainingWarning, match="best validation loss"):
        est = make().meta_fit(tasks(), VAL)
    vals = [r["validation_loss"] for r in est.meta_history_]
    best = int(np.argmin(vals)) + 1
    assert est.meta_init_.metadata["best_iteration"] == best
    monkeypatch.undo()
    ref = make(meta_iterations=best).meta_fit(tasks(), VAL)
    assert same_tensors(est.meta_init_.tensors, ref.meta_init_.tensors)


def test_interrupt_inside_the_meta_step(monkeypatch):
    real = MetaLearner.meta_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MetaLearner, "meta_step", step)
    with pytest.warns(InterruptedTrainingWarning):
        est = make().meta_fit(tasks())
    assert len(est.meta_history_) == 2 and est._warm_state_.state.iteration == 2


def test_on_interrupt_raise_reraises_after_saving_state(monkeypatch):
    inject(monkeypatch, RaiseAt(3))
    est = make(on_interrupt="raise")
    with pytest.raises(KeyboardInterrupt), pytest.warns(InterruptedTrainingWarning):
        est.meta_fit(tasks())
    assert len(est.meta_history_) == 3 and est.meta_init_.metadata["iteration"] == 3


def test_warm_start_resumes_exactly_where_it_stopped(monkeypatch):
    full = make().meta_fit(iter(tasks()))
    stream = iter(tasks())
    inject(monkeypatch, RaiseAt(4))
    with pytest.warns(InterruptedTrainingWarning):
        est = make().meta_fit(stream)
    monkeypatch.undo()
    est.set_params(warm_start=True).meta_fit(stream)
    assert [r["iteration"] for r in est.meta_history_] == list(range(1, 11))
    times = [r["time"] for r in est.meta_history_]
    assert times == sorted(times)
    # Same tasks, same Adam moments: the resumed run is the uninterrupted one.
    assert same_tensors(est.meta_init_.tensors, full.meta_init_.tensors)
    np.testing.assert_allclose(
        [r["meta_loss"] for r in est.meta_history_],
        [r["meta_loss"] for r in full.meta_history_],
        rtol=1e-6,
    )


def test_warm_start_when_done_warns_and_changes_nothing():
    est = make(meta_iterations=3).meta_fit(tasks())
    init = est.meta_init_
    with pytest.warns(UserWarning, match="increase meta_iterations"):
        est.set_params(warm_start=True).meta_fit(tasks())
    assert est.meta_init_ is init and len(est.meta_history_) == 3
    est.set_params(meta_iterations=5).meta_fit(tasks())
    assert [r["iteration"] for r in est.meta_history_] == [1, 2, 3, 4, 5]


def test_warm_start_survives_pickle_and_works_on_a_clone():
    est = make(meta_iterations=3).meta_fit(tasks())
    est2 = pickle.loads(pickle.dumps(est)).set_params(warm_start=True, meta_iterations=5)
    est2.meta_fit(tasks())
    assert len(est2.meta_history_) == 5
    c = clone(est).set_params(warm_start=True, meta_iterations=4)
    c.meta_fit(tasks())  # no optimizer state on a clone: continues the tensors only
    assert [r["iteration"] for r in c.meta_history_] == [1, 2, 3, 4]


def test_warm_start_with_other_tasks_shape_is_a_clear_error():
    est = make(meta_iterations=2).meta_fit(tasks())
    before = est.meta_init_
    wide = [(np.zeros((4, 2)), np.zeros(4), np.zeros((4, 2)), np.zeros(4))] * 3
    with pytest.raises(ValueError, match="warm_start=False"):
        est.set_params(warm_start=True, meta_iterations=4).meta_fit(wide)
    assert est.meta_init_ is before


def test_warm_start_without_previous_training_starts_fresh():
    a = make(meta_iterations=3, warm_start=True).meta_fit(tasks())
    b = make(meta_iterations=3).meta_fit(tasks())
    assert same_tensors(a.meta_init_.tensors, b.meta_init_.tensors)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_written_every_n_iterations_and_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "meta.safetensors"
    written = []
    real = MetaInit.save

    def spy(self, p):
        written.append(self.metadata["iteration"])
        return real(self, p)

    monkeypatch.setattr(MetaInit, "save", spy)
    est = make(meta_iterations=7, checkpoint_path=path, checkpoint_interval=3).meta_fit(tasks())
    assert written == [3, 6, 7]
    assert sorted(os.listdir(path.parent)) == ["meta.safetensors"]  # no temporary file left
    loaded = MetaInit.load(path)
    assert loaded.metadata["iteration"] == 7
    assert same_tensors(loaded.tensors, est.meta_init_.tensors)
    task = SinusoidTasks(random_state=5).sample(1)[0]
    a = make(meta_init=str(path)).fit(task.X_support, task.y_support).predict(task.X_query)
    b = est.fit(task.X_support, task.y_support).predict(task.X_query)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_meta_init_checkpoint_resumes_with_warm_start(tmp_path):
    path = tmp_path / "m.safetensors"
    make(meta_iterations=4, checkpoint_path=path, checkpoint_interval=2).meta_fit(tasks())
    est = make(meta_iterations=6, meta_init=path, warm_start=True).meta_fit(tasks())
    assert [r["iteration"] for r in est.meta_history_] == [5, 6]


def test_failed_checkpoint_write_keeps_the_old_file_and_no_temp(
    tmp_path, break_safetensors_save
):
    path = tmp_path / "m.safetensors"
    make(meta_iterations=2, checkpoint_path=path, checkpoint_interval=1).meta_fit(tasks())
    old = path.read_bytes()
    break_safetensors_save()
    # issue 13: a failed write warns and training goes on; nothing is lost in memory
    with pytest.warns(UserWarning, match="disk full"):
        est = make(meta_iterations=2, checkpoint_path=path, checkpoint_interval=1).meta_fit(
            tasks())
    assert len(est.meta_history_) == 2 and hasattr(est, "meta_init_")
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_killed_process_loses_at_most_interval_iterations(tmp_path):
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(
        f"""
        import os, torch
        torch.set_num_threads(1)
        import metafit.estimators._meta_fit_run as E
        from metafit import MetaInitializedRegressor, SinusoidTasks
        from metafit.training import TrainingCallback
        real = E.meta_train
        class Kill(TrainingCallback):
            def on_iteration_end(self, learner, record):
                if record.iteration == 8:
                    os._exit(3)  # no cleanup at all, like SIGKILL
        E.meta_train = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Kill()], **k)
        MetaInitializedRegressor(hidden_sizes=(8,), meta_iterations=20, meta_batch_size=2,
            checkpoint_path={str(path)!r}, checkpoint_interval=3, random_state=0
        ).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    assert MetaInit.load(path).metadata["iteration"] == 6
    assert os.listdir(tmp_path) == ["m.safetensors"]


# ---------------------------------------------------------------------------- divergence


def test_absurd_inner_lr_names_inner_lr():
    est = make(inner_lr=1e4)
    with pytest.raises(DivergenceError, match=r"lower inner_lr \(now 10000\)"):
        est.meta_fit(tasks())
    assert not hasattr(est, "meta_init_")  # nothing was learned: estimator untouched


def test_absurd_meta_lr_names_meta_lr():
    est = make(meta_lr=1e5, meta_iterations=30)
    with pytest.raises(DivergenceError, match=r"lower meta_lr \(now 100000\)"):
        est.meta_fit(tasks())
    # The first Adam step already ruined the initialization: nothing worth keeping.
    assert not hasattr(est, "meta_init_")


def nan_gradient_at(monkeypatch, k):
    real = MetaLearner.meta_step
    calls = {"n": 0}

    def step(self, batches, grad_hook=None, **kwargs):
        calls["n"] += 1

        def hook(grads):
            if calls["n"] == k:
                grads[-1].fill_(float("inf"))
            if grad_hook is not None:
                grad_hook(grads)

        return real(self, batches, grad_hook=hook, **kwargs)

    monkeypatch.setattr(MetaLearner, "meta_step", step)


def test_divergence_keeps_the_last_finite_state(monkeypatch):
    nan_gradient_at(monkeypatch, 5)
    est = make()
    with pytest.raises(DivergenceError, match="iteration 5.*last finite state .iteration 4"):
        est.meta_fit(tasks())
    monkeypatch.undo()
    assert [r["iteration"] for r in est.meta_history_] == [1, 2, 3, 4]
    assert all(torch.isfinite(t).all() for t in est.meta_init_.tensors.values())
    ref = make(meta_iterations=4).meta_fit(tasks())
    assert same_tensors(est.meta_init_.tensors, ref.meta_init_.tensors)


def test_divergence_then_lower_lr_and_warm_start_continues(monkeypatch):
    nan_gradient_at(monkeypatch, 3)
    est = make()
    with pytest.raises(DivergenceError):
        est.meta_fit(tasks())
    monkeypatch.undo()
    est.set_params(meta_lr=1e-4, warm_start=True, meta_iterations=5).meta_fit(tasks())
    assert [r["iteration"] for r in est.meta_history_] == [1, 2, 3, 4, 5]


def test_fit_divergence_names_inner_lr_and_keeps_the_previous_fit():
    est = make(meta_iterations=2).meta_fit(tasks())
    task = SinusoidTasks(random_state=5).sample(1)[0]
    fresh = clone(est).set_params(inner_lr=1e8)
    with pytest.raises(DivergenceError, match="lower inner_lr"):
        fresh.fit(task.X_support, task.y_support)
    with pytest.raises(NotFittedError):
        fresh.predict(task.X_query)
    before = est.fit(task.X_support, task.y_support).predict(task.X_query)
    with pytest.raises(DivergenceError, match=r"inner_lr=1e\+08"):
        est.set_params(inner_lr=1e8).fit(task.X_support, task.y_support)
    np.testing.assert_array_equal(est.predict(task.X_query), before)


def test_clip_grad_norm_is_validated_and_used(monkeypatch):
    seen = []
    real = MetaLearner.meta_step

    def step(self, batches, **kwargs):
        seen.append(kwargs.get("clip_grad_norm"))
        return real(self, batches, **kwargs)

    monkeypatch.setattr(MetaLearner, "meta_step", step)
    make(meta_iterations=2, clip_grad_norm=2.5).meta_fit(tasks())
    assert seen == [2.5, 2.5]


# ---------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_and_restores_best():
    est = make(meta_iterations=50, patience=2, min_delta=1e9).meta_fit(tasks(), VAL)
    # The first evaluation improves on infinity, the next two do not by 1e9: stop at 3.
    assert len(est.meta_history_) == 3
    assert est.meta_init_.metadata["best_iteration"] == int(
        np.argmin([r["validation_loss"] for r in est.meta_history_]) + 1
    )


def test_early_stopping_patience_counts_evaluations():
    est = make(meta_iterations=50, patience=1, min_delta=1e9, validation_interval=3)
    est.meta_fit(tasks(), VAL)
    assert len(est.meta_history_) == 6


def test_patience_without_validation_tasks_is_an_error():
    est = make(patience=3)
    with pytest.raises(ValueError, match="validation_tasks"):
        est.meta_fit(tasks())
    assert not hasattr(est, "meta_init_")


# ---------------------------------------------------------------------------- progress, logs


def test_verbose_shows_a_progress_bar_with_losses(capsys):
    make(meta_iterations=3, verbose=1).meta_fit(tasks(), VAL)
    err = capsys.readouterr().err
    assert "3/3" in err and "meta_loss=" in err and "val_loss=" in err


def test_quiet_by_default(capsys):
    make(meta_iterations=3).meta_fit(tasks(), VAL)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_logs_go_to_the_metafit_logger(caplog):
    with caplog.at_level(logging.DEBUG, logger="metafit"):
        make(meta_iterations=2).meta_fit(tasks())
    names = {r.name for r in caplog.records}
    assert names and all(n.startswith("metafit") for n in names)
    assert any("iteration 2" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- history


def test_meta_history_is_a_list_of_dicts_that_becomes_a_frame():
    est = make(meta_iterations=4, validation_interval=2).meta_fit(tasks(), VAL)
    h = est.meta_history_
    assert isinstance(h, MetaHistory) and isinstance(h, list) and isinstance(h[0], dict)
    assert set(h[0]) == {"iteration", "meta_loss", "validation_loss", "time"}
    assert h.column("validation_loss")[0] is None
    frame = h.to_frame()
    assert list(frame.columns) == ["meta_loss", "validation_loss", "time"]
    assert list(frame.index) == [1, 2, 3, 4] and np.isnan(frame["validation_loss"].iloc[0])
    back = pickle.loads(pickle.dumps(h))
    assert type(back) is MetaHistory and back == h
    with pytest.raises(KeyError, match="meta_loss"):
        h.column("loss")


# --------------------------------------------------------------------------- snapshots


def _assert_same_state(a: TrainingState, b: TrainingState) -> None:
    assert a.iteration == b.iteration and list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for i, entry in a.optimizer["state"].items():
        assert entry.keys() == b.optimizer["state"][i].keys()
        for key, value in entry.items():
            assert torch.equal(value, b.optimizer["state"][i][key]), (i, key)
    assert a.scheduler == b.scheduler


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "reptile"])
def test_reused_snapshots_equal_full_captures_and_stay_copies(algorithm):
    """A snapshot written into an earlier state's tensors holds exactly what a fresh
    capture holds (parameters, extras, optimizer moments and settings, scheduler), and
    later steps do not change it; after a restore (which replaces the optimizer's state
    tensors) it still reads the live ones."""
    from metafit.training import _Snapshots

    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, 1, (8, 8)), loss="mse", algorithm=algorithm, inner_lr=0.01,
                          inner_steps=2)
    learner.init_optimizer(1e-2, 10)
    batch = SinusoidTasks(5, 5, random_state=0).sample_batch(4, np.random.default_rng(0))
    snapshots = _Snapshots(learner)
    first = snapshots.capture(0)
    learner.meta_step([batch])
    spare = snapshots.capture(1)
    for iteration in (2, 3):
        learner.meta_step([batch])
        tensors = dict(spare.tensors)
        state = snapshots.capture(iteration, spare)
        assert state is spare and all(state.tensors[k] is v for k, v in tensors.items())
        _assert_same_state(state, TrainingState.capture(learner, iteration))
    frozen = TrainingState.capture(learner, 3)
    learner.meta_step([batch])
    _assert_same_state(state, frozen)  # a copy, not a view of the live tensors
    first.restore(learner)  # back to iteration 0: no optimizer state at all
    learner.meta_step([batch])
    again = snapshots.capture(1, state)  # the optimizer's state was rebuilt: still exact
    _assert_same_state(again, TrainingState.capture(learner, 1))
    had_state = bool(again.optimizer["state"])  # Reptile's SGD keeps none
    learner.optimizer.state.clear()  # a structure the spare does not have: a full capture
    fresh = snapshots.capture(5, again)
    assert (fresh is not again) == had_state and fresh.optimizer["state"] == {}
    _assert_same_state(fresh, TrainingState.capture(learner, 5))


@pytest.mark.parametrize("algorithm", ["lmm", "alpaca"])
def test_a_table_runs_checkpoint_holds_what_the_estimator_kept(tmp_path, algorithm):
    """The last checkpoint is rewritten with the state kept (the best validation state,
    the noise calibrated and lmm's REML prior), so meta_init= loads the same model."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 12)
    X = rng.normal(size=(240, 2))
    y = rng.normal(size=20)[groups] + X @ np.array([1.0, -2.0]) + 0.3 * rng.normal(size=240)
    path = tmp_path / "table.safetensors"
    kw = dict(algorithm=algorithm, hidden_sizes=(8,), meta_iterations=30, random_state=0,
              verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MetaInitializedRegressor(checkpoint_path=path, checkpoint_interval=10,
                                       **kw).meta_fit(X, y, groups=groups)
    loaded = MetaInit.load(path)
    assert same_tensors(loaded.tensors, est.meta_init_.tensors)
    rows = np.flatnonzero(groups == 3)
    a = MetaInitializedRegressor(meta_init=str(path), **kw).fit(X[rows[:5]], y[rows[:5]])
    np.testing.assert_allclose(a.predict(X[rows[5:]]),
                               est.fit(X[rows[:5]], y[rows[:5]]).predict(X[rows[5:]]),
                               rtol=1e-5)
