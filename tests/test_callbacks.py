"""The ready-made training callbacks, on their own and inside meta_train."""

from __future__ import annotations

import io
import math
import os

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
