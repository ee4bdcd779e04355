/* block_keys.c -- chained SHA-256 block keys (block_keys.h has the exact
 * byte sequence).
 *
 * The fields before the parent key (salt, model id, codec id) are the same
 * for every block, so they are absorbed once into a template digest context
 * and each block starts from a copy of it. Token ids are serialized through
 * a small stack buffer so the result is little-endian on any host without a
 * per-block allocation.
 */
#include "block_keys.h"

#include <openssl/evp.h>

#include <string.h>

/* Tokens serialized per EVP_DigestUpdate call: large enough that the call
 * overhead vanishes, small enough for the stack. */
#define TOKEN_CHUNK 256

static void put_u32le(uint8_t *p, uint32_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
    p[2] = (uint8_t)(x >> 16);
    p[3] = (uint8_t)(x >> 24);
}

/* A length prefix then the bytes: the framing of every variable field. */
static int update_prefixed(EVP_MD_CTX *md, const void *data, uint32_t len)
{
    uint8_t prefix[4];
    put_u32le(prefix, len);
    if (EVP_DigestUpdate(md, prefix, sizeof prefix) != 1)
        return 0;
    return len == 0 || EVP_DigestUpdate(md, data, len) == 1;
}

/* An id must be non-empty and its length must fit the u32 prefix. */
static int id_ok(const char *id)
{
    return id != NULL && id[0] != '\0' && strlen(id) <= UINT32_MAX;
}

static int hash_block(EVP_MD_CTX *md, const EVP_MD_CTX *prefix, const uint8_t *parent,
                      const uint32_t *tokens, uint32_t block_tokens, const uint8_t *extra,
                      uint32_t extra_len, uint8_t *out)
{
    uint8_t buf[4 * TOKEN_CHUNK];
    unsigned int out_len = 0;

    if (EVP_MD_CTX_copy_ex(md, prefix) != 1)
        return 0;
    if (EVP_DigestUpdate(md, parent, VQKV_BLOCK_KEY_LEN) != 1)
        return 0;
    put_u32le(buf, block_tokens);
    if (EVP_DigestUpdate(md, buf, 4) != 1)
        return 0;
    for (uint32_t done = 0; done < block_tokens;) {
        uint32_t n = block_tokens - done < TOKEN_CHUNK ? block_tokens - done : TOKEN_CHUNK;
        for (uint32_t j = 0; j < n; j++)
            put_u32le(buf + 4 * j, tokens[done + j]);
        if (EVP_DigestUpdate(md, buf, 4 * (size_t)n) != 1)
            return 0;
        done += n;
    }
    if (!update_prefixed(md, extra, extra_len))
        return 0;
    return EVP_DigestFinal_ex(md, out, &out_len) == 1 && out_len == VQKV_BLOCK_KEY_LEN;
}

int vqkv_block_keys_continue(const vqkv_block_key_ctx_t *ctx, const uint8_t *parent,
                             const uint32_t *tokens, size_t n_tokens, uint32_t block_tokens,
                             const uint8_t *extra, size_t extra_len,
                             uint8_t (*keys)[VQKV_BLOCK_KEY_LEN], size_t max_keys, size_t *n_keys)
{
    if (ctx == NULL || n_keys == NULL || block_tokens == 0)
        return VQKV_EINVAL;
    if (!id_ok(ctx->model_id) || !id_ok(ctx->codec_id))
        return VQKV_EINVAL;
    if ((tokens == NULL && n_tokens > 0) || (extra == NULL && extra_len > 0))
        return VQKV_EINVAL;
    if (extra_len > UINT32_MAX || (keys == NULL && max_keys > 0))
        return VQKV_EINVAL;
    size_t n_blocks = n_tokens / block_tokens;
    if (n_blocks > max_keys)
        return VQKV_EINVAL;
    if (n_blocks == 0) {
        *n_keys = 0;
        return VQKV_OK;
    }

    /* Copied first: parent may be one of the keys about to be written. */
    uint8_t prev[VQKV_BLOCK_KEY_LEN] = {0};
    if (parent != NULL)
        memcpy(prev, parent, sizeof prev);

    /* libcrypto's default provider fails here only when it cannot
     * allocate, hence ENOMEM for every failure. */
    int rc = VQKV_ENOMEM;
    EVP_MD_CTX *prefix = EVP_MD_CTX_new();
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (prefix == NULL || md == NULL)
        goto out;
    if (EVP_DigestInit_ex(prefix, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(prefix, ctx->tenant_salt, sizeof ctx->tenant_salt) != 1 ||
        !update_prefixed(prefix, ctx->model_id, (uint32_t)strlen(ctx->model_id)) ||
        !update_prefixed(prefix, ctx->codec_id, (uint32_t)strlen(ctx->codec_id)))
        goto out;

    for (size_t i = 0; i < n_blocks; i++) {
        if (!hash_block(md, prefix, prev, tokens + i * block_tokens, block_tokens, extra,
                        (uint32_t)extra_len, keys[i]))
            goto out;
        memcpy(prev, keys[i], sizeof prev);
    }
    *n_keys = n_blocks;
    rc = VQKV_OK;
out:
    EVP_MD_CTX_free(md);
    EVP_MD_CTX_free(prefix);
    return rc;
}

int vqkv_block_keys(const vqkv_block_key_ctx_t *ctx, const uint32_t *tokens, size_t n_tokens,
                    uint32_t block_tokens, const uint8_t *extra, size_t extra_len,
                    uint8_t (*keys)[VQKV_BLOCK_KEY_LEN], size_t max_keys, size_t *n_keys)
{
    return vqkv_block_keys_continue(ctx, NULL, tokens, n_tokens, block_tokens, extra, extra_len,
                                    keys, max_keys, n_keys);
}

int vqkv_block_key_hex(const uint8_t *key, char *out, size_t out_len)
{
    static const char digits[] = "0123456789abcdef";

    if (key == NULL || out == NULL || out_len < VQKV_BLOCK_KEY_HEX_LEN)
        return VQKV_EINVAL;
    for (size_t i = 0; i < VQKV_BLOCK_KEY_LEN; i++) {
        out[2 * i] = digits[key[i] >> 4];
        out[2 * i + 1] = digits[key[i] & 0x0f];
    }
    out[2 * VQKV_BLOCK_KEY_LEN] = '\0';
    return VQKV_OK;
}

/* Not isxdigit(): the locale must not widen what a key may look like. */
static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int vqkv_block_key_from_hex(const char *hex, uint8_t *key)
{
    uint8_t tmp[VQKV_BLOCK_KEY_LEN];

    if (hex == NULL || key == NULL)
        return VQKV_EINVAL;
    for (size_t i = 0; i < VQKV_BLOCK_KEY_LEN; i++) {
        /* A short string stops at its NUL here, which hex_value refuses,
         * so nothing past it is read. */
        int hi = hex_value(hex[2 * i]);
        if (hi < 0)
            return VQKV_EINVAL;
        int lo = hex_value(hex[2 * i + 1]);
        if (lo < 0)
            return VQKV_EINVAL;
        tmp[i] = (uint8_t)(hi << 4 | lo);
    }
    if (hex[2 * VQKV_BLOCK_KEY_LEN] != '\0')
        return VQKV_EINVAL;
    memcpy(key, tmp, sizeof tmp);
    return VQKV_OK;
}
