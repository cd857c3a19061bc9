"""The meta-learned initialization as an artifact: tensors plus what rebuilds the module.

A :class:`MetaInit` is what ``meta_fit`` produces, what ``clone`` carries to the copies of
an estimator, what ``save_meta_init`` writes and what ``meta_init=`` reads. Files use the
safetensors format: loading one reads numbers and a JSON header and never runs code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MetaInit", "FORMAT_VERSION", "module_spec", "build_module"]

FORMAT_VERSION = 1
_BUILTIN_PREFIX = "metafit."


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


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a built-in module (``metafit.*``) from :func:`module_spec`'s output.

    Raises
    ------
    ValueError
        For a module outside metafit: the file cannot say how to build it safely, so the
        estimator must be given ``module=`` of the same architecture.
    """
    path = spec["class"]
    if not path.startswith(_BUILTIN_PREFIX):
        raise ValueError(
            f"this meta-initialization was learned with the custom module {path}; pass "
            "module=<that class or an instance> to the estimator together with meta_init=."
        )
    import importlib

    module_name, _, qualname = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), qualname)
    return cls(**spec["kwargs"])


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
        Everything else worth knowing: estimator kind, algorithm, inner_lr, inner_steps,
        n_features, n_outputs, loss, versions.
    """

    tensors: dict[str, torch.Tensor]
    spec: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Number of input features the initialization was learned on."""
        return int(self.metadata["n_features"])

    @property
    def n_outputs(self) -> int:
        """Number of outputs of the network (classes for a classifier)."""
        return int(self.metadata["n_outputs"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact atomically (temporary file, then rename) and return the path."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {
            "format": "metafit.meta_init",
            "format_version": str(FORMAT_VERSION),
            "spec": json.dumps(self.spec),
            "metadata": json.dumps(_jsonable(self.metadata)),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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
        version = int(header.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} uses format version {version}; this metafit reads up to "
                f"{FORMAT_VERSION}. Upgrade metafit."
            )
        return cls(tensors, json.loads(header["spec"]), json.loads(header["metadata"]))
