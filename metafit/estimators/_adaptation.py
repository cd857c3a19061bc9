"""``inner_lr="auto"`` and ``inner_steps="auto"``: what ``fit`` adapts with, and how
``meta_fit`` chooses it on the held-out tasks.

After meta-training, when validation tasks exist (table mode's held-out groups, or the
``validation_tasks`` of task mode), :func:`choose_adaptation` scores a small grid of
learning rates around the meta-training rate and of step counts on them, the way
``RidgeCV`` scores its alphas, and the best pair is saved with the initialization
(``MetaInit.metadata["adaptation"]``), so that clones, saved files and ``meta_init=`` adapt
with it too. A number given for either parameter is used as it is, and only the other
one is searched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metafit import _torch_compat as compat
from metafit._checks import is_number
from metafit.losses import task_losses
from metafit.training import DivergenceError, data_scale

__all__ = [
    "AUTO",
    "AdaptationChoice",
    "check_adapted",
    "choose_adaptation",
    "fit_settings",
    "search_grid",
    "training_rate",
    "training_steps",
]

AUTO = "auto"
#: what "auto" means where nothing was chosen: no validation tasks, or a random start
DEFAULT_INNER_LR = 0.01
DEFAULT_INNER_STEPS = 5
#: the rates tried, as multiples of the meta-training rate
LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
#: the step counts tried (and the meta-training count); 0 is "no adaptation". 50 and 100
#: were added for small tables whose groups are nearly linear: on sleepstudy (18
#: subjects) they took the defaults' query MSE from 0.264 / 0.229 to 0.213 / 0.180 at
#: k = 3 / 5, and changed no choice on the other four tables of
#: benchmarks/grouped_tables.py (rates up to 30x and 200 steps gave nothing more).
STEP_CANDIDATES = (0, 1, 2, 5, 10, 20, 50, 100)


def training_rate(est) -> float:
    """The inner rate of meta-training: ``meta_inner_lr``, else a numeric ``inner_lr``,
    else the default."""
    if est.meta_inner_lr is not None:
        return float(est.meta_inner_lr)
    return float(est.inner_lr) if is_number(est.inner_lr) else DEFAULT_INNER_LR


def training_steps(est) -> int:
    """The inner steps of meta-training: ``meta_inner_steps``, else a numeric
    ``inner_steps``, else the default."""
    if est.meta_inner_steps is not None:
        return int(est.meta_inner_steps)
    return int(est.inner_steps) if is_number(est.inner_steps) else DEFAULT_INNER_STEPS


def fit_settings(est, init) -> tuple[float, int]:
    """``(inner_lr, inner_steps)`` that ``fit`` adapts with: the numbers given, else what
    ``meta_fit`` chose (``init.metadata["adaptation"]``), else the meta-training values,
    else the defaults."""
    meta = {} if init is None else init.metadata
    chosen = meta.get("adaptation") or {}
    if is_number(est.inner_lr):
        lr = float(est.inner_lr)
    else:
        lr = float(chosen.get("inner_lr", meta.get("inner_lr", DEFAULT_INNER_LR)))
    if is_number(est.inner_steps):
        steps = int(est.inner_steps)
    elif "inner_steps" in chosen:
        steps = int(chosen["inner_steps"])
    else:
        trained = None if init is None else init.trained_inner_steps
        steps = DEFAULT_INNER_STEPS if trained is None else int(trained)
    return lr, steps


def search_grid(est, algorithm, base_lr: float, trained_steps: int):
    """``(rates, steps)`` to score, or None when nothing is searched: both parameters are
    numbers, or the algorithm reads neither (ALPACA's closed form)."""
    search_lr = est.inner_lr == AUTO and algorithm.uses_inner_lr
    search_steps = est.inner_steps == AUTO and algorithm.uses_inner_steps
    if not (search_lr or search_steps):
        return None
    if search_lr:
        rates = [base_lr * f for f in LR_FACTORS]
    else:  # the number given, or one the algorithm ignores (its learned rates)
        rates = [float(est.inner_lr) if is_number(est.inner_lr) else base_lr]
    if search_steps:
        candidates = sorted({*STEP_CANDIDATES, int(trained_steps)})
        # Meta-SGD's rates suit the meta-training count: more would warn at fit
        counts = [s for s in candidates if algorithm.fit_warning(s, trained_steps) is None]
    else:
        counts = [int(est.inner_steps) if is_number(est.inner_steps) else int(trained_steps)]
    return rates, counts or [int(trained_steps)]


@dataclass(frozen=True)
class AdaptationChoice:
    """The pair ``fit`` will use and the mean validation loss of every pair tried."""

    inner_lr: float
    inner_steps: int
    scores: dict[tuple[float, int], float]

    def to_metadata(self) -> dict:
        """The ``MetaInit.metadata["adaptation"]`` entry (JSON-able)."""
        best = self.scores[(self.inner_lr, self.inner_steps)]
        return {
            "inner_lr": float(self.inner_lr),
            "inner_steps": int(self.inner_steps),
            "validation_loss": float(best),
            "scores": [[float(lr), int(s), float(v) if math.isfinite(v) else None]
                       for (lr, s), v in self.scores.items()],
        }


@torch.no_grad()
def choose_adaptation(learner, tasks, rates: Sequence[float], counts: Sequence[int]
                      ) -> AdaptationChoice:
    """Score every ``(rate, steps)`` pair by the mean query loss of ``tasks`` after
    adaptation and choose the lowest (a tie: the smaller rate, fewer steps).

    One inner loop per rate runs ``max(counts)`` steps and reads the query loss after
    each counted step, so the grid costs ``len(rates)`` adaptations of the tasks (0 steps,
    the same for every rate, is scored once). A pair whose loss is not finite on some
    task never wins. A paired one-standard-error rule towards gentler pairs was tried and
    measured worse on the benchmark's school tables (it stopped adapting where adapting
    helps).
    """
    rates = [float(r) for r in rates]
    wanted, most = set(counts), max(counts)
    totals = {(r, int(s)): 0.0 for r in rates for s in counts}
    n_tasks = 0
    for batch in learner.batches(tasks):
        n_tasks += batch.n_tasks

        def query_loss(params, steps, batch=batch) -> float:
            out = learner.predict(params, batch.X_query, step=learner.last_step(steps))
            return float(task_losses(learner.loss_fn, out, batch.y_query,
                                     batch.query_mask).sum())

        if 0 in wanted:
            start = learner.adapt(batch.X_support, batch.y_support, steps=0,
                                  track_graph=False, mask=batch.support_mask)
            at_start = query_loss(start, 0)
            for r in rates:
                totals[(r, 0)] += at_start
        if most == 0:
            continue
        for rate in rates:
            def record(step, params, rate=rate, query_loss=query_loss):
                if step + 1 in wanted:
                    totals[(rate, step + 1)] += query_loss(params, step + 1)

            with np.errstate(all="ignore"):
                learner.adapt(batch.X_support, batch.y_support, steps=most, inner_lr=rate,
                              track_graph=False, on_step=record, mask=batch.support_mask,
                              factored=True)
    scores = {k: (v / n_tasks if math.isfinite(v) else math.inf) for k, v in totals.items()}
    lr, steps = min(scores, key=lambda k: (scores[k], k[0], k[1]))
    return AdaptationChoice(lr, steps, scores)


def check_adapted(params, X, y, lr: float, steps: int, *, regression: bool) -> None:
    """Raise DivergenceError if ``fit``'s adaptation made a parameter NaN, infinite or
    huge, naming the data's scale or the rate as the likely cause.

    One fused norm per tensor and one sync; no forward pass, so no random numbers
    (dropout) are drawn outside the seeded fork. A norm overflows (|w| > ~1e19) long
    before the outputs of a diverging network stop being finite.
    """
    with torch.no_grad():
        norms = compat.foreach_norm(list(params.values()))
        finite = bool(torch.isfinite(torch.stack(norms)).all())
    if finite:
        return
    scale = data_scale(y=[y] if regression else [], X=[X])
    if scale is not None:
        advice = (
            f"most likely because of the data's scale: {scale[1]} reaches "
            f"{scale[0]:.3g}; standardize it as in meta-training (e.g. StandardScaler, "
            "TransformedTargetRegressor) rather than lowering inner_lr"
        )
    else:
        advice = f"lower inner_lr (e.g. to {lr / 10:g}) or inner_steps"
    raise DivergenceError(
        f"fit diverged: {steps} inner steps at inner_lr={lr:g} made the "
        f"parameters NaN or infinite; {advice}. The estimator was left as it was before "
        "this fit."
    )
