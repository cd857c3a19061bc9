"""Ready-made training callbacks for :func:`metafit.training.meta_train`.

The estimators assemble these from their parameters (``verbose``, ``patience``,
``checkpoint_path``); code driving :func:`~metafit.training.meta_train` directly can use
them as they are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from metafit._checks import check_int
from metafit.learner import MetaLearner
from metafit.persistence import MetaInit
from metafit.training import HistoryRecord, StopTraining, TrainingCallback

__all__ = ["BestState", "Checkpoint", "EarlyStopping", "ProgressBar"]

logger = logging.getLogger(__name__)


class ProgressBar(TrainingCallback):
    """A tqdm progress bar showing the meta-loss and the latest validation loss.

    Parameters
    ----------
    desc : str, default="meta_fit"
        Label on the left of the bar.
    file : file object, optional
        Where the bar is drawn; tqdm's default (stderr) if None.
    leave : bool, default=True
        Keep the finished bar on screen.
    """

    def __init__(self, desc: str = "meta_fit", file=None, leave: bool = True):
        self.desc = desc
        self.file = file
        self.leave = leave
        self.bar = None
        self._val = None

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=self.desc, file=self.file, leave=self.leave)
        self._val = None

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        if self.bar is None:
            return
        if self.bar.n == 0 and record.iteration > 1:
            self.bar.update(record.iteration - 1)  # warm start: show what was done before
        if record.validation_loss is not None:
            self._val = record.validation_loss
        postfix = {"meta_loss": f"{record.meta_loss:.4g}"}
        if self._val is not None:
            postfix["val_loss"] = f"{self._val:.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_train_end(self, learner: MetaLearner, history: list[HistoryRecord]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BestState(TrainingCallback):
    """Remember the meta-parameters with the lowest validation loss seen so far.

    Parameters
    ----------
    best_loss : float, default=inf
        Best validation loss before this run (warm start).
    best_iteration : int or None
        Iteration of ``best_loss``.
    best_tensors : dict of str to Tensor, optional
        The state of ``best_loss``.

    Attributes
    ----------
    best_loss, best_iteration, best_tensors
        Updated whenever a validation loss is strictly lower.
    """

    def __init__(
        self,
        best_loss: float = math.inf,
        best_iteration: int | None = None,
        best_tensors: dict[str, torch.Tensor] | None = None,
    ):
        self.best_loss = float(best_loss)
        self.best_iteration = best_iteration
        self.best_tensors = best_tensors

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        val = record.validation_loss
        if val is not None and val < self.best_loss:
            self.best_loss = float(val)
            self.best_iteration = record.iteration
            self.best_tensors = learner.state_tensors()


class EarlyStopping(TrainingCallback):
    """Stop when the validation loss has not improved for ``patience`` evaluations.

    Validation runs every ``validation_interval`` iterations, so ``patience`` counts
    evaluations, not iterations. An evaluation improves when it is lower than the best
    one so far by more than ``min_delta``.

    Parameters
    ----------
    patience : int
        Evaluations without improvement before stopping (>= 1).
    min_delta : float, default=0.0
        Minimum decrease that counts as an improvement (>= 0).
    best_loss : float, default=inf
        Best validation loss before this run (warm start).
    wait : int, default=0
        Evaluations without improvement before this run (warm start).
    """

    def __init__(
        self, patience: int, min_delta: float = 0.0, best_loss: float = math.inf, wait: int = 0
    ):
        check_int("patience", patience)
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}.")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_loss = float(best_loss)
        self.wait = int(wait)
        self.stopped_iteration: int | None = None

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        val = record.validation_loss
        if val is None:
            return
        if val < self.best_loss - self.min_delta:
            self.best_loss = float(val)
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_iteration = record.iteration
            logger.info(
                "early stopping at iteration %d: no validation improvement over %.4g "
                "(min_delta=%g) in %d evaluations",
                record.iteration,
                self.best_loss,
                self.min_delta,
                self.patience,
            )
            raise StopTraining


class Checkpoint(TrainingCallback):
    """Write the meta-initialization to a file every ``interval`` iterations, atomically.

    The file is a :class:`~metafit.persistence.MetaInit` (safetensors) written to a
    temporary file in the same folder and renamed over ``path``, so the file on disk is
    always complete: a killed process loses at most ``interval`` iterations. Load it with
    ``meta_init=path`` (adapt with ``fit``, or continue with ``warm_start=True``). The
    metadata records the ``iteration``. The last completed iteration is also written when
    training ends for any reason.

    Parameters
    ----------
    path : str or path-like
        Destination file; its folder is created if needed.
    interval : int
        Write every this many iterations (>= 1).
    make_meta_init : callable
        ``make_meta_init(learner, iteration) -> MetaInit`` builds the artifact.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        interval: int,
        make_meta_init: Callable[[MetaLearner, int], MetaInit],
    ):
        check_int("checkpoint interval", interval)
        self.path = Path(path)
        self.interval = interval
        self.make_meta_init = make_meta_init
        self.last_written: int | None = None

    def write(self, learner: MetaLearner, iteration: int) -> None:
        """Write the current state of ``learner`` as iteration ``iteration``."""
        self.make_meta_init(learner, iteration).save(self.path)
        self.last_written = iteration
        logger.debug("checkpoint of iteration %d written to %s", iteration, self.path)

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        if record.iteration % self.interval == 0:
            self.write(learner, record.iteration)

    def on_train_end(self, learner: MetaLearner, history: list[HistoryRecord]) -> None:
        # meta_train restores the last completed iteration before calling this, so the
        # learner matches history[-1] even after an interrupt or a divergence.
        if history and self.last_written != history[-1].iteration:
            self.write(learner, history[-1].iteration)
