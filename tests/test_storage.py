"""metafit.tuning.storage: many workers on one SQLite file, and read-only commands that
never write to a database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from metafit.cli import main
from metafit.tuning import make_storage

CONFIG = """
tasks:
  source: sinusoid
  k_shot: 5
  k_query: 5
  validation_tasks: 4
  test_tasks: 4
estimator:
  params:
    hidden_sizes: [8]
    meta_batch_size: 2
    meta_iterations: 3
    random_state: 0
    verbose: 0
tune:
  study_name: shared
  sampler: {name: random}
search_space:
  inner_lr: {low: 0.001, high: 0.01, log: true}
  inner_steps: {low: 1, high: 3}
"""


@pytest.mark.parametrize("round_", range(3))
def test_four_workers_start_together_on_a_fresh_sqlite_file(tmp_path, round_):
    """Four `metafit tune` processes on a new metafit.db: every one of the 20 trials is
    recorded (the schema race and lock waits are retried, not fatal)."""
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    url = f"sqlite:///{tmp_path / 'metafit.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metafit", "tune", str(config), "--storage", url,
             "--n-trials", "5", "--seed", str(seed), "-q"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for seed in range(4)
    ]
    outcomes = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0, 0], [err.decode()[-800:] for _, err in outcomes]
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 20
    assert len({t.number for t in study.trials}) == 20


def test_tune_from_several_python_processes_on_one_file(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from metafit import MetaInitializedRegressor, SinusoidTasks, tune
        est = MetaInitializedRegressor(hidden_sizes=(8,), meta_iterations=3,
                                       meta_batch_size=2, random_state=0, verbose=0)
        est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
        tune(est, validation_tasks=SinusoidTasks(random_state=1).sample(3), n_trials=4,
             storage="sqlite:///{tmp_path / 'py.db'}", study_name="py",
             evaluate_defaults=False)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
             for _ in range(3)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.decode()[-800:] for e in errors]
    study = optuna.load_study(study_name="py", storage=f"sqlite:///{tmp_path / 'py.db'}")
    assert len(study.trials) == 12


def _tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as con:
        return sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master"))


@pytest.mark.parametrize("command", [["best"], ["studies"], ["report", "-o", "out"]])
def test_read_only_commands_never_write_to_someone_elses_database(tmp_path, monkeypatch,
                                                                   capsys, command):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE accounts (id INTEGER)")
    before = _tables(other)
    code = main([*command, "--storage", f"sqlite:///{other}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no Optuna study" in err
    assert _tables(other) == before


def test_read_only_storage_refuses_a_database_without_optuna_tables(tmp_path):
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(ValueError, match="holds no Optuna study"):
        make_storage(f"sqlite:///{other}", read_only=True)
    assert _tables(other) == []
    make_storage(f"sqlite:///{other}")  # a writer creates the schema
    assert "studies" in _tables(other)
    assert make_storage(f"sqlite:///{other}", read_only=True) is not None
