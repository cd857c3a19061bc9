"""The scikit-learn classifier over the meta-learning engine."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import ClassifierMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from torch import nn

from metafit._validation import unchanged_on_error
from metafit.estimator import MetaInitializedEstimator
from metafit.tasks import Task

__all__ = ["MetaInitializedClassifier", "module_outputs"]


class MetaInitializedClassifier(ClassifierMixin, MetaInitializedEstimator):
    """A neural classifier that adapts a meta-learned initialization in a few steps.

    Meta-training tasks carry class indices ``0..n_way-1`` (as
    :class:`metafit.tasks.NWayKShotTasks` produces); the head gets one output per index.
    ``fit`` accepts any labels (ints, strings): they are sorted into ``classes_`` and mapped
    onto the first ``len(classes_)`` outputs. A task with more classes than the head has
    outputs is an error; fewer is fine.

    See :class:`metafit.estimator.MetaInitializedEstimator` for the parameters.
    """

    _loss = "cross_entropy"
    _estimator_kind = "classifier"

    def _prepare_task(self, task):
        task = task if isinstance(task, Task) else Task.from_tuple(task)
        for y in (task.y_support, task.y_query):
            if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min() < 0:
                raise ValueError(
                    "classification tasks need 1-D integer class indices >= 0 as targets "
                    f"(got dtype {y.dtype}, shape {y.shape}); NWayKShotTasks remaps labels "
                    "for you."
                )
        return task

    def _meta_outputs(self, tasks):
        return int(max(max(t.y_support.max(), t.y_query.max()) for t in tasks)) + 1

    def _check_task_outputs(self, task, n_outputs):
        top = int(max(task.y_support.max(), task.y_query.max()))
        if top >= n_outputs:
            raise ValueError(
                f"a task has class index {top} but the head has {n_outputs} outputs (set by "
                "the first meta-batch); use the same n_way for all tasks."
            )

    @property
    def _n_outputs_for_fit(self):
        return len(getattr(self, "classes_", ())) or 2

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
        with unchanged_on_error(self):
            self._check_params()
            X, y, fast = self._fit_data(X, y, regression=False)
            if fast:
                classes, codes = np.unique(y, return_inverse=True)
            else:
                check_classification_targets(y)
                encoder = LabelEncoder().fit(y)
                classes, codes = encoder.classes_, encoder.transform(y)
            if len(classes) < 2:
                raise ValueError(
                    f"y contains only one class ({classes[0]!r}); a classifier needs at least "
                    "2 classes to fit."
                )
            init = self._fit_init()
            self._check_init_features(init, X)
            if init is not None and len(classes) > init.n_outputs:
                raise ValueError(
                    f"y has {len(classes)} classes but the meta-learned head has "
                    f"{init.n_outputs} outputs; meta-train with n_way >= {len(classes)}."
                )
            self.classes_ = classes
            self._adapt(X, codes, init)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True  # see metafit.estimator._POOR_SCORE
        return tags

    def _logits(self, X) -> np.ndarray:
        X = self._check_X_predict(X)
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

    def _skorch_net(self, module, kwargs):
        from skorch import NeuralNetClassifier

        kwargs.setdefault("criterion", nn.CrossEntropyLoss)
        kwargs.setdefault("lr", self.inner_lr)
        kwargs.setdefault("train_split", None)
        kwargs.setdefault("classes", list(range(module_outputs(module))))
        net = NeuralNetClassifier(module, **kwargs)
        return net.initialize()


def module_outputs(module: nn.Module) -> int:
    """Number of outputs of a module's last parameterized layer."""
    last = [p for p in module.parameters()][-1]
    return int(last.shape[0])
