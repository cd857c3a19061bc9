"""The scikit-learn classifier over the meta-learning engine."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import ClassifierMixin

from metafit.estimators._base import MetaInitializedEstimator
from metafit.estimators._inputs import predict_data
from metafit.estimators._targets import ClassificationTarget, module_outputs

__all__ = ["MetaInitializedClassifier", "module_outputs"]


class MetaInitializedClassifier(ClassifierMixin, MetaInitializedEstimator):
    """A neural classifier that adapts a meta-learned initialization in a few steps.

    Meta-training tasks carry class indices ``0..n_way-1`` (as
    :class:`metafit.tasks.NWayKShotTasks` produces); the head gets one output per index.
    ``fit`` accepts any labels (ints, strings): they are sorted into ``classes_`` and mapped
    onto the first ``len(classes_)`` outputs. A task with more classes than the head has
    outputs is an error; fewer is fine.

    See :class:`metafit.estimators.MetaInitializedEstimator` for the parameters.
    """

    _target = ClassificationTarget()

    def fit(self, X, y):
        """Adapt the (meta-learned) initialization to one classification task.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Labels of any kind (ints, strings, ...); at least two classes.

        Returns
        -------
        self : object

        Raises
        ------
        ValueError
            For the input errors of :meth:`MetaInitializedRegressor.fit`, continuous
            targets, a single class, or more classes than the meta-learned head has
            outputs. The estimator is left exactly as it was.
        """
        return self._fit(X, y)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True  # see metafit.estimators._base._POOR_SCORE
        return tags

    def _logits(self, X) -> np.ndarray:
        X = predict_data(self, X)
        logits = self._raw_predict(X)[:, : len(self.classes_)]
        return logits.cpu().numpy().astype(np.float64)

    def decision_function(self, X):
        """Confidence scores: the logits of the classes in ``classes_``.

        Returns
        -------
        ndarray of shape (n_samples,) for two classes (the logit of ``classes_[1]`` minus
        that of ``classes_[0]``), else (n_samples, n_classes)
        """
        logits = self._logits(X)
        if len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X):
        """Class probabilities (softmax of the logits), shape (n_samples, n_classes)."""
        return softmax(self._logits(X), axis=1)

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably."""
        return log_softmax(self._logits(X), axis=1)

    def predict(self, X):
        """Most probable class labels, shape (n_samples,)."""
        logits = self._logits(X)  # first: raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(logits, axis=1)]
