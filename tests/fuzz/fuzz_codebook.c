/* fuzz_codebook.c -- the codebook file loader (kernels/codebook_file.c,
 * vqkv_codebook_load_buffer) for every VQ spec of fuzz_vq_specs.
 *
 * Input: a mode byte, then bytes. Bits 0-2 pick the spec. With bit 7 clear
 * the bytes are the whole file; with it set they are the body only and the
 * target wraps them in a well-formed outer map with the right SHA-256, so
 * mutations reach the body's parser instead of dying at the checksum.
 *
 * Invariants: the loader answers VQKV_OK, VQKV_EFORMAT or VQKV_EMISMATCH;
 * a refused file leaves the codec as it was (a fresh codec still needs
 * training, a trained one saves the same file as before); an accepted one
 * leaves a codec that encodes and decodes a block, and that saves a file
 * which loads into a fresh codec and saves again to the same bytes.
 */
#include <msgpack.h>
#include <openssl/evp.h>
#include <string.h>

#include "fuzz.h"

static struct {
    int ready;
    uint8_t *valid[FUZZ_N_VQ_SPECS]; /* a trained file per spec */
    size_t valid_len[FUZZ_N_VQ_SPECS];
    vqkv_kv_view_t view; /* one slot of fuzz_layout, vLLM order */
    uint8_t *kv;         /* its memory, synthetic fp16 values */
} fuzz__g;

static void fuzz__init(void)
{
    for (int i = 0; i < FUZZ_N_VQ_SPECS; i++) {
        int rc = fuzz_codebook_make(fuzz_vq_specs[i], &fuzz_layout, &fuzz__g.valid[i],
                                    &fuzz__g.valid_len[i]);
        FUZZ_CHECK(rc == VQKV_OK, "codebooks for %s: %d", fuzz_vq_specs[i], rc);
    }
    vqkv_kv_view_vllm(&fuzz__g.view, &fuzz_layout, 1);
    size_t n = (size_t)fuzz__g.view.region_bytes / 2;
    float *x = malloc(n * sizeof *x);
    fuzz__g.kv = malloc(fuzz__g.view.region_bytes);
    FUZZ_CHECK(x != NULL && fuzz__g.kv != NULL, "out of memory");
    fuzz_kv_values(7, x, n);
    vqkv_dtype_from_f32(VQKV_DTYPE_F16, x, n, fuzz__g.kv);
    free(x);
    fuzz__g.ready = 1;
}

/* A file around body: the outer map codebook_file.c writes, checksum
 * included. msgpack's buffer, freed with free(). */
static uint8_t *fuzz__wrap(const uint8_t *body, size_t len, size_t *out_len)
{
    uint8_t digest[32];
    EVP_Digest(body, len, digest, NULL, EVP_sha256(), NULL);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str_with_body(&pk, "format", 6);
    msgpack_pack_str_with_body(&pk, "vqkv-codebook", 13);
    msgpack_pack_str_with_body(&pk, "version", 7);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_str_with_body(&pk, "body", 4);
    msgpack_pack_bin_with_body(&pk, body, len);
    msgpack_pack_str_with_body(&pk, "sha256", 6);
    msgpack_pack_bin_with_body(&pk, digest, sizeof digest);
    *out_len = sb.size;
    return (uint8_t *)msgpack_sbuffer_release(&sb);
}

static vqkv_codec_t *fuzz__codec(const char *spec)
{
    vqkv_codec_t *codec = NULL;
    FUZZ_CHECK(vqkv_codec_create(spec, &fuzz_layout, &codec) == VQKV_OK, "spec %s", spec);
    return codec;
}

static void fuzz__check_saved_equals(const vqkv_codec_t *codec, const uint8_t *want, size_t len)
{
    uint8_t *buf = NULL;
    size_t n = 0;
    FUZZ_CHECK(vqkv_codebook_save_buffer(codec, &buf, &n) == VQKV_OK, "save");
    FUZZ_CHECK(n == len && memcmp(buf, want, len) == 0, "saved %zu bytes, expected %zu", n, len);
    free(buf);
}

/* The codec holds the codebooks of an accepted file. */
static void fuzz__check_accepted(const char *spec, const vqkv_codec_t *codec)
{
    FUZZ_CHECK(!vqkv_codec_needs_training(codec), "accepted file left the codec untrained");
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    uint8_t *out = malloc(fuzz__g.view.region_bytes);
    FUZZ_CHECK(block != NULL && out != NULL, "out of memory");
    int rc = vqkv_codec_encode(codec, fuzz__g.kv, &fuzz__g.view, 0, block);
    FUZZ_CHECK(rc == VQKV_OK, "encode with loaded codebooks: %d", rc);
    rc = vqkv_codec_decode(codec, block, out, &fuzz__g.view, 0);
    FUZZ_CHECK(rc == VQKV_OK, "decode with loaded codebooks: %d", rc);
    free(out);
    free(block);

    uint8_t *saved = NULL;
    size_t saved_len = 0;
    FUZZ_CHECK(vqkv_codebook_save_buffer(codec, &saved, &saved_len) == VQKV_OK, "save");
    vqkv_codec_t *fresh = fuzz__codec(spec);
    rc = vqkv_codebook_load_buffer(fresh, saved, saved_len);
    FUZZ_CHECK(rc == VQKV_OK, "a saved file does not load: %d", rc);
    fuzz__check_saved_equals(fresh, saved, saved_len);
    vqkv_codec_free(fresh);
    free(saved);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fuzz__g.ready)
        fuzz__init();
    if (size < 1)
        return 0;
    int which = data[0] % FUZZ_N_VQ_SPECS;
    const char *spec = fuzz_vq_specs[which];
    uint8_t *wrapped = NULL;
    const uint8_t *file = data + 1;
    size_t len = size - 1;
    if (data[0] & 0x80) {
        wrapped = fuzz__wrap(file, len, &len);
        file = wrapped;
    }

    vqkv_codec_t *codec = fuzz__codec(spec);
    int rc = vqkv_codebook_load_buffer(codec, file, len);
    FUZZ_CHECK(rc == VQKV_OK || rc == VQKV_EFORMAT || rc == VQKV_EMISMATCH, "load gave %d", rc);
    if (rc == VQKV_OK) {
        fuzz__check_accepted(spec, codec);
    } else {
        FUZZ_CHECK(vqkv_codec_needs_training(codec), "a refused file trained the codec");
        /* A trained codec keeps its codebooks when a file is refused. */
        vqkv_codec_t *trained = fuzz__codec(spec);
        FUZZ_CHECK(vqkv_codebook_load_buffer(trained, fuzz__g.valid[which],
                                             fuzz__g.valid_len[which]) == VQKV_OK,
                   "the trained file does not load");
        int again = vqkv_codebook_load_buffer(trained, file, len);
        FUZZ_CHECK(again == rc, "the same file gave %d, then %d", rc, again);
        fuzz__check_saved_equals(trained, fuzz__g.valid[which], fuzz__g.valid_len[which]);
        vqkv_codec_free(trained);
    }
    vqkv_codec_free(codec);
    free(wrapped);
    return 0;
}
