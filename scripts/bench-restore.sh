#!/usr/bin/env bash
# Benchmark: `lifeboat restore` throughput, verified (against the manifest) and unverified
# (--force-unverified), from s3s-fs on loopback into a tmpfs, so the disk is not what is measured.
#
#   scripts/bench-restore.sh [TREE]     TREE defaults to this machine's Python standard library
#   RUNS=7 scripts/bench-restore.sh     restores per mode (default 5); medians are printed
#   LIFEBOAT_BIN=PATH scripts/bench-restore.sh   restore with that binary (an A/B comparison:
#                                       the archive is always written by this checkout's build)
#   COMPRESSION=none scripts/bench-restore.sh    the archive's compression (default gzip)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/bootstrap.sh
RUNS=${RUNS:-5}
COMPRESSION=${COMPRESSION:-gzip}

log() { printf 'bench-restore: %s\n' "$*" >&2; }

cargo build --release --quiet --bin lifeboat
WRITER=$root/target/release/lifeboat
READER=${LIFEBOAT_BIN:-$WRITER}

TREE=${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
TREE=$(cd "$TREE" && pwd -P)
work=$root/.bench
rm -rf "$work/s3" && mkdir -p "$work/s3/bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.tools/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" \
  >"$work/s3s-fs.log" 2>&1 &
s3_pid=$!
shm=$(mktemp -d /dev/shm/lifeboat-restore-bench.XXXXXX)
trap 'kill $s3_pid 2>/dev/null || true; rm -rf "$shm"' EXIT
for _ in $(seq 1 500); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.01
done

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:9
cat >"$work/restore.toml" <<TOML
[backup]
paths = ["$TREE"]
compression = "$COMPRESSION"
[s3]
bucket = "bench"
prefix = "lifeboat/"
TOML
export LIFEBOAT_CONFIG=$work/restore.toml RUNTIME_DIRECTORY=$work/run STATE_DIRECTORY=$work/state

key=$("$WRITER" backup --reason bench | sed -n 's/.*s3:\/\/bench\/\([^ ]*\).*/\1/p' | head -1)
[ -n "$key" ] || { log "the backup printed no key"; exit 1; }
bytes=$(du -s --apparent-size -B1 "$TREE" | cut -f1)
files=$(find "$TREE" -type f | wc -l)
log "archive $key: $files files, $((bytes / 1000000)) MB of input; restoring with $READER"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in verified unverified; do
  walls=()
  for _ in $(seq 1 "$RUNS"); do
    rm -rf "$shm/target"
    flags=()
    [ "$mode" = unverified ] && flags=(--force-unverified)
    start=$(date +%s.%N)
    "$READER" restore --key "$key" --to "$shm/target" "${flags[@]}" >/dev/null
    end=$(date +%s.%N)
    walls+=("$(echo "$end - $start" | bc)")
  done
  wall=$(printf '%s\n' "${walls[@]}" | median)
  printf '%-11s median %6.2f s  %7.1f MB/s  (runs: %s)\n' "$mode" "$wall" \
    "$(echo "$bytes / 1000000 / $wall" | bc -l)" "${walls[*]}"
done
