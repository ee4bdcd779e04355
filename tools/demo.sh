#!/bin/sh
# The two-worker demo: one vqkvd, and two inference workers as separate
# processes whose prompts share a 1024-token system prompt. The first puts
# some warm-up traffic, on which the daemon trains the codec's codebooks
# (online calibration), then offloads its prompt's KV blocks; the second,
# which never computed that prefix, finds it, gets it straight into its own
# paged KV memory and checks every restored byte against the codec (with
# the codebooks the daemon saved in its state dir). Then the daemon's
# counters, and the daemon is stopped with SIGTERM and must exit 0.
#
# Builds nothing: run it after `cmake --build --preset default`. The build
# folder is build/, or $VQKV_BUILD_DIR (the ctest entry points it at its
# own). Real SmolLM2-135M KV is used when tools/fidelity.sh has dumped it to
# bench/out/kv.safetensors (or $VQKV_KV names a dump), synthetic KV
# otherwise. The codec is $VQKV_CODEC, rvq:d=8,b=8,r=2 (2.25 bits a value)
# by default; the daemon calibrates it on 512 tokens. $VQKV_DAEMON_WRAPPER,
# when set, is a command the daemon runs under (tools/valgrind.sh sets it).
set -eu
cd "$(dirname "$0")/.."
build=${VQKV_BUILD_DIR:-build}
vqkvd_who=demo.sh
. tools/vqkvd.sh
codec=${VQKV_CODEC:-rvq:d=8,b=8,r=2}
kv=${VQKV_KV:-bench/out/kv.safetensors}
for bin in "$build/daemon/vqkvd" "$build/client/vqkvctl" "$build/client/vqkv-demo"; do
    if [ ! -x "$bin" ]; then
        echo "demo.sh: $bin is missing: build first (cmake --preset default && cmake --build --preset default -j2)" >&2
        exit 1
    fi
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/vqkv-demo.XXXXXX")
sock="$dir/vqkv.sock"
pid=""
cleanup() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# An empty config file, so that an installed vqkvd.conf does not apply.
: >"$dir/vqkvd.conf"
# shellcheck disable=SC2086 # the wrapper is a command line: split it
${VQKV_DAEMON_WRAPPER:-} "$build/daemon/vqkvd" --config "$dir/vqkvd.conf" --socket "$sock" --state-dir "$dir/state" \
    --pool-bytes 256M --calibration-tokens 512 --log-level warn &
pid=$!
vqkvd_wait_ready "$pid" "$sock"

set -- --socket "$sock" --codec "$codec"
# Under a wrapper (valgrind) every reply may take ten times as long: a get
# can wait behind the re-encoding of the calibration's blocks.
[ -n "${VQKV_DAEMON_WRAPPER:-}" ] && set -- "$@" --timeout-ms 300000
if [ -f "$kv" ]; then
    set -- "$@" --kv "$kv"
fi
echo "== worker 1 (its own process): offload prompt A"
"$build/client/vqkv-demo" --role offload --warmup-tokens 512 "$@"
echo "== worker 2 (another process): restore prompt B's shared prefix"
for file in "$dir"/state/codebooks/*.vqcb; do
    [ -f "$file" ] && set -- "$@" --codebook "$file"
done
"$build/client/vqkv-demo" --role restore "$@"
echo "== vqkvctl stats"
"$build/client/vqkvctl" --socket "$sock" stats

vqkvd_terminate "$pid"
pid=""
echo "== vqkvd stopped cleanly"
