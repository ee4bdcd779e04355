#!/bin/sh
# ctest entry for the Python tests of tools/: runs them with the project's
# .venv (tools/bootstrap.sh makes it) and skips, loudly, without one.
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="$root/.venv/bin/python"
if ! [ -x "$py" ] || ! "$py" -c "import pytest, numpy, gguf, tokenizers, safetensors" 2>/dev/null; then
    echo "SKIPPED: the Python tests need .venv with tools/requirements.txt (run tools/bootstrap.sh)"
    exit 77
fi
exec "$py" -m pytest -q "$root/tests/python"
