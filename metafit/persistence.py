"""The meta-learned initialization as an artifact: tensors plus what rebuilds the module.

A :class:`MetaInit` is what ``meta_fit`` produces, what ``clone`` carries to the copies of
an estimator, what ``save_meta_init`` writes and what ``meta_init=`` reads. Files use the
safetensors format: loading one reads numbers and a JSON header and never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metafit._atomic import atomic_path

__all__ = [
    "ENSEMBLE_CLASS",
    "MetaInit",
    "member_entries",
    "member_prefix",
    "FORMAT_VERSION",
    "build_module",
    "is_meta_init_file",
    "module_spec",
]

#: Version 2 adds ``metadata["algorithm_options"]`` (the algorithm's own options, see
#: :meth:`metafit.algorithms.MetaAlgorithm.get_config`); version-1 files still load and
#: mean the algorithm's defaults.
FORMAT_VERSION = 2
_REQUIRED_METADATA = ("n_features", "n_outputs")
_BUILTIN_PREFIX = "metafit."
#: ``spec["class"]`` of an ensemble's initialization (:meth:`MetaInit.ensemble`)
ENSEMBLE_CLASS = "metafit.ensemble.EnsembleLearner"
#: a member's metadata that belongs to it alone (the rest is the ensemble's too)
_MEMBER_ONLY = ("algorithm", "algorithm_options", "validation_score", "calibrated_extras",
                "fitted_extras",
                "best_iteration", "best_validation_loss", "adaptation", "inner_lr",
                "inner_steps", "meta_inner_steps")
#: the ensemble's copy of its adapting member's: what ``fit`` adapts with, and the state
#: of meta-training kept (that member's history is the estimator's ``meta_history_``)
_ADAPTATION = ("adaptation", "inner_lr", "inner_steps", "meta_inner_steps",
               "best_iteration", "best_validation_loss")


def member_prefix(i: int) -> str:
    """The key prefix of member ``i``'s tensors in an ensemble's dicts."""
    return f"member{i}."


def member_entries(entries: dict, i: int) -> dict:
    """Member ``i``'s entries of an ensemble's dict of tensors, without their prefix."""
    prefix = member_prefix(i)
    return {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}


def _adapting(members: list) -> MetaInit:
    """The first member whose ``fit`` settings were chosen on validation tasks, else the
    first (see :attr:`MetaInit.adapting_member`)."""
    return next((m for m in members if "adaptation" in m.metadata), members[0])


def module_spec(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Describe how to rebuild ``module``: its import path and constructor arguments."""
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": _jsonable(kwargs)}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


#: Bounds on a saved module's constructor arguments: a header is a few bytes, so it must
#: not be able to ask for terabytes (checked before anything is built).
_MAX_INT_ARGUMENT = 1_000_000
_MAX_LIST_ARGUMENT = 1_000


def _check_arguments(path: str, kwargs: dict) -> None:
    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > _MAX_LIST_ARGUMENT or any(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT_ARGUMENT
            for v in values
        ):
            raise ValueError(
                f"the meta-initialization asks to build {path} with {key}={value!r}, beyond "
                "any network metafit saves; the file is damaged or was not written by "
                "metafit."
            )


def build_module(spec: dict[str, Any], tensors: dict | None = None) -> nn.Module:
    """Rebuild a built-in module (``metafit.*``) from :func:`module_spec`'s output.

    With ``tensors``, the architecture is first built on torch's ``meta`` device (no
    memory) and its parameter shapes compared with the stored tensors', so that a damaged
    or crafted header cannot make the loader allocate anything the file does not hold.

    Raises
    ------
    ValueError
        For a module outside metafit: the file cannot say how to build it safely, so the
        estimator must be given ``module=`` of the same architecture. For arguments out of
        bounds, or shapes that disagree with the stored tensors.
    """
    path = spec["class"]
    if not path.startswith(_BUILTIN_PREFIX):
        raise ValueError(
            f"this meta-initialization was learned with the custom module {path}; pass "
            "module=<that class or an instance> to the estimator together with meta_init=."
        )
    import importlib

    module_name, _, qualname = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"this meta-initialization names the module class {path}, which this version of "
            "metafit does not have; load it with the metafit version that wrote it."
        ) from exc
    # Only network classes may be built from a file: never call an arbitrary function.
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path} named by the meta-initialization is not an nn.Module class.")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"the module arguments in the meta-initialization are not a dict: {kwargs!r}"
        )
    _check_arguments(path, kwargs)
    try:
        if tensors is not None:
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
            stored = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("extra.")}
            if shapes != stored:
                wrong = sorted(set(shapes) ^ set(stored)) or sorted(
                    k for k in shapes if shapes[k] != stored[k]
                )
                raise ValueError(
                    f"the saved architecture of {path} ({kwargs}) does not match the stored "
                    f"tensors (first difference: {wrong[0]!r}); the file is damaged."
                )
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        if "does not match the stored" in str(exc):
            raise
        raise ValueError(f"cannot build {path} from the saved arguments {kwargs}: {exc}") from exc


_INT_KEYS = {"n_features": 1, "n_outputs": 1, "inner_steps": 0, "meta_inner_steps": 0,
             "iteration": 0, "meta_iterations": 0}


def _check_metadata(path: str, metadata) -> None:
    """Each metadata value of the types metafit writes; the error names file and key."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{path!r}: the metadata is not a mapping; the file is damaged.")
    for key, minimum in _INT_KEYS.items():
        value = metadata.get(key)
        if value is None and key not in _REQUIRED_METADATA:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"{path!r}: metadata {key!r} must be an int >= {minimum}, got {value!r}; the "
                "file is damaged."
            )
    rate = metadata.get("inner_lr")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
        raise ValueError(f"{path!r}: metadata 'inner_lr' must be a number, got {rate!r}.")
    for key, kind in (("algorithm", str), ("algorithm_options", dict), ("feature_shape", list)):
        value = metadata.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(
                f"{path!r}: metadata {key!r} must be a {kind.__name__}, got {value!r}."
            )
    chosen = metadata.get("adaptation")
    if chosen is not None:
        ok = isinstance(chosen, dict) and all(
            isinstance(chosen.get(k), kind) and not isinstance(chosen.get(k), bool)
            and chosen[k] >= low
            for k, kind, low in (("inner_lr", (int, float), 0), ("inner_steps", int, 0))
        )
        if not ok:
            raise ValueError(
                f"{path!r}: metadata 'adaptation' must hold the chosen inner_lr (a number) "
                f"and inner_steps (an int >= 0), got {chosen!r}; the file is damaged."
            )
    if "standardization" in metadata or "encoding" in metadata:
        from metafit.grouped import CategoricalEncoding, Standardization

        try:
            if "standardization" in metadata:
                Standardization.from_metadata(metadata["standardization"],
                                              metadata["n_features"])
            if "encoding" in metadata:
                CategoricalEncoding.from_metadata(metadata["encoding"], metadata["n_features"])
        except ValueError as exc:
            raise ValueError(f"{path!r}: metadata {exc}; the file is damaged.") from None


def _check_tensors(path: str, tensors: dict) -> None:
    """Floating-point, finite weights only: anything else is not a meta-learned state."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"{path!r}: tensor {name!r} is {tensor.dtype}, not floating point; metafit "
                "saves float weights only (the file is damaged or not metafit's)."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{path!r}: tensor {name!r} holds NaN or infinite values: this "
                "initialization is unusable (meta-training diverged before it was saved, or "
                "the file is damaged); meta-train again."
            )


def _check_members(path: str, init: MetaInit) -> None:
    """An ensemble's lists agree with each other and with its tensors; each member's
    metadata is checked as a file's would be."""
    listed, specs = init.metadata.get("members"), init.spec.get("members")
    weights = init.metadata.get("weights")
    ok = (isinstance(listed, list) and isinstance(specs, list) and isinstance(weights, list)
          and len(listed) == len(specs) == len(weights) >= 2
          and all(isinstance(s, dict) and "class" in s for s in specs)
          and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                  for w in weights))
    if not ok or init.spec.get("class") != ENSEMBLE_CLASS:
        raise ValueError(f"{path!r}: the ensemble's members, specs and weights do not agree; "
                         "the file is damaged.")
    for i, meta in enumerate(listed):
        _check_metadata(f"{path} (member {i})", meta)
    prefixes = [member_prefix(i) for i in range(len(listed))]
    stray = [k for k in init.tensors if not any(k.startswith(p) for p in prefixes)]
    empty = [i for i, p in enumerate(prefixes) if not any(k.startswith(p) for k in init.tensors)]
    if stray or empty:
        raise ValueError(f"{path!r}: the ensemble's tensors do not belong to its members "
                         f"({stray[:3] or f'member {empty[0]} has none'}); the file is damaged.")


def is_meta_init_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file metafit wrote (a safetensors file with metafit's header);
    reads the header only."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "metafit.meta_init"
    except Exception:  # not safetensors at all, unreadable, ...
        return False


@dataclass
class MetaInit:
    """A meta-learned initialization.

    Parameters
    ----------
    tensors : dict of str to Tensor
        The module's state dict, plus the algorithm's extra tensors under ``extra.``.
    spec : dict
        ``{"class": import path, "kwargs": constructor arguments}`` of the module.
    metadata : dict
        Everything else worth knowing: estimator kind, algorithm and its options
        (``algorithm_options``), inner_lr, inner_steps, meta_inner_steps, n_features,
        n_outputs, loss, versions.
    """

    tensors: dict[str, torch.Tensor]
    spec: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self):
        # Estimators cache the networks built from this initialization on it (see
        # MetaInitializedEstimator._build_learner); they hold closures and are rebuilt.
        state = self.__dict__.copy()
        state.pop("_learners", None)
        return state

    @classmethod
    def ensemble(cls, members: list[MetaInit], weights: list[float] | None = None
                 ) -> MetaInit:
        """One initialization holding several, whose predictions ``predict`` combines with
        ``weights`` (equal when None; :mod:`metafit.ensemble`): the members' tensors under
        ``member<i>.``, their specs and metadata in lists; the rest of the metadata
        (features, outputs, the table's standardization) is the first member's, and the
        rate and steps ``fit`` adapts with are those of the first member that chose them on
        validation tasks."""
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two initializations.")
        weights = [1.0 / len(members)] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or abs(sum(weights) - 1.0) > 1e-9 or min(weights) < 0:
            raise ValueError(f"ensemble weights must be one per member, >= 0, summing to 1; "
                             f"got {weights}.")
        first = members[0].metadata
        for m in members[1:]:
            for key in ("n_features", "n_outputs", "estimator", "standardization", "encoding"):
                if m.metadata.get(key) != first.get(key):
                    raise ValueError(f"ensemble members disagree on {key!r}: "
                                     f"{first.get(key)!r} and {m.metadata.get(key)!r}.")
        adapting = _adapting(members)
        metadata = {k: v for k, v in first.items() if k not in _MEMBER_ONLY}
        metadata.update({k: adapting.metadata[k] for k in _ADAPTATION
                         if k in adapting.metadata})
        metadata.update(
            algorithm="+".join(m.metadata.get("algorithm", "maml") for m in members),
            members=[dict(m.metadata) for m in members],
            weights=[float(w) for w in weights],
        )
        tensors = {member_prefix(i) + k: v for i, m in enumerate(members)
                   for k, v in m.tensors.items()}
        spec = {"class": ENSEMBLE_CLASS, "members": [m.spec for m in members]}
        made = cls(tensors, spec, metadata)
        made.__dict__["_members"] = list(members)  # the same objects: a warm start's records
        return made

    @property
    def members(self) -> list[MetaInit] | None:
        """An ensemble's member initializations (views of its tensors), else None."""
        listed = self.metadata.get("members")
        if listed is None:
            return None
        cached = self.__dict__.get("_members")
        if cached is None:
            cached = []
            for i, (spec, meta) in enumerate(zip(self.spec["members"], listed)):
                cached.append(MetaInit(member_entries(self.tensors, i), spec, meta))
            self.__dict__["_members"] = cached
        return cached

    @property
    def network_spec(self) -> dict[str, Any]:
        """The spec of the network ``fit`` builds first: an ensemble's first member's,
        else this one's."""
        return self.spec if self.members is None else self.members[0].spec

    @property
    def adapting_member(self) -> MetaInit:
        """The initialization ``fit``'s rate and steps apply to: an ensemble's first member
        that chose them on validation tasks (else its first), else this one."""
        return self if self.members is None else _adapting(self.members)

    @property
    def n_features(self) -> int:
        """Number of input features the initialization was learned on."""
        return int(self.metadata["n_features"])

    @property
    def n_outputs(self) -> int:
        """Number of outputs of the network (classes for a classifier)."""
        return int(self.metadata["n_outputs"])

    @property
    def algorithm_options(self) -> dict[str, Any]:
        """The meta-trained algorithm's options (empty for its defaults, and in files of
        format version 1, which did not record them)."""
        return dict(self.metadata.get("algorithm_options") or {})

    @property
    def trained_inner_steps(self) -> int | None:
        """Inner steps of meta-training (what per-step learned rates were made for)."""
        steps = self.metadata.get("meta_inner_steps", self.metadata.get("inner_steps"))
        return None if steps is None else int(steps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact atomically and durably, and return the path.

        The bytes go to a temporary file in the same folder, are flushed to disk
        (``fsync``), then renamed over ``path``: a killed process or a power loss leaves
        either the old file or the new one, never a partial or empty one, and an
        interrupted save removes its temporary file.

        Raises
        ------
        OSError
            When the file cannot be written (a folder in the way, no permission, a full
            disk); the message names ``path`` and the cause, not the temporary file.
        """
        from safetensors.torch import save_file

        path = Path(path)
        header = {
            "format": "metafit.meta_init",
            "format_version": str(FORMAT_VERSION),
            "spec": json.dumps(self.spec),
            "metadata": json.dumps(_jsonable(self.metadata)),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=header)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot write the meta-initialization to {str(path)!r}: "
                f"{exc.strerror or exc}"
            ) from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MetaInit:
        """Read an artifact written by :meth:`save`; runs no code from the file.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a metafit meta-initialization.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no meta-initialization file at {str(path)!r}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
        if header.get("format") != "metafit.meta_init":
            raise ValueError(
                f"{str(path)!r} is a safetensors file but not a metafit meta-initialization "
                "(write one with save_meta_init)."
            )
        try:
            version = int(header.get("format_version", "0"))
            spec = json.loads(header["spec"])
            metadata = json.loads(header["metadata"])
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{str(path)!r} has a damaged metafit header ({type(exc).__name__}: {exc}); "
                "write it again with save_meta_init."
            ) from exc
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} uses format version {version}; this metafit reads up to "
                f"{FORMAT_VERSION}. Upgrade metafit."
            )
        missing = [k for k in _REQUIRED_METADATA if k not in metadata]
        if not isinstance(spec, dict) or "class" not in spec or missing:
            raise ValueError(
                f"{str(path)!r} has an incomplete metafit header (missing "
                f"{missing or ['spec.class']}); write it again with save_meta_init."
            )
        _check_metadata(str(path), metadata)
        _check_tensors(str(path), tensors)
        init = cls(tensors, spec, metadata)
        if "members" in metadata:
            _check_members(str(path), init)
        return init

    def estimator_params(self) -> dict[str, Any]:
        """Estimator parameters that match this initialization.

        The architecture of a built-in network (``hidden_sizes``, ``activation``) and
        the meta-training ``algorithm``, and the ``inner_lr`` and ``inner_steps`` that
        ``meta_fit`` chose for ``fit`` (else meta-training's); pass them to the estimator
        together with ``meta_init=`` to adapt as the meta-fitted estimator did::

            init = MetaInit.load(path)
            est = MetaInitializedRegressor(meta_init=path, **init.estimator_params())
        """
        params: dict[str, Any] = {}
        spec = self.network_spec
        if spec.get("class") == "metafit.models.MLP":
            kwargs = spec.get("kwargs", {})
            params["hidden_sizes"] = tuple(kwargs.get("hidden_sizes", ()))
            params["activation"] = kwargs.get("activation", "relu")
        chosen = self.metadata.get("adaptation") or {}
        for key in ("algorithm", "inner_lr", "inner_steps"):
            if key in chosen:  # what meta_fit chose for fit on the validation tasks
                params[key] = chosen[key]
            elif key in self.metadata:
                params[key] = self.metadata[key]
        if self.algorithm_options and "algorithm" in params:
            from metafit.algorithms import get_algorithm

            params["algorithm"] = get_algorithm(params["algorithm"], self.algorithm_options)
        if self.members:  # what meta-trains and keeps such an ensemble
            params["algorithm"] = "auto"
        return params
