#!/usr/bin/env bash
# fuzz.sh -- builds the fuzz preset (clang, libFuzzer, ASan + UBSan) and runs
# every fuzz target of tests/fuzz for a bounded time, seeded with its
# corpus/ and regressions/. New corpus entries go to a temporary directory,
# so the tree stays clean. A crash, leak, timeout or failed invariant copies
# the input into tests/fuzz/<target>/regressions/ (where the replay tests of
# every build pick it up) and makes the script exit non-zero once every
# target has run.
#
#   tools/fuzz.sh                 every target, $VQKV_FUZZ_SECONDS (30) each
#   VQKV_FUZZ_SECONDS=300 tools/fuzz.sh session frame
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${VQKV_FUZZ_SECONDS:-30}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame session codebook config block_keys segment redis_spec)

# Without clang's libFuzzer runtime the preset cannot build: say what is
# missing rather than fail somewhere inside cmake.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' \
    >"$probe/probe.c"
if ! clang -fsanitize=fuzzer "$probe/probe.c" -o "$probe/probe" 2>/dev/null; then
    echo "fuzz.sh: clang with libFuzzer is needed (Debian: clang libclang-rt-14-dev)" >&2
    exit 1
fi

cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j2

work=$(mktemp -d)
trap 'rm -rf "$probe" "$work"' EXIT
status=0
summary=""
for t in "${targets[@]}"; do
    bin=build-fuzz/tests/fuzz/fuzz_$t
    dir=tests/fuzz/$t
    if [ ! -x "$bin" ]; then
        echo "fuzz.sh: no target $t" >&2
        exit 2
    fi
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    echo "== fuzz_$t: ${seconds}s"
    if ! "$bin" -max_total_time="$seconds" -timeout=60 -print_final_stats=1 \
        -artifact_prefix="$work/$t/artifacts/" \
        "$work/$t/corpus" "$dir/corpus" "$dir/regressions" >"$work/$t/log" 2>&1; then
        tail -n 60 "$work/$t/log" >&2
        for a in "$work/$t/artifacts"/*; do
            [ -e "$a" ] || continue
            cp "$a" "$dir/regressions/"
            echo "fuzz.sh: kept $dir/regressions/$(basename "$a")" >&2
        done
        status=1
    fi
    # The run's last status line and its totals, for the summary.
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$t/log" | tail -n 1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t/log")
    cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/cov \1, ft \2, corpus \3/p' \
        <<<"$done_line")
    summary+=$(printf '%-11s %10s execs %6s/s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-crashed}")
    summary+=$'\n'
done
printf '\n%s' "$summary"
exit $status
