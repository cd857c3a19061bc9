#!/usr/bin/env bash
# Tuning from the command line: meta-train once, tune the adaptation in a SQLite study,
# print the best trial, score it on held-out test tasks, and plot the study.
#
# The config (examples/sinusoid.yaml) says which tasks, estimator and search space; see
# docs/tuning.md for every key. The study lives in a database file, so running the tune
# line again resumes it, and other workers can join it (examples/many_workers.sh).
#
# Run:
#   bash examples/cli_tuning.sh                            # a minute or two on 2 CPU cores
#   METAFIT_EXAMPLE_QUICK=1 bash examples/cli_tuning.sh    # a few seconds (CI)
#   bash examples/cli_tuning.sh --quick
# Files go to $EXAMPLE_WORKDIR (default: a new temporary folder).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${EXAMPLE_WORKDIR:-$(mktemp -d)}
CONFIG=$HERE/sinusoid.yaml
TRIALS=30
if [[ "${METAFIT_EXAMPLE_QUICK:-}" == 1 || "${1:-}" == --quick ]]; then
    CONFIG=$HERE/sinusoid_quick.yaml  # same study, tiny budget
    TRIALS=3
fi
STORAGE=sqlite:///$WORK/study.db
INIT=$WORK/sinusoid.safetensors

echo "== meta-train once and save the initialization"
metafit meta-fit "$CONFIG" -o "$INIT"

echo "== tune inner_lr and inner_steps of the saved initialization ($TRIALS trials)"
metafit tune "$CONFIG" --init "$INIT" --storage "$STORAGE" --study-name sinusoid \
    --n-trials "$TRIALS"

echo "== best trial"
metafit best --storage "$STORAGE" --study-name sinusoid

echo "== test tasks: the config's parameters vs the study's best"
metafit evaluate "$CONFIG" --init "$INIT" --storage "$STORAGE" --study-name sinusoid

echo "== figures of the study"
metafit report --storage "$STORAGE" --study-name sinusoid -o "$WORK/report"
ls "$WORK/report"
