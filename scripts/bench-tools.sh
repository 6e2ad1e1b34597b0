# Sourced by the benchmark scripts (after `log` and `root` are set): installs what the peers need
# when missing (pigz, zstd and GNU time with apt-get, the AWS CLI into .tools/awscli) and sets AWS
# to the AWS CLI to use.
need() { # command package
  command -v "$1" >/dev/null || { log "installing $2"; apt-get update -qq; apt-get install -y -qq "$2" >/dev/null; }
}
need pigz pigz
need zstd zstd
[ -x /usr/bin/time ] || need /usr/bin/time time
if command -v aws >/dev/null 2>&1 && aws --version >/dev/null 2>&1; then
  AWS=$(command -v aws)
else
  if ! [ -x "$root/.tools/awscli/bin/aws" ]; then
    log "installing the AWS CLI into .tools/awscli"
    python3 -m venv "$root/.tools/awscli" && "$root/.tools/awscli/bin/pip" install --quiet awscli
  fi
  AWS=$root/.tools/awscli/bin/aws
fi
