"""Tests for metafit.distributed: data-parallel meta_fit over torch.distributed (gloo).

The multi-process tests run 2 ranks on 127.0.0.1. The ranks that exercise the library come
from a ``forkserver`` that imported metafit once (a single-threaded process, so forking it is
safe), which saves each rank the seconds of importing torch and scikit-learn; the
command-line test launches real ``torchrun``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from metafit import MetaInit, MetaInitializedRegressor, SinusoidTasks
from metafit.callbacks import BestState, Checkpoint, ProgressBar
from metafit.distributed import (
    DistributedError,
    DistributedMetaTraining,
    _AverageMetaLoss,
    _NotDistributed,
    dist_timeout,
    distributed_training,
    is_main_process,
    shard_indices,
)
from metafit.tasks import TaskBatch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

BASE = dict(hidden_sizes=(8,), inner_lr=0.01, inner_steps=1, meta_lr=0.01, meta_iterations=3)
# name -> (estimator params, run inside a process group the test initialized itself)
FITS = {
    "maml": (dict(algorithm="maml", meta_batch_size=4, random_state=0), False),
    "fomaml_unequal": (dict(algorithm="fomaml", meta_batch_size=5, random_state=0), True),
    "reptile": (dict(algorithm="reptile", meta_batch_size=4, random_state=0), True),
    "maml_unseeded": (dict(algorithm="maml", meta_batch_size=4, random_state=None), True),
    # the group algorithms: a closed-form head, and a context adapted alone
    "alpaca": (dict(algorithm="alpaca", meta_batch_size=4, random_state=0), False),
    "cavia": (dict(algorithm="cavia", meta_batch_size=4, random_state=0), True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(params: dict, tasks=None, **extra) -> MetaInitializedRegressor:
    est = MetaInitializedRegressor(**{**BASE, **params, **extra})
    return est.meta_fit(SinusoidTasks(k_shot=5, random_state=0) if tasks is None else tasks)


@pytest.fixture
def no_launch(monkeypatch):
    for name in (*TORCHRUN_ENV, "METAFIT_DISTRIBUTED", "METAFIT_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


@pytest.fixture
def fake_rank1(no_launch, monkeypatch):
    """torchrun's variables for rank 1 of 2 (nothing is initialized until entered)."""
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1")
    for k, v in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)


# ---------------------------------------------------------------------------- one process


def test_shard_indices_cover_the_batch_once():
    for n in range(2, 12):
        for world in range(1, n + 1):
            seen = sorted(i for r in range(world) for i in shard_indices(n, r, world))
            assert seen == list(range(n))


def test_not_distributed_without_launch(no_launch, monkeypatch):
    assert isinstance(distributed_training(4), _NotDistributed)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("METAFIT_DISTRIBUTED", "0")
    assert isinstance(distributed_training(4), _NotDistributed)
    assert not is_main_process()


def test_shard_takes_stride_and_drops_a_short_last_batch(fake_rank1):
    parallel = distributed_training(5)
    assert isinstance(parallel, DistributedMetaTraining) and parallel.rank == 1
    assert not dist.is_initialized()  # only entering initializes
    batches = [list("abcde"), list("fghij"), list("k")]
    shares, weights = [], []
    for share in parallel.shard(iter(batches)):
        shares.append(share)
        weights.append(parallel.weight)
    assert shares == [["b", "d"], ["g", "i"]]
    assert weights == [0.4, 0.4]
    with pytest.raises(ValueError, match="at least one task per process"):
        list(parallel.shard(iter([["a"]])))
    # a source's stacked batch is shared out the same way, as a batch
    stacked = next(SinusoidTasks(2, 3, random_state=0).meta_batches(7))
    (share,) = list(parallel.shard(iter([stacked])))
    mine = list(shard_indices(7, parallel.rank, parallel.world_size))
    assert isinstance(share, TaskBatch) and share.n_tasks == len(mine) == 3
    assert parallel.weight == 3 / 7
    for got, i in zip(share, mine):
        np.testing.assert_array_equal(got.X_query, stacked[i].X_query)


def test_bad_settings_are_value_errors(fake_rank1, monkeypatch):
    with pytest.raises(ValueError, match="meta_batch_size=1 is smaller than the number"):
        distributed_training(1)
    with pytest.raises(ValueError, match="set meta_batch_size >= 2"):
        MetaInitializedRegressor(meta_batch_size=1).meta_fit(SinusoidTasks(random_state=0))
    monkeypatch.setenv("METAFIT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="METAFIT_DIST_TIMEOUT must be a positive number"):
        dist_timeout()
    monkeypatch.delenv("METAFIT_DIST_TIMEOUT")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="MASTER_PORT not: launch with torchrun"):
        distributed_training(4)


def test_rank1_drops_progress_and_checkpoint(fake_rank1, tmp_path):
    parallel = distributed_training(4)
    best, bar = BestState(), ProgressBar()
    ckpt = Checkpoint(tmp_path / "c.safetensors", 1, lambda learner, it: None)
    kept = parallel.callbacks_for_rank([best, bar, ckpt])
    assert isinstance(kept[0], _AverageMetaLoss) and kept[1:] == [best]
    parallel.rank = 0
    assert parallel.callbacks_for_rank([best, bar, ckpt])[1:] == [best, bar, ckpt]


def test_peer_that_never_starts_times_out_with_a_clear_error(fake_rank1, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("METAFIT_DIST_TIMEOUT", "2")
    start = time.perf_counter()
    with pytest.raises(DistributedError, match="could not join the process group .* within 2 s"):
        _fit(FITS["maml"][0])
    assert time.perf_counter() - start < 30
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------- two ranks


def _rank_main(rank: int, port: int, out: Path, job: str) -> None:
    """Body of a forked rank: run ``job`` with torchrun's variables, report to files."""
    try:
        torch.set_num_threads(1)
        os.environ.pop("METAFIT_DISTRIBUTED", None)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            METAFIT_DIST_TIMEOUT="20",
        )
        if job == "fits":
            _rank_fits(rank, port, out)
        else:
            _rank_dies(rank, out)
    except BaseException as exc:  # report everything to the parent
        (out / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n\n" + (
            traceback.format_exc()
        ))
        os._exit(1)


def _rank_fits(rank: int, port: int, out: Path) -> None:
    results, flags = {}, {}
    for name, (params, own_group) in FITS.items():
        if own_group and not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=rank, world_size=2
            )
        ckpt = out / f"ckpt_{name}_{rank}.safetensors"
        est = _fit(params, checkpoint_path=ckpt, checkpoint_interval=1)
        flags[name] = dist.is_initialized()
        results[name] = {
            "tensors": est.meta_init_.tensors,
            "meta_loss": est.meta_history_.column("meta_loss"),
        }
    dist.destroy_process_group()
    torch.save({"results": results, "flags": flags}, out / f"rank{rank}.pt")


def _rank_dies(rank: int, out: Path) -> None:
    sampler = SinusoidTasks(k_shot=5, random_state=0)

    def tasks():
        for i, task in enumerate(sampler):
            if rank == 1 and i == 3 * 4:  # rank 1 dies at the start of iteration 4
                os._exit(3)
            yield task

    _fit(dict(meta_batch_size=4, random_state=0, meta_iterations=1000), tasks())


def _run_ranks(job: str, out: Path, timeout: float = 90) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["metafit", "torch.distributed"])
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out, job)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s: a hang"
    return procs


def _errors(out: Path) -> dict[int, str]:
    files = {r: out / f"error{r}.txt" for r in range(2)}
    return {r: f.read_text() for r, f in files.items() if f.exists()}


@pytest.fixture(scope="module")
def two_rank_fits(tmp_path_factory):
    out = tmp_path_factory.mktemp("fits")
    names = (*TORCHRUN_ENV, "METAFIT_DISTRIBUTED")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        procs = _run_ranks("fits", out)
    finally:
        os.environ.update(saved)
    for p in procs:
        assert p.exitcode == 0, _errors(out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


@pytest.mark.parametrize("name", ["maml", "fomaml_unequal", "reptile", "alpaca", "cavia"])
def test_two_ranks_equal_one_process_on_the_same_tasks(two_rank_fits, no_launch, name):
    _, ranks = two_rank_fits
    reference = _fit(FITS[name][0])
    for rank in ranks:
        got = rank["results"][name]
        for key, value in reference.meta_init_.tensors.items():
            torch.testing.assert_close(got["tensors"][key], value, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(
            got["meta_loss"], reference.meta_history_.column("meta_loss"), rtol=1e-5
        )
    # Sanity: training moved the initialization, so equality above is not vacuous.
    untrained = MetaInitializedRegressor(**{**BASE, **FITS[name][0], "meta_iterations": 1})
    first = untrained.meta_fit(SinusoidTasks(k_shot=5, random_state=0)).meta_init_.tensors
    assert any(
        not torch.allclose(first[k], v, atol=1e-5) for k, v in reference.meta_init_.tensors.items()
    )


def test_ranks_end_identical_even_unseeded(two_rank_fits):
    _, (r0, r1) = two_rank_fits
    for name in FITS:
        for key, value in r0["results"][name]["tensors"].items():
            assert torch.equal(value, r1["results"][name]["tensors"][key]), (name, key)


def test_group_cleanup_and_rank0_files(two_rank_fits):
    out, ranks = two_rank_fits
    for rank in ranks:
        # meta_fit destroyed the group it created from the environment, not the test's.
        assert rank["flags"] == {"maml": False, "fomaml_unequal": True, "reptile": True,
                                 "maml_unseeded": True, "alpaca": True, "cavia": True}
    for name in FITS:
        assert (out / f"ckpt_{name}_0.safetensors").exists()
        assert not (out / f"ckpt_{name}_1.safetensors").exists()


def test_a_dead_rank_makes_the_other_fail_clearly(tmp_path, no_launch):
    start = time.perf_counter()
    procs = _run_ranks("dies", tmp_path, timeout=60)
    took = time.perf_counter() - start
    errors = _errors(tmp_path)
    assert procs[1].exitcode == 3, errors
    assert procs[0].exitcode == 1, errors
    message = errors[0].splitlines()[0]
    assert message.startswith("DistributedError: distributed meta-training failed on rank 0")
    assert "a peer process died or did not answer" in message
    assert took < 60


def test_cli_meta_fit_under_torchrun(tmp_path, no_launch):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "tasks: {source: sinusoid, k_shot: 5, k_query: 5, random_state: 0, "
        "validation_tasks: 4, test_tasks: 4}\n"
        "estimator:\n  type: regressor\n  params: {hidden_sizes: [8], inner_steps: 1, "
        "meta_batch_size: 4, meta_iterations: 3, meta_lr: 0.01, random_state: 0, verbose: 0}\n"
    )
    out = tmp_path / "init.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "metafit", "meta-fit", str(config), "-o", str(out),
    ]
    env = {**os.environ, "METAFIT_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("meta-training MetaInitializedRegressor") == 1
    assert proc.stdout.count(f"saved {out}") == 1

    from metafit.cli import main

    single = tmp_path / "single.safetensors"
    assert main(["meta-fit", str(config), "-o", str(single)]) == 0
    got, want = MetaInit.load(out).tensors, MetaInit.load(single).tensors
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4)

