#!/usr/bin/env bash
# Runs the test suite (installing what it needs first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# Two workers (the machine has two cores; the daemon tests mostly wait on their daemons), each test file
# whole on one worker so its module fixtures (a listener, a pair) are started once.
exec .venv/bin/python -m pytest -m "not slow" -n 2 --dist loadfile "$@"
