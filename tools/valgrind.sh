#!/bin/sh
# Runs the multi-process tests with vqkvd under valgrind memcheck: the
# daemon tests (test_daemon_kv, test_libvqkv, test_tenants, and test_faults,
# whose killed clients and daemons drive the paths that free a dead peer's
# state) and the demo, each daemon through $VQKV_DAEMON_WRAPPER
# (tests/daemon_harness.h and tools/demo.sh honour it; their deadlines grow
# tenfold). Every daemon must
# end with no memcheck error, no definitely lost block and no fd of its own
# left open at exit; any test failing fails the script. valgrind's logs,
# one per daemon, stay in a temporary directory on failure.
#
# Builds nothing: run it after `cmake --build --preset default`. The build
# folder is build/, or $VQKV_BUILD_DIR. Expect a few minutes. The demo's
# codec is a small VQ one (16-entry codebooks), so the daemon's online
# calibration runs under valgrind in seconds rather than many minutes.
set -eu
cd "$(dirname "$0")/.."
build=${VQKV_BUILD_DIR:-build}
if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2
    exit 1
fi
tests="test_daemon_kv test_libvqkv test_tenants test_faults"
for t in $tests; do
    if [ ! -x "$build/tests/$t" ]; then
        echo "valgrind.sh: $build/tests/$t is missing: build first" >&2
        exit 1
    fi
done

logs=$(mktemp -d "${TMPDIR:-/tmp}/vqkv-valgrind.XXXXXX")
VQKV_DAEMON_WRAPPER="valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=yes --log-file=$logs/vqkvd.%p.log"
export VQKV_DAEMON_WRAPPER

failed=""
for t in $tests; do
    echo "== $t (vqkvd under valgrind)"
    if ! "$build/tests/$t" >"$logs/$t.out" 2>&1; then
        failed="$failed $t"
        tail -n 20 "$logs/$t.out" >&2
    fi
done
echo "== demo (vqkvd under valgrind)"
if ! VQKV_BUILD_DIR="$build" VQKV_CODEC="rvq:d=8,b=4,r=1" tools/demo.sh >"$logs/demo.out" 2>&1; then
    failed="$failed demo"
    tail -n 20 "$logs/demo.out" >&2
fi

# The logs themselves: a daemon killed on purpose (SIGKILL) writes no
# summary, so each summary that is there must be clean.
daemons=0
for log in "$logs"/vqkvd.*.log; do
    [ -f "$log" ] || continue
    daemons=$((daemons + 1))
    bad=""
    grep -q "ERROR SUMMARY: [1-9]" "$log" && bad="memcheck errors"
    grep -q "definitely lost: [1-9]" "$log" && bad="$bad definite leaks"
    # An fd listed without "<inherited from parent>" is one vqkvd opened.
    if awk '/Open (file descriptor|AF_UNIX socket)/ { fd = 1; next }
            fd && /inherited from parent/ { fd = 0; next }
            fd && /==[0-9]+== *$/ { leaked = 1; fd = 0 }
            END { exit leaked ? 0 : 1 }' "$log"; then
        bad="$bad fds left open"
    fi
    if [ -n "$bad" ]; then
        failed="$failed $(basename "$log"):$bad"
        cat "$log" >&2
    fi
done

if [ -n "$failed" ]; then
    echo "valgrind.sh: FAILED:$failed (logs in $logs)" >&2
    exit 1
fi
rm -rf "$logs"
echo "valgrind.sh: $daemons daemons ran under memcheck: no error, no definite leak, no fd left open"
