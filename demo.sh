#!/usr/bin/env bash
# The embedded default, end to end on a fresh machine: install into .venv, tune search_spaces/demo.yaml (the tiny
# LLaVA shipped in the package, on the bundled offline task) into demo.db, confirm the Pareto front (re-measured
# latency, accuracy on a fresh subset) and print it.
#   ./demo.sh [extra `dart-tuner tune` options, e.g. --trials 40]
# A failed tune ends the script with its exit code (set -e), before the "Next:" lines.
set -euo pipefail
cd "$(dirname "$0")"
venv=${DART_TUNER_VENV:-.venv}                          # CI points these two at its own environment
storage=${DART_TUNER_DEMO_STORAGE:-sqlite:///demo.db}   # and storage
bash .ci/setup-venv "$venv" eval,dashboard
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing here needs the network
"$venv/bin/dart-tuner" tune --space search_spaces/demo.yaml --storage "$storage" "$@"
echo
echo "Stored in $storage. Next:"
echo "  $venv/bin/dart-tuner dashboard --storage $storage      # look at it, choose a point"
echo "  $venv/bin/dart-tuner export --study demo --storage $storage --min-relative-accuracy 0.95 -o preset.yaml"
