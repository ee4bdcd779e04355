#!/bin/sh
# The fidelity evaluation: dump SmolLM2-135M's real KV cache over public-domain
# prose, measure every codec on it (vqkvctl eval), then the perplexity with
# each layer's prefix KV round-tripped through the codec (ppl.py) on two
# books, 32 sequences each, with the standard error of every change.
#
#   tools/fidelity.sh           the full run (26 min 21 s on 2 cores with the KV
#                               dump kept, timed with the earlier 2048-token
#                               calibration and more codecs)
#   tools/fidelity.sh --quick   8 sequences of one book, the candidate
#                               codecs only (3 min 57 s with the
#                               8192-token calibration)
#
# Writes bench/out/fidelity.json and bench/out/ppl_<book>.json (--quick:
# bench/out/ppl_quick.json). Expects tools/bootstrap.sh to have made .venv.
# Says which step it is on, one line each on stderr; the steps inherit
# stderr as it is, so on a terminal each shows its progress line (rate, ETA)
# and in a log or a pipe none does.
set -eu
cd "$(dirname "$0")/.."
mkdir -p bench/out
books=/usr/share/gocode/src/github.com/pierrec/lz4/testdata
# The candidates at 2.25, 3.25 and 1.25 bits/value: the default shared
# codebook set, and a set per kv head (ph=1).
recommended="rvq rvq:r=3 rvq:d=16 rvq:ph=1 rvq:r=3,ph=1 rvq:d=16,ph=1"
# Codebooks trained as vqkvd trains them by default: on its first 8192
# tokens, which arrive as the first blocks of many requests, each from
# position 0 (here 16 windows of 512 tokens before the evaluated ones).
calib="--calib 8192 --calib-windows 16"
codec_args() {
    for c in "$@"; do printf ' --codec %s' "$c"; done
}
step() {
    echo "fidelity.sh: step $1: $2" >&2
}
if [ "${1:-}" = "--quick" ]; then
    step 1/1 "perplexity, 8 sequences: tools/ppl.py -> bench/out/ppl_quick.json"
    # shellcheck disable=SC2046,SC2086
    .venv/bin/python tools/ppl.py --sequences 8 $calib $(codec_args $recommended) --json bench/out/ppl_quick.json
    exit 0
fi
if [ -f bench/out/kv.safetensors ]; then
    step 1/4 "KV dump: keeping bench/out/kv.safetensors"
else
    step 1/4 "KV dump: tools/kvdump.py -> bench/out/kv.safetensors"
    .venv/bin/python tools/kvdump.py --out bench/out/kv.safetensors
fi
eval_codecs="fp16 fp8 kivi4 kivi2 rvq rvq:kgroup=contig rvq:esc=3 rvq:bc=1,esc=3 rvq:r=3 vqkv vqkv:esc=3 rvq:d=16 commvq commvq:d=16 rvq:r=3,dv=16,rv=2 rvq:r=4,dv=8,rv=2 rvq:d=16,r=3,dv=32,rv=2"
step 2/4 "codec fidelity: vqkvctl eval -> bench/out/fidelity.json"
# shellcheck disable=SC2046,SC2086
./build/client/vqkvctl eval --kv bench/out/kv.safetensors $(codec_args $eval_codecs) --json-file bench/out/fidelity.json
ppl_codecs="kivi2 $recommended"
step 3/4 "perplexity on Sherlock Holmes, 32 sequences -> bench/out/ppl_sherlock.json"
# shellcheck disable=SC2046,SC2086
.venv/bin/python tools/ppl.py --sequences 32 $calib $(codec_args $ppl_codecs) --json bench/out/ppl_sherlock.json
step 4/4 "perplexity on Tom Sawyer, 32 sequences -> bench/out/ppl_sawyer.json"
# shellcheck disable=SC2046,SC2086
.venv/bin/python tools/ppl.py --sequences 32 $calib --text "$books/Mark.Twain-Tom.Sawyer.txt" \
    $(codec_args $ppl_codecs) --json bench/out/ppl_sawyer.json
