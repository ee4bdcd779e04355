/* fuzz_block_keys.c -- the chained block keys (client/block_keys.h).
 *
 * Input: a 32-byte salt, then three length-prefixed strings (u8 length):
 * model_id, codec_id and extra, then block_tokens (u8; 0 is refused), a
 * split (u8) and max_keys slack (u8), then the tokens as u32le until the
 * input ends. Short inputs are padded with zeros.
 *
 * Invariants: the keys equal an independent SHA-256 of the byte sequence
 * block_keys.h documents, built here in one buffer per block; computing
 * twice gives the same keys; continuing from the key before block `split`
 * gives the tail of the whole chain, also with the parent pointing into the
 * output array; too small a max_keys, an empty id or block_tokens 0 is
 * VQKV_EINVAL with nothing written; every key survives hex and back, and
 * the hex parser accepts a string exactly when it is 64 hex digits.
 */
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "block_keys.h"
#include "fuzz.h"

#define FUZZ_MAX_KEYS 512

typedef struct {
    const uint8_t *p;
    size_t left;
} fuzz__cursor_t;

/* The next n bytes, zeros past the end of the input. */
static void fuzz__take(fuzz__cursor_t *c, void *out, size_t n)
{
    size_t have = n < c->left ? n : c->left;
    memcpy(out, c->p, have);
    memset((uint8_t *)out + have, 0, n - have);
    c->p += have;
    c->left -= have;
}

/* A u8-length-prefixed string into out (NUL-terminated; an embedded NUL
 * ends it early, as it would for any C caller). */
static void fuzz__take_string(fuzz__cursor_t *c, char out[256])
{
    uint8_t len;
    fuzz__take(c, &len, 1);
    fuzz__take(c, out, len);
    out[len] = '\0';
}

static void fuzz__put_u32le(uint8_t *p, uint32_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
    p[2] = (uint8_t)(x >> 16);
    p[3] = (uint8_t)(x >> 24);
}

/* The documented byte sequence of one block, hashed in one piece. */
static void fuzz__reference_key(const vqkv_block_key_ctx_t *ctx, const uint8_t *parent,
                                const uint32_t *tokens, uint32_t block_tokens, const uint8_t *extra,
                                size_t extra_len, uint8_t out[VQKV_BLOCK_KEY_LEN])
{
    size_t mlen = strlen(ctx->model_id), clen = strlen(ctx->codec_id);
    size_t len = 32 + 4 + mlen + 4 + clen + 32 + 4 + 4 * (size_t)block_tokens + 4 + extra_len;
    uint8_t *buf = malloc(len), *p = buf;
    FUZZ_CHECK(buf != NULL, "out of memory");
    memcpy(p, ctx->tenant_salt, 32);
    p += 32;
    fuzz__put_u32le(p, (uint32_t)mlen);
    memcpy(p + 4, ctx->model_id, mlen);
    p += 4 + mlen;
    fuzz__put_u32le(p, (uint32_t)clen);
    memcpy(p + 4, ctx->codec_id, clen);
    p += 4 + clen;
    memcpy(p, parent, 32);
    p += 32;
    fuzz__put_u32le(p, block_tokens);
    p += 4;
    for (uint32_t i = 0; i < block_tokens; i++, p += 4)
        fuzz__put_u32le(p, tokens[i]);
    fuzz__put_u32le(p, (uint32_t)extra_len);
    if (extra_len > 0)
        memcpy(p + 4, extra, extra_len);
    unsigned int out_len = 0;
    FUZZ_CHECK(EVP_Digest(buf, len, out, &out_len, EVP_sha256(), NULL) == 1 && out_len == 32,
               "SHA-256 failed");
    free(buf);
}

static void fuzz__check_hex(const uint8_t *key, const uint8_t *raw, size_t raw_len)
{
    char hex[VQKV_BLOCK_KEY_HEX_LEN];
    uint8_t back[VQKV_BLOCK_KEY_LEN];
    FUZZ_CHECK(vqkv_block_key_hex(key, hex, sizeof hex) == VQKV_OK, "hex");
    FUZZ_CHECK(vqkv_block_key_hex(key, hex, sizeof hex - 1) == VQKV_EINVAL, "short hex buffer");
    FUZZ_CHECK(vqkv_block_key_from_hex(hex, back) == VQKV_OK && memcmp(back, key, 32) == 0,
               "a key does not survive hex and back");
    /* Arbitrary text: accepted exactly when it is 64 hex digits. */
    char text[80];
    size_t n = raw_len < sizeof text - 1 ? raw_len : sizeof text - 1;
    memcpy(text, raw, n);
    text[n] = '\0';
    int want = strlen(text) == 64 && strspn(text, "0123456789abcdefABCDEF") == 64;
    memcpy(back, key, 32);
    int rc = vqkv_block_key_from_hex(text, back);
    FUZZ_CHECK(rc == (want ? VQKV_OK : VQKV_EINVAL), "from_hex(\"%s\") gave %d", text, rc);
    if (rc != VQKV_OK) {
        FUZZ_CHECK(memcmp(back, key, 32) == 0, "a refused hex string changed the key");
        return;
    }
    FUZZ_CHECK(vqkv_block_key_hex(back, hex, sizeof hex) == VQKV_OK && strcasecmp(hex, text) == 0,
               "hex of a parsed key differs from the text");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t keys[FUZZ_MAX_KEYS][VQKV_BLOCK_KEY_LEN],
        again[FUZZ_MAX_KEYS][VQKV_BLOCK_KEY_LEN];
    fuzz__cursor_t c = {data, size};
    vqkv_block_key_ctx_t ctx;
    char model_id[256], codec_id[256], extra_s[256];
    uint8_t extra_len, bt, split, slack;
    fuzz__take(&c, ctx.tenant_salt, sizeof ctx.tenant_salt);
    fuzz__take_string(&c, model_id);
    fuzz__take_string(&c, codec_id);
    fuzz__take(&c, &extra_len, 1);
    fuzz__take(&c, extra_s, extra_len);
    fuzz__take(&c, &bt, 1);
    fuzz__take(&c, &split, 1);
    fuzz__take(&c, &slack, 1);
    const uint8_t *raw_hex = c.p; /* also read as hex text */
    size_t raw_hex_len = c.left;
    size_t n_tokens = c.left / 4;
    uint32_t *tokens = malloc((n_tokens ? n_tokens : 1) * sizeof *tokens);
    FUZZ_CHECK(tokens != NULL, "out of memory");
    for (size_t i = 0; i < n_tokens; i++)
        fuzz__take(&c, &tokens[i], 4); /* host order: the hash must not care */
    ctx.model_id = model_id;
    ctx.codec_id = codec_id;
    const uint8_t *extra = extra_len ? (const uint8_t *)extra_s : NULL;
    uint32_t block_tokens = bt;
    size_t blocks = bt ? n_tokens / bt : 0;
    size_t max_keys = blocks + slack % 4;
    if (max_keys > FUZZ_MAX_KEYS)
        max_keys = FUZZ_MAX_KEYS;

    memset(keys, 0xa5, sizeof keys);
    size_t n_keys = 12345;
    int rc = vqkv_block_keys(&ctx, tokens, n_tokens, block_tokens, extra, extra_len, keys, max_keys,
                             &n_keys);
    int valid = bt != 0 && model_id[0] != '\0' && codec_id[0] != '\0' && blocks <= max_keys;
    if (!valid) {
        FUZZ_CHECK(rc == VQKV_EINVAL, "invalid arguments gave %d", rc);
        FUZZ_CHECK(n_keys == 12345, "a refused call wrote n_keys");
        for (size_t i = 0; i < FUZZ_MAX_KEYS; i++)
            for (size_t j = 0; j < VQKV_BLOCK_KEY_LEN; j++)
                FUZZ_CHECK(keys[i][j] == 0xa5, "a refused call wrote key %zu", i);
        free(tokens);
        return 0;
    }
    FUZZ_CHECK(rc == VQKV_OK && n_keys == blocks, "%zu blocks gave %d, %zu keys", blocks, rc,
               n_keys);

    uint8_t parent[VQKV_BLOCK_KEY_LEN] = {0}, ref[VQKV_BLOCK_KEY_LEN];
    for (size_t i = 0; i < blocks; i++) {
        fuzz__reference_key(&ctx, parent, tokens + i * block_tokens, block_tokens, extra, extra_len,
                            ref);
        FUZZ_CHECK(memcmp(ref, keys[i], 32) == 0, "key %zu differs from the documented hash", i);
        memcpy(parent, keys[i], sizeof parent);
    }

    size_t n_again = 0;
    rc = vqkv_block_keys(&ctx, tokens, n_tokens, block_tokens, extra, extra_len, again, blocks,
                         &n_again);
    FUZZ_CHECK(rc == VQKV_OK && n_again == blocks && memcmp(again, keys, blocks * 32) == 0,
               "keys are not deterministic");

    /* Continuing at block s: from a separate parent, then from a parent
     * inside the output array itself. */
    size_t s = blocks ? split % (blocks + 1) : 0;
    const uint8_t *from = s ? keys[s - 1] : NULL;
    size_t tail = blocks - s;
    rc =
        vqkv_block_keys_continue(&ctx, from, tokens + s * block_tokens, n_tokens - s * block_tokens,
                                 block_tokens, extra, extra_len, again, tail, &n_again);
    FUZZ_CHECK(rc == VQKV_OK && n_again == tail && memcmp(again, keys[s], tail * 32) == 0,
               "continuing at block %zu differs from the whole chain", s);
    if (s > 0 && tail > 0) {
        memcpy(again[0], keys[s - 1], 32);
        rc = vqkv_block_keys_continue(&ctx, again[0], tokens + s * block_tokens,
                                      n_tokens - s * block_tokens, block_tokens, extra, extra_len,
                                      again, tail, &n_again);
        FUZZ_CHECK(rc == VQKV_OK && memcmp(again, keys[s], tail * 32) == 0,
                   "a parent inside the output array gave other keys");
    }

    fuzz__check_hex(blocks ? keys[0] : ctx.tenant_salt, raw_hex, raw_hex_len);
    free(tokens);
    return 0;
}
