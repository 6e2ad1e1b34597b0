#!/usr/bin/env bash
# Builds the companion Lambda for the provided.al2023 runtime (x86_64) and packages it the way
# `cargo lambda build --release --output-format zip` does:
#   target/lambda/lifeboat-lambda/bootstrap.zip   (one executable file named bootstrap)
# With cargo-lambda installed, `cargo lambda build --release --output-format zip -p lifeboat-lambda`
# gives the same layout (built with zig against glibc 2.34 for any host).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile lambda -p lifeboat-lambda --bin bootstrap --quiet
out=target/lambda/lifeboat-lambda
mkdir -p "$out"
cp target/lambda/bootstrap "$out/bootstrap"
# provided.al2023 has glibc 2.34: refuse a binary that needs anything newer.
newest=$(objdump -T "$out/bootstrap" 2>/dev/null | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1 || true)
if [ -n "$newest" ] && [ "${newest#GLIBC_2.}" -gt 34 ]; then
  echo "build-lambda: bootstrap needs $newest; provided.al2023 has glibc 2.34 (build with cargo lambda)" >&2
  exit 1
fi
rm -f "$out/bootstrap.zip"
(cd "$out" && python3 -m zipfile -c bootstrap.zip bootstrap)
printf 'built %s (%s bytes; bootstrap %s bytes; needs %s)\n' "$out/bootstrap.zip" \
  "$(stat -c %s "$out/bootstrap.zip")" "$(stat -c %s "$out/bootstrap")" "${newest:-no versioned glibc}"
