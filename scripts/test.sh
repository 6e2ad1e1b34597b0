#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests, which start moto and s3s-fs on loopback
# and run the built `lifeboat` binary (and the Lambda's `bootstrap`) against them, check the
# systemd unit, the deployment template and the packages. Installs what is missing first, and
# builds the .deb and .rpm the package tests inspect (scripts/package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/package.sh
exec cargo test --workspace --all-targets "$@"
