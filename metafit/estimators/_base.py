"""The estimator shell: holds the parameters, validates the data, delegates the work.

:class:`MetaInitializedEstimator` is what the regressor and the classifier share. It is
composed of small parts instead of mixins: a :class:`~metafit.estimators._targets.TargetKind`
(what the regressor and classifier differ by), the parameter table
(:mod:`metafit.estimators._params`), a :class:`~metafit.estimators._learners.LearnerFactory`
(the only place that builds a :class:`~metafit.learner.MetaLearner`) and a
:class:`~metafit.estimators._meta_fit_run.MetaFitRun` (the body of ``meta_fit``). Calls go
one way: the shell calls the parts, the parts call the engine.

``meta_fit(tasks)`` learns an initialization from many related tasks; ``fit(X, y)`` adapts
it to one new task with ``inner_steps`` gradient steps of the same inner loop that
meta-training used; ``predict`` runs the adapted network. The meta-learned initialization
survives :func:`sklearn.base.clone`, so searches and cross-validation adapt from it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from metafit._threads import threads_for, torch_threads
from metafit.estimators._adaptation import check_adapted, fit_settings
from metafit.estimators._auto_algorithm import candidates, meta_fit_auto
from metafit.estimators._inputs import (
    SeededTorch,
    check_n_features,
    fit_data,
    seed_from,
    table_fit_data,
    unchanged_on_error,
)
from metafit.estimators._learners import LearnerFactory, learner_factory
from metafit.estimators._meta_fit_run import MetaFitRun, warn_already_done, warn_kept
from metafit.estimators._params import check_params
from metafit.estimators._skorch_export import skorch_net_of
from metafit.estimators._table_mode import (
    TablePreprocessing,
    meta_fit_arguments,
    meta_fit_inputs,
)
from metafit.estimators._targets import TargetKind
from metafit.models import MLP, is_stateless
from metafit.persistence import MetaInit
from metafit.training import DivergenceError

__all__ = ["MetaInitializedEstimator", "NoMetaInitWarning"]


class NoMetaInitWarning(UserWarning):
    """``fit`` ran without a meta-learned initialization (from a random start); said once
    per estimator."""

#: Why both estimators declare the ``poor_score`` tag (the scikit-learn checks then skip
#: their accuracy thresholds, nothing else): ``fit`` is a few-shot adapter, ``inner_steps``
#: (default 5) plain SGD steps at ``inner_lr`` from an initialization. From a meta-learned
#: start that suffices on tasks like those of meta-training; the checks' toy data sets are
#: not such tasks, and 5 steps from a random or foreign start do not reach the scores the
#: checks demand of estimators trained to convergence.
_POOR_SCORE = True


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
    algorithm : {"auto", "maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", \
"imaml", "alpaca", "lmm", "cavia", "joint"} or MetaAlgorithm, default="auto"
        Meta-learning algorithm used by :meth:`meta_fit`. ``"auto"``: on a table with
        validation groups (table mode, one target), meta-train ``"maml"``,
        ``"alpaca"`` and ``"lmm"`` and keep all three, ``fit`` adapting each and
        ``predict`` their mean weighted by the inverse of each one's validation MSE
        (about twice MAML's meta-training time; ``algorithm_`` is ``"maml+alpaca+lmm"``,
        ``algorithm_scores_`` each one's validation loss, ``algorithm_weights_`` the
        weights; one that diverged is left out; see :mod:`metafit.ensemble`); anywhere
        else, ``"maml"``. An instance
        (such as ``MAMLPlusPlus(learn_inner_lr=False)``) sets its options. The algorithm
        also decides what ``fit`` adapts (ANIL: the head only; Meta-SGD and MAML++:
        with their learned rates). ``fit`` always uses the algorithm and options of the
        initialization.
        ``"alpaca"`` puts a Bayesian linear head with a meta-learned prior on the network
        (closed-form ``fit``, ``predict(X, return_std=True)``; regression, one target).
        ``"lmm"`` is the same head on the columns themselves, the network unused: a
        linear mixed model with random effects on every column and a meta-learned prior.
        ``"cavia"`` adapts only a context vector fed to the network (its own
        ``context_lr``; the default network is :class:`metafit.models.ContextMLP`).
        ``"imaml"`` (implicit MAML) adapts with a proximal term and meta-learns by
        implicit gradients: memory flat in the inner steps.
        ``"joint"`` is the baseline without meta-learning: one network trained on all
        tasks' rows pooled, which ``fit`` fine-tunes.
    inner_lr : float or "auto", default="auto"
        Learning rate of the inner SGD loop of ``fit``, and of meta-training unless
        ``meta_inner_lr`` is set. ``"auto"``: meta-training uses 0.01, and ``fit`` the
        rate :meth:`meta_fit` chose on the validation tasks (table mode's held-out groups,
        or ``validation_tasks``) among 0.1x to 10x the meta-training rate; without
        validation tasks, the meta-training rate. The value used is ``inner_lr_``.
    inner_steps : int or "auto", default="auto"
        Gradient steps of ``fit``, and of meta-training unless ``meta_inner_steps`` is
        set. ``"auto"``: meta-training uses 5, and ``fit`` the count :meth:`meta_fit`
        chose on the validation tasks among 0 (no adaptation), 1, 2, 5, 10, 20, 50, 100
        and the meta-training count; without validation tasks, the meta-training count. The
        value used is ``inner_steps_``.
    meta_inner_lr : float or None, default=None
        Inner learning rate during meta-training; None means a numeric ``inner_lr``, else
        0.01.
    meta_inner_steps : int or None, default=None
        Inner steps during meta-training (the MAML paper trains with 1 and tests with
        more); None means a numeric ``inner_steps``, else 5.
    meta_lr : float or None, default=None
        Meta learning rate; None uses the algorithm's default (Adam 1e-3; Reptile's
        outer step size 1.0, annealed to 0).
    meta_batch_size : int, default=25
        Tasks per meta-update.
    meta_batch_chunk : int or None, default=None
        Compute each meta-update over at most this many tasks at a time and sum the
        pieces: the same meta-gradient with the memory of one piece, for a large
        meta-batch of second-order steps. None: the whole meta-batch at once.
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
    verbose : int or None, default=None
        None shows a tqdm progress bar during :meth:`meta_fit` (meta-loss and latest
        validation loss) when stderr is a terminal, and nothing when it is redirected to a
        file (tqdm's ``disable=None``); 0 is silent; 1 or more always draws the bar.
        Messages go to the ``logging`` logger ``"metafit"`` whatever the value.
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
    callbacks : list of TrainingCallback or (name, TrainingCallback), default=None
        Extra meta-training callbacks, skorch-style (:mod:`metafit.callbacks`:
        ``LRScheduler``, ``EarlyStopping``, ``Checkpoint``, ``TensorBoard``,
        ``ProgressBar``, or your own :class:`~metafit.training.TrainingCallback`). Each
        :meth:`meta_fit` works on deep copies, kept in ``callbacks_``; the list itself is
        never changed, so clones and searches are safe.
    n_threads : int or None, default=None
        torch CPU threads during :meth:`meta_fit` and :meth:`fit`, restored afterwards.
        None picks what runs fastest for the network: 1 for networks without
        convolutions (the built-in MLP: its kernels are too short to share, and extra
        threads stall on a busy machine), every core for convolutional ones (Conv4);
        see ``benchmarks/threads.py``.
    support_range : tuple of (int, int), default=(2, 10)
        Table mode (``meta_fit(X, y, groups=...)``): the smallest and largest number of
        support rows of an episode; every meta-batch draws its size anew, so that one
        initialization serves any few-shot ``fit``.
    validation_fraction : float or None, default=0.2
        Table mode: the fraction of groups held out of meta-training (whole groups, as
        new groups arrive). Their episodes are the validation tasks: the initialization
        with the lowest validation loss is kept, and ``patience`` may stop early. 0 or
        None holds nothing out; so do ``validation_tasks`` given to ``meta_fit``, which
        replace them. A table of fewer than 3 groups holds nothing out (with a warning).
    categorical_features : {"from_dtype"} or None, default="from_dtype"
        Table mode: DataFrame columns of categorical, object or string dtype are one-hot
        encoded with the categories of the meta-training rows (a category unseen then
        encodes as zeros in ``fit`` and ``predict``), as scikit-learn's
        ``HistGradientBoostingRegressor`` reads them from the dtype. None refuses
        non-numeric columns.
    standardize : {"auto", True, False}, default="auto"
        Standardize the features (and a regressor's target) with statistics of the
        meta-training rows, saved with the initialization and applied by ``fit`` and
        ``predict``, which take and return the data's own units. ``"auto"``: in table
        mode only. ``True`` in task mode takes the statistics from the first 100
        meta-training tasks (2-D features); ``False`` in table mode trains on the raw
        values.
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
    algorithm_ : str
        The algorithm :meth:`meta_fit` trained (``algorithm``, or what ``"auto"``
        kept: ``"maml+alpaca+lmm"`` for the three weighted), and the one :meth:`fit` adapts
        with (the initialization's).
    algorithm_scores_ : dict of str to float
        After ``algorithm="auto"`` compared candidates: each one's mean validation query
        loss after adaptation (infinite if it diverged).
    algorithm_weights_ : dict of str to float
        After ``algorithm="auto"`` kept several candidates: the weight of each one's
        predictions, proportional to the inverse of its validation loss, summing to 1.
    inner_lr_ : float
        The inner learning rate ``fit`` adapts with (``inner_lr``, or the one chosen when
        it is ``"auto"``); set by :meth:`meta_fit` and :meth:`fit`.
    inner_steps_ : int
        The inner steps ``fit`` takes, likewise.
    adaptation_scores_ : dict of (float, int) to float
        After :meth:`meta_fit` with validation tasks and an ``"auto"`` parameter: the mean
        validation query loss of every ``(inner_lr, inner_steps)`` pair tried.
    callbacks_ : list of (str, TrainingCallback)
        The callbacks of the last :meth:`meta_fit` (copies of ``callbacks``), by name.

    Notes
    -----
    ``meta_history_`` is the counterpart of skorch's ``net.history``: one dict per
    meta-iteration instead of per epoch, with the same slicing, e.g.
    ``meta_history_[:, "meta_loss"]`` or ``meta_history_[-1, "validation_loss"]``.
    """

    #: what the regressor and the classifier differ by (set by each subclass)
    _target: TargetKind = TargetKind()

    def __init__(
        self,
        module=None,
        *,
        hidden_sizes=(40, 40),
        activation="relu",
        algorithm="auto",
        inner_lr="auto",
        inner_steps="auto",
        meta_inner_lr=None,
        meta_inner_steps=None,
        meta_lr=None,
        meta_batch_size=25,
        meta_batch_chunk=None,
        meta_iterations=1000,
        validation_interval=10,
        forward="auto",
        device="cpu",
        random_state=None,
        verbose=None,
        meta_init=None,
        warm_start=False,
        patience=None,
        min_delta=0.0,
        clip_grad_norm=None,
        checkpoint_path=None,
        checkpoint_interval=100,
        on_interrupt="warn",
        callbacks=None,
        n_threads=None,
        support_range=(2, 10),
        validation_fraction=0.2,
        categorical_features="from_dtype",
        standardize="auto",
        **kwargs,
    ):
        self.module = module
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        self.algorithm = algorithm
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.meta_inner_lr = meta_inner_lr
        self.meta_inner_steps = meta_inner_steps
        self.meta_lr = meta_lr
        self.meta_batch_size = meta_batch_size
        self.meta_batch_chunk = meta_batch_chunk
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
        self.callbacks = callbacks
        self.n_threads = n_threads
        self.support_range = support_range
        self.validation_fraction = validation_fraction
        self.categorical_features = categorical_features
        self.standardize = standardize
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
        # through the MetaInit, the network built from it; see LearnerFactory.for_fit).
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
            init = init or self._fit_init()
            n_outputs = state.get("_fit_outputs") or init.n_outputs
            self._learner = self._factory().for_fit(init, self.n_features_in_, n_outputs)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------------------ composed parts

    def _check_params(self) -> None:
        """Validate every constructor parameter (``_params.check_params``)."""
        check_params(self)

    def _factory(self) -> LearnerFactory:
        return learner_factory(self)

    # ------------------------------------------------------------------ meta-training

    # Long function: 93 lines, of which 58 are the numpydoc of its two input modes; the body
    # resolves the inputs, the warm start and the outcome, each delegated.
    def meta_fit(self, X, y=None, groups=None, *, validation_tasks=None):
        """Meta-learn the initialization from a stream of tasks, or from a grouped table.

        Two input modes:

        * **tasks**: ``meta_fit(tasks, validation_tasks=None)``, with the validation tasks
          as the second argument or by keyword;
        * **table**: ``meta_fit(X, y, groups=groups)``, one row per observation and a
          group label per row (a school, store, patient). Every meta-batch draws new
          episodes from the groups (``support_range`` support rows, the others' rows as
          query); ``validation_fraction`` of the groups are held out as validation
          tasks, and the initialization with the lowest validation loss is kept. X and
          y are standardized with the meta-training rows' statistics, which are saved
          with the initialization: ``fit`` and ``predict`` work in the table's units.
          A classifier standardizes X only; its head has one output per class of the
          table, and ``fit`` on a new group maps its labels onto those classes (a group
          may show one class only).

        Parameters
        ----------
        X : iterable of Task or 4-tuples, or array-like of shape (n_samples, n_features)
            Tasks: finite or endless (e.g. :class:`metafit.tasks.SinusoidTasks`),
            consumed ``meta_batch_size`` at a time for ``meta_iterations`` meta-updates.
            Table: the features (an array or a numeric DataFrame).
        y : array-like of shape (n_samples,) or iterable of Task, optional
            Table: the targets. Tasks: the validation tasks (``validation_tasks``).
        groups : array-like of shape (n_samples,), optional
            Table: the group label of each row, any hashable values. Given, it selects
            table mode.
        validation_tasks : iterable of Task, optional
            Held-out tasks (at most the first 100 are used) whose post-adaptation query
            loss is recorded every ``validation_interval`` iterations; needed by
            ``patience``, and used to pick the state kept after an interrupt. In table
            mode they replace the held-out groups (in the table's units).

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
        X, y, groups, validation_tasks = meta_fit_arguments(X, y, groups, validation_tasks)
        continued = None
        if self.warm_start:
            continued = self.meta_init_ if hasattr(self, "meta_init_") else self._fit_init()
        if self.algorithm == "auto":  # each candidate meta-fits a clone; the best is kept
            names = candidates(self, y, groups, validation_tasks, continued=continued,
                               regression=self._target.regression)
            meta_fit_auto(self, X, y, groups, validation_tasks, names, continued)
            return self
        if continued is not None and continued.members is not None:
            raise ValueError(
                f"warm_start=True continues an ensemble of {continued.metadata['algorithm']} "
                f"(what algorithm='auto' keeps), not algorithm={self.algorithm!r}: set "
                "algorithm='auto' to continue it, or warm_start=False to start over."
            )
        tasks, validation_tasks, prep = meta_fit_inputs(
            self, X, y, groups, validation_tasks, regression=self._target.regression,
            previous=TablePreprocessing.of(continued),
        )
        target = self._target if prep is None else self._target.for_table(prep.classes)
        run = MetaFitRun(self, target, None if prep is None else prep.metadata())
        stream, val = run.read_tasks(tasks, validation_tasks)
        resume = None
        if self.warm_start:
            if hasattr(self, "meta_init_"):
                resume = run.warm_start_point(
                    self.meta_init_, list(getattr(self, "meta_history_", [])),
                    self.__dict__.get("_warm_state_"),
                )
            else:
                resume = run.warm_start_point(self._resolve_meta_init(), [], None)
        if resume is not None and resume.state.iteration >= self.meta_iterations:
            warn_already_done(resume.state.iteration, self.meta_iterations)
            return self
        try:
            outcome = run.run(stream, val, resume)
        except Exception as exc:
            if getattr(exc, "outcome", None) is not None:
                self._store(exc.outcome)
                if not isinstance(exc, DivergenceError):  # its message says so already
                    warn_kept(self.meta_init_, exc.outcome.last_iteration, error=exc)
            raise
        self._store(outcome)
        self.callbacks_ = run.user_callbacks
        self._interrupted_run = outcome.interrupted
        if outcome.interrupted:
            warn_kept(self.meta_init_, outcome.last_iteration)
            if self.on_interrupt == "raise":
                raise KeyboardInterrupt
        return self

    def _store(self, outcome) -> None:
        """Keep a run's result; a previous ``fit`` no longer applies."""
        self.meta_init_ = outcome.meta_init
        self.meta_history_ = outcome.history
        self._warm_state_ = outcome.warm
        for attr in ("adapted_params_", "_learner", "_learner_key", "n_features_in_",
                     "adaptation_scores_", "algorithm_scores_", "algorithm_weights_"):
            self.__dict__.pop(attr, None)
        self.algorithm_ = self.meta_init_.metadata["algorithm"]
        self.inner_lr_, self.inner_steps_ = fit_settings(self, self.meta_init_)
        chosen = self.meta_init_.metadata.get("adaptation")
        if chosen:
            self.adaptation_scores_ = {(lr, steps): math.inf if loss is None else loss
                                       for lr, steps, loss in chosen["scores"]}

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

    # ------------------------------------------------------------------ the initialization

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

    def _fit_init(self, factory: LearnerFactory | None = None) -> MetaInit | None:
        init = self._resolve_meta_init()
        if init is not None:
            (factory or self._factory()).check_kind(init)
        return init

    def _preprocessing_for(self, init: MetaInit | None) -> TablePreprocessing | None:
        """Table mode's encoding and standardization saved with ``init``, parsed once."""
        cached = self.__dict__.get("_prep_of")
        if cached is not None and cached[0] is init:
            return cached[1]
        prep = TablePreprocessing.of(init)
        self._prep_of = (init, prep)
        return prep

    # ------------------------------------------------------------------ adaptation

    def _fit(self, X, y):
        """``fit`` of both estimators: validate, encode ``y`` by the target kind, adapt."""
        with unchanged_on_error(self):
            self._check_params()
            factory = self._factory()
            init = self._fit_init(factory)
            prep = self._preprocessing_for(init)
            kind = self._target
            if prep is None:
                X, y, fast = fit_data(self, X, y, kind)
            else:  # table mode: encoded and standardized in float64, then float32
                kind = kind.for_table(prep.classes)  # a classifier: the table's classes
                X, y, fast = table_fit_data(self, X, y, prep, kind)
            target = kind.encode(y, fast)
            mlp = f"{MLP.__module__}.{MLP.__qualname__}"
            if self.module is None and X.ndim != 2 and (init is None or init.network_spec.get(
                    "class") == mlp):
                raise ValueError(
                    f"X has shape {X.shape}, but the default MLP takes 2-D X (n_samples, "
                    "n_features): flatten it with X.reshape(len(X), -1), or pass module= a "
                    "network for this shape (metafit.models.Conv4 for images)."
                )
            if init is not None:
                check_n_features(X[0].size, init.n_features)
            kind.check_init(init, target)
            self._table_prep = prep
            self.__dict__.update(target.fitted)
            self._fit_outputs = target.n_outputs
            self._adapt(X, target.y, init, factory)
        return self

    def _adapt(self, X: np.ndarray, y: np.ndarray, init: MetaInit | None, factory) -> None:
        """Adapt from ``init`` (already resolved and checked against ``X`` by ``fit``)."""
        key = factory.fit_key(init, X.shape[1:], self._fit_outputs)
        if self.__dict__.get("_learner_key") != key:
            self._learner = factory.for_fit(init, X.shape[1], self._fit_outputs)
            self._learner_key = key
        learner = self._learner
        lr, steps = fit_settings(self, init)
        if init is not None:
            message = learner.algorithm.fit_warning(steps, init.trained_inner_steps)
            if message:
                warnings.warn(message, UserWarning, stacklevel=4)
        elif not self.__dict__.get("_warned_no_init"):
            self._warned_no_init = True
            warnings.warn(
                f"{type(self).__name__}.fit has no meta-learned initialization: it adapts a "
                "random network in inner_steps steps, which is rarely what you want. Call "
                "meta_fit first, or pass meta_init=<file>.",
                NoMetaInitWarning,
                stacklevel=4,
            )
        Xt, yt = learner.as_tensors(X[None], y[None])  # one task: a task dimension of 1
        # A stateless module draws no random numbers; other modules may (dropout).
        seeded = (
            contextlib.nullcontext()
            if is_stateless(learner.module)
            else SeededTorch(seed_from(self.random_state), self.device)
        )
        with seeded, torch_threads(threads_for(learner.module, self.n_threads)):
            params = learner.adapt(Xt, yt, steps=steps, inner_lr=lr, track_graph=False)
        check_adapted(params, X, y, lr, steps, regression=self._target.regression)
        self.inner_lr_, self.inner_steps_ = lr, steps
        self.algorithm_ = learner.algorithm.name
        self.adapted_params_ = params

    # ------------------------------------------------------------------ prediction

    def _raw_predict(self, X: np.ndarray) -> torch.Tensor:
        learner = self._learner
        Xt, _ = learner.as_tensors(X)
        last_step = learner.last_step(self.inner_steps_)  # MAML++'s per-step BatchNorm set
        with torch_threads(threads_for(learner.module, self.n_threads)):  # as fit's
            if is_stateless(learner.module):  # no dropout or batch statistics: no mode switch
                return learner.predict(self.adapted_params_, Xt.unsqueeze(0),
                                       step=last_step)[0]
            # Predict in eval mode, so that dropout is off and predictions are deterministic.
            training = learner.module.training
            learner.module.eval()
            try:
                return learner.predict(self.adapted_params_, Xt.unsqueeze(0),
                                       step=last_step)[0]
            finally:
                learner.module.train(training)

    def to_skorch(self, **kwargs):
        """A skorch net whose module holds the learned weights, ready for more training.

        Parameters
        ----------
        **kwargs
            Constructor arguments of the skorch net (``max_epochs``, ``callbacks``,
            ``optimizer``, ...). Defaults: ``lr=inner_lr_`` (the rate ``fit`` uses),
            ``train_split=None``, the estimator's ``device``, MSE (regressor) or
            cross-entropy on the logits (classifier) as the criterion.

        Returns
        -------
        skorch.NeuralNetRegressor or skorch.NeuralNetClassifier
            Initialized, so ``predict`` works at once and ``partial_fit`` continues from
            the exported weights (``fit`` too: skorch keeps a module instance's weights).
            The module is a copy; training it leaves this estimator unchanged.

        Notes
        -----
        The weights are the adapted ones after :meth:`fit`, else the meta-learned
        initialization. After table mode (or ``standardize=True``) the module wraps the
        network in the saved standardization, so the net takes (and a regressor's
        returns) the table's units; categorical columns cannot be exported. skorch
        trains every parameter with its own optimizer: Meta-SGD's learned
        per-parameter rates and ANIL's frozen body do not carry over. The
        regressor's net expects 2-D float32 targets, ``y.reshape(-1, 1)``; the
        classifier's net works on class indices ``0..n_outputs-1``, so encode labels with
        ``np.searchsorted(est.classes_, y)``.
        """
        return skorch_net_of(self, kwargs)
