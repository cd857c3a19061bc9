"""ALPACA: a meta-learned feature network under a Bayesian linear regression head
(Harrison, Sharma and Pavone 2018, "Meta-learning priors for efficient online Bayesian
regression").

The network maps a row to features ``phi(x)`` (its outputs, plus a constant 1 for the
intercept). A task's target is ``y = phi(x)^T w + noise`` with a prior
``w ~ N(k0, sigma^2 Lambda0^-1)`` and noise variance ``sigma^2``; ``k0``, ``Lambda0`` and
``sigma`` are meta-learned with the network. Adaptation is the closed-form posterior,

    Lambda_n = Phi^T Phi + Lambda0,    k_n = Lambda_n^-1 (Phi^T y + Lambda0 k0),

and a prediction is Gaussian with mean ``phi(x)^T k_n`` and variance
``sigma^2 (1 + phi(x)^T Lambda_n^-1 phi(x))``. Meta-training minimizes the query rows'
negative log predictive likelihood. No gradient steps, no inner learning rate: ``fit``
is one small linear solve. With identity features this is a linear mixed model whose
random-effects covariance is ``sigma^2 Lambda0^-1``: the posterior mean is the BLUP.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from metafit.algorithms.base import MetaAlgorithm
from metafit.losses import row_mean

__all__ = ["ALPACA"]

#: added to the prior precision's diagonal, so that Cholesky never fails
_JITTER = 1e-5


def _first_leaf(module: torch.nn.Module):
    """The first module without children: the layer the input meets first."""
    return next((m for m in module.modules() if not list(m.children())), None)


class ALPACA(MetaAlgorithm):
    """Bayesian last layer with a meta-learned prior; closed-form adaptation.

    Parameters
    ----------
    n_features : int, default=32
        Features the network outputs (the estimator builds its module with this many
        outputs); a constant feature is added for the intercept. Regression with one
        target only.
    linear_features : bool, default=True
        Also give the head the network's inputs themselves, when the network starts with
        a linear layer of at most 64 inputs (tables): the head then contains a linear
        mixed model with random slopes on every column, and the network only adds what
        it is not.

    Notes
    -----
    ``fit`` ignores ``inner_lr`` and ``inner_steps``. ``predict(X, return_std=True)``
    returns the predictive standard deviation.
    """

    name = "alpaca"
    first_order = False
    closed_form: ClassVar[bool] = True
    regression_only: ClassVar[bool] = True
    #: the prior and the noise level need larger steps than a network's weights (at 1e-3
    #: the noise is still overestimated after 1000 meta-iterations: intervals too wide)
    default_meta_lr = 1e-2

    def __init__(self, n_features: int = 32, linear_features: bool = True):
        if isinstance(n_features, bool) or not isinstance(n_features, int) or not (
            1 <= n_features <= 4096
        ):
            raise ValueError(f"n_features must be an int in [1, 4096], got {n_features!r}.")
        self.n_features = n_features
        self.linear_features = bool(linear_features)

    def get_config(self):
        return {"n_features": self.n_features, "linear_features": self.linear_features}

    def n_inputs_used(self, module) -> int:
        """How many raw inputs the head sees (0 unless ``linear_features`` applies)."""
        if not self.linear_features:
            return 0
        first = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
        if first is None or first is not _first_leaf(module) or first.in_features > 64:
            return 0
        return first.in_features

    def module_outputs(self, n_outputs: int) -> int:
        if n_outputs != 1:
            raise ValueError(
                f"algorithm='alpaca' models one target; y has {n_outputs} columns. Fit one "
                "estimator per target."
            )
        return self.n_features

    def extra_parameters(self, ctx):
        d = self.n_features + self.n_inputs_used(ctx.module) + 1
        p = next(ctx.module.parameters())
        kw = {"dtype": p.dtype, "device": p.device}
        return {
            "alpaca_prior_mean": torch.zeros(d, **kw, requires_grad=True),
            # Lambda0 = L L^T with L lower triangular; the diagonal is exp(raw diagonal).
            "alpaca_prior_factor": torch.zeros(d, d, **kw, requires_grad=True),
            "alpaca_log_noise": torch.zeros((), **kw, requires_grad=True),
        }

    # ---------------------------------------------------------------- the model

    @staticmethod
    def prior(ctx) -> tuple[Tensor, Tensor, Tensor]:
        """``(k0, Lambda0, sigma^2)`` from the meta-learned extras."""
        e = ctx.extras
        raw = e["alpaca_prior_factor"]
        L = torch.tril(raw, -1) + torch.diag_embed(torch.exp(torch.diagonal(raw)))
        eye = torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
        return e["alpaca_prior_mean"], L @ L.T + _JITTER * eye, torch.exp(2 * e["alpaca_log_noise"])

    def features(self, ctx, params, X: Tensor) -> Tensor:
        """``phi(X)`` with the constant feature: (T, n, n_features + 1)."""
        out = ctx.forward(params, X)
        if out.shape[-1] != self.n_features:
            raise ValueError(
                f"the network outputs {out.shape[-1]} features per row but "
                f"ALPACA(n_features={self.n_features}) expects {self.n_features}; build it "
                "with that many outputs (the estimators do so for module=None)."
            )
        parts = [out, torch.ones_like(out[..., :1])]
        if ctx.extras["alpaca_prior_mean"].shape[0] > out.shape[-1] + 1:
            parts.insert(1, X.reshape(*X.shape[:2], -1).to(out.dtype))
        return torch.cat(parts, dim=-1)

    def posterior(
        self, ctx, params, X: Tensor, y: Tensor, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The closed-form posterior of each task's head, as adapted "parameters".

        Padding rows (``mask`` 0) are zeroed out of the sufficient statistics
        ``Phi^T Phi`` and ``Phi^T y``.
        """
        k0, lam0, _ = self.prior(ctx)
        phi = self.features(ctx, params, X)
        y = y.reshape(y.shape[0], y.shape[1])
        if mask is not None:
            phi = phi * mask.unsqueeze(-1)
            y = y * mask
        lam_n = phi.transpose(1, 2) @ phi + lam0
        chol = torch.linalg.cholesky(lam_n)
        rhs = phi.transpose(1, 2) @ y.unsqueeze(-1) + (lam0 @ k0).unsqueeze(-1)
        k_n = torch.cholesky_solve(rhs, chol)[..., 0]
        return {**params, "alpaca.k": k_n, "alpaca.chol": chol}

    def predictive(self, ctx, adapted, X: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance, each (T, n)."""
        params = {k: v for k, v in adapted.items() if not k.startswith("alpaca.")}
        phi = self.features(ctx, params, X)
        mean = (phi @ adapted["alpaca.k"].unsqueeze(-1))[..., 0]
        solved = torch.linalg.solve_triangular(
            adapted["alpaca.chol"], phi.transpose(1, 2), upper=False
        )
        _, _, noise = self.prior(ctx)
        return mean, noise * (1 + solved.pow(2).sum(1))

    # ---------------------------------------------------------------- hooks

    def adapt(self, ctx, X, y, *, track_graph: bool = True, mask=None) -> dict[str, Tensor]:
        theta = ctx.params()  # the forward takes shared (task-free) parameters
        if not track_graph:
            with torch.no_grad():
                posterior = self.posterior(ctx, theta, X, y, mask)
                return {k: v.detach() for k, v in posterior.items()}
        return self.posterior(ctx, theta, X, y, mask)

    def predict(self, ctx, adapted, X, step=None) -> Tensor:
        return self.predictive(ctx, adapted, X)[0].unsqueeze(-1)

    @staticmethod
    def _nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """Negative log predictive likelihood of each row."""
        return 0.5 * (torch.log(2 * math.pi * var) + (y - mean).pow(2) / var)

    def evaluation_losses(self, ctx, adapted, batch, step=None) -> Tensor:
        mean, var = self.predictive(ctx, adapted, batch.X_query)
        nll = self._nll(mean, var, batch.y_query.reshape(mean.shape))
        return row_mean(nll, batch.query_mask)

    @torch.no_grad()
    def calibrated_extras(self, ctx, batches) -> dict[str, Tensor]:
        """The noise level scaled so that the predictive variance matches the held-out
        tasks' query residuals: ``sigma^2 * s`` with ``s`` the mean of
        ``(y - mean)^2 / var`` over their query rows, the maximum-likelihood scale.

        The whole predictive variance is proportional to ``sigma^2`` (the prior covariance
        is ``sigma^2 Lambda0^-1``) and the posterior mean does not depend on it, so only
        the intervals change. Meta-training fits the noise on the training tasks, which
        the features fit better than new ones: the intervals came out too narrow on new
        groups where they are alike within a group (produc, 0.82 for 95%).
        """
        total, rows = 0.0, 0.0
        for batch in batches:
            adapted = self.adapt(ctx, batch.X_support, batch.y_support, track_graph=False,
                                 mask=batch.support_mask)
            mean, var = self.predictive(ctx, adapted, batch.X_query)
            ratio = (batch.y_query.reshape(mean.shape) - mean).pow(2) / var
            if batch.query_mask is not None:
                ratio = ratio * batch.query_mask
                rows += float(batch.query_mask.sum())
            else:
                rows += ratio.numel()
            total += float(ratio.sum())
        if not rows or not math.isfinite(total) or total <= 0:
            return {}
        log_noise = ctx.extras["alpaca_log_noise"].detach()
        return {"alpaca_log_noise": log_noise + 0.5 * math.log(total / rows)}

    def meta_gradients(self, ctx, batches):
        total = sum(b.n_tasks for b in batches)
        meta_params = ctx.meta_parameters()
        nll_parts, mse_parts = [], []
        for batch in batches:
            adapted = self.adapt(ctx, batch.X_support, batch.y_support, mask=batch.support_mask)
            mean, var = self.predictive(ctx, adapted, batch.X_query)
            yq = batch.y_query.reshape(mean.shape)
            nll = self._nll(mean, var, yq)
            nll_parts.append(row_mean(nll, batch.query_mask).sum() / total)
            mse = row_mean((yq - mean).pow(2), batch.query_mask)
            mse_parts.append(mse.sum().detach() / total)
        loss = torch.stack(nll_parts).sum()
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        # The reported meta-loss is the query MSE, comparable with the other algorithms.
        return torch.stack(mse_parts).sum(), grads
