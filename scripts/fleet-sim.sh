#!/usr/bin/env bash
# Fleet simulation: N instances (default 1,000), each a real `lifeboat run` daemon with its own
# instance metadata, terminated by one scale-in against token-bucket-limited AWS APIs on
# loopback; prints a report (tests/tools/fleet_sim.py has the rates and where they come from).
#
#   scripts/fleet-sim.sh                      N = 1,000 at the default rates
#   scripts/fleet-sim.sh --n 200              a smaller fleet
#   scripts/fleet-sim.sh --as-rate 10 --as-burst 20 --send-rate 2.5 --list-rate 5
#                                             rates halved
#   scripts/fleet-sim.sh --path run-command   the Run Command path: the companion Lambda (20 at
#                                             once) sends the SSM document, the agent stand-in
#                                             runs `lifeboat backup` on each instance
#   LIFEBOAT_BIN=PATH scripts/fleet-sim.sh    another build (LIFEBOAT_BOOTSTRAP: another Lambda)
#
# Needs about 8 GiB of memory for 1,000 daemons (they share the binary's pages) and a few
# minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ -z "${LIFEBOAT_BIN:-}" ] || [ -z "${LIFEBOAT_BOOTSTRAP:-}" ]; then
  cargo build --release --quiet -p lifeboat --bin lifeboat -p lifeboat-lambda --bin bootstrap
fi
bin=${LIFEBOAT_BIN:-$PWD/target/release/lifeboat}
bootstrap=${LIFEBOAT_BOOTSTRAP:-$PWD/target/release/bootstrap}
# A thousand daemons each keep a few files and sockets open: raise the soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec .venv/bin/python tests/tools/fleet_sim.py --lifeboat "$bin" --bootstrap "$bootstrap" --workdir "$PWD/.bench/fleet" "$@"
