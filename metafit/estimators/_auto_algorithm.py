"""``algorithm="auto"``: meta-train the candidates and keep them, weighted.

On a table (``meta_fit(X, y, groups=)``) with validation groups and one target, the
candidates are MAML (a network fine-tuned by gradient steps), ALPACA (a Bayesian linear
head on learned features, adapted in closed form) and ``"lmm"`` (the same head on the
columns themselves: a linear mixed model with random effects on every column). None wins
on every table (on the benchmark's tables, MAML where the groups differ by more than a
linear effect, the two Bayesian heads where a random-slopes model is nearly right).
Keeping the one with the lowest validation loss was tried first: with a handful of
held-out groups the choice was close to a coin toss, and float rounding alone (another
CPU) flipped it on three of the five tables of ``benchmarks/grouped_tables.py``. All are
kept instead, as one ensemble initialization whose ``predict`` is their weighted mean
(:mod:`metafit.ensemble`).

The weights are inversely proportional to each candidate's validation MSE (the
combination of forecasts of Bates and Granger, 1969, for errors of unequal size): equal
when the held-out groups cannot tell the candidates apart, leaning towards the better
ones when they can, never all on one. On the benchmark, with MAML and ALPACA, this was
never worse than equal weights on any table/k cell and better on five (mean ratio to the
best anchor 1.033 -> 1.021 on one machine, equal weights having beaten the validation
choice on 8 of 10 cells); the linear mixed model as a third member took it to 0.999
(``benchmarks/grouped_tables.py --algorithms maml alpaca lmm``, same machine).
Each candidate is an ordinary ``meta_fit`` of a clone with that algorithm; one that
diverges is left out (the others are kept), and every candidate's validation score
is kept in ``algorithm_scores_``. Anywhere else (task mode, a classifier, no validation,
several targets), ``"auto"`` is MAML.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.base import clone

from metafit.estimators._adaptation import fit_settings
from metafit.persistence import MetaInit
from metafit.training import DivergenceError

__all__ = ["AUTO_CANDIDATES", "candidates", "inverse_loss_weights", "meta_fit_auto"]

#: the algorithms ``"auto"`` compares on a table, in order of preference on a tie
AUTO_CANDIDATES = ("maml", "alpaca", "lmm")


def candidates(est, y, groups, validation_tasks, *, continued, regression: bool
               ) -> tuple[str, ...]:
    """The algorithms ``"auto"`` stands for with these (normalized) ``meta_fit``
    arguments; ``continued`` is the initialization a warm start continues, whose
    algorithm it keeps."""
    if continued is not None:
        if continued.members is not None:  # an ensemble continues every member
            return tuple(m.metadata.get("algorithm", "maml") for m in continued.members)
        return (continued.metadata.get("algorithm", "maml"),)
    held_out = validation_tasks is not None or bool(est.validation_fraction)
    one_target = y is not None and (np.ndim(y) == 1 or np.shape(y)[1] == 1)
    if groups is None or not regression or not held_out or not one_target:
        return ("maml",)
    return AUTO_CANDIDATES


def meta_fit_auto(est, X, y, groups, validation_tasks, names, continued=None) -> None:
    """Meta-fit a clone of ``est`` per algorithm in ``names``; keep those with a finite
    validation loss as an ensemble, or the one alone when only one has.

    A candidate that diverges is scored infinite and the others go on (its error is
    raised if none succeeds); an interrupt keeps the candidate it stopped and runs no
    other. Any other error (bad data) is raised at once: it concerns every candidate.
    ``continued`` is the initialization a warm start continues: an ensemble's members
    continue each from its own state.
    """
    scores, runs, failure, kept = {}, {}, None, None
    shown = scores if len(names) > 1 else {}  # algorithm_scores_ only after a comparison
    members = None
    if continued is not None and continued.members is not None:
        members = dict(zip(names, continued.members))
    for name in names:
        keep = est.checkpoint_path if len(names) == 1 else None
        run = clone(est).set_params(algorithm=name, checkpoint_path=keep)
        saved = est.__dict__.get("_warm_state_")
        if members is not None:  # this member's initialization, history and record
            run.meta_init_ = members[name]
            records = saved if isinstance(saved, dict) else {}  # none: read from a file
            warm, run.meta_history_ = records.get(name, (None, []))
            if warm is not None:
                run._warm_state_ = warm
        elif saved is not None:  # warm_start continues where est stopped
            run._warm_state_ = saved
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
    finite = [n for n in names if n in runs and math.isfinite(scores[n])]
    interrupted = any(r.__dict__.get("_interrupted_run") for r in runs.values())
    if len(finite) > 1 and not interrupted:  # the candidates that did not diverge
        _adopt_ensemble(est, [runs[n] for n in finite], shown, finite)
    else:
        _adopt(est, runs[best], shown, best)
    if est.checkpoint_path is not None and len(names) > 1:  # what was kept, as asked for
        est.meta_init_.save(est.checkpoint_path)


def inverse_loss_weights(losses) -> list[float]:
    """Weights proportional to ``1 / loss``, summing to 1 (equal for equal losses).

    A loss of 0 (a member that fits the held-out groups exactly) takes all the weight,
    shared with any other member at 0.

    Examples
    --------
    >>> inverse_loss_weights([0.2, 0.2])
    [0.5, 0.5]
    >>> inverse_loss_weights([0.1, 0.3])
    [0.75, 0.25]
    """
    losses = [float(v) for v in losses]
    if not losses or any(not math.isfinite(v) or v < 0 for v in losses):
        raise ValueError(f"weights need finite losses >= 0, got {losses}.")
    if min(losses) == 0:
        exact = [float(v == 0) for v in losses]
        return [v / sum(exact) for v in exact]
    inverse = [1.0 / v for v in losses]
    return [v / sum(inverse) for v in inverse]


def _adopt_ensemble(est, runs: list, scores: dict, names: list[str]) -> None:
    """Give ``est`` the candidates ``runs`` as one ensemble initialization, their
    predictions weighted by :func:`inverse_loss_weights` of their validation scores
    (:mod:`metafit.ensemble`). Its history and fitted settings are the first
    candidate's (the one whose rate and steps ``fit`` uses); the warm-start record keeps
    every member's, for a later ``warm_start=True``."""
    _adopt(est, runs[0], scores, "+".join(names))
    weights = inverse_loss_weights([scores[n] for n in names])
    init = MetaInit.ensemble([r.meta_init_ for r in runs], weights)
    est.meta_init_ = init
    est.algorithm_weights_ = dict(zip(names, weights))
    est._warm_state_ = {n: (r.__dict__.get("_warm_state_"), list(r.meta_history_))
                        for n, r in zip(names, runs)}
    est.inner_lr_, est.inner_steps_ = fit_settings(est, init)


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
