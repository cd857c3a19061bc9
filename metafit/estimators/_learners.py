"""The one place that turns an estimator's parameters into a :class:`MetaLearner`.

:class:`LearnerFactory` builds the network (the default MLP from ``hidden_sizes``, a
module class with ``module__<name>`` arguments, or a copy of an instance) and the learner
around it, for meta-training, for adapting from a meta-learned initialization, or for
adapting from a random start. It owns the cache key of the learners it builds: every
input the learner reads is in it. Learners built from an initialization are cached on
that :class:`MetaInit`, since a search fits thousands of clones and building the network
costs about as much as one few-shot fit.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from dataclasses import dataclass
from typing import Any

from torch import nn

from metafit._checks import layer_widths
from metafit.algorithms import get_algorithm
from metafit.ensemble import EnsembleLearner
from metafit.estimators._adaptation import training_rate, training_steps
from metafit.estimators._inputs import SeededTorch, seed_from
from metafit.learner import MetaLearner
from metafit.models import MLP, is_stateless
from metafit.persistence import MetaInit, build_module

__all__ = ["LearnerFactory", "learner_factory"]


@dataclass(slots=True)
class LearnerFactory:
    """Builds networks and learners from an estimator's parameters (a snapshot of them).

    Parameters
    ----------
    module, hidden_sizes, activation, module_kwargs
        The network: see the estimators' parameters (``module_kwargs``: the
        ``module__<name>`` arguments, without the prefix).
    algorithm, inner_lr, inner_steps, forward, device, random_state, meta_batch_chunk
        The estimator's parameters of the same names.
    loss, kind
        From the estimator's :class:`metafit.estimators._targets.TargetKind`.
    """

    module: Any
    hidden_sizes: Any
    activation: str
    module_kwargs: dict
    algorithm: Any
    inner_lr: float
    inner_steps: int
    forward: str
    device: Any
    random_state: Any
    meta_batch_chunk: Any
    loss: str
    kind: str

    @classmethod
    def of(cls, est, target) -> LearnerFactory:
        """The factory for estimator ``est`` with target kind ``target``."""
        return cls(
            module=est.module,
            hidden_sizes=est.hidden_sizes,
            activation=est.activation,
            module_kwargs=est._module_kwargs(),
            # "auto" is resolved by meta_fit; a random start (fit alone) is MAML's
            algorithm="maml" if est.algorithm == "auto" else est.algorithm,
            inner_lr=training_rate(est),
            inner_steps=training_steps(est),
            forward=est.forward,
            device=est.device,
            random_state=est.random_state,
            meta_batch_chunk=est.meta_batch_chunk,
            loss=target.loss,
            kind=target.kind,
        )

    # ------------------------------------------------------------------ networks

    def make_module(self, n_features: int, n_outputs: int) -> tuple[nn.Module, dict]:
        """A new network and the constructor arguments that rebuild it."""
        if self.module is None:
            own = get_algorithm(self.algorithm).default_module(
                n_features, n_outputs, [int(h) for h in layer_widths(self.hidden_sizes)],
                self.activation,
            )
            if own is not None:  # CAVIA's network with a context input
                return own
            kwargs = {
                "n_inputs": int(n_features),
                "n_outputs": int(n_outputs),
                "hidden_sizes": [int(h) for h in layer_widths(self.hidden_sizes)],
                "activation": self.activation,
            }
            return MLP(**kwargs), kwargs
        if isinstance(self.module, nn.Module):
            return copy.deepcopy(self.module), {}
        kwargs = dict(self.module_kwargs)
        accepted = inspect.signature(self.module).parameters
        if "n_inputs" in accepted and "n_inputs" not in kwargs:
            kwargs["n_inputs"] = int(n_features)
        if "n_outputs" in accepted and "n_outputs" not in kwargs:
            kwargs["n_outputs"] = int(n_outputs)
        return self.module(**kwargs), kwargs

    # ------------------------------------------------------------------ learners

    def for_training(
        self, n_features: int, n_outputs: int, inner_steps: int
    ) -> tuple[MetaLearner, dict]:
        """A learner to meta-train (call inside the run's seeded block), and the module's
        constructor arguments."""
        algorithm = get_algorithm(self.algorithm)
        if algorithm.regression_only and self.loss != "mse":
            raise ValueError(
                f"algorithm={algorithm.name!r} models real targets (a Gaussian likelihood); "
                "use MetaInitializedRegressor, or another algorithm for classification."
            )
        outputs = algorithm.module_outputs(n_outputs)
        module, kwargs = self.make_module(n_features, outputs)
        learner = MetaLearner(
            module,
            loss=self.loss,
            algorithm=self.algorithm,
            inner_lr=self.inner_lr,
            inner_steps=inner_steps,
            forward=self.forward,
            device=self.device,
            meta_batch_chunk=self.meta_batch_chunk,
        )
        return learner, kwargs

    def from_init(self, init: MetaInit) -> MetaLearner | EnsembleLearner:
        """A new learner holding ``init``: its network, and the algorithm, options and
        inner-step count it was meta-trained with (per-step rates have that many); for an
        ensemble's initialization, one per member, averaged (:mod:`metafit.ensemble`)."""
        self.check_kind(init)
        if init.members is not None:
            return EnsembleLearner([self.from_init(m) for m in init.members],
                                   init.metadata["weights"])
        # Building draws a throw-away random initialization (overwritten below) from the
        # global generator: fork it so that the user's RNG state is left alone.
        with SeededTorch(0, self.device):
            if self.module is None:
                self.check_mlp_spec(init)
                module = build_module(init.spec, init.tensors)
            else:
                algorithm = get_algorithm(init.metadata.get("algorithm", "maml"),
                                          init.algorithm_options)
                module, _ = self.make_module(init.n_features,
                                             algorithm.module_outputs(init.n_outputs))
        meta = init.metadata
        trained_steps = init.trained_inner_steps
        learner = MetaLearner(
            module,
            loss=self.loss,
            algorithm=get_algorithm(meta.get("algorithm", "maml"), init.algorithm_options),
            inner_lr=meta.get("inner_lr", self.inner_lr),
            inner_steps=self.inner_steps if trained_steps is None else trained_steps,
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

    def around(self, module: nn.Module, algorithm, inner_steps: int) -> MetaLearner:
        """A learner around a given network (baselines of the plots: a random or a
        pretrained start adapted like the meta-learned one)."""
        return MetaLearner(
            module,
            loss=self.loss,
            algorithm=algorithm,
            inner_lr=self.inner_lr,
            inner_steps=inner_steps,
            forward=self.forward,
            device=self.device,
        )

    def for_fit(self, init: MetaInit | None, n_features: int, n_outputs: int) -> MetaLearner:
        """The learner ``fit`` adapts with: a cached one built from ``init``, or a new one
        from a random start (seeded by ``random_state``) when ``init`` is None."""
        if init is None:
            with SeededTorch(seed_from(self.random_state), self.device):
                learner, _ = self.for_training(n_features, n_outputs, int(self.inner_steps))
            return learner
        cache = init.__dict__.setdefault("_learners", {})
        key = (n_features, self.init_key())
        learner = cache.get(key)
        if learner is None:
            learner = self.from_init(init)
            # Only learners that fit never mutates are shared (threads fit clones at once).
            if is_stateless(learner.module):
                cache[key] = learner
        return learner

    def fit_key(self, init: MetaInit | None, feature_shape: tuple, n_outputs: int) -> tuple:
        """Everything :meth:`for_fit` reads: equal keys build equal learners.

        Without an initialization, a ``random_state`` that is not an int counts as equal
        (the random start is drawn once per estimator, not once per fit).
        """
        if init is not None:
            return (id(init), feature_shape, self.init_key())
        seed = int(self.random_state) if isinstance(self.random_state, numbers.Integral) else None
        algorithm = self.algorithm if isinstance(self.algorithm, str) else repr(self.algorithm)
        return (None, feature_shape, n_outputs, self.init_key(), algorithm,
                float(self.inner_lr), int(self.inner_steps), seed)

    def init_key(self) -> tuple:
        """What a learner built from an initialization reads of the parameters (the
        algorithm, its options, rates and steps come from the initialization)."""
        return (
            self.forward,
            str(self.device),
            repr(layer_widths(self.hidden_sizes)) if self.module is None else None,
            self.activation,
            id(self.module),
            repr(sorted(self.module_kwargs.items())),
            self.loss,
        )

    # ------------------------------------------------------------------ checks

    def check_kind(self, init: MetaInit) -> None:
        """A regressor's initialization cannot serve a classifier, nor the reverse."""
        kind = init.metadata.get("estimator")
        if kind and kind != self.kind:
            raise ValueError(
                f"this meta-initialization was learned by a {kind}; it cannot serve a "
                f"{self.kind}."
            )

    def check_mlp_spec(self, init: MetaInit) -> None:
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


def learner_factory(est) -> LearnerFactory:
    """The :class:`LearnerFactory` of estimator ``est`` (for tools such as the plots)."""
    return LearnerFactory.of(est, est._target)
