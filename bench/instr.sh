#!/bin/sh
# Instructions per decoded (and encoded) value of each CPU codec, counted by
# callgrind: a figure that, unlike GB/s, comes out the same on a busy
# machine, so that changes to the codecs can be compared run to run.
#
# For each codec, bench/codec_instr runs under
#   valgrind --tool=callgrind --instr-atstart=no
# once with the vector paths (VQKV_CPU_SIMD=1) and once with the scalar
# reference (VQKV_CPU_SIMD=0), a process per codec and per path so each
# count stands alone. codec_instr marks two regions, each dumped on its own:
# the decode of 2 Llama-8B-like blocks as one batch (2 x 32 layers x K,V x
# 32 tokens x 8 heads x 128 = 4194304 values) and the encode of 1 block
# (2097152 values); data, training and the other block's encode are not
# counted.
# The "totals:" line of each dump is the region's instruction count (Ir),
# divided here by the values it handled.
#
# usage: bench/instr.sh [--json FILE] [--no-encode] [SPEC ...]
#   SPEC         codecs (default: fp8 kivi4 kivi2 rvq:d=8,b=8,r=2 vqkv)
#   --json FILE  where the JSON goes (default: bench/out/instr.json)
#   --no-encode  count decode only (quicker: a VQ codec's encode takes
#                1000-1500 instructions a value)
# Prints a table and writes JSON. Builds nothing: run it after
# `cmake --build build --target codec_instr`; VQKV_BUILD_DIR (build) names
# another build folder. Needs valgrind (Debian package valgrind).
set -eu
cd "$(dirname "$0")/.."
build=${VQKV_BUILD_DIR:-build}
json=bench/out/instr.json
encode=1
specs=""
usage() {
    echo "usage: bench/instr.sh [--json FILE] [--no-encode] [SPEC ...]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
    --json)
        [ $# -ge 2 ] || usage
        json=$2
        shift 2
        ;;
    --no-encode)
        encode=0
        shift
        ;;
    -*) usage ;;
    *)
        specs="$specs $1"
        shift
        ;;
    esac
done
specs=${specs:-"fp8 kivi4 kivi2 rvq:d=8,b=8,r=2 vqkv"}

if ! command -v valgrind >/dev/null; then
    echo "instr.sh: valgrind is missing: install it (Debian: apt-get install valgrind)" >&2
    exit 1
fi
prog="$build/bench/codec_instr"
if [ ! -x "$prog" ]; then
    echo "instr.sh: $prog is missing: build it first (cmake --build $build --target codec_instr)" >&2
    exit 1
fi
flags=""
[ "$encode" = 1 ] || flags=--no-encode

dir=$(mktemp -d "${TMPDIR:-/tmp}/vqkv-instr.XXXXXX")
trap 'rm -rf "$dir"' EXIT

# The Ir total of the dump whose trigger was region $2 ("decode" or
# "encode") among callgrind's dumps $1.*.
region_ir() {
    for f in "$1".*; do
        if grep -q "^desc: Trigger: Client Request: $2 " "$f"; then
            awk '/^totals:/ { print $2; exit }' "$f"
            return
        fi
    done
}

# count SPEC SIMD N: runs codec_instr under callgrind, sets line (what it
# printed about the codec), dec_ir and enc_ir.
count() {
    out="$dir/$3.$2.cg" txt="$dir/$3.$2.txt"
    if ! VQKV_CPU_SIMD=$2 valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out" "$prog" $flags "$1" >"$txt" 2>"$dir/log"; then
        cat "$dir/log" >&2
        echo "instr.sh: codec_instr $1 failed under valgrind (VQKV_CPU_SIMD=$2)" >&2
        exit 1
    fi
    if ! grep -q "^callgrind: yes" "$txt"; then
        echo "instr.sh: $prog was built without valgrind/callgrind.h: its regions are" \
            "unmarked (install valgrind and rebuild codec_instr)" >&2
        exit 1
    fi
    line=$(grep "^codec " "$txt")
    dec_ir=$(region_ir "$out" decode)
    enc_ir=$(region_ir "$out" encode)
    if [ -z "$dec_ir" ] || [ "$dec_ir" = 0 ] || { [ "$encode" = 1 ] && [ -z "$enc_ir" ]; }; then
        echo "instr.sh: no instruction count for $1 in callgrind's output ($out.*)" >&2
        exit 1
    fi
}

# Instructions per value, to 2 decimals; nothing when the region was not run.
per_value() {
    [ -z "$1" ] || awk -v ir="$1" -v n="$2" 'BEGIN { printf "%.2f", ir / n }'
}

echo "instructions per value (callgrind Ir), vector paths and scalar (VQKV_CPU_SIMD=0):"
row='%-52s %7s %8s %10s %8s %10s\n'
printf "$row" "codec" "bits" "decode" "dec scalar" "encode" "enc scalar"
rows=""
n=0
for spec in $specs; do
    n=$((n + 1))
    count "$spec" 1 "$n"
    vec_dec=$dec_ir vec_enc=$enc_ir
    count "$spec" 0 "$n"
    read -r _ canon _ bits _ decoded _ encoded <<EOF
$line
EOF
    d1=$(per_value "$vec_dec" "$decoded") d0=$(per_value "$dec_ir" "$decoded")
    e1=$(per_value "$vec_enc" "$encoded") e0=$(per_value "$enc_ir" "$encoded")
    printf "$row" "$canon" "$bits" "$d1" "$d0" "${e1:--}" "${e0:--}"
    [ -z "$rows" ] || rows="$rows,
"
    rows="$rows  {\"codec\": \"$canon\", \"bits_per_value\": $bits, \"decoded_values\": $decoded"
    rows="$rows, \"decode_ir\": $vec_dec, \"decode_ir_per_value\": $d1"
    rows="$rows, \"decode_ir_scalar\": $dec_ir, \"decode_ir_per_value_scalar\": $d0"
    rows="$rows, \"encoded_values\": $encoded, \"encode_ir\": ${vec_enc:-null}"
    rows="$rows, \"encode_ir_per_value\": ${e1:-null}, \"encode_ir_scalar\": ${enc_ir:-null}"
    rows="$rows, \"encode_ir_per_value_scalar\": ${e0:-null}}"
done

mkdir -p "$(dirname "$json")"
{
    printf '{"bench": "instr", "tool": "%s --tool=callgrind", ' "$(valgrind --version)"
    printf '"layout": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, '
    printf '"block_tokens": 32, "dtype": "f16"}, "blocks_decoded": 2, "blocks_encoded": %s, ' \
        "$encode"
    printf '"scalar": "VQKV_CPU_SIMD=0", "results": [\n%s\n]}\n' "$rows"
} >"$json"
echo "JSON in $json"
