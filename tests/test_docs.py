"""Every Python block of README.md and docs/*.md runs, so a block that stops working fails.

Blocks of one file run in order in one namespace (a later block may continue an earlier
one). Markers in HTML comments, invisible on the rendered page, say what a block needs:

- ``<!-- docs-test setup ... -->``: code run before the next block (the data a reader
  brings, e.g. ``X_new``);
- ``<!-- docs-test skip: reason -->``: the next block is not run, for that reason (a GPU);
- ``<!-- docs-test needs-omniglot -->``: run only when the Omniglot files are there;
- ``<!-- docs-test process-group -->``: run as rank 0 of a one-process gloo group (made
  before the block unless the block makes it).

Quick mode (the default; ``METAFIT_DOCS_QUICK=0`` runs the blocks as written) shrinks
the budgets: meta-iterations, trials, epochs and sample counts.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from pathlib import Path

import pytest
from _shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK = os.environ.get("METAFIT_DOCS_QUICK", "1") != "0"

_TOKEN = re.compile(
    r"<!--\s*docs-test(?P<marker>[^\n]*?)(?:\n(?P<setup>.*?))?\s*-->"
    r"|^```python\n(?P<code>.*?)^```",
    re.S | re.M,
)
_QUICK_RULES = [
    (re.compile(r"\b(meta_iterations|iterations)=\d+"), r"\1=3"),
    # 8 trials: enough that some complete even where the random start diverges often
    (re.compile(r"\bn_trials=\d+"), "n_trials=8"),
    (re.compile(r"\bmax_epochs=\d+"), "max_epochs=2"),
    (re.compile(r"\.sample\(\d{2,}\)"), ".sample(4)"),
]


def blocks(path: Path):
    """``(line, code, setup, marker)`` for every Python block of ``path``."""
    text = path.read_text()
    setup, marker = [], None
    for match in _TOKEN.finditer(text):
        if match.group("code") is None:
            kind = match.group("marker").strip()
            if kind == "setup":
                setup.append(match.group("setup") or "")
            else:
                marker = kind
            continue
        line = text[: match.start()].count("\n") + 2
        yield line, match.group("code"), "\n".join(setup), marker
        setup, marker = [], None


def _quick(code: str) -> str:
    for pattern, repl in _QUICK_RULES:
        code = pattern.sub(repl, code)
    return code


def _omniglot_present() -> bool:
    return (DATA / "omniglot").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    found = list(blocks(path))
    if not found:
        pytest.skip(f"{path.name} has no Python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAFIT_DATA", str(DATA))
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    for line, code, setup, marker in found:
        where = f"{path.relative_to(ROOT)}:{line}"
        if marker and marker.startswith("skip:"):
            skipped.append(f"{where}: {marker[5:].strip()}")
            continue
        if marker == "needs-omniglot" and not _omniglot_present():
            skipped.append(f"{where}: the Omniglot files are absent ({DATA})")
            continue
        source = _quick(setup + "\n" + code) if QUICK else setup + "\n" + code
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if marker == "process-group":
                    _run_in_group(source, namespace, where, monkeypatch)
                else:
                    exec(compile(source, where, "exec"), namespace)  # noqa: S102
        except Exception as exc:  # pragma: no cover - the failure report
            raise AssertionError(f"the block at {where} fails: {type(exc).__name__}: {exc}") \
                from exc
    if skipped and len(skipped) == len(found):
        pytest.skip("; ".join(skipped))


def _run_in_group(source, namespace, where, monkeypatch):
    import torch.distributed as dist

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    if "init_process_group" not in source:  # the block joins a group its program made
        dist.init_process_group("gloo")
    try:
        exec(compile(source, where, "exec"), namespace)  # noqa: S102
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_marker_parser():
    text_path = Path(__file__).parent / "_docs_sample.md"
    text_path.write_text(
        "a\n<!-- docs-test setup\nx = 1\n-->\n```python\nprint(x)\n```\n"
        "<!-- docs-test skip: GPU -->\n```python\nimport cuda\n```\n```python\ny = 2\n```\n"
    )
    try:
        got = list(blocks(text_path))
    finally:
        text_path.unlink()
    assert [(code.strip(), setup.strip(), marker) for _, code, setup, marker in got] == [
        ("print(x)", "x = 1", None), ("import cuda", "", "skip: GPU"), ("y = 2", "", None)
    ]
    assert _quick("meta_iterations=2000, n_trials=50, .sample(100)") == \
        "meta_iterations=3, n_trials=8, .sample(4)"
