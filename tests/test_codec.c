/* test_codec.c -- the codec interface of kernels/vqkv_codec.h: spec strings,
 * layouts, views and their bounds, block sizes, the documented byte layouts
 * (fp8 and KIVI whole, the VQ codecs' block means and escape entries), and
 * round trips of every codec through strided worker memory of every dtype.
 *
 * The VQ codecs are trained once per run (small sets, few iterations) and
 * their codebooks copied into every codec that needs them, through the
 * codebook buffer functions.
 */
#include "test_util.h"

#include <float.h>
#include <pthread.h>

/* The layout most tests use: small, but with more than one layer, head and
 * slot so that a stride mix-up shows. */
#define TEST_LAYERS 2
#define TEST_HEADS 2
#define TEST_HEAD_DIM 64
#define TEST_TOKENS 16
#define TEST_SLOTS 3
#define PROFILE_SEED 42u
#define TRAIN_VECTORS 2048u

typedef enum { KIND_FP16, KIND_FP8, KIND_KIVI, KIND_RVQ, KIND_VQKV, KIND_COMMVQ } codec_kind_t;

typedef struct {
    const char *spec;
    /* Name and every parameter the canonical spec must spell out. */
    const char *canonical;
    codec_kind_t kind;
    /* Parameters spelled out again here, to compute sizes independently. */
    uint32_t bits, d, r, g, dlo, dhi, dv, rv;
    /* VQ only: whether keys carry block means (bc=1; the default is 0), and
     * the escape entries per part (esc, default 0). */
    uint32_t bc, esc;
    /* bits/value on the test layout, worked out by hand from the layout. */
    double bits_per_value;
    /* Relative error bounds (||x - x'|| / ||x||) for keys and values on
     * the synthetic data: the worst measured (test_error_per_codec prints
     * it) plus about 20-25%, so a real regression fails. */
    double max_key_error, max_value_error;
} codec_case_t;

/* The default rvq's parameters, size and bounds. kgroup only changes which
 * key channels share a subvector, so rvq:kgroup=contig has the same size,
 * and it is held to the same bounds. */
#define DEFAULT_RVQ_FIELDS                                                                         \
    .kind = KIND_RVQ, .bits = 8, .d = 8, .r = 2, .bits_per_value = 2.25, .max_key_error = 0.17,    \
    .max_value_error = 0.38

static const codec_case_t cases[] = {
    {.spec = "fp16", .canonical = "fp16", .kind = KIND_FP16, .bits_per_value = 16.0},
    {.spec = "fp8",
     .canonical = "fp8",
     .kind = KIND_FP8,
     .bits_per_value = 8.25,
     .max_key_error = 0.03,
     .max_value_error = 0.03},
    {.spec = "kivi2",
     .canonical = "kivi2:g=32",
     .kind = KIND_KIVI,
     .bits = 2,
     .g = 32,
     .bits_per_value = 3.5,
     .max_key_error = 0.28,
     .max_value_error = 0.56},
    {.spec = "kivi4",
     .canonical = "kivi4:g=32",
     .kind = KIND_KIVI,
     .bits = 4,
     .g = 32,
     .bits_per_value = 5.5,
     .max_key_error = 0.055,
     .max_value_error = 0.11},
    /* The defaults: no block means, no escapes, no channel statistics. */
    {.spec = "rvq",
     .canonical = "rvq:d=8,r=2,kgroup=strided,b=8,cs=0,ph=0,bc=0,esc=0",
     DEFAULT_RVQ_FIELDS},
    {.spec = "rvq:kgroup=contig",
     .canonical = "rvq:d=8,r=2,kgroup=contig,b=8,cs=0,ph=0,bc=0,esc=0",
     DEFAULT_RVQ_FIELDS},
    /* Two escape entries of 6 + 64 bytes per part. */
    {.spec = "rvq:esc=2",
     .canonical = "rvq:d=8,r=2,kgroup=strided,b=8,cs=0,ph=0,bc=0,esc=2",
     .kind = KIND_RVQ,
     .bits = 8,
     .d = 8,
     .r = 2,
     .esc = 2,
     .bits_per_value = 2.796875,
     .max_key_error = 0.165,
     .max_value_error = 0.35},
    /* Bits spent on keys: three stages on keys, values in groups of 16 with
     * two; 3.25 bits a key value, 1.25 a value's. */
    {.spec = "rvq:r=3,dv=16,rv=2",
     .canonical = "rvq:d=8,r=3,dv=16,rv=2,kgroup=strided,b=8,cs=0,ph=0,bc=0,esc=0",
     .kind = KIND_RVQ,
     .bits = 8,
     .d = 8,
     .r = 3,
     .dv = 16,
     .rv = 2,
     .bits_per_value = 2.25,
     .max_key_error = 0.105,
     .max_value_error = 0.65},
    {.spec = "rvq:d=4,b=6,r=3",
     .canonical = "rvq:d=4,r=3,kgroup=strided,b=6,cs=0,ph=0,bc=0,esc=0",
     .kind = KIND_RVQ,
     .bits = 6,
     .d = 4,
     .r = 3,
     .bits_per_value = 4.75,
     .max_key_error = 0.05,
     .max_value_error = 0.11},
    /* The same with block means on the keys. */
    {.spec = "rvq:d=4,b=6,r=3,bc=1",
     .canonical = "rvq:d=4,r=3,kgroup=strided,b=6,cs=0,ph=0,bc=1,esc=0",
     .kind = KIND_RVQ,
     .bits = 6,
     .d = 4,
     .r = 3,
     .bc = 1,
     .bits_per_value = 5.25,
     .max_key_error = 0.05,
     .max_value_error = 0.11},
    /* A codebook set per kv head. */
    {.spec = "rvq:b=6,ph=1",
     .canonical = "rvq:d=8,r=2,kgroup=strided,b=6,cs=0,ph=1,bc=0,esc=0",
     .kind = KIND_RVQ,
     .bits = 6,
     .d = 8,
     .r = 2,
     .bits_per_value = 1.75,
     .max_key_error = 0.22,
     .max_value_error = 0.49},
    {.spec = "vqkv",
     .canonical = "vqkv:dlo=4,dhi=8,dv=4,b=8,cs=0,ph=0,bc=0,esc=0",
     .kind = KIND_VQKV,
     .bits = 8,
     .dlo = 4,
     .dhi = 8,
     .dv = 4,
     .bits_per_value = 2.125,
     .max_key_error = 0.24,
     .max_value_error = 0.36},
    /* Block means and escapes together. */
    {.spec = "vqkv:bc=1,esc=3",
     .canonical = "vqkv:dlo=4,dhi=8,dv=4,b=8,cs=0,ph=0,bc=1,esc=3",
     .kind = KIND_VQKV,
     .bits = 8,
     .dlo = 4,
     .dhi = 8,
     .dv = 4,
     .bc = 1,
     .esc = 3,
     .bits_per_value = 3.4453125,
     .max_key_error = 0.21,
     .max_value_error = 0.33},
    {.spec = "vqkv:b=6,dlo=2,dhi=4,dv=8,bc=1",
     .canonical = "vqkv:dlo=2,dhi=4,dv=8,b=6,cs=0,ph=0,bc=1,esc=0",
     .kind = KIND_VQKV,
     .bits = 6,
     .dlo = 2,
     .dhi = 4,
     .dv = 8,
     .bc = 1,
     .bits_per_value = 2.375,
     .max_key_error = 0.18,
     .max_value_error = 0.72},
    {.spec = "vqkv:b=6,dlo=2,dhi=4,dv=8,ph=1",
     .canonical = "vqkv:dlo=2,dhi=4,dv=8,b=6,cs=0,ph=1,bc=0,esc=0",
     .kind = KIND_VQKV,
     .bits = 6,
     .dlo = 2,
     .dhi = 4,
     .dv = 8,
     .bits_per_value = 1.875,
     .max_key_error = 0.18,
     .max_value_error = 0.72},
    /* Commutative key codebooks; values as rvq's. */
    {.spec = "commvq",
     .canonical = "commvq:d=8,r=2,dv=8,rv=2,rope=neox,b=8,cs=0,ph=0,bc=0,esc=0",
     .kind = KIND_COMMVQ,
     .bits = 8,
     .d = 8,
     .r = 2,
     .dv = 8,
     .rv = 2,
     .bits_per_value = 2.25,
     .max_key_error = 0.19,
     .max_value_error = 0.38},
    {.spec = "commvq:d=4,r=3,dv=16,rv=1,rope=inter,b=6,esc=2",
     .canonical = "commvq:d=4,r=3,dv=16,rv=1,rope=inter,b=6,cs=0,ph=0,bc=0,esc=2",
     .kind = KIND_COMMVQ,
     .bits = 6,
     .d = 4,
     .r = 3,
     .dv = 16,
     .rv = 1,
     .esc = 2,
     .bits_per_value = 3.234375,
     .max_key_error = 0.075,
     .max_value_error = 0.85},
};
#define NUM_CASES (sizeof cases / sizeof cases[0])

static const vqkv_dtype_t all_dtypes[] = {VQKV_DTYPE_F16, VQKV_DTYPE_BF16, VQKV_DTYPE_F32};
static const char *const dtype_names[] = {"f16", "bf16", "f32"};

/* Codebooks of each VQ case, trained once in the group setup. */
static uint8_t *trained_books[NUM_CASES];
static size_t trained_books_len[NUM_CASES];

static vqkv_layout_t test_layout(vqkv_dtype_t dtype)
{
    vqkv_layout_t l = {TEST_LAYERS, TEST_HEADS, TEST_HEAD_DIM, TEST_TOKENS, dtype};
    return l;
}

static int is_vq(const codec_case_t *c)
{
    return c->kind == KIND_RVQ || c->kind == KIND_VQKV || c->kind == KIND_COMMVQ;
}

static size_t case_named(const char *spec)
{
    for (size_t i = 0; i < NUM_CASES; i++)
        if (strcmp(cases[i].spec, spec) == 0)
            return i;
    fail_msg("no test case \"%s\"", spec);
    return 0;
}

static vqkv_codec_t *make_codec(size_t case_index, vqkv_dtype_t dtype)
{
    vqkv_layout_t l = test_layout(dtype);
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(cases[case_index].spec, &l, &codec));
    assert_non_null(codec);
    if (is_vq(&cases[case_index]))
        assert_ok(vqkv_codebook_load_buffer(codec, trained_books[case_index],
                                            trained_books_len[case_index]));
    assert_int_equal(vqkv_codec_needs_training(codec), 0);
    return codec;
}

/* Many tests run one check on a codec of every case, in memory of one
 * dtype. EVERY_CASE_TEST(suffix, dtype) registers check_<suffix> as the
 * test test_<suffix>: cmocka hands the pair to run_every_case as the
 * test's state, which makes and frees the codecs. */
typedef struct {
    void (*check)(vqkv_codec_t *codec, size_t case_index);
    vqkv_dtype_t dtype;
} every_case_test_t;

static void run_every_case(void **state)
{
    const every_case_test_t *test = *state;
    for (size_t ci = 0; ci < NUM_CASES; ci++) {
        vqkv_codec_t *codec = make_codec(ci, test->dtype);
        test->check(codec, ci);
        vqkv_codec_free(codec);
    }
}

/* Left unformatted: clang-format would put each brace of the compound
 * literal on a line of its own. */
/* clang-format off */
#define EVERY_CASE_TEST(suffix, memory_dtype)                                                      \
    {.name = "test_" #suffix,                                                                      \
     .test_func = run_every_case,                                                                  \
     .initial_state = &(every_case_test_t){.check = check_##suffix, .dtype = memory_dtype}}
/* clang-format on */

static int train_all_cases(void **state)
{
    (void)state;
    vqkv_train_opts_t opts = {.seed = 1, .iterations = 4};
    for (size_t i = 0; i < NUM_CASES; i++) {
        if (!is_vq(&cases[i]))
            continue;
        vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
        vqkv_codec_t *codec = NULL;
        if (vqkv_codec_create(cases[i].spec, &l, &codec) != VQKV_OK ||
            test_train_all(codec, PROFILE_SEED, TRAIN_VECTORS, &opts) != VQKV_OK ||
            vqkv_codebook_save_buffer(codec, &trained_books[i], &trained_books_len[i]) != VQKV_OK) {
            vqkv_codec_free(codec);
            return -1;
        }
        vqkv_codec_free(codec);
    }
    return 0;
}

static int free_trained(void **state)
{
    (void)state;
    for (size_t i = 0; i < NUM_CASES; i++)
        free(trained_books[i]);
    return 0;
}

/* ---- sizes -------------------------------------------------------------- */

static uint64_t bytes_for_bits(uint64_t bits)
{
    return (bits + 7) / 8;
}

/* Part bytes of side kv (0 K, 1 V) from each codec's documented byte layout. */
static uint64_t expected_part_bytes(const codec_case_t *c, const vqkv_layout_t *l, int kv)
{
    uint64_t T = l->block_tokens, H = l->num_kv_heads, D = l->head_dim, key = 0, value = 0;
    switch (c->kind) {
    case KIND_FP16: key = value = T * H * D * 2; break;
    case KIND_FP8: key = value = T * H * (2 + D); break; /* fp16 scale + a byte a value */
    case KIND_KIVI:
        /* fp16 min and step per key channel, per value channel group. */
        key = 4 * H * D + bytes_for_bits(T * H * D * c->bits);
        value = 4 * T * H * (D / c->g) + bytes_for_bits(T * H * D * c->bits);
        break;
    case KIND_RVQ: /* values' dv and rv default to the keys' d and r */
        key = 2 * T * H + bytes_for_bits(T * H * (D / c->d) * c->r * c->bits);
        value = 2 * T * H + bytes_for_bits(T * H * (D / (c->dv ? c->dv : c->d)) *
                                           (c->rv ? c->rv : c->r) * c->bits);
        break;
    case KIND_VQKV:
        /* Keys: two branches, each with its own fp16 norm. */
        key = 4 * T * H + bytes_for_bits(T * H * ((D / 2) / c->dlo + (D / 2) / c->dhi) * c->bits);
        value = 2 * T * H + bytes_for_bits(T * H * (D / c->dv) * c->bits);
        break;
    case KIND_COMMVQ:
        key = 2 * T * H + bytes_for_bits(T * H * (D / c->d) * c->r * c->bits);
        value = 2 * T * H + bytes_for_bits(T * H * (D / c->dv) * c->rv * c->bits);
        break;
    }
    if (is_vq(c)) {
        /* With bc=1 a key part starts with f16 block_mean[H][D]; values never. */
        key += c->bc ? 2 * H * D : 0;
        /* Every part ends with esc entries: u32 index, f16 scale, e4m3[D]. */
        key += c->esc * (4 + 2 + D);
        value += c->esc * (4 + 2 + D);
    }
    return kv == 0 ? key : value;
}

static uint64_t expected_block_bytes(const codec_case_t *c, const vqkv_layout_t *l)
{
    return l->num_layers * (expected_part_bytes(c, l, 0) + expected_part_bytes(c, l, 1));
}

/* Where part (layer, kv) starts in a block, by the README's formula. */
static uint64_t part_offset(const codec_case_t *c, const vqkv_layout_t *l, uint32_t layer, int kv)
{
    uint64_t key = expected_part_bytes(c, l, 0);
    return layer * (key + expected_part_bytes(c, l, 1)) + (uint64_t)kv * key;
}

/* Whether canonical spec `got` names codec `name` with every "key=value" of
 * `items` (comma separated) among its parameters. Parameters the list does
 * not name may appear too, in any order: the promise is "every parameter
 * spelled out", not a fixed set. */
static int spec_has(const char *got, const char *name, const char *items)
{
    size_t name_len = strlen(name);
    if (strncmp(got, name, name_len) != 0)
        return 0;
    if (got[name_len] == '\0')
        return *items == '\0';
    if (got[name_len] != ':')
        return 0;
    char padded_got[128], item[32];
    snprintf(padded_got, sizeof padded_got, ",%s,", got + name_len + 1);
    for (const char *p = items; *p != '\0';) {
        size_t len = strcspn(p, ",");
        snprintf(item, sizeof item, ",%.*s,", (int)len, p);
        if (strstr(padded_got, item) == NULL)
            return 0;
        p += len + (p[len] == ',');
    }
    return 1;
}

static void assert_canonical(const char *spec, const vqkv_layout_t *l, const char *name,
                             const char *items)
{
    vqkv_codec_t *codec = NULL, *again = NULL;
    assert_ok(vqkv_codec_create(spec, l, &codec));
    const char *canonical = vqkv_codec_spec(codec);
    if (!spec_has(canonical, name, items)) {
        print_error("\"%s\" has the canonical spec \"%s\", which lacks some of %s:%s\n", spec,
                    canonical, name, items);
        vqkv_codec_free(codec);
        fail();
    }
    /* A fixed point: the canonical string names the same codec. */
    assert_ok(vqkv_codec_create(canonical, l, &again));
    assert_string_equal(vqkv_codec_spec(again), canonical);
    assert_int_equal(vqkv_codec_block_bytes(again), vqkv_codec_block_bytes(codec));
    vqkv_codec_free(again);
    vqkv_codec_free(codec);
}

static void test_canonical_specs(void **state)
{
    (void)state;
    vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
    for (size_t i = 0; i < NUM_CASES; i++) {
        const char *colon = strchr(cases[i].canonical, ':');
        char name[16];
        size_t name_len = colon ? (size_t)(colon - cases[i].canonical) : strlen(cases[i].canonical);
        snprintf(name, sizeof name, "%.*s", (int)name_len, cases[i].canonical);
        assert_canonical(cases[i].spec, &l, name, colon ? colon + 1 : "");
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(cases[i].spec, &l, &codec));
        assert_memory_equal(vqkv_codec_layout(codec), &l, sizeof l);
        vqkv_codec_free(codec);
    }
    /* The unparameterized codecs have nothing to spell out. */
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create("fp16", &l, &codec));
    assert_string_equal(vqkv_codec_spec(codec), "fp16");
    vqkv_codec_free(codec);
    assert_ok(vqkv_codec_create("fp8", &l, &codec));
    assert_string_equal(vqkv_codec_spec(codec), "fp8");
    vqkv_codec_free(codec);

    /* Key order and defaults spelled out do not change the codec: equal
     * codecs have equal strings. */
    static const char *const same_as_rvq[] = {
        "rvq:r=2,b=8,d=8",
        "rvq:kgroup=strided",
        "rvq:cs=0",
        "rvq:ph=0",
        "rvq:bc=0",
        "rvq:esc=0",
        "rvq:d=8,b=8,r=2,kgroup=strided",
        "rvq:esc=0,bc=0,ph=0,cs=0,b=8,kgroup=strided,r=2,d=8",
        "rvq:dv=8,rv=2",
        "rvq:rv=2",
    };
    vqkv_codec_t *plain = NULL;
    assert_ok(vqkv_codec_create("rvq", &l, &plain));
    for (size_t i = 0; i < sizeof same_as_rvq / sizeof same_as_rvq[0]; i++) {
        assert_ok(vqkv_codec_create(same_as_rvq[i], &l, &codec));
        assert_string_equal(vqkv_codec_spec(codec), vqkv_codec_spec(plain));
        vqkv_codec_free(codec);
    }
    /* ... and different codecs different ones. */
    static const char *const not_rvq[] = {
        "rvq:b=7",  "rvq:kgroup=contig", "rvq:cs=1",  "rvq:r=1",  "rvq:d=4",   "rvq:ph=1",
        "rvq:bc=1", "rvq:esc=1",         "rvq:esc=8", "rvq:rv=3", "rvq:dv=16", "rvq:d=16,dv=8"};
    for (size_t i = 0; i < sizeof not_rvq / sizeof not_rvq[0]; i++) {
        assert_ok(vqkv_codec_create(not_rvq[i], &l, &codec));
        assert_string_not_equal(vqkv_codec_spec(codec), vqkv_codec_spec(plain));
        vqkv_codec_free(codec);
    }
    vqkv_codec_free(plain);

    assert_canonical("vqkv:cs=1,dv=8", &l, "vqkv", "b=8,dlo=4,dhi=8,dv=8,cs=1,ph=0,bc=0,esc=0");
    assert_canonical("rvq:b=6,cs=1", &l, "rvq", "d=8,b=6,r=2,kgroup=strided,cs=1,ph=0,bc=0,esc=0");
    assert_canonical("rvq:ph=1,bc=1", &l, "rvq", "d=8,b=8,r=2,kgroup=strided,cs=0,ph=1,bc=1,esc=0");
    assert_canonical("vqkv:bc=1", &l, "vqkv", "b=8,dlo=4,dhi=8,dv=4,cs=0,ph=0,bc=1,esc=0");
    assert_canonical("rvq:esc=8,bc=1", &l, "rvq",
                     "d=8,b=8,r=2,kgroup=strided,cs=0,ph=0,bc=1,esc=8");
    assert_canonical("vqkv:esc=5", &l, "vqkv", "b=8,dlo=4,dhi=8,dv=4,cs=0,ph=0,bc=0,esc=5");
    /* The canonical strings the README shows. */
    assert_ok(vqkv_codec_create("rvq", &l, &codec));
    assert_string_equal(vqkv_codec_spec(codec),
                        "rvq:d=8,r=2,kgroup=strided,b=8,cs=0,ph=0,bc=0,esc=0");
    vqkv_codec_free(codec);
    assert_ok(vqkv_codec_create("vqkv", &l, &codec));
    assert_string_equal(vqkv_codec_spec(codec), "vqkv:dlo=4,dhi=8,dv=4,b=8,cs=0,ph=0,bc=0,esc=0");
    vqkv_codec_free(codec);
    assert_canonical("kivi2:g=16", &l, "kivi2", "g=16");
    /* KIVI's default group is capped at head_dim. */
    vqkv_layout_t narrow = {1, 1, 16, 4, VQKV_DTYPE_F16};
    assert_canonical("kivi4", &narrow, "kivi4", "g=16");
}

static void test_block_bytes_and_bits_per_value(void **state)
{
    (void)state;
    vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
    for (size_t i = 0; i < NUM_CASES; i++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(cases[i].spec, &l, &codec));
        assert_int_equal(vqkv_codec_block_bytes(codec), expected_block_bytes(&cases[i], &l));
        double values = 2.0 * TEST_LAYERS * TEST_HEADS * TEST_HEAD_DIM * TEST_TOKENS;
        assert_true(vqkv_codec_bits_per_value(codec) ==
                    (double)vqkv_codec_block_bytes(codec) * 8.0 / values);
        if (fabs(vqkv_codec_bits_per_value(codec) - cases[i].bits_per_value) > 1e-12) {
            print_error("%s: %.6f bits/value, expected %.6f\n", cases[i].spec,
                        vqkv_codec_bits_per_value(codec), cases[i].bits_per_value);
            fail();
        }
        vqkv_codec_free(codec);
    }
    /* The dtype of worker memory does not change the compressed size. */
    vqkv_layout_t f32 = test_layout(VQKV_DTYPE_F32);
    vqkv_codec_t *a = NULL, *b = NULL;
    assert_ok(vqkv_codec_create("fp8", &l, &a));
    assert_ok(vqkv_codec_create("fp8", &f32, &b));
    assert_int_equal(vqkv_codec_block_bytes(a), vqkv_codec_block_bytes(b));
    vqkv_codec_free(a);
    vqkv_codec_free(b);

    /* The bits/value column of the README's table (D=64, T=32): block means
     * cost 16/T bits per key value, whatever the number of heads. The rows
     * marked "(bc=1)" there name bc=1 explicitly: the default is bc=0. */
    static const struct {
        const char *spec;
        double bits_per_value;
    } table[] = {
        {"fp16", 16.0},
        {"fp8", 8.25},
        {"kivi2:g=32", 3.0},
        {"kivi4:g=32", 5.0},
        {"rvq:d=8,b=8,r=2,bc=0", 2.25},
        {"rvq:d=8,b=8,r=2,bc=1", 2.5},
        {"rvq:d=8,b=7,r=2,bc=1", 2.25},
        {"vqkv:dlo=4,dhi=8,dv=4,b=8,bc=1", 2.375},
        /* The default rvq is 2.25 bits/value on head_dim 64. */
        {"rvq", 2.25},
    };
    for (uint32_t heads = 1; heads <= 8; heads *= 8) {
        vqkv_layout_t readme = {2, heads, 64, 32, VQKV_DTYPE_BF16};
        for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
            assert_ok(vqkv_codec_create(table[i].spec, &readme, &a));
            if (vqkv_codec_bits_per_value(a) != table[i].bits_per_value) {
                print_error("%s: %.6f bits/value, the README says %.6f\n", table[i].spec,
                            vqkv_codec_bits_per_value(a), table[i].bits_per_value);
                fail();
            }
            vqkv_codec_free(a);
        }
    }

    /* Escapes cost exactly esc * (6 + D) bytes per part on any layout, on
     * top of the same codec without them, and nothing else changes. */
    static const vqkv_layout_t esc_layouts[] = {{2, 8, 64, 32, VQKV_DTYPE_BF16},
                                                {1, 1, 8, 3, VQKV_DTYPE_F16},
                                                {3, 4, 128, 16, VQKV_DTYPE_F32}};
    static const char *const esc_specs[][2] = {
        {"rvq", "rvq:esc=%u"},
        {"rvq:bc=1,ph=1", "rvq:bc=1,ph=1,esc=%u"},
        {"vqkv:dlo=2,dhi=2,dv=8", "vqkv:dlo=2,dhi=2,dv=8,esc=%u"}};
    for (size_t li = 0; li < sizeof esc_layouts / sizeof esc_layouts[0]; li++) {
        const vqkv_layout_t *el = &esc_layouts[li];
        for (size_t si = 0; si < sizeof esc_specs / sizeof esc_specs[0]; si++) {
            assert_ok(vqkv_codec_create(esc_specs[si][0], el, &a));
            for (uint32_t esc = 1; esc <= 8; esc++) {
                char spec[64];
                snprintf(spec, sizeof spec, esc_specs[si][1], esc);
                assert_ok(vqkv_codec_create(spec, el, &b));
                assert_int_equal(vqkv_codec_block_bytes(b) - vqkv_codec_block_bytes(a),
                                 (size_t)el->num_layers * 2 * esc * (6 + el->head_dim));
                vqkv_codec_free(b);
            }
            vqkv_codec_free(a);
        }
    }

    /* fp8 is 8 bits plus a 16-bit scale per head vector on any head_dim. */
    static const uint32_t head_dims[] = {32, 64, 128, 256};
    for (size_t i = 0; i < 4; i++) {
        vqkv_layout_t hl = {1, 1, head_dims[i], 4, VQKV_DTYPE_F16};
        assert_ok(vqkv_codec_create("fp8", &hl, &a));
        assert_true(vqkv_codec_bits_per_value(a) == 8.0 + 16.0 / head_dims[i]);
        vqkv_codec_free(a);
    }
}

/* ---- one block through a codec ------------------------------------------ */

/* The working memory most checks need for one block of a codec: a vLLM view
 * with one slot, the values put in (src) and read back out (got), the
 * worker memory and the compressed block. Set up and freed in one place so
 * that each check states only what it does with them. */
typedef struct {
    const vqkv_layout_t *l;
    vqkv_kv_view_t v;
    size_t n;
    float *src, *got;
    uint8_t *region, *block;
} block_buffers_t;

static void block_buffers_init(block_buffers_t *b, const vqkv_codec_t *codec)
{
    b->l = vqkv_codec_layout(codec);
    vqkv_kv_view_vllm(&b->v, b->l, 1);
    b->n = test_block_values(b->l);
    b->src = malloc(b->n * sizeof *b->src);
    b->got = malloc(b->n * sizeof *b->got);
    b->region = malloc(b->v.region_bytes);
    b->block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(b->src && b->got && b->region && b->block);
}

static void block_buffers_free(block_buffers_t *b)
{
    test_free_all(b->src, b->got, b->region, b->block);
}

/* Writes src into slot 0 and reads it back, so that src then holds exactly
 * what the codec sees (the values rounded to the memory's dtype), and
 * encodes that slot into block. */
static void encode_src(block_buffers_t *b, const vqkv_codec_t *codec)
{
    test_write_block(b->l, &b->v, b->region, 0, b->src);
    test_read_block(b->l, &b->v, b->region, 0, b->src);
    assert_ok(vqkv_codec_encode(codec, b->region, &b->v, 0, b->block));
}

/* Decodes block into slot 0 and reads the result into got. */
static void decode_to_got(block_buffers_t *b, const vqkv_codec_t *codec)
{
    assert_ok(vqkv_codec_decode(codec, b->block, b->region, &b->v, 0));
    test_read_block(b->l, &b->v, b->region, 0, b->got);
}

/* Codes the values in b->src with codec and, from the same values, with its
 * twin plain (the same codec less one feature) in twin: for tests showing
 * what that one feature changes, and what it leaves alone. */
static void code_with_twin(block_buffers_t *b, const vqkv_codec_t *codec, block_buffers_t *twin,
                           const vqkv_codec_t *plain)
{
    memcpy(twin->src, b->src, b->n * sizeof *b->src);
    encode_src(b, codec);
    encode_src(twin, plain);
    decode_to_got(b, codec);
    decode_to_got(twin, plain);
}

/* A layout whose code streams do not end on a byte boundary. */
static const vqkv_layout_t odd_layout = {3, 1, 8, 3, VQKV_DTYPE_F16};

static const codec_case_t odd_cases[] = {
    {.spec = "rvq:d=8,b=5,r=1,bc=1",
     .kind = KIND_RVQ,
     .bits = 5,
     .d = 8,
     .r = 1,
     .bc = 1,
     .max_key_error = 0.25,
     .max_value_error = 0.8},
    {.spec = "rvq:d=8,b=5,r=1",
     .kind = KIND_RVQ,
     .bits = 5,
     .d = 8,
     .r = 1,
     .max_key_error = 0.25,
     .max_value_error = 0.8},
    {.spec = "rvq:d=2,b=3,r=3,bc=1",
     .kind = KIND_RVQ,
     .bits = 3,
     .d = 2,
     .r = 3,
     .bc = 1,
     .max_key_error = 0.06,
     .max_value_error = 0.16},
    /* More escapes than the block has vectors: every vector is one, so the
     * codec is as good as fp8, and the block means are 0. */
    {.spec = "rvq:d=8,b=5,r=1,bc=1,esc=8",
     .kind = KIND_RVQ,
     .bits = 5,
     .d = 8,
     .r = 1,
     .bc = 1,
     .esc = 8,
     .max_key_error = 0.03,
     .max_value_error = 0.03},
    {.spec = "kivi2:g=4",
     .kind = KIND_KIVI,
     .bits = 2,
     .g = 4,
     .max_key_error = 0.07,
     .max_value_error = 0.2},
    {.spec = "kivi4:g=2",
     .kind = KIND_KIVI,
     .bits = 4,
     .g = 2,
     .max_key_error = 0.015,
     .max_value_error = 0.005},
    {.spec = "vqkv:b=5,dlo=2,dhi=2,dv=8,bc=1",
     .kind = KIND_VQKV,
     .bits = 5,
     .dlo = 2,
     .dhi = 2,
     .dv = 8,
     .bc = 1,
     .max_key_error = 0.08,
     .max_value_error = 0.8},
    {.spec = "vqkv:b=5,dlo=2,dhi=2,dv=8",
     .kind = KIND_VQKV,
     .bits = 5,
     .dlo = 2,
     .dhi = 2,
     .dv = 8,
     .max_key_error = 0.08,
     .max_value_error = 0.8},
    {.spec = "vqkv:b=5,dlo=2,dhi=2,dv=8,esc=1",
     .kind = KIND_VQKV,
     .bits = 5,
     .dlo = 2,
     .dhi = 2,
     .dv = 8,
     .esc = 1,
     .max_key_error = 0.08,
     .max_value_error = 0.8},
    {.spec = "fp8", .kind = KIND_FP8, .max_key_error = 0.03, .max_value_error = 0.03},
};

/* Sizes on the odd layout, and a round trip through buffers of exactly
 * block_bytes (so the sanitizers see any write past the packed tail). */
static void test_odd_layout_packing(void **state)
{
    (void)state;
    const vqkv_layout_t *l = &odd_layout;
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 4};
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, l, 1);
    size_t n = test_block_values(l);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    uint8_t *region = malloc(view.region_bytes), *out_region = malloc(view.region_bytes);
    assert_non_null(src);
    assert_non_null(got);
    assert_non_null(region);
    assert_non_null(out_region);
    test_synth_block(l, PROFILE_SEED, 5, src);
    test_write_block(l, &view, region, 0, src);
    test_read_block(l, &view, region, 0, src);

    for (size_t i = 0; i < sizeof odd_cases / sizeof odd_cases[0]; i++) {
        const codec_case_t *c = &odd_cases[i];
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(c->spec, l, &codec));
        uint64_t want = expected_block_bytes(c, l);
        if (vqkv_codec_block_bytes(codec) != want) {
            print_error("%s: %zu block bytes, expected %llu\n", c->spec,
                        vqkv_codec_block_bytes(codec), (unsigned long long)want);
            fail();
        }
        if (is_vq(c))
            assert_ok(test_train_all(codec, PROFILE_SEED, 256, &opts));
        uint8_t *block = malloc(want), *again = malloc(want);
        assert_true(block && again);
        /* Every byte, padding and unused escape entries included, is the
         * encoder's, whatever the buffer held. */
        memset(block, 0x00, want);
        memset(again, 0xff, want);
        assert_ok(vqkv_codec_encode(codec, region, &view, 0, block));
        assert_ok(vqkv_codec_encode(codec, region, &view, 0, again));
        assert_memory_equal(block, again, want);
        free(again);
        assert_ok(vqkv_codec_decode(codec, block, out_region, &view, 0));
        test_read_block(l, &view, out_region, 0, got);
        for (int kv = 0; kv < 2; kv++) {
            double err = test_rel_error(l, src, got, kv);
            double bound = kv ? c->max_value_error : c->max_key_error;
            if (!(err <= bound)) {
                print_error("%s %s: relative error %.4f over %.4f\n", c->spec, kv ? "V" : "K", err,
                            bound);
                fail();
            }
        }
        free(block);
        vqkv_codec_free(codec);
    }
    test_free_all(src, got, region, out_region);
}

/* Every (token, head) of a (layer, kv) holds the same vector, so every
 * token of a head must decode to the same vector too (heads may differ:
 * VQ codecs keep per-head channel statistics): a code or norm read from
 * the wrong bit offset anywhere in the block, the packed tail included,
 * shows. With escapes (cases with cs=0 only), every vector is as far from
 * its reference as any other, so the escapes are the first vectors in index
 * order, stored as entries 0, 1, ... (unused ones all ones) and decoded as
 * fp8; the others still all decode alike. */
static void check_equal_vectors_decode_equally(vqkv_codec_t *codec, const codec_case_t *c)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    const uint32_t vectors = l->block_tokens * l->num_kv_heads, D = l->head_dim;
    block_buffers_t b;
    block_buffers_init(&b, codec);
    float *src = b.src, *got = b.got;
    float *one = malloc(D * sizeof *one), *fp8 = malloc(D * sizeof *fp8);
    uint8_t *codes = malloc(D), *block = b.block;
    assert_true(one && fp8 && codes);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            test_synth_vectors(PROFILE_SEED, 31, layer, kv, D, 1, one);
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++)
                    memcpy(src + test_block_index(l, layer, kv, t, h, 0), one, D * sizeof *one);
        }
    encode_src(&b, codec);
    memset(b.region, 0, b.v.region_bytes);
    decode_to_got(&b, codec);
    uint32_t escaped = c->esc < vectors ? c->esc : vectors;
    assert_true(c->esc == 0 || strstr(c->spec, "cs=1") == NULL);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *entry = block + part_offset(c, l, layer, kv) +
                                   expected_part_bytes(c, l, kv) - c->esc * test_escape_bytes(l);
            for (uint32_t i = 0; i < c->esc; i++, entry += test_escape_bytes(l))
                assert_int_equal(test_get_u32(entry), i < escaped ? i : UINT32_MAX);
            /* What an escape decodes to: fp8 of the vector, then the dtype. */
            uint16_t scale =
                test_fp8_row_encode(src + test_block_index(l, layer, kv, 0, 0, 0), D, codes);
            test_fp8_row_decode(scale, codes, D, fp8);
            for (uint32_t d = 0; d < D; d++)
                fp8[d] = vqkv_f16_to_f32(vqkv_f32_to_f16(fp8[d]));
            for (uint32_t h = 0; h < l->num_kv_heads; h++) {
                uint32_t first =
                    escaped / l->num_kv_heads + (h < escaped % l->num_kv_heads ? 1 : 0);
                for (uint32_t t = 0; t < l->block_tokens; t++) {
                    const float *want = t * l->num_kv_heads + h < escaped
                                            ? fp8
                                            : got + test_block_index(l, layer, kv, first, h, 0);
                    if (memcmp(got + test_block_index(l, layer, kv, t, h, 0), want,
                               D * sizeof *got) != 0) {
                        print_error("%s: layer %u %s token %u head %u decodes differently\n",
                                    vqkv_codec_spec(codec), layer, kv ? "V" : "K", t, h);
                        fail();
                    }
                }
            }
        }
    block_buffers_free(&b);
    test_free_all(one, fp8, codes);
}

static void test_equal_vectors_decode_equally(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_CASES; ci++) {
        vqkv_codec_t *codec = make_codec(ci, VQKV_DTYPE_F16);
        check_equal_vectors_decode_equally(codec, &cases[ci]);
        vqkv_codec_free(codec);
    }
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 4};
    for (size_t i = 0; i < sizeof odd_cases / sizeof odd_cases[0]; i++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(odd_cases[i].spec, &odd_layout, &codec));
        if (is_vq(&odd_cases[i]))
            assert_ok(test_train_all(codec, PROFILE_SEED, 256, &opts));
        check_equal_vectors_decode_equally(codec, &odd_cases[i]);
        vqkv_codec_free(codec);
    }
}

/* How far fp8 may move value x of a vector whose largest magnitude is amax,
 * y being what came back into memory of dtype: 3 mantissa bits make half
 * an ulp 2^-4 of the value, subnormals are steps of scale * 2^-9, the scale
 * is rounded to f16 (2^-11 relative), and the store into memory rounds
 * once more (half an ulp of the dtype). */
static double fp8_error_bound(double x, double y, double amax, vqkv_dtype_t dtype)
{
    const double fp16_rel = 1.01 / 2048.0;
    const double out_rel = dtype == VQKV_DTYPE_F32    ? 0.0
                           : dtype == VQKV_DTYPE_BF16 ? 1.01 / 512.0
                                                      : fp16_rel;
    return fabs(x) / 16.0 + amax / 448.0 / 1024.0 + amax * fp16_rel + fabs(y) * out_rel;
}

/* fp8 and KIVI promise more than an average: every value lands within
 * half a quantization step of where it was. The fp16 rounding of scales and
 * minima (2^-11 relative) and the store into memory are allowed for. */
static void check_per_value_bounds(vqkv_codec_t *codec, const codec_case_t *c)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    const double fp16_rel = 1.01 / 2048.0;
    /* Half an ulp of the memory's dtype, relative, for the final store. */
    const double out_rel = l->dtype == VQKV_DTYPE_F32    ? 0.0
                           : l->dtype == VQKV_DTYPE_BF16 ? 1.01 / 512.0
                                                         : fp16_rel;
    block_buffers_t b;
    block_buffers_init(&b, codec);
    const float *src = b.src, *got = b.got;
    test_synth_block(l, PROFILE_SEED, 4242, b.src);
    encode_src(&b, codec);
    decode_to_got(&b, codec);
    uint32_t levels = (1u << c->bits) - 1;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++) {
                    const float *x = src + test_block_index(l, layer, kv, t, h, 0);
                    const float *y = got + test_block_index(l, layer, kv, t, h, 0);
                    double amax = 0.0;
                    for (uint32_t d = 0; d < l->head_dim; d++)
                        amax = fmax(amax, fabs(x[d]));
                    for (uint32_t d = 0; d < l->head_dim; d++) {
                        double bound, err = fabs((double)x[d] - (double)y[d]);
                        if (c->kind == KIND_FP8) {
                            bound = fp8_error_bound(x[d], y[d], amax, l->dtype);
                        } else {
                            /* Keys: the channel's range over the block's
                             * tokens; values: the channel group's range. */
                            double lo = INFINITY, hi = -INFINITY;
                            for (uint32_t u = 0; u < (kv == 0 ? l->block_tokens : 1); u++)
                                for (uint32_t e = 0; e < (kv == 0 ? 1 : c->g); e++) {
                                    uint32_t tt = kv == 0 ? u : t;
                                    uint32_t dd = kv == 0 ? d : d / c->g * c->g + e;
                                    double xv = src[test_block_index(l, layer, kv, tt, h, dd)];
                                    lo = fmin(lo, xv);
                                    hi = fmax(hi, xv);
                                }
                            bound = (hi - lo) / levels / 2.0 + (fabs(lo) + (hi - lo)) * fp16_rel +
                                    fabs(y[d]) * out_rel + 1e-7;
                        }
                        if (!(err <= bound)) {
                            print_error("%s: layer %u %s token %u head %u dim %u: %g decoded "
                                        "as %g, more than %g off\n",
                                        c->spec, layer, kv ? "V" : "K", t, h, d, x[d], y[d], bound);
                            fail();
                        }
                    }
                }
    block_buffers_free(&b);
}

static void test_scalar_codecs_per_value_bounds(void **state)
{
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        for (size_t ci = 0; ci < NUM_CASES; ci++) {
            if (cases[ci].kind != KIND_FP8 && cases[ci].kind != KIND_KIVI)
                continue;
            vqkv_codec_t *codec = make_codec(ci, all_dtypes[di]);
            check_per_value_bounds(codec, &cases[ci]);
            vqkv_codec_free(codec);
        }
    }
    for (size_t i = 0; i < sizeof odd_cases / sizeof odd_cases[0]; i++) {
        if (odd_cases[i].kind != KIND_FP8 && odd_cases[i].kind != KIND_KIVI)
            continue;
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(odd_cases[i].spec, &odd_layout, &codec));
        check_per_value_bounds(codec, &odd_cases[i]);
        vqkv_codec_free(codec);
    }
}

/* ---- the documented byte layouts (kernels/README.md) ---------------------- */

/* fp8 and KIVI are fully specified there, encoder included, so a block can
 * be built here from the description alone and must match the library's
 * byte for byte; a GPU implementation is held to the same bytes. */

static void put_u16_le(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static uint16_t get_u16_le(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static void put_bits(uint8_t *stream, uint64_t index, uint32_t width, uint32_t code)
{
    for (uint32_t b = 0; b < width; b++) {
        uint64_t bit = index * width + b;
        if (code >> b & 1u)
            stream[bit / 8] |= (uint8_t)(1u << (bit % 8));
    }
}

static uint32_t get_bits(const uint8_t *stream, uint64_t index, uint32_t width)
{
    uint32_t code = 0;
    for (uint32_t b = 0; b < width; b++) {
        uint64_t bit = index * width + b;
        code |= (uint32_t)(stream[bit / 8] >> (bit % 8) & 1u) << b;
    }
    return code;
}

/* One part, x[T][H][D] in, bytes out (zeroed by the caller); returns its
 * size. */
static size_t readme_fp8_encode(const vqkv_layout_t *l, const float *x, uint8_t *part)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads, D = l->head_dim;
    uint8_t *codes = part + 2 * vectors;
    for (size_t v = 0; v < vectors; v++) {
        float amax = 0.0f;
        for (size_t d = 0; d < D; d++)
            amax = fmaxf(amax, fabsf(x[v * D + d]));
        uint16_t scale_h = vqkv_f32_to_f16(fminf(amax / 448.0f, 65504.0f));
        float scale = vqkv_f16_to_f32(scale_h);
        put_u16_le(part + 2 * v, scale_h);
        for (size_t d = 0; d < D; d++)
            codes[v * D + d] = scale == 0.0f ? 0 : vqkv_f32_to_e4m3(x[v * D + d] / scale);
    }
    return vectors * (2 + D);
}

static size_t readme_fp8_decode(const vqkv_layout_t *l, const uint8_t *part, float *x)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads, D = l->head_dim;
    for (size_t v = 0; v < vectors; v++)
        for (size_t d = 0; d < D; d++)
            x[v * D + d] = vqkv_e4m3_to_f32(part[2 * vectors + v * D + d]) *
                           vqkv_f16_to_f32(get_u16_le(part + 2 * v));
    return vectors * (2 + D);
}

/* The quantization group of value (v, d) and the number of groups. */
static size_t kivi_group(const vqkv_layout_t *l, int kv, uint32_t g, size_t v, size_t d)
{
    return kv == 0 ? (v % l->num_kv_heads) * l->head_dim + d : (v * l->head_dim + d) / g;
}

static size_t kivi_groups(const vqkv_layout_t *l, int kv, uint32_t g)
{
    size_t values = (size_t)l->block_tokens * l->num_kv_heads * l->head_dim;
    return kv == 0 ? (size_t)l->num_kv_heads * l->head_dim : values / g;
}

static size_t readme_kivi_encode(const vqkv_layout_t *l, int kv, uint32_t bits, uint32_t g,
                                 const float *x, uint8_t *part)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads, D = l->head_dim;
    size_t G = kivi_groups(l, kv, g);
    float *lo = malloc(G * sizeof *lo), *hi = malloc(G * sizeof *hi);
    assert_true(lo && hi);
    for (size_t i = 0; i < G; i++)
        lo[i] = hi[i] = NAN;
    /* NaN skipped; of equal values (+0 and -0) the later kept */
    for (size_t v = 0; v < vectors; v++)
        for (size_t d = 0; d < D; d++) {
            size_t grp = kivi_group(l, kv, g, v, d);
            float y = x[v * D + d];
            if (!isnan(y) && (isnan(lo[grp]) || y <= lo[grp]))
                lo[grp] = y;
            if (!isnan(y) && (isnan(hi[grp]) || y >= hi[grp]))
                hi[grp] = y;
        }
    float top = (float)((1u << bits) - 1u);
    for (size_t i = 0; i < G; i++) {
        put_u16_le(part + 2 * i, vqkv_f32_to_f16(lo[i]));
        put_u16_le(part + 2 * G + 2 * i, vqkv_f32_to_f16(fminf((hi[i] - lo[i]) / top, 65504.0f)));
    }
    for (size_t v = 0; v < vectors; v++)
        for (size_t d = 0; d < D; d++) {
            size_t grp = kivi_group(l, kv, g, v, d);
            float min = vqkv_f16_to_f32(get_u16_le(part + 2 * grp));
            float step = vqkv_f16_to_f32(get_u16_le(part + 2 * G + 2 * grp));
            float q = step > 0.0f ? nearbyintf((x[v * D + d] - min) / step) : 0.0f;
            q = q > 0.0f ? (q > top ? top : q) : 0.0f; /* NaN too: 0 */
            put_bits(part + 4 * G, v * D + d, bits, (uint32_t)q);
        }
    free(lo);
    free(hi);
    return 4 * G + (vectors * D * bits + 7) / 8;
}

static size_t readme_kivi_decode(const vqkv_layout_t *l, int kv, uint32_t bits, uint32_t g,
                                 const uint8_t *part, float *x)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads, D = l->head_dim;
    size_t G = kivi_groups(l, kv, g);
    for (size_t v = 0; v < vectors; v++)
        for (size_t d = 0; d < D; d++) {
            size_t grp = kivi_group(l, kv, g, v, d);
            float min = vqkv_f16_to_f32(get_u16_le(part + 2 * grp));
            float step = vqkv_f16_to_f32(get_u16_le(part + 2 * G + 2 * grp));
            /* A multiply and an add, each rounded on its own, never fused. */
            float scaled = (float)get_bits(part + 4 * G, v * D + d, bits) * step;
            x[v * D + d] = scaled + min;
        }
    return 4 * G + (vectors * D * bits + 7) / 8;
}

/* Encodes with the library and with the description; the bytes must be
 * identical, and the library's decode must give the described values. */
static void check_readme_layout(const codec_case_t *c, const vqkv_layout_t *layout)
{
    vqkv_layout_t l = *layout;
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(c->spec, &l, &codec));
    size_t block_bytes = vqkv_codec_block_bytes(codec), n = test_block_values(&l);
    size_t per_side = n / l.num_layers / 2;
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    float *src = malloc(n * sizeof *src), *want = malloc(n * sizeof *want);
    float *got = malloc(n * sizeof *got);
    uint8_t *region = malloc(v.region_bytes), *block = malloc(block_bytes);
    uint8_t *readme = calloc(block_bytes, 1);
    assert_true(src && want && got && region && block && readme);
    test_synth_block(&l, PROFILE_SEED, 303, src);
    /* A constant channel and a zero vector exercise step 0 and scale 0. */
    for (uint32_t t = 0; t < l.block_tokens; t++)
        src[test_block_index(&l, 0, 0, t, 0, 1)] = 0.75f;
    memset(src + test_block_index(&l, 0, 1, 0, 0, 0), 0, l.head_dim * sizeof *src);
    test_write_block(&l, &v, region, 0, src);
    test_read_block(&l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));

    size_t at = 0;
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const float *x = src + test_block_index(&l, layer, kv, 0, 0, 0);
            at += c->kind == KIND_FP8 ? readme_fp8_encode(&l, x, readme + at)
                                      : readme_kivi_encode(&l, kv, c->bits, c->g, x, readme + at);
        }
    assert_int_equal(at, block_bytes);
    for (size_t i = 0; i < block_bytes; i++)
        if (block[i] != readme[i]) {
            print_error("%s: block byte %zu is 0x%02x, the README's layout says 0x%02x\n", c->spec,
                        i, block[i], readme[i]);
            fail();
        }

    at = 0;
    for (uint32_t layer = 0; layer < l.num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            float *x = want + test_block_index(&l, layer, kv, 0, 0, 0);
            at += c->kind == KIND_FP8 ? readme_fp8_decode(&l, readme + at, x)
                                      : readme_kivi_decode(&l, kv, c->bits, c->g, readme + at, x);
        }
    vqkv_codec_free(codec);
    /* Decode into f32 memory, so the values are seen before any rounding. */
    l.dtype = VQKV_DTYPE_F32;
    assert_ok(vqkv_codec_create(c->spec, &l, &codec));
    vqkv_kv_view_t v32;
    vqkv_kv_view_vllm(&v32, &l, 1);
    uint8_t *region32 = malloc(v32.region_bytes);
    assert_non_null(region32);
    assert_ok(vqkv_codec_decode(codec, block, region32, &v32, 0));
    test_read_block(&l, &v32, region32, 0, got);
    for (size_t i = 0; i < n; i++)
        if (vqkv_f32_to_bits(got[i]) != vqkv_f32_to_bits(want[i])) {
            print_error("%s: value %zu (side %zu) decodes to %a, the README says %a\n", c->spec, i,
                        i / per_side % 2, got[i], want[i]);
            fail();
        }
    test_free_all(src, want, got, region, region32, block, readme);
    vqkv_codec_free(codec);
}

static void test_scalar_codecs_match_documented_layout(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_CASES; ci++)
        if (cases[ci].kind == KIND_FP8 || cases[ci].kind == KIND_KIVI)
            check_readme_layout(&cases[ci], &(vqkv_layout_t){2, 2, 64, 16, VQKV_DTYPE_F16});
    for (size_t i = 0; i < sizeof odd_cases / sizeof odd_cases[0]; i++)
        if (odd_cases[i].kind == KIND_FP8 || odd_cases[i].kind == KIND_KIVI)
            check_readme_layout(&odd_cases[i], &odd_layout);
}

/* ---- block-centered keys (bc=1) ------------------------------------------ */

/* Encodes `values` with codec (a case with cs=0, whose channel means are 0)
 * and compares what the README fixes about every part with its definition,
 * computed here from the values as they sit in memory: for keys with bc=1
 * the f16 block_mean[H][D] at the start (the escaped tokens left out), and
 * the escape entries at the end (index, f16 scale, e4m3 codes; all-ones
 * index when unused). */
static void check_means_and_escapes(const vqkv_codec_t *codec, const codec_case_t *c,
                                    const float *values)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    const uint32_t D = l->head_dim;
    size_t n = test_block_values(l), means = (size_t)l->num_kv_heads * D;
    assert_null(strstr(c->spec, "cs=1")); /* the references below are 0 */
    assert_int_equal(vqkv_codec_block_bytes(codec), expected_block_bytes(c, l));
    block_buffers_t b;
    block_buffers_init(&b, codec);
    uint16_t *want = malloc(means * sizeof *want);
    uint8_t *codes = malloc(D);
    uint32_t escapes[8];
    assert_true(want && codes && c->esc <= 8);
    memcpy(b.src, values, n * sizeof *values);
    encode_src(&b, codec);
    const float *in_memory = b.src;
    const uint8_t *block = b.block;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            const float *x = in_memory + test_block_index(l, layer, kv, 0, 0, 0);
            int has_means = kv == 0 && c->bc;
            uint32_t n_esc = test_part_plan(l, x, c->esc, NULL, has_means ? want : NULL, escapes);
            const uint8_t *part = block + part_offset(c, l, layer, kv);
            for (size_t i = 0; has_means && i < means; i++)
                if (test_get_u16(part + 2 * i) != want[i]) {
                    print_error("%s %s: layer %u block_mean[%zu][%zu] is 0x%04x, the README says "
                                "0x%04x\n",
                                c->spec, dtype_names[l->dtype], layer, i / D, i % D,
                                test_get_u16(part + 2 * i), want[i]);
                    fail();
                }
            const uint8_t *entry =
                part + expected_part_bytes(c, l, kv) - c->esc * test_escape_bytes(l);
            for (uint32_t i = 0; i < c->esc; i++, entry += test_escape_bytes(l)) {
                uint32_t index = i < n_esc ? escapes[i] : UINT32_MAX;
                if (test_get_u32(entry) != index) {
                    print_error("%s %s: layer %u %s escape %u holds vector %u, the README says "
                                "%u\n",
                                c->spec, dtype_names[l->dtype], layer, kv ? "V" : "K", i,
                                test_get_u32(entry), index);
                    fail();
                }
                if (i >= n_esc)
                    continue;
                uint16_t scale = test_fp8_row_encode(x + (size_t)index * D, D, codes);
                assert_int_equal(test_get_u16(entry + 4), scale);
                assert_memory_equal(entry + 6, codes, D);
            }
        }
    block_buffers_free(&b);
    free(want);
    free(codes);
}

/* With bc=1 every key part starts with each head's channel means over the
 * block's tokens (summed in float in token order, divided by their count,
 * rounded to f16), and with esc > 0 every part ends with its escapes. */
static void test_means_and_escapes_stored_as_documented(void **state)
{
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        for (size_t ci = 0; ci < NUM_CASES; ci++) {
            if (!is_vq(&cases[ci]) || (!cases[ci].bc && !cases[ci].esc))
                continue;
            vqkv_codec_t *codec = make_codec(ci, all_dtypes[di]);
            const vqkv_layout_t *l = vqkv_codec_layout(codec);
            size_t n = test_block_values(l);
            float *src = malloc(n * sizeof *src);
            assert_non_null(src);
            test_synth_block(l, PROFILE_SEED, 4040, src);
            if (all_dtypes[di] != VQKV_DTYPE_F16) {
                /* A channel whose mean depends on the order of the sum:
                 * 1 + 2^25 - 2^25 + 0 ... is 0 summed in float in token
                 * order, 1/T in double or in any order that adds the two
                 * large values first. f16 memory cannot hold 2^25. (With
                 * escapes, tokens 1 and 2 become two of them.) */
                static const float first[3] = {1.0f, 0x1p25f, -0x1p25f};
                for (uint32_t t = 0; t < l->block_tokens; t++)
                    src[test_block_index(l, 0, 0, t, 0, 3)] = t < 3 ? first[t] : 0.0f;
                uint16_t *ref = malloc((size_t)l->num_kv_heads * l->head_dim * sizeof *ref);
                assert_non_null(ref);
                test_block_means_f16(l, src + test_block_index(l, 0, 0, 0, 0, 0), NULL, 0, ref);
                assert_int_equal(ref[3], 0x0000);
                free(ref);
            }
            check_means_and_escapes(codec, &cases[ci], src);
            free(src);
            vqkv_codec_free(codec);
        }
    }
    /* Three tokens: a mean that is not a power-of-two division. */
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 4};
    for (size_t i = 0; i < sizeof odd_cases / sizeof odd_cases[0]; i++) {
        if (!is_vq(&odd_cases[i]) || (!odd_cases[i].bc && !odd_cases[i].esc))
            continue;
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(odd_cases[i].spec, &odd_layout, &codec));
        assert_ok(test_train_all(codec, PROFILE_SEED, 256, &opts));
        size_t n = test_block_values(&odd_layout);
        float *src = malloc(n * sizeof *src);
        assert_non_null(src);
        for (uint64_t sample = 0; sample < 8; sample++) {
            test_synth_block(&odd_layout, PROFILE_SEED, 4100 + sample, src);
            check_means_and_escapes(codec, &odd_cases[i], src);
        }
        free(src);
        vqkv_codec_free(codec);
    }
}

/* bc concerns keys only: a bc=1 codec and its bc=0 twin, trained alike, write
 * the same value parts byte for byte and decode values identically. */
static void test_block_centering_leaves_values_alone(void **state)
{
    (void)state;
    size_t i1 = case_named("rvq:d=4,b=6,r=3,bc=1"), i0 = case_named("rvq:d=4,b=6,r=3");
    const codec_case_t *c1 = &cases[i1], *c0 = &cases[i0];
    for (size_t di = 0; di < 3; di++) {
        vqkv_codec_t *bc1 = make_codec(i1, all_dtypes[di]);
        vqkv_codec_t *bc0 = make_codec(i0, all_dtypes[di]);
        block_buffers_t b1, b0;
        block_buffers_init(&b1, bc1);
        block_buffers_init(&b0, bc0);
        const vqkv_layout_t *l = b1.l;
        assert_int_equal(vqkv_codec_block_bytes(bc1) - vqkv_codec_block_bytes(bc0),
                         (size_t)l->num_layers * l->num_kv_heads * l->head_dim * 2);
        test_synth_block(l, PROFILE_SEED, 4242, b1.src);
        code_with_twin(&b1, bc1, &b0, bc0);
        const float *got1 = b1.got, *got0 = b0.got;
        for (uint32_t layer = 0; layer < l->num_layers; layer++)
            assert_memory_equal(b1.block + part_offset(c1, l, layer, 1),
                                b0.block + part_offset(c0, l, layer, 1),
                                expected_part_bytes(c0, l, 1));
        for (uint32_t layer = 0; layer < l->num_layers; layer++) {
            size_t first = test_block_index(l, layer, 1, 0, 0, 0);
            assert_memory_equal(got1 + first, got0 + first,
                                (size_t)l->block_tokens * l->num_kv_heads * l->head_dim *
                                    sizeof *got1);
        }
        block_buffers_free(&b1);
        block_buffers_free(&b0);
        vqkv_codec_free(bc1);
        vqkv_codec_free(bc0);
    }
}

/* Keys whose channel mean lies beyond the f16 range (possible in bf16 or
 * f32 memory) are finite values like any other: training accepts them
 * (only non-finite values are refused), and with bc=1 they code about as
 * well as with bc=0, every decoded value finite, rather than an infinite
 * block mean turning the vector into inf and garbage. */
static void test_block_means_beyond_f16_range(void **state)
{
    (void)state;
    static const char *const specs[2] = {"rvq:d=4,b=4,r=2,bc=0", "rvq:d=4,b=4,r=2,bc=1"};
    const vqkv_layout_t l = {1, 2, 16, 8, VQKV_DTYPE_F32};
    enum { TOKENS = 128 };
    const uint32_t D = l.head_dim;
    size_t n_train = (size_t)TOKENS * l.num_kv_heads, n = test_block_values(&l);
    vqkv_train_opts_t opts = {.seed = 2, .iterations = 3};
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    float *keys = malloc(n_train * D * sizeof *keys),
          *values = malloc(n_train * D * sizeof *values);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    uint8_t *region = malloc(v.region_bytes);
    assert_true(keys && values && src && got && region);
    /* Head 0's channel 5 sits near 70000, head 1's channel 9 near -80000. */
    test_synth_vectors(PROFILE_SEED, 8, 0, 0, D, n_train, keys);
    test_synth_vectors(PROFILE_SEED, 8, 0, 1, D, n_train, values);
    for (size_t t = 0; t < TOKENS; t++) {
        keys[(t * 2 + 0) * D + 5] += 70000.0f;
        keys[(t * 2 + 1) * D + 9] -= 80000.0f;
    }
    test_synth_block(&l, PROFILE_SEED, 9, src);
    for (uint32_t t = 0; t < l.block_tokens; t++) {
        src[test_block_index(&l, 0, 0, t, 0, 5)] += 70000.0f;
        src[test_block_index(&l, 0, 0, t, 1, 9)] -= 80000.0f;
    }
    double err[2];
    for (int bc = 0; bc < 2; bc++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(specs[bc], &l, &codec));
        int rc = vqkv_codec_train(codec, 0, 0, keys, n_train, &opts);
        if (rc != VQKV_OK) {
            print_error("%s: training on finite keys beyond the f16 range gave %d (%s)\n",
                        specs[bc], rc, vqkv_strerror(rc));
            fail();
        }
        assert_ok(vqkv_codec_train(codec, 0, 1, values, n_train, &opts));
        uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
        assert_non_null(block);
        test_write_block(&l, &v, region, 0, src);
        assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
        assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
        test_read_block(&l, &v, region, 0, got);
        for (size_t i = 0; i < n; i++)
            if (!isfinite(got[i])) {
                print_error("%s: value %zu (%g) decodes to %g\n", specs[bc], i, src[i], got[i]);
                fail();
            }
        err[bc] = test_rel_error(&l, src, got, 0);
        free(block);
        vqkv_codec_free(codec);
    }
    print_message("  keys beyond f16: rel. error K %.2e with bc=0, %.2e with bc=1\n", err[0],
                  err[1]);
    assert_true(err[1] <= 2.0 * err[0]);
    test_free_all(keys, values, src, got, region);
}

/* Keys as RoPE leaves them: each head's key before rotation is a constant
 * offset per channel (the same for every call) plus per-token noise, and at
 * position p the rotate-half pair (i, i + D/2) is turned by
 * p * 10000^(-2i/D). High-frequency pairs spin within a block; low-frequency
 * ones barely move over a block but drift over the sequence, so their
 * channel means differ from block to block. out is [tokens][heads][dim]. */
static void rope_keys(uint32_t heads, uint32_t D, uint64_t first_pos, size_t tokens, uint64_t seed,
                      float *out)
{
    float *offset = malloc((size_t)heads * D * sizeof *offset);
    assert_non_null(offset);
    test_rng_t fixed = {2024}, rng = {seed};
    for (size_t i = 0; i < (size_t)heads * D; i++)
        offset[i] = (float)(3.0 * test_rng_gaussian(&fixed));
    for (size_t t = 0; t < tokens; t++) {
        double pos = (double)(first_pos + t);
        for (uint32_t h = 0; h < heads; h++) {
            float pre[VQKV_MAX_HEAD_DIM];
            float *k = out + (t * heads + h) * D;
            for (uint32_t d = 0; d < D; d++)
                pre[d] = offset[(size_t)h * D + d] + (float)test_rng_gaussian(&rng);
            for (uint32_t i = 0; i < D / 2; i++) {
                double angle = pos * pow(10000.0, -2.0 * i / D);
                double c = cos(angle), s = sin(angle);
                k[i] = (float)(pre[i] * c - pre[i + D / 2] * s);
                k[i + D / 2] = (float)(pre[i] * s + pre[i + D / 2] * c);
            }
        }
    }
    free(offset);
}

/* Keys whose low-frequency channels drift over the sequence: training
 * vectors from positions [0, DRIFT_TRAIN_TOKENS) (keys by rope_keys,
 * values synthetic), and DRIFT_BLOCKS held-out blocks further on
 * (positions 3000 + 700 b), as a codebook calibrated on a daemon's first
 * requests later meets them. */
enum { DRIFT_D = 64, DRIFT_H = 2, DRIFT_T = 32, DRIFT_TRAIN_TOKENS = 1024, DRIFT_BLOCKS = 4 };
static const vqkv_layout_t drift_layout = {1, DRIFT_H, DRIFT_D, DRIFT_T, VQKV_DTYPE_F32};

typedef struct {
    size_t n_train, n; /* training vectors; values in one block */
    float *keys, *values, *src;
} drift_data_t;

static void drift_data_init(drift_data_t *dd)
{
    const vqkv_layout_t *l = &drift_layout;
    dd->n_train = (size_t)DRIFT_TRAIN_TOKENS * DRIFT_H;
    dd->n = test_block_values(l);
    dd->keys = malloc(dd->n_train * DRIFT_D * sizeof *dd->keys);
    dd->values = malloc(dd->n_train * DRIFT_D * sizeof *dd->values);
    dd->src = malloc(DRIFT_BLOCKS * dd->n * sizeof *dd->src);
    assert_true(dd->keys && dd->values && dd->src);
    rope_keys(DRIFT_H, DRIFT_D, 0, DRIFT_TRAIN_TOKENS, 1, dd->keys);
    test_synth_vectors(PROFILE_SEED, 5, 0, 1, DRIFT_D, dd->n_train, dd->values);
    for (uint32_t b = 0; b < DRIFT_BLOCKS; b++) {
        float *block_src = dd->src + b * dd->n;
        rope_keys(DRIFT_H, DRIFT_D, 3000 + 700 * b, DRIFT_T, 100 + b,
                  block_src + test_block_index(l, 0, 0, 0, 0, 0));
        test_synth_vectors(PROFILE_SEED, 200 + b, 0, 1, DRIFT_D, (size_t)DRIFT_T * DRIFT_H,
                           block_src + test_block_index(l, 0, 1, 0, 0, 0));
    }
}

static void drift_data_free(drift_data_t *dd)
{
    test_free_all(dd->keys, dd->values, dd->src);
}

/* Trains spec with opts on dd's training vectors and codes its held-out
 * blocks: got[DRIFT_BLOCKS * n] receives them decoded, err[kv] the
 * relative error of keys (0) and values (1) over them. */
static void drift_held_out(const drift_data_t *dd, const char *spec, const vqkv_train_opts_t *opts,
                           float *got, double err[2])
{
    const vqkv_layout_t *l = &drift_layout;
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(spec, l, &codec));
    assert_ok(vqkv_codec_train(codec, 0, 0, dd->keys, dd->n_train, opts));
    assert_ok(vqkv_codec_train(codec, 0, 1, dd->values, dd->n_train, opts));
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec)), *region = malloc(v.region_bytes);
    assert_true(block && region);
    for (uint32_t b = 0; b < DRIFT_BLOCKS; b++) {
        test_write_block(l, &v, region, 0, dd->src + b * dd->n);
        assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
        assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
        test_read_block(l, &v, region, 0, got + b * dd->n);
    }
    for (int kv = 0; kv < 2; kv++) {
        double e = 0.0, norm = 0.0;
        for (uint32_t b = 0; b < DRIFT_BLOCKS; b++) {
            size_t first = b * dd->n + test_block_index(l, 0, kv, 0, 0, 0);
            for (size_t i = first; i < first + (size_t)DRIFT_T * DRIFT_H * DRIFT_D; i++) {
                double diff = (double)dd->src[i] - got[i];
                e += diff * diff;
                norm += (double)dd->src[i] * dd->src[i];
            }
        }
        err[kv] = sqrt(e / norm);
    }
    test_free_all(block, region);
    vqkv_codec_free(codec);
}

/* Values of two decodes of dd's held-out blocks are the same bytes. */
static void drift_assert_values_equal(const drift_data_t *dd, const float *a, const float *b)
{
    for (uint32_t blk = 0; blk < DRIFT_BLOCKS; blk++) {
        size_t first = blk * dd->n + test_block_index(&drift_layout, 0, 1, 0, 0, 0);
        assert_memory_equal(a + first, b + first,
                            (size_t)DRIFT_T * DRIFT_H * DRIFT_D * sizeof(float));
    }
}

/* What bc=1 is for: codebooks trained on one stretch of drifting keys and
 * applied to blocks further on lose much less with the block's channel
 * means stored than without, at the same other parameters. Values, which
 * bc leaves alone, decode identically either way. */
static void test_block_centering_helps_drifting_keys(void **state)
{
    (void)state;
    static const char *const specs[][2] = {{"rvq:d=8,b=6,r=2,bc=0", "rvq:d=8,b=6,r=2,bc=1"},
                                           {"vqkv:b=6,bc=0", "vqkv:b=6,bc=1"}};
    const vqkv_train_opts_t opts = {.seed = 7, .iterations = 4};
    drift_data_t dd;
    drift_data_init(&dd);
    float *got[2] = {malloc(DRIFT_BLOCKS * dd.n * sizeof(float)),
                     malloc(DRIFT_BLOCKS * dd.n * sizeof(float))};
    assert_true(got[0] && got[1]);
    for (size_t si = 0; si < 2; si++) {
        double err[2][2];
        for (int bc = 0; bc < 2; bc++)
            drift_held_out(&dd, specs[si][bc], &opts, got[bc], err[bc]);
        print_message("  drifting keys: %-22s K %.4f, with bc=1 %.4f; V %.4f and %.4f\n",
                      specs[si][0], err[0][0], err[1][0], err[0][1], err[1][1]);
        /* Measured: about 0.35 times for rvq, 0.6 times for vqkv. */
        assert_true(err[1][0] < 0.75 * err[0][0]);
        drift_assert_values_equal(&dd, got[0], got[1]);
    }
    test_free_all(got[0], got[1]);
    drift_data_free(&dd);
}

/* What rope_positions is for: keys trained on positions [0, 1024) and
 * turned through offsets up to 8192 code the later blocks better than the
 * same keys as they are; turned by the wrong pairing (interleaved, for
 * rotate-half keys) they do not help as much. Values are trained as given,
 * so they decode identically. */
static void test_rope_positions_train_keys_for_later_positions(void **state)
{
    (void)state;
    static const char *const specs[] = {"rvq:d=8,b=6,r=2", "vqkv:b=6"};
    const vqkv_train_opts_t as_given = {.seed = 7, .iterations = 4};
    vqkv_train_opts_t turned = as_given, wrong_pairs;
    turned.rope_positions = 8192;
    turned.rope = (vqkv_rope_t){10000.0, VQKV_ROPE_NEOX};
    wrong_pairs = turned;
    wrong_pairs.rope.style = VQKV_ROPE_INTERLEAVED;
    drift_data_t dd;
    drift_data_init(&dd);
    float *got[3];
    for (int i = 0; i < 3; i++)
        assert_non_null(got[i] = malloc(DRIFT_BLOCKS * dd.n * sizeof(float)));
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        double err[3][2];
        drift_held_out(&dd, specs[si], &as_given, got[0], err[0]);
        drift_held_out(&dd, specs[si], &turned, got[1], err[1]);
        drift_held_out(&dd, specs[si], &wrong_pairs, got[2], err[2]);
        print_message("  later keys: %-22s K %.4f, turned %.4f, turned by wrong pairs %.4f\n",
                      specs[si], err[0][0], err[1][0], err[2][0]);
        /* Measured: 0.72 times for rvq, 0.81 for vqkv. */
        assert_true(err[1][0] < 0.85 * err[0][0]);
        assert_true(err[1][0] < err[2][0]);
        drift_assert_values_equal(&dd, got[0], got[1]);
    }
    test_free_all(got[0], got[1], got[2]);
    drift_data_free(&dd);
}

/* rope_positions without a usable RoPE base or pairing is refused before
 * anything is trained, by every codec, with or without codebooks. */
static void test_rope_positions_bad_opts_refused(void **state)
{
    (void)state;
    static const char *const specs[] = {"fp16", "rvq:d=8,b=4", "vqkv:b=4"};
    const vqkv_layout_t *l = &drift_layout;
    float keys[DRIFT_H * DRIFT_D] = {0};
    vqkv_train_opts_t bad[4];
    for (int i = 0; i < 4; i++)
        bad[i] = (vqkv_train_opts_t){.rope_positions = 4096, .rope = {10000.0, VQKV_ROPE_NEOX}};
    bad[0].rope.theta = 1.0;
    bad[1].rope.theta = NAN;
    bad[2].rope.theta = INFINITY;
    bad[3].rope.style = (vqkv_rope_style_t)2;
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(specs[si], l, &codec));
        for (int i = 0; i < 4; i++)
            assert_int_equal(vqkv_codec_train(codec, 0, 0, keys, DRIFT_H, &bad[i]), VQKV_EINVAL);
        if (strcmp(specs[si], "fp16") != 0)
            assert_int_equal(vqkv_codec_needs_training(codec), 1);
        vqkv_codec_free(codec);
    }
}

/* ---- views ---------------------------------------------------------------- */

typedef enum { VIEW_VLLM, VIEW_SPLIT, VIEW_OFFSET, VIEW_HEAD_MAJOR, NUM_VIEW_KINDS } view_kind_t;
static const char *const view_names[] = {"vllm", "split", "offset", "head-major"};

/* Builds a view of TEST_SLOTS slots of kind `kind`. */
static void make_view(view_kind_t kind, const vqkv_layout_t *l, vqkv_kv_view_t *v)
{
    uint64_t esize = vqkv_dtype_size(l->dtype);
    switch (kind) {
    case VIEW_VLLM: vqkv_kv_view_vllm(v, l, TEST_SLOTS); break;
    case VIEW_SPLIT: vqkv_kv_view_split(v, l, TEST_SLOTS, 192); break;
    case VIEW_OFFSET:
        /* The cache starts inside a larger allocation, with bytes after it. */
        vqkv_kv_view_vllm(v, l, TEST_SLOTS);
        v->offset = 96;
        v->region_bytes += 96 + 40;
        break;
    case VIEW_HEAD_MAJOR:
        /* [layers][slots][K|V][heads][tokens][dim], as FlashInfer's HND:
         * strides in an order the helpers never produce. */
        memset(v, 0, sizeof *v);
        v->num_slots = TEST_SLOTS;
        v->token_stride = l->head_dim * esize;
        v->head_stride = v->token_stride * l->block_tokens;
        v->kv_stride = v->head_stride * l->num_kv_heads;
        v->slot_stride = 2 * v->kv_stride;
        v->layer_stride = v->slot_stride * TEST_SLOTS;
        v->region_bytes = v->layer_stride * l->num_layers;
        break;
    case NUM_VIEW_KINDS: break;
    }
}

static void test_view_helpers_match_documented_shapes(void **state)
{
    (void)state;
    for (size_t i = 0; i < 3; i++) {
        vqkv_layout_t l = {3, 4, 32, 8, all_dtypes[i]};
        uint64_t e = vqkv_dtype_size(l.dtype), tensor = 5ull * 8 * 4 * 32 * e;
        vqkv_kv_view_t v;
        vqkv_kv_view_vllm(&v, &l, 5);
        assert_int_equal(v.offset, 0);
        assert_int_equal(v.num_slots, 5);
        assert_int_equal(v.head_stride, 32 * e);
        assert_int_equal(v.token_stride, 4 * 32 * e);
        assert_int_equal(v.slot_stride, 8 * 4 * 32 * e);
        assert_int_equal(v.kv_stride, tensor);
        assert_int_equal(v.layer_stride, 2 * tensor);
        assert_int_equal(v.region_bytes, 3 * 2 * tensor);

        vqkv_kv_view_split(&v, &l, 5, 100);
        assert_int_equal(v.offset, 0);
        assert_int_equal(v.head_stride, 32 * e);
        assert_int_equal(v.token_stride, 4 * 32 * e);
        assert_int_equal(v.slot_stride, 8 * 4 * 32 * e);
        assert_int_equal(v.kv_stride, tensor + 100);
        assert_int_equal(v.layer_stride, 2 * (tensor + 100));
        assert_int_equal(v.region_bytes, 3 * 2 * (tensor + 100));
    }
}

/* Whether two elements of the view share a byte, by marking every byte. */
static int view_overlaps_brute(const vqkv_layout_t *l, const vqkv_kv_view_t *v)
{
    size_t esize = vqkv_dtype_size(l->dtype), row = l->head_dim * esize;
    uint64_t end = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t s = 0; s < v->num_slots; s++) {
                uint64_t o = test_element_offset(l, v, layer, kv, s, l->block_tokens - 1,
                                                 l->num_kv_heads - 1, 0);
                end = o + row > end ? o + row : end;
            }
    uint8_t *owned = calloc(end, 1);
    assert_non_null(owned);
    int overlap = 0;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t s = 0; s < v->num_slots; s++)
                for (uint32_t t = 0; t < l->block_tokens; t++)
                    for (uint32_t h = 0; h < l->num_kv_heads; h++) {
                        uint64_t o = test_element_offset(l, v, layer, kv, s, t, h, 0);
                        for (size_t b = 0; b < row; b++)
                            overlap |= owned[o + b]++ != 0;
                    }
    free(owned);
    return overlap;
}

/* Overlapping views are refused, naming the stride; the helpers' shapes,
 * K and V interleaved per token, and dimensions of one element pass; and
 * what the check passes, byte marking confirms disjoint (random strides). */
static void test_view_overlap_refused(void **state)
{
    (void)state;
    vqkv_layout_t l = {2, 3, 4, 3, VQKV_DTYPE_F16};
    const char *stride = "unset";
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 4);
    assert_ok(vqkv_kv_view_disjoint(&l, &v, &stride));
    assert_null(stride);
    vqkv_kv_view_split(&v, &l, 4, 6);
    assert_ok(vqkv_kv_view_disjoint(&l, &v, NULL));
    /* [slots][tokens][K, V][heads][dim] in one tensor per layer. */
    vqkv_kv_view_t inter = {0, 0, 4 * 3 * 2 * 3 * 8, 3 * 8, 3 * 2 * 3 * 8, 2 * 3 * 8, 8, 4, NULL};
    assert_ok(vqkv_kv_view_disjoint(&l, &inter, NULL));

    vqkv_kv_view_vllm(&v, &l, 4);
    vqkv_kv_view_t bad = v;
    bad.head_stride = 6; /* a head is 8 bytes */
    assert_rc(vqkv_kv_view_disjoint(&l, &bad, &stride), VQKV_EINVAL);
    assert_string_equal(stride, "head_stride");
    bad = v;
    bad.slot_stride = bad.token_stride * 2; /* three tokens a slot */
    assert_rc(vqkv_kv_view_disjoint(&l, &bad, &stride), VQKV_EINVAL);
    assert_string_equal(stride, "slot_stride");
    bad = v;
    bad.layer_stride = bad.kv_stride; /* layer 1's K is layer 0's V */
    assert_rc(vqkv_kv_view_disjoint(&l, &bad, &stride), VQKV_EINVAL);
    assert_string_equal(stride, "layer_stride");
    /* One slot: its stride steps over nothing. */
    bad = v;
    bad.num_slots = 1;
    bad.slot_stride = 0;
    assert_ok(vqkv_kv_view_disjoint(&l, &bad, NULL));

    test_rng_t rng = {99};
    size_t passed = 0;
    for (int i = 0; i < 4000; i++) {
        vqkv_kv_view_t r = {0,
                            0,
                            8 * (1 + test_rng_next(&rng) % 80),
                            8 * (test_rng_next(&rng) % 40),
                            8 * (test_rng_next(&rng) % 12),
                            8 * (test_rng_next(&rng) % 6),
                            8 * (test_rng_next(&rng) % 3),
                            1 + (uint32_t)(test_rng_next(&rng) % 3),
                            NULL};
        if (vqkv_kv_view_disjoint(&l, &r, NULL) == VQKV_OK) {
            passed++;
            if (view_overlaps_brute(&l, &r))
                fail_msg("strides layer %llu kv %llu slot %llu token %llu head %llu pass but "
                         "overlap",
                         (unsigned long long)r.layer_stride, (unsigned long long)r.kv_stride,
                         (unsigned long long)r.slot_stride, (unsigned long long)r.token_stride,
                         (unsigned long long)r.head_stride);
        }
    }
    assert_true(passed > 20);
}

/* Layers placed apart (layer_offsets: here in reverse order, with gaps):
 * every codec round-trips through them exactly as through the strided
 * view, the checks see the last layer's end, and layers that overlap are
 * refused naming layer_offsets. */
static void test_layer_offsets(void **state)
{
    (void)state;
    vqkv_layout_t l = {3, 2, 64, 16, VQKV_DTYPE_BF16};
    vqkv_kv_view_t strided, apart;
    vqkv_kv_view_vllm(&strided, &l, 2);
    uint64_t layer_bytes = strided.layer_stride, offsets[3];
    apart = strided;
    for (uint32_t k = 0; k < 3; k++)
        offsets[k] = (2 - k) * (layer_bytes + 96); /* layer 0 last */
    apart.layer_offsets = offsets;
    apart.region_bytes = 2 * (layer_bytes + 96) + layer_bytes;
    assert_ok(vqkv_kv_view_check(&l, &apart, 1));
    apart.region_bytes -= 1;
    assert_rc(vqkv_kv_view_check(&l, &apart, 1), VQKV_ERANGE);
    apart.region_bytes += 1;
    assert_ok(vqkv_kv_view_disjoint(&l, &apart, NULL));

    float *src = malloc(test_block_values(&l) * sizeof *src);
    uint8_t *a = calloc(strided.region_bytes, 1), *b = calloc(apart.region_bytes, 1);
    uint8_t *out_a = calloc(strided.region_bytes, 1), *out_b = calloc(apart.region_bytes, 1);
    assert_true(src && a && b && out_a && out_b);
    test_synth_block(&l, PROFILE_SEED, 77, src);
    test_write_block(&l, &strided, a, 1, src);
    test_write_block(&l, &apart, b, 1, src);
    static const char *const specs[] = {"fp16", "fp8", "kivi2"};
    for (size_t i = 0; i < 3; i++) {
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(specs[i], &l, &codec));
        size_t bb = vqkv_codec_block_bytes(codec);
        uint8_t *pa = malloc(bb), *pb = malloc(bb);
        assert_ok(vqkv_codec_encode(codec, a, &strided, 1, pa));
        assert_ok(vqkv_codec_encode(codec, b, &apart, 1, pb));
        assert_memory_equal(pa, pb, bb);
        assert_ok(vqkv_codec_decode(codec, pa, out_a, &strided, 0));
        assert_ok(vqkv_codec_decode(codec, pb, out_b, &apart, 0));
        for (uint32_t layer = 0; layer < 3; layer++)
            for (int kv = 0; kv < 2; kv++)
                assert_memory_equal(out_a +
                                        test_element_offset(&l, &strided, layer, kv, 0, 0, 0, 0),
                                    out_b + test_element_offset(&l, &apart, layer, kv, 0, 0, 0, 0),
                                    strided.kv_stride / 2);
        test_free_all(pa, pb);
        vqkv_codec_free(codec);
    }
    const char *stride = NULL;
    offsets[1] = offsets[0] + layer_bytes - 2; /* layer 1 runs into layer 0 */
    assert_rc(vqkv_kv_view_disjoint(&l, &apart, &stride), VQKV_EINVAL);
    assert_string_equal(stride, "layer_offsets");
    test_free_all(src, a, b, out_a, out_b);
}

/* Region bytes that belong to block `slot`: the only ones decode may write. */
static uint8_t *slot_byte_mask(const vqkv_layout_t *l, const vqkv_kv_view_t *v, uint32_t slot)
{
    uint8_t *mask = calloc(v->region_bytes, 1);
    assert_non_null(mask);
    size_t esize = vqkv_dtype_size(l->dtype);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++)
                    for (uint32_t d = 0; d < l->head_dim; d++) {
                        uint64_t off = test_element_offset(l, v, layer, kv, slot, t, h, d);
                        assert_true(off + esize <= v->region_bytes);
                        memset(mask + off, 1, esize);
                    }
    return mask;
}

static void fill_sentinel(uint8_t *p, size_t n, int inverted)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)((i * 131u + 17u) ^ (inverted ? 0xffu : 0u));
}

/* Decodes block into slot of the view twice, over two sentinel fills that
 * differ in every byte: outside the slot both fills must survive, inside
 * it both results must agree (so every element was written, and nothing
 * depends on what was there before). Returns the decoded values. */
static void decode_into_sentinels(const vqkv_codec_t *codec, const uint8_t *block,
                                  const vqkv_kv_view_t *v, uint32_t slot, float *decoded)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    uint8_t *mask = slot_byte_mask(l, v, slot);
    uint8_t *a = malloc(v->region_bytes), *b = malloc(v->region_bytes);
    assert_non_null(a);
    assert_non_null(b);
    fill_sentinel(a, v->region_bytes, 0);
    fill_sentinel(b, v->region_bytes, 1);
    assert_ok(vqkv_codec_decode(codec, block, a, v, slot));
    assert_ok(vqkv_codec_decode(codec, block, b, v, slot));
    for (size_t i = 0; i < v->region_bytes; i++) {
        uint8_t sentinel = (uint8_t)(i * 131u + 17u), inverted = (uint8_t)(sentinel ^ 0xffu);
        if (mask[i] ? a[i] != b[i] : (a[i] != sentinel || b[i] != inverted)) {
            print_error("%s: byte %zu of the region (%s slot %u) wrong after decode\n",
                        vqkv_codec_spec(codec), i, mask[i] ? "inside" : "outside", slot);
            fail();
        }
    }
    test_read_block(l, v, a, slot, decoded);
    test_free_all(mask, a, b);
}

static void assert_error_within(const char *what, const vqkv_layout_t *l, const float *ref,
                                const float *got, double max_key, double max_value)
{
    for (int kv = 0; kv < 2; kv++) {
        double err = test_rel_error(l, ref, got, kv);
        double bound = kv ? max_value : max_key;
        if (!(err <= bound)) {
            print_error("%s %s: relative error %.5f over the bound %.5f\n", what, kv ? "V" : "K",
                        err, bound);
            fail();
        }
    }
}

/* ---- escapes (esc > 0) ------------------------------------------------------ */

/* Turns x[D] into a vector no codebook trained on ordinary keys or values
 * has seen, as the attention-sink token's are: small everywhere but for
 * two spikes. */
static void make_spike(float *x, uint32_t D, uint32_t c1, float v1, uint32_t c2, float v2)
{
    for (uint32_t d = 0; d < D; d++)
        x[d] = d % 2 ? 0.5f : -0.5f;
    x[c1] = v1;
    x[c2] = v2;
}

/* A synthetic block with outliers planted in layer 1, K and V alike: the
 * farthest at token 5 head 1 (vector 11 with two heads), and one vector
 * planted in both heads of token 9 (vectors 18 and 19), the same in each. */
enum { SPIKE_A = 11, SPIKE_B0 = 18, SPIKE_B1 = 19 };

static void planted_block(const vqkv_layout_t *l, float *src)
{
    assert_int_equal(l->num_kv_heads, 2);
    test_synth_block(l, PROFILE_SEED, 808, src);
    for (int kv = 0; kv < 2; kv++) {
        make_spike(src + test_block_index(l, 1, kv, 5, 1, 0), l->head_dim, 3, 90.0f, 40, -70.0f);
        for (uint32_t h = 0; h < 2; h++)
            make_spike(src + test_block_index(l, 1, kv, 9, h, 0), l->head_dim, 10, 50.0f, 50,
                       45.0f);
    }
}

/* ||x - y|| / ||x|| of one vector. */
static double vector_error(const float *x, const float *y, uint32_t D)
{
    double err = 0.0, norm = 0.0;
    for (uint32_t d = 0; d < D; d++) {
        err += ((double)x[d] - y[d]) * ((double)x[d] - y[d]);
        norm += (double)x[d] * x[d];
    }
    return sqrt(err / norm);
}

/* The escape index of entry i of part (layer, kv) in block. */
static uint8_t *escape_entry(const codec_case_t *c, const vqkv_layout_t *l, uint8_t *block,
                             uint32_t layer, int kv, uint32_t i)
{
    return block + part_offset(c, l, layer, kv) + expected_part_bytes(c, l, kv) -
           (c->esc - i) * test_escape_bytes(l);
}

/* The escapes are the vectors farthest from their head's reference, largest
 * first, ties to the lower index: the planted outliers, where the one in
 * both heads of a token is tied against 0 (cs=0, bc=0) and only its head 0
 * copy fits in two entries. They come back with fp8's error, where a codec
 * without escapes loses most of them. With bc=1 the key block means leave
 * the escaped tokens out. Without block means, escapes only add entries:
 * the rest of each part is the esc=0 codec's, byte for byte. */
static void test_escapes_pick_planted_outliers(void **state)
{
    (void)state;
    static const struct {
        const char *with, *without;
        uint32_t want[3]; /* layer 1's V escapes; K's the same but for bc=1's order */
    } pairs[] = {
        {"rvq:esc=2", "rvq", {SPIKE_A, SPIKE_B0}},
        {"vqkv:bc=1,esc=3", "vqkv", {SPIKE_A, SPIKE_B0, SPIKE_B1}},
    };
    const uint32_t planted[3] = {SPIKE_A, SPIKE_B0, SPIKE_B1};
    for (size_t pi = 0; pi < sizeof pairs / sizeof pairs[0]; pi++) {
        size_t ci = case_named(pairs[pi].with), c0 = case_named(pairs[pi].without);
        const codec_case_t *c = &cases[ci];
        vqkv_codec_t *codec = make_codec(ci, VQKV_DTYPE_F32);
        vqkv_codec_t *plain = make_codec(c0, VQKV_DTYPE_F32);
        const vqkv_layout_t *l = vqkv_codec_layout(codec);
        const uint32_t D = l->head_dim, H = l->num_kv_heads;
        block_buffers_t b, b0;
        block_buffers_init(&b, codec);
        block_buffers_init(&b0, plain);
        planted_block(l, b.src);
        /* Every part's means and escapes as the README defines them. */
        check_means_and_escapes(codec, c, b.src);

        /* f32 memory: src is not rounded on the way in. */
        code_with_twin(&b, codec, &b0, plain);
        const float *src = b.src, *got = b.got, *got0 = b0.got;
        uint8_t *block = b.block;
        const uint8_t *block0 = b0.block;
        for (int kv = 0; kv < 2; kv++) {
            uint32_t got_index[3];
            for (uint32_t i = 0; i < c->esc; i++)
                got_index[i] = test_get_u32(escape_entry(c, l, block, 1, kv, i));
            if (kv == 1 || !c->bc) {
                for (uint32_t i = 0; i < c->esc; i++)
                    assert_int_equal(got_index[i], pairs[pi].want[i]);
            } else {
                /* Against the block means the two copies are no longer
                 * tied; which comes first is the README's call, checked
                 * above. */
                assert_int_equal(got_index[0], SPIKE_A);
                assert_true((got_index[1] == SPIKE_B0 && got_index[2] == SPIKE_B1) ||
                            (got_index[1] == SPIKE_B1 && got_index[2] == SPIKE_B0));
            }
        }
        if (!c->bc)
            for (uint32_t layer = 0; layer < l->num_layers; layer++)
                for (int kv = 0; kv < 2; kv++)
                    assert_memory_equal(block + part_offset(c, l, layer, kv),
                                        block0 + part_offset(&cases[c0], l, layer, kv),
                                        expected_part_bytes(&cases[c0], l, kv));
        if (c->bc) {
            /* Head 1's stored key means leave tokens 5 and 9 out: 14 of the
             * 16 tokens, where the all-token mean is far off. */
            const uint8_t *means = block + part_offset(c, l, 1, 0);
            for (uint32_t d = 0; d < D; d++) {
                float sum = 0.0f, all = 0.0f;
                for (uint32_t t = 0; t < l->block_tokens; t++) {
                    float x = src[test_block_index(l, 1, 0, t, 1, d)];
                    all += x;
                    if (t != 5 && t != 9)
                        sum += x;
                }
                uint16_t want = vqkv_f32_to_f16(sum / (float)(l->block_tokens - 2));
                assert_int_equal(test_get_u16(means + 2 * ((size_t)D + d)), want);
                if (d == 3 || d == 40)
                    assert_int_not_equal(want, vqkv_f32_to_f16(all / (float)l->block_tokens));
            }
        }

        for (int kv = 0; kv < 2; kv++)
            for (uint32_t p = 0; p < 3; p++) {
                uint32_t vec = planted[p];
                const float *x = src + test_block_index(l, 1, kv, vec / H, vec % H, 0);
                const float *y = got + test_block_index(l, 1, kv, vec / H, vec % H, 0);
                const float *y0 = got0 + test_block_index(l, 1, kv, vec / H, vec % H, 0);
                double err = vector_error(x, y, D), err0 = vector_error(x, y0, D);
                print_message("  %s %s vector %u: rel. error %.4f, %.4f without escapes\n", c->spec,
                              kv ? "V" : "K", vec, err, err0);
                assert_true(err0 > 0.25);
                int escaped = 0;
                for (uint32_t i = 0; i < c->esc; i++)
                    escaped |= test_get_u32(escape_entry(c, l, block, 1, kv, i)) == vec;
                if (!escaped)
                    continue;
                double amax = 0.0;
                for (uint32_t d = 0; d < D; d++)
                    amax = fmax(amax, fabs(x[d]));
                for (uint32_t d = 0; d < D; d++)
                    if (!(fabs((double)x[d] - y[d]) <=
                          fp8_error_bound(x[d], y[d], amax, l->dtype))) {
                        print_error("%s: escaped vector %u dim %u: %g decoded as %g\n", c->spec,
                                    vec, d, x[d], y[d]);
                        fail();
                    }
                assert_true(err < 0.04);
            }
        block_buffers_free(&b);
        block_buffers_free(&b0);
        vqkv_codec_free(codec);
        vqkv_codec_free(plain);
    }
}

/* A damaged escape index (T*H or more, patched into an encoded block) is
 * ignored like an unused one: the vector it named decodes from its codes,
 * every other value is as before, and nothing outside the slot is written.
 * An index below T*H overwrites that vector with the entry's fp8 row. */
static void test_damaged_escape_index_ignored(void **state)
{
    (void)state;
    size_t ci = case_named("rvq:esc=2");
    const codec_case_t *c = &cases[ci];
    vqkv_codec_t *codec = make_codec(ci, VQKV_DTYPE_BF16);
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    const uint32_t D = l->head_dim, H = l->num_kv_heads, vectors = l->block_tokens * H;
    size_t n = test_block_values(l), block_bytes = vqkv_codec_block_bytes(codec);
    vqkv_kv_view_t dense, v;
    vqkv_kv_view_vllm(&dense, l, 1);
    make_view(VIEW_SPLIT, l, &v);
    float *src = malloc(n * sizeof *src), *orig = malloc(n * sizeof *orig);
    float *unused = malloc(n * sizeof *unused), *got = malloc(n * sizeof *got);
    float *row = malloc(D * sizeof *row);
    uint8_t *region = malloc(dense.region_bytes), *block = malloc(block_bytes);
    uint8_t *patched = malloc(block_bytes);
    assert_true(src && orig && unused && got && row && region && block && patched);
    planted_block(l, src);
    test_write_block(l, &dense, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &dense, 0, block));
    decode_into_sentinels(codec, block, &v, 2, orig);

    /* Entry 0 of layer 1's keys names the spike; marking it unused makes
     * that vector, and only it, decode from its codes. */
    uint8_t *entry = escape_entry(c, l, patched, 1, 0, 0);
    memcpy(patched, block, block_bytes);
    assert_int_equal(test_get_u32(entry), SPIKE_A);
    test_put_u32(entry, UINT32_MAX);
    decode_into_sentinels(codec, patched, &v, 2, unused);
    for (size_t i = 0; i < n; i++) {
        int spike = i / D == test_block_index(l, 1, 0, SPIKE_A / H, SPIKE_A % H, 0) / D;
        if (!spike)
            assert_int_equal(vqkv_f32_to_bits(orig[i]), vqkv_f32_to_bits(unused[i]));
    }
    assert_memory_not_equal(orig + test_block_index(l, 1, 0, SPIKE_A / H, SPIKE_A % H, 0),
                            unused + test_block_index(l, 1, 0, SPIKE_A / H, SPIKE_A % H, 0),
                            D * sizeof *orig);

    static const uint32_t damaged[] = {0, 1, 0x7fffffffu, 0x80000000u, 0xfffffffeu};
    for (size_t di = 0; di < sizeof damaged / sizeof damaged[0]; di++) {
        uint32_t index = di < 2 ? vectors + damaged[di] : damaged[di];
        memcpy(patched, block, block_bytes);
        test_put_u32(entry, index);
        decode_into_sentinels(codec, patched, &v, 2, got);
        if (memcmp(got, unused, n * sizeof *got) != 0) {
            print_error("escape index 0x%08x: the block decodes otherwise than with the entry "
                        "unused\n",
                        index);
            fail();
        }
    }
    /* The very last entry of the block, too. */
    uint8_t *last = escape_entry(c, l, patched, l->num_layers - 1, 1, c->esc - 1);
    assert_ptr_equal(last + test_escape_bytes(l), patched + block_bytes);
    memcpy(patched, block, block_bytes);
    uint32_t last_index = test_get_u32(last);
    assert_true(last_index < vectors);
    test_put_u32(last, UINT32_MAX);
    decode_into_sentinels(codec, patched, &v, 2, unused);
    test_put_u32(last, vectors);
    decode_into_sentinels(codec, patched, &v, 2, got);
    assert_memory_equal(got, unused, n * sizeof *got);

    /* The last vector of the block is a valid target: entry 0's row lands
     * there, and the spike decodes from its codes. */
    memcpy(patched, block, block_bytes);
    test_put_u32(entry, vectors - 1);
    decode_into_sentinels(codec, patched, &v, 2, got);
    test_fp8_row_decode(test_get_u16(entry + 4), entry + 6, D, row);
    for (uint32_t d = 0; d < D; d++) {
        size_t at = test_block_index(l, 1, 0, (vectors - 1) / H, (vectors - 1) % H, d);
        assert_int_equal(vqkv_f32_to_bits(got[at]),
                         vqkv_f32_to_bits(vqkv_bf16_to_f32(vqkv_f32_to_bf16(row[d]))));
    }
    size_t spike = test_block_index(l, 1, 0, SPIKE_A / H, SPIKE_A % H, 0);
    memcpy(patched, block, block_bytes);
    test_put_u32(entry, UINT32_MAX);
    decode_into_sentinels(codec, patched, &v, 2, unused);
    assert_memory_equal(got + spike, unused + spike, D * sizeof *got);
    test_free_all(src, orig, unused, got, row, region, block, patched);
    vqkv_codec_free(codec);
}

/* More escape entries than the block has vectors (esc=8, two vectors):
 * every vector is an escape, in index order, the other entries are unused
 * (all-ones index), the block means are 0 (no token is left), and the
 * block decodes to exactly the fp8 rows, nothing outside the slot moving. */
static void test_more_escapes_than_vectors(void **state)
{
    (void)state;
    static const codec_case_t tiny[] = {
        {.spec = "rvq:d=4,b=3,r=1,bc=1,esc=8",
         .kind = KIND_RVQ,
         .bits = 3,
         .d = 4,
         .r = 1,
         .bc = 1,
         .esc = 8},
        {.spec = "vqkv:b=3,dlo=2,dhi=2,dv=4,esc=8",
         .kind = KIND_VQKV,
         .bits = 3,
         .dlo = 2,
         .dhi = 2,
         .dv = 4,
         .esc = 8},
        /* Channel statistics: the order is theirs, the set is the same. */
        {.spec = "rvq:d=8,b=2,r=2,cs=1,ph=1,esc=8",
         .kind = KIND_RVQ,
         .bits = 2,
         .d = 8,
         .r = 2,
         .esc = 8},
    };
    const vqkv_layout_t l = {2, 1, 8, 2, VQKV_DTYPE_F32};
    const uint32_t D = l.head_dim, vectors = l.block_tokens * l.num_kv_heads;
    vqkv_train_opts_t opts = {.seed = 8, .iterations = 2};
    size_t n = test_block_values(&l);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 2);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    float *row = malloc(D * sizeof *row);
    uint8_t *region = calloc(v.region_bytes, 1), *codes = malloc(D);
    assert_true(src && got && row && region && codes);
    test_synth_block(&l, PROFILE_SEED, 13, src);
    test_write_block(&l, &v, region, 0, src);
    for (size_t si = 0; si < sizeof tiny / sizeof tiny[0]; si++) {
        const codec_case_t *c = &tiny[si];
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(c->spec, &l, &codec));
        assert_ok(test_train_all(codec, PROFILE_SEED, 32, &opts));
        size_t block_bytes = vqkv_codec_block_bytes(codec);
        assert_int_equal(block_bytes, expected_block_bytes(c, &l));
        uint8_t *block = malloc(block_bytes);
        assert_non_null(block);
        assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++) {
                const uint8_t *part = block + part_offset(c, &l, layer, kv);
                for (size_t i = 0; kv == 0 && c->bc && i < 2 * (size_t)D; i++)
                    assert_int_equal(part[i], 0);
                /* Ordered by distance (known here for cs=0), each vector once. */
                const float *part_src = src + test_block_index(&l, layer, kv, 0, 0, 0);
                uint32_t order[8], seen = 0;
                uint16_t means[8];
                assert_int_equal(
                    test_part_plan(&l, part_src, 8, NULL, kv == 0 && c->bc ? means : NULL, order),
                    vectors);
                const uint8_t *entry =
                    part + expected_part_bytes(c, &l, kv) - 8 * test_escape_bytes(&l);
                for (uint32_t i = 0; i < 8; i++, entry += test_escape_bytes(&l)) {
                    uint32_t index = test_get_u32(entry);
                    if (i >= vectors) {
                        assert_int_equal(index, UINT32_MAX);
                        continue;
                    }
                    if (strstr(c->spec, "cs=1") == NULL)
                        assert_int_equal(index, order[i]);
                    assert_true(index < vectors && !(seen >> index & 1u));
                    seen |= 1u << index;
                    const float *x = part_src + (size_t)index * D;
                    assert_int_equal(test_get_u16(entry + 4), test_fp8_row_encode(x, D, codes));
                    assert_memory_equal(entry + 6, codes, D);
                }
            }
        decode_into_sentinels(codec, block, &v, 1, got);
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t t = 0; t < l.block_tokens; t++) {
                    size_t first = test_block_index(&l, layer, kv, t, 0, 0);
                    test_fp8_row_decode(test_fp8_row_encode(src + first, D, codes), codes, D, row);
                    for (uint32_t d = 0; d < D; d++)
                        assert_int_equal(vqkv_f32_to_bits(got[first + d]),
                                         vqkv_f32_to_bits(row[d]));
                }
        free(block);
        vqkv_codec_free(codec);
    }
    test_free_all(src, got, row, region, codes);
}

/* Every codec, every dtype, every view: the block encodes to the same bytes
 * whatever the view (encoding depends on the values alone), decodes within
 * the codec's error bound, and decode writes exactly the slot's elements. */
static void test_round_trip_views_and_dtypes(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_CASES; ci++) {
        const codec_case_t *c = &cases[ci];
        for (size_t di = 0; di < 3; di++) {
            vqkv_codec_t *codec = make_codec(ci, all_dtypes[di]);
            const vqkv_layout_t *l = vqkv_codec_layout(codec);
            size_t n = test_block_values(l), block_bytes = vqkv_codec_block_bytes(codec);
            float *src = malloc(n * sizeof *src), *in_memory = malloc(n * sizeof *in_memory);
            float *got = malloc(n * sizeof *got);
            uint8_t *reference = malloc(block_bytes), *block = malloc(block_bytes);
            assert_non_null(src);
            assert_non_null(in_memory);
            assert_non_null(got);
            assert_non_null(reference);
            assert_non_null(block);
            test_synth_block(l, PROFILE_SEED, 1000, src);

            for (view_kind_t vk = 0; vk < NUM_VIEW_KINDS; vk++) {
                vqkv_kv_view_t v;
                make_view(vk, l, &v);
                uint8_t *region = calloc(v.region_bytes, 1);
                assert_non_null(region);
                /* Other slots hold other data, which must not leak in. */
                for (uint32_t s = 0; s < TEST_SLOTS; s++) {
                    float *other = malloc(n * sizeof *other);
                    assert_non_null(other);
                    test_synth_block(l, PROFILE_SEED, 2000 + s, other);
                    test_write_block(l, &v, region, s, s == 1 ? src : other);
                    free(other);
                }
                test_read_block(l, &v, region, 1, in_memory);
                assert_ok(vqkv_codec_encode(codec, region, &v, 1, block));
                if (vk == VIEW_VLLM)
                    memcpy(reference, block, block_bytes);
                else if (memcmp(reference, block, block_bytes) != 0) {
                    print_error("%s %s: the %s view encodes to other bytes than vllm's\n", c->spec,
                                dtype_names[di], view_names[vk]);
                    fail();
                }
                for (uint32_t slot = 0; slot < TEST_SLOTS; slot += 2) {
                    decode_into_sentinels(codec, block, &v, slot, got);
                    char what[128];
                    snprintf(what, sizeof what, "%s %s %s slot %u", c->spec, dtype_names[di],
                             view_names[vk], slot);
                    if (c->kind == KIND_FP16) {
                        /* Exactly the value rounded to fp16 and back into the
                         * memory's dtype: nothing else is lost. */
                        for (size_t i = 0; i < n; i++) {
                            uint8_t expect[4];
                            test_store(l->dtype, expect,
                                       vqkv_f16_to_f32(vqkv_f32_to_f16(in_memory[i])));
                            assert_int_equal(vqkv_f32_to_bits(got[i]),
                                             vqkv_f32_to_bits(test_load(l->dtype, expect)));
                        }
                    } else {
                        /* bf16 memory adds its own rounding (2^-9) on the way out. */
                        double slack = all_dtypes[di] == VQKV_DTYPE_BF16 ? 0.004 : 0.0;
                        assert_error_within(what, l, in_memory, got, c->max_key_error + slack,
                                            c->max_value_error + slack);
                    }
                }
                free(region);
            }
            test_free_all(src, in_memory, got, reference, block);
            vqkv_codec_free(codec);
        }
    }
}

/* The decoded value is a float rounded to the memory's dtype, the same
 * rounding the numeric functions do, whatever the dtype. */
static void test_decode_dtypes_agree(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_CASES; ci++) {
        vqkv_codec_t *f32 = make_codec(ci, VQKV_DTYPE_F32);
        vqkv_codec_t *f16 = make_codec(ci, VQKV_DTYPE_F16);
        vqkv_codec_t *bf16 = make_codec(ci, VQKV_DTYPE_BF16);
        const vqkv_layout_t *l32 = vqkv_codec_layout(f32);
        size_t n = test_block_values(l32), block_bytes = vqkv_codec_block_bytes(f32);
        vqkv_kv_view_t v32, v16;
        vqkv_kv_view_vllm(&v32, l32, 1);
        vqkv_kv_view_vllm(&v16, vqkv_codec_layout(f16), 1);
        float *src = malloc(n * sizeof *src), *wide = malloc(n * sizeof *wide);
        float *narrow = malloc(n * sizeof *narrow);
        uint8_t *r32 = malloc(v32.region_bytes), *r16 = malloc(v16.region_bytes);
        uint8_t *block = malloc(block_bytes);
        assert_true(src && wide && narrow && r32 && r16 && block);
        test_synth_block(l32, PROFILE_SEED, 77, src);
        test_write_block(l32, &v32, r32, 0, src);
        assert_ok(vqkv_codec_encode(f32, r32, &v32, 0, block));

        assert_ok(vqkv_codec_decode(f32, block, r32, &v32, 0));
        test_read_block(l32, &v32, r32, 0, wide);
        assert_ok(vqkv_codec_decode(f16, block, r16, &v16, 0));
        test_read_block(vqkv_codec_layout(f16), &v16, r16, 0, narrow);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(vqkv_f32_to_bits(narrow[i]),
                             vqkv_f32_to_bits(vqkv_f16_to_f32(vqkv_f32_to_f16(wide[i]))));
        assert_ok(vqkv_codec_decode(bf16, block, r16, &v16, 0));
        test_read_block(vqkv_codec_layout(bf16), &v16, r16, 0, narrow);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(vqkv_f32_to_bits(narrow[i]),
                             vqkv_f32_to_bits(vqkv_bf16_to_f32(vqkv_f32_to_bf16(wide[i]))));
        test_free_all(src, wide, narrow, r32, r16, block);
        vqkv_codec_free(f32);
        vqkv_codec_free(f16);
        vqkv_codec_free(bf16);
    }
}

/* Measures and prints each codec's error on fresh synthetic blocks in fp16
 * memory (what the table of bounds was set from), and holds it to them. */
static void check_error_per_codec(vqkv_codec_t *codec, size_t ci)
{
    block_buffers_t b;
    block_buffers_init(&b, codec);
    double worst[2] = {0.0, 0.0};
    for (uint64_t sample = 0; sample < 4; sample++) {
        test_synth_block(b.l, PROFILE_SEED, 500 + sample, b.src);
        encode_src(&b, codec);
        decode_to_got(&b, codec);
        for (int kv = 0; kv < 2; kv++)
            worst[kv] = fmax(worst[kv], test_rel_error(b.l, b.src, b.got, kv));
    }
    print_message("  %-44s %6.3f bits/value  rel. error K %.4f (<= %.3f)  V %.4f (<= %.3f)\n",
                  vqkv_codec_spec(codec), vqkv_codec_bits_per_value(codec), worst[0],
                  cases[ci].max_key_error, worst[1], cases[ci].max_value_error);
    assert_true(worst[0] <= cases[ci].max_key_error);
    assert_true(worst[1] <= cases[ci].max_value_error);
    block_buffers_free(&b);
}

/* ---- fp16 is lossless ----------------------------------------------------- */

/* Every one of the 65536 fp16 bit patterns, NaN payloads and signs, infs
 * and subnormals included, survives the fp16 codec in fp16 memory. */
static void test_fp16_bit_exact_all_patterns(void **state)
{
    (void)state;
    vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create("fp16", &l, &codec));
    vqkv_kv_view_t v;
    vqkv_kv_view_split(&v, &l, 2, 64);
    uint8_t *region = malloc(v.region_bytes), *out = malloc(v.region_bytes);
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(region && out && block);
    size_t values = test_block_values(&l);
    uint32_t next = 0;
    while (next <= 0xffffu) {
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t t = 0; t < l.block_tokens; t++)
                    for (uint32_t h = 0; h < l.num_kv_heads; h++)
                        for (uint32_t d = 0; d < l.head_dim; d++) {
                            uint16_t bits = (uint16_t)next++;
                            memcpy(region + test_element_offset(&l, &v, layer, kv, 1, t, h, d),
                                   &bits, 2);
                        }
        assert_ok(vqkv_codec_encode(codec, region, &v, 1, block));
        memset(out, 0, v.region_bytes);
        assert_ok(vqkv_codec_decode(codec, block, out, &v, 0));
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t t = 0; t < l.block_tokens; t++)
                    for (uint32_t h = 0; h < l.num_kv_heads; h++)
                        assert_memory_equal(
                            out + test_element_offset(&l, &v, layer, kv, 0, t, h, 0),
                            region + test_element_offset(&l, &v, layer, kv, 1, t, h, 0),
                            (size_t)l.head_dim * 2);
    }
    assert_true(next >= 0x10000u && values > 0);
    test_free_all(region, out, block);
    vqkv_codec_free(codec);
}

/* fp8 decodes every code byte, NaN codes and subnormals included, with
 * scales of every kind (a damaged block's infinities too; not NaN, as of
 * two NaN factors the compiler picks which one a product returns), to numeric.h's
 * e4m3 value times the scale, in f32 memory bit for bit and in f16 and
 * bf16 memory as that product rounded: whichever path the CPU takes (the
 * vector one converts codes by arithmetic, not by numeric.h's function),
 * on head_dims of 16-value steps, 8-value steps, both, and a tail. */
static void test_fp8_decodes_every_code(void **state)
{
    (void)state;
    static const uint16_t scales[] = {0x3c00, 0x3a00, 0x0001, 0x7bff, 0xbc00,
                                      0x0000, 0x8000, 0x7c00, 0xfc00};
    static const uint32_t head_dims[] = {64, 12, 24, 8};
    static const vqkv_dtype_t kinds[] = {VQKV_DTYPE_F32, VQKV_DTYPE_F16, VQKV_DTYPE_BF16};
    for (size_t hi = 0; hi < sizeof head_dims / sizeof head_dims[0]; hi++)
        for (size_t ki = 0; ki < 3; ki++) {
            vqkv_layout_t l = {1, 2, head_dims[hi], 16, kinds[ki]};
            uint32_t D = l.head_dim, vectors = l.block_tokens * l.num_kv_heads;
            vqkv_codec_t *codec = NULL;
            assert_ok(vqkv_codec_create("fp8", &l, &codec));
            vqkv_kv_view_t v;
            vqkv_kv_view_vllm(&v, &l, 1);
            size_t part = vqkv_codec_block_bytes(codec) / 2, width = vqkv_dtype_size(l.dtype);
            uint8_t *block = malloc(2 * part), *out = malloc(v.region_bytes);
            float *want = malloc(D * sizeof *want);
            assert_true(block && out && want);
            uint32_t code = 0;
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t i = 0; i < vectors; i++) {
                    uint8_t *p = block + kv * part;
                    uint16_t scale = scales[(i + kv) % (sizeof scales / sizeof scales[0])];
                    p[2 * i] = (uint8_t)scale;
                    p[2 * i + 1] = (uint8_t)(scale >> 8);
                    for (uint32_t d = 0; d < D; d++)
                        p[2 * vectors + (size_t)i * D + d] = (uint8_t)code++;
                }
            assert_true(code >= 512); /* every code, at least twice */
            assert_ok(vqkv_codec_decode(codec, block, out, &v, 0));
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t t = 0; t < l.block_tokens; t++)
                    for (uint32_t h = 0; h < l.num_kv_heads; h++) {
                        const uint8_t *p = block + kv * part;
                        uint32_t i = t * l.num_kv_heads + h;
                        test_fp8_row_decode(test_get_u16(p + 2 * i),
                                            p + 2 * vectors + (size_t)i * D, D, want);
                        uint8_t bytes[VQKV_MAX_HEAD_DIM * 4];
                        vqkv_dtype_from_f32(l.dtype, want, D, bytes);
                        assert_memory_equal(out + test_element_offset(&l, &v, 0, kv, 0, t, h, 0),
                                            bytes, D * width);
                    }
            test_free_all(block, out, want);
            vqkv_codec_free(codec);
        }
}

/* Encodes x (from f32 memory, so the values are exactly these) with spec
 * and holds the block to the README's encoder, fp8 or KIVI of `bits` and
 * group g, byte for byte. */
static void check_encode_as_readme(const char *spec, const vqkv_layout_t *l, codec_kind_t kind,
                                   uint32_t bits, uint32_t g, const float *x)
{
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(spec, l, &codec));
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    size_t block_bytes = vqkv_codec_block_bytes(codec), side = test_block_values(l) / 2;
    uint8_t *region = malloc(v.region_bytes), *block = malloc(block_bytes);
    uint8_t *readme = calloc(block_bytes, 1);
    assert_true(region && block && readme && l->num_layers == 1);
    test_write_block(l, &v, region, 0, x);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
    size_t at = 0;
    for (int kv = 0; kv < 2; kv++)
        at += kind == KIND_FP8 ? readme_fp8_encode(l, x + kv * side, readme + at)
                               : readme_kivi_encode(l, kv, bits, g, x + kv * side, readme + at);
    assert_int_equal(at, block_bytes);
    for (size_t i = 0; i < block_bytes; i++)
        if (block[i] != readme[i]) {
            print_error("%s D=%u: block byte %zu is 0x%02x, the README says 0x%02x\n", spec,
                        l->head_dim, i, block[i], readme[i]);
            fail();
        }
    test_free_all(region, block, readme);
    vqkv_codec_free(codec);
}

/* fp8 encodes as the README defines where rounding is hardest: values
 * exactly halfway between two e4m3 codes (the scale a power of two, so x /
 * scale is exact), subnormal codes, values past 448 times the scale
 * (saturated), NaN, infinities and signed zeros beside finite values, and
 * vectors of zeros and NaN only (scale 0); on head_dims of 16- and 8-value
 * steps and a tail. */
static void test_fp8_encodes_halfway_and_specials(void **state)
{
    (void)state;
    static const uint32_t head_dims[] = {64, 24, 12};
    test_rng_t rng = {0x5eed};
    for (size_t di = 0; di < sizeof head_dims / sizeof head_dims[0]; di++) {
        vqkv_layout_t l = {1, 4, head_dims[di], 16, VQKV_DTYPE_F32};
        uint32_t D = l.head_dim;
        size_t vectors = 2 * (size_t)l.block_tokens * l.num_kv_heads;
        float *x = malloc(vectors * D * sizeof *x);
        assert_non_null(x);
        for (size_t vi = 0; vi < vectors; vi++) {
            float *row = x + vi * D;
            int k = (int)(test_rng_next(&rng) % 40) - 24; /* scale 2^k, f16 normal or not */
            for (uint32_t d = 0; d < D; d++) {
                uint8_t code = (uint8_t)(test_rng_next(&rng) % 0x7e);
                float lo = vqkv_e4m3_to_f32(code), hi = vqkv_e4m3_to_f32((uint8_t)(code + 1));
                float y = test_rng_next(&rng) % 2 ? (lo + hi) / 2 : lo;
                row[d] = ldexpf(test_rng_next(&rng) % 2 ? -y : y, k);
            }
            row[0] = ldexpf(448.0f, k); /* amax: the scale is exactly 2^k */
            switch (vi % 8) {
            case 1: row[D - 1] = ldexpf(-600.0f, k); break; /* past 448: saturates */
            case 2: row[1] = NAN, row[D - 1] = -0.0f; break;
            case 3: row[D / 2] = -INFINITY; break;
            case 4:
                for (uint32_t d = 0; d < D; d++)
                    row[d] = d % 3 ? 0.0f : (d % 2 ? -0.0f : NAN);
                break;
            }
        }
        check_encode_as_readme("fp8", &l, KIND_FP8, 0, 0, x);
        free(x);
    }
}

/* KIVI encodes as the README defines where rounding is hardest: every
 * range from 0 to (2^bits - 1) * 2^e, so that (x - min) / step is exact
 * and values fall on codes and halfway between them (ties to even); a
 * NaN, a range of NaN only, a constant range and one whose step rounds to
 * 0 beside them, and ranges holding both +0 and -0 (the later is the
 * bound, whatever order a vector path takes the values in); keys' ranges
 * per channel over the tokens, values' per group; on head_dims and groups
 * of 8-value steps and not. */
static void test_kivi_encodes_halfway_and_specials(void **state)
{
    (void)state;
    static const struct {
        uint32_t D, g;
    } shapes[] = {{64, 32}, {24, 8}, {12, 4}};
    test_rng_t rng = {0x41f1};
    for (uint32_t bits = 2; bits <= 4; bits += 2)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            vqkv_layout_t l = {1, 2, shapes[si].D, 16, VQKV_DTYPE_F32};
            uint32_t D = l.head_dim, g = shapes[si].g, top = (1u << bits) - 1;
            float *x = malloc(test_block_values(&l) * sizeof *x);
            assert_non_null(x);
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t h = 0; h < l.num_kv_heads; h++)
                    for (uint32_t d = 0; d < D; d++) {
                        /* keys: one scale a channel; values: one a group */
                        int drawn = (int)(test_rng_next(&rng) % 16) - 10;
                        int e = kv == 0 ? drawn : (int)(d / g) - 3;
                        for (uint32_t t = 0; t < l.block_tokens; t++) {
                            /* where this value's range starts: its first token
                             * (keys) or its group's first channel (values) */
                            uint32_t pos = kv == 0 ? t : d % g;
                            float y = (float)(test_rng_next(&rng) % top) +
                                      (test_rng_next(&rng) % 2 ? 0.5f : 0.0f);
                            y = pos == 0 ? 0.0f : pos == 1 ? (float)top : y;
                            x[test_block_index(&l, 0, kv, t, h, d)] = ldexpf(y, e);
                        }
                    }
            /* specials, where neither 0 nor the top of a range sits */
            x[test_block_index(&l, 0, 0, 5, 0, 3)] = NAN;
            for (uint32_t t = 0; t < l.block_tokens; t++)
                x[test_block_index(&l, 0, 0, t, 1, 3)] = 1.5f; /* a constant key channel */
            x[test_block_index(&l, 0, 1, 3, 0, 2)] = NAN;
            for (uint32_t d = 0; d < g; d++)
                x[test_block_index(&l, 0, 1, 7, 1, d)] = -2.0f; /* a constant value group */
            /* ranges so narrow that their step rounds to f16 0: code 0, not
             * the top a division by zero would give */
            for (uint32_t t = 0; t < l.block_tokens; t++)
                x[test_block_index(&l, 0, 0, t, 0, 4)] = (float)t * 1e-10f;
            for (uint32_t d = 0; d < g; d++)
                x[test_block_index(&l, 0, 1, 8, 0, d)] = (float)d * 1e-11f;
            for (uint32_t t = 0; t < l.block_tokens; t++)
                x[test_block_index(&l, 0, 0, t, 1, 5)] = NAN;
            for (uint32_t d = 0; d < g; d++)
                x[test_block_index(&l, 0, 1, 9, 1, d)] = NAN;
            /* -0 after the +0 that starts a key channel's range, and a
             * value group whose -0 comes after its +0 in channel order
             * but in a lower vector lane (g = 32) */
            x[test_block_index(&l, 0, 0, 9, 0, 1)] = -0.0f;
            for (uint32_t d = 0; d < g; d++)
                x[test_block_index(&l, 0, 1, 10, 0, d)] = d == g / 2 + 1   ? -0.0f
                                                          : d == g / 4 - 1 ? 0.0f
                                                                           : (float)(d + 1);
            char spec[32];
            snprintf(spec, sizeof spec, "kivi%u:g=%u", bits, g);
            check_encode_as_readme(spec, &l, KIND_KIVI, bits, g, x);
            free(x);
        }
}

/* In f32 memory the fp16 codec keeps every fp16-representable value
 * exactly (signed zeros, subnormals, infinities) and NaN stays NaN. */
static void test_fp16_codec_f32_memory_specials(void **state)
{
    (void)state;
    vqkv_layout_t l = {1, 1, 16, 2, VQKV_DTYPE_F32};
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create("fp16", &l, &codec));
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    const float specials[] = {0.0f,
                              -0.0f,
                              1.0f,
                              -65504.0f,
                              65504.0f,
                              ldexpf(1.0f, -24),
                              -ldexpf(1.0f, -24),
                              ldexpf(1023.0f, -24),
                              ldexpf(1.0f, -14),
                              INFINITY,
                              -INFINITY,
                              NAN,
                              3.140625f,
                              -0.0009765625f,
                              1000.5f,
                              2048.0f};
    size_t n = test_block_values(&l);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    uint8_t *region = malloc(v.region_bytes), *block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src && got && region && block);
    for (size_t i = 0; i < n; i++)
        src[i] = specials[i % 16];
    test_write_block(&l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
    memset(region, 0, v.region_bytes);
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(&l, &v, region, 0, got);
    for (size_t i = 0; i < n; i++) {
        if (isnan(src[i]))
            assert_true(isnan(got[i]));
        else
            assert_int_equal(vqkv_f32_to_bits(got[i]), vqkv_f32_to_bits(src[i]));
    }
    /* Values fp16 cannot hold come back rounded to nearest even. */
    for (size_t i = 0; i < n; i++)
        src[i] = 1.0f + ldexpf(1.0f, -11) * (float)(i % 4); /* 1, 1+ulp/2, 1+ulp, 1+3ulp/2 */
    test_write_block(&l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(&l, &v, region, 0, got);
    const float rounded[4] = {1.0f, 1.0f, 1.0f + ldexpf(1.0f, -10), 1.0f + ldexpf(2.0f, -10)};
    for (size_t i = 0; i < n; i++)
        assert_true(got[i] == rounded[i % 4]);
    test_free_all(src, got, region, block);
    vqkv_codec_free(codec);
}

/* ---- determinism ---------------------------------------------------------- */

/* Encoding the same input gives the same bytes, every one of them set by
 * the encoder (whatever the buffer held) and none written past the block;
 * decoding the same bytes gives the same values. */
/* vqkv_codec_decode_batch writes what vqkv_codec_decode writes block by
 * block, also in two layer ranges (as threads split a get), with slots in
 * any order; a bad slot or layer range refuses the whole batch before any
 * byte is written. vqkv_codec_encode_batch likewise writes what
 * vqkv_codec_encode writes block by block. */
static void check_decode_batch(vqkv_codec_t *codec, size_t ci)
{
    (void)ci;
    enum { SLOTS = 4, N = 3 };
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t block_bytes = vqkv_codec_block_bytes(codec), n = test_block_values(l);
    vqkv_kv_view_t v;
    vqkv_kv_view_split(&v, l, SLOTS, 24);
    float *src = malloc(n * sizeof *src);
    uint8_t *region = calloc(v.region_bytes, 1), *packed = malloc(N * block_bytes);
    uint8_t *one = malloc(v.region_bytes), *batch = malloc(v.region_bytes);
    assert_true(src && region && packed && one && batch);
    const uint32_t slots[N] = {3, 0, 2};
    const uint8_t *in[N];
    for (uint32_t i = 0; i < N; i++) {
        test_synth_block(l, PROFILE_SEED, 40 + i, src);
        test_write_block(l, &v, region, i, src);
        in[i] = packed + i * block_bytes;
        assert_ok(vqkv_codec_encode(codec, region, &v, i, packed + i * block_bytes));
    }
    /* The batch in reverse slot order, its layers in two ranges. */
    uint8_t *split = malloc(N * (block_bytes + 1)), *out[N];
    const uint32_t reversed[N] = {2, 1, 0};
    assert_non_null(split);
    memset(split, 0xee, N * (block_bytes + 1));
    for (uint32_t i = 0; i < N; i++)
        out[i] = split + i * (block_bytes + 1);
    uint32_t mid = l->num_layers / 2;
    assert_ok(vqkv_codec_encode_batch(codec, region, &v, reversed, out, N, mid, l->num_layers));
    assert_ok(vqkv_codec_encode_batch(codec, region, &v, reversed, out, N, 0, mid));
    for (uint32_t i = 0; i < N; i++) {
        assert_memory_equal(out[i], packed + reversed[i] * block_bytes, block_bytes);
        assert_int_equal(out[i][block_bytes], 0xee);
    }
    memset(split, 0xee, N * (block_bytes + 1));
    const uint32_t past_end[N] = {0, 1, SLOTS};
    assert_rc(vqkv_codec_encode_batch(codec, region, &v, past_end, out, N, 0, l->num_layers),
              VQKV_ERANGE);
    assert_rc(vqkv_codec_encode_batch(codec, region, &v, reversed, out, N, 1, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_encode_batch(codec, region, &v, reversed, out, N, 0, l->num_layers + 1),
              VQKV_EINVAL);
    for (size_t i = 0; i < N * (block_bytes + 1); i++)
        assert_int_equal(split[i], 0xee);
    free(split);
    memset(one, 0x5a, v.region_bytes);
    for (uint32_t i = 0; i < N; i++)
        assert_ok(vqkv_codec_decode(codec, in[i], one, &v, slots[i]));
    memset(batch, 0x5a, v.region_bytes);
    assert_ok(vqkv_codec_decode_batch(codec, in, batch, &v, slots, N, 0, l->num_layers));
    assert_memory_equal(one, batch, v.region_bytes);
    memset(batch, 0x5a, v.region_bytes);
    uint32_t half = l->num_layers / 2;
    assert_ok(vqkv_codec_decode_batch(codec, in, batch, &v, slots, N, half, l->num_layers));
    assert_ok(vqkv_codec_decode_batch(codec, in, batch, &v, slots, N, 0, half));
    assert_memory_equal(one, batch, v.region_bytes);

    memset(batch, 0x5a, v.region_bytes);
    memcpy(one, batch, v.region_bytes);
    const uint32_t bad[N] = {3, SLOTS, 2};
    assert_rc(vqkv_codec_decode_batch(codec, in, batch, &v, bad, N, 0, l->num_layers), VQKV_ERANGE);
    assert_rc(vqkv_codec_decode_batch(codec, in, batch, &v, slots, N, 1, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_decode_batch(codec, in, batch, &v, slots, N, 0, l->num_layers + 1),
              VQKV_EINVAL);
    assert_memory_equal(one, batch, v.region_bytes);
    test_free_all(src, region, packed, one, batch);
}

static void check_determinism(vqkv_codec_t *codec, size_t ci)
{
    enum { GUARD = 64 };
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t block_bytes = vqkv_codec_block_bytes(codec), n = test_block_values(l);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 2);
    float *src = malloc(n * sizeof *src);
    uint8_t *region = calloc(v.region_bytes, 1);
    uint8_t *zeros = malloc(block_bytes + GUARD), *ones = malloc(block_bytes + GUARD);
    uint8_t *out_a = malloc(v.region_bytes), *out_b = malloc(v.region_bytes);
    assert_true(src && region && zeros && ones && out_a && out_b);
    test_synth_block(l, PROFILE_SEED, 9, src);
    test_write_block(l, &v, region, 1, src);
    memset(zeros, 0x00, block_bytes + GUARD);
    memset(ones, 0xff, block_bytes + GUARD);
    assert_ok(vqkv_codec_encode(codec, region, &v, 1, zeros));
    assert_ok(vqkv_codec_encode(codec, region, &v, 1, ones));
    assert_memory_equal(zeros, ones, block_bytes);
    for (size_t i = 0; i < GUARD; i++) {
        assert_int_equal(zeros[block_bytes + i], 0x00);
        assert_int_equal(ones[block_bytes + i], 0xff);
    }
    /* A second codec made from the same spec and codebooks agrees. */
    vqkv_codec_t *twin = make_codec(ci, VQKV_DTYPE_F16);
    assert_ok(vqkv_codec_encode(twin, region, &v, 1, ones));
    assert_memory_equal(zeros, ones, block_bytes);

    memset(out_a, 0, v.region_bytes);
    assert_ok(vqkv_codec_decode(codec, zeros, out_a, &v, 0));
    /* The same codec again, and the twin, decode to the same memory. */
    const vqkv_codec_t *decoders[] = {codec, twin};
    for (size_t i = 0; i < 2; i++) {
        memset(out_b, 0, v.region_bytes);
        assert_ok(vqkv_codec_decode(decoders[i], zeros, out_b, &v, 0));
        assert_memory_equal(out_a, out_b, v.region_bytes);
    }
    test_free_all(src, region, zeros, ones, out_a, out_b);
    vqkv_codec_free(twin);
}

/* Decoding bytes that no encoder wrote stays inside the slot: the daemon
 * never decodes foreign bytes, but a corrupt pool must not turn into a
 * wild write. */
static void check_decode_arbitrary_bytes_stays_in_slot(vqkv_codec_t *codec, size_t ci)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t block_bytes = vqkv_codec_block_bytes(codec), n = test_block_values(l);
    vqkv_kv_view_t v;
    make_view(VIEW_SPLIT, l, &v);
    uint8_t *block = malloc(block_bytes);
    float *got = malloc(n * sizeof *got);
    assert_true(block && got);
    test_rng_t rng = {ci + 1};
    for (size_t i = 0; i < block_bytes; i++)
        block[i] = (uint8_t)test_rng_next(&rng);
    decode_into_sentinels(codec, block, &v, 2, got);
    memset(block, 0xff, block_bytes);
    decode_into_sentinels(codec, block, &v, 0, got);
    free(block);
    free(got);
}

/* A codec with its codebooks in place is shared by threads that encode and
 * decode at once; each must get exactly what a lone caller gets. */
typedef struct {
    const vqkv_codec_t *codec;
    const vqkv_kv_view_t *view;
    const uint8_t *region;      /* the source block in slot 0 */
    const uint8_t *want_block;  /* what a lone encode gave */
    const uint8_t *want_region; /* what a lone decode gave */
    int failures;
} concurrent_job_t;

static void *encode_decode_repeatedly(void *arg)
{
    concurrent_job_t *job = arg;
    size_t block_bytes = vqkv_codec_block_bytes(job->codec);
    uint8_t *block = malloc(block_bytes), *out = malloc(job->view->region_bytes);
    if (block == NULL || out == NULL) {
        job->failures++;
    } else {
        for (int round = 0; round < 8; round++) {
            memset(out, 0, job->view->region_bytes);
            if (vqkv_codec_encode(job->codec, job->region, job->view, 0, block) != VQKV_OK ||
                memcmp(block, job->want_block, block_bytes) != 0 ||
                vqkv_codec_decode(job->codec, block, out, job->view, 0) != VQKV_OK ||
                memcmp(out, job->want_region, job->view->region_bytes) != 0)
                job->failures++;
        }
    }
    free(block);
    free(out);
    return NULL;
}

static void check_concurrent_use(vqkv_codec_t *codec, size_t ci)
{
    (void)ci;
    enum { THREADS = 3 };
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    size_t n = test_block_values(l);
    float *src = malloc(n * sizeof *src);
    uint8_t *region = malloc(v.region_bytes), *want_region = calloc(v.region_bytes, 1);
    uint8_t *want_block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src && region && want_region && want_block);
    test_synth_block(l, PROFILE_SEED, 61, src);
    test_write_block(l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, want_block));
    assert_ok(vqkv_codec_decode(codec, want_block, want_region, &v, 0));

    concurrent_job_t jobs[THREADS];
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (concurrent_job_t){codec, &v, region, want_block, want_region, 0};
        assert_int_equal(pthread_create(&threads[t], NULL, encode_decode_repeatedly, &jobs[t]), 0);
    }
    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(pthread_join(threads[t], NULL), 0);
        if (jobs[t].failures != 0) {
            print_error("%s: %d of 8 concurrent rounds differed in thread %d\n",
                        vqkv_codec_spec(codec), jobs[t].failures, t);
            fail();
        }
    }
    test_free_all(src, region, want_region, want_block);
}

/* ---- bounds ----------------------------------------------------------------- */

/* The last slot of a region that ends exactly at its last byte works, with
 * the region allocated to exactly that size; one byte less is refused
 * before any memory is touched. */
static void test_last_slot_exact_region(void **state)
{
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        const codec_case_t *c = &cases[case_named("kivi4")];
        vqkv_codec_t *codec = make_codec(case_named("kivi4"), all_dtypes[di]);
        const vqkv_layout_t *l = vqkv_codec_layout(codec);
        size_t n = test_block_values(l), block_bytes = vqkv_codec_block_bytes(codec);
        for (int split = 0; split < 2; split++) {
            vqkv_kv_view_t v;
            if (split) {
                /* The trailing gap after the last V tensor is not needed. */
                vqkv_kv_view_split(&v, l, TEST_SLOTS, 32);
                v.region_bytes -= 32;
            } else {
                vqkv_kv_view_vllm(&v, l, TEST_SLOTS);
            }
            uint32_t last = TEST_SLOTS - 1;
            assert_int_equal(test_element_offset(l, &v, l->num_layers - 1, 1, last,
                                                 l->block_tokens - 1, l->num_kv_heads - 1,
                                                 l->head_dim - 1) +
                                 vqkv_dtype_size(l->dtype),
                             v.region_bytes);
            uint8_t *region = malloc(v.region_bytes), *block = malloc(block_bytes);
            float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
            assert_true(region && block && src && got);
            memset(region, 0, v.region_bytes);
            test_synth_block(l, PROFILE_SEED, 11, src);
            test_write_block(l, &v, region, last, src);
            test_read_block(l, &v, region, last, src);
            assert_ok(vqkv_kv_view_check(l, &v, last));
            assert_ok(vqkv_codec_encode(codec, region, &v, last, block));
            memset(region, 0, v.region_bytes);
            assert_ok(vqkv_codec_decode(codec, block, region, &v, last));
            test_read_block(l, &v, region, last, got);
            assert_error_within("last slot", l, src, got, c->max_key_error + 0.004,
                                c->max_value_error + 0.004);

            vqkv_kv_view_t short_view = v;
            short_view.region_bytes--;
            memset(block, 0x5a, block_bytes);
            memset(region, 0x3c, v.region_bytes);
            assert_rc(vqkv_kv_view_check(l, &short_view, last), VQKV_ERANGE);
            assert_rc(vqkv_codec_encode(codec, region, &short_view, last, block), VQKV_ERANGE);
            assert_rc(vqkv_codec_decode(codec, block, region, &short_view, last), VQKV_ERANGE);
            for (size_t i = 0; i < block_bytes; i++)
                assert_int_equal(block[i], 0x5a);
            for (size_t i = 0; i < v.region_bytes; i++)
                assert_int_equal(region[i], 0x3c);
            /* The earlier slots still fit. */
            assert_ok(vqkv_kv_view_check(l, &short_view, last - 1));
            test_free_all(region, block, src, got);
        }
        vqkv_codec_free(codec);
    }
}

static void test_bad_slots_and_strides_refused(void **state)
{
    (void)state;
    vqkv_codec_t *codec = make_codec(case_named("fp8"), VQKV_DTYPE_F16);
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    uint8_t region[64] = {0};
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    assert_non_null(block);
    vqkv_kv_view_t good, v;
    vqkv_kv_view_vllm(&good, l, TEST_SLOTS);

    /* Slots past the end. */
    assert_rc(vqkv_kv_view_check(l, &good, TEST_SLOTS), VQKV_ERANGE);
    assert_rc(vqkv_kv_view_check(l, &good, UINT32_MAX), VQKV_ERANGE);
    assert_rc(vqkv_codec_encode(codec, region, &good, TEST_SLOTS, block), VQKV_ERANGE);
    assert_rc(vqkv_codec_decode(codec, block, region, &good, TEST_SLOTS), VQKV_ERANGE);
    v = good;
    v.num_slots = 0;
    assert_rc(vqkv_kv_view_check(l, &v, 0), VQKV_ERANGE);

    /* Strides whose products or sums wrap around uint64: a huge claimed
     * region must not make them pass. */
    const uint64_t huge = UINT64_MAX;
    vqkv_kv_view_t overflowing[6];
    for (size_t i = 0; i < 6; i++) {
        overflowing[i] = good;
        overflowing[i].region_bytes = huge;
    }
    overflowing[0].layer_stride = huge - 5;    /* the next term's sum wraps */
    overflowing[1].slot_stride = huge / 2 + 1; /* slot 2 * stride wraps */
    overflowing[2].token_stride = huge / 8;    /* 15 tokens * stride wraps */
    overflowing[3].head_stride = huge;         /* 1 * stride, then the sum wraps */
    overflowing[4].offset = huge - 100;        /* offset + extent wraps */
    overflowing[5].kv_stride = huge - 10;      /* kv + rest of the block wraps */
    for (size_t i = 0; i < 6; i++) {
        assert_rc(vqkv_kv_view_check(l, &overflowing[i], 2), VQKV_ERANGE);
        assert_rc(vqkv_codec_encode(codec, region, &overflowing[i], 2, block), VQKV_ERANGE);
        assert_rc(vqkv_codec_decode(codec, block, region, &overflowing[i], 2), VQKV_ERANGE);
    }
    /* A region too small for even the first slot. */
    v = good;
    v.region_bytes = sizeof region;
    assert_rc(vqkv_codec_encode(codec, region, &v, 0, block), VQKV_ERANGE);
    assert_rc(vqkv_codec_decode(codec, block, region, &v, 0), VQKV_ERANGE);
    /* An offset that pushes a fitting block out of the region. */
    v = good;
    v.offset = 1;
    assert_rc(vqkv_kv_view_check(l, &v, TEST_SLOTS - 1), VQKV_ERANGE);
    assert_ok(vqkv_kv_view_check(l, &v, 0));
    free(block);
    vqkv_codec_free(codec);
}

static void test_null_arguments(void **state)
{
    (void)state;
    vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
    vqkv_codec_t *codec = make_codec(case_named("fp8"), VQKV_DTYPE_F16), *out = NULL;
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    uint8_t *region = calloc(v.region_bytes, 1), *block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(region && block);
    float x[TEST_HEAD_DIM] = {0};

    assert_rc(vqkv_codec_create(NULL, &l, &out), VQKV_EINVAL);
    assert_rc(vqkv_codec_create("fp8", NULL, &out), VQKV_EINVAL);
    assert_rc(vqkv_codec_create("fp8", &l, NULL), VQKV_EINVAL);
    assert_null(out);
    assert_rc(vqkv_codec_encode(NULL, region, &v, 0, block), VQKV_EINVAL);
    assert_rc(vqkv_codec_encode(codec, NULL, &v, 0, block), VQKV_EINVAL);
    assert_rc(vqkv_codec_encode(codec, region, NULL, 0, block), VQKV_EINVAL);
    assert_rc(vqkv_codec_encode(codec, region, &v, 0, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codec_decode(NULL, block, region, &v, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_decode(codec, NULL, region, &v, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_decode(codec, block, NULL, &v, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_decode(codec, block, region, NULL, 0), VQKV_EINVAL);
    assert_rc(vqkv_kv_view_check(NULL, &v, 0), VQKV_EINVAL);
    assert_rc(vqkv_kv_view_check(&l, NULL, 0), VQKV_EINVAL);
    assert_rc(vqkv_codec_train(NULL, 0, 0, x, 1, NULL), VQKV_EINVAL);
    assert_rc(vqkv_layout_check(NULL), VQKV_EINVAL);
    vqkv_codec_free(NULL); /* a no-op, like free(NULL) */

    vqkv_codec_t *vq = NULL;
    assert_ok(vqkv_codec_create("rvq:b=4", &l, &vq));
    assert_rc(vqkv_codec_train(vq, 0, 0, NULL, 1, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codec_train(vq, 0, 0, x, 0, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codec_train(vq, TEST_LAYERS, 0, x, 1, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codec_train(vq, 0, 2, x, 1, NULL), VQKV_EINVAL);
    assert_rc(vqkv_codec_train(vq, 0, -1, x, 1, NULL), VQKV_EINVAL);
    /* Vectors come as [tokens][kv_heads][head_dim]: whole tokens only. */
    float three[3 * TEST_HEAD_DIM] = {0};
    assert_rc(vqkv_codec_train(vq, 0, 0, three, 3, NULL), VQKV_EINVAL);
    assert_int_equal(vqkv_codec_needs_training(vq), 1);
    /* Codecs without codebooks accept training and ignore it. */
    assert_ok(vqkv_codec_train(codec, 0, 0, x, 1, NULL));
    vqkv_codec_free(vq);
    free(region);
    free(block);
    vqkv_codec_free(codec);
}

/* ---- specs and layouts ------------------------------------------------- */

static void test_bad_specs_refused(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "fp17",
        "FP16",
        "rvq:",
        "fp16:",
        ":d=8",
        "rvq:d=8,",
        "rvq:,d=8",
        "rvq:d=8,,b=8",
        "rvq:d",
        "rvq:d=",
        "rvq:=8",
        "rvq:d=8,d=8",
        "rvq:d=8,b=8,d=4",
        "rvq:q=1",
        "rvq:D=8",
        "rvq:d=3",  /* does not divide head_dim 64 */
        "rvq:dv=3", /* neither */
        "rvq:dv=0",
        "rvq:rv=0",
        "rvq:rv=9",
        "rvq:d=128", /* more than head_dim */
        "rvq:d=0",
        "rvq:b=0",
        "rvq:b=13",
        "rvq:r=0",
        "rvq:r=9",
        "rvq:d=-8",
        "rvq:d=+8",
        "rvq:d=8x",
        "rvq:b=4294967304", /* wraps to 8 in 32 bits */
        "rvq:kgroup=foo",
        "rvq:kgroup=",
        "rvq:kgroup=8",
        "rvq:d=eight",
        "rvq:d=8:b=8",
        "rvq:d=8;b=8",
        "rvq d=8",
        "fp16:d=8",
        "fp8:g=32",
        "kivi2:g=0",
        "kivi2:g=5",
        "kivi4:g=128",
        "kivi4:d=8",
        "vqkv:dlo=3",
        "vqkv:dhi=6",  /* 6 does not divide the 32 channels of a branch */
        "vqkv:dlo=64", /* a sub-vector larger than its branch */
        "vqkv:dv=7",
        "vqkv:dv=0",
        "vqkv:b=13",
        "vqkv:r=2",
        "vqkv:kgroup=contig",
        "averyveryverylongcodecname",
        "rvq:averyveryverylongkey=1",
        "rvq:d=8,b=8,r=2,kgroup=strided,d=8",
        "rvq:cs=2",
        "vqkv:cs=yes",
        "rvq:bc=2",
        "rvq:bc=",
        "rvq:bc=-1",
        "vqkv:bc=yes",
        "rvq:ph=2",
        "vqkv:ph=1x",
        "rvq:bc=0,bc=1",
        "rvq:esc=9", /* at most 8 escapes per part */
        "rvq:esc=-1",
        "rvq:esc=",
        "vqkv:esc=all",
        "rvq:esc=1,esc=1",
        "fp8:esc=1",
        "kivi2:esc=2",
        "fp8:bc=0",
        "kivi2:bc=1",
        "kivi4:ph=1",
        "rvq:a=1,b=1,c=1,d=1,e=1,f=1,g=1,h=1,i=1",
        "commvq:b=7", /* a codeword is two table rows of b/2 bits */
        "commvq:b=14",
        "commvq:d=3",
        "commvq:d=6", /* does not divide head_dim 64 */
        "commvq:dv=7",
        "commvq:rv=0",
        "commvq:r=9",
        "commvq:rope=halves",
        "commvq:rope=",
        "commvq:kgroup=contig",
        "commvq:dlo=4",
        "commvq:d=8,r=2,dv=8,rv=2,rope=neox,b=8,cs=0,ph=0,bc=0,esc=0,x=1",
    };
    vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
    int accepted = 0;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        vqkv_codec_t *codec = (vqkv_codec_t *)&l; /* any non-NULL: must come back NULL */
        int rc = vqkv_codec_create(bad[i], &l, &codec);
        if (rc != VQKV_ESPEC || codec != NULL) {
            print_error("spec \"%s\": %d (%s), expected VQKV_ESPEC and no codec\n", bad[i], rc,
                        vqkv_strerror(rc));
            vqkv_codec_free(rc == VQKV_OK ? codec : NULL);
            accepted++;
        }
    }
    assert_int_equal(accepted, 0);
    /* vqkv needs head_dim divisible by 4 (two branches of whole RoPE pairs). */
    vqkv_layout_t odd_pairs = {1, 1, 6, 4, VQKV_DTYPE_F16};
    vqkv_codec_t *codec = NULL;
    assert_rc(vqkv_codec_create("vqkv:dlo=2,dhi=2,dv=2", &odd_pairs, &codec), VQKV_ESPEC);
    assert_ok(vqkv_codec_create("rvq:d=2", &odd_pairs, &codec));
    vqkv_codec_free(codec);
}

static void test_invalid_layouts_refused(void **state)
{
    (void)state;
    const vqkv_layout_t good = test_layout(VQKV_DTYPE_F16);
    vqkv_layout_t bad[12];
    for (size_t i = 0; i < 12; i++)
        bad[i] = good;
    bad[0].head_dim = 63; /* RoPE pairs need an even head_dim */
    bad[1].num_layers = 0;
    bad[2].num_kv_heads = 0;
    bad[3].head_dim = 0;
    bad[4].block_tokens = 0;
    bad[5].head_dim = VQKV_MAX_HEAD_DIM + 2;
    bad[6].dtype = (vqkv_dtype_t)3;
    bad[7].dtype = (vqkv_dtype_t)-1;
    bad[8].num_layers = UINT32_MAX;
    bad[9].num_kv_heads = UINT32_MAX;
    bad[10].block_tokens = UINT32_MAX;
    bad[11].head_dim = UINT32_MAX - 1;
    assert_ok(vqkv_layout_check(&good));
    for (size_t i = 0; i < 12; i++) {
        vqkv_codec_t *codec = NULL;
        assert_rc(vqkv_layout_check(&bad[i]), VQKV_EINVAL);
        assert_rc(vqkv_codec_create("fp16", &bad[i], &codec), VQKV_EINVAL);
        assert_null(codec);
        vqkv_kv_view_t v = {UINT64_MAX, 0, 0, 0, 0, 0, 0, 1, NULL};
        assert_rc(vqkv_kv_view_check(&bad[i], &v, 0), VQKV_EINVAL);
    }
    /* The limits themselves are fine. */
    vqkv_layout_t edge = {1, 1, VQKV_MAX_HEAD_DIM, 1, VQKV_DTYPE_F32};
    assert_ok(vqkv_layout_check(&edge));
    edge.head_dim = 2;
    assert_ok(vqkv_layout_check(&edge));

    assert_int_equal(vqkv_dtype_size(VQKV_DTYPE_F16), 2);
    assert_int_equal(vqkv_dtype_size(VQKV_DTYPE_BF16), 2);
    assert_int_equal(vqkv_dtype_size(VQKV_DTYPE_F32), 4);
    assert_int_equal(vqkv_dtype_size((vqkv_dtype_t)7), 0);
}

/* ---- training state ----------------------------------------------------- */

static void test_vq_needs_every_part_trained(void **state)
{
    (void)state;
    static const char *const specs[] = {"rvq:b=4,r=1", "vqkv:b=4"};
    vqkv_train_opts_t opts = {.seed = 5, .iterations = 2};
    for (size_t si = 0; si < 2; si++) {
        vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(specs[si], &l, &codec));
        vqkv_kv_view_t v;
        vqkv_kv_view_vllm(&v, &l, 1);
        uint8_t *region = calloc(v.region_bytes, 1);
        uint8_t *block = calloc(vqkv_codec_block_bytes(codec), 1);
        float *x = malloc(64 * TEST_HEAD_DIM * sizeof *x);
        assert_true(region && block && x);

        const uint32_t order[4][2] = {{1, 1}, {0, 0}, {1, 0}, {0, 1}};
        for (size_t step = 0; step < 4; step++) {
            assert_int_equal(vqkv_codec_needs_training(codec), 1);
            assert_rc(vqkv_codec_encode(codec, region, &v, 0, block), VQKV_ENOCODEBOOK);
            assert_rc(vqkv_codec_decode(codec, block, region, &v, 0), VQKV_ENOCODEBOOK);
            uint8_t *buf = NULL;
            size_t len = 0;
            assert_rc(vqkv_codebook_save_buffer(codec, &buf, &len), VQKV_ENOCODEBOOK);
            test_synth_vectors(PROFILE_SEED, step, order[step][0], (int)order[step][1],
                               TEST_HEAD_DIM, 64, x);
            assert_ok(vqkv_codec_train(codec, order[step][0], (int)order[step][1], x, 64, &opts));
            /* Training the same part again does not count twice. */
            if (step == 1)
                assert_ok(
                    vqkv_codec_train(codec, order[step][0], (int)order[step][1], x, 64, &opts));
        }
        assert_int_equal(vqkv_codec_needs_training(codec), 0);
        assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
        assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
        test_free_all(region, block, x);
        vqkv_codec_free(codec);
    }
    /* Codecs without codebooks never need training. */
    for (size_t ci = 0; ci < NUM_CASES; ci++) {
        if (is_vq(&cases[ci]))
            continue;
        vqkv_layout_t l = test_layout(VQKV_DTYPE_F16);
        vqkv_codec_t *codec = NULL;
        assert_ok(vqkv_codec_create(cases[ci].spec, &l, &codec));
        assert_int_equal(vqkv_codec_needs_training(codec), 0);
        vqkv_codec_free(codec);
    }
}

static void test_strerror_names_every_code(void **state)
{
    (void)state;
    const int codes[] = {VQKV_OK,          VQKV_EINVAL, VQKV_ESPEC,   VQKV_ERANGE,   VQKV_ENOMEM,
                         VQKV_ENOCODEBOOK, VQKV_EIO,    VQKV_EFORMAT, VQKV_EMISMATCH};
    const size_t n = sizeof codes / sizeof codes[0];
    const char *unknown = vqkv_strerror(-1000);
    assert_non_null(unknown);
    assert_non_null(vqkv_strerror(1));
    for (size_t i = 0; i < n; i++) {
        const char *s = vqkv_strerror(codes[i]);
        assert_non_null(s);
        assert_true(strlen(s) > 0);
        assert_string_not_equal(s, unknown);
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(s, vqkv_strerror(codes[j]));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical_specs),
        cmocka_unit_test(test_block_bytes_and_bits_per_value),
        cmocka_unit_test(test_odd_layout_packing),
        cmocka_unit_test(test_equal_vectors_decode_equally),
        cmocka_unit_test(test_scalar_codecs_per_value_bounds),
        cmocka_unit_test(test_scalar_codecs_match_documented_layout),
        cmocka_unit_test(test_fp8_encodes_halfway_and_specials),
        cmocka_unit_test(test_kivi_encodes_halfway_and_specials),
        cmocka_unit_test(test_means_and_escapes_stored_as_documented),
        cmocka_unit_test(test_block_centering_leaves_values_alone),
        cmocka_unit_test(test_block_means_beyond_f16_range),
        cmocka_unit_test(test_block_centering_helps_drifting_keys),
        cmocka_unit_test(test_rope_positions_train_keys_for_later_positions),
        cmocka_unit_test(test_rope_positions_bad_opts_refused),
        cmocka_unit_test(test_escapes_pick_planted_outliers),
        cmocka_unit_test(test_damaged_escape_index_ignored),
        cmocka_unit_test(test_more_escapes_than_vectors),
        cmocka_unit_test(test_view_helpers_match_documented_shapes),
        cmocka_unit_test(test_view_overlap_refused),
        cmocka_unit_test(test_layer_offsets),
        EVERY_CASE_TEST(error_per_codec, VQKV_DTYPE_F16),
        cmocka_unit_test(test_round_trip_views_and_dtypes),
        cmocka_unit_test(test_decode_dtypes_agree),
        cmocka_unit_test(test_fp16_bit_exact_all_patterns),
        cmocka_unit_test(test_fp8_decodes_every_code),
        cmocka_unit_test(test_fp16_codec_f32_memory_specials),
        EVERY_CASE_TEST(determinism, VQKV_DTYPE_F16),
        EVERY_CASE_TEST(decode_batch, VQKV_DTYPE_BF16),
        EVERY_CASE_TEST(decode_arbitrary_bytes_stays_in_slot, VQKV_DTYPE_BF16),
        EVERY_CASE_TEST(concurrent_use, VQKV_DTYPE_BF16),
        cmocka_unit_test(test_last_slot_exact_region),
        cmocka_unit_test(test_bad_slots_and_strides_refused),
        cmocka_unit_test(test_null_arguments),
        cmocka_unit_test(test_bad_specs_refused),
        cmocka_unit_test(test_invalid_layouts_refused),
        cmocka_unit_test(test_vq_needs_every_part_trained),
        cmocka_unit_test(test_strerror_names_every_code),
    };
    return cmocka_run_group_tests(tests, train_all_cases, free_trained);
}
