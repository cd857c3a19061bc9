#!/usr/bin/env bash
# Many workers, one study: several `metafit tune` processes share one Optuna storage and
# split the trials between them. Each worker gets its own sampler seed; all adapt from the
# same saved initialization, so their trials are comparable.
#
# On one machine a journal file is enough (below). Across machines use a database every
# machine can reach, and a heartbeat so that trials of a killed worker are retried:
#
#   export METAFIT_STORAGE=postgresql://user:password@db-host/metafit
#   metafit tune examples/sinusoid.yaml --init shared/sinusoid.safetensors \
#       --seed $RANDOM --heartbeat 60          # on every machine, as many as you like
#
# Run:
#   bash examples/many_workers.sh                           # a minute or two on 2 cores
#   METAFIT_EXAMPLE_QUICK=1 bash examples/many_workers.sh   # a few seconds (CI)
#   bash examples/many_workers.sh --quick
# Files go to $EXAMPLE_WORKDIR (default: a new temporary folder).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${EXAMPLE_WORKDIR:-$(mktemp -d)}
CONFIG=$HERE/sinusoid.yaml
WORKERS=4
TRIALS=10  # per worker
if [[ "${METAFIT_EXAMPLE_QUICK:-}" == 1 || "${1:-}" == --quick ]]; then
    CONFIG=$HERE/sinusoid_quick.yaml  # same study, tiny budget
    WORKERS=2
    TRIALS=2
fi
STORAGE=journal:$WORK/study.journal
INIT=$WORK/sinusoid.safetensors

echo "== one initialization for all workers"
metafit meta-fit "$CONFIG" -o "$INIT"

echo "== $WORKERS workers x $TRIALS trials on one study"
pids=()
for seed in $(seq 1 "$WORKERS"); do
    metafit tune "$CONFIG" --init "$INIT" --storage "$STORAGE" --study-name shared \
        --n-trials "$TRIALS" --seed "$seed" >"$WORK/worker$seed.out" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
if [[ $status -ne 0 ]]; then
    tail -n 20 "$WORK"/worker*.out
    exit "$status"
fi

echo "== the study after all workers"
metafit best --storage "$STORAGE" --study-name shared --json
