/* test_util.h -- helpers the unit tests share: a seeded generator, synthetic
 * KV vectors shaped like real keys and values, and element access into a
 * view computed from the documented stride formula, independently of the
 * library's own address arithmetic.
 *
 * It includes cmocka (with the headers cmocka needs first), the codec
 * interface and numeric.h, so a test includes it alone.
 */
#ifndef VQKV_TEST_UTIL_H
#define VQKV_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "numeric.h"
#include "test_assert.h" /* assert_rc, assert_ok */
#include "vqkv_codec.h"

/* Open fds of this process, those it never saw too (received ones): the
 * entries of /proc/self/fd, the listing's own included, the same each call. */
static inline int count_open_fds(void)
{
    DIR *dir = opendir("/proc/self/fd");
    assert_non_null(dir);
    int n = 0;
    while (readdir(dir) != NULL)
        n++;
    closedir(dir);
    return n;
}

/* A new directory prefix-XXXXXX under $TMPDIR (else /tmp), its path in
 * dir (size bytes): 0, or -1. */
static inline int test_make_dir(char *dir, size_t size, const char *prefix)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, size, "%s/%s-XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp", prefix);
    return mkdtemp(dir) != NULL ? 0 : -1;
}

static inline int test__open_up(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (type == FTW_D || type == FTW_DNR)
        chmod(path, 0700);
    return 0;
}

static inline int test__remove(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    remove(path);
    return 0;
}

/* Removes dir and everything under it, directories a test made unwritable
 * or unreadable included (each opened up first). */
static inline void test_remove_tree(const char *dir)
{
    nftw(dir, test__open_up, 16, FTW_PHYS);
    nftw(dir, test__remove, 16, FTW_DEPTH | FTW_PHYS);
}

/* Frees every pointer given: tests hold many buffers and let go of them
 * together, and one line for that keeps the end of each test readable. */
#define test_free_all(...)                                                                         \
    do {                                                                                           \
        void *to_free_[] = {__VA_ARGS__};                                                          \
        for (size_t i_ = 0; i_ < sizeof to_free_ / sizeof to_free_[0]; i_++)                       \
            free(to_free_[i_]);                                                                    \
    } while (0)

/* ---- deterministic random numbers ------------------------------------ */

typedef struct {
    uint64_t state;
} test_rng_t;

static inline uint64_t test_rng_next(test_rng_t *rng)
{
    uint64_t x = (rng->state += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Uniform in [0, 1). */
static inline double test_rng_uniform(test_rng_t *rng)
{
    return (double)(test_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
}

static inline double test_rng_gaussian(test_rng_t *rng)
{
    double u1 = 1.0 - test_rng_uniform(rng); /* (0, 1]: log stays finite */
    double u2 = test_rng_uniform(rng);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- synthetic KV ------------------------------------------------------ */

/* Real keys have a channel profile: most channels moderate, a few outlier
 * channels with large magnitude and a nonzero mean (what makes per-channel
 * key quantization worthwhile). Values are closer to isotropic with a
 * per-token scale. The profile depends only on (profile_seed, layer, kv), so
 * training vectors and test blocks drawn with different sample seeds come
 * from the same distribution. */
typedef struct {
    float scale[VQKV_MAX_HEAD_DIM];
    float mean[VQKV_MAX_HEAD_DIM];
} test_profile_t;

static inline void test_profile(uint64_t profile_seed, uint32_t layer, int kv, uint32_t head_dim,
                                test_profile_t *p)
{
    test_rng_t rng = {profile_seed * 1000003u + layer * 2u + (uint64_t)kv};
    for (uint32_t c = 0; c < head_dim; c++) {
        p->scale[c] = (float)(0.3 + 1.2 * test_rng_uniform(&rng));
        p->mean[c] = 0.0f;
    }
    if (kv == 0) {
        for (int i = 0; i < 4 && (uint32_t)i < head_dim; i++) {
            uint32_t c = (uint32_t)(test_rng_next(&rng) % head_dim);
            p->scale[c] = 6.0f;
            p->mean[c] = (test_rng_next(&rng) & 1) ? 8.0f : -8.0f;
        }
    }
}

/* n token-head vectors out[n][head_dim] of (layer, kv). */
static inline void test_synth_vectors(uint64_t profile_seed, uint64_t sample_seed, uint32_t layer,
                                      int kv, uint32_t head_dim, size_t n, float *out)
{
    test_profile_t p;
    test_profile(profile_seed, layer, kv, head_dim, &p);
    test_rng_t rng = {sample_seed ^ (0x51ed2701ull * (layer * 2u + (uint64_t)kv + 1u))};
    for (size_t i = 0; i < n; i++) {
        float token_scale = kv == 1 ? (float)(0.5 + test_rng_uniform(&rng)) : 1.0f;
        for (uint32_t c = 0; c < head_dim; c++)
            out[i * head_dim + c] =
                p.mean[c] + token_scale * p.scale[c] * (float)test_rng_gaussian(&rng);
    }
}

/* ---- blocks in strided memory -------------------------------------- */

/* Values of one block as a dense float array [layers][2][tokens][heads][dim]. */
static inline size_t test_block_values(const vqkv_layout_t *l)
{
    return (size_t)l->num_layers * 2 * l->block_tokens * l->num_kv_heads * l->head_dim;
}

static inline size_t test_block_index(const vqkv_layout_t *l, uint32_t layer, int kv, uint32_t t,
                                      uint32_t h, uint32_t d)
{
    return ((((size_t)layer * 2 + (size_t)kv) * l->block_tokens + t) * l->num_kv_heads + h) *
               l->head_dim +
           d;
}

/* The byte offset of an element, straight from the formula in vqkv_codec.h. */
static inline uint64_t test_element_offset(const vqkv_layout_t *l, const vqkv_kv_view_t *v,
                                           uint32_t layer, int kv, uint32_t slot, uint32_t t,
                                           uint32_t h, uint32_t d)
{
    return v->offset + vqkv_kv_view_layer(v, layer) + (uint64_t)kv * v->kv_stride +
           slot * v->slot_stride + t * v->token_stride + h * v->head_stride +
           d * (uint64_t)vqkv_dtype_size(l->dtype);
}

static inline void test_store(vqkv_dtype_t dtype, uint8_t *p, float value)
{
    uint16_t u16;
    switch (dtype) {
    case VQKV_DTYPE_F16:
        u16 = vqkv_f32_to_f16(value);
        memcpy(p, &u16, 2);
        break;
    case VQKV_DTYPE_BF16:
        u16 = vqkv_f32_to_bf16(value);
        memcpy(p, &u16, 2);
        break;
    case VQKV_DTYPE_F32: memcpy(p, &value, 4); break;
    }
}

static inline float test_load(vqkv_dtype_t dtype, const uint8_t *p)
{
    uint16_t u16;
    float f = 0.0f;
    switch (dtype) {
    case VQKV_DTYPE_F16: memcpy(&u16, p, 2); return vqkv_f16_to_f32(u16);
    case VQKV_DTYPE_BF16: memcpy(&u16, p, 2); return vqkv_bf16_to_f32(u16);
    case VQKV_DTYPE_F32: memcpy(&f, p, 4); return f;
    }
    return f;
}

/* Writes values[block_values] into block `slot` of the view at base. */
static inline void test_write_block(const vqkv_layout_t *l, const vqkv_kv_view_t *v, uint8_t *base,
                                    uint32_t slot, const float *values)
{
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++)
                    for (uint32_t d = 0; d < l->head_dim; d++)
                        test_store(l->dtype,
                                   base + test_element_offset(l, v, layer, kv, slot, t, h, d),
                                   values[test_block_index(l, layer, kv, t, h, d)]);
}

static inline void test_read_block(const vqkv_layout_t *l, const vqkv_kv_view_t *v,
                                   const uint8_t *base, uint32_t slot, float *values)
{
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++)
                    for (uint32_t d = 0; d < l->head_dim; d++)
                        values[test_block_index(l, layer, kv, t, h, d)] = test_load(
                            l->dtype, base + test_element_offset(l, v, layer, kv, slot, t, h, d));
}

/* A block of synthetic KV: every (layer, kv) drawn from its profile. */
static inline void test_synth_block(const vqkv_layout_t *l, uint64_t profile_seed,
                                    uint64_t sample_seed, float *values)
{
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++)
            test_synth_vectors(profile_seed, sample_seed, layer, kv, l->head_dim, vectors,
                               values + test_block_index(l, layer, kv, 0, 0, 0));
}

/* Trains every (layer, kv) of codec on n synthetic vectors each. */
static inline int test_train_all(vqkv_codec_t *codec, uint64_t profile_seed, size_t n,
                                 const vqkv_train_opts_t *opts)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    float *x = malloc(n * l->head_dim * sizeof *x);
    int rc = x == NULL ? VQKV_ENOMEM : VQKV_OK;
    for (uint32_t layer = 0; layer < l->num_layers && rc == VQKV_OK; layer++) {
        for (int kv = 0; kv < 2 && rc == VQKV_OK; kv++) {
            test_synth_vectors(profile_seed, 0x7a11u, layer, kv, l->head_dim, n, x);
            rc = vqkv_codec_train(codec, layer, kv, x, n, opts);
        }
    }
    free(x);
    return rc;
}

/* Saves codec's codebooks and checks they are byte for byte want[want_len]:
 * how the tests show that a load, a refused load or a refused training left
 * (or put) exactly those codebooks in place. */
static inline void test_assert_saves_as(const vqkv_codec_t *codec, const uint8_t *want,
                                        size_t want_len)
{
    uint8_t *saved = NULL;
    size_t saved_len = 0;
    assert_ok(vqkv_codebook_save_buffer(codec, &saved, &saved_len));
    assert_int_equal(saved_len, want_len);
    assert_memory_equal(saved, want, want_len);
    free(saved);
}

/* ---- the VQ codecs' block means and escapes (kernels/README.md) ------------ */

/* Whether vector v is among list[n]. */
static inline int test_listed(const uint32_t *list, uint32_t n, uint32_t v)
{
    for (uint32_t i = 0; i < n; i++)
        if (list[i] == v)
            return 1;
    return 0;
}

/* The block means a VQ codec with bc=1 stores at the start of each key part:
 * per (head, channel), the float sum in token order over the block's tokens
 * whose vector t*H + h is not among skip[n_skip] (the escapes), divided by
 * their count, clamped to +-65504 and rounded to f16 (nearest even); 0 when
 * no token is left. x is one (layer, K) of a block as it sits in memory,
 * [tokens][heads][dim]; out is f16 [heads][dim]. */
static inline void test_block_means_f16(const vqkv_layout_t *l, const float *x,
                                        const uint32_t *skip, uint32_t n_skip, uint16_t *out)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t d = 0; d < D; d++) {
            float sum = 0.0f;
            uint32_t count = 0;
            for (uint32_t t = 0; t < l->block_tokens; t++) {
                if (test_listed(skip, n_skip, t * H + h))
                    continue;
                sum += x[((size_t)t * H + h) * D + d];
                count++;
            }
            float mean = count > 0 ? fminf(fmaxf(sum / (float)count, -65504.0f), 65504.0f) : 0.0f;
            out[(size_t)h * D + d] = vqkv_f32_to_f16(mean);
        }
}

/* The escapes of one part x[tokens][heads][dim]: the min(esc, T*H) vectors
 * farthest from their head's reference ref[heads][dim] (squared L2, a float
 * sum in channel order), largest first, equal distances in index order.
 * Returns how many; out[esc] receives their indices. */
static inline uint32_t test_pick_escapes(const vqkv_layout_t *l, const float *x, const float *ref,
                                         uint32_t esc, uint32_t *out)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim, vectors = l->block_tokens * H, n = 0;
    float *dist = malloc(vectors * sizeof *dist);
    assert_non_null(dist);
    for (uint32_t v = 0; v < vectors; v++) {
        float d2 = 0.0f;
        for (uint32_t c = 0; c < D; c++) {
            float diff = x[(size_t)v * D + c] - ref[(size_t)(v % H) * D + c];
            d2 += diff * diff;
        }
        dist[v] = d2;
    }
    for (; n < esc && n < vectors; n++) {
        uint32_t best = UINT32_MAX;
        for (uint32_t v = 0; v < vectors; v++)
            if (!test_listed(out, n, v) && (best == UINT32_MAX || dist[v] > dist[best]))
                best = v;
        out[n] = best;
    }
    free(dist);
    return n;
}

/* What a VQ encoder decides for one part before coding it: its escapes and,
 * for keys with bc=1 (block_means not NULL), the stored f16 block means.
 * The reference is the all-token block mean for those keys, else each
 * head's channel-statistics mean channel_mean[heads][dim] (NULL: 0, as
 * every cs=0 codec has). Returns the number of escapes. */
static inline uint32_t test_part_plan(const vqkv_layout_t *l, const float *x, uint32_t esc,
                                      const float *channel_mean, uint16_t *block_means,
                                      uint32_t *escapes)
{
    size_t row = (size_t)l->num_kv_heads * l->head_dim;
    float *ref = calloc(row, sizeof *ref);
    assert_non_null(ref);
    if (block_means != NULL) {
        test_block_means_f16(l, x, NULL, 0, block_means);
        for (size_t i = 0; i < row; i++)
            ref[i] = vqkv_f16_to_f32(block_means[i]);
    } else if (channel_mean != NULL) {
        memcpy(ref, channel_mean, row * sizeof *ref);
    }
    uint32_t n = test_pick_escapes(l, x, ref, esc, escapes);
    if (block_means != NULL)
        test_block_means_f16(l, x, escapes, n, block_means);
    free(ref);
    return n;
}

/* The fp8 codec's row format, which escapes use too: returns the f16 scale
 * f16(min(amax / 448, 65504)) and writes codes[n] = e4m3(x / scale) (0 for
 * a zero scale). */
static inline uint16_t test_fp8_row_encode(const float *x, uint32_t n, uint8_t *codes)
{
    float amax = 0.0f;
    for (uint32_t i = 0; i < n; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    uint16_t scale_h = vqkv_f32_to_f16(fminf(amax / 448.0f, 65504.0f));
    float scale = vqkv_f16_to_f32(scale_h);
    for (uint32_t i = 0; i < n; i++)
        codes[i] = scale == 0.0f ? 0 : vqkv_f32_to_e4m3(x[i] / scale);
    return scale_h;
}

static inline void test_fp8_row_decode(uint16_t scale_h, const uint8_t *codes, uint32_t n, float *x)
{
    float scale = vqkv_f16_to_f32(scale_h);
    for (uint32_t i = 0; i < n; i++)
        x[i] = vqkv_e4m3_to_f32(codes[i]) * scale;
}

/* Little-endian fields of the compressed layouts. */
static inline uint16_t test_get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t test_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void test_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Bytes of one escape entry: u32 index, f16 scale, e4m3[head_dim]. */
static inline size_t test_escape_bytes(const vqkv_layout_t *l)
{
    return 6 + (size_t)l->head_dim;
}

/* ||a - b|| / ||a|| over the values of side kv (0 K, 1 V; -1 both). */
static inline double test_rel_error(const vqkv_layout_t *l, const float *ref, const float *got,
                                    int kv_only)
{
    double err = 0.0, norm = 0.0;
    size_t per_side = (size_t)l->block_tokens * l->num_kv_heads * l->head_dim;
    for (uint32_t layer = 0; layer < l->num_layers; layer++) {
        for (int kv = 0; kv < 2; kv++) {
            if (kv_only >= 0 && kv != kv_only)
                continue;
            size_t first = test_block_index(l, layer, kv, 0, 0, 0);
            for (size_t i = first; i < first + per_side; i++) {
                double diff = (double)ref[i] - (double)got[i];
                err += diff * diff;
                norm += (double)ref[i] * (double)ref[i];
            }
        }
    }
    return norm > 0.0 ? sqrt(err / norm) : sqrt(err);
}

#endif
