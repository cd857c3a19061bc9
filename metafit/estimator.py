"""scikit-learn estimators over the meta-learning engine.

``meta_fit(tasks)`` learns an initialization from many related tasks; ``fit(X, y)`` adapts
it to one new task with ``inner_steps`` gradient steps of the same inner loop that
meta-training used; ``predict`` runs the adapted network. The meta-learned initialization
survives :func:`sklearn.base.clone`, so searches and cross-validation adapt from it.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import numbers
import os
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from metafit.algorithms import ALGORITHMS, MetaAlgorithm
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.persistence import MetaInit, build_module, module_spec
from metafit.tasks import Task, iter_meta_batches
from metafit.training import meta_train

__all__ = [
    "MetaInitializedEstimator",
    "MetaInitializedRegressor",
    "MetaInitializedClassifier",
]

_FORWARDS = ("auto", "mlp", "vmap", "loop")


def _seed_from(random_state) -> int:
    """An int seed from ``random_state`` without touching any global RNG."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        # Copy so that the caller's generator is not advanced by a seed draw.
        return int(copy.deepcopy(random_state).randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(copy.deepcopy(random_state).integers(2**31 - 1))
    raise ValueError(
        f"random_state must be None, an int, a numpy RandomState or Generator; "
        f"got {random_state!r}."
    )


class _SeededTorch:
    """Run a block with the torch CPU RNG seeded, restoring its previous state after.

    Module initializers and dropout draw from the global generator; forking it keeps
    results reproducible from ``random_state`` while leaving the user's RNG as it was.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class MetaInitializedEstimator(BaseEstimator):
    """Base class: a neural estimator whose initialization is meta-learned.

    Use :class:`MetaInitializedRegressor` or :class:`MetaInitializedClassifier`.

    Parameters
    ----------
    module : None, nn.Module class or nn.Module instance, default=None
        The network. None builds :class:`metafit.models.MLP` from ``hidden_sizes`` and
        ``activation``. A class is instantiated with the ``module__<name>`` parameters;
        ``n_inputs`` and ``n_outputs`` are filled in from the data when its constructor
        takes them and they are not given. An instance is deep-copied, never modified.
    hidden_sizes : tuple of int, default=(40, 40)
        Hidden layer widths of the default MLP.
    activation : str, default="relu"
        Activation of the default MLP.
    algorithm : {"maml", "fomaml", "reptile", "anil", "metasgd"}, default="maml"
        Meta-learning algorithm used by :meth:`meta_fit`; it also decides what ``fit``
        adapts (ANIL: the head only; Meta-SGD: with its learned rates).
    inner_lr : float, default=0.01
        Learning rate of the inner SGD loop (meta-training and ``fit``).
    inner_steps : int, default=5
        Gradient steps of ``fit``, and of meta-training unless ``meta_inner_steps`` is set.
    meta_inner_steps : int or None, default=None
        Inner steps during meta-training (the MAML paper trains with 1 and tests with
        more); None means ``inner_steps``.
    meta_lr : float or None, default=None
        Meta learning rate; None uses the algorithm's default (Adam 1e-3; Reptile's
        outer step size 1.0, annealed to 0).
    meta_batch_size : int, default=25
        Tasks per meta-update.
    meta_iterations : int, default=1000
        Meta-updates of :meth:`meta_fit` (fewer if a finite task iterable runs out).
    validation_interval : int, default=10
        Evaluate the validation tasks every this many meta-iterations.
    forward : {"auto", "mlp", "vmap", "loop"}, default="auto"
        How the engine batches tasks, see :func:`metafit.functional.make_forward`.
    device : str, default="cpu"
        Torch device, e.g. "cuda" or "mps".
    random_state : int, RandomState, Generator or None, default=None
        Seeds the initialization (meta-training, or ``fit`` without a meta-init) and any
        dropout. The global torch RNG is left as it was.
    verbose : int, default=0
        0 is silent.
    meta_init : None, str, path or MetaInit, default=None
        A saved initialization (see :meth:`save_meta_init`) to adapt from, instead of
        calling :meth:`meta_fit`.
    **kwargs
        ``module__<name>`` constructor arguments of a module class.

    Attributes
    ----------
    meta_init_ : MetaInit
        The meta-learned initialization (after :meth:`meta_fit`); kept by ``clone``.
    meta_history_ : list of dict
        One record per meta-iteration: iteration, meta_loss, validation_loss, time.
    n_features_in_ : int
        Features seen by ``fit``.
    """

    _loss: str = ""

    def __init__(
        self,
        module=None,
        *,
        hidden_sizes=(40, 40),
        activation="relu",
        algorithm="maml",
        inner_lr=0.01,
        inner_steps=5,
        meta_inner_steps=None,
        meta_lr=None,
        meta_batch_size=25,
        meta_iterations=1000,
        validation_interval=10,
        forward="auto",
        device="cpu",
        random_state=None,
        verbose=0,
        meta_init=None,
        **kwargs,
    ):
        self.module = module
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        self.algorithm = algorithm
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.meta_inner_steps = meta_inner_steps
        self.meta_lr = meta_lr
        self.meta_batch_size = meta_batch_size
        self.meta_iterations = meta_iterations
        self.validation_interval = validation_interval
        self.forward = forward
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.meta_init = meta_init
        for key, value in kwargs.items():
            if not key.startswith("module__"):
                raise TypeError(
                    f"{type(self).__name__} got an unexpected keyword argument {key!r}; "
                    "module constructor arguments are passed as module__<name>."
                )
            setattr(self, key, value)

    # ------------------------------------------------------------------ sklearn plumbing

    def _module_kwargs(self) -> dict:
        return {k[len("module__") :]: v for k, v in vars(self).items() if k.startswith("module__")}

    def get_params(self, deep=True):
        params = super().get_params(deep=deep)
        params.update({k: v for k, v in vars(self).items() if k.startswith("module__")})
        return params

    def set_params(self, **params):
        module_params = {k: v for k, v in params.items() if k.startswith("module__")}
        for key, value in module_params.items():
            setattr(self, key, value)
        rest = {k: v for k, v in params.items() if k not in module_params}
        return super().set_params(**rest) if rest else self

    def __sklearn_clone__(self):
        # Like FrozenEstimator: the learned initialization travels with the clone, so
        # GridSearchCV and cross_val_score adapt from it instead of from scratch.
        new = super().__sklearn_clone__()
        if hasattr(self, "meta_init_"):
            new.meta_init_ = self.meta_init_
            new.meta_history_ = self.meta_history_
        return new

    def __sklearn_is_fitted__(self):
        return hasattr(self, "adapted_params_")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_learner", None)  # holds closures; rebuilt from the tensors on load
        state.pop("_learner_key", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "adapted_params_" in state:
            self._learner = self._build_learner(self._fit_init(), self.n_features_in_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------------------ validation

    def _check_params(self) -> None:
        def positive_int(name, value, allow_none=False, minimum=1):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}.")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}.")

        def positive_float(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}.")
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}.")

        positive_float("inner_lr", self.inner_lr)
        positive_int("inner_steps", self.inner_steps, minimum=0)
        positive_int("meta_inner_steps", self.meta_inner_steps, allow_none=True, minimum=0)
        positive_float("meta_lr", self.meta_lr, allow_none=True)
        positive_int("meta_batch_size", self.meta_batch_size)
        positive_int("meta_iterations", self.meta_iterations)
        positive_int("validation_interval", self.validation_interval)
        if not isinstance(self.algorithm, MetaAlgorithm) and self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm must be one of {', '.join(sorted(ALGORITHMS))}; "
                f"got {self.algorithm!r}."
            )
        if self.forward not in _FORWARDS:
            raise ValueError(
                f"forward must be one of {', '.join(_FORWARDS)}; got {self.forward!r}."
            )
        if self.module is None:
            sizes = self.hidden_sizes
            if isinstance(sizes, numbers.Integral):
                sizes = (sizes,)
            if not all(isinstance(h, numbers.Integral) and h > 0 for h in sizes):
                raise ValueError(
                    f"hidden_sizes must be a tuple of positive ints, got {self.hidden_sizes!r}."
                )
        elif not (
            isinstance(self.module, nn.Module)
            or (inspect.isclass(self.module) and issubclass(self.module, nn.Module))
        ):
            raise TypeError(
                f"module must be None, an nn.Module subclass or instance; got {self.module!r}."
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from exc
        _seed_from(self.random_state)

    # ------------------------------------------------------------------ model building

    def _make_module(self, n_features: int, n_outputs: int) -> tuple[nn.Module, dict]:
        if self.module is None:
            sizes = self.hidden_sizes
            sizes = (sizes,) if isinstance(sizes, numbers.Integral) else tuple(sizes)
            kwargs = {
                "n_inputs": int(n_features),
                "n_outputs": int(n_outputs),
                "hidden_sizes": [int(h) for h in sizes],
                "activation": self.activation,
            }
            return MLP(**kwargs), kwargs
        if isinstance(self.module, nn.Module):
            return copy.deepcopy(self.module), {}
        kwargs = self._module_kwargs()
        accepted = inspect.signature(self.module).parameters
        if "n_inputs" in accepted and "n_inputs" not in kwargs:
            kwargs["n_inputs"] = int(n_features)
        if "n_outputs" in accepted and "n_outputs" not in kwargs:
            kwargs["n_outputs"] = int(n_outputs)
        return self.module(**kwargs), kwargs

    def _resolve_meta_init(self) -> MetaInit | None:
        """The initialization ``fit`` adapts from: meta_fit's, else ``meta_init``."""
        if hasattr(self, "meta_init_"):
            return self.meta_init_
        if self.meta_init is None:
            return None
        if isinstance(self.meta_init, MetaInit):
            return self.meta_init
        if isinstance(self.meta_init, (str, os.PathLike)):
            return MetaInit.load(self.meta_init)
        raise TypeError(
            f"meta_init must be None, a path or a MetaInit; got {type(self.meta_init).__name__}."
        )

    def _learner_from_init(self, init: MetaInit) -> MetaLearner:
        kind = init.metadata.get("estimator")
        if kind and kind != self._estimator_kind:
            raise ValueError(
                f"this meta-initialization was learned by a {kind}; it cannot serve a "
                f"{self._estimator_kind}."
            )
        if self.module is None:
            module = build_module(init.spec)
        else:
            module, _ = self._make_module(init.n_features, init.n_outputs)
        learner = MetaLearner(
            module,
            loss=self._loss,
            algorithm=init.metadata.get("algorithm", "maml"),
            inner_lr=init.metadata.get("inner_lr", self.inner_lr),
            inner_steps=self.inner_steps,
            forward=self.forward,
            device=self.device,
        )
        try:
            learner.load_state_tensors(init.tensors)
        except (RuntimeError, KeyError) as exc:
            raise ValueError(
                "the meta-initialization does not fit this estimator's module (architecture "
                f"mismatch): {exc}"
            ) from exc
        return learner

    def _build_learner(self, init: MetaInit | None, n_features: int) -> MetaLearner:
        if init is not None:
            return self._learner_from_init(init)
        with _SeededTorch(_seed_from(self.random_state)):
            module, _ = self._make_module(n_features, self._n_outputs_for_fit)
        return MetaLearner(
            module,
            loss=self._loss,
            algorithm=self.algorithm,
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            forward=self.forward,
            device=self.device,
        )

    def _fit_init(self) -> MetaInit | None:
        return self._resolve_meta_init()

    # ------------------------------------------------------------------ meta-training

    def _prepare_task(self, task: Task) -> Task:
        return task

    def _meta_outputs(self, tasks: list[Task]) -> int:
        raise NotImplementedError

    def meta_fit(self, tasks: Iterable, validation_tasks: Iterable | None = None):
        """Meta-learn the initialization from a stream of tasks.

        Parameters
        ----------
        tasks : iterable of Task or 4-tuples
            Finite or endless (e.g. :class:`metafit.tasks.SinusoidTasks`); consumed
            ``meta_batch_size`` tasks at a time for ``meta_iterations`` meta-updates.
        validation_tasks : iterable of Task, optional
            Held-out tasks (at most the first 100 are used) whose post-adaptation query
            loss is recorded every ``validation_interval`` iterations.

        Returns
        -------
        self : object
            The estimator, with ``meta_init_`` and ``meta_history_`` set. A previous
            ``fit`` is discarded, since its initialization changed.

        Raises
        ------
        ValueError
            If ``tasks`` is empty or its tasks disagree in features or outputs. Nothing
            of the estimator changes when an error is raised.
        """
        self._check_params()
        if isinstance(tasks, (Task, np.ndarray)) or not isinstance(tasks, Iterable):
            raise TypeError(
                "tasks must be an iterable of Task or (X_support, y_support, X_query, "
                f"y_query) tuples, got {type(tasks).__name__}."
            )
        batches = iter_meta_batches(tasks, self.meta_batch_size)
        first = next(batches, None)
        if first is None:
            raise ValueError("tasks is empty: meta_fit needs at least one task.")
        first = [self._prepare_task(t) for t in first]
        feature_shape = first[0].feature_shape
        n_features = int(np.prod(feature_shape))
        n_outputs = self._meta_outputs(first)
        val = None
        if validation_tasks is not None:
            val = next(iter_meta_batches(validation_tasks, 100), [])
            if not val:
                raise ValueError("validation_tasks is empty; pass None or at least one task.")

        def checked(batch):
            out = []
            for t in batch:
                t = self._prepare_task(t)
                if t.feature_shape != feature_shape:
                    raise ValueError(
                        f"a task has feature shape {t.feature_shape} but the first task had "
                        f"{feature_shape}; all tasks must share their features."
                    )
                self._check_task_outputs(t, n_outputs)
                out.append(t)
            return out

        for t in [*first, *(val or [])]:
            checked([t])
        stream = itertools.chain([first], (checked(b) for b in batches))

        seed = _seed_from(self.random_state)
        with _SeededTorch(seed):
            module, kwargs = self._make_module(n_features, n_outputs)
            if self.module is not None and not isinstance(self.module, type):
                kwargs = {}
            learner = MetaLearner(
                module,
                loss=self._loss,
                algorithm=self.algorithm,
                inner_lr=self.inner_lr,
                inner_steps=(
                    self.inner_steps if self.meta_inner_steps is None else self.meta_inner_steps
                ),
                forward=self.forward,
                device=self.device,
            )
            learner.init_optimizer(self.meta_lr, self.meta_iterations)
            result = meta_train(
                learner,
                stream,
                iterations=self.meta_iterations,
                validation_tasks=val,
                validation_interval=self.validation_interval,
                validation_steps=self.inner_steps,
            )
        algorithm = learner.algorithm.name
        metadata = {
            "estimator": self._estimator_kind,
            "algorithm": algorithm,
            "inner_lr": float(self.inner_lr),
            "inner_steps": int(self.inner_steps),
            "meta_inner_steps": int(learner.inner_steps),
            "n_features": n_features,
            "feature_shape": list(feature_shape),
            "n_outputs": int(n_outputs),
            "loss": self._loss,
            "meta_iterations": len(result.history),
            "versions": _versions(),
        }
        self.meta_init_ = MetaInit(learner.state_tensors(), module_spec(module, kwargs), metadata)
        self.meta_history_ = [r.as_dict() for r in result.history]
        for attr in ("adapted_params_", "_learner", "_learner_key", "n_features_in_"):
            self.__dict__.pop(attr, None)
        return self

    def _check_task_outputs(self, task: Task, n_outputs: int) -> None:
        """Subclasses check a task's targets against the network's outputs."""

    def save_meta_init(self, path) -> None:
        """Write the meta-learned initialization to ``path`` (safetensors, atomic).

        Load it with ``MetaInitializedRegressor(meta_init=path)`` (or the classifier).
        """
        if not hasattr(self, "meta_init_"):
            raise AttributeError(
                "this estimator has no meta-learned initialization; call meta_fit first."
            )
        self.meta_init_.save(path)

    # ------------------------------------------------------------------ adaptation

    def _adapt(self, X: np.ndarray, y: np.ndarray) -> None:
        init = self._fit_init()
        if init is not None and init.n_features != X[0].size:
            raise ValueError(
                f"X has {X[0].size} features, but the meta-learned initialization expects "
                f"{init.n_features}; use the same features as in meta-training."
            )
        key = (id(init), X.shape[1:], self._n_outputs_for_fit, self._config_key())
        if getattr(self, "_learner_key", None) != key:
            self._learner = self._build_learner(init, X.shape[1])
            self._learner_key = key
        learner = self._learner
        learner.inner_lr = float(self.inner_lr)
        Xt, yt = learner.as_tensors(X, y)
        with _SeededTorch(_seed_from(self.random_state)):
            params = learner.adapt(
                Xt.unsqueeze(0), yt.unsqueeze(0), steps=self.inner_steps, track_graph=False
            )
        self.adapted_params_ = {k: v.detach() for k, v in params.items()}

    def _config_key(self):
        return (
            self.algorithm if isinstance(self.algorithm, str) else id(self.algorithm),
            self.forward,
            str(self.device),
            self.random_state if isinstance(self.random_state, numbers.Integral) else None,
            repr(self.hidden_sizes),
            self.activation,
            id(self.module),
            repr(sorted(self._module_kwargs().items())),
        )

    def _raw_predict(self, X: np.ndarray) -> torch.Tensor:
        Xt, _ = self._learner.as_tensors(X)
        return self._learner.predict(self.adapted_params_, Xt.unsqueeze(0))[0]

    def to_skorch(self, **kwargs):
        """A skorch net holding the learned weights, ready for further training.

        The weights are the adapted ones after ``fit``, else the meta-learned
        initialization. Keyword arguments go to the skorch net's constructor.
        """
        if hasattr(self, "adapted_params_"):
            module = copy.deepcopy(self._learner.module)
            state = {k: v[0] for k, v in self.adapted_params_.items()}
            module.load_state_dict({**module.state_dict(), **state})
        else:
            init = self._resolve_meta_init()
            if init is None:
                raise AttributeError(
                    "nothing to export yet: call meta_fit or fit first (or pass meta_init)."
                )
            module = copy.deepcopy(self._learner_from_init(init).module)
        return self._skorch_net(module.cpu() if str(self.device) == "cpu" else module, kwargs)

    def _skorch_net(self, module, kwargs):  # pragma: no cover - per subclass
        raise NotImplementedError


def _versions() -> dict:
    import sklearn

    import metafit

    return {
        "metafit": metafit.__version__,
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
    }


class MetaInitializedRegressor(RegressorMixin, MetaInitializedEstimator):
    """A neural regressor that adapts a meta-learned initialization in a few steps.

    See :class:`MetaInitializedEstimator` for the parameters. Targets may be 1-D or
    2-D (several outputs).

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
        """
        self._check_params()
        X, y = validate_data(
            self, X, y, dtype=np.float32, multi_output=True, y_numeric=True, allow_nd=True
        )
        y = y.astype(np.float32, copy=False)
        self._fit_outputs = 1 if y.ndim == 1 else y.shape[1]
        init = self._fit_init()
        if init is not None and init.n_outputs != self._fit_outputs:
            raise ValueError(
                f"y has {self._fit_outputs} output(s) but the meta-learned initialization "
                f"predicts {init.n_outputs}."
            )
        self._y_ndim = y.ndim
        self._adapt(X, y)
        return self

    def predict(self, X):
        """Predict with the adapted network.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False, allow_nd=True)
        out = self._raw_predict(X).cpu().numpy()
        return out[:, 0].astype(np.float64) if self._y_ndim == 1 else out.astype(np.float64)

    def _skorch_net(self, module, kwargs):
        from skorch import NeuralNetRegressor

        kwargs.setdefault("criterion", nn.MSELoss)
        kwargs.setdefault("lr", self.inner_lr)
        kwargs.setdefault("train_split", None)
        net = NeuralNetRegressor(module, **kwargs)
        return net.initialize()


class MetaInitializedClassifier(ClassifierMixin, MetaInitializedEstimator):
    """A neural classifier that adapts a meta-learned initialization in a few steps.

    Meta-training tasks carry class indices ``0..n_way-1`` (as
    :class:`metafit.tasks.NWayKShotTasks` produces); the head gets one output per index.
    ``fit`` accepts any labels (ints, strings): they are sorted into ``classes_`` and mapped
    onto the first ``len(classes_)`` outputs. A task with more classes than the head has
    outputs is an error; fewer is fine.

    See :class:`MetaInitializedEstimator` for the parameters.
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
            Labels of any kind.

        Returns
        -------
        self : object
        """
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=True)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        init = self._fit_init()
        if init is not None and len(encoder.classes_) > init.n_outputs:
            raise ValueError(
                f"y has {len(encoder.classes_)} classes but the meta-learned head has "
                f"{init.n_outputs} outputs; meta-train with n_way >= {len(encoder.classes_)}."
            )
        self.classes_ = encoder.classes_
        self._adapt(X, encoder.transform(y))
        return self

    def decision_function(self, X):
        """Logits of the classes in ``classes_``, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False, allow_nd=True)
        logits = self._raw_predict(X)[:, : len(self.classes_)].cpu().numpy()
        return logits.astype(np.float64)

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes)."""
        logits = self.decision_function(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X):
        """Most probable class labels."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

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
