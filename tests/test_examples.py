"""Every example runs in its short mode (``METAFIT_EXAMPLE_QUICK=1``) and says what it shows.

Each runs in a fresh process from the repository root, single-threaded (tiny networks are
faster so, and a busy CI core does not stall them). A new file in examples/ must be added
to ``EXAMPLES`` below: the last test fails otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"

#: file -> (extra arguments, substrings the output must contain)
EXAMPLES = {
    "sinusoid_quickstart.py": ([], ["meta-learned initialization:", "random initialization:"]),
    "tabular_groups.py": ([], ["new groups, 5 rows known", "ridge per group"]),
    "grid_search_pipeline.py": ([], ["best adaptation parameters", "held-out points"]),
    "omniglot.py": ([], ["5-way 1-shot", "test accuracy"]),
    "cli_tuning.sh": ([], ["best parameters", "test query MSE", "optimization_history.png"]),
    "many_workers.sh": ([], ['"n_trials": 4']),  # 2 workers x 2 trials landed in one study
}
#: the same file run a second way
VARIANTS = {
    "omniglot-digits-fallback": ("omniglot.py", ["--data", "/nonexistent"], ["digits 5-way"]),
    "tabular-synthetic-fallback": ("tabular_groups.py", ["--data", "/nonexistent"],
                                   ["synthetic table of 160 stores"]),
}


def run_example(name, args, tmp_path):
    env = {
        **os.environ,
        "METAFIT_EXAMPLE_QUICK": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        "EXAMPLE_WORKDIR": str(tmp_path),
    }
    path = EXAMPLES_DIR / name
    if name.endswith(".sh"):
        cmd = [shutil.which("bash") or "bash", str(path), *args]
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    else:
        cmd = [sys.executable, str(path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_in_quick_mode(name, tmp_path):
    args, expected = EXAMPLES[name]
    output = run_example(name, args, tmp_path)
    for text in expected:
        assert text in output, output[-3000:]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_example_variant(variant, tmp_path):
    name, args, expected = VARIANTS[variant]
    output = run_example(name, args, tmp_path)
    for text in expected:
        assert text in output, output[-3000:]


def test_every_example_is_tested():
    # Configs and data (yaml, toml, csv) are inputs of the examples; scripts are examples.
    files = {p.name for p in EXAMPLES_DIR.iterdir() if p.suffix in (".py", ".sh")}
    untested = files - set(EXAMPLES)
    assert not untested, f"add these examples to EXAMPLES in {__file__}: {sorted(untested)}"


def test_examples_have_a_docstring_with_run_instructions():
    for name in EXAMPLES:
        text = (EXAMPLES_DIR / name).read_text()
        assert "Run::" in text or "# Run:" in text, name
        assert "--quick" in text or "METAFIT_EXAMPLE_QUICK" in text, name
