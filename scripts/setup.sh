#!/usr/bin/env bash
# Set up stable-cnn on a fresh Debian/Ubuntu machine (or any machine with Python >= 3.10):
#   - the offline Fashion-MNIST copy (Debian package dataset-fashion-mnist), where apt exists
#   - a virtual environment in .venv with stable-cnn installed (editable)
# Usage: bash scripts/setup.sh [--dev]     (--dev also installs the test tools and,
#                                           where apt exists, PostgreSQL for one test)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {  # apt_install PACKAGE...: quietly, only where apt exists
    command -v apt-get >/dev/null || return 1
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt_install dataset-fashion-mnist || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded instead" >&2
fi

# --dev: the tests start a throw-away PostgreSQL server for the shared-study test
if [ -n "$extras" ] && ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql || echo "setup: could not install postgresql (tests/test_optuna_search.py needs it)" >&2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    # Debian's python3 lacks venv/ensurepip until python3-venv is installed.
    "$python" -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv && "$python" -m venv .venv; }
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# compat: the project folder on sys.path, so that Hydra finds hydra_plugins/ (its plugin
# scan lists folders, which setuptools' newer editable finder does not provide)
.venv/bin/python -m pip install --quiet -e ".${extras}" --config-settings editable_mode=compat
# a venv from before stable-cnn's own sweeper still holds the old plugin (it wants optuna<3)
.venv/bin/python -m pip uninstall --quiet --yes hydra-optuna-sweeper 2>/dev/null || true
echo "setup: done; commands are in .venv/bin (stable-cnn-train, pytest)" >&2
