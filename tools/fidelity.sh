#!/bin/sh
# The fidelity evaluation: dump SmolLM2-135M's real KV cache over public-domain
# prose, then measure every codec on it (vqkvctl eval) and the perplexity with
# each layer's prefix KV round-tripped through the codec (ppl.py).
# Writes bench/out/fidelity.json and bench/out/ppl.json. Expects
# tools/bootstrap.sh to have made .venv.
# Says which step it is on, one line each on stderr; the steps inherit
# stderr as it is, so on a terminal each shows its progress line (rate, ETA)
# and in a log or a pipe none does.
set -eu
cd "$(dirname "$0")/.."
mkdir -p bench/out
step() {
    echo "fidelity.sh: step $1/3: $2" >&2
}
if [ -f bench/out/kv.safetensors ]; then
    step 1 "KV dump: keeping bench/out/kv.safetensors"
else
    step 1 "KV dump: tools/kvdump.py -> bench/out/kv.safetensors"
    .venv/bin/python tools/kvdump.py --out bench/out/kv.safetensors
fi
codecs="fp16 fp8 kivi4 kivi2 rvq rvq:kgroup=contig rvq:esc=3 rvq:bc=1,esc=3 rvq:r=3 vqkv vqkv:esc=3 rvq:d=16 commvq commvq:d=16"
args=""
for c in $codecs; do args="$args --codec $c"; done
step 2 "codec fidelity: vqkvctl eval -> bench/out/fidelity.json"
./build/client/vqkvctl eval --kv bench/out/kv.safetensors $args --json-file bench/out/fidelity.json
step 3 "perplexity: tools/ppl.py -> bench/out/ppl.json"
.venv/bin/python tools/ppl.py --lib build/kernels/libvqkv_kernels.so $args --json bench/out/ppl.json
