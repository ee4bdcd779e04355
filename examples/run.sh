#!/bin/sh
# The PyTorch worker example end to end: for each codec, a fresh vqkvd from
# the build tree on a temporary socket (empty config, temporary state dir),
# one worker process that prefills a prompt and offloads its KV blocks, a
# second that restores them into its own paged cache and continues the
# text, then the daemon is stopped and must exit 0. A daemon keeps one codec
# per model id, hence one daemon per codec. Prints a table and writes the
# results as JSON (an array, one object per codec, as
# examples/paged_worker.py --json writes them).
#
# Builds nothing: run it after `cmake --build --preset default`, with torch
# and transformers in .venv (pip install -r examples/requirements.txt).
# Settings from the environment:
#   VQKV_BUILD_DIR        the build folder (default build)
#   VQKV_EXAMPLE_CODECS   codecs to run (default "fp16 kivi4 kivi2 rvq:d=8,b=8,r=2")
#   VQKV_EXAMPLE_TOKENS   tokens to generate after the prompt (default 64)
#   VQKV_EXAMPLE_REPEAT   timed runs of restore and of prefill, best kept (default 3)
#   VQKV_EXAMPLE_JSON     where the JSON goes (default bench/out/example.json)
# The VQ codec is calibrated online: its offload first puts 512 tokens of
# other text, the daemon's --calibration-tokens. Exits 77 (skipped) when
# torch or transformers is missing, 1 when a step fails, which includes an
# fp16 continuation that differs from the uncompressed run's.
set -eu
cd "$(dirname "$0")/.."
build=${VQKV_BUILD_DIR:-build}
vqkvd_who=run.sh
. tools/vqkvd.sh
codecs=${VQKV_EXAMPLE_CODECS:-fp16 kivi4 kivi2 rvq:d=8,b=8,r=2}
tokens=${VQKV_EXAMPLE_TOKENS:-64}
repeat=${VQKV_EXAMPLE_REPEAT:-3}
json=${VQKV_EXAMPLE_JSON:-bench/out/example.json}
py=.venv/bin/python
warmup=512

if ! [ -x "$py" ] || ! "$py" -c "import torch, transformers, gguf" 2>/dev/null; then
    echo "SKIPPED: torch/transformers not installed (pip install -r examples/requirements.txt)"
    exit 77
fi
for bin in "$build/daemon/vqkvd" "$build/client/vqkvctl" "$build/client/libvqkv.so"; do
    if ! [ -f "$bin" ]; then
        echo "run.sh: $bin is missing: build first (cmake --preset default && cmake --build --preset default -j2)" >&2
        exit 1
    fi
done
export VQKV_LIBRARY="$build/client/libvqkv.so"
# An ASan build of libvqkv loads into Python only with the ASan runtime
# preloaded, and the interpreter cannot then pass a leak check; the daemon
# keeps its own (as client/python/tests/run.sh does).
asan="$(ldd "$VQKV_LIBRARY" | awk '$1 ~ /^libasan\.so/ { print $3 }')"

dir=$(mktemp -d "${TMPDIR:-/tmp}/vqkv-example.XXXXXX")
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

# Starts a vqkvd on $dir/$1/ and waits until it answers.
start_daemon() {
    mkdir -p "$dir/$1"
    : >"$dir/$1/vqkvd.conf"
    "$build/daemon/vqkvd" --config "$dir/$1/vqkvd.conf" --socket "$dir/$1/vqkv.sock" \
        --state-dir "$dir/$1/state" --pool-bytes 256M --calibration-tokens "$warmup" --log-level warn &
    pid=$!
    vqkvd_wait_ready "$pid" "$dir/$1/vqkv.sock"
}

stop_daemon() {
    vqkvd_terminate "$pid"
    pid=""
}

worker() {
    if [ -n "$asan" ]; then
        ASAN_OPTIONS="detect_leaks=0" LD_PRELOAD="$asan" "$py" examples/paged_worker.py "$@"
    else
        "$py" examples/paged_worker.py "$@"
    fi
}

n=0
for codec in $codecs; do
    n=$((n + 1))
    start_daemon "$n"
    set -- --socket "$dir/$n/vqkv.sock" --codec "$codec"
    echo "== $codec: worker 1 (its own process) prefills the prompt and offloads its blocks"
    case "$codec" in
    rvq* | vqkv* | commvq*) worker --mode offload --warmup-tokens "$warmup" "$@" ;;
    *) worker --mode offload "$@" ;;
    esac
    echo "== $codec: worker 2 (another process) restores them and continues for $tokens tokens"
    worker --mode restore --new-tokens "$tokens" --repeat "$repeat" --json "$dir/$(printf %03d "$n").json" "$@"
    stop_daemon
done

mkdir -p "$(dirname "$json")"
jq -s . "$dir"/[0-9]*.json >"$json"
echo
echo "| codec | tokens agreeing | first divergence | teacher-forced | restore ms | prefill ms | bytes a block (fp16) | ratio | K rel. err | V rel. err |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
jq -r '.[] | "| \(.codec) | \(.tokens_agree)/\(.new_tokens) (\(.agree_pct | round)%) | \(.first_divergence // "none") | \(.forced_agree)/\(.new_tokens) | \(.restore_ms | round) | \(.prefill_ms | round) | \(.block_bytes) (\(.block_bytes_fp16)) | \(.ratio_vs_fp16 * 100 | round / 100)x | \(.rel_err_k * 10000 | round / 10000) | \(.rel_err_v * 10000 | round / 10000) |"' "$json"
echo "(prompt of $(jq '.[0].prompt_tokens' "$json") tokens: $(jq '.[0].blocks_restored' "$json") blocks restored, $(jq '.[0].tail_tokens' "$json") tail tokens recomputed; JSON in $json)"
