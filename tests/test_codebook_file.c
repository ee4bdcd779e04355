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

#include <dirent.h>
#include <msgpack.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

/* The run's codec: keys with block means (bc=1, not the default), no
 * escapes, no channel statistics (cs=0). SPEC_BC0 is its twin without
 * block means, the default; both have the same number of codebook floats. */
#define SPEC "rvq:d=4,b=4,r=2,bc=1"
#define SPEC_BC0 "rvq:d=4,b=4,r=2"

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

/* One "key": u32 entry of a map, as the layout fields are written. */
static void pack_u32_entry(msgpack_packer *pk, const char *key, uint32_t value)
{
    pack_str(pk, key);
    msgpack_pack_uint32(pk, value);
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
    pack_u32_entry(&pk, "num_layers", f->num_layers);
    pack_u32_entry(&pk, "num_kv_heads", f->num_kv_heads);
    pack_u32_entry(&pk, "head_dim", f->head_dim);
    pack_u32_entry(&pk, "block_tokens", f->block_tokens);
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

/* The bin value of key in msgpack map, which must be there: the file's
 * "body" and the body's "books" are both found this way. */
static const msgpack_object *map_bin_field(const msgpack_object *map, const char *key)
{
    const msgpack_object *found = NULL;
    size_t key_len = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.via.str.size == key_len && memcmp(kv->key.via.str.ptr, key, key_len) == 0)
            found = &kv->val;
    }
    assert_non_null(found);
    assert_int_equal(found->type, MSGPACK_OBJECT_BIN);
    return found;
}

/* The "books" bin inside a codebook file, copied out. */
static uint8_t *extract_books(const uint8_t *file, size_t file_len, size_t *books_len)
{
    msgpack_unpacked top, body;
    msgpack_unpacked_init(&top);
    msgpack_unpacked_init(&body);
    assert_int_equal(msgpack_unpack_next(&top, (const char *)file, file_len, NULL),
                     MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *body_obj = map_bin_field(&top.data, "body");
    assert_int_equal(
        msgpack_unpack_next(&body, body_obj->via.bin.ptr, body_obj->via.bin.size, NULL),
        MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *books_obj = map_bin_field(&body.data, "books");
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

/* The values of the reference block: synthetic KV rounded to multiples of
 * 1/64 below 32 in magnitude, so each is exact in f16 and sums of a few of
 * them are exact in float. */
static void reference_src(float *src)
{
    size_t n = test_block_values(&base_layout);
    test_synth_block(&base_layout, 42, 77, src);
    for (size_t i = 0; i < n; i++)
        src[i] = fminf(fmaxf(nearbyintf(src[i] * 64.0f) / 64.0f, -31.5f), 31.5f);
}

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
    reference_src(src);
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
    reference_src(src);
    test_write_block(&base_layout, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, again));
    assert_memory_equal(again, block, vqkv_codec_block_bytes(trained));
    memset(region, 0, v.region_bytes);
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    assert_memory_equal(region, decoded, v.region_bytes);
    test_free_all(src, region, again, block, decoded);
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
    test_assert_saves_as(loaded, good_file, good_len);
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
    test_assert_saves_as(codec, good_file, good_len);
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
     * values, up to the dtype. With bc=1 (as SPEC has) the block's key
     * channel means must match too: the longer block holds the reference
     * block's tokens twice, and as their values sum exactly in float its
     * means are exactly the reference block's. */
    vqkv_kv_view_t v_ref, v;
    uint8_t *block, *decoded;
    reference_block(&block, &decoded, &v_ref);
    vqkv_kv_view_vllm(&v, &l, 1);
    size_t n_ref = test_block_values(&base_layout), n = test_block_values(&l);
    float *src_ref = malloc(n_ref * sizeof(float)), *src = malloc(n * sizeof(float));
    float *want = malloc(n_ref * sizeof(float)), *got = malloc(n * sizeof(float));
    uint8_t *region = malloc(v.region_bytes), *big_block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src_ref && src && want && got && region && big_block);
    reference_src(src_ref);
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l.block_tokens; t++)
                for (uint32_t h = 0; h < l.num_kv_heads; h++)
                    for (uint32_t d = 0; d < l.head_dim; d++)
                        src[test_block_index(&l, layer, kv, t, h, d)] = src_ref[test_block_index(
                            &base_layout, layer, kv, t % base_layout.block_tokens, h, d)];
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
    test_free_all(src_ref, src, want, got, region, big_block, block, decoded);
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

    /* The same after one change to the fields: a case per line. */
#define REFUSED_AFTER(change, want, what)                                                          \
    do {                                                                                           \
        change;                                                                                    \
        REFUSED(want, what);                                                                       \
    } while (0)

    /* The builder's own good file loads (so the refusals below are about
     * the one thing each changes). */
    file = build_file(&ff, &bf, &len);
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load_buffer(codec, file, len));
    vqkv_codec_free(codec);
    free(file);

    /* Codebooks of the wrong size. */
    REFUSED_AFTER(bf.books_len -= 4, VQKV_EFORMAT, "books one float short");
    memcpy(bad_books, good_books, good_books_len);
    memset(bad_books + good_books_len, 0, 8);
    bf.books = bad_books;
    bf.books_len += 4;
    REFUSED(VQKV_EFORMAT, "books one float long");
    REFUSED_AFTER(bf.books_len -= 1, VQKV_EFORMAT, "books not a whole number of floats");
    REFUSED_AFTER(bf.books_len = 0, VQKV_EFORMAT, "no books");

    /* Non-finite codebook values (quiet NaN, +-inf, signalling NaN), at the
     * first float and the last. */
    static const uint32_t non_finite[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0x7f800001u};
    for (size_t i = 0; i < 4; i++) {
        for (int last = 0; last < 2; last++) {
            memcpy(bad_books, good_books, good_books_len);
            size_t at = last ? (n_floats - 1) * 4 : 0;
            for (int b = 0; b < 4; b++) /* little-endian */
                bad_books[at + (size_t)b] = (uint8_t)(non_finite[i] >> (8 * b));
            REFUSED_AFTER(bf.books = bad_books, VQKV_EFORMAT, "non-finite codebook value");
        }
    }

    /* The header around a good body. */
    REFUSED_AFTER(ff.format = "vqkv-codebook2", VQKV_EFORMAT, "wrong format string");
    REFUSED_AFTER(ff.format = "", VQKV_EFORMAT, "empty format string");
    REFUSED_AFTER(ff.version = 2, VQKV_EFORMAT, "version 2");
    REFUSED_AFTER(ff.version = 0, VQKV_EFORMAT, "version 0");
    REFUSED_AFTER(ff.sha_len = 31, VQKV_EFORMAT, "short digest");
    REFUSED_AFTER(ff.corrupt_sha = 1, VQKV_EFORMAT, "wrong digest");

    /* A body that is not the expected map, its digest correct. */
    static const uint8_t garbage_body[] = {0xde, 0xad, 0xbe, 0xef};
    ff.body = garbage_body;
    ff.body_len = sizeof garbage_body;
    REFUSED(VQKV_EFORMAT, "garbage body");
    static const uint8_t map_body[] = {0x80};
    ff.body = map_body;
    ff.body_len = sizeof map_body;
    REFUSED(VQKV_EFORMAT, "empty body map");
    REFUSED_AFTER(bf.extra_key = 1, VQKV_EFORMAT, "body with an unknown key");
    REFUSED_AFTER(bf.dtype = "f64", VQKV_EFORMAT, "unknown dtype");

    /* Well-formed, but for another layout or codec. */
    REFUSED_AFTER(bf.num_layers = 3, VQKV_EMISMATCH, "other num_layers");
    REFUSED_AFTER(bf.head_dim = 32, VQKV_EMISMATCH, "other head_dim");
    REFUSED_AFTER(bf.num_kv_heads = 1, VQKV_EMISMATCH, "other num_kv_heads");
    /* Same codebook size, other meaning. */
    vqkv_codec_t *contig = new_codec("rvq:d=4,b=4,r=2,kgroup=contig", &base_layout);
    REFUSED_AFTER(bf.codec = vqkv_codec_spec(contig), VQKV_EMISMATCH, "other codec");
    vqkv_codec_free(contig);
    bf.codec = SPEC; /* not canonical: names are compared exactly */
    REFUSED(VQKV_EMISMATCH, "non-canonical codec name");
    /* Codecs with the same number of floats that code otherwise. */
    static const char *const same_size[][2] = {
        {SPEC_BC0, "the codec without block means"},
        {SPEC ",esc=1", "the codec with an escape"},
        {SPEC ",esc=8", "the codec with eight escapes"},
        {SPEC ",cs=1", "the codec with channel statistics"},
    };
    for (size_t i = 0; i < sizeof same_size / sizeof same_size[0]; i++) {
        vqkv_codec_t *other = new_codec(same_size[i][0], &base_layout);
        REFUSED_AFTER(bf.codec = vqkv_codec_spec(other), VQKV_EMISMATCH, same_size[i][1]);
        vqkv_codec_free(other);
    }
#undef REFUSED
#undef REFUSED_AFTER
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
        /* The same number of floats as SPEC's, without block means, with
         * escapes. */
        {SPEC_BC0, {2, 2, 16, 4, VQKV_DTYPE_F16}},
        {SPEC ",esc=2", {2, 2, 16, 4, VQKV_DTYPE_F16}},
        /* A codebook set per head. */
        {"rvq:d=4,b=4,r=2,ph=1", {2, 2, 16, 4, VQKV_DTYPE_F16}},
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

/* What a VQ codec's spec says about its layout, spelled out by hand. */
typedef struct {
    uint32_t bits;
    int bc;       /* keys start with f16 block_mean[H][D] */
    int per_head; /* ph=1: a codebook set per kv head */
    int cs;       /* cs=1: real channel statistics; cs=0: mean 0, scale 1 */
    uint32_t esc; /* escape entries at the end of every part */
    readme_side_t sides[2];
} readme_vq_t;

static size_t side_codes_per_vector(const readme_side_t *side)
{
    size_t codes = 0;
    for (uint32_t br = 0; br < side->n_branches; br++)
        codes += side->channels[br] / side->d[br] * side->stages[br];
    return codes;
}

/* Bytes of part kv: block means (keys with bc=1), norms, code stream,
 * escape entries. */
static size_t readme_part_bytes(const vqkv_layout_t *l, const readme_vq_t *vq, int kv,
                                size_t *mean_bytes)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads;
    const readme_side_t *side = &vq->sides[kv];
    *mean_bytes = kv == 0 && vq->bc ? (size_t)2 * l->num_kv_heads * l->head_dim : 0;
    return *mean_bytes + vectors * side->n_branches * 2 +
           (vectors * side_codes_per_vector(side) * vq->bits + 7) / 8 +
           vq->esc * test_escape_bytes(l);
}

/* The codebook floats of a file's raw little-endian bytes. */
static float *books_as_floats(const uint8_t *raw, size_t books_len)
{
    size_t n = books_len / 4;
    float *books = malloc((n + 1) * sizeof *books);
    assert_non_null(books);
    for (size_t i = 0; i < n; i++)
        books[i] = vqkv_bits_to_f32(test_get_u32(raw + 4 * i));
    return books;
}

/* Where the channel statistics of (layer, kv, head) start among a file's
 * floats: mean[D], then scale[D]. */
static size_t stats_index(const vqkv_layout_t *l, size_t n_floats, uint32_t layer, int kv,
                          uint32_t head)
{
    size_t stats_at = n_floats - (size_t)l->num_layers * 2 * l->num_kv_heads * 2 * l->head_dim;
    return stats_at + (((size_t)layer * 2 + (size_t)kv) * l->num_kv_heads + head) * 2 * l->head_dim;
}

/* Decodes random bytes with codec (f32 memory) and by the description from
 * the codebook floats of `file`; both must agree bit for bit. */
static void check_vq_decode_matches_readme(vqkv_codec_t *codec, const uint8_t *file,
                                           size_t file_len, const readme_vq_t *vq)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    const uint32_t bits = vq->bits;
    assert_int_equal(l->dtype, VQKV_DTYPE_F32);
    assert_ok(vqkv_codebook_load_buffer(codec, file, file_len));

    /* The codebook floats, from the file by the documented format. */
    size_t books_len;
    uint8_t *raw = extract_books(file, file_len, &books_len);
    size_t n_floats = books_len / 4;
    float *books = books_as_floats(raw, books_len);
    free(raw);

    /* [layer][set][K, V][branch][group][stage][2^b][d], then the statistics
     * [layer][K, V][head]{mean[D], scale[D]}. */
    uint32_t T = l->block_tokens, H = l->num_kv_heads, D = l->head_dim;
    uint32_t sets = vq->per_head ? H : 1;
    size_t set_floats = side_floats(&vq->sides[0], bits) + side_floats(&vq->sides[1], bits);
    size_t stats_at = (size_t)l->num_layers * sets * set_floats;
    assert_int_equal(n_floats, stats_at + (size_t)l->num_layers * 2 * H * 2 * D);
    assert_int_equal(stats_index(l, n_floats, 0, 0, 0), stats_at);
    /* Without cs=1 the statistics are the identity: mean 0, scale 1. */
    for (size_t i = stats_at; !vq->cs && i < n_floats; i++)
        assert_int_equal(vqkv_f32_to_bits(books[i]),
                         vqkv_f32_to_bits((i - stats_at) / D % 2 ? 1.0f : 0.0f));

    /* Random codes; finite, positive norms; finite block means. */
    size_t block_bytes = vqkv_codec_block_bytes(codec);
    uint8_t *block = malloc(block_bytes);
    assert_non_null(block);
    test_rng_t rng = {block_bytes};
    for (size_t i = 0; i < block_bytes; i++)
        block[i] = (uint8_t)test_rng_next(&rng);
    size_t at = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            size_t mean_bytes, part = readme_part_bytes(l, vq, kv, &mean_bytes);
            for (size_t i = 0; i < mean_bytes / 2; i++) {
                uint16_t mean = vqkv_f32_to_f16((float)(8.0 * test_rng_uniform(&rng) - 4.0));
                block[at + 2 * i] = (uint8_t)mean;
                block[at + 2 * i + 1] = (uint8_t)(mean >> 8);
            }
            for (size_t i = 0; i < (size_t)T * H * vq->sides[kv].n_branches; i++) {
                uint16_t norm = vqkv_f32_to_f16((float)(0.1 + 4.0 * test_rng_uniform(&rng)));
                block[at + mean_bytes + 2 * i] = (uint8_t)norm;
                block[at + mean_bytes + 2 * i + 1] = (uint8_t)(norm >> 8);
            }
            /* Escapes: indices inside the block (repeats likely), the first
             * one past it (always in the block's very last entry), far past
             * it and unused; finite scales of either sign; e4m3 codes that
             * are not NaN. */
            uint8_t *entry = block + at + part - vq->esc * test_escape_bytes(l);
            for (uint32_t i = 0; i < vq->esc; i++, entry += test_escape_bytes(l)) {
                uint32_t kind = (uint32_t)(test_rng_next(&rng) % 8), index;
                index = kind < 5   ? (uint32_t)(test_rng_next(&rng) % (T * H))
                        : kind < 6 ? T * H
                        : kind < 7 ? T * H + 1 + (uint32_t)(test_rng_next(&rng) >> 33)
                                   : UINT32_MAX;
                if (at + part == block_bytes && i == vq->esc - 1)
                    index = T * H;
                test_put_u32(entry, index);
                uint16_t scale = vqkv_f32_to_f16((float)(4.0 * test_rng_uniform(&rng) - 2.0));
                entry[4] = (uint8_t)scale;
                entry[5] = (uint8_t)(scale >> 8);
                for (uint32_t c = 0; c < D; c++)
                    if ((entry[6 + c] & 0x7f) == 0x7f)
                        entry[6 + c] ^= 0x01;
            }
            at += part;
        }
    assert_int_equal(at, block_bytes);

    /* Two slots, decoding into the first: the second must keep its bytes
     * (in this layout token T of slot 0 would be token 0 of slot 1). */
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 2);
    uint8_t *region = malloc(v.region_bytes);
    size_t n = test_block_values(l);
    float *got = malloc(n * sizeof *got), *want = malloc(n * sizeof *want);
    assert_true(region && got && want);
    memset(region, 0x7f, v.region_bytes);
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(l, &v, region, 1, got);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(vqkv_f32_to_bits(got[i]), 0x7f7f7f7fu);
    test_read_block(l, &v, region, 0, got);

    at = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const readme_side_t *side = &vq->sides[kv];
            size_t codes_per_vector = side_codes_per_vector(side);
            size_t mean_bytes, part = readme_part_bytes(l, vq, kv, &mean_bytes);
            const uint8_t *block_means = block + at;
            const uint8_t *norms = block_means + mean_bytes;
            const uint8_t *codes = norms + (size_t)T * H * side->n_branches * 2;
            for (size_t vec = 0; vec < (size_t)T * H; vec++) {
                uint32_t t = (uint32_t)(vec / H), h = (uint32_t)(vec % H);
                size_t set = vq->per_head ? h : 0;
                size_t side_at = ((size_t)layer * sets + set) * set_floats +
                                 (kv ? side_floats(&vq->sides[0], bits) : 0);
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
                const float *mean = books + stats_at + (((size_t)layer * 2 + kv) * H + h) * 2 * D;
                for (uint32_t c = 0; c < D; c++) {
                    /* Each multiply and add rounded on its own, never fused. */
                    float x = y[c] * mean[D + c];
                    x = x + mean[c];
                    if (mean_bytes > 0) {
                        const uint8_t *bm = block_means + 2 * ((size_t)h * D + c);
                        x += vqkv_f16_to_f32((uint16_t)(bm[0] | bm[1] << 8));
                    }
                    want[test_block_index(l, layer, kv, t, h, c)] = x;
                }
            }
            /* Last, the escapes in order, each overwriting its vector. */
            const uint8_t *entry = block + at + part - vq->esc * test_escape_bytes(l);
            for (uint32_t i = 0; i < vq->esc; i++, entry += test_escape_bytes(l)) {
                uint32_t index = test_get_u32(entry);
                if (index >= T * H)
                    continue;
                test_fp8_row_decode(test_get_u16(entry + 4), entry + 6, D,
                                    want + test_block_index(l, layer, kv, index / H, index % H, 0));
            }
            at += part;
        }
    for (size_t i = 0; i < n; i++)
        if (vqkv_f32_to_bits(got[i]) != vqkv_f32_to_bits(want[i])) {
            print_error("%s: value %zu decodes to %a, the README says %a\n", vqkv_codec_spec(codec),
                        i, got[i], want[i]);
            fail();
        }
    test_free_all(books, block, region, got, want);
}

/* Trains spec on base_layout's shape in f32 memory and checks its decode
 * against the description. */
static void check_trained_vq_decode(const char *spec, const readme_vq_t *vq)
{
    vqkv_layout_t l = base_layout;
    l.dtype = VQKV_DTYPE_F32;
    vqkv_train_opts_t opts = {.seed = 5, .iterations = 2};
    vqkv_codec_t *codec = new_codec(spec, &l);
    assert_ok(test_train_all(codec, 42, 64, &opts));
    uint8_t *file = NULL;
    size_t len = 0;
    assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
    vqkv_codec_free(codec);
    codec = new_codec(spec, &l);
    check_vq_decode_matches_readme(codec, file, len, vq);
    free(file);
    vqkv_codec_free(codec);
}

static void test_vq_decode_matches_documented_layout(void **state)
{
    (void)state;
    vqkv_layout_t l = base_layout;
    l.dtype = VQKV_DTYPE_F32;
    uint32_t D = l.head_dim;
    readme_vq_t vq;

    /* rvq, strided keys, block means: the run's codebooks. */
    vq = (readme_vq_t){.bits = 4, .bc = 1};
    rvq_side(D, 4, 2, 1, &vq.sides[0]);
    rvq_side(D, 4, 2, 0, &vq.sides[1]);
    vqkv_codec_t *codec = new_codec(SPEC, &l);
    check_vq_decode_matches_readme(codec, good_file, good_len, &vq);
    vqkv_codec_free(codec);

    /* The same without block means (the default), then with escapes. */
    vq.bc = 0;
    check_trained_vq_decode(SPEC_BC0, &vq);
    vq.esc = 3;
    check_trained_vq_decode(SPEC_BC0 ",esc=3", &vq);
    vq.bc = 1;
    check_trained_vq_decode(SPEC ",esc=3", &vq);

    /* A codebook set per head, with and without block means. */
    vq = (readme_vq_t){.bits = 4, .per_head = 1};
    rvq_side(D, 4, 2, 1, &vq.sides[0]);
    rvq_side(D, 4, 2, 0, &vq.sides[1]);
    check_trained_vq_decode("rvq:d=4,b=4,r=2,ph=1", &vq);
    vq.bc = 1;
    vq.esc = 1;
    check_trained_vq_decode("rvq:d=4,b=4,r=2,ph=1,bc=1,esc=1", &vq);

    /* vqkv with channel scaling and block means, as many escapes as the
     * block has vectors. */
    vq = (readme_vq_t){.bits = 3, .bc = 1, .cs = 1, .esc = 8};
    vqkv_key_side(D, 4, 2, &vq.sides[0]);
    rvq_side(D, 8, 1, 0, &vq.sides[1]);
    check_trained_vq_decode("vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,bc=1,esc=8", &vq);
    /* ... with a set per head, no block means, no escapes. */
    vq.bc = 0;
    vq.per_head = 1;
    vq.esc = 0;
    check_trained_vq_decode("vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1", &vq);

    /* rvq with contiguous keys and several stages. */
    vq = (readme_vq_t){.bits = 5, .bc = 1, .esc = 2};
    rvq_side(D, 2, 3, 0, &vq.sides[0]);
    rvq_side(D, 2, 3, 0, &vq.sides[1]);
    check_trained_vq_decode("rvq:d=2,b=5,r=3,kgroup=contig,bc=1,esc=2", &vq);
}

/* ---- block-centered keys and per-head sets ------------------------------------ */

/* The codec that `spec` names on base_layout's shape in f32 memory, loaded
 * with the codebook floats of `books` (raw little-endian bytes) through a
 * hand-built file. */
static vqkv_codec_t *codec_with_books(const char *spec, const uint8_t *books, size_t books_len)
{
    vqkv_layout_t l = base_layout;
    l.dtype = VQKV_DTYPE_F32;
    vqkv_codec_t *codec = new_codec(spec, &l);
    file_fields_t ff;
    body_fields_t bf;
    good_fields(&ff, &bf);
    bf.codec = vqkv_codec_spec(codec);
    bf.books = books;
    bf.books_len = books_len;
    size_t len;
    uint8_t *file = build_file(&ff, &bf, &len);
    assert_ok(vqkv_codebook_load_buffer(codec, file, len));
    free(file);
    return codec;
}

/* Plants outliers into x[tokens][H][D] of base_layout's heads: every 5th
 * token's head 1 gets two large spikes, and every 7th token's heads all get
 * the same spiky vector, so escapes and the means around them matter. */
static void plant_outliers(const vqkv_layout_t *l, float *x, size_t tokens)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    for (size_t t = 0; t < tokens; t++)
        for (uint32_t h = 0; h < H; h++) {
            float *v = x + (t * H + h) * D;
            if (t % 7 == 3) {
                for (uint32_t d = 0; d < D; d++)
                    v[d] = d % 3 ? 0.5f : -0.25f;
                v[D / 2] = 30.0f;
            } else if (t % 5 == 1 && h == 1) {
                v[1] += 40.0f;
                v[D - 2] -= 35.0f;
            }
        }
}

/* bc=1 is bc=0 around the block means, on both paths, escapes apart: with
 * the same codebooks (cs=0, so every reference not a block mean is 0), a
 * bc=1,esc=E key part is the f16 block means of the tokens that are not
 * escapes, then exactly the bc=0,esc=0 part of the keys minus those means,
 * then the E escape entries of the keys as they were; it decodes to the
 * bc=0 decode plus the means (a float add), but for the escaped vectors,
 * which decode to their fp8 rows. A value part is the bc=0 value part and
 * its own escape entries. */
static void test_block_centered_coding_matches_documented(void **state)
{
    (void)state;
    good_fields(&(file_fields_t){0}, &(body_fields_t){0}); /* extracts good_books */
    static const uint32_t escs[] = {0, 2, 8};
    vqkv_codec_t *bc0 = codec_with_books(SPEC_BC0, good_books, good_books_len);
    const vqkv_layout_t *l = vqkv_codec_layout(bc0);
    const uint32_t T = l->block_tokens, H = l->num_kv_heads, D = l->head_dim;
    size_t n = test_block_values(l), vectors = (size_t)T * H;
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    float *src = malloc(n * sizeof *src), *centered = malloc(n * sizeof *centered);
    float *got1 = malloc(n * sizeof *got1), *got0 = malloc(n * sizeof *got0);
    float *row = malloc(D * sizeof *row);
    uint16_t *means = malloc((size_t)l->num_layers * H * D * sizeof *means);
    uint32_t *escapes = malloc((size_t)l->num_layers * 2 * 8 * sizeof *escapes);
    uint32_t *n_esc = malloc((size_t)l->num_layers * 2 * sizeof *n_esc);
    uint8_t *region = malloc(v.region_bytes), *codes = malloc(D);
    assert_true(src && centered && got1 && got0 && row && means && escapes && n_esc && region &&
                codes);
    test_synth_block(l, 42, 91, src);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            plant_outliers(l, src + test_block_index(l, layer, kv, 0, 0, 0), T);

    for (size_t ei = 0; ei < sizeof escs / sizeof escs[0]; ei++) {
        const uint32_t esc = escs[ei];
        char spec[64];
        snprintf(spec, sizeof spec, SPEC ",esc=%u", esc);
        vqkv_codec_t *bc1 = codec_with_books(spec, good_books, good_books_len);
        readme_vq_t vq = {.bits = 4, .bc = 1, .esc = esc};
        rvq_side(D, 4, 2, 1, &vq.sides[0]);
        rvq_side(D, 4, 2, 0, &vq.sides[1]);
        size_t mean_bytes, key1 = readme_part_bytes(l, &vq, 0, &mean_bytes);
        size_t value1 = readme_part_bytes(l, &vq, 1, &(size_t){0});
        size_t entries = esc * test_escape_bytes(l);
        size_t key0 = key1 - mean_bytes - entries, value0 = value1 - entries;
        assert_int_equal(vqkv_codec_block_bytes(bc1), l->num_layers * (key1 + value1));
        assert_int_equal(vqkv_codec_block_bytes(bc0), l->num_layers * (key0 + value0));
        uint8_t *block1 = malloc(vqkv_codec_block_bytes(bc1));
        uint8_t *block0 = malloc(vqkv_codec_block_bytes(bc0));
        assert_true(block1 && block0);

        /* The encoder's plan, by the README: escapes, then the means of
         * what is left. */
        memcpy(centered, src, n * sizeof *src);
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                uint16_t *m = means + (size_t)layer * H * D;
                size_t part = (size_t)layer * 2 + (size_t)kv;
                n_esc[part] = test_part_plan(l, src + test_block_index(l, layer, kv, 0, 0, 0), esc,
                                             NULL, kv == 0 ? m : NULL, escapes + part * 8);
                assert_int_equal(n_esc[part], esc < vectors ? esc : vectors);
                for (uint32_t t = 0; kv == 0 && t < T; t++)
                    for (uint32_t h = 0; h < H; h++)
                        for (uint32_t d = 0; d < D; d++)
                            centered[test_block_index(l, layer, 0, t, h, d)] -=
                                vqkv_f16_to_f32(m[(size_t)h * D + d]);
            }
        if (esc == 2) {
            /* The planted outliers are what the values' escapes (their
             * reference is 0) catch: token 1's spiked head 1 first, then of
             * token 3's two equal vectors, tied, the lower index. */
            assert_int_equal(escapes[1 * 8 + 0], 1 * H + 1);
            assert_int_equal(escapes[1 * 8 + 1], 3 * H + 0);
        }
        test_write_block(l, &v, region, 0, src);
        assert_ok(vqkv_codec_encode(bc1, region, &v, 0, block1));
        test_write_block(l, &v, region, 0, centered);
        assert_ok(vqkv_codec_encode(bc0, region, &v, 0, block0));
        for (uint32_t layer = 0; layer < l->num_layers; layer++) {
            const uint8_t *k1 = block1 + layer * (key1 + value1);
            const uint8_t *k0 = block0 + layer * (key0 + value0);
            const uint16_t *m = means + (size_t)layer * H * D;
            for (size_t i = 0; i < (size_t)H * D; i++)
                assert_int_equal(test_get_u16(k1 + 2 * i), m[i]);
            assert_memory_equal(k1 + mean_bytes, k0, key0);
            assert_memory_equal(k1 + key1, k0 + key0, value0);
            for (int kv = 0; kv < 2; kv++) {
                size_t part = (size_t)layer * 2 + (size_t)kv;
                const uint8_t *entry = k1 + (kv ? key1 + value1 : key1) - entries;
                for (uint32_t i = 0; i < esc; i++, entry += test_escape_bytes(l)) {
                    uint32_t index = i < n_esc[part] ? escapes[part * 8 + i] : UINT32_MAX;
                    assert_int_equal(test_get_u32(entry), index);
                    if (index == UINT32_MAX)
                        continue;
                    const float *x = src + test_block_index(l, layer, kv, index / H, index % H, 0);
                    assert_int_equal(test_get_u16(entry + 4), test_fp8_row_encode(x, D, codes));
                    assert_memory_equal(entry + 6, codes, D);
                }
            }
        }

        assert_ok(vqkv_codec_decode(bc1, block1, region, &v, 0));
        test_read_block(l, &v, region, 0, got1);
        assert_ok(vqkv_codec_decode(bc0, block0, region, &v, 0));
        test_read_block(l, &v, region, 0, got0);
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                size_t part = (size_t)layer * 2 + (size_t)kv;
                for (uint32_t t = 0; t < T; t++)
                    for (uint32_t h = 0; h < H; h++) {
                        uint32_t vec = t * H + h;
                        int escaped = test_listed(escapes + part * 8, n_esc[part], vec);
                        if (escaped) {
                            const float *x = src + test_block_index(l, layer, kv, t, h, 0);
                            test_fp8_row_decode(test_fp8_row_encode(x, D, codes), codes, D, row);
                        }
                        for (uint32_t d = 0; d < D; d++) {
                            size_t i = test_block_index(l, layer, kv, t, h, d);
                            float want = got0[i];
                            if (escaped)
                                want = row[d];
                            else if (kv == 0)
                                want += vqkv_f16_to_f32(means[((size_t)layer * H + h) * D + d]);
                            assert_int_equal(vqkv_f32_to_bits(got1[i]), vqkv_f32_to_bits(want));
                        }
                    }
            }
        free(block1);
        free(block0);
        vqkv_codec_free(bc1);
    }
    test_free_all(src, centered, got1, got0, row, means, escapes, n_esc, region, codes);
    vqkv_codec_free(bc0);
}

/* Training with bc=1 block-centers the keys as the encoder will: each chunk
 * of block_tokens tokens, and a last partial chunk, loses its own f16
 * channel means, taken over the tokens that are not the chunk's escapes
 * (picked against the all-token means, as the encoder picks them). So its
 * codebooks and statistics are, bit for bit, those of bc=0 trained on keys
 * centered that way here; values are trained alike. */
static void test_block_centered_training_matches_documented(void **state)
{
    (void)state;
    static const struct {
        const char *bc1, *bc0;
        uint32_t esc;
    } specs[] = {
        {SPEC, SPEC_BC0, 0},
        {"vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1,bc=1", "vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1", 0},
        {SPEC ",esc=3", SPEC_BC0, 3},
        /* Every vector of a whole chunk (and of the last, partial one) is
         * an escape: the means are 0 and centering changes nothing. */
        {"vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1,bc=1,esc=8", "vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1",
         8},
    };
    const vqkv_layout_t *l = &base_layout;
    uint32_t T = l->block_tokens, H = l->num_kv_heads, D = l->head_dim;
    const size_t tokens = 25 * (size_t)T + 3, n = tokens * H, row = (size_t)H * D;
    vqkv_train_opts_t opts = {.seed = 31, .iterations = 3};
    float *x = malloc(n * D * sizeof *x), *centered = malloc(n * D * sizeof *centered);
    uint16_t *mean = malloc(row * sizeof *mean);
    assert_true(x && centered && mean);
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        vqkv_codec_t *bc1 = new_codec(specs[si].bc1, l), *bc0 = new_codec(specs[si].bc0, l);
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                test_synth_vectors(42, 600 + si, layer, kv, D, n, x);
                plant_outliers(l, x, tokens);
                memcpy(centered, x, n * D * sizeof *x);
                for (size_t t0 = 0; kv == 0 && t0 < tokens; t0 += T) {
                    vqkv_layout_t chunk = *l;
                    chunk.block_tokens = (uint32_t)(tokens - t0 < T ? tokens - t0 : T);
                    uint32_t escapes[8];
                    test_part_plan(&chunk, x + t0 * row, specs[si].esc, NULL, mean, escapes);
                    for (size_t t = t0; t < t0 + chunk.block_tokens; t++)
                        for (size_t i = 0; i < row; i++)
                            centered[t * row + i] = x[t * row + i] - vqkv_f16_to_f32(mean[i]);
                }
                assert_ok(vqkv_codec_train(bc1, layer, kv, x, n, &opts));
                assert_ok(vqkv_codec_train(bc0, layer, kv, centered, n, &opts));
            }
        uint8_t *file1, *file0;
        size_t len1, len0, books1_len, books0_len;
        assert_ok(vqkv_codebook_save_buffer(bc1, &file1, &len1));
        assert_ok(vqkv_codebook_save_buffer(bc0, &file0, &len0));
        uint8_t *books1 = extract_books(file1, len1, &books1_len);
        uint8_t *books0 = extract_books(file0, len0, &books0_len);
        assert_int_equal(books1_len, books0_len);
        if (memcmp(books1, books0, books1_len) != 0) {
            size_t i = 0;
            while (books1[i] == books0[i])
                i++;
            print_error("%s: codebook float %zu differs from bc=0 trained on centered keys\n",
                        specs[si].bc1, i / 4);
            fail();
        }
        test_free_all(file1, file0, books1, books0);
        vqkv_codec_free(bc1);
        vqkv_codec_free(bc0);
    }
    test_free_all(x, centered, mean);
}

/* ---- channel statistics and escapes ----------------------------------------- */

/* Training vectors [tokens][H][D] of (layer, kv) whose heads sit apart:
 * head 1 shifted by +5 on every channel (so channel means are far from 0),
 * head 0's value channel 2 constant. */
static void shifted_heads(const vqkv_layout_t *l, uint32_t layer, int kv, size_t tokens,
                          uint64_t seed, float *x)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    test_synth_vectors(42, seed, layer, kv, D, tokens * H, x);
    for (size_t t = 0; t < tokens; t++) {
        for (uint32_t d = 0; d < D; d++)
            x[(t * H + 1) * D + d] += 5.0f;
        if (kv == 1)
            x[t * H * D + 2] = 3.0f;
    }
}

/* cs=0 codecs keep no channel statistics: whatever they were trained on,
 * every mean in their file is exactly 0 and every scale exactly 1. cs=1
 * codecs store each (layer, side, head)'s channel mean and standard
 * deviation over the training vectors; a constant channel still gets a
 * positive scale, so the file loads back. */
static void test_channel_statistics_in_file(void **state)
{
    (void)state;
    static const char *const specs[] = {SPEC_BC0,
                                        SPEC,
                                        SPEC_BC0 ",esc=2",
                                        "rvq:d=4,b=4,r=2,ph=1",
                                        "vqkv:b=3,dlo=2,dhi=4,dv=8,bc=1,esc=1",
                                        "rvq:d=4,b=4,r=2,cs=1",
                                        "rvq:d=4,b=4,r=2,cs=1,esc=2",
                                        "vqkv:b=3,dlo=2,dhi=4,dv=8,cs=1,ph=1"};
    const vqkv_layout_t *l = &base_layout;
    const uint32_t H = l->num_kv_heads, D = l->head_dim;
    enum { TOKENS = 96 };
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 2};
    float *x = malloc((size_t)TOKENS * H * D * sizeof *x);
    assert_non_null(x);
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        int cs = strstr(specs[si], "cs=1") != NULL;
        vqkv_codec_t *codec = new_codec(specs[si], l);
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                shifted_heads(l, layer, kv, TOKENS, 70 + si, x);
                assert_ok(vqkv_codec_train(codec, layer, kv, x, (size_t)TOKENS * H, &opts));
            }
        uint8_t *file = NULL;
        size_t len = 0, books_len;
        assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
        uint8_t *raw = extract_books(file, len, &books_len);
        float *books = books_as_floats(raw, books_len);
        size_t n_floats = books_len / 4;
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                shifted_heads(l, layer, kv, TOKENS, 70 + si, x);
                for (uint32_t h = 0; h < H; h++) {
                    const float *mean = books + stats_index(l, n_floats, layer, kv, h);
                    const float *scale = mean + D;
                    for (uint32_t c = 0; c < D; c++) {
                        if (!cs) {
                            assert_int_equal(vqkv_f32_to_bits(mean[c]), 0);
                            assert_int_equal(vqkv_f32_to_bits(scale[c]), 0x3f800000u);
                            continue;
                        }
                        /* Keys with bc=1 would be centered first: none here. */
                        double sum = 0.0, sq = 0.0;
                        for (size_t t = 0; t < TOKENS; t++) {
                            double value = x[(t * H + h) * D + c];
                            sum += value;
                            sq += value * value;
                        }
                        double mu = sum / TOKENS, sd = sqrt(fmax(sq / TOKENS - mu * mu, 0.0));
                        if (!(fabs(mean[c] - mu) <= 1e-5 * (1.0 + fabs(mu)))) {
                            print_error("%s: layer %u %s head %u channel %u: mean %g, the data's "
                                        "%g\n",
                                        specs[si], layer, kv ? "V" : "K", h, c, mean[c], mu);
                            fail();
                        }
                        if (kv == 1 && h == 0 && c == 2) {
                            assert_true(mean[c] == 3.0f);
                            assert_true(scale[c] > 0.0f && isfinite(scale[c]));
                        } else if (!(fabs(scale[c] - sd) <= 1e-5 * sd)) {
                            print_error("%s: layer %u %s head %u channel %u: scale %g, the data's "
                                        "std %g\n",
                                        specs[si], layer, kv ? "V" : "K", h, c, scale[c], sd);
                            fail();
                        }
                    }
                }
            }
        vqkv_codec_t *again = new_codec(specs[si], l);
        assert_ok(vqkv_codebook_load_buffer(again, file, len));
        vqkv_codec_free(again);
        test_free_all(books, raw, file);
        vqkv_codec_free(codec);
    }
    free(x);
}

/* With cs=1 an escape is measured from its head's trained channel mean (and
 * for keys with bc=1 from the block means): a head whose vectors all sit
 * far from 0, around their mean, has no outliers, while a modest spike in
 * the other head is one. Every part's escapes are the README's, computed
 * with the means the file holds. */
static void test_escapes_measured_from_channel_mean(void **state)
{
    (void)state;
    static const char *const specs[] = {"rvq:d=4,b=4,r=2,cs=1,esc=2",
                                        "rvq:d=4,b=4,r=2,cs=1,bc=1,esc=2"};
    vqkv_layout_t l = base_layout;
    l.dtype = VQKV_DTYPE_F32;
    const uint32_t T = l.block_tokens, H = l.num_kv_heads, D = l.head_dim;
    enum { TOKENS = 128 };
    vqkv_train_opts_t opts = {.seed = 4, .iterations = 2};
    size_t n = test_block_values(&l);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    float *x = malloc((size_t)TOKENS * H * D * sizeof *x), *src = malloc(n * sizeof *src);
    float *channel_mean = malloc((size_t)H * D * sizeof *channel_mean);
    uint16_t *means = malloc((size_t)H * D * sizeof *means);
    uint8_t *region = malloc(v.region_bytes);
    assert_true(x && src && channel_mean && means && region);
    /* Head 0 sits around 20 on every channel, in training and in the block;
     * token 2's head 1 (vector 5) gets two spikes. */
    test_synth_block(&l, 42, 17, src);
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < T; t++) {
                for (uint32_t d = 0; d < D; d++)
                    src[test_block_index(&l, layer, kv, t, 0, d)] += 20.0f;
                if (t == 2) {
                    src[test_block_index(&l, layer, kv, t, 1, 4)] += 30.0f;
                    src[test_block_index(&l, layer, kv, t, 1, 9)] -= 25.0f;
                }
            }
    test_write_block(&l, &v, region, 0, src);
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        int bc = strstr(specs[si], "bc=1") != NULL;
        vqkv_codec_t *codec = new_codec(specs[si], &l);
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                test_synth_vectors(42, 5, layer, kv, D, (size_t)TOKENS * H, x);
                for (size_t i = 0; i < (size_t)TOKENS * H * D; i += (size_t)H * D)
                    for (uint32_t d = 0; d < D; d++)
                        x[i + d] += 20.0f;
                assert_ok(vqkv_codec_train(codec, layer, kv, x, (size_t)TOKENS * H, &opts));
            }
        uint8_t *file = NULL, *block = malloc(vqkv_codec_block_bytes(codec));
        size_t len = 0, books_len;
        assert_non_null(block);
        assert_ok(vqkv_codebook_save_buffer(codec, &file, &len));
        uint8_t *raw = extract_books(file, len, &books_len);
        float *books = books_as_floats(raw, books_len);
        assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
        readme_vq_t vq = {.bits = 4, .bc = bc, .cs = 1, .esc = 2};
        rvq_side(D, 4, 2, 1, &vq.sides[0]);
        rvq_side(D, 4, 2, 0, &vq.sides[1]);
        size_t at = 0;
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                size_t mean_bytes, part = readme_part_bytes(&l, &vq, kv, &mean_bytes);
                for (uint32_t h = 0; h < H; h++)
                    memcpy(channel_mean + (size_t)h * D,
                           books + stats_index(&l, books_len / 4, layer, kv, h), D * sizeof(float));
                /* The trained means are where the data is, not 0; for keys
                 * with bc=1, where the data is once block-centered. */
                float head_avg[2] = {0.0f, 0.0f};
                for (uint32_t d = 0; d < D; d++)
                    for (uint32_t h = 0; h < 2; h++)
                        head_avg[h] += channel_mean[(size_t)h * D + d] / (float)D;
                if (mean_bytes > 0)
                    assert_true(fabsf(head_avg[0]) < 1.0f && fabsf(head_avg[1]) < 1.0f);
                else
                    assert_true(head_avg[0] > 17.0f && fabsf(head_avg[1]) < 3.0f);
                uint32_t want[2];
                assert_int_equal(test_part_plan(&l, src + test_block_index(&l, layer, kv, 0, 0, 0),
                                                2, channel_mean, mean_bytes ? means : NULL, want),
                                 2);
                const uint8_t *entry = block + at + part - 2 * test_escape_bytes(&l);
                assert_int_equal(test_get_u32(entry), 2 * H + 1);
                for (uint32_t i = 0; i < 2; i++, entry += test_escape_bytes(&l))
                    assert_int_equal(test_get_u32(entry), want[i]);
                for (size_t i = 0; i < mean_bytes / 2; i++)
                    assert_int_equal(test_get_u16(block + at + 2 * i), means[i]);
                at += part;
            }
        assert_int_equal(at, vqkv_codec_block_bytes(codec));
        test_free_all(books, raw, file, block);
        vqkv_codec_free(codec);
    }
    test_free_all(x, src, channel_mean, means, region);
}

/* Channel scales divide on encode, so a file with a scale that is not > 0
 * is refused as malformed, checksum or not, and leaves the codec as it was;
 * any finite mean, and any positive scale, is fine. */
static void test_nonpositive_scales_refused(void **state)
{
    (void)state;
    file_fields_t ff;
    body_fields_t bf;
    good_fields(&ff, &bf);
    const vqkv_layout_t *l = &base_layout;
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    size_t n_floats = good_books_len / 4;
    size_t stats_at = n_floats - (size_t)l->num_layers * 2 * H * 2 * D;
    /* The mean and scale float index of (layer, kv, head, channel). */
#define STAT(layer, kv, head, c, is_scale)                                                         \
    (stats_at + ((((size_t)(layer)*2 + (kv)) * H + (head)) * 2 + (is_scale)) * D + (c))
    const size_t scales[] = {STAT(0, 0, 0, 0, 1), STAT(1, 0, 1, 7, 1),
                             STAT(l->num_layers - 1, 1, H - 1, D - 1, 1)};
    const size_t means[] = {STAT(0, 0, 0, 0, 0), STAT(l->num_layers - 1, 1, H - 1, D - 1, 0)};
#undef STAT
    uint8_t *books = malloc(good_books_len);
    assert_non_null(books);
    /* The run's file has unit scales (cs=0), where the offsets say. */
    for (size_t i = 0; i < 3; i++) {
        const uint8_t *p = good_books + 4 * scales[i];
        assert_true(vqkv_bits_to_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                     (uint32_t)p[3] << 24) == 1.0f);
    }

    static const float bad[] = {0.0f, -0.0f, -1.0f, -0x1p-149f, -65504.0f};
    static const float fine_scales[] = {2.0f, 1e-3f, 65504.0f};
    static const float fine_means[] = {0.0f, -0.0f, -7.5f, 1e6f};
    for (size_t pass = 0; pass < 3; pass++) {
        size_t count = pass == 0   ? sizeof bad / sizeof bad[0]
                       : pass == 1 ? sizeof fine_scales / sizeof fine_scales[0]
                                   : sizeof fine_means / sizeof fine_means[0];
        const float *vals = pass == 0 ? bad : pass == 1 ? fine_scales : fine_means;
        size_t n_at = pass == 2 ? 2 : 3;
        for (size_t vi = 0; vi < count; vi++)
            for (size_t ai = 0; ai < n_at; ai++) {
                size_t at = pass == 2 ? means[ai] : scales[ai];
                uint32_t bits = vqkv_f32_to_bits(vals[vi]);
                memcpy(books, good_books, good_books_len);
                for (int b = 0; b < 4; b++) /* little-endian */
                    books[4 * at + (size_t)b] = (uint8_t)(bits >> (8 * b));
                good_fields(&ff, &bf);
                bf.books = books;
                size_t len;
                uint8_t *file = build_file(&ff, &bf, &len);
                char what[96];
                snprintf(what, sizeof what, "%s %a at float %zu", pass == 2 ? "mean" : "scale",
                         (double)vals[vi], at);
                if (pass == 0) {
                    assert_refused(file, len, VQKV_EFORMAT, what);
                } else {
                    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
                    int rc = vqkv_codebook_load_buffer(codec, file, len);
                    if (rc != VQKV_OK) {
                        print_error("%s: refused with %d (%s)\n", what, rc, vqkv_strerror(rc));
                        fail();
                    }
                    vqkv_codec_free(codec);
                }
                free(file);
            }
    }
    free(books);
}

/* ---- files on disk -------------------------------------------------------- */

typedef struct {
    char dir[512];
    char path[600];
} scratch_t;

static int make_scratch(void **state)
{
    scratch_t *s = calloc(1, sizeof *s);
    if (s == NULL || test_make_dir(s->dir, sizeof s->dir, "vqkv-test") != 0) {
        free(s);
        return -1;
    }
    *state = s;
    return 0;
}

static int remove_scratch(void **state)
{
    scratch_t *s = *state;
    test_remove_tree(s->dir);
    free(s);
    return 0;
}

/* The directory holds exactly the entries `names` (NULL-terminated): no
 * temporary file of a save is left behind. */
static void assert_dir_holds(const char *dir, const char *const *names)
{
    size_t want = 0, seen = 0;
    while (names[want] != NULL)
        want++;
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        int known = 0;
        for (size_t i = 0; i < want; i++)
            known |= strcmp(e->d_name, names[i]) == 0;
        if (!known) {
            print_error("%s holds an unexpected \"%s\"\n", dir, e->d_name);
            closedir(d);
            fail();
        }
        seen++;
    }
    closedir(d);
    assert_int_equal(seen, want);
}

/* The bytes of the file at path. */
static uint8_t *read_whole(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    assert_true(size >= 0);
    rewind(f);
    uint8_t *buf = malloc((size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    *len = (size_t)size;
    return buf;
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
    assert_dir_holds(s->dir, (const char *const[]){"books.vqcb", NULL});

    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load(codec, s->path));
    assert_codes_like_trained(codec);
    vqkv_codec_free(codec);

    /* Saving again replaces the file. */
    assert_ok(vqkv_codebook_save(trained, s->path));
    codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load(codec, s->path));
    vqkv_codec_free(codec);
    assert_dir_holds(s->dir, (const char *const[]){"books.vqcb", NULL});
}

/* A saved codebook file is created like any file the process writes, mode
 * 0666 less the umask, so that a daemon running as another user of the
 * group can read what vqkvctl saved: not the 0600 of a private temporary. */
static void test_saved_file_mode(void **state)
{
    scratch_t *s = *state;
    mode_t mask = umask(022); /* read the umask; set a usual one */
    snprintf(s->path, sizeof s->path, "%s/books.vqcb", s->dir);
    int rc = vqkv_codebook_save(trained, s->path);
    struct stat st;
    int stat_rc = stat(s->path, &st);
    umask(mask);
    assert_ok(rc);
    assert_int_equal(stat_rc, 0);
    if ((st.st_mode & 0777) != 0644) {
        print_error("saved with mode %03o under umask 022, expected 644\n",
                    (unsigned)(st.st_mode & 0777));
        fail();
    }
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

    /* A directory is not a codebook file: loading it is an I/O error that
     * leaves the codec alone, and saving over it fails without leaving a
     * temporary behind, beside it or (for "dir/") inside it. */
    char dir[700], dir_slash[710];
    snprintf(dir, sizeof dir, "%s/books.d", s->dir);
    snprintf(dir_slash, sizeof dir_slash, "%s/", dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    codec = new_codec(SPEC, &base_layout);
    assert_rc(vqkv_codebook_load(codec, dir), VQKV_EIO);
    assert_rc(vqkv_codebook_load(codec, dir_slash), VQKV_EIO);
    assert_int_equal(vqkv_codec_needs_training(codec), 1);
    assert_ok(vqkv_codebook_load_buffer(codec, good_file, good_len));
    assert_rc(vqkv_codebook_load(codec, dir), VQKV_EIO);
    assert_codes_like_trained(codec);
    vqkv_codec_free(codec);
    assert_rc(vqkv_codebook_save(trained, dir), VQKV_EIO);
    assert_rc(vqkv_codebook_save(trained, dir_slash), VQKV_EIO);
    assert_dir_holds(s->dir, (const char *const[]){"empty.vqcb", "cut.vqcb", "books.d", NULL});
    assert_dir_holds(dir, (const char *const[]){NULL});
}

/* Several threads save different codecs' codebooks to one path while
 * another loads it: every load sees a whole file, and at the end the file
 * is exactly one of the saved ones, with no temporary left beside it. */
enum { SAVERS = 4, SAVES_EACH = 25, LOADS = 100 };

typedef struct {
    const vqkv_codec_t *codec;
    const char *path;
    int failures;
} saver_t;

static void *save_repeatedly(void *arg)
{
    saver_t *job = arg;
    for (int i = 0; i < SAVES_EACH; i++)
        if (vqkv_codebook_save(job->codec, job->path) != VQKV_OK)
            job->failures++;
    return NULL;
}

typedef struct {
    const char *path;
    uint8_t *const *files; /* what each saver's codec saves */
    const size_t *lens;
    int failures;
} loader_t;

static void *load_repeatedly(void *arg)
{
    loader_t *job = arg;
    vqkv_codec_t *codec = NULL;
    if (vqkv_codec_create(SPEC, &base_layout, &codec) != VQKV_OK)
        return (void *)1;
    for (int i = 0; i < LOADS; i++) {
        uint8_t *buf = NULL;
        size_t len = 0;
        int one_of = 0;
        if (vqkv_codebook_load(codec, job->path) == VQKV_OK &&
            vqkv_codebook_save_buffer(codec, &buf, &len) == VQKV_OK)
            for (int k = 0; k < SAVERS; k++)
                one_of |= len == job->lens[k] && memcmp(buf, job->files[k], len) == 0;
        job->failures += !one_of;
        free(buf);
    }
    vqkv_codec_free(codec);
    return NULL;
}

static void test_concurrent_saves(void **state)
{
    scratch_t *s = *state;
    snprintf(s->path, sizeof s->path, "%s/books.vqcb", s->dir);
    vqkv_codec_t *codecs[SAVERS];
    uint8_t *files[SAVERS];
    size_t lens[SAVERS];
    saver_t savers[SAVERS];
    pthread_t threads[SAVERS + 1];
    for (int k = 0; k < SAVERS; k++) {
        vqkv_train_opts_t opts = {.seed = 100 + (uint64_t)k, .iterations = 2};
        codecs[k] = new_codec(SPEC, &base_layout);
        assert_ok(test_train_all(codecs[k], 42, 64, &opts));
        assert_ok(vqkv_codebook_save_buffer(codecs[k], &files[k], &lens[k]));
        for (int j = 0; j < k; j++)
            assert_false(lens[j] == lens[k] && memcmp(files[j], files[k], lens[k]) == 0);
        savers[k] = (saver_t){codecs[k], s->path, 0};
    }
    assert_ok(vqkv_codebook_save(codecs[0], s->path));
    loader_t loader = {s->path, files, lens, 0};
    for (int k = 0; k < SAVERS; k++)
        assert_int_equal(pthread_create(&threads[k], NULL, save_repeatedly, &savers[k]), 0);
    assert_int_equal(pthread_create(&threads[SAVERS], NULL, load_repeatedly, &loader), 0);
    void *loader_rc = NULL;
    for (int k = 0; k < SAVERS; k++)
        assert_int_equal(pthread_join(threads[k], NULL), 0);
    assert_int_equal(pthread_join(threads[SAVERS], &loader_rc), 0);
    assert_null(loader_rc);
    for (int k = 0; k < SAVERS; k++)
        assert_int_equal(savers[k].failures, 0);
    if (loader.failures != 0) {
        print_error("%d of %d loads during the saves failed or got another file\n", loader.failures,
                    LOADS);
        fail();
    }

    size_t len;
    uint8_t *disk = read_whole(s->path, &len);
    int one_of = 0;
    for (int k = 0; k < SAVERS; k++)
        one_of |= len == lens[k] && memcmp(disk, files[k], len) == 0;
    assert_true(one_of);
    vqkv_codec_t *codec = new_codec(SPEC, &base_layout);
    assert_ok(vqkv_codebook_load(codec, s->path));
    vqkv_codec_free(codec);
    assert_dir_holds(s->dir, (const char *const[]){"books.vqcb", NULL});
    free(disk);
    for (int k = 0; k < SAVERS; k++) {
        free(files[k]);
        vqkv_codec_free(codecs[k]);
    }
}

/* Codecs a and b (same spec and layout) encode a block to the same bytes
 * and decode it to the same values. */
static void assert_codes_alike(const vqkv_codec_t *a, const vqkv_codec_t *b)
{
    const vqkv_layout_t *l = vqkv_codec_layout(a);
    size_t n = test_block_values(l), block_bytes = vqkv_codec_block_bytes(a);
    assert_int_equal(vqkv_codec_block_bytes(b), block_bytes);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    float *src = malloc(n * sizeof *src);
    uint8_t *region_a = malloc(v.region_bytes), *region_b = malloc(v.region_bytes);
    uint8_t *block_a = malloc(block_bytes), *block_b = malloc(block_bytes);
    assert_true(src && region_a && region_b && block_a && block_b);
    test_synth_block(l, 42, 4321, src);
    test_write_block(l, &v, region_a, 0, src);
    assert_ok(vqkv_codec_encode(a, region_a, &v, 0, block_a));
    assert_ok(vqkv_codec_encode(b, region_a, &v, 0, block_b));
    assert_memory_equal(block_a, block_b, block_bytes);
    memset(region_a, 0, v.region_bytes);
    memset(region_b, 0xff, v.region_bytes);
    assert_ok(vqkv_codec_decode(a, block_a, region_a, &v, 0));
    assert_ok(vqkv_codec_decode(b, block_a, region_b, &v, 0));
    assert_memory_equal(region_a, region_b, v.region_bytes);
    test_free_all(src, region_a, region_b, block_a, block_b);
}

/* A codec with a codebook set per head goes through a file, on disk and in
 * memory, and comes back coding exactly as it did: every head's set in its
 * place. */
static void test_per_head_file_round_trip(void **state)
{
    scratch_t *s = *state;
    static const char *const specs[] = {"rvq:d=4,b=4,r=2,ph=1",
                                        "vqkv:b=4,dlo=2,dhi=4,dv=8,ph=1,bc=1,esc=2",
                                        "rvq:d=4,b=4,r=2,ph=1,cs=1"};
    vqkv_layout_t l = {2, 3, 16, 4, VQKV_DTYPE_BF16};
    vqkv_train_opts_t opts = {.seed = 77, .iterations = 3};
    snprintf(s->path, sizeof s->path, "%s/books.vqcb", s->dir);
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        vqkv_codec_t *codec = new_codec(specs[si], &l);
        assert_ok(test_train_all(codec, 42, 96, &opts));
        assert_ok(vqkv_codebook_save(codec, s->path));
        vqkv_codec_t *from_disk = new_codec(specs[si], &l);
        assert_ok(vqkv_codebook_load(from_disk, s->path));
        assert_codes_alike(codec, from_disk);
        uint8_t *buf = NULL;
        size_t len = 0;
        assert_ok(vqkv_codebook_save_buffer(codec, &buf, &len));
        vqkv_codec_t *from_buffer = new_codec(specs[si], &l);
        assert_ok(vqkv_codebook_load_buffer(from_buffer, buf, len));
        assert_codes_alike(codec, from_buffer);
        /* The file on disk is the buffer, and it saves back unchanged. */
        size_t disk_len;
        uint8_t *disk = read_whole(s->path, &disk_len);
        assert_int_equal(disk_len, len);
        assert_memory_equal(disk, buf, len);
        test_assert_saves_as(from_disk, buf, len);
        /* ... and a shared-set codec of the same parameters refuses it. */
        char shared[64];
        snprintf(shared, sizeof shared, "%s", specs[si]);
        memcpy(strstr(shared, "ph=1"), "ph=0", 4);
        vqkv_codec_t *other = new_codec(shared, &l);
        assert_rc(vqkv_codebook_load_buffer(other, buf, len), VQKV_EMISMATCH);
        vqkv_codec_free(other);
        free(disk);
        free(buf);
        vqkv_codec_free(from_buffer);
        vqkv_codec_free(from_disk);
        vqkv_codec_free(codec);
    }
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
        cmocka_unit_test(test_block_centered_coding_matches_documented),
        cmocka_unit_test(test_block_centered_training_matches_documented),
        cmocka_unit_test(test_channel_statistics_in_file),
        cmocka_unit_test(test_escapes_measured_from_channel_mean),
        cmocka_unit_test(test_nonpositive_scales_refused),
        cmocka_unit_test_setup_teardown(test_path_round_trip, make_scratch, remove_scratch),
        cmocka_unit_test_setup_teardown(test_path_errors, make_scratch, remove_scratch),
        cmocka_unit_test_setup_teardown(test_saved_file_mode, make_scratch, remove_scratch),
        cmocka_unit_test_setup_teardown(test_concurrent_saves, make_scratch, remove_scratch),
        cmocka_unit_test_setup_teardown(test_per_head_file_round_trip, make_scratch,
                                        remove_scratch),
    };
    return cmocka_run_group_tests(tests, train_once, free_trained);
}
