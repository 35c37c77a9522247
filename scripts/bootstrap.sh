#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, idempotently:
# Debian packages (stunnel4, openssl, curl, nginx-light and prometheus-alertmanager for the
# tests, PostgreSQL if none answers), a virtual environment in .venv with the package and its
# dev extra at the versions of constraints.txt, and a running PostgreSQL on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "bootstrap: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || need_apt+=(stunnel4)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # the probe is tested against curl
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)  # a target
command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql postgresql-client)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)  # a receiver
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# PostgreSQL on 127.0.0.1:5432: use it when it answers, else start Debian's cluster.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ls /etc/postgresql >/dev/null 2>&1 && [ -n "$(ls /etc/postgresql)" ]; then
    log "starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL does not answer on 127.0.0.1:5432"; exit 1; }
fi

# The virtual environment, with the versions the tests ran with (constraints.txt, written by
# scripts/lock.sh); re-installed when setup.cfg or constraints.txt changes.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-inputs
if [ ! -f "$stamp" ] || ! cat setup.cfg constraints.txt | cmp -s - "$stamp"; then
  log "installing the package with its dev extra into .venv (versions from constraints.txt)"
  if ! .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]' >.venv/install.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/install.log | tail -30 >&2
    log "pip install failed (full log: .venv/install.log)"; exit 1
  fi
  cat setup.cfg constraints.txt >"$stamp"
fi
