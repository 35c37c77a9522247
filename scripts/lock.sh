#!/usr/bin/env bash
# Re-resolves the package with its dev extra at the newest versions setup.cfg allows, in a
# throw-away virtual environment, and writes every installed version to constraints.txt: the
# versions scripts/bootstrap.sh (so `scripts/stack.sh up`, `scripts/test.sh` and CI) installs.
# Then run scripts/test.sh and scripts/test-floors.sh and commit constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
echo "lock: resolving .[dev] without constraints" >&2
if ! "$work/venv/bin/python" -m pip install -q -e '.[dev]' >"$work/install.log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$work/install.log" | tail -30 >&2
  echo "lock: pip install failed" >&2; exit 1
fi
{
  echo "# The versions the tests run with: scripts/bootstrap.sh installs .[dev] under these."
  python_version=$("$work/venv/bin/python" -c 'import platform; print(platform.python_version())')
  echo "# Written by scripts/lock.sh on Python $python_version; to upgrade, run it again"
  echo "# (README: Upgrading dependencies)."
  "$work/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^periodic-checker'
} >constraints.txt
echo "lock: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)" >&2
