#!/usr/bin/env bash
# The lower-bound check: installs every dependency at the floor setup.cfg declares (the version
# of its `>=`, listed by scripts/floors.py) into .venv-min, then runs ruff and a quick part of
# the suite with them: the unit-level tests of every module, the API, the PostgreSQL writer and
# one broker round trip per daemon. A floor that no longer works fails here. mypy is left to
# scripts/test.sh: typing follows each library's stubs, which the floors do not promise.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

venv=.venv-min
floors=$(mktemp)
trap 'rm -f "$floors"' EXIT
.venv/bin/python scripts/floors.py >"$floors"
# Made afresh whenever the floors change, so nothing from an older install hides a missing one.
if ! cmp -s "$floors" "$venv/floors.txt"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  echo "floors: installing the package with its dev extra at the declared floors into $venv" >&2
  if ! "$venv/bin/python" -m pip install -q -c "$floors" -e '.[dev]' >"$venv/install.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$venv/install.log" | tail -30 >&2
    echo "floors: the declared floors do not install together (full log: $venv/install.log)" >&2
    exit 1
  fi
  cp "$floors" "$venv/floors.txt"
fi
export PATH="$PWD/$venv/bin:$PATH"

echo "== floors: ruff check"; ruff check --no-cache .
echo "== floors: ruff format --check"; ruff format --no-cache --check .
echo "== floors: pytest"
# The committed JSON Schema is compared as text, and its exact spelling is that of the locked
# pydantic (constraints.txt); older releases write the same schema in other words.
set +e
python -m pytest -p no:cacheprovider \
  --deselect tests/test_contract.py::test_committed_json_schema_is_current \
  --deselect tests/processing/test_alerting_delivery.py::test_the_committed_schema_is_current \
  -k "not (test_bad_setting_stops_at_start_with_one_line and check-config)" \
  tests/test_contract.py tests/test_settings.py tests/test_dependencies.py tests/test_mtls.py \
  tests/checker/test_tasks.py tests/checker/test_policy.py tests/checker/test_dns.py \
  tests/checker/test_http1.py tests/checker/test_probe.py tests/checker/test_store.py \
  tests/checker/test_outbox.py tests/checker/test_timetable.py tests/checker/test_scheduler.py \
  tests/checker/test_daemon.py \
  tests/api/test_api_tasks.py tests/api/test_api_validation.py \
  tests/api/test_api_auth_and_docs.py tests/api/test_api_schemathesis.py \
  tests/processing/test_writer.py tests/processing/test_batching.py \
  tests/processing/test_reporting.py \
  tests/processing/test_alerting_config.py tests/processing/test_alerting_backoff.py \
  tests/processing/test_alerting_rate.py \
  tests/processing/test_alerting_delivery.py tests/processing/test_alerting_mail.py \
  tests/processing/test_daemon.py::test_results_and_poison_are_stored_and_sigterm_commits \
  "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
