"""The bookkeeping around ``meta_fit``: warm starts, callbacks, keeping the result.

:class:`MetaTrainingMixin` holds the parts of
:meth:`metafit.estimator.MetaInitializedEstimator.meta_fit` that are not the training loop
itself: where ``warm_start=True`` resumes from, which callbacks the parameters ask for
(validation-best state, early stopping, checkpoints, progress bar), and how a training
result becomes ``meta_init_``, ``meta_history_`` and the state a later warm start
continues.
"""

from __future__ import annotations

import math
import warnings

from metafit.callbacks import BestState, Checkpoint, EarlyStopping, ProgressBar
from metafit.training import InterruptedTrainingWarning, MetaHistory, TrainingState

__all__ = ["MetaTrainingMixin"]


class MetaTrainingMixin:
    """``meta_fit``'s warm-start, callback and result handling (a base of the estimators)."""

    def _warm_start_point(self, feature_shape, n_outputs: int) -> dict | None:
        """Where ``warm_start=True`` continues from: ``meta_init_``, else ``meta_init``."""
        saved = getattr(self, "_warm_state_", None)
        if hasattr(self, "meta_init_"):
            init, history = self.meta_init_, list(getattr(self, "meta_history_", []))
            if saved is not None and saved.get("meta_init") is not init:
                saved = None  # meta_init_ was replaced since: only its tensors are known
        else:
            init, history, saved = self._resolve_meta_init(), [], None
        if init is None:
            return None
        shape = init.metadata.get("feature_shape")
        if (shape is not None and list(shape) != list(feature_shape)) or (
            init.n_outputs != n_outputs
        ):
            raise ValueError(
                f"warm_start=True continues a meta-initialization for feature shape "
                f"{tuple(shape or ())} and {init.n_outputs} output(s), but these tasks have "
                f"{tuple(feature_shape)} and {n_outputs}; pass matching tasks or set "
                "warm_start=False to start over."
            )
        if saved is not None:
            return {**saved, "history": history}
        meta = init.metadata
        done = history[-1]["iteration"] if history else meta.get("iteration", 0)
        return {
            "state": TrainingState(int(done), init.tensors),
            "algorithm": meta.get("algorithm"),
            "history": history,
            "time": history[-1]["time"] if history else 0.0,
            "best_loss": float(meta.get("best_validation_loss", math.inf)),
            "best_iteration": meta.get("best_iteration"),
            "best_tensors": init.tensors if "best_iteration" in meta else None,
            "wait": 0,
        }

    def _training_callbacks(self, resume, val, make_meta_init):
        """The callbacks meta_fit's parameters ask for, plus the best-state tracker."""
        callbacks, best, stopper = [], None, None
        if val is not None:
            best = BestState()
            if resume is not None:
                best = BestState(
                    resume["best_loss"], resume["best_iteration"], resume["best_tensors"]
                )
            callbacks.append(best)
        if self.patience is not None:
            stopper = EarlyStopping(
                int(self.patience),
                float(self.min_delta),
                best_loss=math.inf if resume is None else resume["best_loss"],
                wait=0 if resume is None else resume["wait"],
            )
            callbacks.append(stopper)
        if self.checkpoint_path is not None:
            callbacks.append(
                Checkpoint(
                    self.checkpoint_path,
                    int(self.checkpoint_interval),
                    lambda learner, it: make_meta_init(learner.state_tensors(), it),
                )
            )
        if self.verbose:
            callbacks.append(ProgressBar(desc=f"meta_fit {type(self).__name__}"))
        return callbacks, best, stopper

    def _store_meta_training(self, result, resume, best, stopper, make_meta_init, use_best):
        """Set meta_init_, meta_history_ and the warm-start state from a training result."""
        previous = [] if resume is None else resume["history"]
        history = MetaHistory([*previous, *(r.as_dict() for r in result.history)])
        last = result.last_state.to_cpu()
        tensors, extra = last.tensors, {}
        if use_best and best is not None and best.best_tensors is not None:
            tensors = best.best_tensors
            extra = {
                "best_iteration": best.best_iteration,
                "best_validation_loss": best.best_loss,
            }
        self.meta_init_ = make_meta_init(tensors, last.iteration, **extra)
        self.meta_history_ = history
        self._warm_state_ = {
            "meta_init": self.meta_init_,
            "state": last,
            "algorithm": self.meta_init_.metadata["algorithm"],
            "time": history[-1]["time"] if history else 0.0,
            "best_loss": math.inf if best is None else best.best_loss,
            "best_iteration": None if best is None else best.best_iteration,
            "best_tensors": None if best is None else best.best_tensors,
            "wait": 0 if stopper is None else stopper.wait,
        }
        for attr in ("adapted_params_", "_learner", "_learner_key", "n_features_in_"):
            self.__dict__.pop(attr, None)

    def _warn_interrupted(self, result) -> None:
        meta = self.meta_init_.metadata
        if "best_iteration" in meta:
            kept = (
                f"the initialization with the best validation loss "
                f"({meta['best_validation_loss']:.4g}, iteration {meta['best_iteration']})"
            )
        else:
            kept = f"the initialization of the last completed iteration ({meta['iteration']})"
        warnings.warn(
            f"meta_fit was interrupted after {result.last_iteration} meta-iterations; the "
            f"estimator keeps {kept} and is ready for fit. Call meta_fit again with "
            "warm_start=True to resume.",
            InterruptedTrainingWarning,
            stacklevel=3,
        )
