"""Tests of metafit.config: the example configs load, bad configs name the offending key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _shared_data import SHARED_DATA

from metafit import MetaInitializedClassifier, MetaInitializedRegressor
from metafit.config import ConfigError, EpochTasks, load_config
from metafit.grouped import GroupedTable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
tasks:
  source: sinusoid
  validation_tasks: 4
  test_tasks: 3
estimator:
  params:
    hidden_sizes: [8]
    meta_iterations: 3
"""


@pytest.mark.parametrize("name", ["sinusoid.yaml", "tabular.yaml", "digits.toml"])
def test_examples_load_and_build(name):
    config = load_config(EXAMPLES / name)
    splits = config.build_tasks()
    assert splits.validation and splits.test
    est = config.build_estimator()
    if name == "tabular.yaml":  # a regression table meta-trains in table mode
        assert isinstance(splits.train, GroupedTable)
        assert splits.train.X.shape[1:] == splits.validation[0].X_support.shape[1:]
        train_groups = set(splits.train.groups)
        assert len(train_groups) == 12  # half of the 24 sites; the others validate and test
    else:
        task = next(iter(splits.train))
        assert task.X_support.shape[1:] == splits.validation[0].X_support.shape[1:]
    expected = MetaInitializedClassifier if name.startswith("digits") else (
        MetaInitializedRegressor
    )
    assert type(est) is expected
    assert est.get_params()["random_state"] == 0


def test_omniglot_example_loads():
    config = load_config(EXAMPLES / "omniglot.yaml")
    est = config.build_estimator()
    assert est.get_params()["module__hidden_channels"] == 64
    data = SHARED_DATA
    if not (data / "omniglot").exists():
        pytest.skip(f"Omniglot data not found under {data}")


def test_sinusoid_splits_are_disjoint_and_reproducible(tmp_path):
    config = load_config(_write(tmp_path, BASE))
    a, b = config.build_tasks(), config.build_tasks()
    assert len(a.validation) == 4 and len(a.test) == 3
    np.testing.assert_array_equal(a.validation[0].X_support, b.validation[0].X_support)
    assert not np.array_equal(a.validation[0].X_support, a.test[0].X_support)
    first_train = next(iter(a.train))
    assert not np.array_equal(first_train.X_support, a.validation[0].X_support)


def test_a_regression_table_meta_trains_in_table_mode_on_its_own_groups(tmp_path):
    config = load_config(EXAMPLES / "tabular.yaml")
    splits = config.build_tasks()
    assert isinstance(splits.train, GroupedTable)
    assert len(splits.validation) == 6 and len(splits.test) == 6
    held_out = {t.X_query.tobytes() for t in [*splits.validation, *splits.test]}
    X = np.asarray(splits.train.X, dtype=np.float32)
    rows = {X[i : i + 1].tobytes() for i in range(len(X))}
    assert len(set(splits.train.groups)) == 12 and len(X) == 12 * 16
    assert not any(r in rows for t in [*splits.validation, *splits.test]
                   for r in (t.X_query[i : i + 1].tobytes() for i in range(len(t.X_query))))
    assert held_out
    est = config.build_estimator().set_params(meta_iterations=3, verbose=0)
    est.meta_fit(splits.train, splits.validation)  # table mode: scaling saved
    assert "standardization" in est.meta_init_.metadata


def test_a_classification_table_meta_fits_in_table_mode_with_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["site,a,b,label"] + [
        f"{g},{rng.normal():.3f},{rng.normal():.3f},{rng.choice(['low', 'high'])}"
        for g in range(8) for _ in range(12)
    ]
    (tmp_path / "c.csv").write_text("\n".join(lines))
    text = """
tasks: {source: table, path: c.csv, group: site, target: label, support_size: 6,
        validation_fraction: 0.25, test_fraction: 0.25}
estimator: {type: classifier, params: {hidden_sizes: [8], meta_iterations: 3}}
"""
    config = load_config(_write(tmp_path, text))
    splits = config.build_tasks()
    assert isinstance(splits.train, GroupedTable)
    assert len(np.unique(splits.train.groups)) == 4
    assert len(splits.validation) == 2 and len(splits.test) == 2
    keys = {part: {t.X_query.tobytes() for t in tasks}
            for part, tasks in [("val", splits.validation), ("test", splits.test)]}
    assert not keys["val"] & keys["test"]
    est = config.build_estimator().set_params(verbose=0)
    est.meta_fit(splits.train, splits.validation)  # string labels, validated in table mode
    assert est.meta_init_.metadata["classes"] == ["high", "low"]
    task = splits.test[0]
    est.fit(task.X_support, task.y_support)
    assert set(est.predict(task.X_query)) <= {"high", "low"}
    assert 0.0 <= est.score(task.X_query, task.y_query) <= 1.0


def test_epoch_tasks_serve_a_finite_list_endlessly_reshuffled_per_epoch():
    tasks = list(range(5))
    served = EpochTasks(tasks, random_state=0)
    stream = iter(served)
    epochs = [[next(stream) for _ in range(5)] for _ in range(4)]
    assert len(served) == 5 and all(sorted(e) == tasks for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # a new order each epoch
    assert [next(iter(served)) for _ in range(3)] == [epochs[0][0]] * 3  # re-iterable


def test_parquet_table(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.read_csv(EXAMPLES / "tabular.csv")
    frame.to_parquet(tmp_path / "t.parquet")
    text = (EXAMPLES / "tabular.yaml").read_text().replace("tabular.csv", "t.parquet")
    splits = load_config(_write(tmp_path, text)).build_tasks()
    assert len(splits.validation) == 6


def test_toml_and_yaml_agree(tmp_path):
    toml = """
[tasks]
source = "sinusoid"
validation_tasks = 4
[estimator.params]
hidden_sizes = [8]
inner_lr = 0.05
[search_space]
inner_lr = { low = 0.001, high = 0.5, log = true }
"""
    yaml = """
tasks: {source: sinusoid, validation_tasks: 4}
estimator: {params: {hidden_sizes: [8], inner_lr: 0.05}}
search_space: {inner_lr: {low: 0.001, high: 0.5, log: true}}
"""
    a = load_config(_write(tmp_path, toml, "c.toml"))
    b = load_config(_write(tmp_path, yaml, "c.yaml"))
    assert a.estimator == b.estimator and a.search_space == b.search_space
    assert a.build_estimator().get_params() == b.build_estimator().get_params()


def test_yaml_number_strings_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; configs accept it as a number.
    text = BASE + "  \n" + "search_space:\n  inner_lr: {low: 1e-3, high: 1e-1, log: true}\n"
    text = text.replace("meta_iterations: 3", "meta_iterations: 3\n    inner_lr: 5e-2")
    config = load_config(_write(tmp_path, text))
    assert config.estimator["params"]["inner_lr"] == 0.05
    assert config.search_space["inner_lr"]["low"] == 0.001


def test_samplers_and_pruners(tmp_path):
    import optuna

    text = BASE + """
tune:
  sampler: {name: random, seed: 3}
  pruner: {name: hyperband, min_resource: 1, reduction_factor: 3}
"""
    config = load_config(_write(tmp_path, text))
    assert isinstance(config.make_sampler(), optuna.samplers.RandomSampler)
    assert isinstance(config.make_pruner(), optuna.pruners.HyperbandPruner)
    assert isinstance(load_config(_write(tmp_path, BASE)).make_sampler(seed=1),
                      optuna.samplers.TPESampler)


BAD = [
    ("tasks:\n  source: sinusoid\ntuning: {}\n", "unknown key 'tuning'"),
    ("tasks:\n  source: sinusoid\n  shots: 3\n", "unknown key 'shots'"),
    ("tasks:\n  source: sinus\n", "tasks.source must be one of"),
    ("estimator: {}\n", "missing section 'tasks'"),
    ("tasks: 3\n", "tasks must be a mapping"),
    ("tasks:\n  source: sinusoid\n  k_shot: ten\n", "tasks.k_shot must be an int"),
    ("tasks:\n  source: sinusoid\n  k_shot: 0\n", "tasks.k_shot must be >= 1"),
    ("tasks:\n  source: sinusoid\n  validation_tasks: 5000\n", "must be <= 1000"),
    ("tasks:\n  source: sinusoid\nestimator:\n  params: {inner_rate: 0.1}\n",
     "unknown parameter 'inner_rate'"),
    ("tasks:\n  source: sinusoid\nestimator:\n  params: {inner_lr: fast}\n",
     "estimator.params.inner_lr must be a number"),
    ("tasks:\n  source: sinusoid\nestimator:\n  params: {hidden_sizes: [a]}\n",
     "hidden_sizes must be a list of ints"),
    ("tasks:\n  source: sinusoid\nestimator:\n  params: {module: x}\n", "estimator.model"),
    ("tasks:\n  source: sinusoid\nestimator: {type: ranker}\n", "estimator.type"),
    ("tasks:\n  source: sinusoid\nestimator: {model: ResNet}\n", "estimator.model 'ResNet'"),
    ("tasks:\n  source: sinusoid\nestimator: {model: Conv4, module_params: {width: 3}}\n",
     "takes no argument 'width'"),
    ("tasks:\n  source: sinusoid\ntune: {n_trials: many}\n", "tune.n_trials must be an int"),
    ("tasks:\n  source: sinusoid\ntune: {n_trials: 0}\n", "tune.n_trials must be >= 1"),
    ("tasks:\n  source: sinusoid\ntune: {mode: full}\n", "tune.mode"),
    ("tasks:\n  source: sinusoid\ntune: {sampler: {name: grid}}\n", "tune.sampler.name"),
    ("tasks:\n  source: sinusoid\ntune: {pruner: {name: median, n: [1]}}\n",
     "tune.pruner.n must be a scalar"),
    ("tasks:\n  source: sinusoid\ntune: {workers: 3}\n", "unknown key 'workers'"),
    ("tasks:\n  source: sinusoid\nsearch_space: {inner_lr: {low: 1, high: 0.1}}\n",
     "greater than"),
    ("tasks:\n  source: sinusoid\nsearch_space: {meta_lr: {low: 0.001, high: 0.1}}\n",
     "mode='meta'"),
    ("tasks:\n  source: sinusoid\nsearch_space: {inner_lr: {lo: 1, high: 2}}\n",
     "unknown key 'lo'"),
    ("tasks:\n  source: sinusoid\nsearch_space: [1, 2]\n", "search_space must be a mapping"),
    ("tasks:\n  source: table\n  path: x.csv\n", "tasks.group is required"),
    ("tasks: [\n", "invalid YAML at line"),
    ("", "the config is empty"),
    ("- 1\n- 2\n", "must be a mapping of sections"),
]


@pytest.mark.parametrize("text, match", BAD)
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(_write(tmp_path, "a: 1", "c.json"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[tasks\n", "c.toml"))


@pytest.mark.parametrize(
    "extra, match",
    [
        ("  path: nothere.csv\n  group: site\n  target: load\n", "file not found"),
        ("  path: {csv}\n  group: city\n  target: load\n", "tasks.group: column 'city'"),
        ("  path: {csv}\n  group: site\n  target: load\n  features: [wind]\n",
         "column 'wind'"),
        ("  path: {csv}\n  group: site\n  target: load\n  validation_fraction: 1.5\n",
         "validation_fraction"),
        ("  path: {tsv}\n  group: site\n  target: load\n", "neither .csv"),
    ],
)
def test_bad_tables_fail_on_build(tmp_path, extra, match):
    extra = extra.format(csv=EXAMPLES / "tabular.csv", tsv=tmp_path / "t.xlsx")
    (tmp_path / "t.xlsx").write_text("x")
    config = load_config(_write(tmp_path, "tasks:\n  source: table\n" + extra))
    with pytest.raises(ConfigError, match=match):
        config.build_tasks()


def test_bad_digits_arguments_fail_on_build(tmp_path):
    config = load_config(_write(tmp_path, "tasks:\n  source: digits\n  n_way: 9\n"))
    with pytest.raises(ConfigError, match="n_way"):
        config.build_tasks()


@pytest.mark.parametrize("section, text", [
    ("sampler", "  sampler: {name: tpe, sed: 0}\n"),
    ("pruner", "  pruner: {name: median, n_startup: 5}\n"),
])
def test_sampler_and_pruner_option_typos_fail_at_load_time(tmp_path, section, text):
    path = tmp_path / "c.yaml"
    path.write_text("tasks:\n  source: sinusoid\ntune:\n" + text)
    with pytest.raises(ConfigError, match=f"tune.{section}"):
        load_config(path)


def test_paths_in_a_config_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "c.yaml"
    path.write_text("tasks:\n  source: sinusoid\nestimator:\n  params:\n"
                    "    checkpoint_path: ck.safetensors\n    meta_init: init.safetensors\n")
    monkeypatch.chdir(tmp_path)
    est = load_config(path).build_estimator()
    assert est.checkpoint_path == str(folder / "ck.safetensors")
    assert est.meta_init == str(folder / "init.safetensors")
