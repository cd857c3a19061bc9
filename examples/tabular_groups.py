"""Few-shot regression on an ordinary table with a group column: real school data.

The High School and Beyond survey (R package nlme, ``MathAchieve``): 7,185 pupils in 160
schools, each row a pupil's math score with their socio-economic status, sex, minority
status and the school's mean SES. Every school differs by its own level and slopes; a new
school has scores for only a handful of pupils. ``meta_fit(X, y, groups=school)`` learns
from the old schools how to start (episodes drawn anew every meta-batch, standardization
and held-out validation schools inside); ``fit`` then adapts to a new school from 5
pupils. We compare on 32 new schools with one pooled model for all schools, a ridge per
school, and the same network pretrained jointly on all pupils and fine-tuned
(``algorithm="joint"``).

The data are read from ``--data`` or ``$METAFIT_DATA/grouped`` (default
``../shared/data/grouped`` beside the repository); without them, a synthetic table of
stores takes their place.

Run::

    python examples/tabular_groups.py          # about 20 s on 2 CPU cores
    python examples/tabular_groups.py --quick  # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge

from metafit import MetaInitializedRegressor


def find_table(data: str | None) -> Path | None:
    folder = Path(data) if data else (
        Path(os.environ["METAFIT_DATA"]) / "grouped" if os.environ.get("METAFIT_DATA")
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "grouped"
    )
    path = folder / "mathach.csv"
    return path if path.is_file() else None


def synthetic_stores(n_stores: int = 160, weeks: int = 30, seed: int = 0) -> pd.DataFrame:
    """Weekly sales of stores that react each in their own way to price and promotions."""
    rng = np.random.default_rng(seed)
    frames = []
    for store in range(n_stores):
        price, promo = rng.uniform(1, 4, weeks), (rng.random(weeks) < 0.3).astype(float)
        sales = (rng.uniform(50, 150) - rng.uniform(5, 25) * price
                 + rng.uniform(0, 40) * promo + rng.normal(0, 3, weeks))
        frames.append(pd.DataFrame({"store": store, "price": price, "promo": promo,
                                    "sales": sales}))
    return pd.concat(frames, ignore_index=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    parser.add_argument("--data", help="folder holding mathach.csv")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("METAFIT_EXAMPLE_QUICK") == "1"
    path = find_table(args.data)
    if path is not None:
        table, group, target = pd.read_csv(path), "school", "mathach"
        print(f"High School and Beyond: {len(table)} pupils in "
              f"{table.school.nunique()} schools")
    else:
        table, group, target = synthetic_stores(), "store", "sales"
        print(f"no mathach.csv found: a synthetic table of {table.store.nunique()} stores")
    features = [c for c in table.columns if c not in (group, target)]
    names = table[group].unique()
    new_names = np.random.default_rng(0).permutation(names)[: len(names) // 5]
    old, new = table[~table[group].isin(new_names)], table[table[group].isin(new_names)]

    kwargs = {"random_state": 0, "meta_iterations": 30 if quick else 1000}
    est = MetaInitializedRegressor(**kwargs)
    est.meta_fit(old[features], old[target], groups=old[group])
    joint = MetaInitializedRegressor(algorithm="joint", **kwargs)
    joint.meta_fit(old[features], old[target], groups=old[group])
    pooled = Ridge().fit(old[features], old[target])

    shots = 5
    errors = {"metafit (meta-learned)": [], "pretrained jointly + fit": [],
              "one pooled ridge": [], "ridge per group": []}
    for _, rows in new.groupby(group):
        rows = rows.sample(frac=1.0, random_state=0)
        known, rest = rows.iloc[:shots], rows.iloc[shots:]
        Xk, yk, Xr = known[features], known[target], rest[features]
        predictions = {
            "metafit (meta-learned)": est.fit(Xk, yk).predict(Xr),
            "pretrained jointly + fit": joint.fit(Xk, yk).predict(Xr),
            "one pooled ridge": pooled.predict(Xr),
            "ridge per group": Ridge(alpha=10.0).fit(Xk, yk).predict(Xr),
        }
        for name, pred in predictions.items():
            errors[name].append(np.mean((pred - rest[target].to_numpy()) ** 2))

    print(f"{target} MSE on {len(new_names)} new groups, {shots} rows known each "
          f"(the target's variance is {old[target].var():.1f}):")
    result = {}
    for name, errs in errors.items():
        result[name] = float(np.mean(errs))
        print(f"  {name:26s} {result[name]:8.2f}")
    return result


if __name__ == "__main__":
    main()
