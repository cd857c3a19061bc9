"""Real grouped tables as classification: the classifier's table mode against a
mixed-effects logistic model and pooled classifiers.

The tables of ``$METAFIT_DATA/grouped`` hold real targets; each is made a two-class
problem, "above the meta-training rows' median" (a pupil above the median score, a home
above the median radon level). Splits, seeds, support sizes and episodes are those of
``grouped_tables.py`` (60/20/20 of the groups; k = 5 and 10, 3 and 5 for sleepstudy).
Each test group shows k support rows (often of one class only) and is scored on its
other rows: accuracy, and log loss (lower is better). Methods, all given the same rows:

* ``metafit``: ``MetaInitializedClassifier(random_state=seed)`` in table mode, its
  defaults (it holds out its own validation groups), the table's labels and units;
* ``metafit <algorithm>``: the same with another ``algorithm=`` (``--algorithms``);
* ``pooled logistic`` / ``pooled HGB``: one LogisticRegression /
  HistGradientBoostingClassifier on all rows, the new group's support rows included;
* ``GLMM intercept``: statsmodels' Bayesian mixed logistic model with a random
  intercept per group (``BinomialBayesMixedGLM.fit_vb``) on the meta-training and
  validation rows; a new group's intercept is its posterior mode given its support
  rows, at the fitted random-effect scale.

Usage::

    python benchmarks/grouped_classification.py                 # all tables, ~10 min
    python benchmarks/grouped_classification.py --tables radon --seeds 1 --quick
    python benchmarks/grouped_classification.py --algorithms anil fomaml  # more rows

Needs statsmodels (``pip install -e ".[bench]"``). Prints one table per data set and k
(mean ± standard error over the test groups of all seeds) and a summary against the
best anchor of each cell: the ratio of log losses (below 1: metafit better) and the
difference of accuracies (above 0: metafit better).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grouped_tables import KS, data_dir, episodes, load, split  # noqa: E402

from metafit import MetaInitializedClassifier  # noqa: E402

TABLES = ("mathach", "nlschools", "radon", "sleepstudy", "produc")
ANCHORS = ("pooled logistic", "pooled HGB", "GLMM intercept")
EPS = 1e-6


def glmm_intercept(Xz, labels, groups, rows):
    """A random-intercept logistic model's predictor: predict(Xs, ys, Xq) -> P(y=1)."""
    import pandas as pd
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    codes = pd.factorize(groups[rows])[0]
    exog = np.column_stack([np.ones(len(rows)), Xz[rows]])
    exog_vc = np.eye(codes.max() + 1)[codes]
    model = BinomialBayesMixedGLM(labels[rows].astype(float), exog, exog_vc,
                                  ident=np.zeros(exog_vc.shape[1], dtype=int))
    fitted = model.fit_vb()
    beta, scale = fitted.fe_mean, float(np.exp(fitted.vcp_mean[0]))

    def predict(Xs, ys, Xq):
        fs = beta[0] + Xs @ beta[1:]

        def objective(b):  # negative log posterior of the new group's intercept
            p = np.clip(expit(fs + b), EPS, 1 - EPS)
            return -np.sum(ys * np.log(p) + (1 - ys) * np.log(1 - p)) + b * b / (2 * scale**2)

        b = minimize_scalar(objective, bounds=(-10 * scale, 10 * scale), method="bounded").x
        return expit(beta[0] + Xq @ beta[1:] + b)

    return predict


def scores(predict, eps, Xz, labels):
    """(accuracy, log loss) of each episode."""
    out = []
    for s, q in eps:
        p = np.clip(predict(Xz[s], labels[s], Xz[q]), EPS, 1 - EPS)
        yq = labels[q]
        out.append((float(np.mean((p > 0.5) == yq)),
                    float(-np.mean(yq * np.log(p) + (1 - yq) * np.log(1 - p)))))
    return out


def run_table(name, folder, seeds, quick, algorithms=()):
    X, y, groups, _ = load(folder, name)
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for seed in seeds:
        train, val, test = split(groups, seed)
        fit_rows = np.flatnonzero(np.isin(groups, np.concatenate([train, val])))
        tr_rows = np.flatnonzero(np.isin(groups, train))
        labels = (y > np.median(y[tr_rows])).astype(int)
        mean, std = X[tr_rows].mean(0), X[tr_rows].std(0)
        std[std == 0] = 1
        Xz = (X - mean) / std
        kw = {"random_state": seed, "verbose": 0, **({"meta_iterations": 50} if quick else {})}
        estimators = {}
        for label, settings in [("metafit", {}),
                                *((f"metafit {a}", {"algorithm": a}) for a in algorithms)]:
            est = MetaInitializedClassifier(**kw, **settings)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.meta_fit(X[fit_rows], labels[fit_rows], groups=groups[fit_rows])
            estimators[label] = est
        glmm = glmm_intercept(Xz, labels, groups, fit_rows)
        for k in KS.get(name, (5, 10)):
            eps = episodes(X, y, groups, test, k, seed)

            for label, est in estimators.items():
                def metafit(Xs, ys, Xq, est=est, mean=mean, std=std):  # the table's units
                    est.fit(Xs * std + mean, ys)
                    return est.predict_proba(Xq * std + mean)[:, list(est.classes_).index(1)]

                results.setdefault((k, label), []).extend(scores(metafit, eps, Xz, labels))
            results.setdefault((k, "GLMM intercept"), []).extend(
                scores(glmm, eps, Xz, labels))
            rows = np.concatenate([fit_rows, *(s for s, _ in eps)])
            for label, model in (("pooled logistic", LogisticRegression()),
                                 ("pooled HGB", HistGradientBoostingClassifier(random_state=0))):
                model.fit(Xz[rows], labels[rows])
                results.setdefault((k, label), []).extend(
                    scores(lambda Xs, ys, Xq, m=model: m.predict_proba(Xq)[:, 1], eps, Xz,
                           labels))
    return results


def report(name, results) -> list[tuple]:
    """Print the table of one data set; return, per k, (table, k, metafit's and the best
    anchor's log loss, metafit's and the best anchor's accuracy)."""
    summary = []
    for k in sorted({k for k, _ in results}):
        print(f"\n{name}, k={k}: accuracy (higher is better), log loss (lower is better)")
        print(f"  {'method':<18} {'accuracy':>16} {'log loss':>16}")
        means = {}
        ours = [label for _, label in results if label.startswith("metafit")]
        for label in (*dict.fromkeys(ours), *ANCHORS):
            a = np.asarray(results[(k, label)])
            se = a.std(0, ddof=1) / np.sqrt(len(a))
            means[label] = a.mean(0)
            print(f"  {label:<18} {a[:, 0].mean():>8.3f} ± {se[0]:.3f} "
                  f"{a[:, 1].mean():>8.3f} ± {se[1]:.3f}")
        summary.append((name, k, means["metafit"][1], min(means[a][1] for a in ANCHORS),
                        means["metafit"][0], max(means[a][0] for a in ANCHORS)))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of the tables (default: $METAFIT_DATA/grouped)")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 meta-iterations")
    parser.add_argument("--algorithms", nargs="*", default=[],
                        help="more metafit rows, one per algorithm= (e.g. anil fomaml)")
    args = parser.parse_args(argv)
    folder = data_dir(args.data)
    summary = []
    for name in args.tables:
        summary += report(name, run_table(name, folder, range(args.seeds), args.quick,
                                          args.algorithms))
    print("\nsummary: metafit against the best anchor of each cell")
    print(f"  {'table':<11} {'k':<4} {'log loss ratio':>15} {'accuracy difference':>20}")
    for name, k, ours, best, acc, best_acc in summary:
        print(f"  {name:<11} {k:<4} {ours / best:>15.3f} {acc - best_acc:>+20.3f}")
    ratios = [row[2] / row[3] for row in summary]
    print(f"  log loss ratio: mean {np.mean(ratios):.3f}, median {np.median(ratios):.3f}; "
          f"accuracy difference: mean {np.mean([r[4] - r[5] for r in summary]):+.3f}")


if __name__ == "__main__":
    main()
