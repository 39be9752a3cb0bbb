#!/usr/bin/env bash
# Installs what hvr needs on a Debian machine: the NBD/QEMU client tools the
# tests and the demo drive, and a virtualenv (.venv) holding hvr itself.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v nbdsh >/dev/null 2>&1 || need_pkgs+=(libnbd-bin python3-libnbd)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating virtualenv .venv" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.hvr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing hvr and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
