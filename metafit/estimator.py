"""scikit-learn estimators over the meta-learning engine: the shared base class.

``meta_fit(tasks)`` learns an initialization from many related tasks; ``fit(X, y)`` adapts
it to one new task with ``inner_steps`` gradient steps of the same inner loop that
meta-training used; ``predict`` runs the adapted network. The meta-learned initialization
survives :func:`sklearn.base.clone`, so searches and cross-validation adapt from it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted, validate_data

from metafit._building import LearnerBuildingMixin
from metafit._meta_training import MetaTrainingMixin
from metafit._validation import SeededTorch, check_params, fast_X, fast_xy, seed_from
from metafit.distributed import distributed_training
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.persistence import MetaInit, module_spec
from metafit.tasks import Task, iter_meta_batches
from metafit.training import DivergenceError, TrainingState, meta_train

__all__ = [
    "MetaInitializedEstimator",
    "MetaInitializedRegressor",
    "MetaInitializedClassifier",
]

#: Why both estimators declare the ``poor_score`` tag (the scikit-learn checks then skip
#: their accuracy thresholds, nothing else): ``fit`` is a few-shot adapter, ``inner_steps``
#: (default 5) plain SGD steps at ``inner_lr`` from an initialization. From a meta-learned
#: start that suffices on tasks like those of meta-training; the checks' toy data sets are
#: not such tasks, and 5 steps from a random or foreign start do not reach the scores the
#: checks demand of estimators trained to convergence.
_POOR_SCORE = True


class MetaInitializedEstimator(LearnerBuildingMixin, MetaTrainingMixin, BaseEstimator):
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
    forward : {"auto", "mlp", "vmap", "loop", "module"}, default="auto"
        How the engine batches tasks, see :func:`metafit.functional.make_forward`
        (``"module"``: the module's own ``batched_forward``, as Conv4 has).
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
        """Validate every constructor parameter (see :func:`metafit._validation.check_params`)."""
        check_params(self)

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

        checked([*first, *(val or [])])
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

        seed = seed_from(self.random_state)
        # Under torchrun / in a process group: this rank's share of each meta-batch.
        parallel = distributed_training(self.meta_batch_size, self.device)
        with parallel, SeededTorch(seed, self.device):
            module, kwargs = self._make_module(n_features, n_outputs)
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

    def _fit_data(self, X, y, *, regression: bool, **checks) -> tuple[np.ndarray, np.ndarray, bool]:
        """``fit``'s ``X`` and ``y`` as arrays (``X`` float32), and whether they took the
        fast path.

        Plain, clean numpy arrays skip scikit-learn's ``validate_data``, which costs as
        much as a few-shot fit (:func:`metafit._validation.fast_xy`); anything else goes
        through it with ``checks`` and raises its usual errors.
        """
        fast = fast_xy(X, y, regression=regression)
        if fast is not None:
            self.n_features_in_ = fast[0].shape[1]
            self.__dict__.pop("feature_names_in_", None)
            return fast[0], fast[1], True
        X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=True, **checks)
        X = X if X.flags.writeable else X.copy()  # torch warns on read-only arrays
        return X, y, False

    @staticmethod
    def _check_init_features(init: MetaInit | None, X: np.ndarray) -> None:
        """Raise if ``X`` has another feature count than the meta-learned initialization."""
        if init is not None and init.n_features != X[0].size:
            raise ValueError(
                f"X has {X[0].size} feature(s), but the meta-learned initialization expects "
                f"{init.n_features} feature(s); pass the features used in meta-training."
            )

    def _adapt(self, X: np.ndarray, y: np.ndarray, init: MetaInit | None) -> None:
        """Adapt from ``init`` (already resolved and checked against ``X`` by ``fit``)."""
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
        Xt, yt = learner.as_tensors(X[None], y[None])  # one task: a task dimension of 1
        # The MLP draws no random numbers; other modules may (dropout): seed those.
        seeded = (
            contextlib.nullcontext()
            if type(learner.module) is MLP
            else SeededTorch(seed_from(self.random_state), self.device)
        )
        with seeded:
            params = learner.adapt(
                Xt,
                yt,
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

    def _check_X_predict(self, X) -> np.ndarray:
        """Validated float32 X for prediction (fast path: :func:`metafit._validation.fast_X`)."""
        check_is_fitted(self)
        if "feature_names_in_" not in self.__dict__:
            fast = fast_X(X, self.n_features_in_)
            if fast is not None:
                return fast
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


# The concrete estimators live in their own modules; importing them here (once the base
# class exists) keeps ``from metafit.estimator import MetaInitializedRegressor`` working.
from metafit.classifier import MetaInitializedClassifier  # noqa: E402
from metafit.regressor import MetaInitializedRegressor  # noqa: E402
