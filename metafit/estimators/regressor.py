"""The scikit-learn regressor over the meta-learning engine."""

from __future__ import annotations

import numpy as np
from sklearn.base import RegressorMixin

from metafit._threads import threads_for, torch_threads
from metafit.estimators._base import MetaInitializedEstimator
from metafit.estimators._inputs import predict_data
from metafit.estimators._targets import RegressionTarget

__all__ = ["MetaInitializedRegressor"]


class MetaInitializedRegressor(RegressorMixin, MetaInitializedEstimator):
    """A neural regressor that adapts a meta-learned initialization in a few steps.

    See :class:`metafit.estimators.MetaInitializedEstimator` for the parameters. Targets
    may be 1-D or 2-D (several outputs).

    Examples
    --------
    >>> from metafit import MetaInitializedRegressor
    >>> from metafit.tasks import SinusoidTasks
    >>> est = MetaInitializedRegressor(meta_iterations=20, random_state=0)
    >>> est = est.meta_fit(SinusoidTasks(k_shot=10, random_state=0))
    >>> task = SinusoidTasks(random_state=1).sample(1)[0]
    >>> est.fit(task.X_support, task.y_support).predict(task.X_query).shape
    (10,)
    """

    _target = RegressionTarget()

    def fit(self, X, y):
        """Adapt the (meta-learned) initialization to one task.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self : object

        Raises
        ------
        ValueError
            For NaN/inf, empty or 1-D X, non-numeric data, X and y of different lengths,
            or X/y that do not match the meta-learned initialization (features, outputs).
            The estimator is left exactly as it was.
        """
        return self._fit(X, y)

    def predict(self, X, return_std=False):
        """Predict with the adapted network.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        return_std : bool, default=False
            Also return the predictive standard deviation (scikit-learn's
            ``GaussianProcessRegressor`` convention); needs a Bayesian algorithm,
            ``algorithm="alpaca"``.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        y_std : ndarray of shape (n_samples,)
            Only with ``return_std=True``; in the units of ``y``. The standard deviation
            of ALPACA's predictive distribution: Student-t with the new task's own noise
            level (``ALPACA(noise="per_task")``, the default), Gaussian with
            ``noise="shared"``.
        """
        X = predict_data(self, X)
        prep = self.__dict__.get("_table_prep")
        scaling = None if prep is None else prep.scaling
        if return_std:
            mean, std = self._predict_distribution(X)
            if scaling is not None:
                mean, std = scaling.inverse_y(mean), scaling.inverse_std(std)
            return mean, std
        out = self._raw_predict(X).cpu().numpy()
        out = out[:, 0].astype(np.float64) if self._y_ndim == 1 else out.astype(np.float64)
        return out if scaling is None else scaling.inverse_y(out)

    def _predict_distribution(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        learner = self._learner
        Xt, _ = learner.as_tensors(X)
        try:
            with torch_threads(threads_for(learner.module, self.n_threads)):
                mean, var = learner.predict_distribution(self.adapted_params_, Xt.unsqueeze(0))
        except NotImplementedError as exc:  # its message, where it has one, says why
            what = str(exc) or f"meta-trained with algorithm={learner.algorithm.name!r}"
            raise ValueError(
                f"return_std=True needs a predictive distribution: this initialization is "
                f"{what}; meta-train with algorithm='alpaca' (a Bayesian last layer) for "
                "standard deviations."
            ) from None
        mean = mean[0].cpu().numpy().astype(np.float64)
        return mean, np.sqrt(var[0].cpu().numpy().astype(np.float64))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.regressor_tags.poor_score = True  # see metafit.estimators._base._POOR_SCORE
        return tags
