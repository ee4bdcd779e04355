#!/usr/bin/env bash
# gpu-check.sh -- everything about the CUDA code that only a GPU can prove,
# in one run on a bare GPU machine: build the codecs with CUDA (kernels only:
# the daemon's libraries need not be there), run the emulated and the real
# kernel tests and libvqkv's CUDA driver test (ctest label gpu), the kernel
# test under compute-sanitizer memcheck, racecheck and initcheck, and
# bench/codec_gpu; then, when the daemon's libraries are there too, vqkvd's
# CUDA backend: its pool's store (test_cuda_store) and the backend between
# worker processes (test_cuda_daemon), also with the
# daemon under memcheck, restore vs recompute (bench/restore.py) and gets
# and puts from worker processes (bench/serve_gpu.py). Logs
# and JSON go to OUT_DIR (default $OUT, else gpu-check-out); summary.txt
# lists each step with PASS, FAIL or SKIP. Exits non-zero when any step
# failed.
#
# usage: tools/gpu-check.sh [OUT_DIR]
#
# The build's Debian libraries (msgpack, cmocka, libcrypto) come from
# .devdeps/ when present (its unpack.sh puts them in /opt/deps). Budget: the
# kernel part under 8 minutes on an H100/H200, about half of it the
# sanitizers; the daemon part is new and not yet timed on a GPU (estimated
# 4-6 minutes: a full build, 30 s of soak, the memcheck run, bench/restore.py
# with a Llama-8B-shaped model of random weights and a short
# bench/serve_gpu.py, about a minute each). Each step has a time limit so
# one stuck step cannot take the rest with it.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=0
jobs=$(nproc 2>/dev/null || echo 4)

# step NAME LIMIT_SECONDS COMMAND...: runs it with its output in NAME.log.
step() {
    local name=$1 limit=$2 t0 rc verdict
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    case $rc in
    0) verdict=PASS ;;
    77) verdict=SKIP ;;
    124) verdict="FAIL (time limit ${limit}s)" ;;
    *) verdict="FAIL (exit $rc)" ;;
    esac
    [ "${verdict%% *}" = FAIL ] && failed=1
    printf '%-22s %-24s %4ss\n' "$name" "$verdict" "$(($(date +%s) - t0))" | tee -a "$summary"
    return $rc
}

[ -d /usr/local/cuda/bin ] && export PATH=$PATH:/usr/local/cuda/bin
if [ -f .devdeps/unpack.sh ]; then
    bash .devdeps/unpack.sh >"$out/deps.log" 2>&1 && . /opt/deps/env.sh
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc --version | tail -1
} >"$out/device.txt" 2>&1

build=build-gpu
step configure 120 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVQKV_CUDA=ON \
    -DVQKV_KERNELS_ONLY=ON -DVQKV_WERROR=OFF || { cat "$summary"; exit 1; }
# The build log keeps ptxas's registers, stack and spills for every kernel.
step build 300 cmake --build "$build" -j"$jobs" || { cat "$summary"; exit 1; }
grep -A3 "Compiling entry function" "$out/build.log" | grep -v "^--" >"$out/ptxas.txt"

step ctest-unit 240 ctest --test-dir "$build" -L unit --output-on-failure
step ctest-gpu 240 ctest --test-dir "$build" -L gpu --output-on-failure
# ctest counts a skip as no failure: the GPU tests must have run.
for t in test_kernels_gpu test_cuda_driver_gpu; do
    grep -q "$t .*Passed" "$out/ctest-gpu.log" ||
        { echo "$t did not pass on this machine" | tee -a "$summary"; failed=1; }
done

gpu_test=$build/tests/test_kernels_gpu
for tool in memcheck racecheck initcheck; do
    extra=()
    [ $tool = memcheck ] && extra=(--leak-check full)
    VQKV_GPU_TEST_QUICK=1 step "sanitizer-$tool" 240 compute-sanitizer --tool $tool \
        --error-exitcode 1 "${extra[@]}" "$gpu_test"
done

step codec_gpu 300 "$build/bench/codec_gpu" --json "$out/codec_gpu.json"
cp "$out/codec_gpu.log" "$out/codec_gpu.txt" 2>/dev/null

# The daemon's CUDA backend between worker processes needs the whole build,
# so the daemon's libraries too (fetch-debs.sh with libmicrohttpd-dev,
# libjson-c-dev, libssl-dev among its packages); without them it is skipped
# and says so. The worker soak is shortened under memcheck.
if pkg-config --exists libuv libprotobuf-c libmicrohttpd libsystemd inih json-c libcrypto; then
    full=build-gpu-full
    step configure-full 120 cmake -S . -B "$full" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DVQKV_CUDA=ON -DVQKV_WERROR=OFF &&
        step build-full 300 cmake --build "$full" -j"$jobs" --target test_cuda_daemon test_cuda_store vqkvd libvqkv &&
        {
            # The pool's store over pieces, and over 64 GiB where the GPU has it.
            step cuda-store 120 "$full/tests/test_cuda_store" gpu
            VQKV_GPU_SOAK_S=30 step cuda-daemon 180 "$full/tests/test_cuda_daemon"
            VQKV_GPU_SOAK_S=5 VQKV_DAEMON_WRAPPER="compute-sanitizer --tool memcheck --error-exitcode 1" \
                step cuda-daemon-memcheck 240 "$full/tests/test_cuda_daemon"
            # The headline: a Llama-8B-shaped prefix restored through vqkvd
            # against its prefill (the machine's own torch).
            VQKV_LIBRARY="$full/client/libvqkv.so" step restore 300 python3 bench/restore.py \
                --vqkvd "$full/daemon/vqkvd" --json "$out/restore.json"
            # Gets and puts through vqkvd from 1 and 8 worker processes, a
            # short run (the full one: bench/serve_gpu.py's defaults).
            VQKV_LIBRARY="$full/client/libvqkv.so" step serve-gpu 240 python3 bench/serve_gpu.py \
                --vqkvd "$full/daemon/vqkvd" --codec-gpu "$build/bench/codec_gpu" \
                --sizes 16M,256M --seconds 1 --json "$out/serve_gpu.json"
        }
else
    echo "cuda-daemon            SKIP (the daemon's libraries are not in .devdeps)" | tee -a "$summary"
fi

cat "$out/device.txt"
cat "$out/codec_gpu.txt" 2>/dev/null
echo "---"
cat "$summary"
exit $failed
