#!/usr/bin/env bash
# Benchmark: `lifeboat restore` (verified against the manifest, and --force-unverified) against
# `aws s3 cp s3://… - | tar x…f -`, the same archive from s3s-fs on loopback into a tmpfs, so the
# disk is not what is measured; wall time and peak RSS (GNU time's maximum resident set of the
# largest process), medians, and the ratio.
#
#   scripts/bench-restore.sh [TREE]     TREE defaults to this machine's Python standard library
#   RUNS=7 scripts/bench-restore.sh     restores per contender (default 5); medians are printed
#   LIFEBOAT_BIN=PATH scripts/bench-restore.sh   restore with that binary (an A/B comparison:
#                                       the archive is always written by this checkout's build)
#   COMPRESSION=zstd scripts/bench-restore.sh    the archive's compression (gzip, the default,
#                                       zstd or none)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/bootstrap.sh
RUNS=${RUNS:-5}
COMPRESSION=${COMPRESSION:-gzip}

log() { printf 'bench-restore: %s\n' "$*" >&2; }

# shellcheck source=scripts/bench-tools.sh
. scripts/bench-tools.sh

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
trap 'kill $s3_pid 2>/dev/null || true; rm -rf "$shm" "$work/s3"' EXIT
for _ in $(seq 1 500); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.01
done

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
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
case $COMPRESSION in
  gzip) untar="tar xzf -" ;;
  zstd) untar="tar --zstd -xf -" ;;
  *) untar="tar xf -" ;;
esac
# run NAME COMMAND: RUNS restores into an empty target; prints medians, keeps the wall time.
run() {
  local name=$1 cmd=$2 walls=() rss=()
  for _ in $(seq 1 "$RUNS"); do
    rm -rf "$shm/target" && mkdir -p "$shm/target"
    /usr/bin/time -f '%e %M' -o "$work/time.out" bash -c "$cmd" >/dev/null 2>"$work/err.out" || {
      log "$name failed:"; cat "$work/err.out" >&2; exit 1; }
    read -r wall kib <"$work/time.out"
    walls+=("$wall"); rss+=("$kib")
  done
  wall=$(printf '%s\n' "${walls[@]}" | median)
  echo "$wall" >"$work/restore-wall.${name//[^a-zA-Z0-9]/_}"
  printf '%-36s %6.2f s %7.1f MB/s %6.1f MiB  (runs: %s)\n' "$name" "$wall" \
    "$(echo "$bytes / 1000000 / $wall" | bc -l)" \
    "$(printf '%s\n' "${rss[@]}" | median | awk '{print $1 / 1024}')" "${walls[*]}"
}
printf '%-36s %8s %12s %10s\n' "contender (median of $RUNS), $COMPRESSION" "wall" "MB/s of input" "peak RSS"
run "lifeboat restore" "'$READER' restore --key '$key' --to '$shm/target'"
run "lifeboat restore --force-unverified" "'$READER' restore --key '$key' --to '$shm/target' --force-unverified"
run "aws s3 cp - | $untar" "'$AWS' s3 cp --only-show-errors 's3://bench/$key' - | $untar -C '$shm/target'"
w() { cat "$work/restore-wall.${1//[^a-zA-Z0-9]/_}"; }
printf 'ratio: lifeboat restore vs aws s3 cp | tar: %.2fx\n' \
  "$(echo "$(w "aws s3 cp - | $untar") / $(w "lifeboat restore")" | bc -l)"
