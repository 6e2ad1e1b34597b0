#!/usr/bin/env bash
# Benchmark: `lifeboat backup` against the pipelines users would otherwise run, all uploading to
# s3s-fs on loopback in the same run, so the figures are ratios on one machine at one time.
#
#   scripts/bench.sh [TREE]      TREE defaults to this machine's Python standard library
#   RUNS=5 scripts/bench.sh      runs per contender (default 5); medians are printed
#   MEMORY=0 scripts/bench.sh    skip the memory section (16 workers; 1 GB vs 10 GB of input)
#   CEILING=0 scripts/bench.sh   skip the non-compression ceiling section
#   COLD=0 scripts/bench.sh      skip the cold page cache section (read-ahead)
#   ONLY=zstd scripts/bench.sh   only the zstd contenders (ONLY=gzip: only the gzip ones)
#   LIFEBOAT_BIN=PATH scripts/bench.sh   time that binary instead of building this checkout's
#
# Sections: (1) lifeboat gzip and zstd against `tar | pigz -pN -6 | aws s3 cp -` and
# `tar | zstd -3 -TN | aws s3 cp -` (N = cores), with the ratios; (2) the ceiling without
# compression: the walk/read/tar stage into a discarding sink (examples/pipeline) against
# `tar cf - | cat >/dev/null`, and `lifeboat backup` with compression none against `aws s3 cp`
# of a file as large as the stream; (3) peak RSS with 16 workers forced (LIFEBOAT_WORKERS) and
# at 1 GB and 10 GB of input; (4) COLD: the walk/read/tar stage with the tree evicted from the
# page cache before each run (scripts/evict-cache.py), with and without read-ahead
# (LIFEBOAT_READ_AHEAD=0), against GNU tar. For each contender: wall time, MB/s of input (apparent file
# bytes), bytes stored, peak RSS (GNU time's maximum resident set of the largest process).
# Needs pigz, zstd and an AWS CLI: installs pigz/zstd with apt-get and the AWS CLI into
# .tools/awscli when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/bootstrap.sh
RUNS=${RUNS:-5}
CEILING=${CEILING:-1}
COLD=${COLD:-1}
MEMORY=${MEMORY:-1}

log() { printf 'bench: %s\n' "$*" >&2; }

# shellcheck source=scripts/bench-tools.sh
. scripts/bench-tools.sh
if [ -n "${LIFEBOAT_BIN:-}" ]; then
  LIFEBOAT=$LIFEBOAT_BIN # another build, for an A/B comparison in one session
else
  cargo build --release --quiet --bin lifeboat
  LIFEBOAT=$root/target/release/lifeboat
fi
cargo build --release --quiet --example pipeline
PIPELINE=$root/target/release/examples/pipeline

TREE=${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
TREE=$(cd "$TREE" && pwd -P)
work=$root/.bench
rm -rf "$work/s3" && mkdir -p "$work/s3"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.tools/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" \
  >"$work/s3s-fs.log" 2>&1 &
s3_pid=$!
# The inputs and archives are gigabytes: none are left behind (a full disk fails other work).
trap 'kill $s3_pid 2>/dev/null || true; rm -rf "$work/s3" "$work/mem/10g" "$work/stream.tar"' EXIT
for _ in $(seq 1 500); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.01
done
mkdir -p "$work/s3/bench"

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
# lifeboat off EC2: metadata is unreachable and skipped within a second (not part of the timing
# loop's noise: it is the same for every run).
export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:9

input_bytes() { du -s --apparent-size -B1 "$1" | cut -f1; }

lifeboat_config() { # name compression tree
  cat >"$work/lifeboat-$1.toml" <<TOML
[backup]
paths = ["$3"]
compression = "$2"
[s3]
bucket = "bench"
prefix = "lifeboat/"
TOML
  echo "$work/lifeboat-$1.toml"
}

# measure NAME TREE COMMAND [BEFORE]: runs COMMAND RUNS times (each after BEFORE, untimed),
# prints one line of medians and keeps the median wall time in $work/wall.NAME for the ratios.
measure() {
  local name=$1 tree=$2 cmd=$3 before=${4:-true} bytes walls=() rss=() stored=()
  bytes=$(input_bytes "$tree")
  for _ in $(seq 1 "$RUNS"); do
    rm -rf "$work/s3/bench/"*
    bash -c "$before"
    /usr/bin/time -f '%e %M' -o "$work/time.out" bash -c "$cmd" >/dev/null 2>"$work/err.out" || {
      log "$name failed:"; cat "$work/err.out" >&2; exit 1; }
    read -r wall kib <"$work/time.out"
    walls+=("$wall"); rss+=("$kib")
    stored+=("$(find "$work/s3/bench" -type f \( -name '*.tar*' -o -name 'pipe*' \) -printf '%s\n' | sort -n | tail -1)")
  done
  printf '%s\n' "${walls[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' >"$work/wall.${name//[^a-zA-Z0-9]/_}"
  python3 - "$name" "$bytes" "${walls[*]}" "${rss[*]}" "${stored[*]:-0}" <<'PY'
import statistics, sys
name, nbytes = sys.argv[1], int(sys.argv[2])
walls = [float(x) for x in sys.argv[3].split()]
rss = [int(x) for x in sys.argv[4].split()]
stored = [int(x) for x in sys.argv[5].split()] or [0]
wall = statistics.median(walls)
print(f"{name:<34} {wall:8.2f} {nbytes / wall / 1e6:9.1f} {statistics.median(stored) / 1e6:11.1f} {statistics.median(rss) / 1024:9.1f}   runs: {' '.join(f'{w:.2f}' for w in walls)}")
PY
}

wall_of() { cat "$work/wall.${1//[^a-zA-Z0-9]/_}"; }
ratio() { # A B TEXT: prints how many times faster A is than B
  printf 'ratio: %s %.2fx\n' "$3" "$(echo "$(wall_of "$2") / $(wall_of "$1")" | bc -l)"
}

header() {
  printf '%-34s %8s %9s %11s %9s\n' "contender (median of $RUNS)" "wall s" "MB/s in" "MB stored" "RSS MiB"
}

log "tree: $TREE ($(input_bytes "$TREE") bytes, $(find "$TREE" -type f | wc -l) files); warming the page cache"
tar cf - "$TREE" 2>/dev/null >/dev/null
cores=$(nproc)
gz_cfg=$(lifeboat_config gzip gzip "$TREE")
zst_cfg=$(lifeboat_config zstd zstd "$TREE")
none_cfg=$(lifeboat_config none none "$TREE")
s3cp="'$AWS' s3 cp --only-show-errors - s3://bench/pipe.tar"
echo
echo "machine: $cores cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $($LIFEBOAT --version); $("$AWS" --version 2>&1 | cut -d' ' -f1)"
echo
header
if [ "${ONLY:-gzip}" = gzip ]; then
  measure "lifeboat backup (gzip -6)" "$TREE" "'$LIFEBOAT' --config '$gz_cfg' backup"
  measure "tar | pigz -p$cores -6 | aws s3 cp -" "$TREE" "tar cf - '$TREE' 2>/dev/null | pigz -p$cores -6 | $s3cp"
fi
if [ "${ONLY:-zstd}" = zstd ]; then
  measure "lifeboat backup (zstd -3)" "$TREE" "'$LIFEBOAT' --config '$zst_cfg' backup"
  measure "tar | zstd -3 -T$cores | aws s3 cp -" "$TREE" "tar cf - '$TREE' 2>/dev/null | zstd -q -3 -T$cores | $s3cp"
fi
[ "${ONLY:-gzip}" = gzip ] && ratio "lifeboat backup (gzip -6)" "tar | pigz -p$cores -6 | aws s3 cp -" "lifeboat gzip vs the pigz pipeline:"
[ "${ONLY:-zstd}" = zstd ] && ratio "lifeboat backup (zstd -3)" "tar | zstd -3 -T$cores | aws s3 cp -" "lifeboat zstd vs the zstd pipeline:"

if [ "$CEILING" = 1 ]; then
  # Without compression: what the walk/read/tar stage sustains (into a discarding sink), and
  # what the upload sustains (against the AWS CLI uploading a file as large as the stream).
  [ -s "$work/stream.tar" ] || tar cf "$work/stream.tar" "$TREE" 2>/dev/null
  echo
  header
  measure "walk/read/tar into a discard sink" "$TREE" "'$PIPELINE' '$none_cfg'"
  measure "tar cf - | cat >/dev/null" "$TREE" "tar cf - '$TREE' 2>/dev/null | cat >/dev/null"
  measure "lifeboat backup (none)" "$TREE" "'$LIFEBOAT' --config '$none_cfg' backup"
  measure "aws s3 cp FILE (same size)" "$TREE" "'$AWS' s3 cp --only-show-errors '$work/stream.tar' s3://bench/pipe.tar"
  ratio "walk/read/tar into a discard sink" "tar cf - | cat >/dev/null" "walk/read/tar vs GNU tar:"
  ratio "lifeboat backup (none)" "aws s3 cp FILE (same size)" "lifeboat none vs aws s3 cp of a file:"
fi

if [ "$MEMORY" = 1 ]; then
  echo
  header
  # Sixteen workers on this machine: a many-core instance's worker count, within the budget.
  measure "lifeboat gzip, 16 workers" "$TREE" "LIFEBOAT_WORKERS=16 '$LIFEBOAT' --config '$gz_cfg' backup"
  measure "lifeboat zstd, 16 workers" "$TREE" "LIFEBOAT_WORKERS=16 '$LIFEBOAT' --config '$zst_cfg' backup"
  # Peak RSS must not grow with the input: the same tree content at 1 GB and at 10 GB.
  log "building 1 GB and 10 GB inputs from the tree"
  mkdir -p "$work/mem"
  [ -s "$work/mem/base.tar" ] || tar cf "$work/mem/base.tar" "$TREE" 2>/dev/null
  make_input() { # dir bytes
    local dir=$1 want=$2 have=0 i=0 size
    size=$(stat -c %s "$work/mem/base.tar")
    [ -d "$dir" ] && [ "$(input_bytes "$dir")" -ge "$want" ] && return
    rm -rf "$dir"; mkdir -p "$dir"
    while [ $((have + size)) -le "$want" ]; do cp "$work/mem/base.tar" "$dir/part-$i.tar"; have=$((have + size)); i=$((i + 1)); done
    head -c $((want - have)) "$work/mem/base.tar" >"$dir/part-$i.tar"
  }
  make_input "$work/mem/1g" 1000000000
  make_input "$work/mem/10g" 10000000000
  measure "lifeboat zstd, 1 GB input" "$work/mem/1g" "'$LIFEBOAT' --config '$(lifeboat_config mem-1g zstd "$work/mem/1g")' backup"
  measure "lifeboat zstd, 10 GB input" "$work/mem/10g" "'$LIFEBOAT' --config '$(lifeboat_config mem-10g zstd "$work/mem/10g")' backup"
fi

if [ "$COLD" = 1 ]; then
  # A cold page cache: every file read goes to the disk, as on an instance whose data was not
  # read since boot. Read-ahead hints the next files from a few threads (src/prefetch.rs).
  evict="python3 '$root/scripts/evict-cache.py' '$TREE'"
  echo
  header
  measure "cold: walk/read/tar, read-ahead" "$TREE" "'$PIPELINE' '$none_cfg'" "$evict"
  measure "cold: walk/read/tar, no read-ahead" "$TREE" "LIFEBOAT_READ_AHEAD=0 '$PIPELINE' '$none_cfg'" "$evict"
  measure "cold: tar cf - | cat >/dev/null" "$TREE" "tar cf - '$TREE' 2>/dev/null | cat >/dev/null" "$evict"
  ratio "cold: walk/read/tar, read-ahead" "cold: walk/read/tar, no read-ahead" "cold, read-ahead vs none:"
  ratio "cold: walk/read/tar, read-ahead" "cold: tar cf - | cat >/dev/null" "cold, walk/read/tar vs GNU tar:"
fi
