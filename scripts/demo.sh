#!/usr/bin/env bash
# Runs the self-contained demo on loopback (installing what it needs first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m hvrctl.demo "$@"
