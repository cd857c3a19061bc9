"""Ready-made training callbacks for :func:`metafit.training.meta_train`.

The estimators assemble some of these from their parameters (``verbose``, ``patience``,
``checkpoint_path``), and take any of them, or callbacks of your own, in ``callbacks=``:
:class:`LRScheduler`, :class:`EarlyStopping`, :class:`Checkpoint`, :class:`TensorBoard`,
:class:`ProgressBar`. Code driving :func:`~metafit.training.meta_train` directly can use
them as they are.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from metafit._checks import check_int
from metafit.learner import MetaLearner
from metafit.persistence import MetaInit
from metafit.training import HistoryRecord, StopTraining, TrainingCallback

__all__ = [
    "BestState",
    "Checkpoint",
    "check_checkpoint_path",
    "EarlyStopping",
    "LRScheduler",
    "MetaFitContext",
    "ProgressBar",
    "TensorBoard",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaFitContext:
    """What a ``meta_fit`` run tells its callbacks before it trains (see
    :meth:`~metafit.training.TrainingCallback.initialize`).

    Attributes
    ----------
    make_meta_init : callable
        ``make_meta_init(learner, iteration) -> MetaInit``: the run's artifact of the
        learner's current state.
    has_validation : bool
        Whether the run evaluates validation tasks (``validation_loss`` in the records).
    estimator : str
        The estimator's class name.
    """

    make_meta_init: Callable[[MetaLearner, int], MetaInit]
    has_validation: bool
    estimator: str = ""


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
    disable : bool or None, default=None
        tqdm's convention: None draws the bar only when ``file`` (stderr) is a terminal,
        so that no bar is written into a redirected log; False always draws it. With an
        explicit ``file``, None means False.
    """

    def __init__(self, desc: str = "meta_fit", file=None, leave: bool = True, disable=None):
        self.desc = desc
        self.file = file
        self.leave = leave
        self.disable = disable
        self.bar = None
        self._val = None

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc=self.desc,
            file=self.file,
            leave=self.leave,
            disable=False if self.disable is None and self.file is not None else self.disable,
        )
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

    def initialize(self, context: MetaFitContext) -> None:
        if not context.has_validation:
            raise ValueError(
                "EarlyStopping watches the validation loss: call "
                "meta_fit(tasks, validation_tasks=held_out_tasks)."
            )

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
    make_meta_init : callable, optional
        ``make_meta_init(learner, iteration) -> MetaInit`` builds the artifact; given to an
        estimator's ``callbacks=``, it defaults to the run's own.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        interval: int = 100,
        make_meta_init: Callable[[MetaLearner, int], MetaInit] | None = None,
    ):
        check_int("checkpoint interval", interval)
        self.path = Path(path)
        self.interval = interval
        self.make_meta_init = make_meta_init
        self.last_written: int | None = None
        self._warned = False

    def initialize(self, context: MetaFitContext) -> None:
        if self.make_meta_init is None:
            self.make_meta_init = context.make_meta_init
        check_checkpoint_path(self.path)

    def write(self, learner: MetaLearner, iteration: int) -> None:
        """Write the current state of ``learner`` as iteration ``iteration``.

        A write that fails (a full disk, a folder made read-only meanwhile) warns once
        and training goes on: the estimator still gets the result in memory.
        """
        self.save(self.make_meta_init(learner, iteration), iteration)

    def save(self, meta_init: MetaInit, iteration: int) -> None:
        """Write ``meta_init`` as the checkpoint of iteration ``iteration``, warning
        once (not raising) when the write fails, as :meth:`write` does."""
        try:
            meta_init.save(self.path)
        except OSError as exc:
            if not self._warned:
                warnings.warn(
                    f"checkpoint of iteration {iteration} not written ({exc}); meta-training "
                    "goes on, and the result stays in the estimator: save it with "
                    "save_meta_init when meta_fit returns.",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned = True
            return
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


def check_checkpoint_path(path) -> None:
    """Raise before any training when checkpoints could not be written to ``path``, or
    would overwrite a file that is not a metafit checkpoint.

    Raises
    ------
    ValueError
        ``path`` is a folder, lies under a regular file, in a folder that cannot be
        created or written, or names an existing file of another kind (``train.csv``).
    """
    from metafit.persistence import is_meta_init_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint_path {str(path)!r} is a folder; name a file in it.")
    if path.exists():
        if not is_meta_init_file(path):
            raise ValueError(
                f"checkpoint_path {str(path)!r} exists and is not a metafit checkpoint; "
                "metafit will not overwrite it. Choose another file name, or delete it."
            )
        return
    folder = path.parent
    while not folder.exists():  # the first folder up that exists decides
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(
            f"checkpoint_path {str(path)!r} lies under {str(folder)!r}, which is a file, not "
            "a folder."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"checkpoint_path {str(path)!r}: the folder {str(folder)!r} is not writable; "
            "choose a folder you can write to."
        )


class LRScheduler(TrainingCallback):
    """Step a torch learning-rate scheduler of the meta-optimizer every meta-iteration.

    As skorch's ``LRScheduler``: ``policy`` is a scheduler class of
    :mod:`torch.optim.lr_scheduler` or its name, built on the meta-optimizer when training
    begins with ``kwargs``. ``ReduceLROnPlateau`` steps with each validation loss.
    Algorithms with a schedule of their own (MAML++'s cosine, Reptile's linear decay)
    keep it; this one multiplies in.

    Parameters
    ----------
    policy : str or scheduler class, default="CosineAnnealingLR"
    **kwargs
        Arguments of the scheduler (``T_max`` of a cosine defaults to the iterations).

    Attributes
    ----------
    lr_ : list of float
        The learning rate after each meta-iteration.
    """

    def __init__(self, policy="CosineAnnealingLR", **kwargs):
        self.policy = policy
        self.kwargs = kwargs
        self.scheduler = None
        self.lr_: list[float] = []

    def _policy(self):
        policy = self.policy
        if isinstance(policy, str):
            policy = getattr(torch.optim.lr_scheduler, policy, None)
        if not (isinstance(policy, type) and hasattr(policy, "step")):
            raise ValueError(
                f"LRScheduler policy {self.policy!r} is not a scheduler of "
                "torch.optim.lr_scheduler (e.g. 'StepLR', 'CosineAnnealingLR')."
            )
        return policy

    def initialize(self, context: MetaFitContext) -> None:
        self._policy()

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        policy = self._policy()
        kwargs = dict(self.kwargs)
        if policy is torch.optim.lr_scheduler.CosineAnnealingLR:
            kwargs.setdefault("T_max", max(int(total), 1))
        self.scheduler = policy(learner.optimizer, **kwargs)
        self.lr_ = []

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if record.validation_loss is not None:
                self.scheduler.step(record.validation_loss)
        else:
            self.scheduler.step()
        self.lr_.append(float(learner.optimizer.param_groups[0]["lr"]))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["scheduler"] = None  # holds the optimizer; rebuilt each run
        return state


class TensorBoard(TrainingCallback):
    """Write the meta-loss, validation loss and meta learning rate as TensorBoard scalars.

    Uses :class:`torch.utils.tensorboard.SummaryWriter` (``pip install tensorboard``);
    view with ``tensorboard --logdir DIR``. The scalars are ``meta_loss``,
    ``validation_loss`` (where evaluated) and ``meta_lr``, indexed by meta-iteration.

    Parameters
    ----------
    log_dir : str or path
        Folder of the event files (created if needed).
    """

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = str(log_dir)
        self.writer = None

    def initialize(self, context: MetaFitContext) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "the TensorBoard callback needs the tensorboard package: pip install "
                "tensorboard"
            ) from exc

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.log_dir)

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        step = record.iteration
        self.writer.add_scalar("meta_loss", record.meta_loss, step)
        if record.validation_loss is not None:
            self.writer.add_scalar("validation_loss", record.validation_loss, step)
        self.writer.add_scalar("meta_lr", learner.optimizer.param_groups[0]["lr"], step)

    def on_train_end(self, learner: MetaLearner, history: list[HistoryRecord]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["writer"] = None
        return state
