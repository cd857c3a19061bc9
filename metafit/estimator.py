"""scikit-learn estimators over the meta-learning engine.

``meta_fit(tasks)`` learns an initialization from many related tasks; ``fit(X, y)`` adapts
it to one new task with ``inner_steps`` gradient steps of the same inner loop that
meta-training used; ``predict`` runs the adapted network. The meta-learned initialization
survives :func:`sklearn.base.clone`, so searches and cross-validation adapt from it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import numbers
import os
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from metafit.algorithms import ALGORITHMS, MetaAlgorithm
from metafit.callbacks import BestState, Checkpoint, EarlyStopping, ProgressBar
from metafit.distributed import distributed_training
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.persistence import MetaInit, build_module, module_spec
from metafit.tasks import Task, iter_meta_batches
from metafit.training import (
    DivergenceError,
    InterruptedTrainingWarning,
    MetaHistory,
    TrainingState,
    meta_train,
)

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

    def __init__(self, seed: int, device=None):
        self.seed = seed
        device = torch.device("cpu" if device is None else device)
        # Only the generators that are forked get seeded: torch.manual_seed would also
        # reseed every CUDA device, which fork_rng(devices=[]) does not restore (and it
        # costs ~50 us more than seeding the CPU generator alone).
        self.cuda = device.type == "cuda"
        self.index = (device.index or 0) if self.cuda else None

    def __enter__(self):
        devices = [self.index] if self.cuda else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.default_generator.manual_seed(self.seed)
        if self.cuda:
            with torch.cuda.device(self.index):
                torch.cuda.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


#: Why both estimators declare the ``poor_score`` tag (the scikit-learn checks then skip
#: their accuracy thresholds, nothing else): ``fit`` is a few-shot adapter, ``inner_steps``
#: (default 5) plain SGD steps at ``inner_lr`` from an initialization. From a meta-learned
#: start that suffices on tasks like those of meta-training; the checks' toy data sets are
#: not such tasks, and 5 steps from a random or foreign start do not reach the scores the
#: checks demand of estimators trained to convergence.
_POOR_SCORE = True


@contextlib.contextmanager
def _unchanged_on_error(estimator):
    """Restore the estimator's attributes if the block raises (fit must not half-fit)."""
    state = estimator.__dict__.copy()
    try:
        yield
    except BaseException:
        estimator.__dict__.clear()
        estimator.__dict__.update(state)
        raise


def _fast_xy(X, y, *, regression: bool):
    """``(X, y)`` ready for the engine when they are plain, clean numpy arrays, else None.

    scikit-learn's ``validate_data`` costs 50-100 us, as much as a whole few-shot fit. For
    2-D float arrays with matching lengths and finite values (int labels for a classifier)
    the few checks below are all it would do; anything else returns None and goes through
    ``validate_data``, which then raises the usual errors.
    """
    if type(X) is not np.ndarray or type(y) is not np.ndarray:
        return None
    if X.ndim != 2 or X.dtype.kind != "f" or not X.flags.c_contiguous or not X.flags.writeable:
        return None
    if X.shape[0] == 0 or X.shape[1] == 0 or y.shape[:1] != X.shape[:1]:
        return None
    if regression:
        if y.dtype.kind != "f" or y.ndim not in (1, 2) or y.size == 0:
            return None
        y = y.astype(np.float32)
        if not np.isfinite(y).all():
            return None
    elif y.ndim != 1 or y.dtype.kind not in "iu":
        return None
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        return None
    return X, y


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
        0 is silent; 1 or more shows a tqdm progress bar during :meth:`meta_fit` with the
        meta-loss and the latest validation loss. Messages go to the ``logging`` logger
        ``"metafit"`` whatever the value.
    meta_init : None, str, path or MetaInit, default=None
        A saved initialization (see :meth:`save_meta_init`, or a ``checkpoint_path`` file)
        to adapt from instead of calling :meth:`meta_fit`; with ``warm_start=True``,
        :meth:`meta_fit` continues meta-training from it.
    warm_start : bool, default=False
        If True, :meth:`meta_fit` continues from the current ``meta_init_`` (or from
        ``meta_init``) instead of starting over: up to ``meta_iterations`` in total, with
        continued iteration numbering and history and, when this estimator ran the earlier
        meta_fit itself, the meta-optimizer's state. Resume after an interrupt this way.
    patience : int or None, default=None
        Early stopping: end :meth:`meta_fit` after this many validation evaluations (one
        every ``validation_interval`` iterations) without an improvement of more than
        ``min_delta``, and keep the initialization with the best validation loss. Needs
        ``validation_tasks``. None trains for ``meta_iterations``.
    min_delta : float, default=0.0
        Smallest decrease of the validation loss that counts as an improvement.
    clip_grad_norm : float or None, default=None
        Clip the total norm of each meta-gradient to this value; helps when meta-training
        diverges. None does not clip.
    checkpoint_path : None, str or path, default=None
        Write the meta-initialization to this file every ``checkpoint_interval``
        meta-iterations and when :meth:`meta_fit` ends (atomically: temporary file, then
        rename), so a killed process loses at most ``checkpoint_interval`` iterations.
        Load it with ``meta_init=``.
    checkpoint_interval : int, default=100
        Meta-iterations between checkpoints.
    on_interrupt : {"warn", "raise"}, default="warn"
        What :meth:`meta_fit` does on Ctrl-C (KeyboardInterrupt). Either way the estimator
        keeps the best initialization so far (lowest validation loss when
        ``validation_tasks`` were given, else the last completed iteration) and can resume
        with ``warm_start=True``. "warn" then warns and returns normally; "raise" re-raises
        the KeyboardInterrupt.
    **kwargs
        ``module__<name>`` constructor arguments of a module class.

    Attributes
    ----------
    meta_init_ : MetaInit
        The meta-learned initialization (after :meth:`meta_fit`); kept by ``clone``.
    meta_history_ : MetaHistory
        A list of dicts, one per meta-iteration: iteration, meta_loss, validation_loss
        (None where not evaluated), time (seconds). ``meta_history_.to_frame()`` gives a
        pandas DataFrame.
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
        warm_start=False,
        patience=None,
        min_delta=0.0,
        clip_grad_norm=None,
        checkpoint_path=None,
        checkpoint_interval=100,
        on_interrupt="warn",
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
        self.warm_start = warm_start
        self.patience = patience
        self.min_delta = min_delta
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_path = checkpoint_path
        self.checkpoint_interval = checkpoint_interval
        self.on_interrupt = on_interrupt
        # Stored unvalidated (sklearn rule: __init__ only stores); any name other than
        # module__<name> is rejected by fit/meta_fit, not here.
        self._extra_params = tuple(k for k in kwargs if not k.startswith("module__"))
        for key, value in kwargs.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ sklearn plumbing

    def _module_kwargs(self) -> dict:
        return {k[len("module__") :]: v for k, v in vars(self).items() if k.startswith("module__")}

    def get_params(self, deep=True):
        params = super().get_params(deep=deep)
        extra = self.__dict__.get("_extra_params", ())
        params.update(
            {k: v for k, v in vars(self).items() if k.startswith("module__") or k in extra}
        )
        return params

    def set_params(self, **params):
        extra = self.__dict__.get("_extra_params", ())
        module_params = {
            k: v for k, v in params.items() if k.startswith("module__") or k in extra
        }
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
        # A search clones before every fit: clones share the loaded meta_init file (and,
        # through the MetaInit, the network built from it; see _build_learner).
        if "_loaded_init" in self.__dict__:
            new._loaded_init = self._loaded_init
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
            loaded = state.get("_loaded_init")
            init = loaded[1] if loaded is not None and "meta_init_" not in state else None
            self._learner = self._build_learner(init or self._fit_init(), self.n_features_in_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------------------ validation

    def _check_params(self) -> None:
        for key in self.__dict__.get("_extra_params", ()):
            raise TypeError(
                f"{type(self).__name__} got an unexpected keyword argument {key!r}; "
                "module constructor arguments are passed as module__<name>."
            )

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
        self._check_training_params()

    def _check_training_params(self) -> None:
        """Validate the parameters of meta_fit's training loop (see the class docstring)."""

        def number(name, value, *, integer, minimum, allow_none=False, strict=False):
            if value is None and allow_none:
                return
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an int" if integer else "a number"
                none = " or None" if allow_none else ""
                raise TypeError(f"{name} must be {what}{none}, got {value!r}.")
            low_ok = value > minimum if strict else value >= minimum
            finite = isinstance(value, numbers.Integral) or math.isfinite(value)
            if not (finite and low_ok):
                bound = ">" if strict else ">="
                what = "an int" if integer else "a finite number"
                raise ValueError(f"{name} must be {what} {bound} {minimum}, got {value}.")

        if not isinstance(self.verbose, (bool, numbers.Integral)) or self.verbose < 0:
            raise ValueError(f"verbose must be an int >= 0 (0 is silent), got {self.verbose!r}.")
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise TypeError(f"warm_start must be True or False, got {self.warm_start!r}.")
        number("patience", self.patience, integer=True, minimum=1, allow_none=True)
        number("min_delta", self.min_delta, integer=False, minimum=0)
        number(
            "clip_grad_norm",
            self.clip_grad_norm,
            integer=False,
            minimum=0,
            allow_none=True,
            strict=True,
        )
        number("checkpoint_interval", self.checkpoint_interval, integer=True, minimum=1)
        if self.on_interrupt not in ("warn", "raise"):
            raise ValueError(f'on_interrupt must be "warn" or "raise", got {self.on_interrupt!r}.')
        path = self.checkpoint_path
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(
                    f"checkpoint_path must be None, a str or a path, got {type(path).__name__}."
                )
            if str(path) == "" or os.path.isdir(path):
                raise ValueError(
                    f"checkpoint_path {str(path)!r} must name a file, not a folder; e.g. "
                    "'meta_init.safetensors'."
                )

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
            # Read the file once per estimator (fit runs thousands of times in a search),
            # again only if it changed; the loaded copy is pickled with a fitted estimator
            # so that predictions never need the file again.
            path = os.fspath(self.meta_init)
            try:
                stat = os.stat(path)
                key = (path, stat.st_mtime_ns, stat.st_size)
            except OSError:
                key = None
            cached = self.__dict__.get("_loaded_init")
            if cached is not None and (key is None or cached[0] == key):
                return cached[1]
            init = MetaInit.load(path)
            self._loaded_init = (key, init)
            return init
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
        # Building draws a throw-away random initialization (overwritten below) from the
        # global generator: fork it so that the user's RNG state is left alone.
        with _SeededTorch(0, self.device):
            if self.module is None:
                self._check_mlp_spec(init)
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

    def _check_mlp_spec(self, init: MetaInit) -> None:
        """A default-MLP estimator must agree with the saved MLP's architecture."""
        spec = init.spec
        if spec.get("class") != f"{MLP.__module__}.{MLP.__qualname__}":
            return
        sizes = self.hidden_sizes
        sizes = [int(sizes)] if isinstance(sizes, numbers.Integral) else [int(h) for h in sizes]
        saved = spec.get("kwargs", {})
        theirs = (list(saved.get("hidden_sizes", [])), saved.get("activation", "relu"))
        if (sizes, self.activation) != theirs:
            raise ValueError(
                f"architecture mismatch: the meta-initialization is an MLP with "
                f"hidden_sizes={tuple(theirs[0])}, activation={theirs[1]!r}, but this "
                f"estimator has hidden_sizes={tuple(sizes)}, activation={self.activation!r}; "
                "set them to the saved values (MetaInit.load(path).estimator_params() lists "
                "them)."
            )

    def _build_learner(self, init: MetaInit | None, n_features: int) -> MetaLearner:
        if init is not None:
            # Building the network costs about as much as a whole few-shot fit, and a
            # search fits a fresh clone every time: learners built from an initialization
            # are cached on it, per configuration. Only learners that fit never mutates
            # (the analytic path) are shared, so threads may fit clones concurrently.
            cache = init.__dict__.setdefault("_learners", {})
            key = (n_features, self._config_key())
            learner = cache.get(key)
            if learner is None:
                learner = self._learner_from_init(init)
                if type(learner.module) is MLP:
                    cache[key] = learner
            return learner
        with _SeededTorch(_seed_from(self.random_state), self.device):
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
        init = self._resolve_meta_init()
        kind = init.metadata.get("estimator") if init is not None else None
        if kind and kind != self._estimator_kind:
            raise ValueError(
                f"this meta-initialization was learned by a {kind}; it cannot serve a "
                f"{self._estimator_kind}."
            )
        return init

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
            loss is recorded every ``validation_interval`` iterations; needed by
            ``patience``, and used to pick the state kept after an interrupt.

        Returns
        -------
        self : object
            The estimator, with ``meta_init_`` and ``meta_history_`` set. A previous
            ``fit`` is discarded, since its initialization changed. After Ctrl-C it holds
            the best initialization so far (see ``on_interrupt``) and can resume with
            ``warm_start=True``.

        Raises
        ------
        ValueError
            If ``tasks`` is empty or its tasks disagree in features or outputs, or a
            parameter is invalid. Nothing of the estimator changes when such an error
            is raised.
        metafit.training.DivergenceError
            (a ValueError) If a loss or meta-gradient becomes NaN or infinite; the
            message names the learning rate to lower. The estimator keeps the last
            finite state when at least one iteration completed.
        KeyboardInterrupt
            Only with ``on_interrupt="raise"``, after the state was kept.
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

        if self.patience is not None and val is None:
            raise ValueError(
                "patience (early stopping) needs validation_tasks: call "
                "meta_fit(tasks, validation_tasks=held_out_tasks) or set patience=None."
            )
        resume = self._warm_start_point(feature_shape, n_outputs) if self.warm_start else None
        if resume is not None and resume["state"].iteration >= self.meta_iterations:
            warnings.warn(
                f"meta_fit with warm_start=True: {resume['state'].iteration} meta-iterations "
                f"are already done and meta_iterations={self.meta_iterations}; increase "
                "meta_iterations to train further. The estimator was left unchanged.",
                UserWarning,
                stacklevel=2,
            )
            return self

        seed = _seed_from(self.random_state)
        # Under torchrun / in a process group: this rank's share of each meta-batch.
        parallel = distributed_training(self.meta_batch_size, self.device)
        with parallel, _SeededTorch(seed, self.device):
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
            if resume is not None:
                state = resume["state"]
                if resume["algorithm"] != learner.algorithm.name:
                    state = TrainingState(state.iteration, state.tensors)  # fresh optimizer
                try:
                    state.restore(learner, keep_lr=True)
                except (RuntimeError, KeyError, ValueError) as exc:
                    raise ValueError(
                        "warm_start=True, but the meta-initialization to continue does not "
                        f"fit this estimator's module or algorithm ({exc}); use the same "
                        "module and algorithm, or set warm_start=False to start over."
                    ) from exc
            spec = module_spec(module, kwargs)
            metadata = {
                "estimator": self._estimator_kind,
                "algorithm": learner.algorithm.name,
                "inner_lr": float(self.inner_lr),
                "inner_steps": int(self.inner_steps),
                "meta_inner_steps": int(learner.inner_steps),
                "n_features": n_features,
                "feature_shape": list(feature_shape),
                "n_outputs": int(n_outputs),
                "loss": self._loss,
                "versions": _versions(),
            }

            def make_meta_init(tensors, iteration, **extra):
                meta = {**metadata, "meta_iterations": int(iteration), "iteration": int(iteration)}
                return MetaInit(tensors, spec, {**meta, **extra})

            callbacks, best, stopper = self._training_callbacks(resume, val, make_meta_init)
            callbacks = parallel.prepare(learner, callbacks)
            try:
                result = meta_train(
                    learner,
                    parallel.shard(stream),
                    iterations=self.meta_iterations,
                    validation_tasks=val,
                    validation_interval=self.validation_interval,
                    validation_steps=self.inner_steps,
                    callbacks=callbacks,
                    grad_hook=parallel.grad_hook,
                    clip_grad_norm=self.clip_grad_norm,
                    start_iteration=0 if resume is None else resume["state"].iteration,
                    start_time=0.0 if resume is None else resume["time"],
                    catch_interrupt=True,
                )
            except DivergenceError as exc:
                # Keep what was learned up to the last finite iteration, then report.
                if exc.result is not None and exc.result.history:
                    self._store_meta_training(
                        exc.result, resume, None, stopper, make_meta_init, use_best=False
                    )
                raise
        use_best = result.interrupted or self.patience is not None
        self._store_meta_training(result, resume, best, stopper, make_meta_init, use_best)
        if result.interrupted:
            self._warn_interrupted(result)
            if self.on_interrupt == "raise":
                raise KeyboardInterrupt
        return self

    def _warm_start_point(self, feature_shape, n_outputs: int) -> dict | None:
        """Where ``warm_start=True`` continues from: ``meta_init_``, else ``meta_init``."""
        saved = getattr(self, "_warm_state_", None)
        if hasattr(self, "meta_init_"):
            init, history = self.meta_init_, list(getattr(self, "meta_history_", []))
            if saved is not None and saved.get("meta_init") is not init:
                saved = None  # meta_init_ was replaced since: only its tensors are known
        else:
            init, history, saved = self._resolve_meta_init(), [], None
        if init is None:
            return None
        shape = init.metadata.get("feature_shape")
        if (shape is not None and list(shape) != list(feature_shape)) or (
            init.n_outputs != n_outputs
        ):
            raise ValueError(
                f"warm_start=True continues a meta-initialization for feature shape "
                f"{tuple(shape or ())} and {init.n_outputs} output(s), but these tasks have "
                f"{tuple(feature_shape)} and {n_outputs}; pass matching tasks or set "
                "warm_start=False to start over."
            )
        if saved is not None:
            return {**saved, "history": history}
        meta = init.metadata
        done = history[-1]["iteration"] if history else meta.get("iteration", 0)
        return {
            "state": TrainingState(int(done), init.tensors),
            "algorithm": meta.get("algorithm"),
            "history": history,
            "time": history[-1]["time"] if history else 0.0,
            "best_loss": float(meta.get("best_validation_loss", math.inf)),
            "best_iteration": meta.get("best_iteration"),
            "best_tensors": init.tensors if "best_iteration" in meta else None,
            "wait": 0,
        }

    def _training_callbacks(self, resume, val, make_meta_init):
        """The callbacks meta_fit's parameters ask for, plus the best-state tracker."""
        callbacks, best, stopper = [], None, None
        if val is not None:
            best = BestState()
            if resume is not None:
                best = BestState(
                    resume["best_loss"], resume["best_iteration"], resume["best_tensors"]
                )
            callbacks.append(best)
        if self.patience is not None:
            stopper = EarlyStopping(
                int(self.patience),
                float(self.min_delta),
                best_loss=math.inf if resume is None else resume["best_loss"],
                wait=0 if resume is None else resume["wait"],
            )
            callbacks.append(stopper)
        if self.checkpoint_path is not None:
            callbacks.append(
                Checkpoint(
                    self.checkpoint_path,
                    int(self.checkpoint_interval),
                    lambda learner, it: make_meta_init(learner.state_tensors(), it),
                )
            )
        if self.verbose:
            callbacks.append(ProgressBar(desc=f"meta_fit {type(self).__name__}"))
        return callbacks, best, stopper

    def _store_meta_training(self, result, resume, best, stopper, make_meta_init, use_best):
        """Set meta_init_, meta_history_ and the warm-start state from a training result."""
        previous = [] if resume is None else resume["history"]
        history = MetaHistory([*previous, *(r.as_dict() for r in result.history)])
        last = result.last_state.to_cpu()
        tensors, extra = last.tensors, {}
        if use_best and best is not None and best.best_tensors is not None:
            tensors = best.best_tensors
            extra = {
                "best_iteration": best.best_iteration,
                "best_validation_loss": best.best_loss,
            }
        self.meta_init_ = make_meta_init(tensors, last.iteration, **extra)
        self.meta_history_ = history
        self._warm_state_ = {
            "meta_init": self.meta_init_,
            "state": last,
            "algorithm": self.meta_init_.metadata["algorithm"],
            "time": history[-1]["time"] if history else 0.0,
            "best_loss": math.inf if best is None else best.best_loss,
            "best_iteration": None if best is None else best.best_iteration,
            "best_tensors": None if best is None else best.best_tensors,
            "wait": 0 if stopper is None else stopper.wait,
        }
        for attr in ("adapted_params_", "_learner", "_learner_key", "n_features_in_"):
            self.__dict__.pop(attr, None)

    def _warn_interrupted(self, result) -> None:
        meta = self.meta_init_.metadata
        if "best_iteration" in meta:
            kept = (
                f"the initialization with the best validation loss "
                f"({meta['best_validation_loss']:.4g}, iteration {meta['best_iteration']})"
            )
        else:
            kept = f"the initialization of the last completed iteration ({meta['iteration']})"
        warnings.warn(
            f"meta_fit was interrupted after {result.last_iteration} meta-iterations; the "
            f"estimator keeps {kept} and is ready for fit. Call meta_fit again with "
            "warm_start=True to resume.",
            InterruptedTrainingWarning,
            stacklevel=3,
        )

    def _check_task_outputs(self, task: Task, n_outputs: int) -> None:
        """Subclasses check a task's targets against the network's outputs."""

    def save_meta_init(self, path) -> None:
        """Write the meta-learned initialization to ``path`` (safetensors, atomic).

        Load it with ``MetaInitializedRegressor(meta_init=path)`` (or the classifier).
        """
        if not hasattr(self, "meta_init_"):
            raise NotFittedError(
                f"this {type(self).__name__} has no meta-learned initialization to save; "
                "call meta_fit first."
            )
        self.meta_init_.save(path)

    # ------------------------------------------------------------------ adaptation

    def _adapt(self, X: np.ndarray, y: np.ndarray) -> None:
        init = self._fit_init()
        if init is not None and init.n_features != X[0].size:
            raise ValueError(
                f"X has {X[0].size} feature(s), but the meta-learned initialization expects "
                f"{init.n_features} feature(s); pass the features used in meta-training."
            )
        # Without an initialization the learner's starting rates (Meta-SGD's) come from
        # inner_lr, so a new inner_lr needs a new learner.
        lr = float(self.inner_lr) if init is None else None
        key = (id(init), X.shape[1:], self._n_outputs_for_fit, lr, self._config_key())
        if getattr(self, "_learner_key", None) != key:
            self._learner = self._build_learner(init, X.shape[1])
            self._learner_key = key
        learner = self._learner
        if init is not None:
            self._warn_metasgd_steps(learner, init)
        Xt, yt = learner.as_tensors(X, y)
        # The MLP draws no random numbers; other modules may (dropout): seed those.
        seeded = (
            contextlib.nullcontext()
            if type(learner.module) is MLP
            else _SeededTorch(_seed_from(self.random_state), self.device)
        )
        with seeded:
            params = learner.adapt(
                Xt.unsqueeze(0),
                yt.unsqueeze(0),
                steps=self.inner_steps,
                inner_lr=self.inner_lr,
                track_graph=False,
            )
        self._check_adapted(learner, params, Xt, yt)
        self.adapted_params_ = params

    def _warn_metasgd_steps(self, learner: MetaLearner, init: MetaInit) -> None:
        """Warn when Meta-SGD's learned rates are used for more steps than they learned."""
        if learner.algorithm.name != "metasgd":
            return
        trained = init.metadata.get("meta_inner_steps", init.metadata.get("inner_steps"))
        if trained is None or self.inner_steps <= int(trained):
            return
        warnings.warn(
            f"fit adapts with inner_steps={self.inner_steps}, but this Meta-SGD "
            f"initialization was meta-trained with {int(trained)} inner step(s): its learned "
            "per-parameter learning rates are tuned for that many steps, and more steps "
            "often diverge (inf/nan). Set inner_steps (or meta_inner_steps when "
            f"meta-fitting) to {int(trained)} or fewer.",
            UserWarning,
            stacklevel=4,
        )

    def _check_adapted(self, learner, params, Xt, yt) -> None:
        """Raise DivergenceError if adaptation made a parameter NaN, infinite or huge.

        One fused norm per tensor and one sync; no forward pass, so no random numbers
        (dropout) are drawn outside the seeded fork. A norm overflows (|w| > ~1e19)
        long before the outputs of a diverging network stop being finite.
        """
        with torch.no_grad():
            norms = torch._foreach_norm(list(params.values()))
            finite = bool(torch.isfinite(torch.stack(norms)).all())
        if finite:
            return
        lr = float(self.inner_lr)
        raise DivergenceError(
            f"fit diverged: {self.inner_steps} inner steps at inner_lr={lr:g} made the "
            f"parameters NaN or infinite; lower inner_lr (e.g. to {lr / 10:g}) or "
            "inner_steps. The estimator was left as it was before this fit."
        )

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

    def _check_X_predict(self, X) -> np.ndarray:
        """Validated float32 X for prediction (fast path as in :func:`_fast_xy`)."""
        check_is_fitted(self)
        if (
            type(X) is np.ndarray
            and X.ndim == 2
            and X.dtype.kind == "f"
            and X.flags.c_contiguous
            and X.flags.writeable
            and X.shape[0] > 0
            and X.shape[1] == self.n_features_in_
            and "feature_names_in_" not in self.__dict__
        ):
            X = X.astype(np.float32, copy=False)
            if np.isfinite(X).all():
                return X
        X = validate_data(self, X, dtype=np.float32, reset=False, allow_nd=True)
        return X if X.flags.writeable else X.copy()

    def _raw_predict(self, X: np.ndarray) -> torch.Tensor:
        learner = self._learner
        Xt, _ = learner.as_tensors(X)
        if type(learner.module) is MLP:  # no dropout or batch statistics: no mode switch
            return learner.predict(self.adapted_params_, Xt.unsqueeze(0))[0]
        # Predict in eval mode, so that dropout is off and predictions are deterministic.
        training = learner.module.training
        learner.module.eval()
        try:
            return learner.predict(self.adapted_params_, Xt.unsqueeze(0))[0]
        finally:
            learner.module.train(training)

    def to_skorch(self, **kwargs):
        """A skorch net whose module holds the learned weights, ready for more training.

        Parameters
        ----------
        **kwargs
            Constructor arguments of the skorch net (``max_epochs``, ``callbacks``,
            ``optimizer``, ...). Defaults: ``lr=inner_lr``, ``train_split=None``, the
            estimator's ``device``, MSE (regressor) or cross-entropy on the logits
            (classifier) as the criterion.

        Returns
        -------
        skorch.NeuralNetRegressor or skorch.NeuralNetClassifier
            Initialized, so ``predict`` works at once and ``partial_fit`` continues from
            the exported weights (``fit`` too: skorch keeps a module instance's weights).
            The module is a copy; training it leaves this estimator unchanged.

        Notes
        -----
        The weights are the adapted ones after :meth:`fit`, else the meta-learned
        initialization. skorch trains every parameter with its own optimizer: Meta-SGD's
        learned per-parameter rates and ANIL's frozen body do not carry over. The
        regressor's net expects 2-D float32 targets, ``y.reshape(-1, 1)``; the
        classifier's net works on class indices ``0..n_outputs-1``, so encode labels with
        ``np.searchsorted(est.classes_, y)``.
        """
        if hasattr(self, "adapted_params_"):
            module = copy.deepcopy(self._learner.module)
            state = {k: v[0] for k, v in self.adapted_params_.items()}
            module.load_state_dict({**module.state_dict(), **state})
        else:
            init = self._resolve_meta_init()
            if init is None:
                raise NotFittedError(
                    f"this {type(self).__name__} has no weights to export yet: call meta_fit "
                    "or fit first (or pass meta_init)."
                )
            module = self._learner_from_init(init).module
        kwargs.setdefault("device", str(self.device))
        return self._skorch_net(module, kwargs)

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

        Raises
        ------
        ValueError
            For NaN/inf, empty or 1-D X, non-numeric data, X and y of different lengths,
            or X/y that do not match the meta-learned initialization (features, outputs).
            The estimator is left exactly as it was.
        """
        with _unchanged_on_error(self):
            self._check_params()
            fast = _fast_xy(X, y, regression=True)
            if fast is not None:
                X, y = fast
                self.n_features_in_ = X.shape[1]
                self.__dict__.pop("feature_names_in_", None)
            else:
                X, y = validate_data(
                    self, X, y, dtype=np.float32, multi_output=True, y_numeric=True,
                    allow_nd=True,
                )
                y = np.asarray(y, dtype=np.float32)
                X = X if X.flags.writeable else X.copy()  # torch warns on read-only arrays
            self._fit_outputs = 1 if y.ndim == 1 else y.shape[1]
            init = self._fit_init()
            if init is not None and init.n_features != X[0].size:
                raise ValueError(
                    f"X has {X[0].size} feature(s), but the meta-learned initialization "
                    f"expects {init.n_features} feature(s); pass the features used in "
                    "meta-training."
                )
            if init is not None and init.n_outputs != self._fit_outputs:
                raise ValueError(
                    f"y has {self._fit_outputs} output column(s) but the meta-learned "
                    f"initialization predicts {init.n_outputs}; use the targets of "
                    "meta-training."
                )
            self._y_ndim = y.ndim
            self._adapt(X, y)
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
        tags.regressor_tags.poor_score = True  # see _POOR_SCORE
        return tags

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
        with _unchanged_on_error(self):
            self._check_params()
            fast = _fast_xy(X, y, regression=False)
            if fast is not None:
                X, y = fast
                self.n_features_in_ = X.shape[1]
                self.__dict__.pop("feature_names_in_", None)
                classes, codes = np.unique(y, return_inverse=True)
            else:
                X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=True)
                check_classification_targets(y)
                X = X if X.flags.writeable else X.copy()  # torch warns on read-only arrays
                encoder = LabelEncoder().fit(y)
                classes, codes = encoder.classes_, encoder.transform(y)
            if len(classes) < 2:
                raise ValueError(
                    f"y contains only one class ({classes[0]!r}); a classifier needs at least "
                    "2 classes to fit."
                )
            init = self._fit_init()
            if init is not None and len(classes) > init.n_outputs:
                raise ValueError(
                    f"y has {len(classes)} classes but the meta-learned head has "
                    f"{init.n_outputs} outputs; meta-train with n_way >= {len(classes)}."
                )
            self.classes_ = classes
            self._adapt(X, codes)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True  # see _POOR_SCORE
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
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably."""
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

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
