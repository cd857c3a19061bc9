"""The package's shape: no import circles, functions short unless a reason says why,
old import paths kept, every private torch API in one module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "metafit"
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every metafit module ``name`` imports, wherever the import statement stands
    (functions and TYPE_CHECKING blocks included). Importing ``a.b.c`` counts as an
    edge to ``a.b.c`` only, not to the packages above it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when it exists
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                for a in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_static_import_graph_has_no_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 50  # the walk sees the real imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                above = lines[first - 2].strip() if first >= 2 else ""
                # the reason: a comment right above, beginning "Long function:"
                comment_block = []
                i = first - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    comment_block.insert(0, lines[i].strip())
                    i -= 1
                reason = any(c.startswith("# Long function:") for c in comment_block)
                if length > MAX_LINES and not reason:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} " \
                          f"({length} lines) {above!r}"


def test_no_long_function_without_a_reason():
    assert list(_long_functions()) == []


@pytest.mark.parametrize(
    "old, names",
    [
        ("metafit.estimator", ["MetaInitializedEstimator", "MetaInitializedRegressor",
                               "MetaInitializedClassifier"]),
        ("metafit.regressor", ["MetaInitializedRegressor"]),
        ("metafit.classifier", ["MetaInitializedClassifier", "module_outputs"]),
        ("metafit.search_space", ["default_search_space", "parse_search_space",
                                  "to_estimator_params", "ADAPTATION_PARAMS"]),
        ("metafit.storage", ["make_storage", "journal_path"]),
        ("metafit.config", ["load_config", "ConfigError", "EpochTasks", "Config"]),
        ("metafit.cli", ["main", "build_parser"]),
        ("metafit.tuning", ["tune", "tuned_estimator", "evaluate", "make_storage",
                            "make_objective"]),
        ("metafit.plotting", ["write_report", "plot_adaptation"]),
        ("metafit.functional", ["inner_loop", "reference_inner_loop", "make_forward"]),
        ("metafit.tasks", ["Task", "TaskBatch", "SinusoidTasks"]),
        ("metafit.models", ["MLP", "Conv4"]),
        ("metafit.learner", ["MetaLearner"]),
    ],
)
def test_old_and_documented_import_paths_work(old, names):
    module = importlib.import_module(old)
    for name in names:
        assert hasattr(module, name), f"{old}.{name}"
    import metafit.estimators

    assert metafit.estimator.MetaInitializedRegressor is \
        metafit.estimators.MetaInitializedRegressor


def test_private_torch_apis_live_in_the_compat_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            ):
                offenders.append(f"{path.name}: torch.{node.attr}")
    assert offenders == []


def test_the_compat_fallbacks_compute_what_the_kernels_do(monkeypatch):
    import torch

    from metafit import _torch_compat as compat

    a = [torch.randn(3, 2), torch.randn(4)]
    b = [torch.randn(3, 2), torch.randn(4)]
    r = [torch.rand(3, 2), torch.rand(4)]
    fast = (compat.foreach_add(a, b, 0.5), compat.foreach_addcmul(a, r, b, -2.0),
            compat.foreach_norm(a))
    monkeypatch.setattr(compat, "HAS_FOREACH", False)
    slow = (compat.foreach_add(a, b, 0.5), compat.foreach_addcmul(a, r, b, -2.0),
            compat.foreach_norm(a))
    for f, s in zip(fast, slow):
        for x, y in zip(f, s):
            torch.testing.assert_close(x, y)
    c = [t.clone() for t in a]
    compat.foreach_add_(c, b, 0.5)
    compat.foreach_addcmul_(c, r, b, -2.0)
    for x, y, z, w in zip(c, a, b, r):
        torch.testing.assert_close(x, y + 0.5 * z - 2.0 * w * z)
