"""What the regressor and the classifier differ by: a small target-kind object.

A :class:`TargetKind` knows its loss, how many outputs the network needs for a set of
tasks or a ``y``, how ``fit`` encodes ``y`` (and what it remembers to decode predictions),
which meta-training tasks it accepts, and which skorch net it exports to. The estimator
shell (:class:`metafit.estimators.MetaInitializedEstimator`) holds one and asks it; it
never reads the subclass's attributes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from torch import nn

from metafit._task_types import Task, TaskBatch
from metafit.persistence import MetaInit

__all__ = [
    "ClassificationTarget",
    "EncodedTarget",
    "RegressionTarget",
    "TableClassificationTarget",
    "TargetKind",
    "label_codes",
]


@dataclass(slots=True)
class EncodedTarget:
    """``fit``'s ``y`` as the engine takes it, the outputs it needs, and the fitted
    attributes the estimator sets (``classes_``; the regressor's target dimension)."""

    y: np.ndarray
    n_outputs: int
    fitted: dict[str, Any] = field(default_factory=dict)


class TargetKind:
    """Base class: the target-specific parts of an estimator."""

    #: ``MetaInit.metadata["estimator"]``: which estimators an initialization may serve
    kind: ClassVar[str] = ""
    #: the task loss, a key of :data:`metafit.losses.LOSSES`
    loss: ClassVar[str] = ""
    #: keyword arguments of scikit-learn's ``validate_data`` for ``fit``'s ``y``
    fit_checks: ClassVar[dict] = {}
    regression: ClassVar[bool] = True

    def prepare_task(self, task) -> Task:
        """A meta-training task as this target kind takes it (raise if unusable)."""
        return task if isinstance(task, Task) else Task.from_tuple(task)

    def meta_outputs(self, tasks: list[Task]) -> int:
        """Network outputs that the first meta-batch needs."""
        raise NotImplementedError

    def check_task(self, task: Task, n_outputs: int) -> None:
        """Raise if a later task does not fit a network with ``n_outputs`` outputs."""

    def check_batch(self, batch: TaskBatch, n_outputs: int, largest: dict[str, float]) -> None:
        """:meth:`check_task` for every task of a stacked meta-batch, in bulk
        (``largest``: each field's largest magnitude, from ``check_finite_batch``)."""

    def encode(self, y: np.ndarray, fast: bool) -> EncodedTarget:
        """``fit``'s validated ``y`` (``fast``: it skipped ``validate_data``)."""
        raise NotImplementedError

    def for_table(self, classes: np.ndarray | None) -> TargetKind:
        """The target kind of an initialization that saved a preprocessing: ``classes``
        are a classifier's labels of the whole table (None for a regressor, or for task
        mode's ``standardize=True``, whose tasks keep their own indices). Itself by
        default."""
        return self

    def check_init(self, init: MetaInit | None, target: EncodedTarget) -> None:
        """Raise if ``fit``'s targets do not fit the meta-learned head."""

    def skorch_net(self, module: nn.Module, kwargs: dict, inner_lr: float):
        """An initialized skorch net around ``module`` (see ``to_skorch``): the kind's
        net class and criterion, ``lr=inner_lr``, no train split, unless ``kwargs`` say."""
        net_class, defaults = self._skorch(module)
        kwargs = {"lr": inner_lr, "train_split": None, **defaults, **kwargs}
        return net_class(module, **kwargs).initialize()

    def _skorch(self, module: nn.Module) -> tuple[type, dict]:
        """The skorch net class and its default arguments for this target kind."""
        raise NotImplementedError


#: Targets beyond this overflow the squared error in float32 (3.4e38) for any prediction:
#: the loss is infinite before the first step, whatever the learning rates.
_MAX_TARGET = 1e18


def check_target_scale(where: str, *targets: np.ndarray) -> None:
    """Raise a ValueError about the data's scale if a target is too large for float32 MSE."""
    largest = max(float(np.max(np.abs(y))) if y.size else 0.0 for y in targets)
    if largest > _MAX_TARGET:
        raise ValueError(
            f"{where}: the targets reach {largest:.3g}; their squared error overflows "
            "float32, so no learning rate can help. Rescale y (e.g. "
            "sklearn.compose.TransformedTargetRegressor with a StandardScaler, or a change "
            "of units)."
        )


class RegressionTarget(TargetKind):
    """Real targets, 1-D or 2-D (several outputs); MSE."""

    kind = "regressor"
    loss = "mse"
    fit_checks = {"multi_output": True, "y_numeric": True}
    regression = True

    def meta_outputs(self, tasks):
        y = tasks[0].y_support
        return 1 if y.ndim == 1 else int(y.shape[1])

    def check_task(self, task, n_outputs):
        got = 1 if task.y_support.ndim == 1 else task.y_support.shape[1]
        if got != n_outputs or not np.issubdtype(task.y_support.dtype, np.number):
            raise ValueError(
                f"a task has {got} numeric target column(s) (dtype {task.y_support.dtype}); "
                f"the first task had {n_outputs}. All tasks must share their targets."
            )
        check_target_scale("a meta-training task", task.y_support, task.y_query)

    def check_batch(self, batch, n_outputs, largest):
        y = batch.y_support
        got = 1 if y.dim() == 2 else int(y.shape[2])
        if got != n_outputs or not (y.is_floating_point() or y.dtype == torch.long):
            raise ValueError(
                f"a meta-batch has {got} numeric target column(s) (dtype {y.dtype}); the "
                f"first task had {n_outputs}. All tasks must share their targets."
            )
        top = max(largest["y_support"], largest["y_query"])
        if top > _MAX_TARGET:
            check_target_scale("a meta-training task", np.array([top]))

    def encode(self, y, fast):
        check_target_scale("fit", y)
        y = np.asarray(y, dtype=np.float32)
        n_outputs = 1 if y.ndim == 1 else int(y.shape[1])
        return EncodedTarget(y, n_outputs, {"_y_ndim": y.ndim})

    def check_init(self, init, target):
        if init is not None and init.n_outputs != target.n_outputs:
            raise ValueError(
                f"y has {target.n_outputs} output column(s) but the meta-learned "
                f"initialization predicts {init.n_outputs}; use the targets of meta-training."
            )

    def _skorch(self, module):
        from skorch import NeuralNetRegressor

        return NeuralNetRegressor, {"criterion": nn.MSELoss}


#: A head may have more outputs than the classes of the first meta-batch (later tasks may
#: use more), but not absurdly many: labels {0, 1000000} are a labelling mistake.
_MAX_SPARE_OUTPUTS = 64


class ClassificationTarget(TargetKind):
    """Class labels of any kind, mapped onto the head's first outputs; cross-entropy."""

    kind = "classifier"
    loss = "cross_entropy"
    fit_checks = {}
    regression = False

    def prepare_task(self, task):
        task = super().prepare_task(task)
        for y in (task.y_support, task.y_query):
            if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min() < 0:
                raise ValueError(
                    "classification tasks need 1-D integer class indices >= 0 as targets "
                    f"(got dtype {y.dtype}, shape {y.shape}); NWayKShotTasks remaps labels "
                    "for you."
                )
        support = np.unique(task.y_support)
        if len(support) < 2:
            warnings.warn(
                "a classification task's support set has a single class: adapting to it "
                "teaches nothing about telling classes apart, and fit on one class is an "
                "error. Build tasks with at least 2 classes in each support set.",
                UserWarning,
                stacklevel=6,
            )
        elif np.setdiff1d(task.y_query, support).size:
            warnings.warn(
                "a task's query set has classes its support set never shows; the adapted "
                "head cannot have learned them, and they only add loss. NWayKShotTasks "
                "builds tasks without this.",
                UserWarning,
                stacklevel=6,
            )
        return task

    def meta_outputs(self, tasks):
        top = int(max(max(t.y_support.max(), t.y_query.max()) for t in tasks))
        distinct = len(np.unique(np.concatenate([t.y_support for t in tasks])))
        if top + 1 > max(_MAX_SPARE_OUTPUTS, 8 * distinct):
            raise ValueError(
                f"the tasks use class index {top} but only {distinct} distinct classes: the "
                f"head would get {top + 1:,} outputs. Class indices must be 0..n_way-1 "
                "within each task; remap the labels (NWayKShotTasks does)."
            )
        return top + 1

    def check_batch(self, batch, n_outputs, largest):
        for y in (batch.y_support, batch.y_query):
            if y.is_floating_point() or y.is_complex() or y.dim() != 2 or int(y.min()) < 0:
                raise ValueError(
                    "classification tasks need 1-D integer class indices >= 0 as targets "
                    f"(got a meta-batch of dtype {y.dtype}, shape {tuple(y.shape)})."
                )
        self.check_task(batch, n_outputs)

    def check_task(self, task, n_outputs):
        top = int(max(task.y_support.max(), task.y_query.max()))
        if top >= n_outputs:
            raise ValueError(
                f"a task has class index {top} but the head has {n_outputs} outputs (set by "
                "the first meta-batch); use the same n_way for all tasks."
            )

    def encode(self, y, fast):
        if fast:
            classes, codes = np.unique(y, return_inverse=True)
        else:
            classes, codes = label_codes(y)
        if len(classes) < 2:
            raise ValueError(
                f"y contains only one class ({classes[0]!r}); a classifier needs at least "
                "2 classes to fit."
            )
        return EncodedTarget(codes, len(classes), {"classes_": classes})

    def for_table(self, classes):
        # Task mode's standardize=True saves a scaling but no classes: tasks keep theirs.
        return self if classes is None else TableClassificationTarget(classes)

    def check_init(self, init, target):
        if init is not None and target.n_outputs > init.n_outputs:
            raise ValueError(
                f"y has {target.n_outputs} classes but the meta-learned head has "
                f"{init.n_outputs} outputs; meta-train with n_way >= {target.n_outputs}."
            )

    def _skorch(self, module):
        from skorch import NeuralNetClassifier

        classes = list(range(module_outputs(module)))
        return NeuralNetClassifier, {"criterion": nn.CrossEntropyLoss, "classes": classes}


class TableClassificationTarget(ClassificationTarget):
    """Table mode's classes: the labels of the whole table, one head output each.

    Unlike N-way K-shot tasks, whose indices mean something else in every task, a table's
    classes are the same in every group (a patient's outcome, a customer's churn): an
    episode of a few rows often shows one class only, or a query class its support rows
    lack, which is exactly what the meta-learned head must handle. So those episodes raise
    no warning, the head has one output per class of the table whatever the first
    meta-batch shows, and ``fit`` maps a new group's labels onto those classes (a single
    class is fine; a label meta-training never saw is an error).
    """

    def __init__(self, classes: np.ndarray):
        self.classes = np.asarray(classes)
        self._index = {label: i for i, label in enumerate(self.classes.tolist())}

    def prepare_task(self, task):
        task = Task.from_tuple(task) if not isinstance(task, Task) else task
        for y in (task.y_support, task.y_query):
            if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min() < 0:
                raise ValueError(
                    "table mode's episodes carry class indices; got targets of dtype "
                    f"{y.dtype}, shape {y.shape}."
                )
        return task

    def meta_outputs(self, tasks):
        return len(self.classes)

    def encode(self, y, fast):
        labels, codes = label_codes(y)
        unknown = [v for v in labels.tolist() if v not in self._index]
        if unknown:
            raise ValueError(
                f"y has the label(s) {unknown[:5]} that meta-training never saw; this "
                f"initialization knows the classes {self.classes.tolist()[:20]}. Map them "
                "onto those, or meta-train on a table that has them."
            )
        known = np.array([self._index[v] for v in labels.tolist()], dtype=np.int64)
        return EncodedTarget(known[codes], len(self.classes), {"classes_": self.classes})


def label_codes(y) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted distinct labels, each row's index into them)`` of class labels, refusing
    missing labels and continuous targets with scikit-learn's message."""
    if np.asarray(y).dtype == object and any(
        v is None or (isinstance(v, float) and v != v) for v in np.asarray(y).ravel()
    ):
        raise ValueError(
            "y contains missing labels (None or NaN); they would become a class of "
            "their own. Drop those rows or label them."
        )
    check_classification_targets(y)
    encoder = LabelEncoder().fit(y)
    return encoder.classes_, encoder.transform(y)


def module_outputs(module: nn.Module) -> int:
    """Number of outputs of a module's last parameterized layer."""
    last = [p for p in module.parameters()][-1]
    return int(last.shape[0])
