#!/usr/bin/env bash
# Idle cost of the daemon: `lifeboat run` (release build) polling the IMDSv2 emulator at the
# default interval (5 s) for DURATION seconds (default 600; the daemon gives back its start-up
# pages after 30 s), then its RSS (anonymous and file-backed) and CPU time.
# SHOW_LOG=1 prints the daemon's log (LIFEBOAT_LOG=lifeboat=debug for more); SMAPS=FILE keeps
# its /proc/PID/smaps.
# Targets: peak RSS at most 10 MiB, CPU at most 0.05 s per minute.
#   DURATION=120 scripts/bench-idle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
DURATION=${DURATION:-600}
# LIFEBOAT_BIN=PATH measures that binary instead (an A/B comparison in one session).
if [ -z "${LIFEBOAT_BIN:-}" ]; then
  cargo build --release --quiet --bin lifeboat
fi
LIFEBOAT=${LIFEBOAT_BIN:-target/release/lifeboat}
work=$(mktemp -d /tmp/lifeboat-idle.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/python tests/emulators/imds.py --port "$port" >"$work/imds.log" 2>&1 &
imds_pid=$!
daemon_pid=
trap 'kill $imds_pid $daemon_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 500); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.01; done
printf '[s3]\nbucket = "idle-bench"\n' >"$work/lifeboat.toml"
AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$port" AWS_REGION=us-east-1 \
AWS_ACCESS_KEY_ID=idle AWS_SECRET_ACCESS_KEY=idle AWS_ENDPOINT_URL=http://127.0.0.1:9 \
RUNTIME_DIRECTORY="$work/run" STATE_DIRECTORY="$work/state" \
  "$LIFEBOAT" --config "$work/lifeboat.toml" run >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 500); do [ -S "$work/run/control.sock" ] && break; sleep 0.01; done
ticks=$(getconf CLK_TCK)
cpu() { awk -v t="$ticks" '{printf "%.3f", ($14 + $15) / t}' "/proc/$daemon_pid/stat"; }
start_cpu=$(cpu)
sleep "$DURATION"
end_cpu=$(cpu)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$daemon_pid/status")
split=$(awk '/RssAnon|RssFile|RssShmem/ {printf "%s %.1f MiB  ", $1, $2 / 1024}' "/proc/$daemon_pid/status")
threads=$(awk '/Threads/ {print $2}' "/proc/$daemon_pid/status")
echo "resident now: $split($threads threads)"
# SMAPS=FILE keeps the daemon's /proc/PID/smaps (which mappings hold the resident pages).
[ -z "${SMAPS:-}" ] || cp "/proc/$daemon_pid/smaps" "$SMAPS"
[ -z "${SHOW_LOG:-}" ] || cat "$work/daemon.log"
python3 - "$DURATION" "$start_cpu" "$end_cpu" "$hwm" "$rss" <<'PY'
import sys
duration, c0, c1, hwm, rss = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
per_min = (c1 - c0) / (duration / 60)
print(f"idle daemon over {duration:.0f} s at the default 5 s poll interval:")
print(f"  RSS while idle {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB, during start-up)   target <= 10 MiB")
print(f"  CPU {c1 - c0:.3f} s after start-up, {per_min:.4f} s per minute   target <= 0.05 s/min")
PY
