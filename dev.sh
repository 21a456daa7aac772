#!/usr/bin/env bash
# One script for every set-up step on a fresh machine (Python >= 3.11 with venv is all it needs).
#   bash dev.sh demo [ARGS]   make the virtualenv if needed, then run a whole conference on loopback
#   bash dev.sh test          make the virtualenv if needed, then ruff, mypy and the test suite
#   bash dev.sh bench NAME    run a benchmark script from bench/
#   bash dev.sh lock          re-pin constraints.txt (every dependency and tool, exact versions)
# Everything is installed from constraints.txt, so every machine and every CI run uses the same
# ruff, mypy, pytest and libraries; change a version there (or re-lock), never float it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PERC_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    # groff renders man/perc.1 in the tests; Debian-based machines may lack it.
    if ! command -v groff >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq groff-base) >/dev/null 2>&1 || true
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.perc-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[dev,media]'
        touch "$stamp"
    fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
    demo)
        setup
        exec "$VENV/bin/perc" demo "$@"
        ;;
    test)
        setup
        "$VENV/bin/ruff" check perc tests bench perc.py
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup
        name=${1:?usage: bash dev.sh bench NAME}
        shift
        exec "$VENV/bin/python" "bench/$name.py" "$@"
        ;;
    lock)
        setup
        "$VENV/bin/python" -m pip install --quiet uv
        exec "$VENV/bin/uv" pip compile pyproject.toml --extra dev --extra media --python-version 3.11 \
            --no-header --quiet -o constraints.txt
        ;;
    *)
        echo "usage: bash dev.sh demo|test|bench NAME|lock" >&2
        exit 2
        ;;
esac
