/* test_commvq.c -- the commvq codec: RoPE-commutative key codebooks
 * (kernels/commute.h) trained by EM. What a user relies on: keys after RoPE
 * come back within a bound; turning every key of a block by RoPE and the
 * codebook tables by the same rotation gives the same codes and the rotated
 * decode (the commutation the codec is named for), in the pairing convention
 * the spec names; training is deterministic; codebook files round-trip and
 * anything damaged is refused. Generic codec checks (views, dtypes, sizes,
 * threads) run on commvq in test_codec.c.
 */
#include "test_util.h"

#include "commute.h"

#include <math.h>
#include <msgpack.h>
#include <openssl/evp.h>

#define ROPE_THETA 10000.0

/* Channels (re, im) of RoPE pair p in convention inter (0 neox, 1 inter). */
static void pair_channels(uint32_t D, uint32_t p, int inter, uint32_t *re, uint32_t *im)
{
    *re = inter ? 2 * p : p;
    *im = inter ? 2 * p + 1 : p + D / 2;
}

/* Turns every pair of the head vector x[D] by RoPE at position pos. */
static void rope_rotate(float *x, uint32_t D, double pos, int inter)
{
    for (uint32_t p = 0; p < D / 2; p++) {
        uint32_t re, im;
        pair_channels(D, p, inter, &re, &im);
        double a = pos * pow(ROPE_THETA, -2.0 * p / D), c = cos(a), s = sin(a);
        double xr = x[re], xi = x[im];
        x[re] = (float)(xr * c - xi * s);
        x[im] = (float)(xr * s + xi * c);
    }
}

/* Keys [tokens][heads][D] as a model caches them: a per-head direction plus
 * noise, turned by RoPE at positions first_pos, first_pos + 1, ... */
static void rope_keys(uint32_t heads, uint32_t D, uint64_t first_pos, size_t tokens, int inter,
                      uint64_t seed, float *out)
{
    test_rng_t rng = {seed};
    float base[8][VQKV_MAX_HEAD_DIM];
    test_rng_t base_rng = {4242};
    for (uint32_t h = 0; h < heads; h++)
        for (uint32_t c = 0; c < D; c++)
            base[h][c] = (float)(2.0 * test_rng_gaussian(&base_rng));
    for (size_t t = 0; t < tokens; t++)
        for (uint32_t h = 0; h < heads; h++) {
            float *x = out + (t * heads + h) * D;
            for (uint32_t c = 0; c < D; c++)
                x[c] = base[h][c] + (float)test_rng_gaussian(&rng);
            rope_rotate(x, D, (double)(first_pos + t), inter);
        }
}

static void gaussian(float *x, size_t n, uint64_t seed)
{
    test_rng_t rng = {seed};
    for (size_t i = 0; i < n; i++)
        x[i] = (float)test_rng_gaussian(&rng);
}

/* Trains every (layer, side) of codec on `tokens` RoPE'd keys and gaussian
 * values. */
static void train_rope(vqkv_codec_t *codec, size_t tokens, int inter, const vqkv_train_opts_t *opts)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t n = tokens * l->num_kv_heads;
    float *k = malloc(n * l->head_dim * sizeof *k), *v = malloc(n * l->head_dim * sizeof *v);
    assert_non_null(k);
    assert_non_null(v);
    for (uint32_t layer = 0; layer < l->num_layers; layer++) {
        rope_keys(l->num_kv_heads, l->head_dim, 0, tokens, inter, 100 + layer, k);
        gaussian(v, n * l->head_dim, 200 + layer);
        assert_ok(vqkv_codec_train(codec, layer, 0, k, n, opts));
        assert_ok(vqkv_codec_train(codec, layer, 1, v, n, opts));
    }
    test_free_all(k, v);
}

/* One slot of f32 memory in the vLLM view, and the block bytes. */
typedef struct {
    vqkv_layout_t l;
    vqkv_kv_view_t v;
    float *mem;
    uint8_t *block;
} slot_t;

static void slot_init(slot_t *s, const vqkv_codec_t *codec)
{
    s->l = *vqkv_codec_layout(codec);
    vqkv_kv_view_vllm(&s->v, &s->l, 1);
    s->mem = malloc(s->v.region_bytes);
    s->block = malloc(vqkv_codec_block_bytes(codec));
    assert_non_null(s->mem);
    assert_non_null(s->block);
}

/* Encodes and decodes the slot's memory in place. */
static void slot_round_trip(slot_t *s, const vqkv_codec_t *codec)
{
    assert_ok(vqkv_codec_encode(codec, s->mem, &s->v, 0, s->block));
    assert_ok(vqkv_codec_decode(codec, s->block, s->mem, &s->v, 0));
}

/* The [T][H][D] tensor of (layer, kv) in the slot. */
static float *slot_part(slot_t *s, uint32_t layer, int kv)
{
    return (float *)((uint8_t *)s->mem + layer * s->v.layer_stride + kv * s->v.kv_stride);
}

static double rel_error(const float *ref, const float *got, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)ref[i] - got[i]) * ((double)ref[i] - got[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / den);
}

/* ---- round trip ---------------------------------------------------------- */

/* Keys after RoPE, far past the positions trained on, come back within a
 * bound (the measured error plus about 25%), and commvq with a third more
 * stages does better. */
static void test_round_trip_rope_keys(void **state)
{
    (void)state;
    static const struct {
        const char *spec;
        int inter;
        double max_key_error;
    } cases[] = {
        {"commvq:d=8,b=8,r=2", 0, 0.49},
        {"commvq:d=8,b=8,r=2,rope=inter", 1, 0.53},
        {"commvq:d=8,b=8,r=3", 0, 0.33},
    };
    vqkv_layout_t l = {1, 2, 64, 32, VQKV_DTYPE_F32};
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 8, .threads = 2};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(cases[i].spec, &l, &codec));
        train_rope(codec, 1024, cases[i].inter, &opts);
        slot_t s;
        slot_init(&s, codec);
        size_t n = (size_t)l.block_tokens * l.num_kv_heads * l.head_dim;
        float *ref = malloc(n * sizeof *ref);
        assert_non_null(ref);
        rope_keys(l.num_kv_heads, l.head_dim, 5000, l.block_tokens, cases[i].inter, 77, ref);
        memcpy(slot_part(&s, 0, 0), ref, n * sizeof *ref);
        gaussian(slot_part(&s, 0, 1), n, 78);
        slot_round_trip(&s, codec);
        double err = rel_error(ref, slot_part(&s, 0, 0), n);
        print_message("  %-64s K rel. error %.4f (<= %.2f)\n", vqkv_codec_spec(codec), err,
                      cases[i].max_key_error);
        assert_true(err <= cases[i].max_key_error);
        test_free_all(ref, s.mem, s.block);
        vqkv_codec_free(codec);
    }
}

/* ---- the commutative property ----------------------------------------- */

/* What a codebook file holds, unpacked, and packing it back with new books
 * (the layout and codec spec kept as they were). */
static uint8_t *file_with_books(const uint8_t *file, size_t len, const float *books,
                                size_t n_floats, size_t *out_len)
{
    msgpack_unpacked top, body;
    msgpack_unpacked_init(&top);
    msgpack_unpacked_init(&body);
    size_t off = 0;
    assert_int_equal(msgpack_unpack_next(&top, (const char *)file, len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *root = &top.data, *body_bin = NULL;
    for (uint32_t i = 0; i < root->via.map.size; i++)
        if (strncmp(root->via.map.ptr[i].key.via.str.ptr, "body", 4) == 0)
            body_bin = &root->via.map.ptr[i].val;
    assert_non_null(body_bin);
    off = 0;
    assert_int_equal(
        msgpack_unpack_next(&body, body_bin->via.bin.ptr, body_bin->via.bin.size, &off),
        MSGPACK_UNPACK_SUCCESS);

    msgpack_sbuffer nb, nf;
    msgpack_packer pk;
    msgpack_sbuffer_init(&nb);
    msgpack_packer_init(&pk, &nb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    for (uint32_t i = 0; i < body.data.via.map.size; i++) {
        const msgpack_object_kv *kv = &body.data.via.map.ptr[i];
        if (strncmp(kv->key.via.str.ptr, "books", 5) == 0)
            continue;
        msgpack_pack_object(&pk, kv->key);
        msgpack_pack_object(&pk, kv->val);
    }
    msgpack_pack_str(&pk, 5);
    msgpack_pack_str_body(&pk, "books", 5);
    msgpack_pack_bin(&pk, n_floats * 4);
    for (size_t i = 0; i < n_floats; i++) {
        uint32_t u = vqkv_f32_to_bits(books[i]);
        uint8_t le[4] = {(uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
        msgpack_pack_bin_body(&pk, le, 4);
    }
    uint8_t digest[32];
    EVP_Digest(nb.data, nb.size, digest, NULL, EVP_sha256(), NULL);
    msgpack_sbuffer_init(&nf);
    msgpack_packer_init(&pk, &nf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str(&pk, 6);
    msgpack_pack_str_body(&pk, "format", 6);
    msgpack_pack_str(&pk, 13);
    msgpack_pack_str_body(&pk, "vqkv-codebook", 13);
    msgpack_pack_str(&pk, 7);
    msgpack_pack_str_body(&pk, "version", 7);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_str(&pk, 4);
    msgpack_pack_str_body(&pk, "body", 4);
    msgpack_pack_bin(&pk, nb.size);
    msgpack_pack_bin_body(&pk, nb.data, nb.size);
    msgpack_pack_str(&pk, 6);
    msgpack_pack_str_body(&pk, "sha256", 6);
    msgpack_pack_bin(&pk, 32);
    msgpack_pack_bin_body(&pk, digest, 32);
    msgpack_sbuffer_destroy(&nb);
    msgpack_unpacked_destroy(&top);
    msgpack_unpacked_destroy(&body);
    *out_len = nf.size;
    return (uint8_t *)msgpack_sbuffer_release(&nf);
}

/* The books of a one-layer codebook file as floats (README order). */
static float *file_books(const uint8_t *file, size_t len, size_t *n_floats)
{
    msgpack_unpacked top, body;
    msgpack_unpacked_init(&top);
    msgpack_unpacked_init(&body);
    size_t off = 0;
    assert_int_equal(msgpack_unpack_next(&top, (const char *)file, len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    const msgpack_object *root = &top.data;
    float *books = NULL;
    for (uint32_t i = 0; i < root->via.map.size; i++) {
        if (strncmp(root->via.map.ptr[i].key.via.str.ptr, "body", 4) != 0)
            continue;
        const msgpack_object *b = &root->via.map.ptr[i].val;
        off = 0;
        assert_int_equal(msgpack_unpack_next(&body, b->via.bin.ptr, b->via.bin.size, &off),
                         MSGPACK_UNPACK_SUCCESS);
        for (uint32_t j = 0; j < body.data.via.map.size; j++) {
            const msgpack_object_kv *kv = &body.data.via.map.ptr[j];
            if (strncmp(kv->key.via.str.ptr, "books", 5) != 0)
                continue;
            *n_floats = kv->val.via.bin.size / 4;
            books = malloc(*n_floats * sizeof *books);
            assert_non_null(books);
            const uint8_t *p = (const uint8_t *)kv->val.via.bin.ptr;
            for (size_t f = 0; f < *n_floats; f++)
                books[f] = vqkv_bits_to_f32(test_get_u32(p + 4 * f));
        }
    }
    assert_non_null(books);
    msgpack_unpacked_destroy(&top);
    msgpack_unpacked_destroy(&body);
    return books;
}

/* Turns the key tables of a one-layer commvq file (d, b, r as in the spec;
 * the README's order: [group][stage][2^(b/2)][d], group g holding pairs
 * g + j * D/d as (re, im) entries 2j, 2j + 1) by RoPE at position pos. */
static void rotate_key_tables(float *books, uint32_t D, uint32_t d, uint32_t b, uint32_t r,
                              double pos)
{
    uint32_t G = D / d, rows = 1u << (b / 2);
    for (uint32_t g = 0; g < G; g++)
        for (uint32_t s = 0; s < r; s++)
            for (uint32_t a = 0; a < rows; a++) {
                float *row = books + (((size_t)g * r + s) * rows + a) * d;
                for (uint32_t j = 0; j < d / 2; j++) {
                    uint32_t p = g + j * G;
                    double ang = pos * pow(ROPE_THETA, -2.0 * p / D), c = cos(ang), sn = sin(ang);
                    double x = row[2 * j], y = row[2 * j + 1];
                    row[2 * j] = (float)(x * c - y * sn);
                    row[2 * j + 1] = (float)(x * sn + y * c);
                }
            }
}

/* Codes a block with codebooks trained on RoPE'd keys, then the same block
 * with every key turned by RoPE over `shift` more positions in convention
 * key_inter, coded by the same codebooks with their tables turned alike.
 * Returns the largest relative difference between the second decode and the
 * first decode turned by the shift; values must come back unchanged. */
static double rotated_decode_gap(int codec_inter, int key_inter, double shift)
{
    enum { D = 16, d = 4, b = 6, r = 2 };
    vqkv_layout_t l = {1, 2, D, 16, VQKV_DTYPE_F32};
    char spec[64];
    snprintf(spec, sizeof spec, "commvq:d=%d,b=%d,r=%d,rope=%s", d, b, r,
             codec_inter ? "inter" : "neox");
    vqkv_codec_t *plain = NULL, *turned = NULL;
    assert_ok(vqkv_codec_create(spec, &l, &plain));
    assert_ok(vqkv_codec_create(spec, &l, &turned));
    vqkv_train_opts_t opts = {.seed = 5, .iterations = 6, .threads = 1};
    train_rope(plain, 512, codec_inter, &opts);

    uint8_t *file, *rotated;
    size_t len, rotated_len, n_floats;
    assert_ok(vqkv_codebook_save_buffer(plain, &file, &len));
    float *books = file_books(file, len, &n_floats);
    rotate_key_tables(books, D, d, b, r, shift);
    rotated = file_with_books(file, len, books, n_floats, &rotated_len);
    assert_ok(vqkv_codebook_load_buffer(turned, rotated, rotated_len));

    slot_t s1, s2;
    slot_init(&s1, plain);
    slot_init(&s2, plain);
    size_t vectors = (size_t)l.block_tokens * l.num_kv_heads, n = vectors * D;
    rope_keys(l.num_kv_heads, D, 300, l.block_tokens, codec_inter, 11, slot_part(&s1, 0, 0));
    gaussian(slot_part(&s1, 0, 1), n, 12);
    memcpy(s2.mem, s1.mem, s1.v.region_bytes);
    for (size_t i = 0; i < vectors; i++)
        rope_rotate(slot_part(&s2, 0, 0) + i * D, D, shift, key_inter);
    slot_round_trip(&s1, plain);
    slot_round_trip(&s2, turned);
    assert_memory_equal(slot_part(&s1, 0, 1), slot_part(&s2, 0, 1), n * sizeof(float));

    double worst = 0.0;
    for (size_t i = 0; i < vectors; i++) {
        float *want = slot_part(&s1, 0, 0) + i * D;
        rope_rotate(want, D, shift, key_inter);
        worst = fmax(worst, rel_error(want, slot_part(&s2, 0, 0) + i * D, D));
    }
    test_free_all(file, rotated, books, s1.mem, s1.block, s2.mem, s2.block);
    vqkv_codec_free(plain);
    vqkv_codec_free(turned);
    return worst;
}

/* The commutation itself: a block turned by RoPE, coded with the turned
 * tables, decodes to the turned decode of the original, in both pairing
 * conventions and at any shift; with the other convention's rotation it
 * does not, which is why the spec names the convention. */
static void test_commutes_with_rope(void **state)
{
    (void)state;
    static const double shifts[] = {1.0, 37.0, 4096.0};
    for (int inter = 0; inter < 2; inter++)
        for (size_t i = 0; i < sizeof shifts / sizeof shifts[0]; i++) {
            double gap = rotated_decode_gap(inter, inter, shifts[i]);
            print_message("  rope=%s shift %5.0f: largest relative gap %.2e\n",
                          inter ? "inter" : "neox ", shifts[i], gap);
            assert_true(gap < 1e-4);
        }
    double wrong = rotated_decode_gap(0, 1, 37.0);
    print_message("  rope=neox codec, interleaved rotation: gap %.2e\n", wrong);
    assert_true(wrong > 1e-2);
}

/* Expanding a turned table gives the turned codewords: every codeword is
 * c[A] + J c[B], and J (a quarter turn per pair) commutes with rotation. */
static void test_expand_commutes(void **state)
{
    (void)state;
    enum { d = 6, h = 2, Q = 1 << h, K = Q * Q };
    float table[Q * d], turned[Q * d], words[K * d], turned_words[K * d];
    gaussian(table, Q * d, 9);
    static const double angle[d / 2] = {0.3, -2.0, 1.234};
    memcpy(turned, table, sizeof table);
    for (uint32_t a = 0; a < Q; a++)
        for (uint32_t j = 0; j < d / 2; j++) {
            float *p = turned + a * d + 2 * j;
            double x = p[0], y = p[1], c = cos(angle[j]), s = sin(angle[j]);
            p[0] = (float)(x * c - y * s);
            p[1] = (float)(x * s + y * c);
        }
    vqkv__commute_expand(table, d, h, words);
    vqkv__commute_expand(turned, d, h, turned_words);
    for (uint32_t k = 0; k < K; k++) {
        /* Codeword (A, B) is c[A] + J c[B] pair by pair. */
        const float *ca = table + (k / Q) * d, *cb = table + (k % Q) * d;
        for (uint32_t j = 0; j < d / 2; j++) {
            const float *w = words + k * d + 2 * j, *tw = turned_words + k * d + 2 * j;
            assert_float_equal(w[0], ca[2 * j] - cb[2 * j + 1], 0.0f);
            assert_float_equal(w[1], ca[2 * j + 1] + cb[2 * j], 0.0f);
            double c = cos(angle[j]), s = sin(angle[j]);
            assert_float_equal(tw[0], w[0] * c - w[1] * s, 1e-5);
            assert_float_equal(tw[1], w[0] * s + w[1] * c, 1e-5);
        }
    }
}

/* Mean squared distance of x[n][d] to the nearest of the codewords of table. */
static double table_error(const float *x, size_t n, uint32_t d, uint32_t h, const float *table)
{
    uint32_t K = 1u << (2 * h);
    float *words = malloc((size_t)K * d * sizeof *words);
    assert_non_null(words);
    vqkv__commute_expand(table, d, h, words);
    double err = 0.0;
    for (size_t i = 0; i < n; i++) {
        double best = INFINITY;
        for (uint32_t k = 0; k < K; k++) {
            double s = 0.0;
            for (uint32_t j = 0; j < d; j++) {
                double t = (double)x[i * d + j] - words[(size_t)k * d + j];
                s += t * t;
            }
            best = fmin(best, s);
        }
        err += best;
    }
    free(words);
    return err / (double)n;
}

/* EM on data drawn around the codewords of a commutative codebook: the
 * annealed iterations take the error well below that of the starting table
 * (k-means++ seeds projected onto the commutative form, iterations = 0). A
 * structured codebook is not always recovered exactly: EM, as the paper
 * notes, finds local optima, so only a clear gain is asserted. */
static void test_em_improves_on_its_start(void **state)
{
    (void)state;
    enum { d = 4, h = 2, Q = 1 << h, K = Q * Q, N = 2048 };
    float planted[Q * d], words[K * d], start[Q * d], trained[Q * d];
    float *x = malloc((size_t)N * d * sizeof *x);
    assert_non_null(x);
    gaussian(planted, Q * d, 21);
    vqkv__commute_expand(planted, d, h, words);
    test_rng_t rng = {22};
    for (size_t i = 0; i < N; i++) {
        uint32_t k = (uint32_t)(test_rng_next(&rng) % K);
        for (uint32_t j = 0; j < d; j++)
            x[i * d + j] = words[k * d + j] + (float)(0.02 * test_rng_gaussian(&rng));
    }
    for (uint64_t seed = 1; seed <= 3; seed++) {
        assert_ok(vqkv__commute_em(x, N, d, h, 0, seed, start));
        assert_ok(vqkv__commute_em(x, N, d, h, 16, seed, trained));
        double e0 = table_error(x, N, d, h, start), e1 = table_error(x, N, d, h, trained);
        print_message("  seed %u: error %.4f at the start, %.4f after 16 EM steps\n",
                      (unsigned)seed, e0, e1);
        assert_true(e1 < 0.5 * e0);
    }
    free(x);
}

/* ---- training and files ------------------------------------------------ */

static uint8_t *trained_file(const char *spec, uint64_t seed, uint32_t threads, size_t *len)
{
    vqkv_layout_t l = {2, 2, 32, 16, VQKV_DTYPE_F16};
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(spec, &l, &codec));
    vqkv_train_opts_t opts = {.seed = seed, .iterations = 4, .threads = threads};
    train_rope(codec, 256, 0, &opts);
    uint8_t *buf;
    assert_ok(vqkv_codebook_save_buffer(codec, &buf, len));
    vqkv_codec_free(codec);
    return buf;
}

/* Same seed and data: the same codebooks at any thread count; another seed
 * gives others. */
static void test_training_deterministic(void **state)
{
    (void)state;
    size_t a_len, b_len, c_len;
    uint8_t *a = trained_file("commvq:d=4,b=6", 7, 1, &a_len);
    uint8_t *b = trained_file("commvq:d=4,b=6", 7, 2, &b_len);
    uint8_t *c = trained_file("commvq:d=4,b=6", 8, 2, &c_len);
    assert_int_equal(a_len, b_len);
    assert_memory_equal(a, b, a_len);
    assert_int_equal(a_len, c_len);
    assert_memory_not_equal(a, c, a_len);
    test_free_all(a, b, c);
}

/* A saved file loads into a fresh codec, which then codes every byte as the
 * trained one; truncated, damaged or foreign files are refused and leave
 * the codec untrained. Files hold the commutative tables, not codewords:
 * 2^(b/2) rows a key codebook. */
static void test_codebook_file(void **state)
{
    (void)state;
    const char *spec = "commvq:d=4,b=6,r=2";
    vqkv_layout_t l = {2, 2, 32, 16, VQKV_DTYPE_F16};
    size_t len;
    uint8_t *file = trained_file(spec, 3, 1, &len);
    vqkv_codec_t *trained = NULL, *loaded = NULL;
    assert_ok(vqkv_codec_create(spec, &l, &trained));
    assert_ok(vqkv_codec_create(spec, &l, &loaded));
    assert_ok(vqkv_codebook_load_buffer(trained, file, len));

    /* Books: per layer K tables (8 groups x 2 stages x 8 rows x 4), V
     * codewords (8 x 2 x 64 x 4), then channel statistics. */
    size_t n_floats;
    float *books = file_books(file, len, &n_floats);
    assert_int_equal(n_floats, 2 * (8 * 2 * 8 * 4 + 8 * 2 * 64 * 4) + 2 * 2 * 2 * 2 * 32);

    /* Truncated anywhere, or one byte changed: refused, codec untouched. */
    for (size_t cut = 0; cut < len; cut += (cut < 64 || cut + 64 > len) ? 1 : 97)
        assert_rc(vqkv_codebook_load_buffer(loaded, file, cut), VQKV_EFORMAT);
    uint8_t *bad = malloc(len);
    assert_non_null(bad);
    for (size_t at = 0; at < len; at += 61) {
        memcpy(bad, file, len);
        bad[at] ^= 0x5a;
        int rc = vqkv_codebook_load_buffer(loaded, bad, len);
        assert_true(rc == VQKV_EFORMAT || rc == VQKV_EMISMATCH);
    }
    /* Well formed with a checksum that matches, but a NaN in a table. */
    books[5] = NAN;
    size_t nan_len;
    uint8_t *nan_file = file_with_books(file, len, books, n_floats, &nan_len);
    assert_rc(vqkv_codebook_load_buffer(loaded, nan_file, nan_len), VQKV_EFORMAT);
    assert_int_equal(vqkv_codec_needs_training(loaded), 1);

    /* Another codec's or another convention's files do not fit. */
    size_t other_len;
    uint8_t *other = trained_file("rvq:d=4,b=6,r=2", 3, 1, &other_len);
    assert_rc(vqkv_codebook_load_buffer(loaded, other, other_len), VQKV_EMISMATCH);
    free(other);
    other = trained_file("commvq:d=4,b=6,r=2,rope=inter", 3, 1, &other_len);
    assert_rc(vqkv_codebook_load_buffer(loaded, other, other_len), VQKV_EMISMATCH);
    assert_int_equal(vqkv_codec_needs_training(loaded), 1);

    /* The real file: every encoded byte as the codec it came from. */
    assert_ok(vqkv_codebook_load_buffer(loaded, file, len));
    size_t block_bytes = vqkv_codec_block_bytes(trained);
    float *src = malloc(test_block_values(&l) * sizeof *src);
    uint8_t *want = malloc(block_bytes), *got = malloc(block_bytes);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    uint8_t *mem = malloc(v.region_bytes);
    assert_non_null(src);
    assert_non_null(want);
    assert_non_null(got);
    assert_non_null(mem);
    test_synth_block(&l, 1, 2, src);
    test_write_block(&l, &v, mem, 0, src);
    assert_ok(vqkv_codec_encode(trained, mem, &v, 0, want));
    assert_ok(vqkv_codec_encode(loaded, mem, &v, 0, got));
    assert_memory_equal(want, got, block_bytes);
    test_free_all(file, books, bad, nan_file, other, src, want, got, mem);
    vqkv_codec_free(trained);
    vqkv_codec_free(loaded);
}

/* Bits/value as kernels/README.md states them: keys 16/D + r*b/d, values
 * 16/D + rv*b/dv; and specs that cannot be built are refused. */
static void test_sizes_and_specs(void **state)
{
    (void)state;
    static const struct {
        const char *spec;
        double key_bits, value_bits;
    } cases[] = {
        {"commvq", 0.25 + 2.0, 0.25 + 2.0},
        {"commvq:d=16,r=2", 0.25 + 1.0, 0.25 + 1.0},
        {"commvq:d=16,r=2,dv=8,rv=1", 0.25 + 1.0, 0.25 + 1.0},
        {"commvq:d=32,r=3,dv=16,rv=1", 0.25 + 0.75, 0.25 + 0.5},
    };
    vqkv_layout_t l = {3, 3, 64, 32, VQKV_DTYPE_F16};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(cases[i].spec, &l, &codec));
        assert_true(vqkv_codec_bits_per_value(codec) ==
                    (cases[i].key_bits + cases[i].value_bits) / 2.0);
        vqkv_codec_free(codec);
    }
    static const char *const bad[] = {"commvq:b=5",       "commvq:d=5",  "commvq:d=12",
                                      "commvq:rope=half", "commvq:rv=9", "commvq:dv=0"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        vqkv_codec_t *codec = NULL;
        assert_rc(vqkv_codec_create(bad[i], &l, &codec), VQKV_ESPEC);
        assert_null(codec);
    }
    /* Canonical specs spell every parameter out and parse back to
     * themselves. */
    vqkv_codec_t *a = NULL, *b = NULL;
    assert_ok(vqkv_codec_create("commvq:rope=inter,b=6", &l, &a));
    assert_string_equal(vqkv_codec_spec(a),
                        "commvq:d=8,r=2,dv=8,rv=2,rope=inter,b=6,cs=0,ph=0,bc=0,esc=0");
    assert_ok(vqkv_codec_create(vqkv_codec_spec(a), &l, &b));
    assert_string_equal(vqkv_codec_spec(a), vqkv_codec_spec(b));
    vqkv_codec_free(a);
    vqkv_codec_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes_and_specs),
        cmocka_unit_test(test_expand_commutes),
        cmocka_unit_test(test_em_improves_on_its_start),
        cmocka_unit_test(test_round_trip_rope_keys),
        cmocka_unit_test(test_commutes_with_rope),
        cmocka_unit_test(test_training_deterministic),
        cmocka_unit_test(test_codebook_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
