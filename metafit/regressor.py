"""The scikit-learn regressor over the meta-learning engine."""

from __future__ import annotations

import numpy as np
from sklearn.base import RegressorMixin
from torch import nn

from metafit._validation import unchanged_on_error
from metafit.estimator import MetaInitializedEstimator

__all__ = ["MetaInitializedRegressor"]


class MetaInitializedRegressor(RegressorMixin, MetaInitializedEstimator):
    """A neural regressor that adapts a meta-learned initialization in a few steps.

    See :class:`metafit.estimator.MetaInitializedEstimator` for the parameters. Targets
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

    _loss = "mse"
    _estimator_kind = "regressor"

    def _meta_outputs(self, tasks):
        y = tasks[0].y_support
        return 1 if y.ndim == 1 else int(y.shape[1])

    def _check_task_outputs(self, task, n_outputs):
        got = 1 if task.y_support.ndim == 1 else task.y_support.shape[1]
        if got != n_outputs or not np.issubdtype(task.y_support.dtype, np.number):
            raise ValueError(
                f"a task has {got} numeric target column(s) (dtype {task.y_support.dtype}); "
                f"the first task had {n_outputs}. All tasks must share their targets."
            )

    @property
    def _n_outputs_for_fit(self):
        return getattr(self, "_fit_outputs", 1)

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
        with unchanged_on_error(self):
            self._check_params()
            X, y, _ = self._fit_data(X, y, regression=True, multi_output=True, y_numeric=True)
            y = np.asarray(y, dtype=np.float32)
            self._fit_outputs = 1 if y.ndim == 1 else y.shape[1]
            init = self._fit_init()
            self._check_init_features(init, X)
            if init is not None and init.n_outputs != self._fit_outputs:
                raise ValueError(
                    f"y has {self._fit_outputs} output column(s) but the meta-learned "
                    f"initialization predicts {init.n_outputs}; use the targets of "
                    "meta-training."
                )
            self._y_ndim = y.ndim
            self._adapt(X, y, init)
        return self

    def predict(self, X):
        """Predict with the adapted network.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        out = self._raw_predict(self._check_X_predict(X)).cpu().numpy()
        return out[:, 0].astype(np.float64) if self._y_ndim == 1 else out.astype(np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.regressor_tags.poor_score = True  # see metafit.estimator._POOR_SCORE
        return tags

    def _skorch_net(self, module, kwargs):
        from skorch import NeuralNetRegressor

        kwargs.setdefault("criterion", nn.MSELoss)
        kwargs.setdefault("lr", self.inner_lr)
        kwargs.setdefault("train_split", None)
        net = NeuralNetRegressor(module, **kwargs)
        return net.initialize()
