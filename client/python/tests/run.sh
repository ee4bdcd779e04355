#!/bin/sh
# ctest entry for the vqkv Python package's tests: pytest from the project's
# .venv (tools/bootstrap.sh makes it) over client/python/src, nothing
# installed. ctest passes the built binaries in VQKVD_PATH, VQKVCTL_PATH and
# VQKV_LIBRARY; without .venv or them the tests are skipped, loudly (77).
# An ASan build of libvqkv can only be loaded into Python with the ASan
# runtime preloaded, and Python itself then cannot pass a leak check: the
# interpreter runs without one and the daemon keeps its own (VQKVD_ASAN_OPTIONS,
# read by tests/daemon_harness.py).
root="$(cd "$(dirname "$0")/../../.." && pwd)"
py="$root/.venv/bin/python"
if ! [ -x "$py" ] || ! "$py" -c "import pytest, numpy" 2>/dev/null; then
    echo "SKIPPED: the vqkv package tests need .venv with tools/requirements.txt (run tools/bootstrap.sh)"
    exit 77
fi
for bin in "${VQKVD_PATH:-}" "${VQKVCTL_PATH:-}" "${VQKV_LIBRARY:-}"; do
    if ! [ -f "$bin" ]; then
        echo "SKIPPED: VQKVD_PATH, VQKVCTL_PATH and VQKV_LIBRARY must name the built files (ctest sets them)"
        exit 77
    fi
done
asan="$(ldd "$VQKV_LIBRARY" | awk '$1 ~ /^libasan\.so/ { print $3 }')"
if [ -n "$asan" ]; then
    export VQKVD_ASAN_OPTIONS="${ASAN_OPTIONS:-}"
    export ASAN_OPTIONS="detect_leaks=0"
    export LD_PRELOAD="$asan"
fi
PYTHONPATH="$root/client/python/src" exec "$py" -m pytest -q -p no:cacheprovider "$root/client/python/tests"
