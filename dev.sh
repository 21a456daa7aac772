#!/usr/bin/env bash
# One script for every set-up step on a fresh machine (Python >= 3.11 with venv is all it needs).
#   bash dev.sh demo [ARGS]   make the virtualenv if needed, then run a whole conference on loopback
#   bash dev.sh test [ARGS]   make the virtualenv if needed, then ruff, mypy and the test suite
#                             (with ARGS: pytest ARGS instead of the whole suite)
#   bash dev.sh bench NAME    run a benchmark script from bench/
#   bash dev.sh lock          re-pin constraints.txt (every dependency and tool, exact versions)
# Everything is installed from constraints.txt, so every machine and every CI run uses the same
# ruff, mypy, pytest and libraries; change a version there (or re-lock), never float it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PERC_VENV:-.venv}
PY=${PYTHON:-python3}

# System tools the tests use: groff renders man/perc.1, tshark (+ dumpcap from wireshark-common)
# runs the Wireshark dissector on captures, iproute2 (ip, tc) builds network namespaces with
# netem. Installed with apt-get when missing and we are root (as CI is); otherwise say what
# is missing and go on (the tests that need a tool fail with the package's name).
SYSTEM_TOOLS="groff:groff-base tshark:tshark dumpcap:tshark ip:iproute2 tc:iproute2"

system_packages() {
    local missing="" tool pkg
    for pair in $SYSTEM_TOOLS; do
        tool=${pair%%:*}
        pkg=${pair##*:}
        if ! command -v "$tool" >/dev/null 2>&1 && [[ " $missing " != *" $pkg "* ]]; then
            missing="$missing $pkg"
        fi
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "dev.sh: installing system packages:$missing" >&2
        # dumpcap without the setuid question (we capture as root).
        echo "wireshark-common wireshark-common/install-setuid boolean false" \
            | debconf-set-selections 2>/dev/null || true
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "dev.sh: missing system packages (install them as root):$missing" >&2
    fi
}

setup() {
    system_packages
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
        if [ $# -eq 0 ]; then
            # The whole suite: unit, in-memory, interop and bench-smoke tests on every core
            # (pytest-xdist), then the whole-system tests (real processes, bounds read from
            # their logs) one at a time, so they never compete with each other for the CPU.
            "$VENV/bin/python" -m pytest -n "${PERC_TEST_WORKERS:-2}" --ignore=tests/system
            exec "$VENV/bin/python" -m pytest tests/system
        fi
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
