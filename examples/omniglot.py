"""Few-shot image classification on Omniglot: 5-way 1-shot with MAML and a Conv4 network.

Each task shows one image of each of 5 handwritten characters never seen in training and
asks to classify 15 more images of each. The data are read from ``--data`` (default
``$METAFIT_DATA``, then this repository's ``../shared/data``; see docs/datasets.md).
Without Omniglot the script falls back to scikit-learn's 8x8 digits (5-way tasks over
digits 5-9, meta-trained on 0-4) with an MLP, so that it always runs.

Run::

    python examples/omniglot.py                 # first-order MAML; long on a CPU, use --device cuda
    python examples/omniglot.py --device cuda --algorithm maml --iterations 5000
    python examples/omniglot.py --quick         # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from metafit import MetaInitializedClassifier

#: The data folder beside this repository (the project's layout, not a user's).
REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_tasks(data, n_way, k_shot, image_size, quick):
    """(train stream, validation tasks, test tasks, module kwargs) for Omniglot or digits."""
    try:
        from metafit.datasets import omniglot_tasks
        from metafit.models import Conv4

        common = dict(n_way=n_way, k_shot=k_shot, k_query=15, image_size=image_size, path=data)
        train = omniglot_tasks("train", random_state=0, **common)
        val = omniglot_tasks("val", random_state=1, **common).sample(5 if quick else 50)
        test = omniglot_tasks("test", random_state=2, **common).sample(5 if quick else 200)
        module = dict(
            module=Conv4,
            module__input_shape=(1, image_size, image_size),
            module__hidden_channels=16 if quick else 64,
        )
        return "Omniglot", train, val, test, module
    except (FileNotFoundError, ImportError) as exc:
        print(f"Omniglot unavailable ({exc}); using scikit-learn's digits instead.")
        from metafit.datasets import load_digits_tasks

        train = load_digits_tasks(n_way, k_shot, 15, split="train", random_state=0)
        test_stream = load_digits_tasks(n_way, k_shot, 15, split="test", random_state=2)
        tasks = test_stream.sample(10 if quick else 250)
        return (
            "digits",
            train,
            tasks[: 5 if quick else 50],
            tasks[5 if quick else 50 :],
            {"hidden_sizes": (64, 64)},
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    parser.add_argument(
        "--data", default=os.environ.get("METAFIT_DATA", str(REPO_DATA)),
        help="folder with the Omniglot files (default: $METAFIT_DATA, else this "
        "repository's ../shared/data)",
    )
    parser.add_argument("--algorithm", default="fomaml", help="maml, fomaml, anil, reptile...")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default=None, help="write the meta-init here every 100")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("METAFIT_EXAMPLE_QUICK") == "1"
    n_way, k_shot = 5, 1

    name, train, val, test, module = load_tasks(
        args.data, n_way, k_shot, image_size=14 if quick else 28, quick=quick
    )
    est = MetaInitializedClassifier(
        **module,
        algorithm=args.algorithm,
        inner_lr=0.4,  # the MAML paper's Omniglot step size
        inner_steps=3,
        meta_inner_steps=1,
        meta_batch_size=2 if quick else 32,
        meta_iterations=3 if quick else args.iterations,
        validation_interval=100,
        patience=None if quick else 10,  # stop after 10 validations without progress
        checkpoint_path=args.checkpoint,
        device=args.device,
        verbose=0 if quick else 1,
        random_state=0,
    )
    est.meta_fit(train, validation_tasks=val)

    accuracy = [est.fit(t.X_support, t.y_support).score(t.X_query, t.y_query) for t in test]
    mean = float(np.mean(accuracy))
    half = 1.96 * float(np.std(accuracy)) / np.sqrt(len(accuracy))
    print(
        f"{name} {n_way}-way {k_shot}-shot, {args.algorithm}, "
        f"{len(est.meta_history_)} meta-iterations: test accuracy {mean:.1%} +- {half:.1%} "
        f"over {len(test)} tasks (chance {1 / n_way:.0%})"
    )
    return {"dataset": name, "accuracy": mean}


if __name__ == "__main__":
    main()
