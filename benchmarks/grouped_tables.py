"""Real grouped tables: metafit's table mode against the models our users run today.

On the five tables of ``$METAFIT_DATA/grouped`` (default ``../shared/data/grouped`` from
the project root; see its README): for 3 seeds, the groups are split 60/20/20 into
meta-training, validation and test groups. Each test group shows k support rows (5 and
10; 3 and 5 for sleepstudy, whose subjects have 10 rows) and is scored on its other rows:
mean squared error in units of the meta-training targets' variance (so 1.0 is "predict
the training mean"). Groups with no row left for the query are skipped. Methods, all
given the same rows (meta-training + validation groups; the support rows of the new
group):

* ``metafit``: ``MetaInitializedRegressor(random_state=seed)`` in table mode, its
  defaults (it holds out its own validation groups), raw units in and out;
* ``metafit <algorithm>``: the same with another ``algorithm=`` (``--algorithms``);
* ``joint + fine-tune``: ``algorithm="joint"``, the pooled network fine-tuned per group,
  with ``inner_lr`` and ``inner_steps`` chosen on the validation groups (8 pairs);
* ``pooled ridge`` / ``pooled HGB``: one Ridge / HistGradientBoosting on all rows, the
  new group's support rows included, no adaptation;
* ``per-group ridge``: a Ridge on the new group's support rows alone, alpha chosen on
  the validation groups;
* ``MixedLM intercept`` / ``MixedLM slope``: statsmodels' linear mixed model with a random
  intercept (and a random slope on the table's usual covariate), fitted on the
  meta-training and validation rows; a new group is predicted with its BLUP computed
  from its support rows (statsmodels' ``predict`` ignores random effects);
* ``GPBoost``: gradient-boosted trees for the fixed effects with a grouped random
  intercept (``gpboost.GPModel(group_data=...)``, 200 rounds at learning rate 0.05, depth
  3), fitted on the meta-training and validation rows; a new group gets the posterior
  mean of its intercept given its support rows' residuals, at the fitted variances.

Usage::

    python benchmarks/grouped_tables.py                      # all tables, ~15 min
    python benchmarks/grouped_tables.py --tables sleepstudy --seeds 1 --quick
    python benchmarks/grouped_tables.py --algorithms fomaml anil metasgd
    python benchmarks/grouped_tables.py --blend              # + MAML and ALPACA, equal weights
    python benchmarks/grouped_tables.py --speed              # table mode's wall times
    python benchmarks/grouped_tables.py --coverage           # ALPACA's intervals
    python benchmarks/grouped_tables.py --coverage --noise per_task shared  # both models
    python benchmarks/grouped_tables.py --tables mathach --seeds 2 \
        --params '{"algorithm": "maml", "hidden_sizes": [64, 64]}'  # other settings

The mixed models need statsmodels and GPBoost: ``pip install -e ".[bench]"`` (the
GPBoost rows are left out where it is not installed).

Prints one table per data set and k (mean ± standard error over the test groups of all
seeds), the wall times of metafit, and a summary against the best anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge

from metafit import MetaInitializedRegressor
from metafit.algorithms import ALPACA
from metafit.training import DivergenceError

#: the usual random slope of each table (its README)
SLOPE = {"mathach": "ses", "nlschools": "iq", "radon": "basement", "sleepstudy": "days",
         "produc": "log_emp"}
KS = {"sleepstudy": (3, 5)}
ALPHAS = (0.1, 1.0, 10.0, 100.0)
#: the row of --blend
BLEND = "metafit mean of both"
FINE_TUNE_GRID = [{"inner_lr": lr, "inner_steps": steps}
                  for lr in (0.01, 0.03, 0.1, 0.3) for steps in (5, 20)]


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("METAFIT_DATA"):
        return Path(os.environ["METAFIT_DATA"]) / "grouped"
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grouped"


def load(folder: Path, name: str):
    df = pd.read_csv(folder / f"{name}.csv")
    group, target = df.columns[0], df.columns[-1]
    features = [c for c in df.columns if c not in (group, target)]
    return df[features].to_numpy(float), df[target].to_numpy(float), df[group].to_numpy(), \
        features


def split(groups, seed):
    labels = np.unique(groups)
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(len(labels))]
    n_tr, n_val = int(0.6 * len(labels)), int(0.2 * len(labels))
    return labels[:n_tr], labels[n_tr:n_tr + n_val], labels[n_tr + n_val:]


def episodes(X, y, groups, labels, k, seed):
    """Fixed support/query split of each group in ``labels`` (query non-empty)."""
    out = []
    for g in labels:
        rows = np.flatnonzero(groups == g)
        if len(rows) <= k:
            continue
        rows = np.random.default_rng([seed, len(out)]).permutation(rows)
        out.append((rows[:k], rows[k:]))
    return out


# ---------------------------------------------------------------- anchors


def blup_mixedlm(Xz, yz, groups, rows, z_cols):
    """A fitted linear mixed model's predictor: fixed effects on all features, random
    effects on ``[1, *z_cols]``; returns predict(support rows, query rows)."""
    import statsmodels.api as sm

    exog = sm.add_constant(Xz[rows], has_constant="add")
    exog_re = np.column_stack([np.ones(len(rows)), Xz[rows][:, z_cols]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.MixedLM(yz[rows], exog, groups[rows], exog_re=exog_re).fit(reml=True)
    beta = np.asarray(fit.fe_params)
    G = np.atleast_2d(np.asarray(fit.cov_re))
    sigma2 = float(fit.scale)
    G_inv = np.linalg.pinv(G)

    def predict(Xs, ys, Xq):
        Fs = np.column_stack([np.ones(len(Xs)), Xs])
        Fq = np.column_stack([np.ones(len(Xq)), Xq])
        Zs = np.column_stack([np.ones(len(Xs)), Xs[:, z_cols]])
        Zq = np.column_stack([np.ones(len(Xq)), Xq[:, z_cols]])
        b = np.linalg.solve(G_inv + Zs.T @ Zs / sigma2, Zs.T @ (ys - Fs @ beta) / sigma2)
        return Fq @ beta + Zq @ b

    return predict


def gpboost_intercept(Xz, yz, groups, rows):
    """GPBoost's predictor (trees + grouped random intercept), or None without gpboost."""
    try:
        import gpboost as gpb
    except ImportError:
        return None
    codes = np.unique(groups[rows], return_inverse=True)[1]
    gp_model = gpb.GPModel(group_data=codes, likelihood="gaussian")
    params = {"learning_rate": 0.05, "max_depth": 3, "min_data_in_leaf": 20, "verbose": -1}
    booster = gpb.train(params=params, train_set=gpb.Dataset(Xz[rows], yz[rows]),
                        gp_model=gp_model, num_boost_round=200)
    sigma2, tau2 = (float(v) for v in np.asarray(gp_model.get_cov_pars()).ravel()[:2])

    def fixed(Xq):
        out = booster.predict(data=Xq, group_data_pred=np.full(len(Xq), -1), pred_latent=True)
        return np.asarray(out["fixed_effect"])

    def predict(Xs, ys, Xq):
        shift = tau2 * float(np.sum(ys - fixed(Xs))) / (sigma2 + len(Xs) * tau2)
        return fixed(Xq) + shift

    return predict


def best_fine_tuning(predict, est, val_eps, Xz, yz) -> dict:
    """The ``FINE_TUNE_GRID`` entry with the lowest validation query MSE."""
    def loss(params):
        est.set_params(**params)
        try:
            return np.mean(score(predict, val_eps, Xz, yz))
        except DivergenceError:  # this rate is too large for some validation group
            return np.inf

    return min(FINE_TUNE_GRID, key=loss)


def per_group_ridge(alpha):
    def predict(Xs, ys, Xq):
        return Ridge(alpha=alpha).fit(Xs, ys).predict(Xq)

    return predict


def score(predict, eps, Xz, yz):
    """Query MSE of each episode (z units)."""
    return [float(np.mean((predict(Xz[s], yz[s], Xz[q]) - yz[q]) ** 2)) for s, q in eps]


# ---------------------------------------------------------------- one data set


def run_table(name, folder, seeds, algorithms, quick, params=None, blend=False):
    X, y, groups, features = load(folder, name)
    if blend:
        algorithms = [*algorithms, *(a for a in ("maml", "alpaca") if a not in algorithms)]
    z_cols = [features.index(SLOPE[name])]
    results: dict[tuple[int, str], list[float]] = {}
    times: dict[str, list[float]] = {}
    for seed in seeds:
        train, val, test = split(groups, seed)
        fit_rows = np.flatnonzero(np.isin(groups, np.concatenate([train, val])))
        tr_rows = np.flatnonzero(np.isin(groups, train))
        mean, std = X[tr_rows].mean(0), X[tr_rows].std(0)
        std[std == 0] = 1
        ym, ys = y[tr_rows].mean(), y[tr_rows].std()
        Xz, yz = (X - mean) / std, (y - ym) / ys
        estimators = {}
        rows_of = [("metafit", dict(params or {})), ("joint + fine-tune", {"algorithm": "joint"}),
                   *((f"metafit {a}", {"algorithm": a}) for a in algorithms)]
        for label, settings in rows_of:  # the defaults row first, with --params on top
            kw = {"random_state": seed, "verbose": 0, **settings}
            if quick:
                kw["meta_iterations"] = 50
            est = MetaInitializedRegressor(**kw)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    est.meta_fit(X[fit_rows], y[fit_rows], groups=groups[fit_rows])
                except DivergenceError:
                    # The estimator keeps the last finite state; count it and go on.
                    times.setdefault(f"{label}: diverged runs", []).append(1)
            times.setdefault(f"{label}: meta_fit s", []).append(time.perf_counter() - start)
            estimators[label] = est
        mixed = {
            "MixedLM intercept": blup_mixedlm(Xz, yz, groups, fit_rows, []),
            "MixedLM slope": blup_mixedlm(Xz, yz, groups, fit_rows, z_cols),
        }
        boosted = gpboost_intercept(Xz, yz, groups, fit_rows)
        if boosted is not None:
            mixed["GPBoost"] = boosted
        for k in KS.get(name, (5, 10)):
            eps = episodes(X, y, groups, test, k, seed)
            val_eps = episodes(X, y, groups, val, k, seed + 100)
            scored = dict(estimators)
            if blend:  # the two candidates of algorithm="auto", equal weights
                scored[BLEND] = (estimators["metafit maml"], estimators["metafit alpaca"])
            for label, est in scored.items():
                def predict(Xs, ys_, Xq, est=est, mean=mean, std=std, ym=ym, ys=ys):
                    # metafit takes the raw table's units: undo the benchmark's z-scores
                    members = est if isinstance(est, tuple) else (est,)
                    out = [m.fit(Xs * std + mean, ys_ * ys + ym).predict(Xq * std + mean)
                           for m in members]
                    return (np.mean(out, axis=0) - ym) / ys
                if label == "joint + fine-tune":
                    # Plain fine-tuning gets its rate and steps chosen on the validation
                    # groups: the baseline at its best, not at the meta-learners' values.
                    est.set_params(**best_fine_tuning(predict, est, val_eps, Xz, yz))
                start = time.perf_counter()
                results.setdefault((k, label), []).extend(score(predict, eps, Xz, yz))
                times.setdefault(f"{label}: fit+predict ms", []).append(
                    1000 * (time.perf_counter() - start) / max(len(eps), 1))
            support = np.concatenate([s for s, _ in eps])
            rows = np.concatenate([fit_rows, support])
            for label, model in (("pooled ridge", Ridge()),
                                 ("pooled HGB", HistGradientBoostingRegressor(random_state=0))):
                model.fit(Xz[rows], yz[rows])
                results.setdefault((k, label), []).extend(
                    score(lambda Xs, ys_, Xq, m=model: m.predict(Xq), eps, Xz, yz))
            best_alpha = min(ALPHAS, key=lambda a: np.mean(score(per_group_ridge(a), val_eps,
                                                                 Xz, yz)))
            results.setdefault((k, "per-group ridge"), []).extend(
                score(per_group_ridge(best_alpha), eps, Xz, yz))
            for label, predict in mixed.items():
                results.setdefault((k, label), []).extend(score(predict, eps, Xz, yz))
    return results, times


def report(name, results, times):
    anchors = ("pooled ridge", "pooled HGB", "per-group ridge", "MixedLM intercept",
               "MixedLM slope", "GPBoost", "joint + fine-tune")
    summary = []
    for k in sorted({k for k, _ in results}):
        print(f"\n{name}, k={k}: query MSE / var(y), mean ± s.e. over "
              f"{len(results[(k, 'pooled ridge')])} new groups")
        rows = {label: v for (kk, label), v in results.items() if kk == k}
        for label, v in sorted(rows.items(), key=lambda kv: np.mean(kv[1])):
            v = np.asarray(v)
            print(f"  {label:<22} {v.mean():.4f} ± {v.std(ddof=1) / np.sqrt(len(v)):.4f}")
        best = min((a for a in anchors if a in rows), key=lambda a: np.mean(rows[a]))
        summary.append((name, k, {r: np.mean(rows[r]) for r in ("metafit", BLEND) if r in rows},
                        best, np.mean(rows[best])))
    for key, v in times.items():
        if key.endswith("diverged runs"):
            print(f"  {key:<34} {len(v)} of the seeds (the last finite state is scored)")
        else:
            print(f"  {key:<34} {np.median(v):.2f} (median)")
    return summary


def coverage(folder, tables, seeds, noises=("per_task",)):
    """ALPACA's predictive intervals on new groups: the share of query points inside the
    68% and 95% intervals (mean ± 1 and ± 1.96 predictive standard deviations), for each
    of its noise models (``ALPACA(noise=...)``)."""
    print("\nALPACA's intervals on new groups (share of query points inside):")
    for name in tables:
        X, y, groups, _ = load(folder, name)
        inside = {}
        for seed in seeds:
            train, val, test = split(groups, seed)
            rows = np.flatnonzero(np.isin(groups, np.concatenate([train, val])))
            for noise in noises:
                est = MetaInitializedRegressor(algorithm=ALPACA(noise=noise),
                                               random_state=seed, verbose=0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est.meta_fit(X[rows], y[rows], groups=groups[rows])
                for k in KS.get(name, (5, 10)):
                    for s, q in episodes(X, y, groups, test, k, seed):
                        mean, std = est.fit(X[s], y[s]).predict(X[q], return_std=True)
                        z = np.abs(y[q] - mean) / std
                        inside.setdefault((noise, k, 68), []).extend(z < 1.0)
                        inside.setdefault((noise, k, 95), []).extend(z < 1.96)
        for noise in noises:
            label = f"{name} ({noise})" if len(noises) > 1 else name
            for k in KS.get(name, (5, 10)):
                print(f"  {label:<11} k={k:<3} 68%: {np.mean(inside[(noise, k, 68)]):.3f}   "
                      f"95%: {np.mean(inside[(noise, k, 95)]):.3f}   "
                      f"({len(inside[(noise, k, 95)])} points)")


def speed(algorithms=("auto", "maml", "alpaca", "lmm")):
    """Table mode's wall times on a synthetic 5,000-row table of 100 groups, 5 columns:
    meta_fit with the defaults (algorithm="auto": MAML, ALPACA and lmm meta-trained) and
    with each algorithm alone, fit of one group's 10 rows, predict of 100 rows."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), 50)
    X = rng.normal(size=(5000, 5))
    y = rng.normal(size=100)[groups] + X @ rng.normal(size=5) + 0.3 * rng.normal(size=5000)
    print("\ntable mode on 5,000 rows, 100 groups, 5 columns (defaults, 1000 meta-iterations):")
    for algo in algorithms:
        est = MetaInitializedRegressor(algorithm=algo, random_state=0, verbose=0)
        start = time.perf_counter()
        est.meta_fit(X, y, groups=groups)
        took = time.perf_counter() - start
        fits, predicts = [], []
        for i in range(200):
            rows = np.flatnonzero(groups == i % 100)
            t0 = time.perf_counter()
            est.fit(X[rows[:10]], y[rows[:10]])
            t1 = time.perf_counter()
            est.predict(X[:100])
            predicts.append(time.perf_counter() - t1)
            fits.append(t1 - t0)
        label = f"auto ({est.algorithm_})" if algo == "auto" else algo
        print(f"  {label:<15} meta_fit {took:6.1f} s   fit (10 rows) "
              f"{1000 * np.median(fits):.3f} ms"
              f"   predict (100 rows) {1000 * np.median(predicts):.3f} ms  (medians of 200)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of the CSV files (default: see above)")
    parser.add_argument("--tables", nargs="+", default=list(SLOPE))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--algorithms", nargs="*", default=[],
                        help="more metafit algorithms to run besides maml and joint")
    parser.add_argument("--quick", action="store_true", help="50 meta-iterations (smoke)")
    parser.add_argument("--params", default="{}",
                        help='estimator parameters of the "metafit" row, as JSON, e.g. '
                             '\'{"algorithm": "maml", "hidden_sizes": [64, 64]}\'')
    parser.add_argument("--blend", action="store_true",
                        help="also the equal-weight mean of MAML's and ALPACA's predictions "
                             '(the two candidates of algorithm="auto", which weighs them by '
                             'their validation MSEs), with their rows')
    parser.add_argument("--speed", action="store_true",
                        help="only the wall times of table mode on a synthetic table")
    parser.add_argument("--coverage", action="store_true",
                        help="only ALPACA's interval coverage on the tables' new groups")
    parser.add_argument("--noise", nargs="+", default=["per_task"],
                        choices=["per_task", "shared"],
                        help="ALPACA's noise models for --coverage (default: per_task)")
    args = parser.parse_args(argv)
    if args.speed:
        speed()
        return
    folder = data_dir(args.data)
    if not folder.is_dir():
        raise SystemExit(f"no data folder {folder}: pass --data or set METAFIT_DATA")
    if args.coverage:
        coverage(folder, args.tables, range(args.seeds), args.noise)
        return
    summary = []
    for name in args.tables:
        results, times = run_table(name, folder, range(args.seeds), args.algorithms,
                                   args.quick, params=json.loads(args.params),
                                   blend=args.blend)
        summary += report(name, results, times)
    for row in ("metafit", BLEND):
        if row not in summary[0][2]:
            continue
        what = "metafit's defaults" if row == "metafit" else f"{row!r} (--blend)"
        print(f"\n{what} against the best anchor of each data set and k:")
        ratios = []
        for name, k, ours, best, theirs in summary:
            ratios.append(ours[row] / theirs)
            print(f"  {name:<11} k={k:<3} metafit {ours[row]:.4f}  best anchor {best} "
                  f"{theirs:.4f}  ({100 * (ours[row] / theirs - 1):+.1f}%)")
        print(f"  mean ratio {np.mean(ratios):.4f} ({100 * (np.mean(ratios) - 1):+.1f}%)")


if __name__ == "__main__":
    main()
