"""ALPACA: a meta-learned feature network under a Bayesian linear regression head
(Harrison, Sharma and Pavone 2018, "Meta-learning priors for efficient online Bayesian
regression").

The network maps a row to features ``phi(x)`` (its outputs, plus a constant 1 for the
intercept). A task's target is ``y = phi(x)^T w + noise`` with a prior
``w ~ N(k0, sigma^2 Lambda0^-1)`` and noise variance ``sigma^2``; ``k0``, ``Lambda0`` and
``sigma`` are meta-learned with the network. Adaptation is the closed-form posterior,

    Lambda_n = Phi^T Phi + Lambda0,    k_n = Lambda_n^-1 (Phi^T y + Lambda0 k0),

and a prediction has mean ``phi(x)^T k_n``. Meta-training minimizes the query rows'
negative log predictive likelihood. No gradient steps, no inner learning rate: ``fit``
is one small linear solve. With identity features this is a linear mixed model whose
random-effects covariance is ``sigma^2 Lambda0^-1``: the posterior mean is the BLUP.

The noise level of real groups differs from group to group (one state's output is
smooth, another's jumps), so by default each task's ``sigma^2`` has an inverse-gamma
prior, ``sigma^2 ~ IG(a0, a0 sigma0^2)`` (the Normal-Inverse-Gamma conjugate model).
Its posterior reads how far the task's own support rows lie from the prior's
prediction,

    a_n = a0 + n / 2,
    b_n = a0 sigma0^2 + (|y - Phi k_n|^2 + (k_n - k0)^T Lambda0 (k_n - k0)) / 2,

and a prediction is Student-t with ``2 a_n`` degrees of freedom and squared scale
``b_n / a_n (1 + phi(x)^T Lambda_n^-1 phi(x))``: wider for a task whose support rows
surprise the prior. The mean is the same as with a known noise.

Meta-training fits the network, the prior and ``sigma0`` with one known noise level
(``a0`` infinite: the paper's Gaussian model). Meta-training ``a0`` too was tried and
lost accuracy (it lets the network explain a hard group's errors as noise: sleepstudy's
query MSE 0.39 against 0.26); so ``a0`` and ``sigma0`` are fitted afterwards on held-out
tasks, by :meth:`ALPACA.calibrated_extras`. Until then, and with ``noise="shared"``,
every task has the noise ``sigma0^2``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from metafit.algorithms import _noise_prior
from metafit.algorithms._reml import reml_prior
from metafit.algorithms.base import MetaAlgorithm
from metafit.losses import row_mean

__all__ = ["ALPACA", "LinearMixedModel"]

#: added to the prior precision's diagonal, so that Cholesky never fails
_JITTER = 1e-5


def _prior_from_extras(extras) -> tuple[Tensor, Tensor]:
    """``(k0, Lambda0)`` computed from the extras; see :meth:`ALPACA._head_prior`."""
    raw, k0 = extras["alpaca_prior_factor"], extras["alpaca_prior_mean"]
    L = torch.tril(raw, -1) + torch.diag_embed(torch.exp(torch.diagonal(raw)))
    eye = torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    return k0, L @ L.T + _JITTER * eye


def _with_constant(features: Tensor) -> Tensor:
    """``[features, 1]``: the constant feature appended as a last column."""
    return torch.nn.functional.pad(features, (0, 1), value=1.0)


def _first_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The network's first layer when it is an ``nn.Linear`` (the first module without
    children: the layer the input meets first), else None."""
    first = next((m for m in module.modules() if not list(m.children())), None)
    return first if isinstance(first, torch.nn.Linear) else None


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
    noise : {"per_task", "shared"}, default="per_task"
        ``"per_task"``: each task's noise variance has an inverse-gamma prior, fitted
        on the held-out tasks after meta-training, and a posterior from its support
        rows (Student-t predictions). ``"shared"``: one noise variance for all tasks
        (Gaussian predictions).

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

    def __init__(self, n_features: int = 32, linear_features: bool = True,
                 noise: str = "per_task"):
        if isinstance(n_features, bool) or not isinstance(n_features, int) or not (
            1 <= n_features <= 4096
        ):
            raise ValueError(f"n_features must be an int in [1, 4096], got {n_features!r}.")
        if noise not in ("per_task", "shared"):
            raise ValueError(f"noise must be 'per_task' or 'shared', got {noise!r}.")
        self.n_features = n_features
        self.linear_features = bool(linear_features)
        self.noise = noise

    def get_config(self):
        return {"n_features": self.n_features, "linear_features": self.linear_features,
                "noise": self.noise}

    @classmethod
    def from_config(cls, config):
        if "n_features" in config and "noise" not in config:
            # saved before the per-task noise prior existed: one shared noise level
            config = {**config, "noise": "shared"}
        return cls(**config)

    def n_inputs_used(self, module) -> int:
        """How many raw inputs the head sees (0 unless ``linear_features`` applies)."""
        if not self.linear_features:
            return 0
        first = _first_linear(module)
        if first is None or first.in_features > 64:
            return 0
        return first.in_features

    def head_size(self, module) -> int:
        """The dimension of the head's weights: features, raw inputs, the constant."""
        return self.n_features + self.n_inputs_used(module) + 1

    def module_outputs(self, n_outputs: int) -> int:
        if n_outputs != 1:
            raise ValueError(
                f"algorithm='alpaca' models one target; y has {n_outputs} columns. Fit one "
                "estimator per target."
            )
        return self.n_features

    def extra_parameters(self, ctx):
        d = self.head_size(ctx.module)
        p = next(ctx.module.parameters())
        kw = {"dtype": p.dtype, "device": p.device}
        extras = {
            "alpaca_prior_mean": torch.zeros(d, **kw, requires_grad=True),
            # Lambda0 = L L^T with L lower triangular; the diagonal is exp(raw diagonal).
            "alpaca_prior_factor": torch.zeros(d, d, **kw, requires_grad=True),
            "alpaca_log_noise": torch.zeros((), **kw, requires_grad=True),
        }
        if self.noise == "per_task":
            # a0 = 1 + exp(raw) > 1 keeps every predictive variance finite. It starts
            # at 1 + e^12, where every task's noise is sigma0^2 in all but name, and is
            # not meta-trained (see the module's docstring): calibrated_extras fits it.
            extras["alpaca_log_shape"] = torch.full((), _noise_prior.SHARED_SHAPE, **kw,
                                                    requires_grad=True)
        return extras

    # ---------------------------------------------------------------- the model

    @staticmethod
    def prior(ctx) -> tuple[Tensor, Tensor, Tensor]:
        """``(k0, Lambda0, sigma^2)`` from the meta-learned extras."""
        k0, lam0 = ALPACA._head_prior(ctx)
        return k0, lam0, torch.exp(2 * ctx.extras["alpaca_log_noise"])

    @staticmethod
    def _head_prior(ctx) -> tuple[Tensor, Tensor]:
        """``(k0, Lambda0)``: the prior's mean and precision (``L L^T`` plus the jitter),
        kept by the learner from one ``fit`` to the next
        (:meth:`metafit.learner.MetaLearner.from_extras`)."""
        return ctx.from_extras("alpaca_head_prior", lambda: _prior_from_extras(ctx.extras),
                               ("alpaca_prior_mean", "alpaca_prior_factor"))

    def features(self, ctx, params, X: Tensor) -> Tensor:
        """``phi(X)`` with the constant feature: (T, n, n_features + 1)."""
        out = ctx.forward(params, X)
        if out.shape[-1] != self.n_features:
            raise ValueError(
                f"the network outputs {out.shape[-1]} features per row but "
                f"ALPACA(n_features={self.n_features}) expects {self.n_features}; build it "
                "with that many outputs (the estimators do so for module=None)."
            )
        if ctx.extras["alpaca_prior_mean"].shape[0] > out.shape[-1] + 1:
            out = torch.cat([out, X.flatten(2).to(out.dtype)], dim=-1)
        return _with_constant(out)

    def posterior(
        self, ctx, params, X: Tensor, y: Tensor, mask: Tensor | None = None,
        predictive: bool = True,
    ) -> dict[str, Tensor]:
        """The closed-form posterior of each task's head, as adapted "parameters".

        Padding rows (``mask`` 0) are zeroed out of the sufficient statistics
        ``Phi^T Phi`` and ``Phi^T y``. Without ``predictive``, the per-task noise prior's
        statistics are left out: the posterior mean does not read them.
        """
        k0, lam0 = self._head_prior(ctx)
        phi = self.features(ctx, params, X)
        y = y.reshape(y.shape[0], y.shape[1])
        if mask is not None:
            phi = phi * mask.unsqueeze(-1)
            y = y * mask
        # Kept as two transposes, not one shared: that reorders autograd's sums, and the
        # small tables' meta-training amplifies one rounding into other figures.
        chol = torch.linalg.cholesky(phi.transpose(1, 2) @ phi + lam0)
        rhs = phi.transpose(1, 2) @ y.unsqueeze(-1) + (lam0 @ k0).unsqueeze(-1)
        k_n = torch.cholesky_solve(rhs, chol)[..., 0]
        out = {**params, "alpaca.k": k_n, "alpaca.chol": chol}
        if self.noise == "per_task" and predictive:
            # The noise posterior's statistics: the support rows, and how far they lie
            # from the prior (the residual plus the prior's penalty, both at k_n).
            residual = y - (phi @ k_n.unsqueeze(-1))[..., 0]
            if mask is not None:
                residual = residual * mask
            shift = k_n - k0
            out["alpaca.rows"] = (
                torch.full_like(k_n[:, 0], y.shape[1]) if mask is None else mask.sum(1)
            )
            out["alpaca.surprise"] = residual.pow(2).sum(1) + (
                (shift @ lam0) * shift).sum(1)
        return out

    def _mean_and_features(self, ctx, adapted, X: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior predictive mean (T, n) and the features ``phi`` (T, n, d)."""
        params = {k: v for k, v in adapted.items() if not k.startswith("alpaca.")}
        phi = self.features(ctx, params, X)
        return (phi @ adapted["alpaca.k"].unsqueeze(-1))[..., 0], phi

    def _predictive_terms(self, ctx, adapted, X: Tensor):
        """Mean and ``1 + phi^T Lambda_n^-1 phi`` (each (T, n)): what every noise
        model's predictive is built from."""
        mean, phi = self._mean_and_features(ctx, adapted, X)
        solved = torch.linalg.solve_triangular(
            adapted["alpaca.chol"], phi.transpose(1, 2), upper=False
        )
        return mean, 1 + solved.pow(2).sum(1)

    def predictive_distribution(self, ctx, adapted, X: Tensor):
        """``(mean, squared scale, degrees of freedom)``: Student-t per task, or
        Gaussian (degrees of freedom None) for a shared noise level."""
        mean, spread = self._predictive_terms(ctx, adapted, X)
        raw_shape = ctx.extras.get("alpaca_log_shape")
        # at its start (and wherever the held-out tasks put it there) the prior is one
        # shared level: exactly the Gaussian model, not a Student-t within 1e-5 of it
        if raw_shape is None or float(raw_shape) >= _noise_prior.SHARED_SHAPE:
            return mean, self.prior(ctx)[2] * spread, None
        dof, scale2 = _noise_prior.student(adapted["alpaca.rows"], adapted["alpaca.surprise"],
                                           spread, raw_shape, ctx.extras["alpaca_log_noise"])
        return mean, scale2, dof

    def predictive(self, ctx, adapted, X: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance, each (T, n)."""
        mean, scale2, dof = self.predictive_distribution(ctx, adapted, X)
        if dof is None:
            return mean, scale2
        return mean, scale2 * dof / (dof - 2)

    # ---------------------------------------------------------------- hooks

    def adapt(self, ctx, X, y, *, track_graph: bool = True, mask=None, predictive: bool = True
              ) -> dict[str, Tensor]:
        theta = ctx.params()  # the forward takes shared (task-free) parameters
        if not track_graph:
            with torch.no_grad():
                posterior = self.posterior(ctx, theta, X, y, mask, predictive)
                return {k: v.detach() for k, v in posterior.items()}
        return self.posterior(ctx, theta, X, y, mask, predictive)

    def predict(self, ctx, adapted, X, step=None) -> Tensor:
        # the mean alone: the variance's triangular solve was most of a predict's time
        return self._mean_and_features(ctx, adapted, X)[0].unsqueeze(-1)

    def query_nll(self, ctx, adapted, batch) -> Tensor:
        """Per-row negative log predictive likelihood of the query rows, (T, n)."""
        mean, scale2, dof = self.predictive_distribution(ctx, adapted, batch.X_query)
        return _noise_prior.nll(mean, scale2, batch.y_query.reshape(mean.shape), dof)

    def evaluation_losses(self, ctx, adapted, batch, step=None) -> Tensor:
        return row_mean(self.query_nll(ctx, adapted, batch), batch.query_mask)

    def calibrated_extras(self, ctx, batches) -> dict[str, Tensor]:
        """The noise prior refitted to the held-out tasks' query rows after
        meta-training: the values that maximize their predictive likelihood.

        Meta-training fits the noise on the training tasks, which the features fit
        better than new ones: the intervals came out too narrow on new groups (produc,
        0.82 for 95%). The posterior mean does not depend on the noise, so only the
        intervals change. For a shared noise level the maximum is closed-form: ``sigma^2``
        times the mean of ``(y - mean)^2 / var`` over the query rows (the whole
        predictive variance is proportional to ``sigma^2``). For the per-task prior,
        ``a0`` and ``sigma0`` are fitted together: a grid, then L-BFGS from its best
        point (the posterior is computed once; only the two numbers vary).
        """
        terms = []
        with torch.no_grad():
            for batch in batches:
                adapted = self.adapt(ctx, batch.X_support, batch.y_support,
                                     track_graph=False, mask=batch.support_mask)
                mean, spread = self._predictive_terms(ctx, adapted, batch.X_query)
                keep = (torch.ones_like(mean) if batch.query_mask is None
                        else batch.query_mask.to(mean.dtype))
                y = batch.y_query.reshape(mean.shape)
                terms.append((adapted.get("alpaca.rows"), adapted.get("alpaca.surprise"),
                              mean, spread, y, keep))
        rows = sum(float(t[-1].sum()) for t in terms)
        if not rows:
            return {}
        log_noise = ctx.extras["alpaca_log_noise"].detach()
        log_shape = ctx.extras.get("alpaca_log_shape")
        if log_shape is None:
            noise = torch.exp(2 * log_noise)
            total = sum(float(((y - m).pow(2) / (noise * v) * w).sum())
                        for _, _, m, v, y, w in terms)
            if not math.isfinite(total) or total <= 0:
                return {}
            return {"alpaca_log_noise": log_noise + 0.5 * math.log(total / rows)}
        fitted = _noise_prior.fit_noise_prior(terms, float(log_noise))
        if fitted is None:
            return {}
        return {"alpaca_log_shape": log_shape.detach().new_tensor(fitted[0]),
                "alpaca_log_noise": log_noise.new_tensor(fitted[1])}

    def meta_gradients(self, ctx, batches):
        total = sum(b.n_tasks for b in batches)
        meta_params = ctx.meta_parameters()
        nll_parts, mse_parts = [], []
        for batch in batches:
            adapted = self.adapt(ctx, batch.X_support, batch.y_support, mask=batch.support_mask)
            # one known noise level sigma0^2 for every task (a0 is not meta-trained)
            mean, spread = self._predictive_terms(ctx, adapted, batch.X_query)
            yq = batch.y_query.reshape(mean.shape)
            nll = _noise_prior.nll(mean, self.prior(ctx)[2] * spread, yq)
            nll_parts.append(row_mean(nll, batch.query_mask).sum() / total)
            mse = row_mean((yq - mean).pow(2), batch.query_mask)
            mse_parts.append(mse.sum().detach() / total)
        loss = torch.stack(nll_parts).sum()
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        # The reported meta-loss is the query MSE, comparable with the other algorithms.
        return torch.stack(mse_parts).sum(), grads


class LinearMixedModel(ALPACA):
    """A linear mixed model: ALPACA with identity features.

    The head sees each row's columns and a constant, nothing learned: a task's target is
    ``y = [x, 1]^T w + noise`` with ``w ~ N(k0, sigma^2 Lambda0^-1)``, so ``k0`` holds the
    fixed effects and ``sigma^2 Lambda0^-1`` the covariance of random intercepts and
    slopes on every column. In table mode that prior is the model's REML estimate from
    the whole groups (:meth:`fitted_extras`; scored on the validation groups with the
    meta-training groups' estimate, then refitted with them), as statsmodels' ``MixedLM``
    would fit it; in task mode, where no group is seen whole, it is meta-learned on the
    query rows' predictive likelihood like ALPACA's prior. ``fit`` is the posterior
    mean, the mixed model's BLUP, and ``predict(X, return_std=True)`` its predictive
    standard deviation (with the per-task noise prior of ALPACA by default, fitted on
    the validation groups). It is the low-variance member of ``algorithm="auto"``'s
    ensemble on tables.

    Parameters
    ----------
    noise : {"per_task", "shared"}, default="per_task"
        As :class:`ALPACA`'s.

    Notes
    -----
    The estimators still build their network (``hidden_sizes``, one output); the model
    reads only its first layer's input count and never runs it, so any network that
    starts with an ``nn.Linear`` serves. Its weights stay as initialized.
    """

    name = "lmm"

    def __init__(self, noise: str = "per_task"):
        super().__init__(n_features=1, linear_features=True, noise=noise)

    def get_config(self):
        return {"noise": self.noise}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def n_inputs_used(self, module) -> int:
        first = _first_linear(module)
        if first is None:
            raise ValueError(
                "algorithm='lmm' reads the input columns from the network's first layer, "
                f"but {type(module).__name__} does not start with an nn.Linear; use the "
                "default network (module=None) or one that starts with a Linear layer."
            )
        return first.in_features

    def head_size(self, module) -> int:
        """The columns and the constant: no learned features."""
        return self.n_inputs_used(module) + 1

    def features(self, ctx, params, X: Tensor) -> Tensor:
        """``[X, 1]``: (T, n, n_columns + 1); the network is not run."""
        return _with_constant(X.flatten(2))

    def fitted_extras(self, ctx, groups) -> dict[str, Tensor]:
        """The prior's REML estimate from whole meta-training groups (table mode):
        ``k0`` the fixed effects, ``Lambda0`` the random effects' precision relative to
        the noise, ``sigma`` the noise (:mod:`metafit.algorithms._reml`); random slopes
        on the columns that vary within groups. Nothing when the groups cannot identify
        it; meta-training's values stay then."""
        if not groups:
            return {}
        designs = [_with_constant(X.flatten(1).unsqueeze(0))[0] for X, _ in groups]
        # a column constant within every group (a county's uranium, a school's mean SES)
        # has no within-group slope to vary: a fixed effect only
        varies = torch.stack([(d[:, :-1].amax(0) - d[:, :-1].amin(0)) > 1e-9 for d in designs])
        fixed_only = torch.nonzero(~varies.any(0)).flatten().tolist()
        fit = reml_prior(designs, [y for _, y in groups], jitter=_JITTER,
                         fixed_only=fixed_only)
        if fit is None:
            return {}
        beta, raw, sigma2 = fit
        return {"alpaca_prior_mean": beta, "alpaca_prior_factor": raw,
                "alpaca_log_noise": 0.5 * torch.log(sigma2)}
