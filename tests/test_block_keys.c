/* test_block_keys.c -- the chained block keys (client/block_keys.h).
 *
 * The keys are a cross-process, cross-language contract, so the library is
 * checked against a reference that builds the documented byte string by
 * hand and hashes it with one EVP_Digest call, against vectors computed by
 * Python's hashlib, and against the example bytes in the header itself.
 * The rest checks the properties workers rely on: a prefix's keys are the
 * first keys of the longer sequence, continuing from a parent equals
 * hashing from scratch, every input reaches every later key, partial tails
 * get nothing, field boundaries cannot be shifted, and bad arguments write
 * nothing.
 */
#include "test_util.h"

#include "block_keys.h"

#include <openssl/evp.h>

typedef uint8_t bkey_t[VQKV_BLOCK_KEY_LEN];

/* ---- reference ------------------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} bytes_t;

static void put(bytes_t *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        b->cap = (b->len + len) * 2;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (len > 0)
        memcpy(b->p + b->len, data, len);
    b->len += len;
}

static void put_u32le(bytes_t *b, uint32_t x)
{
    uint8_t le[4] = {(uint8_t)x, (uint8_t)(x >> 8), (uint8_t)(x >> 16), (uint8_t)(x >> 24)};
    put(b, le, 4);
}

/* One key, from the byte sequence documented in block_keys.h, spelled out
 * field by field and hashed in one call. */
static void ref_key(const uint8_t *salt, const char *model_id, const char *codec_id,
                    const uint8_t *parent, const uint32_t *tokens, uint32_t block_tokens,
                    const uint8_t *extra, size_t extra_len, uint8_t *out)
{
    bytes_t b = {0};
    put(&b, salt, 32);
    put_u32le(&b, (uint32_t)strlen(model_id));
    put(&b, model_id, strlen(model_id));
    put_u32le(&b, (uint32_t)strlen(codec_id));
    put(&b, codec_id, strlen(codec_id));
    put(&b, parent, 32);
    put_u32le(&b, block_tokens);
    for (uint32_t j = 0; j < block_tokens; j++)
        put_u32le(&b, tokens[j]);
    put_u32le(&b, (uint32_t)extra_len);
    put(&b, extra, extra_len);
    unsigned int len = 0;
    assert_int_equal(EVP_Digest(b.p, b.len, out, &len, EVP_sha256(), NULL), 1);
    assert_int_equal(len, 32);
    free(b.p);
}

/* The reference chain over every full block, from key_{-1} = zeros. */
static size_t ref_keys(const vqkv_block_key_ctx_t *ctx, const uint32_t *tokens, size_t n_tokens,
                       uint32_t block_tokens, const uint8_t *extra, size_t extra_len, bkey_t *out)
{
    uint8_t parent[32] = {0};
    size_t n = n_tokens / block_tokens;
    for (size_t i = 0; i < n; i++) {
        ref_key(ctx->tenant_salt, ctx->model_id, ctx->codec_id, parent, tokens + i * block_tokens,
                block_tokens, extra, extra_len, out[i]);
        memcpy(parent, out[i], 32);
    }
    return n;
}

static void hex_to_key(const char *hex, uint8_t *key)
{
    assert_ok(vqkv_block_key_from_hex(hex, key));
}

static void assert_key_hex(const uint8_t *key, const char *want)
{
    char got[VQKV_BLOCK_KEY_HEX_LEN];
    assert_ok(vqkv_block_key_hex(key, got, sizeof got));
    assert_string_equal(got, want);
}

static vqkv_block_key_ctx_t make_ctx(uint8_t salt_seed, const char *model_id, const char *codec_id)
{
    vqkv_block_key_ctx_t ctx;
    for (size_t i = 0; i < sizeof ctx.tenant_salt; i++)
        ctx.tenant_salt[i] = (uint8_t)(salt_seed + 31 * i);
    ctx.model_id = model_id;
    ctx.codec_id = codec_id;
    return ctx;
}

static uint32_t *random_tokens(size_t n, uint64_t seed)
{
    uint32_t *t = malloc((n ? n : 1) * sizeof *t);
    assert_non_null(t);
    test_rng_t rng = {seed};
    for (size_t i = 0; i < n; i++)
        t[i] = (uint32_t)(test_rng_uniform(&rng) * 4294967295.0);
    return t;
}

/* ---- known answers -------------------------------------------------------- */

/* Computed with Python's hashlib, independently of this file and of libcrypto:
 *
 *   import hashlib, struct
 *   def u32(x): return struct.pack('<I', x)
 *   def keys(salt, model, codec, tokens, bt, extra=b'', parent=bytes(32)):
 *       out = []; prev = parent
 *       for i in range(len(tokens) // bt):
 *           blk = tokens[i*bt:(i+1)*bt]
 *           m = (salt + u32(len(model)) + model + u32(len(codec)) + codec + prev
 *                + u32(bt) + b''.join(u32(t) for t in blk) + u32(len(extra)) + extra)
 *           prev = hashlib.sha256(m).digest(); out.append(prev.hex())
 *       return out
 *   keys(bytes(32), b'm', b'fp16', [1, 2, 3, 4], 2)
 *   keys(bytes(range(32)), b'meta-llama/Llama-3.1-8B', b'rvq:d=8,r=2',
 *        [0, 1, 0xFFFFFFFF, 128000, 7, 8, 9, 10, 11], 4, b'lora:42')
 */
static void test_python_vectors(void **state)
{
    (void)state;
    bkey_t keys[4];
    size_t n = 99;

    vqkv_block_key_ctx_t a = {{0}, "m", "fp16"};
    const uint32_t ta[] = {1, 2, 3, 4};
    assert_ok(vqkv_block_keys(&a, ta, 4, 2, NULL, 0, keys, 4, &n));
    assert_int_equal(n, 2);
    assert_key_hex(keys[0], "a01f9ce768fdb64f344517a11c47c2a6d358e93d7a66781afded4767d8effb66");
    assert_key_hex(keys[1], "bbabd846bc62382282fe4e63a6b661ac5c5c3363f0fa41668d8d2c5f5c2a0e64");

    vqkv_block_key_ctx_t b = {{0}, "meta-llama/Llama-3.1-8B", "rvq:d=8,r=2"};
    for (size_t i = 0; i < 32; i++)
        b.tenant_salt[i] = (uint8_t)i;
    const uint32_t tb[] = {0, 1, 0xFFFFFFFFu, 128000, 7, 8, 9, 10, 11};
    const uint8_t extra[] = "lora:42";
    assert_ok(vqkv_block_keys(&b, tb, 9, 4, extra, 7, keys, 4, &n));
    assert_int_equal(n, 2);
    assert_key_hex(keys[0], "1b770e1cac2247c1ad648a0530b90d9a6c73db5e426ed54787c9678cf76db21b");
    assert_key_hex(keys[1], "eb6a95e9a8c56b9b67e4aa483a08afb319cc238ffd2ae0dfdc4d78193e0324a3");
}

/* The example bytes printed in block_keys.h, typed in as they appear
 * there, hash to the library's key: the documentation is the contract. */
static void test_header_example(void **state)
{
    (void)state;
    uint8_t msg[32 + 5 + 8 + 32 + 4 + 8 + 4] = {0};
    size_t o = 32;
    const uint8_t model[] = {0x01, 0x00, 0x00, 0x00, 0x6d};
    const uint8_t codec[] = {0x04, 0x00, 0x00, 0x00, 0x66, 0x70, 0x31, 0x36};
    const uint8_t tail[] = {0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
                            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    memcpy(msg + o, model, sizeof model);
    o += sizeof model;
    memcpy(msg + o, codec, sizeof codec);
    o += sizeof codec + 32;
    memcpy(msg + o, tail, sizeof tail);
    o += sizeof tail;
    assert_int_equal(o, sizeof msg);
    uint8_t want[32];
    assert_int_equal(EVP_Digest(msg, sizeof msg, want, NULL, EVP_sha256(), NULL), 1);

    vqkv_block_key_ctx_t ctx = {{0}, "m", "fp16"};
    const uint32_t tokens[] = {1, 2};
    bkey_t key;
    size_t n = 0;
    assert_ok(vqkv_block_keys(&ctx, tokens, 2, 2, NULL, 0, &key, 1, &n));
    assert_int_equal(n, 1);
    assert_memory_equal(key, want, 32);
    /* The same as the first Python vector. */
    assert_key_hex(key, "a01f9ce768fdb64f344517a11c47c2a6d358e93d7a66781afded4767d8effb66");
}

/* Against the reference over block sizes that straddle the library's
 * internal token chunking (256) and with and without extra. */
static void test_matches_reference(void **state)
{
    (void)state;
    const uint32_t sizes[] = {1, 3, 16, 255, 256, 257, 600};
    const uint8_t extra[] = {0x00, 0xff, 0x10, 0x20, 0x30};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        uint32_t bt = sizes[s];
        size_t n_tokens = 5 * (size_t)bt + bt / 2;
        uint32_t *tokens = random_tokens(n_tokens, 100 + s);
        bkey_t got[5], want[5];
        for (size_t e = 0; e <= sizeof extra; e += sizeof extra) {
            vqkv_block_key_ctx_t ctx = make_ctx((uint8_t)s, "org/model-7b", "kivi4:g=32");
            size_t n = 0;
            assert_ok(vqkv_block_keys(&ctx, tokens, n_tokens, bt, e ? extra : NULL, e, got, 5, &n));
            assert_int_equal(n, 5);
            assert_int_equal(ref_keys(&ctx, tokens, n_tokens, bt, e ? extra : NULL, e, want), 5);
            assert_memory_equal(got, want, sizeof want);
        }
        free(tokens);
    }
}

/* ---- chaining ------------------------------------------------------------- */

static void test_prefix_and_continuation(void **state)
{
    (void)state;
    enum { BT = 16, BLOCKS = 8, N = BT * BLOCKS + 5 };
    uint32_t *tokens = random_tokens(N, 7);
    vqkv_block_key_ctx_t ctx = make_ctx(3, "model", "fp8");
    const uint8_t extra[] = "mm:0123";
    bkey_t full[BLOCKS], part[BLOCKS];
    size_t n = 0;
    assert_ok(vqkv_block_keys(&ctx, tokens, N, BT, extra, 7, full, BLOCKS, &n));
    assert_int_equal(n, BLOCKS);

    for (size_t p = 0; p <= BLOCKS; p++) {
        /* A prefix of p blocks (plus a ragged tail) gives the first p keys. */
        size_t m = 99;
        assert_ok(vqkv_block_keys(&ctx, tokens, p * BT + (p % 3), BT, extra, 7, part, BLOCKS, &m));
        assert_int_equal(m, p);
        if (p > 0)
            assert_memory_equal(part, full, p * 32);

        /* Continuing after p blocks gives the rest. */
        const uint8_t *parent = p > 0 ? full[p - 1] : NULL;
        m = 99;
        assert_ok(vqkv_block_keys_continue(&ctx, parent, tokens + p * BT, N - p * BT, BT, extra, 7,
                                           part, BLOCKS, &m));
        assert_int_equal(m, BLOCKS - p);
        if (m > 0)
            assert_memory_equal(part, full[p], m * 32);
    }

    /* A zero parent is the root, the same as NULL. */
    uint8_t zero[32] = {0};
    assert_ok(vqkv_block_keys_continue(&ctx, zero, tokens, N, BT, extra, 7, part, BLOCKS, &n));
    assert_memory_equal(part, full, sizeof full);

    /* The parent may be the output slot it is overwritten by. */
    memcpy(part[0], full[2], 32);
    assert_ok(vqkv_block_keys_continue(&ctx, part[0], tokens + 3 * BT, N - 3 * BT, BT, extra, 7,
                                       part, BLOCKS, &n));
    assert_int_equal(n, BLOCKS - 3);
    assert_memory_equal(part, full[3], n * 32);
    free(tokens);
}

/* ---- sensitivity ---------------------------------------------------------- */

enum { S_BT = 8, S_BLOCKS = 6, S_N = S_BT * S_BLOCKS };

/* keys[0..first) equal base, every key from first on differs from base. */
static void assert_differs_from(const bkey_t *base, const bkey_t *keys, size_t n, size_t first)
{
    for (size_t i = 0; i < n; i++) {
        if (i < first)
            assert_memory_equal(keys[i], base[i], 32);
        else
            assert_memory_not_equal(keys[i], base[i], 32);
    }
}

static void test_every_input_matters(void **state)
{
    (void)state;
    uint32_t *tokens = random_tokens(S_N, 11);
    const uint8_t extra[] = {1, 2, 3};
    vqkv_block_key_ctx_t base_ctx = make_ctx(9, "llama", "rvq");
    bkey_t base[S_BLOCKS], k[S_N];
    size_t n = 0;
    assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, S_BT, extra, 3, base, S_BLOCKS, &n));

    /* Each bit of the salt. */
    for (size_t bit = 0; bit < 256; bit += 37) {
        vqkv_block_key_ctx_t ctx = base_ctx;
        ctx.tenant_salt[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        assert_ok(vqkv_block_keys(&ctx, tokens, S_N, S_BT, extra, 3, k, S_BLOCKS, &n));
        assert_differs_from(base, k, S_BLOCKS, 0);
    }

    vqkv_block_key_ctx_t ctx = base_ctx;
    ctx.model_id = "llamA";
    assert_ok(vqkv_block_keys(&ctx, tokens, S_N, S_BT, extra, 3, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);

    ctx = base_ctx;
    ctx.codec_id = "rvq:d=8";
    assert_ok(vqkv_block_keys(&ctx, tokens, S_N, S_BT, extra, 3, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);

    /* One token, first, middle or last of its block, changes that block's
     * key and every later one, and none before. */
    const size_t positions[] = {0, 3, S_BT - 1, 2 * S_BT + 4, S_N - 1};
    for (size_t p = 0; p < sizeof positions / sizeof positions[0]; p++) {
        size_t at = positions[p];
        tokens[at] ^= 0x80000000u;
        assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, S_BT, extra, 3, k, S_BLOCKS, &n));
        assert_differs_from(base, k, S_BLOCKS, at / S_BT);
        tokens[at] ^= 0x80000000u;
    }

    /* Extra: a byte, its length, its absence. */
    const uint8_t extra2[] = {1, 2, 4};
    assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, S_BT, extra2, 3, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);
    assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, S_BT, extra, 2, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);
    assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, S_BT, NULL, 0, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);

    /* Another block size: no key equals any key of the base chain. */
    const uint32_t other_bt[] = {1, 4, 16};
    for (size_t b = 0; b < 3; b++) {
        assert_ok(vqkv_block_keys(&base_ctx, tokens, S_N, other_bt[b], extra, 3, k, S_N, &n));
        assert_int_equal(n, S_N / other_bt[b]);
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < S_BLOCKS; j++)
                assert_memory_not_equal(k[i], base[j], 32);
    }
    free(tokens);
}

/* Same tokens, same chain, different parent: every key differs. */
static void test_parent_matters(void **state)
{
    (void)state;
    uint32_t *tokens = random_tokens(S_N, 12);
    vqkv_block_key_ctx_t ctx = make_ctx(1, "m", "c");
    bkey_t base[S_BLOCKS], k[S_BLOCKS];
    size_t n = 0;
    assert_ok(vqkv_block_keys(&ctx, tokens, S_N, S_BT, NULL, 0, base, S_BLOCKS, &n));
    uint8_t parent[32] = {0};
    parent[31] = 1;
    assert_ok(vqkv_block_keys_continue(&ctx, parent, tokens, S_N, S_BT, NULL, 0, k, S_BLOCKS, &n));
    assert_differs_from(base, k, S_BLOCKS, 0);
    free(tokens);
}

/* ---- tails and boundaries ------------------------------------------------- */

static void test_tail_ignored(void **state)
{
    (void)state;
    enum { BT = 5 };
    uint32_t *tokens = random_tokens(4 * BT, 13);
    vqkv_block_key_ctx_t ctx = make_ctx(2, "m", "fp16");
    bkey_t base[3], k[4];
    size_t n = 0;
    assert_ok(vqkv_block_keys(&ctx, tokens, 3 * BT, BT, NULL, 0, base, 3, &n));
    assert_int_equal(n, 3);
    for (size_t r = 1; r < BT; r++) {
        /* The tail's tokens do not matter either. */
        tokens[3 * BT] = (uint32_t)r * 977u;
        memset(k, 0xa5, sizeof k);
        assert_ok(vqkv_block_keys(&ctx, tokens, 3 * BT + r, BT, NULL, 0, k, 3, &n));
        assert_int_equal(n, 3);
        assert_memory_equal(k, base, sizeof base);
    }

    /* Fewer tokens than a block: no keys, nothing written, and no output
     * array needed. */
    for (size_t t = 0; t < BT; t++) {
        memset(k, 0xa5, sizeof k);
        n = 99;
        assert_ok(vqkv_block_keys(&ctx, tokens, t, BT, NULL, 0, k, 4, &n));
        assert_int_equal(n, 0);
        for (size_t i = 0; i < sizeof k; i++)
            assert_int_equal(((uint8_t *)k)[i], 0xa5);
        n = 99;
        assert_ok(vqkv_block_keys(&ctx, t ? tokens : NULL, t, BT, NULL, 0, NULL, 0, &n));
        assert_int_equal(n, 0);
    }
    free(tokens);
}

/* Moving bytes across a field boundary never gives the same key. */
static void test_unambiguous(void **state)
{
    (void)state;
    const uint32_t tokens[] = {5, 4, 0, 0};
    bkey_t a, b;
    size_t n = 0;

    vqkv_block_key_ctx_t ab_c = make_ctx(0, "ab", "c");
    vqkv_block_key_ctx_t a_bc = make_ctx(0, "a", "bc");
    assert_ok(vqkv_block_keys(&ab_c, tokens, 2, 2, NULL, 0, &a, 1, &n));
    assert_ok(vqkv_block_keys(&a_bc, tokens, 2, 2, NULL, 0, &b, 1, &n));
    assert_memory_not_equal(a, b, 32);

    /* Without the token count in the hash these two would share bytes:
     * [5] then extra {0,0,0,0}, and [5, 4] then no extra. */
    const uint8_t zeros4[4] = {0};
    assert_ok(vqkv_block_keys(&ab_c, tokens, 1, 1, zeros4, 4, &a, 1, &n));
    assert_ok(vqkv_block_keys(&ab_c, tokens, 2, 2, NULL, 0, &b, 1, &n));
    assert_memory_not_equal(a, b, 32);

    /* Codec id bytes against extra bytes. */
    vqkv_block_key_ctx_t c1 = make_ctx(0, "m", "fp16");
    vqkv_block_key_ctx_t c2 = make_ctx(0, "m", "fp1");
    const uint8_t six[] = "6";
    assert_ok(vqkv_block_keys(&c1, tokens, 2, 2, NULL, 0, &a, 1, &n));
    assert_ok(vqkv_block_keys(&c2, tokens, 2, 2, six, 1, &b, 1, &n));
    assert_memory_not_equal(a, b, 32);

    /* NULL extra and an empty one are the same input. */
    assert_ok(vqkv_block_keys(&c1, tokens, 2, 2, NULL, 0, &a, 1, &n));
    assert_ok(vqkv_block_keys(&c1, tokens, 2, 2, six, 0, &b, 1, &n));
    assert_memory_equal(a, b, 32);
}

/* ---- arguments ------------------------------------------------------------ */

static void test_argument_errors(void **state)
{
    (void)state;
    const uint32_t tokens[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const uint8_t extra[1] = {0};
    vqkv_block_key_ctx_t ctx = make_ctx(4, "m", "fp16");
    bkey_t keys[4];
    uint8_t sentinel[sizeof keys];
    memset(keys, 0x5a, sizeof keys);
    memset(sentinel, 0x5a, sizeof sentinel);
    size_t n = 1234;

#define EXPECT_EINVAL(call)                                                                        \
    do {                                                                                           \
        assert_rc(call, VQKV_EINVAL);                                                              \
        assert_memory_equal(keys, sentinel, sizeof keys);                                          \
        assert_int_equal(n, 1234);                                                                 \
    } while (0)

    EXPECT_EINVAL(vqkv_block_keys(NULL, tokens, 8, 2, NULL, 0, keys, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 2, NULL, 0, keys, 4, NULL));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, NULL, 8, 2, NULL, 0, keys, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 2, NULL, 0, NULL, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 2, NULL, 1, keys, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 0, NULL, 0, keys, 4, &n));
    /* Four blocks do not fit in three keys, nor one in none. */
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 2, NULL, 0, keys, 3, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 8, NULL, 0, keys, 0, &n));
    EXPECT_EINVAL(vqkv_block_keys(&ctx, tokens, 8, 8, NULL, 0, NULL, 0, &n));
    /* The length would not fit its u32 prefix; extra is never read. */
    if (SIZE_MAX > UINT32_MAX)
        EXPECT_EINVAL(
            vqkv_block_keys(&ctx, tokens, 8, 2, extra, (size_t)UINT32_MAX + 1, keys, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys_continue(NULL, keys[0], tokens, 8, 2, NULL, 0, keys, 4, &n));
    EXPECT_EINVAL(vqkv_block_keys_continue(&ctx, keys[0], tokens, 8, 2, NULL, 0, keys, 3, &n));

    vqkv_block_key_ctx_t bad = ctx;
    bad.model_id = NULL;
    EXPECT_EINVAL(vqkv_block_keys(&bad, tokens, 8, 2, NULL, 0, keys, 4, &n));
    bad.model_id = "";
    EXPECT_EINVAL(vqkv_block_keys(&bad, tokens, 8, 2, NULL, 0, keys, 4, &n));
    bad = ctx;
    bad.codec_id = NULL;
    EXPECT_EINVAL(vqkv_block_keys(&bad, tokens, 8, 2, NULL, 0, keys, 4, &n));
    bad.codec_id = "";
    EXPECT_EINVAL(vqkv_block_keys(&bad, tokens, 8, 2, NULL, 0, keys, 4, &n));
    /* Invalid ids are refused even when there is nothing to hash, so a
     * misconfigured worker fails on its first call. */
    EXPECT_EINVAL(vqkv_block_keys(&bad, tokens, 1, 2, NULL, 0, keys, 4, &n));
#undef EXPECT_EINVAL

    /* Exactly enough room is enough. */
    assert_ok(vqkv_block_keys(&ctx, tokens, 8, 2, NULL, 0, keys, 4, &n));
    assert_int_equal(n, 4);
}

/* ---- hex ------------------------------------------------------------------ */

static void test_hex(void **state)
{
    (void)state;
    uint8_t key[32], back[32];
    for (size_t i = 0; i < 32; i++)
        key[i] = (uint8_t)(i * 0x11 + 0x0f);
    char hex[VQKV_BLOCK_KEY_HEX_LEN];
    assert_ok(vqkv_block_key_hex(key, hex, sizeof hex));
    assert_string_equal(hex, "0f20314253647586"
                             "97a8b9cadbecfd0e"
                             "1f30415263748596"
                             "a7b8c9daebfc0d1e");
    assert_ok(vqkv_block_key_from_hex(hex, back));
    assert_memory_equal(back, key, 32);

    /* Upper case parses to the same key. */
    char upper[VQKV_BLOCK_KEY_HEX_LEN];
    for (size_t i = 0; i < sizeof hex; i++)
        upper[i] = (hex[i] >= 'a' && hex[i] <= 'f') ? (char)(hex[i] - 'a' + 'A') : hex[i];
    memset(back, 0, sizeof back);
    hex_to_key(upper, back);
    assert_memory_equal(back, key, 32);

    /* Too short a buffer: nothing written. */
    char small[VQKV_BLOCK_KEY_HEX_LEN];
    memset(small, 'x', sizeof small);
    assert_rc(vqkv_block_key_hex(key, small, sizeof small - 1), VQKV_EINVAL);
    for (size_t i = 0; i < sizeof small; i++)
        assert_int_equal(small[i], 'x');
    assert_rc(vqkv_block_key_hex(NULL, small, sizeof small), VQKV_EINVAL);
    assert_rc(vqkv_block_key_hex(key, NULL, sizeof small), VQKV_EINVAL);

    /* Malformed input leaves the key untouched. */
    char bad[VQKV_BLOCK_KEY_HEX_LEN + 1];
    memset(back, 0x77, sizeof back);
    uint8_t untouched[32];
    memset(untouched, 0x77, sizeof untouched);
    const char *cases[] = {"",
                           "0f",
                           "0f2031425364758697a8b9cadbecfd0e1f30415263748596a7b8c9daebfc0d1",
                           "0f2031425364758697a8b9cadbecfd0e1f30415263748596a7b8c9daebfc0d1e0",
                           "0f2031425364758697a8b9cadbecfd0e1f30415263748596a7b8c9daebfc0d1g",
                           " f2031425364758697a8b9cadbecfd0e1f30415263748596a7b8c9daebfc0d1e"};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        snprintf(bad, sizeof bad, "%s", cases[c]);
        assert_rc(vqkv_block_key_from_hex(bad, back), VQKV_EINVAL);
        assert_memory_equal(back, untouched, 32);
    }
    assert_rc(vqkv_block_key_from_hex(NULL, back), VQKV_EINVAL);
    assert_rc(vqkv_block_key_from_hex(hex, NULL), VQKV_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_python_vectors),      cmocka_unit_test(test_header_example),
        cmocka_unit_test(test_matches_reference),   cmocka_unit_test(test_prefix_and_continuation),
        cmocka_unit_test(test_every_input_matters), cmocka_unit_test(test_parent_matters),
        cmocka_unit_test(test_tail_ignored),        cmocka_unit_test(test_unambiguous),
        cmocka_unit_test(test_argument_errors),     cmocka_unit_test(test_hex),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
