#!/usr/bin/env bash
# lifeboat's main job, end to end on loopback: start an emulated S3 (moto's server), back up a
# sample tree, list the backups, verify the archive, restore it and compare with the original.
# Installs what is missing first (scripts/bootstrap.sh). Nothing leaves this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cargo build --quiet --bin lifeboat
LIFEBOAT="$PWD/target/debug/lifeboat"

work=$(mktemp -d /tmp/lifeboat-demo.XXXXXX)
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; rm -rf "$work"' EXIT

export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
# Off EC2 here: metadata is not reachable, lifeboat carries on as `standalone`.
export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:9
for _ in $(seq 1 250); do
  .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.02
done
.venv/bin/python -c "import boto3; boto3.client('s3').create_bucket(Bucket='demo-backups')"

echo "== a sample tree: logs, nested directories, a symlink, a hard link, a FIFO"
data="$work/data"
mkdir -p "$data/app/2026/11" "$data/empty"
for i in $(seq 1 200); do echo "$(date -u +%FT%TZ) request $i served in ${i}ms" >>"$data/app/access.log"; done
seq 1 50000 >"$data/app/2026/11/numbers.txt"
ln -s app/access.log "$data/current.log"
ln "$data/app/access.log" "$data/app/access.log.1"
mkfifo "$data/app/control.fifo"

cat >"$work/lifeboat.toml" <<TOML
[backup]
paths = ["$data"]
exclude = ["*.tmp"]

[s3]
bucket = "demo-backups"
prefix = "lifeboat/"
TOML
export LIFEBOAT_CONFIG="$work/lifeboat.toml"

echo; echo "== lifeboat config check"; "$LIFEBOAT" config check
echo; echo "== lifeboat backup --dry-run"; "$LIFEBOAT" backup --dry-run
echo; echo "== lifeboat backup"; "$LIFEBOAT" backup --reason demo | tee "$work/backup.out"
key=$(sed -n 's|^stored s3://demo-backups/||p' "$work/backup.out")
echo; echo "== lifeboat list"; "$LIFEBOAT" list
echo; echo "== lifeboat verify --key $key"; "$LIFEBOAT" verify --key "$key"
echo; echo "== lifeboat restore --key $key --to $work/restored"
"$LIFEBOAT" restore --key "$key" --to "$work/restored"
echo; echo "== compare (the FIFO is skipped by design)"
diff -r --no-dereference "$data" "$work/restored$data" && echo "identical" || true
