"""Data-parallel meta-training over ``torch.distributed``.

When :meth:`~metafit.estimator.MetaInitializedEstimator.meta_fit` runs under ``torchrun``
(the environment variables ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
are set and ``WORLD_SIZE > 1``) or inside a process group the caller already initialized,
every process (rank) trains on its share of each meta-batch:

* **Tasks.** Every rank reads the same global task stream (same ``random_state``) and
  splits each global meta-batch of ``meta_batch_size`` tasks by stride: rank ``r`` of
  ``W`` takes tasks ``r, r + W, r + 2W, ...``. The union of the shares is exactly the
  meta-batch a single process would use, so a run on ``W`` processes reproduces the
  single-process run (up to float rounding) whatever ``W`` is.
* **Gradients.** Each rank's meta-gradient is the mean over its own tasks; the
  :meth:`DistributedMetaTraining.grad_hook` scales it by ``n_rank / n_total`` and sums
  over the ranks with one ``all_reduce``, which is the mean over the whole meta-batch
  even when the shares are unequal. Reptile's pseudo-gradient goes through the same
  hook. The recorded meta-loss is averaged the same way.
* **Parameters.** Rank 0's initial tensors are broadcast before the first step; since all
  ranks then apply the same averaged gradients, they end with identical parameters.
* **Files and progress.** Only rank 0 keeps the progress bar and the checkpoint
  callback; :func:`is_main_process` tells other code (the command line) who writes.
* **Failures.** The process group is created with a timeout (``METAFIT_DIST_TIMEOUT``
  seconds, default 300); a collective that fails because a peer died or timed out raises
  :class:`DistributedError` instead of hanging.

A process group that :func:`distributed_training` initialized from the environment is
destroyed when training ends; one the caller initialized is left alone.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from metafit._task_types import Task, TaskBatch
from metafit.callbacks import Checkpoint, ProgressBar
from metafit.learner import MetaLearner
from metafit.training import HistoryRecord, TrainingCallback

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "DistributedMetaTraining",
    "distributed_training",
    "is_main_process",
    "shard_indices",
]

logger = logging.getLogger(__name__)

#: Seconds a collective (or the rendezvous) may wait for the other ranks.
DEFAULT_TIMEOUT = 300.0
TIMEOUT_ENV = "METAFIT_DIST_TIMEOUT"
#: "auto" (default): distribute when launched by torchrun or inside a process group;
#: "0" / "off": always train in this process alone.
ENABLE_ENV = "METAFIT_DISTRIBUTED"

#: Callbacks that write files or draw on the terminal: rank 0 alone keeps them.
_RANK0_CALLBACKS = (ProgressBar, Checkpoint)


class DistributedError(RuntimeError):
    """A collective operation failed: a peer process died or did not answer in time."""


def dist_timeout() -> float:
    """The timeout in seconds from ``METAFIT_DIST_TIMEOUT`` (default 300).

    Raises
    ------
    ValueError
        If the variable is set but is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}; "
            f"e.g. {TIMEOUT_ENV}=600."
        )
    return value


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer (torchrun sets it), got {text!r}."
        ) from None


def _enabled() -> bool:
    value = os.environ.get(ENABLE_ENV, "auto").strip().lower()
    if value in ("", "auto", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{ENABLE_ENV} must be 'auto' or '0', got {value!r}.")


def _env_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun's variables, or None outside a launch."""
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if world is None or rank is None or world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world}).")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with "
            "torchrun (python -m torch.distributed.run), or set MASTER_ADDR and MASTER_PORT "
            f"to the address of rank 0; set {ENABLE_ENV}=0 to train without distribution."
        )
    return rank, world


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not distributed): the one that writes files.

    Uses the initialized process group if there is one, else torchrun's ``RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return (_env_int("RANK") or 0) == 0
    except ValueError:
        return True


def shard_indices(n_tasks: int, rank: int, world_size: int) -> range:
    """Positions, in a global meta-batch of ``n_tasks``, of the tasks rank ``rank`` takes.

    Examples
    --------
    >>> list(shard_indices(5, 0, 2)), list(shard_indices(5, 1, 2))
    ([0, 2, 4], [1, 3])
    """
    return range(rank, n_tasks, world_size)


class _NotDistributed:
    """What :func:`distributed_training` returns outside a launch: changes nothing."""

    active = False
    rank = 0
    world_size = 1
    grad_hook = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def prepare(self, learner: MetaLearner, callbacks: Sequence[TrainingCallback]):
        return list(callbacks)

    def shard(self, batches: Iterable[list[Task]]) -> Iterator[list[Task]]:
        return iter(batches)

    def close(self) -> None:
        return None


class _AverageMetaLoss(TrainingCallback):
    """Replace each record's meta-loss by the task-weighted mean over the ranks."""

    def __init__(self, parallel: DistributedMetaTraining):
        self.parallel = parallel

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        p = self.parallel
        t = torch.tensor(
            [record.meta_loss * p.weight], dtype=torch.float64, device=p.collective_device
        )
        p.all_reduce(t, "averaging the meta-loss")
        record.meta_loss = float(t)


class DistributedMetaTraining:
    """One data-parallel meta-training run over the default process group.

    Use as a context manager around building the learner and
    :func:`metafit.training.meta_train`: entering initializes the process group from
    torchrun's environment when none exists (and leaving destroys it again); then
    :meth:`prepare` broadcasts rank 0's tensors and filters the callbacks,
    :meth:`shard` gives this rank's share of every meta-batch and :meth:`grad_hook`
    averages the meta-gradients.

    Parameters
    ----------
    meta_batch_size : int
        Tasks per global meta-batch; must be at least the number of processes.
    device : str or torch.device, default="cpu"
        Where the learner lives; picks the backend (nccl for CUDA, else gloo) when this
        object initializes the process group.
    timeout : float, optional
        Seconds a collective may wait; defaults to ``METAFIT_DIST_TIMEOUT`` (300).

    Examples
    --------
    Driving :func:`~metafit.training.meta_train` by hand (``meta_fit`` does this)::

        with DistributedMetaTraining(25) as parallel:
            learner = MetaLearner(...)
            learner.init_optimizer(1e-3, 1000)
            callbacks = parallel.prepare(learner, callbacks)
            meta_train(learner, parallel.shard(iter_meta_batches(tasks, 25)),
                       iterations=1000, callbacks=callbacks,
                       grad_hook=parallel.grad_hook)
    """

    active = True

    def __init__(self, meta_batch_size: int, device="cpu", timeout: float | None = None):
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this build of PyTorch.")
        self.meta_batch_size = int(meta_batch_size)
        self.device = torch.device(device)
        self.timeout = dist_timeout() if timeout is None else float(timeout)
        self.owns_group = False
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            env = _env_world()
            if env is None:
                raise RuntimeError(
                    "no process group is initialized and no torchrun launch was detected "
                    "(RANK, WORLD_SIZE > 1, MASTER_ADDR, MASTER_PORT)."
                )
            self.rank, self.world_size = env
        if self.meta_batch_size < self.world_size:
            raise ValueError(
                f"meta_batch_size={self.meta_batch_size} is smaller than the number of "
                f"processes ({self.world_size}): every process needs at least one task per "
                f"meta-batch; set meta_batch_size >= {self.world_size} or launch fewer "
                "processes."
            )
        self._n_local = self._n_global = 1

    # ------------------------------------------------------------------ process group

    @property
    def backend(self) -> str:
        """The backend this object uses (or would use) for the learner's device."""
        if dist.is_initialized():
            return str(dist.get_backend_config())
        if self.device.type == "cuda" and dist.is_nccl_available():
            return "nccl"
        return "gloo"

    @property
    def collective_device(self) -> torch.device:
        """Device of the small tensors sent through collectives (CUDA under nccl)."""
        backend = self.backend
        if self.device.type == "cuda" or ("gloo" not in backend and "nccl" in backend):
            return self.device
        return torch.device("cpu")

    def __enter__(self) -> DistributedMetaTraining:
        if not dist.is_initialized():
            self._init_group()
        elif self.device.type == "cpu" and "gloo" not in self.backend:
            raise ValueError(
                f"the process group's backend is {self.backend!r}, which cannot reduce CPU "
                "tensors: set device='cuda' on the estimator, or initialize the group with "
                "backend='gloo' (or 'cpu:gloo,cuda:nccl')."
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # after a failure (a dead peer, say) tearing down may fail too: keep the cause
            self.close()
        except Exception as teardown:  # pragma: no cover - depends on the backend
            logger.warning("destroying the process group after an error failed: %s", teardown)

    def _init_group(self) -> None:
        backend = self.backend
        if backend == "nccl" and self.device.index is None:
            # One GPU per process: "cuda" means this node's local rank's GPU.
            torch.cuda.set_device(_env_int("LOCAL_RANK") or 0)
        logger.info(
            "joining process group as rank %d of %d (%s, timeout %g s)",
            self.rank,
            self.world_size,
            backend,
            self.timeout,
        )
        try:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} could not join the process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                f"{self.timeout:g} s: a peer process died or did not start, or the address "
                f"is wrong ({TIMEOUT_ENV} sets the limit). {type(exc).__name__}: {exc}"
            ) from exc
        self.owns_group = True

    def close(self) -> None:
        """Destroy the process group if this object created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            finally:
                self.owns_group = False

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum ``tensor`` over the ranks in place; a failure raises DistributedError."""
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM), what)

    def _collective(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as exc:
            limit = (
                f"within {self.timeout:g} s ({TIMEOUT_ENV} sets the limit)"
                if self.owns_group
                else "within the process group's timeout"
            )
            raise DistributedError(
                f"distributed meta-training failed on rank {self.rank} of {self.world_size} "
                f"while {what}: a peer process died or did not answer {limit}. Look at the "
                f"other processes' output for the first error. {type(exc).__name__}: {exc}"
            ) from exc

    # ------------------------------------------------------------------ training hooks

    def prepare(
        self, learner: MetaLearner, callbacks: Sequence[TrainingCallback] = ()
    ) -> list[TrainingCallback]:
        """Broadcast rank 0's tensors into ``learner``; return this rank's callbacks.

        The meta-loss averaging comes first, so the other callbacks see the global loss;
        progress bars and checkpoints are dropped on every rank but 0.
        """
        self.broadcast_parameters(learner)
        return self.callbacks_for_rank(callbacks)

    def callbacks_for_rank(self, callbacks: Sequence[TrainingCallback]) -> list[TrainingCallback]:
        """The meta-loss averaging, then ``callbacks`` less rank 0's on the other ranks."""
        keep = [
            cb for cb in callbacks if self.rank == 0 or not isinstance(cb, _RANK0_CALLBACKS)
        ]
        return [_AverageMetaLoss(self), *keep]

    def broadcast_parameters(self, learner: MetaLearner) -> None:
        """Copy rank 0's module state (parameters and buffers) and extras to every rank."""
        tensors = [*learner.module.state_dict().values(), *learner.extras.values()]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self._collective(
                lambda flat=flat: dist.broadcast(flat, src=0),
                "broadcasting the initial parameters from rank 0",
            )
            offset = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def shard(self, batches: Iterable[list[Task]]) -> Iterator[list[Task]]:
        """This rank's share (tasks ``rank, rank + W, ...``) of every global meta-batch.

        A final global meta-batch of a finite stream with fewer tasks than processes is
        dropped (every rank sees the same stream, so all stop together).

        Raises
        ------
        ValueError
            If the very first meta-batch has fewer tasks than processes.
        """
        for i, batch in enumerate(batches):
            n = len(batch)
            if n < self.world_size:
                if i == 0:
                    raise ValueError(
                        f"the tasks hold only {n} task(s) but {self.world_size} processes "
                        "train on them: pass at least one task per process."
                    )
                logger.warning(
                    "dropping the last meta-batch: %d task(s) for %d processes", n, self.world_size
                )
                return
            mine = shard_indices(n, self.rank, self.world_size)
            if isinstance(batch, TaskBatch):
                local = batch.select(mine)
            else:
                local = [batch[j] for j in mine]
            self._n_local, self._n_global = len(local), n
            yield local

    @property
    def weight(self) -> float:
        """This rank's share of the current meta-batch, ``n_rank / n_total``."""
        return self._n_local / self._n_global

    def grad_hook(self, grads: list[torch.Tensor]) -> None:
        """Replace the local mean meta-gradients by the mean over the whole meta-batch."""
        w = self.weight
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([grads[i].detach().reshape(-1) for i in idx]) * w
            self.all_reduce(flat, "averaging the meta-gradients")
            offset = 0
            for i in idx:
                n = grads[i].numel()
                grads[i] = flat[offset : offset + n].view_as(grads[i])
                offset += n


def distributed_training(
    meta_batch_size: int, device="cpu", timeout: float | None = None
) -> DistributedMetaTraining | _NotDistributed:
    """The distributed helper for this process, or a no-op when not distributed.

    Distributed when a process group is initialized, or torchrun's variables are set with
    ``WORLD_SIZE > 1``, unless ``METAFIT_DISTRIBUTED=0``. Nothing is initialized until
    the returned object is entered as a context manager.

    Parameters
    ----------
    meta_batch_size, device, timeout
        See :class:`DistributedMetaTraining`.
    """
    if not _enabled() or not dist.is_available():
        return _NotDistributed()
    if not dist.is_initialized() and _env_world() is None:
        return _NotDistributed()
    return DistributedMetaTraining(meta_batch_size, device, timeout)
