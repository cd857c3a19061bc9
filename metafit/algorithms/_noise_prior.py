"""The noise models of ALPACA's predictive distribution, as plain tensor functions.

One known noise level gives Gaussian predictions. A per-task noise variance with the
inverse-gamma prior ``IG(a0, a0 sigma0^2)`` (the Normal-Inverse-Gamma conjugate model)
gives Student-t predictions, whose posterior reads two statistics of each task's support
rows: their number ``n`` and their *surprise*, ``|y - Phi k_n|^2 + (k_n - k0)^T Lambda0
(k_n - k0)`` (how far they lie from the prior's prediction). The prior's two numbers are
kept raw, as ``log(a0 - 1)`` ("shape") and ``log(sigma0)`` ("noise"):
:func:`fit_noise_prior` fits them to held-out query rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SHARED_SHAPE", "fit_noise_prior", "nll", "student"]

#: log(a0 - 1) of a prior that is one shared noise level in all but name; the prior
#: starts there and is never fitted beyond it, and ALPACA predicts with the Gaussian
#: model there
SHARED_SHAPE = 12.0
#: the least log(a0 - 1) fitted: below it the variance of a task of few rows blows up
LEAST_SHAPE = -3.0


def nll(mean: Tensor, scale2: Tensor, y: Tensor, dof: Tensor | None = None) -> Tensor:
    """Negative log likelihood of each ``y``: Gaussian with variance ``scale2``, or
    Student-t with ``dof`` degrees of freedom and squared scale ``scale2``."""
    if dof is None:
        return 0.5 * (torch.log(2 * math.pi * scale2) + (y - mean).pow(2) / scale2)
    half = 0.5 * dof
    # in float64: at a0 near 1 + e^12 the two lgammas are 1e6 apart in float32 terms
    log_ratio = torch.lgamma(half.double()) - torch.lgamma(half.double() + 0.5)
    return (log_ratio.to(scale2.dtype)
            + 0.5 * torch.log(math.pi * dof * scale2)
            + (half + 0.5) * torch.log1p((y - mean).pow(2) / (dof * scale2)))


def student(rows: Tensor, surprise: Tensor, spread: Tensor, raw_shape: Tensor,
            raw_noise: Tensor) -> tuple[Tensor, Tensor]:
    """Degrees of freedom and squared scale of the Student-t predictive.

    ``rows`` and ``surprise`` are per task (T,), ``spread`` is ``1 + phi^T Lambda_n^-1
    phi`` per query row (T, n); the raw prior values broadcast in front of them (a grid
    of them gives a grid of predictives). The posterior is ``a_n = a0 + n / 2`` and
    ``b_n = a0 sigma0^2 + surprise / 2``; the predictive has ``2 a_n`` degrees of freedom
    and squared scale ``b_n / a_n * spread``.
    """
    shape = 1 + torch.exp(raw_shape)
    a_n = shape[..., None] + 0.5 * rows
    b_n = (shape * torch.exp(2 * raw_noise))[..., None] + 0.5 * surprise
    return (2 * a_n)[..., None], (b_n / a_n)[..., None] * spread


def fit_noise_prior(terms: Sequence[tuple[Tensor, ...]], raw_noise: float
                    ) -> tuple[float, float] | None:
    """Maximum-likelihood raw ``(shape, noise)`` of the Student-t predictive of held-out
    query rows; None where their likelihood is nowhere finite.

    Each term is one batch's ``(rows, surprise, mean, spread, y, keep)``, ``keep`` the
    query rows' weights (0 for padding). The posterior means and spreads do not depend on
    the prior, so they are computed once by the caller; only the two numbers vary: a grid
    (shapes from ``LEAST_SHAPE`` to ``SHARED_SHAPE``, noises within a factor e^3 of
    ``raw_noise``), then L-BFGS in float64 from its best point.
    """
    count = sum(float(t[-1].sum()) for t in terms)
    if not count:
        return None

    def mean_nll(shape: Tensor, noise: Tensor, terms=terms) -> Tensor:
        total = 0.0
        for rows, surprise, mean, spread, y, keep in terms:
            dof, scale2 = student(rows, surprise, spread, shape, noise)
            total = total + (nll(mean, scale2, y, dof) * keep).sum((-1, -2))
        return total / count

    dtype = terms[0][2].dtype
    with torch.no_grad():
        # steps of 0.5 and 0.25: a start for L-BFGS on a smooth surface, not the answer
        shapes = torch.linspace(LEAST_SHAPE, SHARED_SHAPE, 31, dtype=dtype)
        noises = raw_noise + torch.linspace(-3.0, 3.0, 25, dtype=dtype)
        # one shape at a time: (noises, tasks, rows) values in memory
        grid = torch.stack([mean_nll(shape, noises) for shape in shapes])
    grid = torch.nan_to_num(grid, nan=math.inf)
    if not torch.isfinite(grid).any():
        return None
    best = int(grid.argmin())
    start = (float(shapes[best // len(noises)]), float(noises[best % len(noises)]))
    exact = [tuple(t.double() for t in term) for term in terms]
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], max_iter=100, tolerance_grad=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = mean_nll(x[0], x[1], exact)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    x = x.detach()
    if not torch.isfinite(x).all() or not float(mean_nll(x[0], x[1], exact)) <= float(
            grid.min()):
        x = torch.tensor(start, dtype=torch.float64)
    shape = float(x[0].clamp(LEAST_SHAPE, SHARED_SHAPE))
    # held-out rows that the prior fits exactly would drive the noise to zero
    noise = float(x[1].clamp(raw_noise - 10, raw_noise + 10))
    return shape, noise
