/* test_codebook_file.c -- codebook files (vqkv_codebook_save/load and their
 * buffer forms): a saved file loads back into a codec that codes exactly
 * like the one that was trained, and anything else is refused with the
 * right code and without touching the codec.
 *
 * Hostile files that pass the checksum are built here by hand with
 * msgpack-c and OpenSSL, following the format comment in
 * kernels/codebook_file.c; the first test proves the builder reproduces the
 * library's own files byte for byte, so each hostile file differs from a
 * good one only where intended.
 */
#include "test_util.h"

#include <msgpack.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#define SPEC "rvq:d=4,b=4,r=2"

static const vqkv_layout_t base_layout = {2, 2, 16, 4, VQKV_DTYPE_F16};

/* Trained once for the whole run. */
static vqkv_codec_t *trained;
static uint8_t *good_file;
static size_t good_len;
/* The codebook bytes inside good_file, found by parsing it. */
static uint8_t *good_books;
static size_t good_books_len;

static vqkv_codec_t *new_codec(const char *spec, const vqkv_layout_t *l)
{
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(spec, l, &codec));
    return codec;
}

static int train_once(void **state)
{
    (void)state;
    vqkv_train_opts_t opts = {.seed = 9, .iterations = 3};
    if (vqkv_codec_create(SPEC, &base_layout, &trained) != VQKV_OK ||
        test_train_all(trained, 42, 256, &opts) != VQKV_OK ||
        vqkv_codebook_save_buffer(trained, &good_file, &good_len) != VQKV_OK)
        return -1;
    return 0;
}

static int free_trained(void **state)
{
    (void)state;
    vqkv_codec_free(trained);
    free(good_file);
    free(good_books);
    return 0;
}

/* ---- building files by hand ------------------------------------------------ */

static void pack_str(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

static void pack_bin(msgpack_packer *pk, const void *data, size_t len)
{
    msgpack_pack_bin(pk, len);
    msgpack_pack_bin_body(pk, data, len);
}

typedef struct {
    uint32_t num_layers, num_kv_heads, head_dim, block_tokens;
    const char *dtype;
    const char *codec;
    const uint8_t *books;
    size_t books_len;
    int extra_key; /* a fourth, unknown entry in the body map */
} body_fields_t;

typedef struct {
    const char *format;
    uint32_t version;
    size_t sha_len;      /* 32, unless testing a short digest */
    int corrupt_sha;     /* flip a bit of the (correct) digest */
    const uint8_t *body; /* NULL: pack the body fields */
    size_t body_len;
} file_fields_t;

static void pack_body(const body_fields_t *f, msgpack_sbuffer *out)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(out);
    msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, f->extra_key ? 4 : 3);
    pack_str(&pk, "layout");
    msgpack_pack_map(&pk, 5);
    pack_str(&pk, "num_layers");
    msgpack_pack_uint32(&pk, f->num_layers);
    pack_str(&pk, "num_kv_heads");
    msgpack_pack_uint32(&pk, f->num_kv_heads);
    pack_str(&pk, "head_dim");
    msgpack_pack_uint32(&pk, f->head_dim);
    pack_str(&pk, "block_tokens");
    msgpack_pack_uint32(&pk, f->block_tokens);
    pack_str(&pk, "dtype");
    pack_str(&pk, f->dtype);
    pack_str(&pk, "codec");
    pack_str(&pk, f->codec);
    pack_str(&pk, "books");
    pack_bin(&pk, f->books, f->books_len);
    if (f->extra_key) {
        pack_str(&pk, "note");
        pack_str(&pk, "hello");
    }
}

/* A whole file around body bytes: format, version, body, SHA-256. */
static uint8_t *pack_file(const file_fields_t *ff, const uint8_t *body, size_t body_len,
                          size_t *len)
{
    uint8_t digest[32];
    unsigned int digest_len = 0;
    assert_int_equal(EVP_Digest(body, body_len, digest, &digest_len, EVP_sha256(), NULL), 1);
    assert_int_equal(digest_len, 32);
    if (ff->corrupt_sha)
        digest[17] ^= 0x04;
    msgpack_sbuffer file;
    msgpack_packer pk;
    msgpack_sbuffer_init(&file);
    msgpack_packer_init(&pk, &file, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    pack_str(&pk, "format");
    pack_str(&pk, ff->format);
    pack_str(&pk, "version");
    msgpack_pack_uint32(&pk, ff->version);
    pack_str(&pk, "body");
    pack_bin(&pk, body, body_len);
    pack_str(&pk, "sha256");
    pack_bin(&pk, digest, ff->sha_len);
    *len = file.size;
    return (uint8_t *)msgpack_sbuffer_release(&file);
}

static uint8_t *build_file(const file_fields_t *ff, const body_fields_t *bf, size_t *len)
{
    if (ff->body != NULL)
        return pack_file(ff, ff->body, ff->body_len, len);
    msgpack_sbuffer body;
    pack_body(bf, &body);
    uint8_t *file = pack_file(ff, (const uint8_t *)body.data, body.size, len);
    msgpack_sbuffer_destroy(&body);
    return file;
}

/* The "books" bin inside a codebook file, copied out. */
static uint8_t *extract_books(const uint8_t *file, size_t file_len, size_t *books_len)
{
    msgpack_unpacked top, body;
    msgpack_unpacked_init(&top);
    msgpack_unpacked_init(&body);
    assert_int_equal(msgpack_unpack_next(&top, (const char *)file, file_len, NULL),
                     MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *body_obj = NULL, *books_obj = NULL;
    for (uint32_t i = 0; i < top.data.via.map.size; i++) {
        const msgpack_object_kv *kv = &top.data.via.map.ptr[i];
        if (kv->key.via.str.size == 4 && memcmp(kv->key.via.str.ptr, "body", 4) == 0)
            body_obj = &kv->val;
    }
    assert_non_null(body_obj);
    assert_int_equal(body_obj->type, MSGPACK_OBJECT_BIN);
    assert_int_equal(
        msgpack_unpack_next(&body, body_obj->via.bin.ptr, body_obj->via.bin.size, NULL),
        MSGPACK_UNPACK_SUCCESS);
    for (uint32_t i = 0; i < body.data.via.map.size; i++) {
        const msgpack_object_kv *kv = &body.data.via.map.ptr[i];
        if (kv->key.via.str.size == 5 && memcmp(kv->key.via.str.ptr, "books", 5) == 0)
            books_obj = &kv->val;
    }
    assert_non_null(books_obj);
    assert_int_equal(books_obj->type, MSGPACK_OBJECT_BIN);
    *books_len = books_obj->via.bin.size;
    uint8_t *books = malloc(*books_len + 1); /* + 1: never malloc(0) */
    assert_non_null(books);
    memcpy(books, books_obj->via.bin.ptr, *books_len);
    msgpack_unpacked_destroy(&top);
    msgpack_unpacked_destroy(&body);
    return books;
}

/* The fields of the good file, as the library wrote them. */
static void good_fields(file_fields_t *ff, body_fields_t *bf)
{
    if (good_books == NULL)
        good_books = extract_books(good_file, good_len, &good_books_len);
    memset(ff, 0, sizeof *ff);
    ff->format = "vqkv-codebook";
    ff->version = 1;
    ff->sha_len = 32;
    memset(bf, 0, sizeof *bf);
    bf->num_layers = base_layout.num_layers;
    bf->num_kv_heads = base_layout.num_kv_heads;
    bf->head_dim = base_layout.head_dim;
    bf->block_tokens = base_layout.block_tokens;
    bf->dtype = "f16";
    bf->codec = vqkv_codec_spec(trained);
    bf->books = good_books;
    bf->books_len = good_books_len;
}

/* ---- helpers ---------------------------------------------------------------- */

/* A block encoded by `trained`, and what trained decodes it to. */
static void reference_block(uint8_t **block, uint8_t **decoded, vqkv_kv_view_t *v)
{
    vqkv_kv_view_vllm(v, &base_layout, 1);
    size_t n = test_block_values(&base_layout);
    float *src = malloc(n * sizeof *src);
    uint8_t *region = malloc(v->region_bytes);
    *block = malloc(vqkv_codec_block_bytes(trained));
    *decoded = malloc(v->region_bytes);
    assert_true(src && region && *block && *decoded);
    test_synth_block(&base_layout, 42, 77, src);
    test_write_block(&base_layout, v, region, 0, src);
    assert_ok(vqkv_codec_encode(trained, region, v, 0, *block));
    memset(*decoded, 0, v->region_bytes);
    assert_ok(vqkv_codec_decode(trained, *block, *decoded, v, 0));
    free(src);
    free(region);
}

/* codec encodes and decodes exactly like `trained`. */
static void assert_codes_like_trained(const vqkv_codec_t *codec)
{
    vqkv_kv_view_t v;
    uint8_t *block, *decoded;
    reference_block(&block, &decoded, &v);
    size_t n = test_block_values(&base_layout);
    float *src = malloc(n * sizeof *src);
    uint8_t *region = malloc(v.region_bytes), *again = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src && region && again);
    test_synth_block(&base_layout, 42, 77, src);
    test_write_block(&base_layout, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, again));
    assert_memory_equal(again, block, vqkv_codec_block_bytes(trained));
    memset(region, 0, v.region_bytes);
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    assert_memory_equal(region, decoded, v.region_bytes);
    free(src);
    free(region);
    free(again);
    free(block);
    free(decoded);
}

/* Loads buf into a codec already holding the good codebooks and into an
 * untrained one: both refuse with `want` and stay exactly as they were. */
static void assert_refused(const uint8_t *buf, size_t len, int want, const char *what)
{
    vqkv_codec_t *loaded = new_codec(SPEC, &base_layout), *fresh = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load_buffer(loaded, good_file, good_len));
    int rc_loaded = vqkv_codebook_load_buffer(loaded, buf, len);
    int rc_fresh = vqkv_codebook_load_buffer(fresh, buf, len);
    if (rc_loaded != want || rc_fresh != want) {
        print_error("%s: load gave %d (%s) and %d, expected %d (%s)\n", what, rc_loaded,
                    vqkv_strerror(rc_loaded), rc_fresh, want, vqkv_strerror(want));
        fail();
    }
    assert_int_equal(vqkv_codec_needs_training(fresh), 1);
    assert_int_equal(vqkv_codec_needs_training(loaded), 0);
    uint8_t *after = NULL;
    size_t after_len = 0;
    assert_ok(vqkv_codebook_save_buffer(loaded, &after, &after_len));
    assert_int_equal(after_len, good_len);
    assert_memory_equal(after, good_file, good_len);
    free(after);
    vqkv_codec_free(loaded);
    vqkv_codec_free(fresh);
}

/* ---- round trips --------------------------------------------------------------- */

static void test_builder_reproduces_library_files(void **state)
{
    (void)state;
    file_fields_t ff;
    body_fields_t bf;
    good_fields(&ff, &bf);
    size_t len;
    uint8_t *file = build_file(&ff, &bf, &len);
    assert_int_equal(len, good_len);
    assert_memory_equal(file, good_file, len);
    free(file);
}

static void test_buffer_round_trip(void **state)
{
    (void)state;
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_int_equal(vqkv_codec_needs_training(codec), 1);
    assert_ok(vqkv_codebook_load_buffer(codec, good_file, good_len));
    assert_int_equal(vqkv_codec_needs_training(codec), 0);
    assert_codes_like_trained(codec);
    /* Saving what was loaded gives the same file. */
    uint8_t *again = NULL;
    size_t again_len = 0;
    assert_ok(vqkv_codebook_save_buffer(codec, &again, &again_len));
    assert_int_equal(again_len, good_len);
    assert_memory_equal(again, good_file, good_len);
    free(again);
    /* Loading over trained codebooks replaces them. */
    vqkv_codec_t *other = new_codec(SPEC, &base_layout);
    vqkv_train_opts_t opts = {.seed = 1234, .iterations = 2};
    assert_ok(test_train_all(other, 43, 128, &opts));
    assert_ok(vqkv_codebook_load_buffer(other, good_file, good_len));
    assert_codes_like_trained(other);
    vqkv_codec_free(other);
    vqkv_codec_free(codec);
}

/* Codebooks do not depend on block_tokens or the memory's dtype, so a file
 * loads into a codec that differs only in those. */
static void test_loads_across_block_tokens_and_dtype(void **state)
{
    (void)state;
    vqkv_layout_t l = base_layout;
    l.block_tokens = 8;
    l.dtype = VQKV_DTYPE_F32;
    vqkv_codec_t *codec = new_codec(SPEC, &l);
    assert_ok(vqkv_codebook_load_buffer(codec, good_file, good_len));
    assert_int_equal(vqkv_codec_needs_training(codec), 0);
    /* The same token-head vector codes to the same values: a block whose
     * first tokens match the reference block decodes them to the same
     * values, up to the dtype. */
    vqkv_kv_view_t v_ref, v;
    uint8_t *block, *decoded;
    reference_block(&block, &decoded, &v_ref);
    vqkv_kv_view_vllm(&v, &l, 1);
    size_t n_ref = test_block_values(&base_layout), n = test_block_values(&l);
    float *src_ref = malloc(n_ref * sizeof(float)), *src = malloc(n * sizeof(float));
    float *want = malloc(n_ref * sizeof(float)), *got = malloc(n * sizeof(float));
    uint8_t *region = malloc(v.region_bytes), *big_block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src_ref && src && want && got && region && big_block);
    test_synth_block(&base_layout, 42, 77, src_ref);
    test_synth_block(&l, 42, 78, src);
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < base_layout.block_tokens; t++)
                for (uint32_t h = 0; h < l.num_kv_heads; h++)
                    for (uint32_t d = 0; d < l.head_dim; d++)
                        src[test_block_index(&l, layer, kv, t, h, d)] =
                            vqkv_f16_to_f32(vqkv_f32_to_f16(
                                src_ref[test_block_index(&base_layout, layer, kv, t, h, d)]));
    test_write_block(&l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, big_block));
    assert_ok(vqkv_codec_decode(codec, big_block, region, &v, 0));
    test_read_block(&l, &v, region, 0, got);
    test_read_block(&base_layout, &v_ref, decoded, 0, want);
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < base_layout.block_tokens; t++)
                for (uint32_t h = 0; h < l.num_kv_heads; h++)
                    for (uint32_t d = 0; d < l.head_dim; d++)
                        assert_int_equal(
                            vqkv_f32_to_f16(got[test_block_index(&l, layer, kv, t, h, d)]),
                            vqkv_f32_to_f16(
                                want[test_block_index(&base_layout, layer, kv, t, h, d)]));
    free(src_ref);
    free(src);
    free(want);
    free(got);
    free(region);
    free(big_block);
    free(block);
    free(decoded);
    vqkv_codec_free(codec);
}

/* ---- refused files ----------------------------------------------------------- */

static void test_truncated_files_refused(void **state)
{
    (void)state;
    /* Every proper prefix, the empty one included. */
    for (size_t len = 0; len < good_len; len++) {
        vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
        int rc = vqkv_codebook_load_buffer(codec, good_file, len);
        if (rc != VQKV_EFORMAT) {
            print_error("file cut to %zu of %zu bytes: %d (%s)\n", len, good_len, rc,
                        vqkv_strerror(rc));
            fail();
        }
        assert_int_equal(vqkv_codec_needs_training(codec), 1);
        vqkv_codec_free(codec);
    }
    assert_refused(good_file, good_len / 2, VQKV_EFORMAT, "half a file");
    assert_refused(good_file, good_len - 1, VQKV_EFORMAT, "one byte short");
}

/* Any single changed byte, in the header, the body or the digest, makes
 * the file fail its structure or its checksum. */
static void test_flipped_bytes_refused(void **state)
{
    (void)state;
    uint8_t *copy = malloc(good_len);
    assert_non_null(copy);
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    static const uint8_t flips[] = {0x01, 0x80};
    for (size_t f = 0; f < 2; f++) {
        for (size_t i = 0; i < good_len; i++) {
            memcpy(copy, good_file, good_len);
            copy[i] ^= flips[f];
            int rc = vqkv_codebook_load_buffer(codec, copy, good_len);
            if (rc != VQKV_EFORMAT) {
                print_error("byte %zu of %zu xor 0x%02x: %d (%s)\n", i, good_len, flips[f], rc,
                            vqkv_strerror(rc));
                fail();
            }
        }
    }
    assert_int_equal(vqkv_codec_needs_training(codec), 1);
    vqkv_codec_free(codec);

    /* The same, checked to leave a loaded codec alone: a byte in the
     * middle of the codebooks, and one in the digest (the last bytes). */
    memcpy(copy, good_file, good_len);
    copy[good_len / 2] ^= 0x10;
    assert_refused(copy, good_len, VQKV_EFORMAT, "flipped body byte");
    memcpy(copy, good_file, good_len);
    copy[good_len - 5] ^= 0x10;
    assert_refused(copy, good_len, VQKV_EFORMAT, "flipped digest byte");
    free(copy);
}

static void test_malformed_files_refused(void **state)
{
    (void)state;
    /* Trailing bytes after a complete file. */
    uint8_t *longer = malloc(good_len + 3);
    assert_non_null(longer);
    memcpy(longer, good_file, good_len);
    memset(longer + good_len, 0, 3);
    assert_refused(longer, good_len + 1, VQKV_EFORMAT, "one trailing zero byte");
    assert_refused(longer, good_len + 3, VQKV_EFORMAT, "trailing bytes");
    memcpy(longer + good_len, "\x93\x01\x02", 3); /* a second msgpack object */
    assert_refused(longer, good_len + 3, VQKV_EFORMAT, "a second object");
    free(longer);

    /* Not msgpack, or msgpack of the wrong shape. */
    static const char text[] = "this is not a codebook\n";
    assert_refused((const uint8_t *)text, sizeof text - 1, VQKV_EFORMAT, "text");
    const uint8_t nil[] = {0xc0}, empty_map[] = {0x80}, bad_byte[] = {0xc1};
    const uint8_t array4[] = {0x94, 0x01, 0x02, 0x03, 0x04};
    assert_refused(nil, sizeof nil, VQKV_EFORMAT, "nil");
    assert_refused(empty_map, sizeof empty_map, VQKV_EFORMAT, "empty map");
    assert_refused(bad_byte, sizeof bad_byte, VQKV_EFORMAT, "reserved byte 0xc1");
    assert_refused(array4, sizeof array4, VQKV_EFORMAT, "array");
    uint8_t zeros[64] = {0};
    assert_refused(zeros, sizeof zeros, VQKV_EFORMAT, "zeros");
    /* Empty: a zero length, whatever the pointer. */
    assert_refused(good_file, 0, VQKV_EFORMAT, "empty");
}

/* Files whose checksum is right but whose contents are not: built by hand. */
static void test_hostile_checksummed_files_refused(void **state)
{
    (void)state;
    file_fields_t ff;
    body_fields_t bf;
    good_fields(&ff, &bf);
    size_t len, n_floats = good_books_len / 4;
    uint8_t *file, *bad_books = malloc(good_books_len + 8);
    assert_non_null(bad_books);

    /* Builds the file as modified, checks it is refused, starts over. */
#define REFUSED(want, what)                                                                        \
    do {                                                                                           \
        file = build_file(&ff, &bf, &len);                                                         \
        assert_refused(file, len, want, what);                                                     \
        free(file);                                                                                \
        good_fields(&ff, &bf);                                                                     \
    } while (0)

    /* The builder's own good file loads (so the refusals below are about
     * the one thing each changes). */
    file = build_file(&ff, &bf, &len);
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load_buffer(codec, file, len));
    vqkv_codec_free(codec);
    free(file);

    /* Codebooks of the wrong size. */
    bf.books_len -= 4;
    REFUSED(VQKV_EFORMAT, "books one float short");
    memcpy(bad_books, good_books, good_books_len);
    memset(bad_books + good_books_len, 0, 8);
    bf.books = bad_books;
    bf.books_len += 4;
    REFUSED(VQKV_EFORMAT, "books one float long");
    bf.books_len -= 1;
    REFUSED(VQKV_EFORMAT, "books not a whole number of floats");
    bf.books_len = 0;
    REFUSED(VQKV_EFORMAT, "no books");

    /* Non-finite codebook values (quiet NaN, +-inf, signalling NaN), at the
     * first float and the last. */
    static const uint32_t non_finite[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0x7f800001u};
    for (size_t i = 0; i < 4; i++) {
        for (int last = 0; last < 2; last++) {
            memcpy(bad_books, good_books, good_books_len);
            size_t at = last ? (n_floats - 1) * 4 : 0;
            for (int b = 0; b < 4; b++) /* little-endian */
                bad_books[at + (size_t)b] = (uint8_t)(non_finite[i] >> (8 * b));
            bf.books = bad_books;
            REFUSED(VQKV_EFORMAT, "non-finite codebook value");
        }
    }

    /* The header around a good body. */
    ff.format = "vqkv-codebook2";
    REFUSED(VQKV_EFORMAT, "wrong format string");
    ff.format = "";
    REFUSED(VQKV_EFORMAT, "empty format string");
    ff.version = 2;
    REFUSED(VQKV_EFORMAT, "version 2");
    ff.version = 0;
    REFUSED(VQKV_EFORMAT, "version 0");
    ff.sha_len = 31;
    REFUSED(VQKV_EFORMAT, "short digest");
    ff.corrupt_sha = 1;
    REFUSED(VQKV_EFORMAT, "wrong digest");

    /* A body that is not the expected map, its digest correct. */
    static const uint8_t garbage_body[] = {0xde, 0xad, 0xbe, 0xef};
    ff.body = garbage_body;
    ff.body_len = sizeof garbage_body;
    REFUSED(VQKV_EFORMAT, "garbage body");
    static const uint8_t map_body[] = {0x80};
    ff.body = map_body;
    ff.body_len = sizeof map_body;
    REFUSED(VQKV_EFORMAT, "empty body map");
    bf.extra_key = 1;
    REFUSED(VQKV_EFORMAT, "body with an unknown key");
    bf.dtype = "f64";
    REFUSED(VQKV_EFORMAT, "unknown dtype");

    /* Well-formed, but for another layout or codec. */
    bf.num_layers = 3;
    REFUSED(VQKV_EMISMATCH, "other num_layers");
    bf.head_dim = 32;
    REFUSED(VQKV_EMISMATCH, "other head_dim");
    bf.num_kv_heads = 1;
    REFUSED(VQKV_EMISMATCH, "other num_kv_heads");
    /* Same codebook size, other meaning. */
    vqkv_codec_t *contig = new_codec("rvq:d=4,b=4,r=2,kgroup=contig", &base_layout);
    bf.codec = vqkv_codec_spec(contig);
    REFUSED(VQKV_EMISMATCH, "other codec");
    vqkv_codec_free(contig);
    bf.codec = "rvq:d=4,b=4,r=2"; /* not canonical: names are compared exactly */
    REFUSED(VQKV_EMISMATCH, "non-canonical codec name");
#undef REFUSED
    free(bad_books);
}

/* Files the library wrote itself, for another layout or codec. */
static void test_files_for_other_codecs_refused(void **state)
{
    (void)state;
    vqkv_train_opts_t opts = {.seed = 1, .iterations = 2};
    struct {
        const char *spec;
        vqkv_layout_t layout;
    } others[] = {
        {SPEC, {1, 2, 16, 4, VQKV_DTYPE_F16}},
        {SPEC, {2, 2, 32, 4, VQKV_DTYPE_F16}},
        {SPEC, {2, 4, 16, 4, VQKV_DTYPE_F16}},
        {"rvq:d=4,b=4,r=2,kgroup=contig", {2, 2, 16, 4, VQKV_DTYPE_F16}},
        {"rvq:d=4,b=4,r=2,cs=1", {2, 2, 16, 4, VQKV_DTYPE_F16}},
        {"rvq:d=4,b=4,r=1", {2, 2, 16, 4, VQKV_DTYPE_F16}},
        {"vqkv:b=4,dlo=2,dhi=2,dv=4", {2, 2, 16, 4, VQKV_DTYPE_F16}},
    };
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        vqkv_codec_t *codec = new_codec(others[i].spec, &others[i].layout);
        assert_ok(test_train_all(codec, 42, 64, &opts));
        uint8_t *file = NULL;
        size_t len = 0;
        assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
        char what[96];
        snprintf(what, sizeof what, "file for %s", vqkv_codec_spec(codec));
        assert_refused(file, len, VQKV_EMISMATCH, what);
        free(file);
        vqkv_codec_free(codec);
    }
}

static void test_codecs_without_codebooks(void **state)
{
    (void)state;
    static const char *const specs[] = {"fp16", "fp8", "kivi2", "kivi4"};
    for (size_t i = 0; i < 4; i++) {
        vqkv_codec_t *codec = new_codec(specs[i], &base_layout);
        uint8_t *buf = NULL;
        size_t len = 0;
        assert_rc(vqkv_codebook_load_buffer(codec, good_file, good_len), VQKV_EINVAL);
        assert_rc(vqkv_codebook_save_buffer(codec, &buf, &len), VQKV_EINVAL);
        assert_null(buf);
        vqkv_codec_free(codec);
    }
    /* An untrained VQ codec has nothing to save. */
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_rc(vqkv_codebook_save_buffer(codec, &buf, &len), VQKV_ENOCODEBOOK);
    assert_null(buf);
    vqkv_codec_free(codec);
}

static void test_null_arguments(void **state)
{
    (void)state;
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_rc(vqkv_codebook_save_buffer(NULL, &buf, &len), VQKV_EINVAL);
    assert_rc(vqkv_codebook_save_buffer(trained, NULL, &len), VQKV_EINVAL);
    assert_rc(vqkv_codebook_save_buffer(trained, &buf, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codebook_load_buffer(NULL, good_file, good_len), VQKV_EINVAL);
    assert_rc(vqkv_codebook_load_buffer(codec, NULL, good_len), VQKV_EINVAL);
    assert_rc(vqkv_codebook_save(NULL, "unused"), VQKV_EINVAL);
    assert_rc(vqkv_codebook_save(trained, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codebook_load(NULL, "unused"), VQKV_EINVAL);
    assert_rc(vqkv_codebook_load(codec, NULL), VQKV_EINVAL);
    assert_int_equal(vqkv_codec_needs_training(codec), 1);
    vqkv_codec_free(codec);
}

/* ---- the documented VQ block layout (kernels/README.md) ------------------------ */

/* A side's branches as the README describes them: channel lists, sub-vector
 * size and stages. */
typedef struct {
    uint32_t n_branches;
    uint32_t channels[2], d[2], stages[2];
    uint32_t chan[2][VQKV_MAX_HEAD_DIM];
} readme_side_t;

static void rvq_side(uint32_t D, uint32_t d, uint32_t r, int strided, readme_side_t *side)
{
    memset(side, 0, sizeof *side);
    side->n_branches = 1;
    side->channels[0] = D;
    side->d[0] = d;
    side->stages[0] = r;
    for (uint32_t g = 0; g < D / d; g++)
        for (uint32_t j = 0; j < d; j++)
            side->chan[0][g * d + j] = strided ? g + j * (D / d) : g * d + j;
}

static void vqkv_key_side(uint32_t D, uint32_t dhi, uint32_t dlo, readme_side_t *side)
{
    memset(side, 0, sizeof *side);
    side->n_branches = 2;
    for (uint32_t br = 0; br < 2; br++) {
        side->channels[br] = D / 2;
        side->d[br] = br == 0 ? dhi : dlo;
        side->stages[br] = 1;
        for (uint32_t i = 0; i < D / 4; i++) {
            uint32_t pair = (br == 0 ? 0 : D / 4) + i;
            side->chan[br][2 * i] = pair;
            side->chan[br][2 * i + 1] = pair + D / 2;
        }
    }
}

static size_t side_floats(const readme_side_t *side, uint32_t bits)
{
    size_t n = 0;
    for (uint32_t br = 0; br < side->n_branches; br++)
        n += (size_t)side->channels[br] * side->stages[br] << bits; /* groups*r*2^b*d */
    return n;
}

/* Decodes random bytes with codec (f32 memory) and by the description from
 * the codebook floats of `file`; both must agree bit for bit. */
static void check_vq_decode_matches_readme(vqkv_codec_t *codec, const uint8_t *file,
                                           size_t file_len, uint32_t bits,
                                           const readme_side_t sides[2])
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    assert_int_equal(l->dtype, VQKV_DTYPE_F32);
    assert_ok(vqkv_codebook_load_buffer(codec, file, file_len));

    /* The codebook floats, from the file by the documented format. */
    size_t books_len;
    uint8_t *raw = extract_books(file, file_len, &books_len);
    size_t n_floats = books_len / 4;
    float *books = malloc(n_floats * sizeof *books);
    assert_non_null(books);
    for (size_t i = 0; i < n_floats; i++) {
        const uint8_t *p = raw + 4 * i;
        books[i] = vqkv_bits_to_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                    (uint32_t)p[3] << 24);
    }
    free(raw);

    uint32_t T = l->block_tokens, H = l->num_kv_heads, D = l->head_dim;
    size_t layer_floats = side_floats(&sides[0], bits) + side_floats(&sides[1], bits);
    size_t stats_at = l->num_layers * layer_floats;
    assert_int_equal(n_floats, stats_at + (size_t)l->num_layers * 2 * H * 2 * D);

    /* Random norms (finite, positive) and codes. */
    size_t block_bytes = vqkv_codec_block_bytes(codec);
    uint8_t *block = malloc(block_bytes);
    assert_non_null(block);
    test_rng_t rng = {block_bytes};
    for (size_t i = 0; i < block_bytes; i++)
        block[i] = (uint8_t)test_rng_next(&rng);
    size_t at = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const readme_side_t *side = &sides[kv];
            size_t codes_per_vector = 0;
            for (uint32_t br = 0; br < side->n_branches; br++)
                codes_per_vector += side->channels[br] / side->d[br] * side->stages[br];
            for (size_t i = 0; i < (size_t)T * H * side->n_branches; i++) {
                uint16_t norm = vqkv_f32_to_f16((float)(0.1 + 4.0 * test_rng_uniform(&rng)));
                block[at + 2 * i] = (uint8_t)norm;
                block[at + 2 * i + 1] = (uint8_t)(norm >> 8);
            }
            at += (size_t)T * H * side->n_branches * 2 +
                  ((size_t)T * H * codes_per_vector * bits + 7) / 8;
        }
    assert_int_equal(at, block_bytes);

    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    uint8_t *region = calloc(v.region_bytes, 1);
    size_t n = test_block_values(l);
    float *got = malloc(n * sizeof *got), *want = malloc(n * sizeof *want);
    assert_true(region && got && want);
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(l, &v, region, 0, got);

    at = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const readme_side_t *side = &sides[kv];
            size_t codes_per_vector = 0;
            for (uint32_t br = 0; br < side->n_branches; br++)
                codes_per_vector += side->channels[br] / side->d[br] * side->stages[br];
            const uint8_t *norms = block + at;
            const uint8_t *codes = norms + (size_t)T * H * side->n_branches * 2;
            size_t side_at = layer * layer_floats + (kv ? side_floats(&sides[0], bits) : 0);
            for (size_t vec = 0; vec < (size_t)T * H; vec++) {
                float y[VQKV_MAX_HEAD_DIM];
                size_t code_index = vec * codes_per_vector, branch_at = side_at;
                for (uint32_t br = 0; br < side->n_branches; br++) {
                    const uint8_t *np = norms + 2 * (vec * side->n_branches + br);
                    float norm = vqkv_f16_to_f32((uint16_t)(np[0] | np[1] << 8));
                    uint32_t d = side->d[br], groups = side->channels[br] / d;
                    for (uint32_t g = 0; g < groups; g++) {
                        float acc[VQKV_MAX_HEAD_DIM] = {0};
                        for (uint32_t st = 0; st < side->stages[br]; st++) {
                            uint32_t code = 0;
                            for (uint32_t b = 0; b < bits; b++) {
                                uint64_t bit = code_index * bits + b;
                                code |= (uint32_t)(codes[bit / 8] >> (bit % 8) & 1u) << b;
                            }
                            code_index++;
                            const float *word =
                                books + branch_at +
                                ((((size_t)g * side->stages[br] + st) << bits) + code) * d;
                            for (uint32_t j = 0; j < d; j++)
                                acc[j] += word[j];
                        }
                        for (uint32_t j = 0; j < d; j++)
                            y[side->chan[br][g * d + j]] = acc[j] * norm;
                    }
                    branch_at += (size_t)side->channels[br] * side->stages[br] << bits;
                }
                uint32_t t = (uint32_t)(vec / H), h = (uint32_t)(vec % H);
                const float *mean = books + stats_at + (((size_t)layer * 2 + kv) * H + h) * 2 * D;
                for (uint32_t c = 0; c < D; c++)
                    want[test_block_index(l, layer, kv, t, h, c)] =
                        fmaf(y[c], mean[D + c], mean[c]);
            }
            at += (size_t)T * H * side->n_branches * 2 +
                  ((size_t)T * H * codes_per_vector * bits + 7) / 8;
        }
    for (size_t i = 0; i < n; i++)
        if (vqkv_f32_to_bits(got[i]) != vqkv_f32_to_bits(want[i])) {
            print_error("%s: value %zu decodes to %a, the README says %a\n", vqkv_codec_spec(codec),
                        i, got[i], want[i]);
            fail();
        }
    free(books);
    free(block);
    free(region);
    free(got);
    free(want);
}

static void test_vq_decode_matches_documented_layout(void **state)
{
    (void)state;
    vqkv_layout_t l = base_layout;
    l.dtype = VQKV_DTYPE_F32;
    readme_side_t sides[2];

    /* rvq, strided keys: the run's trained codebooks. */
    rvq_side(l.head_dim, 4, 2, 1, &sides[0]);
    rvq_side(l.head_dim, 4, 2, 0, &sides[1]);
    vqkv_codec_t *codec = new_codec(SPEC, &l);
    check_vq_decode_matches_readme(codec, good_file, good_len, 4, sides);
    vqkv_codec_free(codec);

    /* vqkv with channel scaling, trained here. */
    static const char *const vqkv_spec = "vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1";
    vqkv_train_opts_t opts = {.seed = 5, .iterations = 2};
    codec = new_codec(vqkv_spec, &l);
    assert_ok(test_train_all(codec, 42, 64, &opts));
    uint8_t *file = NULL;
    size_t len = 0;
    assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
    vqkv_key_side(l.head_dim, 4, 2, &sides[0]);
    rvq_side(l.head_dim, 8, 1, 0, &sides[1]);
    check_vq_decode_matches_readme(codec, file, len, 3, sides);
    free(file);
    vqkv_codec_free(codec);

    /* rvq with contiguous keys and several stages. */
    static const char *const contig_spec = "rvq:d=2,b=5,r=3,kgroup=contig";
    codec = new_codec(contig_spec, &l);
    assert_ok(test_train_all(codec, 42, 64, &opts));
    assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
    rvq_side(l.head_dim, 2, 3, 0, &sides[0]);
    rvq_side(l.head_dim, 2, 3, 0, &sides[1]);
    check_vq_decode_matches_readme(codec, file, len, 5, sides);
    free(file);
    vqkv_codec_free(codec);
}

/* ---- files on disk -------------------------------------------------------- */

typedef struct {
    char dir[512];
    char path[600];
} scratch_t;

static int make_scratch(void **state)
{
    scratch_t *s = calloc(1, sizeof *s);
    const char *tmp = getenv("TMPDIR");
    if (s == NULL)
        return -1;
    snprintf(s->dir, sizeof s->dir, "%s/vqkv-test-XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp");
    if (mkdtemp(s->dir) == NULL) {
        free(s);
        return -1;
    }
    *state = s;
    return 0;
}

static void remove_in(const scratch_t *s, const char *name)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", s->dir, name);
    unlink(path);
}

static int remove_scratch(void **state)
{
    scratch_t *s = *state;
    static const char *const names[] = {"books.vqcb", "books.vqcb.tmp", "empty.vqcb", "cut.vqcb"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        remove_in(s, names[i]);
    rmdir(s->dir);
    free(s);
    return 0;
}

static void write_file(const char *path, const uint8_t *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len > 0) /* fwrite's buffer must not be NULL even for no bytes */
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void test_path_round_trip(void **state)
{
    scratch_t *s = *state;
    snprintf(s->path, sizeof s->path, "%s/books.vqcb", s->dir);
    assert_ok(vqkv_codebook_save(trained, s->path));
    /* What is on disk is what save_buffer gives, and no temporary is left. */
    FILE *f = fopen(s->path, "rb");
    assert_non_null(f);
    uint8_t *disk = malloc(good_len + 1);
    assert_non_null(disk);
    assert_int_equal(fread(disk, 1, good_len + 1, f), good_len);
    fclose(f);
    assert_memory_equal(disk, good_file, good_len);
    free(disk);
    char tmp_path[700];
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp", s->path);
    struct stat st;
    assert_int_equal(stat(tmp_path, &st), -1);

    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load(codec, s->path));
    assert_codes_like_trained(codec);
    vqkv_codec_free(codec);

    /* Saving again replaces the file. */
    assert_ok(vqkv_codebook_save(trained, s->path));
    codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load(codec, s->path));
    vqkv_codec_free(codec);
}

static void test_path_errors(void **state)
{
    scratch_t *s = *state;
    char path[700];
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);

    snprintf(path, sizeof path, "%s/does-not-exist.vqcb", s->dir);
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EIO);
    snprintf(path, sizeof path, "%s/no-such-dir/books.vqcb", s->dir);
    assert_rc(vqkv_codebook_save(trained, path), VQKV_EIO);
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EIO);

    snprintf(path, sizeof path, "%s/empty.vqcb", s->dir);
    write_file(path, NULL, 0);
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EFORMAT);
    snprintf(path, sizeof path, "%s/cut.vqcb", s->dir);
    write_file(path, good_file, good_len - 10);
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EFORMAT);
    assert_int_equal(vqkv_codec_needs_training(codec), 1);

    /* A refused path load leaves loaded codebooks alone too. */
    assert_ok(vqkv_codebook_load_buffer(codec, good_file, good_len));
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EFORMAT);
    snprintf(path, sizeof path, "%s/does-not-exist.vqcb", s->dir);
    assert_rc(vqkv_codebook_load(codec, path), VQKV_EIO);
    assert_codes_like_trained(codec);
    vqkv_codec_free(codec);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builder_reproduces_library_files),
        cmocka_unit_test(test_buffer_round_trip),
        cmocka_unit_test(test_loads_across_block_tokens_and_dtype),
        cmocka_unit_test(test_truncated_files_refused),
        cmocka_unit_test(test_flipped_bytes_refused),
        cmocka_unit_test(test_malformed_files_refused),
        cmocka_unit_test(test_hostile_checksummed_files_refused),
        cmocka_unit_test(test_files_for_other_codecs_refused),
        cmocka_unit_test(test_codecs_without_codebooks),
        cmocka_unit_test(test_null_arguments),
        cmocka_unit_test(test_vq_decode_matches_documented_layout),
        cmocka_unit_test_setup_teardown(test_path_round_trip, make_scratch, remove_scratch),
        cmocka_unit_test_setup_teardown(test_path_errors, make_scratch, remove_scratch),
    };
    return cmocka_run_group_tests(tests, train_once, free_trained);
}
