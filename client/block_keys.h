/* block_keys.h -- the chained block keys every vqkv process must agree on.
 *
 * A block key names one full block of block_tokens tokens together with
 * everything before it, so two workers that share a prefix share its keys
 * and the daemon can find the longest run it already holds. Keys are
 * computed here, in the client library, and only here: the daemon never
 * hashes tokens, and nothing depends on the process, the TP rank, the host's
 * byte order or a language's hash seed. Other languages reimplement the
 * byte sequence below; tests/test_block_keys.c holds vectors to check
 * against.
 *
 * The key of block i (0-based) of a token sequence is
 *
 *   key_i = SHA-256( tenant_salt             32 bytes
 *                  || u32le(len(model_id))  || model_id bytes
 *                  || u32le(len(codec_id))  || codec_id bytes
 *                  || key_{i-1}               32 bytes
 *                  || u32le(block_tokens)
 *                  || u32le(t) for each token id t of block i, in order
 *                  || u32le(extra_len)      || extra bytes )
 *
 * with key_{-1} = 32 zero bytes (or the parent key a continuation starts
 * from), u32le(x) the four bytes of x least significant first, and lengths
 * counted in bytes (model_id and codec_id are their UTF-8 bytes without the
 * terminating NUL). Every variable-length field carries its length in front,
 * the token run included, so no two different inputs share a byte string:
 * model "ab" + codec "c" is not model "a" + codec "bc", and one block of
 * block size 1 followed by extra is not a block of size 2 with other extra.
 * For example, salt = 32 zero bytes, model_id "m", codec_id "fp16", block
 * tokens {1, 2}, no extra, first block:
 *
 *   00 x 32 | 01 00 00 00 6d | 04 00 00 00 66 70 31 36 | 00 x 32
 *   | 02 00 00 00 | 01 00 00 00 02 00 00 00 | 00 00 00 00
 *
 * whose SHA-256, the key, is
 * a01f9ce768fdb64f344517a11c47c2a6d358e93d7a66781afded4767d8effb66.
 *
 * Only full blocks get keys: a sequence of n tokens has
 * floor(n / block_tokens) of them, and a partial tail stays in the worker.
 *
 * All functions are pure and thread-safe. Errors are negative VQKV_E* codes
 * (kernels/vqkv_codec.h); an argument error writes nothing.
 */
#ifndef VQKV_BLOCK_KEYS_H
#define VQKV_BLOCK_KEYS_H

#include "vqkv_codec.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VQKV_BLOCK_KEY_LEN 32      /* bytes in a key */
#define VQKV_BLOCK_KEY_SALT_LEN 32 /* bytes in a tenant salt */
#define VQKV_BLOCK_KEY_HEX_LEN 65  /* chars for a key in hex, NUL included */

/* What every key of one model under one tenant shares. The strings are
 * borrowed, NUL-terminated and must not be empty: model_id is the model's
 * registered id, codec_id its codec's canonical spec string, so blocks
 * compressed differently never share a key. Tenants that must not see each
 * other's prefixes use different salts; tenants that may share use the
 * same one. */
typedef struct {
    uint8_t tenant_salt[VQKV_BLOCK_KEY_SALT_LEN];
    const char *model_id;
    const char *codec_id;
} vqkv_block_key_ctx_t;

/* Computes the keys of the floor(n_tokens / block_tokens) full blocks of
 * tokens, starting a new chain (key_{-1} = 32 zero bytes), into keys[0..]
 * and their number into *n_keys. extra (extra_len bytes, NULL when 0) goes
 * into every block's key: whatever else decides the KV values, such as a
 * LoRA adapter or the hashes of images among the tokens. tokens may be NULL
 * when n_tokens is 0, keys when max_keys is 0.
 * VQKV_EINVAL for a NULL that is not allowed, an empty or over-long id,
 * block_tokens 0, extra_len beyond UINT32_MAX, or max_keys below the number
 * of blocks; VQKV_ENOMEM when libcrypto cannot allocate (keys then hold
 * anything, *n_keys is untouched). */
int vqkv_block_keys(const vqkv_block_key_ctx_t *ctx, const uint32_t *tokens, size_t n_tokens,
                    uint32_t block_tokens, const uint8_t *extra, size_t extra_len,
                    uint8_t (*keys)[VQKV_BLOCK_KEY_LEN], size_t max_keys, size_t *n_keys);

/* The same, continuing a chain: parent is the key of the block just before
 * tokens[0] (NULL starts a new chain), so a worker holding the keys of a
 * prefix hashes only the blocks after it. The result equals the tail of
 * vqkv_block_keys over the whole sequence. parent may point into keys. */
int vqkv_block_keys_continue(const vqkv_block_key_ctx_t *ctx, const uint8_t *parent,
                             const uint32_t *tokens, size_t n_tokens, uint32_t block_tokens,
                             const uint8_t *extra, size_t extra_len,
                             uint8_t (*keys)[VQKV_BLOCK_KEY_LEN], size_t max_keys, size_t *n_keys);

/* Writes key as 64 lowercase hex digits and a NUL into out.
 * VQKV_EINVAL for a NULL or out_len below VQKV_BLOCK_KEY_HEX_LEN. */
int vqkv_block_key_hex(const uint8_t *key, char *out, size_t out_len);

/* Parses exactly 64 hex digits (either case, nothing else) into key.
 * VQKV_EINVAL for a NULL or anything else, with key untouched. */
int vqkv_block_key_from_hex(const char *hex, uint8_t *key);

#ifdef __cplusplus
}
#endif

#endif
