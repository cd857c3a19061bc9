"""Tests of the ``metafit`` command line: commands, storages, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metafit import MetaInit
from metafit.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = """
tasks:
  source: sinusoid
  k_shot: 5
  k_query: 5
  validation_tasks: 5
  test_tasks: 5
estimator:
  params:
    hidden_sizes: [8]
    meta_batch_size: 4
    meta_iterations: 5
    random_state: 0
    verbose: 0
tune:
  study_name: tiny
  n_trials: 3
  sampler: {name: random, seed: 0}
search_space:
  inner_lr: {low: 0.001, high: 0.01, log: true}
  inner_steps: {low: 1, high: 4}
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METAFIT_STORAGE", raising=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv, code=2):
    got, out, err = _run(capsys, *argv)
    assert got == code, (out, err)
    lines = [x for x in err.splitlines() if x.startswith("metafit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_tune_default_storage_prints_best_and_improvement_then_resumes(tiny, capsys):
    code, out, _ = _run(capsys, "tune", tiny)
    assert code == 0
    assert (tiny.parent / "metafit.db").is_file()  # sqlite:///metafit.db in the cwd
    assert "best parameters: inner_lr=" in out
    assert re.search(r"defaults \(inner_lr=[0-9.e-]+, inner_steps=\d+\): query MSE", out), out
    assert "% lower" in out or "% higher" in out
    # Same study name again: the study is resumed, not restarted.
    code, out, _ = _run(capsys, "tune", tiny, "--n-trials", 2)
    assert code == 0 and "study 'tiny': 5 complete" in out
    code, out, _ = _run(capsys, "best", "--json")
    best = json.loads(out)
    assert best["study_name"] == "tiny" and best["n_trials"] == 5
    assert set(best["best_params"]) == {"inner_lr", "inner_steps"}
    assert best["default_params"] == {"inner_lr": 0.01, "inner_steps": 5}
    assert "no study 'nope' in sqlite:///metafit.db (studies: tiny)" in _error(
        capsys, "best", "--study-name", "nope"
    )


def test_storage_from_environment_and_flags(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("METAFIT_STORAGE", f"journal:{tmp_path / 'env.log'}")
    assert _run(capsys, "tune", tiny, "--n-trials", 1, "--study-name", "e")[0] == 0
    assert (tmp_path / "env.log").stat().st_size > 0
    assert not (tmp_path / "metafit.db").exists()
    code, out, _ = _run(capsys, "best", "--study-name", "e")
    assert code == 0 and "best trial #0" in out
    assert _run(capsys, "tune", tiny, "--n-trials", 1, "--study-name", "f")[0] == 0
    assert "--study-name is required" in _error(capsys, "report", "-o", tmp_path / "r")
    flag = f"sqlite:///{tmp_path / 'flag.db'}"
    assert _run(capsys, "tune", tiny, "--n-trials", 1, "--storage", flag)[0] == 0
    assert (tmp_path / "flag.db").is_file()


def test_meta_fit_then_evaluate_then_tune_from_init(tiny, capsys, tmp_path):
    init = tmp_path / "init.safetensors"
    code, out, _ = _run(capsys, "meta-fit", tiny, "-o", init)
    assert code == 0 and init.is_file() and "validation query MSE" in out
    code, out, _ = _run(capsys, "tune", tiny, "--init", init, "--n-trials", 2)
    assert code == 0 and "meta-training" not in out
    code, out, _ = _run(capsys, "evaluate", tiny, "--init", init, "--study-name", "tiny",
                        "--param", "inner_steps=2")
    assert code == 0
    assert "test query MSE over 5 tasks" in out and "with inner_lr=" in out


def test_report_writes_figures(tiny, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert _run(capsys, "tune", tiny)[0] == 0
    code, out, _ = _run(capsys, "report", "-o", tmp_path / "rep")
    assert code == 0
    html = importlib.util.find_spec("plotly") is not None  # the plot extra: HTML as well
    for name in ("optimization_history", "param_importances", "slice"):
        assert (tmp_path / "rep" / f"{name}.png").stat().st_size > 1000, out
        assert (tmp_path / "rep" / f"{name}.html").is_file() == html


def test_meta_mode_from_the_command_line(tiny, capsys):
    code, out, _ = _run(capsys, "tune", tiny, "--mode", "meta", "--study-name", "m",
                        "--n-trials", 2)
    assert code == 0 and "meta mode" in out and "best parameters" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["tune", "{cfg}", "--storage", "foo://x"], "unsupported database 'foo'"),
        (["tune", "{cfg}", "--storage", "sqlite:///no/such/dir/x.db"], "does not exist"),
        (["tune", "{cfg}", "--storage", "postgresql://u:pw@127.0.0.1:1/db"],
         "cannot open storage postgresql\\+psycopg://u:\\*\\*\\*@"),
        (["tune", "missing.yaml"], "config file not found"),
        (["tune", "{cfg}", "--init", "nothere.safetensors"], "--init: file not found"),
        (["evaluate", "{cfg}", "--init", "nothere.safetensors"], "--init: file not found"),
        (["meta-fit", "{cfg}", "-o", "no/such/dir/x.safetensors"], "directory"),
        (["best", "--study-name", "nope"], "metafit.db does not exist"),
        (["report", "-o", "r", "--storage", "journal:x.log"], "x.log does not exist"),
    ],
)
def test_bad_arguments_one_line(tiny, capsys, argv, match):
    line = _error(capsys, *[a.format(cfg=tiny) for a in argv])
    assert __import__("re").search(match, line), line


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("  k_shot: 5\n", "  k_shot: 5\n  shots: 3\n", "unknown key 'shots'"),
        ("    hidden_sizes: [8]\n", "    hidden_sizes: [8]\n    speed: 3\n",
         "unknown parameter 'speed'"),
        ("    meta_iterations: 5\n", "    meta_iterations: five\n",
         "meta_iterations must be an int"),
        ("  n_trials: 3\n", "  n_trials: 3\n  storage: ftp://x\n", "unsupported database"),
        ("high: 0.01", "high: 0.0001", "greater than"),
    ],
)
def test_bad_configs_one_line(tiny, capsys, old, new, match):
    assert old in TINY
    tiny.write_text(TINY.replace(old, new))
    line = _error(capsys, "tune", tiny)
    assert match in line, line


def test_missing_table_file_one_line(tiny, capsys):
    tiny.write_text("tasks: {source: table, path: gone.csv, group: g, target: y}\n")
    line = _error(capsys, "tune", tiny)
    assert "file not found" in line and "gone.csv" in line


def test_library_value_errors_are_one_line(tiny, capsys):
    tiny.write_text(TINY.replace("meta_batch_size: 4", "meta_batch_size: 4\n    device: gpu9"))
    line = _error(capsys, "tune", tiny, code=1)
    assert "device" in line


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["tune", "x.yaml", "--n-trials", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_python_dash_m_and_console_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "metafit", "best", "--storage", "nope://"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("metafit: error:") and "Traceback" not in done.stderr
    parser_help = __import__("metafit.cli", fromlist=["build_parser"]).build_parser()
    text = parser_help.format_help()
    for command in ("meta-fit", "tune", "evaluate", "report", "best"):
        assert command in text
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "metafit" not in scripts:
        pytest.skip("metafit is not pip-installed, so its console script is absent")
    assert scripts["metafit"] == "metafit.cli:main"
    assert shutil.which("metafit") is not None


# ------------------------------------------------------------------ issue 14's command line


def test_global_options_go_before_or_after_the_subcommand(tiny, capsys):
    import logging

    import optuna
    import torch

    before = torch.get_num_threads()
    for argv in (["--threads", "1", "-q", "tune", tiny], ["tune", tiny, "--threads", "1", "-q"]):
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        assert "best trial" in out
        # -q: no per-trial log lines (Optuna's handler may write to another capture, so
        # the level is what is checked)
        assert optuna.logging.get_verbosity() == logging.ERROR
        assert logging.getLogger("metafit").level == logging.ERROR
    torch.set_num_threads(before)
    code, out, err = _run(capsys, "tune", tiny, "--log-level", "info", "--n-trials", "1")
    assert code == 0 and optuna.logging.get_verbosity() == logging.INFO
    assert logging.getLogger("metafit").level == logging.INFO
    code, out, err = _run(capsys, "studies", "-vv")
    assert code == 0 and logging.getLogger("metafit").level == logging.DEBUG
    logging.getLogger("metafit").setLevel(logging.NOTSET)


def test_studies_lists_a_storage_without_writing_to_it(tiny, capsys):
    assert _run(capsys, "tune", tiny)[0] == 0
    code, out, err = _run(capsys, "studies")
    assert code == 0 and "tiny" in out and "minimize" in out
    row = next(line for line in out.splitlines() if line.startswith("tiny"))
    assert row.split()[2] == "3"  # complete
    _error(capsys, "studies", "--storage", "sqlite:///absent.db")
    assert not Path("absent.db").exists()


def test_evaluate_reports_a_spread_and_diverged_tasks_as_a_row(tiny, capsys):
    assert _run(capsys, "meta-fit", tiny, "-o", "init.safetensors")[0] == 0
    code, out, err = _run(capsys, "evaluate", tiny, "--init", "init.safetensors",
                          "--param", "inner_lr=50", "--param", "inner_steps=30")
    assert code == 0, err
    first, second = out.strip().splitlines()
    assert "± " in first and "standard error" in first
    assert "diverged on" in second


def test_every_option_has_help_text():
    from metafit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest in ("help",):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_sigterm_fails_the_running_trial_and_exits_with_a_message(tmp_path):
    """What SLURM, Kubernetes and systemd send: handled like Ctrl-C, through the real CLI."""
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    config = tmp_path / "c.yaml"
    config.write_text(TINY.replace("n_trials: 3", "n_trials: 100000"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metafit", "tune", str(config), "--storage", url],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for a few finished trials
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="tiny", storage=url)
                if len(study.get_trials(states=(TrialState.COMPLETE,))) >= 3:
                    break
            except KeyError:
                continue
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err
    assert "Traceback" not in err
    study = optuna.load_study(study_name="tiny", storage=url)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) >= 3


def test_tune_uses_the_configs_meta_init_and_refuses_a_missing_one(tiny, capsys):
    assert _run(capsys, "meta-fit", tiny, "-o", "init.safetensors")[0] == 0
    text = tiny.read_text().replace("    verbose: 0\n",
                                    "    verbose: 0\n    meta_init: init.safetensors\n")
    with_init = tiny.parent / "with_init.yaml"
    with_init.write_text(text)
    code, out, err = _run(capsys, "tune", with_init)
    assert code == 0, err
    assert "meta-training the initialization" not in out  # the file is adapted from
    missing = tiny.parent / "missing.yaml"
    missing.write_text(text.replace("init.safetensors", "nowhere.safetensors"))
    _error(capsys, "tune", missing)


def test_sqlite_url_options_are_not_silently_ignored(tiny, capsys):
    _error(capsys, "tune", tiny, "--storage", "sqlite:///s.db?mode=bogus")
    assert not Path("s.db").exists()


def test_sigterm_during_meta_fit_saves_the_state_and_exits_143(tmp_path):
    import signal
    import time

    from metafit import MetaInit

    config = tmp_path / "c.yaml"
    # A checkpoint every iteration tells when training runs, however busy the machine.
    started = tmp_path / "started.safetensors"
    config.write_text(TINY.replace(
        "meta_iterations: 5",
        f"meta_iterations: 1000000\n    checkpoint_path: {started}\n    checkpoint_interval: 1",
    ))
    out = tmp_path / "init.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metafit", "meta-fit", str(config), "-o", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not started.exists() and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err.decode()[-2000:]
    assert MetaInit.load(out).metadata["iteration"] > 0


def _heartbeat_rows(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0]


def test_tune_turns_heartbeats_on_for_database_storages_unless_told_not_to(tiny, capsys):
    """A killed worker's trial must not stay RUNNING forever by default: on a database
    storage every trial of ``metafit tune`` writes heartbeats unless ``--heartbeat 0``."""
    assert _run(capsys, "tune", tiny, "--n-trials", 2)[0] == 0
    assert _heartbeat_rows(tiny.parent / "metafit.db") == 2
    off = tiny.parent / "off.db"
    assert _run(capsys, "tune", tiny, "--n-trials", 2, "--heartbeat", 0,
                "--storage", f"sqlite:///{off}")[0] == 0
    assert _heartbeat_rows(off) == 0
    assert "--grace-period needs heartbeats" in _error(
        capsys, "tune", tiny, "--heartbeat", 0, "--grace-period", 5
    )
    config = tiny.read_text().replace("n_trials: 3", "n_trials: 1\n  heartbeat_interval: 0")
    (tiny.parent / "quiet.yaml").write_text(config)
    quiet = tiny.parent / "quiet.db"
    assert _run(capsys, "tune", tiny.parent / "quiet.yaml",
                "--storage", f"sqlite:///{quiet}")[0] == 0
    assert _heartbeat_rows(quiet) == 0


def test_an_unusable_search_space_is_refused_before_meta_training(tiny, capsys):
    """ALPACA's fit reads neither inner_lr nor inner_steps: in adaptation mode the default
    space is empty, which must be said before minutes of meta-training, not after."""
    config = TINY.replace("    random_state: 0\n", "    random_state: 0\n    algorithm: alpaca\n")
    config = config[: config.index("search_space:")]
    path = tiny.parent / "alpaca.yaml"
    path.write_text(config)
    code, out, err = _run(capsys, "tune", path)
    assert code == 2 and "nothing to tune in adaptation mode" in err
    assert "meta-training" not in out


def test_a_table_config_meta_fits_in_table_mode_and_evaluate_names_what_auto_chose(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    examples = Path(__file__).resolve().parents[1] / "examples"
    shutil.copy(examples / "tabular.csv", tmp_path / "tabular.csv")
    text = (examples / "tabular.yaml").read_text()
    text = text.replace("    inner_lr: 0.01\n", "").replace("    inner_steps: 5\n", "")
    text = text.replace("algorithm: maml", "algorithm: auto").replace(
        "meta_iterations: 300", "meta_iterations: 20")
    (tmp_path / "t.yaml").write_text(text)
    code, out, _ = _run(capsys, "meta-fit", tmp_path / "t.yaml", "-o", tmp_path / "t.st")
    assert code == 0, out
    init = MetaInit.load(tmp_path / "t.st")
    assert "standardization" in init.metadata  # table mode: the scaling is saved
    assert init.metadata["algorithm"] in ("maml", "alpaca", "lmm", "maml+alpaca+lmm")
    code, out, _ = _run(capsys, "evaluate", tmp_path / "t.yaml", "--init", tmp_path / "t.st")
    assert code == 0
    assert f"algorithm={init.metadata['algorithm']}" in out
    if "maml" in init.metadata["algorithm"].split("+"):
        assert re.search(r"inner_lr=[0-9.e-]+, inner_steps=\d+", out)
