#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests, which start moto and s3s-fs on loopback
# and run the built `lifeboat` binary against them. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec cargo test --workspace --all-targets "$@"
