#!/usr/bin/env bash
# Companion Lambda figures: bootstrap.zip size, cold-start init time and per-event handler time
# under the local Runtime API against moto on loopback, as medians.
#   RUNS=10 WARM=20 scripts/bench-lambda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/build-lambda.sh
.venv/bin/python scripts/bench_lambda.py target/lambda/lifeboat-lambda/bootstrap "${RUNS:-10}" "${WARM:-20}"
