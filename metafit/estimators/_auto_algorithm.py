"""``algorithm="auto"``: meta-train the candidates and keep the one that does best on the
validation tasks.

On a table (``meta_fit(X, y, groups=)``) with validation groups and one target, the
candidates are MAML (a network fine-tuned by gradient steps) and ALPACA (a Bayesian
linear head on learned features, adapted in closed form): neither wins on every table
(on the benchmark's tables, MAML where the groups differ by more than a linear effect,
ALPACA where a random-slopes model is nearly right), and the held-out groups tell them
apart (the lower mean validation loss wins; a tie keeps MAML). Each candidate is an
ordinary ``meta_fit`` of a clone with that algorithm; the winner's fitted state is
adopted by the estimator, and every candidate's score is kept in ``algorithm_scores_``.
Anywhere else (task mode, a classifier, no validation, several targets), ``"auto"`` is
MAML.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.base import clone

from metafit.training import DivergenceError

__all__ = ["AUTO_CANDIDATES", "candidates", "meta_fit_auto"]

#: the algorithms ``"auto"`` compares on a table, in order of preference on a tie
AUTO_CANDIDATES = ("maml", "alpaca")


def candidates(est, y, groups, validation_tasks, *, continued, regression: bool
               ) -> tuple[str, ...]:
    """The algorithms ``"auto"`` stands for with these (normalized) ``meta_fit``
    arguments; ``continued`` is the initialization a warm start continues, whose
    algorithm it keeps."""
    if continued is not None:
        return (continued.metadata.get("algorithm", "maml"),)
    held_out = validation_tasks is not None or bool(est.validation_fraction)
    one_target = y is not None and (np.ndim(y) == 1 or np.shape(y)[1] == 1)
    if groups is None or not regression or not held_out or not one_target:
        return ("maml",)
    return AUTO_CANDIDATES


def meta_fit_auto(est, X, y, groups, validation_tasks, names) -> None:
    """Meta-fit a clone of ``est`` per algorithm in ``names``, adopt the best into ``est``.

    A candidate that diverges is scored infinite and the others go on (its error is
    raised if none succeeds); an interrupt keeps the candidate it stopped and runs no
    other. Any other error (bad data) is raised at once: it concerns every candidate.
    """
    scores, runs, failure, kept = {}, {}, None, None
    shown = scores if len(names) > 1 else {}  # algorithm_scores_ only after a comparison
    for name in names:
        keep = est.checkpoint_path if len(names) == 1 else None
        run = clone(est).set_params(algorithm=name, checkpoint_path=keep)
        if "_warm_state_" in est.__dict__:  # warm_start continues where est stopped
            run._warm_state_ = est._warm_state_
        try:
            run.meta_fit(X, y, groups=groups, validation_tasks=validation_tasks)
        except DivergenceError as exc:
            failure = failure or exc
            scores[name] = math.inf
            if kept is None and _trained(run, est):  # its last finite state
                kept = (run, name)
            continue
        except BaseException:
            if _trained(run, est):  # Ctrl-C with on_interrupt="raise": keep it
                _adopt(est, run, shown, name)
            raise
        score = run.meta_init_.metadata.get("validation_score")
        scores[name] = math.inf if score is None else float(score)
        runs[name] = run
        if run.__dict__.get("_interrupted_run"):
            break
        if "validation_score" not in run.meta_init_.metadata:
            # no validation tasks after all (a table too small to hold groups out; the
            # run warned): nothing to compare the candidates by, so the first is kept
            names, shown = names[: names.index(name) + 1], {}
            break
    if not runs:  # every candidate diverged: keep the first one's last finite state
        if kept is not None:
            _adopt(est, kept[0], shown, kept[1])
        raise failure
    best = min(runs, key=lambda n: (scores[n], names.index(n)))
    if len(names) > 1 and not math.isfinite(scores[best]):
        warnings.warn(
            "algorithm='auto': no candidate had a finite validation loss; keeping "
            f"{best!r}. Choose an algorithm, or check the validation groups.",
            UserWarning, stacklevel=3,
        )
    _adopt(est, runs[best], shown, best)
    if est.checkpoint_path is not None and len(names) > 1:  # the winner's, as asked for
        est.meta_init_.save(est.checkpoint_path)


def _trained(run, est) -> bool:
    """Whether the candidate ``run`` has a state of its own (a clone starts with ``est``'s
    initialization, which an error before any work leaves in place)."""
    return getattr(run, "meta_init_", None) is not getattr(est, "meta_init_", None)


def _adopt(est, run, scores: dict, name: str) -> None:
    """Give ``est`` the fitted state of the candidate ``run`` (its attributes ending in
    ``_``, the warm-start record included); a fitted state ``run`` lacks, such as an old
    ``fit``'s, goes."""
    fitted = {k: v for k, v in run.__dict__.items() if k.endswith("_")}
    stale = [k for k in est.__dict__ if k.endswith("_") and k not in fitted]
    for key in [*stale, "_learner", "_learner_key"]:
        est.__dict__.pop(key, None)
    est.__dict__.update(fitted)
    est.algorithm_ = name
    if scores:
        est.algorithm_scores_ = dict(scores)
