#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmark need, into project-local paths, so the
# README's commands work on a fresh machine:
#   .venv/   Python venv with moto's server (S3, and later Auto Scaling, SNS, SSM, STS)
#   .tools/  s3s-fs, a real S3 server written in Rust (fast, checks SigV4), cargo-deb and
#            cargo-generate-rpm (the packages)
#   .venv/   also cfn-lint (the deployment template) and fusepy (a FUSE file system whose reads
#            hang, tests/emulators/hangfs.py)
# and, when missing, the Debian tools the tests use (GNU tar, gzip, zstd, systemd-analyze,
# lintian, rpmlint, libfuse2, and bsdtar for the tar-format corpus).
# Idempotent: a second run only checks.
#   scripts/bootstrap.sh --demo   only what scripts/demo.sh needs: moto's server (a minute),
#                                 no apt, no tool builds.
set -euo pipefail
cd "$(dirname "$0")/.."
demo_only=false
[ "${1:-}" = "--demo" ] && demo_only=true

MOTO_VERSION=5.2.5
S3S_FS_VERSION=0.14.1
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
CFN_LINT_VERSION=1.58.0
FUSEPY_VERSION=3.0.1

log() { printf 'bootstrap: %s\n' "$*" >&2; }

need_apt=()
for tool in tar gzip zstd; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
# systemd-analyze checks the unit; lintian, rpmlint, rpm and objdump the packages.
# bsdtar writes part of restore's tar-format corpus (tests/tools/tar_corpus.py).
for tool in systemd-analyze:systemd lintian:lintian rpmlint:rpmlint rpm:rpm objdump:binutils bsdtar:libarchive-tools; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
# fusepy loads libfuse.so.2.
[ -e /usr/lib/x86_64-linux-gnu/libfuse.so.2 ] || ldconfig -p 2>/dev/null | grep -q 'libfuse.so.2 ' \
  || need_apt+=(libfuse2)
if $demo_only; then
  need_apt=()
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} with apt-get (needs root)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! .venv/bin/python -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  log "installing moto $MOTO_VERSION into .venv (about a minute)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi

if $demo_only; then
  log "ready for the demo: .venv/bin/python with moto's server"
  exit 0
fi

if ! [ -x .tools/bin/s3s-fs ]; then
  log "building s3s-fs $S3S_FS_VERSION into .tools (about three minutes)"
  cargo install --quiet "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root .tools
fi
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('fusepy') != '$FUSEPY_VERSION')" 2>/dev/null; then
  log "installing fusepy $FUSEPY_VERSION into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "fusepy==$FUSEPY_VERSION"
fi

if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('cfn-lint') != '$CFN_LINT_VERSION')" 2>/dev/null; then
  log "installing cfn-lint $CFN_LINT_VERSION into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION"
fi
if ! [ -x .tools/bin/cargo-deb ]; then
  log "building cargo-deb $CARGO_DEB_VERSION into .tools (about two minutes)"
  cargo install --quiet "cargo-deb@$CARGO_DEB_VERSION" --locked --root .tools
fi
if ! [ -x .tools/bin/cargo-generate-rpm ]; then
  log "building cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION into .tools (about two minutes)"
  cargo install --quiet "cargo-generate-rpm@$CARGO_GENERATE_RPM_VERSION" --locked --root .tools
fi
log "ready: .venv/bin/moto_server, .venv/bin/cfn-lint, .tools/bin/{s3s-fs,cargo-deb,cargo-generate-rpm}"
