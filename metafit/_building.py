"""How an estimator turns its parameters, or a meta-initialization, into a MetaLearner.

:class:`LearnerBuildingMixin` builds the network (the default MLP from ``hidden_sizes``,
a module class with ``module__<name>`` arguments, or a copy of an instance), resolves the
initialization ``fit`` adapts from (``meta_fit``'s, else ``meta_init=``, read once per
file), checks that it suits the estimator, and caches the learners built from it: a search
fits thousands of clones, and building the network costs about as much as one few-shot fit.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os

from torch import nn

from metafit._checks import layer_widths
from metafit._validation import SeededTorch, seed_from
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.persistence import MetaInit, build_module

__all__ = ["LearnerBuildingMixin"]


class LearnerBuildingMixin:
    """Network and learner construction for the estimators (a base of the estimators)."""

    def _make_module(self, n_features: int, n_outputs: int) -> tuple[nn.Module, dict]:
        if self.module is None:
            kwargs = {
                "n_inputs": int(n_features),
                "n_outputs": int(n_outputs),
                "hidden_sizes": [int(h) for h in layer_widths(self.hidden_sizes)],
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

    def _check_init_kind(self, init: MetaInit) -> None:
        """A regressor's initialization cannot serve a classifier, nor the reverse."""
        kind = init.metadata.get("estimator")
        if kind and kind != self._estimator_kind:
            raise ValueError(
                f"this meta-initialization was learned by a {kind}; it cannot serve a "
                f"{self._estimator_kind}."
            )

    def _learner_from_init(self, init: MetaInit) -> MetaLearner:
        self._check_init_kind(init)
        # Building draws a throw-away random initialization (overwritten below) from the
        # global generator: fork it so that the user's RNG state is left alone.
        with SeededTorch(0, self.device):
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
        sizes = [int(h) for h in layer_widths(self.hidden_sizes)]
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
        with SeededTorch(seed_from(self.random_state), self.device):
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
        if init is not None:
            self._check_init_kind(init)
        return init

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
