"""Many workers on one study: concurrency, SIGKILL mid-trial, heartbeats, resuming.

Every test starts real ``python -m metafit tune`` processes. The journal-file and SQLite
variants always run (heartbeats need a database, hence SQLite there); the PostgreSQL
variants need a server, whose URL comes from ``METAFIT_TEST_POSTGRES_URL``
(``.ci/postgres.sh`` installs and starts one and exports it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from metafit import MetaInitializedRegressor, SinusoidTasks
from metafit.config import load_config
from metafit.tuning import evaluate, make_storage, tuned_estimator

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("METAFIT_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="METAFIT_TEST_POSTGRES_URL is not set; run '. .ci/postgres.sh' to start a "
    "PostgreSQL server on 127.0.0.1 and export it",
)

CONFIG = """
tasks:
  source: sinusoid
  k_shot: 5
  k_query: 5
  validation_tasks: {n_val}
estimator:
  params:
    hidden_sizes: [8]
    meta_iterations: 5
    meta_batch_size: 4
    random_state: 0
    verbose: 0
tune:
  sampler: {{name: random}}
search_space:
  inner_lr: {{low: 0.0001, high: 0.002, log: true}}
  inner_steps: {{low: {lo}, high: {hi}}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved initialization and two configs: quick trials and slow (~1-2 s) trials."""
    d = tmp_path_factory.mktemp("workers")
    est = MetaInitializedRegressor(hidden_sizes=(8,), meta_iterations=5, meta_batch_size=4,
                                   random_state=0)
    est.meta_fit(SinusoidTasks(random_state=0))
    est.save_meta_init(d / "init.safetensors")
    (d / "quick.yaml").write_text(CONFIG.format(n_val=4, lo=1, hi=5))
    (d / "slow.yaml").write_text(CONFIG.format(n_val=20, lo=400, hi=500))
    return d


def _url(kind: str, d: Path) -> str:
    if kind == "postgres":
        return PG_URL
    if kind == "journal":
        return f"journal:{d / f'{uuid.uuid4().hex}.log'}"
    return f"sqlite:///{d / f'{uuid.uuid4().hex}.db'}"


def _worker(d: Path, config: str, url: str, name: str, n_trials: int, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "metafit", "tune", str(d / config), "--init",
           str(d / "init.safetensors"), "--storage", url, "--study-name", name,
           "--n-trials", str(n_trials), *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "METAFIT_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, cwd=d, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url))


@pytest.fixture
def cleanup():
    made = []
    yield made
    for url, name in made:
        if url.startswith("postgresql"):
            try:
                optuna.delete_study(study_name=name, storage=make_storage(url))
            except KeyError:
                pass


@pytest.mark.parametrize("kind", ["journal", pytest.param("postgres", marks=needs_pg)])
def test_three_workers_five_trials_each(kind, workdir, cleanup):
    url, name = _url(kind, workdir), f"conc-{uuid.uuid4().hex[:8]}"
    cleanup.append((url, name))
    procs = [_worker(workdir, "quick.yaml", url, name, 5, "--seed", i) for i in range(3)]
    for p in procs:
        _finish(p)
    study = _study(url, name)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 15
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(15))
    # The best trial's parameters reproduce its value in this process.
    config = load_config(workdir / "quick.yaml")
    est = config.build_estimator(meta_init=workdir / "init.safetensors")
    value = evaluate(tuned_estimator(est, study), config.build_tasks().validation)
    assert value == pytest.approx(study.best_value, rel=1e-6)


def _wait_for_running(url, name, proc, timeout=180):
    """Wait until the study has a finished trial and a running one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            trials = _study(url, name).get_trials(deepcopy=False)
        except KeyError:  # the worker has not created the study yet
            trials = []
        states = [t.state for t in trials]
        if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING:
            return trials
        time.sleep(0.2)
    raise AssertionError("no trial was running")


def _frozen_mid_trial(url, name, heartbeat: bool) -> bool:
    """Whether the worker, frozen by the caller, is in the middle of a trial.

    A frozen worker cannot finish its trial between this look and the kill; without the
    freeze a fast trial could complete in between (seen on an idle machine).
    """
    try:
        trials = _study(url, name).get_trials(deepcopy=False)
    except Exception:  # a storage write of the frozen worker holds a lock: look again later
        return False
    # All parameters drawn: a worker frozen between two suggestions (seen on a loaded
    # machine) would leave a retry that draws the rest anew, unlike the killed trial.
    drawn = (bool(trials) and trials[-1].state == TrialState.RUNNING
             and set(trials[-1].params) == {"inner_lr", "inner_steps"})
    return drawn and (not heartbeat or _heartbeat_recorded(url, trials[-1]._trial_id))


def _heartbeat_recorded(url, trial_id: int) -> bool:
    """Whether the running trial has written its first heartbeat: optuna never fails a
    trial without one, so a worker frozen before its heartbeat thread's first write (its
    SQLite write waiting on the trial's own, seen in CI) leaves a trial no later worker
    can fail."""
    import sqlalchemy

    try:
        with make_storage(url).engine.connect() as conn:
            found = conn.execute(
                sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :t"),
                {"t": trial_id},
            ).scalar()
    except sqlalchemy.exc.OperationalError:  # the frozen worker holds a lock: look again
        return False
    return bool(found)


def _kill_mid_trial(workdir, url, name, *extra):
    proc = _worker(workdir, "slow.yaml", url, name, 50, *extra)
    try:
        for _ in range(50):
            _wait_for_running(url, name, proc)
            proc.send_signal(signal.SIGSTOP)
            if _frozen_mid_trial(url, name, heartbeat="--heartbeat" in extra):
                break
            proc.send_signal(signal.SIGCONT)
        else:
            raise AssertionError("never caught the worker in the middle of a trial")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    trials = _study(url, name).get_trials(deepcopy=False)
    done = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    running = [t for t in trials if t.state == TrialState.RUNNING]
    assert done and len(running) == 1
    return done, running[0]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=needs_pg)])
def test_sigkill_heartbeat_retry_and_resume(kind, workdir, cleanup):
    """A worker killed mid-trial loses no finished trial; with heartbeats its stale trial
    is failed and retried by the next worker, which resumes the same study."""
    url, name = _url(kind, workdir), f"hb-{uuid.uuid4().hex[:8]}"
    cleanup.append((url, name))
    hb = ("--heartbeat", 1, "--grace-period", 2)
    done, killed = _kill_mid_trial(workdir, url, name, *hb)
    time.sleep(3)  # past the grace period
    _finish(_worker(workdir, "slow.yaml", url, name, 1, *hb))
    trials = _study(url, name).get_trials(deepcopy=False)
    assert {t.number: t.value for t in trials if t.number in done} == done
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # The second `metafit tune` resumed the study: same numbering, one more trial.
    assert [t.number for t in trials] == list(range(len(done) + 2))
