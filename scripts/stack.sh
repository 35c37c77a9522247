#!/usr/bin/env bash
# The local pipeline: `scripts/stack.sh up` installs what is missing and brings everything up;
# `scripts/stack.sh down` stops everything it started and keeps the data; `down --purge` also
# removes .env.prod, .run/ and the database; `scripts/stack.sh status`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-up}" = up ]; then scripts/bootstrap.sh; fi
exec .venv/bin/python scripts/stack.py "$@"
