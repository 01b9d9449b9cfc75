#!/usr/bin/env bash
# The embedded default, end to end on a fresh machine: install into .venv, tune search_spaces/demo.yaml (the tiny
# LLaVA shipped in the package, on the bundled offline task) into demo.db, and print the Pareto front.
#   ./demo.sh [extra `dart-tuner tune` options, e.g. --trials 40]
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/setup-venv .venv eval,dashboard
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing here needs the network
.venv/bin/dart-tuner tune --space search_spaces/demo.yaml --storage sqlite:///demo.db "$@"
echo
echo "Stored in demo.db. Next:"
echo "  .venv/bin/dart-tuner dashboard --storage sqlite:///demo.db      # look at it, choose a point"
echo "  .venv/bin/dart-tuner export --study demo --storage sqlite:///demo.db --min-relative-accuracy 0.95 -o preset.yaml"
