"""Tests of the whole-or-nothing file writes (``metafit._atomic``) and their users."""

from __future__ import annotations

import numpy as np
import pytest

from metafit import MetaInit, MetaInitializedRegressor, SinusoidTasks
from metafit._atomic import atomic_path


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_a_finished_write_replaces_the_file_and_keeps_the_extension(tmp_path):
    target = tmp_path / "sub" / "a.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png"
        assert tmp.name.startswith(".a.png.")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _leftovers(target.parent) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, RuntimeError])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * 100_000)  # a full-size partial file
            raise error()
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_an_interrupted_meta_init_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    est = MetaInitializedRegressor(meta_iterations=2, meta_batch_size=2, random_state=0)
    est.meta_fit(SinusoidTasks(k_shot=4, random_state=0))
    path = tmp_path / "init.safetensors"
    est.save_meta_init(path)
    before = path.read_bytes()
    import safetensors.torch

    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the whole file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    est.meta_init_.metadata["note"] = "changed"
    with pytest.raises(KeyboardInterrupt):
        est.save_meta_init(path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    loaded = MetaInit.load(path)
    assert all(np.isfinite(t.numpy()).all() for t in loaded.tensors.values())


def test_an_interrupted_report_leaves_no_half_drawn_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import optuna
    from matplotlib.figure import Figure

    from metafit.plotting import write_report

    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=4)
    real = Figure.savefig

    def interrupted(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        write_report(study, out)
    assert _leftovers(out) == [] and not list(out.glob("*.png"))
