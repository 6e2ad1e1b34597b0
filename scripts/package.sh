#!/usr/bin/env bash
# Builds the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) from one release binary:
#   target/debian/lifeboat_<version>-1_amd64.deb
#   target/generate-rpm/lifeboat-<version>-1.x86_64.rpm
# The binary must run on Amazon Linux 2023, Ubuntu 22.04+, Debian 12 and RHEL 9: this refuses one
# that needs a glibc newer than 2.34.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cargo build --release --quiet --bin lifeboat
newest=$(objdump -T target/release/lifeboat | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1)
if [ "${newest#GLIBC_2.}" -gt 34 ]; then
  echo "package: target/release/lifeboat needs $newest; Amazon Linux 2023 and RHEL 9 have 2.34" >&2
  exit 1
fi
rm -rf target/man
target/release/lifeboat manpage target/man
gzip -9n target/man/*.1
PATH="$PWD/.tools/bin:$PATH" cargo deb --no-build --quiet
PATH="$PWD/.tools/bin:$PATH" cargo generate-rpm
ls -l target/debian/*.deb target/generate-rpm/*.rpm
echo "needs at most $newest"
