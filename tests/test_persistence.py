"""Tests of persistence: pickle/joblib round trips and the safetensors meta-init file."""

from __future__ import annotations

import json
import os
import pickle
import re

import joblib
import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.exceptions import NotFittedError

import metafit
from metafit import (
    MetaInit,
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    SinusoidTasks,
)


@pytest.fixture(scope="module")
def task():
    return SinusoidTasks(random_state=7).sample(1)[0]


def roundtrips(est, tmp_path):
    yield pickle.loads(pickle.dumps(est))
    joblib.dump(est, tmp_path / "est.joblib")
    yield joblib.load(tmp_path / "est.joblib")


# ---------------------------------------------------------------------------- pickle, joblib


def test_pickle_and_joblib_of_a_meta_fitted_estimator(sine_reg, task, tmp_path):
    expected = pickle.loads(pickle.dumps(sine_reg)).fit(task.X_support, task.y_support)
    expected = expected.predict(task.X_query)
    for loaded in roundtrips(sine_reg, tmp_path):
        assert not hasattr(loaded, "adapted_params_")
        torch.testing.assert_close(loaded.meta_init_.tensors, sine_reg.meta_init_.tensors)
        assert loaded.meta_history_ == sine_reg.meta_history_
        pred = loaded.fit(task.X_support, task.y_support).predict(task.X_query)
        np.testing.assert_array_equal(pred, expected)


def test_pickle_and_joblib_of_fitted_estimators(sine_reg, blob_clf, blobs, task, tmp_path):
    fitted = pickle.loads(pickle.dumps(sine_reg)).fit(task.X_support, task.y_support)
    X, y = blobs
    mask = np.isin(y, [1, 4])
    fitted_clf = pickle.loads(pickle.dumps(blob_clf)).fit(X[mask], np.where(y[mask] == 1, "a", "b"))
    scratch = MetaInitializedRegressor(hidden_sizes=(8,), random_state=1).fit(
        task.X_support, task.y_support
    )
    for est, Xq in [(fitted, task.X_query), (fitted_clf, X), (scratch, task.X_query)]:
        for loaded in roundtrips(est, tmp_path):
            np.testing.assert_array_equal(loaded.predict(Xq), est.predict(Xq))
    for loaded in roundtrips(fitted_clf, tmp_path):
        np.testing.assert_array_equal(loaded.predict_proba(X), fitted_clf.predict_proba(X))
        np.testing.assert_array_equal(loaded.classes_, ["a", "b"])


def test_pickled_estimator_predicts_without_its_meta_init_file(sine_reg, task, tmp_path):
    path = tmp_path / "init.safetensors"
    sine_reg.save_meta_init(path)
    est = MetaInitializedRegressor(meta_init=path, **MetaInit.load(path).estimator_params())
    est.fit(task.X_support, task.y_support)
    blob = pickle.dumps(est)
    path.unlink()
    loaded = pickle.loads(blob)
    np.testing.assert_array_equal(loaded.predict(task.X_query), est.predict(task.X_query))
    loaded.fit(task.X_support, task.y_support)  # the loaded copy of the file is kept


# ---------------------------------------------------------------------------- the file


def test_save_and_load_meta_init_gives_identical_predictions(sine_reg, task, tmp_path):
    path = tmp_path / "sub" / "sine.safetensors"
    sine_reg.save_meta_init(path)
    expected = pickle.loads(pickle.dumps(sine_reg)).fit(task.X_support, task.y_support)
    expected = expected.predict(task.X_query)
    for meta_init in (path, str(path), MetaInit.load(path)):
        est = MetaInitializedRegressor(
            meta_init=meta_init, hidden_sizes=(16, 16), inner_lr=0.02, inner_steps=3
        )
        pred = est.fit(task.X_support, task.y_support).predict(task.X_query)
        np.testing.assert_array_equal(pred, expected)
    assert os.listdir(path.parent) == ["sine.safetensors"]  # no temporary file left


def test_meta_init_file_carries_its_metadata(sine_reg, tmp_path):
    path = tmp_path / "init.safetensors"
    sine_reg.save_meta_init(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        names = set(f.keys())
    assert header["format"] == "metafit.meta_init"
    assert names == set(sine_reg.meta_init_.tensors)
    spec, meta = json.loads(header["spec"]), json.loads(header["metadata"])
    assert spec == {
        "class": "metafit.models.MLP",
        "kwargs": {"n_inputs": 1, "n_outputs": 1, "hidden_sizes": [16, 16], "activation": "relu"},
    }
    assert meta["algorithm"] == "maml" and meta["estimator"] == "regressor"
    assert (meta["n_features"], meta["n_outputs"]) == (1, 1)
    assert (meta["inner_lr"], meta["inner_steps"]) == (0.02, 3)
    assert meta["versions"]["metafit"] == metafit.__version__
    assert meta["versions"]["torch"] == torch.__version__
    assert {"sklearn"} <= meta["versions"].keys()
    assert MetaInit.load(path).estimator_params() == {
        "hidden_sizes": (16, 16),
        "activation": "relu",
        "algorithm": "maml",
        "inner_lr": 0.02,
        "inner_steps": 3,
    }


def test_loading_runs_no_code(tmp_path):
    """A pickle-based file (what torch.save writes) is refused without being unpickled."""
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    path = tmp_path / "evil.safetensors"
    with open(path, "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MetaInitializedRegressor(meta_init=path).fit(np.zeros((3, 1)), np.zeros(3))
    assert not flag.exists()


def write_header(path, spec, metadata, tensors=None):
    header = {
        "format": "metafit.meta_init",
        "format_version": "1",
        "spec": json.dumps(spec),
        "metadata": json.dumps(metadata),
    }
    safetensors.torch.save_file(tensors or {"w": torch.zeros(1)}, str(path), metadata=header)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("garbage", "not a readable safetensors file"),
        ("truncated", "not a readable safetensors file"),
        ("foreign", "not a metafit meta-initialization"),
        ("bad_json", "damaged metafit header"),
        ("missing_keys", "incomplete metafit header"),
        ("function", "not an nn.Module class"),
        ("unknown_class", "does not have"),
        ("future", "format version 99"),
    ],
)
def test_corrupt_or_foreign_files_get_clear_errors(sine_reg, tmp_path, kind, match):
    path = tmp_path / "f.safetensors"
    good = tmp_path / "good.safetensors"
    sine_reg.save_meta_init(good)
    meta = {"n_features": 1, "n_outputs": 1}
    if kind == "garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "foreign":
        safetensors.torch.save_file({"weight": torch.ones(2)}, str(path))
    elif kind == "bad_json":
        safetensors.torch.save_file(
            {"w": torch.ones(1)},
            str(path),
            metadata={"format": "metafit.meta_init", "spec": "{not json", "metadata": "{}"},
        )
    elif kind == "missing_keys":
        write_header(path, {"class": "metafit.models.MLP", "kwargs": {}}, {"n_features": 1})
    elif kind == "function":
        write_header(path, {"class": "metafit.tasks.as_task", "kwargs": {}}, meta)
    elif kind == "unknown_class":
        write_header(path, {"class": "metafit.models.NoSuchNet", "kwargs": {}}, meta)
    elif kind == "future":
        safetensors.torch.save_file(
            {"w": torch.ones(1)},
            str(path),
            metadata={
                "format": "metafit.meta_init",
                "format_version": "99",
                "spec": "{}",
                "metadata": "{}",
            },
        )
    est = MetaInitializedRegressor(meta_init=path)
    with pytest.raises(ValueError, match=match):
        est.fit(np.zeros((3, 1), dtype=np.float32), np.zeros(3, dtype=np.float32))
    assert not hasattr(est, "n_features_in_")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no meta-initialization file"):
        MetaInitializedRegressor(meta_init="/nonexistent/x.safetensors").fit(
            np.zeros((3, 1)), np.zeros(3)
        )


def test_mismatched_architecture_features_and_kind(sine_reg, blob_clf, tmp_path):
    path = tmp_path / "init.safetensors"
    sine_reg.save_meta_init(path)
    X, y = np.zeros((4, 1), dtype=np.float32), np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"architecture mismatch.*hidden_sizes=\(16, 16\)"):
        MetaInitializedRegressor(meta_init=path).fit(X, y)  # default (40, 40)
    with pytest.raises(ValueError, match="architecture mismatch"):
        MetaInitializedRegressor(meta_init=path, hidden_sizes=(16, 16), activation="tanh").fit(X, y)

    class Other(torch.nn.Module):
        def __init__(self, n_inputs, n_outputs):
            super().__init__()
            self.lin = torch.nn.Linear(n_inputs, n_outputs)

        def forward(self, X):
            return self.lin(X)

    with pytest.raises(ValueError, match="does not fit this estimator's module"):
        MetaInitializedRegressor(module=Other, meta_init=path).fit(X, y)
    with pytest.raises(ValueError, match=r"X has 2 feature\(s\).*expects 1"):
        MetaInitializedRegressor(meta_init=path, hidden_sizes=(16, 16)).fit(np.zeros((4, 2)), y)
    with pytest.raises(ValueError, match="learned by a regressor"):
        MetaInitializedClassifier(meta_init=path, hidden_sizes=(16, 16)).fit(
            X, np.array([0, 1, 0, 1])
        )


def test_classifier_meta_init_round_trip(blob_clf, blobs, tmp_path):
    X, y = blobs
    mask = np.isin(y, [0, 3, 5])
    path = tmp_path / "clf.safetensors"
    blob_clf.save_meta_init(path)
    init = MetaInit.load(path)
    assert init.n_outputs == 3 and init.metadata["loss"] == "cross_entropy"
    a = MetaInitializedClassifier(meta_init=path, **init.estimator_params()).fit(X[mask], y[mask])
    b = pickle.loads(pickle.dumps(blob_clf)).fit(X[mask], y[mask])
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_save_is_atomic(sine_reg, tmp_path, break_safetensors_save):
    path = tmp_path / "init.safetensors"
    sine_reg.save_meta_init(path)
    before = path.read_bytes()
    break_safetensors_save()
    with pytest.raises(OSError, match="disk full"):
        sine_reg.save_meta_init(path)
    assert path.read_bytes() == before  # the old file is intact
    with pytest.raises(OSError, match="disk full"):
        sine_reg.save_meta_init(tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["init.safetensors"]  # nothing half-written


def test_save_before_meta_fit():
    with pytest.raises(NotFittedError, match="call meta_fit first"):
        MetaInitializedRegressor().save_meta_init("x.safetensors")


# ------------------------------------------------------------ issue 13: crafted files


def _craft(tmp_path, *, spec=None, metadata=None, tensors=None, name="c.safetensors"):
    import json

    from safetensors.torch import save_file

    from metafit.models import MLP

    net = MLP(1, 1, (4,))
    spec = spec or {"class": "metafit.models.MLP",
                    "kwargs": {"n_inputs": 1, "n_outputs": 1, "hidden_sizes": [4],
                               "activation": "relu"}}
    meta = {"estimator": "regressor", "algorithm": "maml", "n_features": 1, "n_outputs": 1,
            "inner_lr": 0.01, "inner_steps": 5, **(metadata or {})}
    tensors = tensors if tensors is not None else {
        k: v.detach().clone() for k, v in net.state_dict().items()}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={
        "format": "metafit.meta_init", "format_version": "2", "spec": json.dumps(spec),
        "metadata": json.dumps(meta)})
    return path


def test_a_tiny_header_cannot_ask_for_a_huge_network(tmp_path):
    from metafit.persistence import build_module

    path = _craft(tmp_path, spec={"class": "metafit.models.MLP", "kwargs": {
        "n_inputs": 1, "n_outputs": 1, "hidden_sizes": [3_000_000] * 2, "activation": "relu"}})
    assert path.stat().st_size < 10_000
    init = MetaInit.load(path)
    with pytest.raises(ValueError, match="beyond any network metafit saves"):
        build_module(init.spec, init.tensors)
    # within bounds but not what the tensors hold: refused before anything is allocated
    path = _craft(tmp_path, name="d.safetensors", spec={"class": "metafit.models.MLP",
                  "kwargs": {"n_inputs": 1, "n_outputs": 1, "hidden_sizes": [20_000, 20_000],
                             "activation": "relu"}})
    init = MetaInit.load(path)
    with pytest.raises(ValueError, match="does not match the stored tensors"):
        build_module(init.spec, init.tensors)
    # and through an estimator with the same architecture
    from metafit import MetaInitializedRegressor

    est = MetaInitializedRegressor(meta_init=path, hidden_sizes=(20_000, 20_000))
    with pytest.raises(ValueError, match="does not match the stored tensors"):
        est.fit(np.zeros((3, 1), np.float32), np.zeros(3, np.float32))


@pytest.mark.parametrize("key, value", [
    ("n_features", "x"), ("n_outputs", 0), ("inner_steps", 2.5), ("inner_lr", "fast"),
    ("algorithm", ["maml"]), ("algorithm_options", [1]),
])
def test_malformed_metadata_names_the_file_and_the_key(tmp_path, key, value):
    path = _craft(tmp_path, metadata={key: value})
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*" + key):
        MetaInit.load(path)


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64"])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, dtype):
    import torch

    from metafit.models import MLP

    tensors = {k: v.detach().clone() for k, v in MLP(1, 1, (4,)).state_dict().items()}
    tensors["layers.0.bias"] = torch.zeros(4, dtype=getattr(torch, dtype))
    path = _craft(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=f"layers.0.bias.*{dtype}"):
        MetaInit.load(path)


def test_nan_weights_say_so_instead_of_blaming_inner_lr(tmp_path):
    import torch

    from metafit.models import MLP

    tensors = {k: v.detach().clone() for k, v in MLP(1, 1, (4,)).state_dict().items()}
    tensors["layers.1.weight"][0, 0] = float("nan")
    path = _craft(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match="NaN or infinite values.*unusable"):
        MetaInit.load(path)
    assert torch.isfinite(torch.zeros(1)).all()
