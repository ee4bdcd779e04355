#!/bin/sh
# The serving benchmark: vqkvd's control plane and restore path with 1, 8
# and 64 client processes (vqkv-benchmark), next to redis-server on a Unix
# socket driven by redis-benchmark with the same client counts as the
# anchor, then the capacity of a 256 MiB pool per codec and model shape,
# each measured by filling a fresh vqkvd until it evicts.
#
# Anchors: a 3-byte GET is the closest thing Redis has to a lookup (a small
# request, a small reply); a GET of the bytes one vqkv get writes (K blocks
# of f16 KV) moves the same payload a get does, except that Redis copies
# stored bytes into a socket while vqkvd decodes compressed ones into the
# worker's memory.
#
# Writes bench/out/serve.json and prints one table for serving and one for
# capacity. Builds nothing: run it after `cmake --build --preset default`.
# Settings from the environment: VQKV_BUILD_DIR (build), VQKV_CODEC (kivi4),
# VQKV_BENCH_SECONDS (5 per vqkv run), VQKV_BENCH_CLIENTS ("1 8 64"),
# VQKV_REDIS_REQUESTS (4000 large GETs; small ones run 25x as many),
# VQKV_BENCH_PARTS ("serving capacity": which halves run).
#
# A VQ codec is measured after online calibration, in both parts: vqkvd
# starts with --calibration-tokens 1024, the benchmark puts as many warm-up
# tokens, waits for the codebooks and evicts the warm-up before it counts.
set -eu
cd "$(dirname "$0")/.."
build=${VQKV_BUILD_DIR:-build}
vqkvd_who=serve.sh
. tools/vqkvd.sh
codec=${VQKV_CODEC:-kivi4}
seconds=${VQKV_BENCH_SECONDS:-5}
clients=${VQKV_BENCH_CLIENTS:-"1 8 64"}
redis_n=${VQKV_REDIS_REQUESTS:-4000}
parts=${VQKV_BENCH_PARTS:-"serving capacity"}
part() { case " $parts " in *" $1 "*) return 0 ;; esac; return 1; }
calib_tokens=1024
bench="$build/bench/vqkv-benchmark"
for tool in "$build/daemon/vqkvd" "$build/client/vqkvctl" "$bench"; do
    if [ ! -x "$tool" ]; then
        echo "serve.sh: $tool is missing: build first (cmake --build --preset default -j2)" >&2
        exit 1
    fi
done
for tool in redis-server redis-cli redis-benchmark jq; do
    if ! command -v "$tool" >/dev/null; then
        echo "serve.sh: $tool is missing: tools/bootstrap.sh installs it" >&2
        exit 1
    fi
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/vqkv-serve.XXXXXX")
vqkvd_pid=""
redis_pid=""
cleanup() {
    for p in $vqkvd_pid $redis_pid; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# Starts vqkvd with pool size $1 on $dir/vqkv.sock and waits until it answers.
vqkvd_start() {
    rm -f "$dir/vqkv.sock"
    rm -rf "$dir/state"
    "$build/daemon/vqkvd" --socket "$dir/vqkv.sock" --pool-bytes "$1" --log-level warn \
        --config /dev/null --state-dir "$dir/state" --calibration-tokens "$calib_tokens" &
    vqkvd_pid=$!
    vqkvd_wait_ready "$vqkvd_pid" "$dir/vqkv.sock"
}

vqkvd_stop() {
    vqkvd_terminate "$vqkvd_pid"
    vqkvd_pid=""
}

# ---- vqkvd serving ------------------------------------------------------------
if part serving; then
# One daemon for every client count, as a node would run it; 1 GiB so the
# clients' puts rarely have to evict.
vqkvd_start 1G
for n in $clients; do
    echo "vqkv-benchmark: $n clients, $seconds s, codec $codec" >&2
    "$bench" --socket "$dir/vqkv.sock" --clients "$n" --seconds "$seconds" --codec "$codec" \
        --warmup-tokens "$calib_tokens" --json "$dir/vqkv-$n.json" >&2
done
vqkvd_stop

# ---- the redis anchor -----------------------------------------------------------
get_bytes=$(jq '.block_logical_bytes * .blocks_per_get' "$dir/vqkv-$(echo $clients | cut -d' ' -f1).json")
redis-server --port 0 --unixsocket "$dir/redis.sock" --save "" --appendonly no \
    --daemonize no --loglevel warning >"$dir/redis.log" 2>&1 &
redis_pid=$!
tries=0
until redis-cli -s "$dir/redis.sock" ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    if ! kill -0 "$redis_pid" 2>/dev/null || [ "$tries" -ge 600 ]; then
        echo "serve.sh: redis-server did not come up" >&2
        exit 1
    fi
    sleep 0.1
done
# redis-benchmark --csv: "test","rps","avg_latency_ms","min_latency_ms",
# "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms".
# SET runs first so that GET finds a value of the size asked for.
redis_run() { # clients value_bytes requests
    redis-benchmark -s "$dir/redis.sock" -t set,get -c "$1" -n "$3" -d "$2" --csv |
        tr -d '"' | awk -F, -v c="$1" -v d="$2" '$1 == "GET" {
            printf "{\"bench\": \"redis-benchmark\", \"test\": \"GET\", \"clients\": %d, ", c
            printf "\"value_bytes\": %d, \"rps\": %s, \"gbps\": %.4f, ", d, $2, $2 * d / 1e9
            printf "\"p50_us\": %.1f, \"p99_us\": %.1f}\n", $5 * 1000, $7 * 1000 }'
}
for n in $clients; do
    echo "redis-benchmark: $n clients" >&2
    redis_run "$n" 3 $((redis_n * 25)) >"$dir/redis-small-$n.json"
    redis_run "$n" "$get_bytes" "$redis_n" >"$dir/redis-large-$n.json"
done
kill "$redis_pid"
wait "$redis_pid" 2>/dev/null || true
redis_pid=""
fi

# ---- capacity ------------------------------------------------------------------
if part capacity; then
for shape in llama3-8b smollm2-135m; do
    for c in fp16 fp8 kivi4 kivi2 rvq:d=8,b=8,r=2 vqkv; do
        echo "capacity: $shape $c" >&2
        vqkvd_start 256M
        "$bench" --socket "$dir/vqkv.sock" --capacity --shape "$shape" --codec "$c" \
            --warmup-tokens "$calib_tokens" --json "$dir/cap-$shape-$c.json" >&2
        vqkvd_stop
    done
done
fi

# ---- results --------------------------------------------------------------------
mkdir -p bench/out
jq -s '{bench: "serve",
        vqkv: [.[] | select(.bench == "vqkv-benchmark" and .mode == "serve")] | sort_by(.clients),
        redis: [.[] | select(.bench == "redis-benchmark")] | sort_by(.clients, .value_bytes),
        capacity: [.[] | select(.mode == "capacity")]}' \
    $(find "$dir" -maxdepth 1 -name '*.json' | sort) >bench/out/serve.json

if part serving; then
echo
echo "Serving: vqkvd ($codec, SmolLM2-135M shape, 4-block gets) and redis-server, Unix sockets"
jq -r '
  (.vqkv | sort_by(.clients)) as $v | (.redis | sort_by(.clients)) as $r |
  ["clients", "what", "ops/s", "GB/s", "p50 us", "p99 us"],
  ($v[] | . as $x | ($r | map(select(.clients == $x.clients))) as $rc |
    [.clients, "vqkv lookup", .lookups_per_s, "", .lookup_p50_us, .lookup_p99_us],
    ($rc[] | select(.value_bytes <= 3) | [.clients, "redis GET \(.value_bytes) B", .rps, "", .p50_us, .p99_us]),
    [.clients, "vqkv get (\(.blocks_per_get) blocks)", .gets_per_s, .get_gbps, .get_p50_us, .get_p99_us],
    ($rc[] | select(.value_bytes > 3) | [.clients, "redis GET \(.value_bytes) B", .rps, .gbps, .p50_us, .p99_us]))
  | map(tostring) | @tsv' bench/out/serve.json |
    awk -F'\t' 'NR == 1 { printf "%-8s %-24s %10s %8s %10s %10s\n", $1, $2, $3, $4, $5, $6; next }
                { printf "%-8s %-24s %10.0f %8s %10.1f %10.1f\n", $1, $2, $3,
                         $4 == "" ? "" : sprintf("%.3f", $4), $5, $6 }'
fi
if part capacity; then
echo
echo "Capacity: tokens held per GiB of a 256 MiB pool, filled until the first eviction"
jq -r '
  ["shape", "codec", "block bytes", "blocks held", "tokens/GiB", "vs fp16"],
  (.capacity | group_by(.shape)[] |
    (map(select(.codec | startswith("fp16")))[0].tokens_per_gib) as $base |
    sort_by(.block_bytes) | reverse | .[] |
    [.shape, .codec, .block_bytes, .blocks_held, .tokens_per_gib, .tokens_per_gib / $base])
  | map(tostring) | @tsv' bench/out/serve.json |
    awk -F'\t' 'NR == 1 { printf "%-13s %-24s %12s %12s %11s %8s\n", $1, $2, $3, $4, $5, $6; next }
                { printf "%-13s %-24s %12s %12s %11.0f %7.2fx\n", $1, $2, $3, $4, $5, $6 }'
fi
echo
echo "bench/out/serve.json written"
