/* codec_scalar.c -- the codecs that need no codebooks: fp16 passthrough,
 * fp8 e4m3 with per token-head scales, and KIVI's grouped asymmetric
 * integers (keys per channel over the block's tokens, values per token).
 *
 * Byte layouts are in kernels/README.md. Every scale and minimum is rounded
 * to fp16 before quantizing, so the encoder quantizes against exactly the
 * values the decoder will reconstruct with.
 */
#include "bitpack.h"
#include "codec_internal.h"
#include "numeric_x86.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- fp16 ------------------------------------------------------------ */

static int vqkv__fp16_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    (void)spec;
    const vqkv_layout_t *l = &codec->layout;
    codec->part_bytes[0] = codec->part_bytes[1] =
        (size_t)l->block_tokens * l->num_kv_heads * l->head_dim * 2;
    snprintf(codec->spec, sizeof codec->spec, "fp16");
    return VQKV_OK;
}

static void vqkv__fp16_encode(const vqkv_codec_t *codec, uint32_t layer, int kv,
                              const vqkv__tile_t *tile, uint8_t *out)
{
    (void)layer, (void)kv;
    const vqkv_layout_t *l = &codec->layout;
    float row[VQKV_MAX_HEAD_DIM];
    size_t row_bytes = (size_t)l->head_dim * 2;
    for (uint32_t t = 0; t < l->block_tokens; t++) {
        for (uint32_t h = 0; h < l->num_kv_heads; h++, out += row_bytes) {
            if (tile->dtype == VQKV_DTYPE_F16) {
                memcpy(out, tile->base + t * tile->token_stride + h * tile->head_stride, row_bytes);
                continue;
            }
            vqkv__tile_load(tile, t, h, l->head_dim, row);
            for (uint32_t d = 0; d < l->head_dim; d++)
                vqkv__put_u16(out + 2 * d, vqkv_f32_to_f16(row[d]));
        }
    }
}

static void vqkv__fp16_decode(const vqkv_codec_t *codec, uint32_t layer, int kv, const uint8_t *in,
                              const vqkv__tile_t *tile, const vqkv__ahead_t *ahead)
{
    (void)layer, (void)kv, (void)ahead;
    const vqkv_layout_t *l = &codec->layout;
    float row[VQKV_MAX_HEAD_DIM];
    size_t row_bytes = (size_t)l->head_dim * 2;
    for (uint32_t t = 0; t < l->block_tokens; t++) {
        for (uint32_t h = 0; h < l->num_kv_heads; h++, in += row_bytes) {
            if (tile->dtype == VQKV_DTYPE_F16) {
                memcpy(tile->base + t * tile->token_stride + h * tile->head_stride, in, row_bytes);
                continue;
            }
            for (uint32_t d = 0; d < l->head_dim; d++)
                row[d] = vqkv_f16_to_f32(vqkv__get_u16(in + 2 * d));
            vqkv__tile_store(tile, t, h, l->head_dim, row);
        }
    }
}

/* fp16 and fp8 have no parameters for the kernels beyond their kind. */
static int vqkv__fp16_kplan(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books)
{
    (void)codec, (void)books;
    plan->kind = VQKV_KIND_FP16;
    return VQKV_OK;
}

const vqkv__codec_ops_t vqkv__fp16_ops = {
    .name = "fp16",
    .init = vqkv__fp16_init,
    .encode_part = vqkv__fp16_encode,
    .decode_part = vqkv__fp16_decode,
    .kplan = vqkv__fp16_kplan,
};

/* ---- fp8 e4m3 -------------------------------------------------------- */

/* A vector's scale from its largest magnitude: stored as f16, returned
 * as the decoder will read it. */
static float vqkv__fp8_scale(float amax, uint8_t *scale_out)
{
    uint16_t scale_h = vqkv_f32_to_f16(fminf(amax / VQKV_E4M3_MAX, VQKV_F16_MAX));
    vqkv__put_u16(scale_out, scale_h);
    return vqkv_f16_to_f32(scale_h);
}

#if defined(__x86_64__)
/* vqkv_f32_to_e4m3 of eight floats, each of its cases in every lane and
 * the lane's own picked: NaN to S.1111.111; below 2^-6 in units of 2^-9,
 * rounded by a float add; the rest rounded to nearest even on the bits,
 * (r >> 20) - (120 << 3) being ((exp + 7) << 3 | mant), saturated to
 * S.1111.110 (448). Bytes in the low 64 bits. */
VQKV__X86 static inline __m128i vqkv__f32x8_to_e4m3(__m256 x)
{
    __m256i u = _mm256_castps_si256(x);
    __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
    __m256 magic = _mm256_castsi256_ps(_mm256_set1_epi32((127 - 9 + 23) << 23));
    __m256i sub =
        _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
                         _mm256_castps_si256(magic));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7ffff)), odd);
    __m256i normal =
        _mm256_min_epu32(_mm256_sub_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(120 << 3)),
                         _mm256_set1_epi32(0x7e));
    __m256i code =
        _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), a));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f),
                              _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
    code = _mm256_or_si256(code, sign);
    __m256i words = _mm256_packus_epi32(code, code); /* per lane c0-3 c0-3 | c4-7 c4-7 */
    __m256i bytes = _mm256_packus_epi16(words, words);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
}

/* vqkv__fp8_row_encode of a row of a multiple of 8: the largest magnitude
 * by max(|x|, acc), which keeps acc where |x| is NaN, as fmaxf does; each
 * value divided by the scale, as the reference divides. */
VQKV__X86 static void vqkv__fp8_row_encode_x86(const float *row, uint32_t n, uint8_t *scale_out,
                                               uint8_t *codes)
{
    __m256 acc = _mm256_setzero_ps(),
           magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (uint32_t d = 0; d < n; d += 8)
        acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + d), magnitude), acc);
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++)
        amax = fmaxf(amax, lanes[i]);
    float scale = vqkv__fp8_scale(amax, scale_out);
    __m256 s = _mm256_set1_ps(scale);
    for (uint32_t d = 0; d < n; d += 8) {
        __m128i c = scale > 0.0f ? vqkv__f32x8_to_e4m3(_mm256_div_ps(_mm256_loadu_ps(row + d), s))
                                 : _mm_setzero_si128();
        _mm_storel_epi64((__m128i *)(codes + d), c);
    }
}
#endif

void vqkv__fp8_row_encode(const float *row, uint32_t n, uint8_t *scale_out, uint8_t *codes)
{
#if defined(__x86_64__)
    if (vqkv__simd_enabled() && n % 8 == 0) {
        vqkv__fp8_row_encode_x86(row, n, scale_out, codes);
        return;
    }
#endif
    float amax = 0.0f;
    for (uint32_t d = 0; d < n; d++)
        amax = fmaxf(amax, fabsf(row[d]));
    float scale = vqkv__fp8_scale(amax, scale_out);
    for (uint32_t d = 0; d < n; d++)
        codes[d] = scale > 0.0f ? vqkv_f32_to_e4m3(row[d] / scale) : 0;
}

/* Every e4m3 code as a float, vqkv_e4m3_to_f32's own results: a lookup
 * instead of bit assembly per value. */
static float vqkv__e4m3_table[256];
static pthread_once_t vqkv__e4m3_once = PTHREAD_ONCE_INIT;

static void vqkv__e4m3_table_init(void)
{
    for (int c = 0; c < 256; c++)
        vqkv__e4m3_table[c] = vqkv_e4m3_to_f32((uint8_t)c);
}

void vqkv__fp8_row_decode(const uint8_t *scale_in, const uint8_t *codes, uint32_t n, float *row)
{
    pthread_once(&vqkv__e4m3_once, vqkv__e4m3_table_init);
    float scale = vqkv_f16_to_f32(vqkv__get_u16(scale_in));
    for (uint32_t d = 0; d < n; d++)
        row[d] = vqkv__e4m3_table[codes[d]] * scale;
}

static int vqkv__fp8_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    (void)spec;
    const vqkv_layout_t *l = &codec->layout;
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads;
    codec->part_bytes[0] = codec->part_bytes[1] = vectors * (2 + l->head_dim);
    snprintf(codec->spec, sizeof codec->spec, "fp8");
    return VQKV_OK;
}

static void vqkv__fp8_encode(const vqkv_codec_t *codec, uint32_t layer, int kv,
                             const vqkv__tile_t *tile, uint8_t *out)
{
    (void)layer, (void)kv;
    const vqkv_layout_t *l = &codec->layout;
    uint8_t *scales = out;
    uint8_t *codes = out + 2 * (size_t)l->block_tokens * l->num_kv_heads;
    float row[VQKV_MAX_HEAD_DIM];
    for (uint32_t t = 0; t < l->block_tokens; t++) {
        for (uint32_t h = 0; h < l->num_kv_heads; h++) {
            vqkv__tile_load(tile, t, h, l->head_dim, row);
            vqkv__fp8_row_encode(row, l->head_dim, scales, codes);
            scales += 2;
            codes += l->head_dim;
        }
    }
}

#if defined(__x86_64__)
/* Sixteen e4m3 codes as f16 bits of their values times 2^-8, exact: the
 * code's exponent and mantissa moved to f16's places (bias 7 against 15),
 * subnormals to subnormals, the sign above them; S.1111.111 becomes f16's
 * NaN with that sign, which widens to numeric.h's NaN. In 16-bit lanes
 * with one F16C widening, the decode ran 1.6x as fast as when it built
 * float bits in 32-bit lanes (bench/RESULTS.md). */
VQKV__X86 static inline __m256i vqkv__e4m3x16_to_f16(__m128i codes)
{
    __m256i b = _mm256_cvtepu8_epi16(codes);
    __m256i mag = _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3f80));
    __m256i sign = _mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16((short)0x8000));
    __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x3f80));
    mag = _mm256_blendv_epi8(mag, _mm256_set1_epi16(0x7e00), nan);
    return _mm256_or_si256(mag, sign);
}

VQKV__X86 static inline __m256 vqkv__fp8_codes8_x86(const uint8_t *codes)
{
    __m256i h = vqkv__e4m3x16_to_f16(_mm_loadl_epi64((const __m128i *)codes));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(h));
}

VQKV__X512 static inline __m512 vqkv__fp8_codes16_x512(const uint8_t *codes)
{
    return _mm512_cvtph_ps(vqkv__e4m3x16_to_f16(_mm_loadu_si128((const __m128i *)codes)));
}

/* ROWS: every row of a part straight into worker memory, LANES values a
 * step (D a multiple of LANES): each code's value times 2^-8 by the scale
 * times 2^8, both factors exact, so the product is vqkv__fp8_row_decode's
 * to the bit. DISPATCH: one loop per dtype, so the store is not chosen
 * per value. For AVX2 (8 lanes) and AVX-512 (16). */
#define VQKV__FP8_ROWS(ROWS, DISPATCH, TARGET, W, LANES, CODES, STORE)                             \
    TARGET static inline __attribute__((always_inline)) void ROWS(                                 \
        const vqkv_layout_t *l, const uint8_t *in, const vqkv__tile_t *tile, vqkv_dtype_t dtype)   \
    {                                                                                              \
        uint32_t D = l->head_dim, width = dtype == VQKV_DTYPE_F32 ? 4 : 2;                         \
        const uint8_t *scales = in;                                                                \
        const uint8_t *codes = in + 2 * (size_t)l->block_tokens * l->num_kv_heads;                 \
        for (uint32_t t = 0; t < l->block_tokens; t++)                                             \
            for (uint32_t h = 0; h < l->num_kv_heads; h++, scales += 2, codes += D) {              \
                uint8_t *out = tile->base + t * tile->token_stride + h * tile->head_stride;        \
                __m##W s = _mm##W##_set1_ps(vqkv_f16_to_f32(vqkv__get_u16(scales)) * 0x1p8f);      \
                for (uint32_t c = 0; c < D; c += (LANES))                                          \
                    STORE(dtype, _mm##W##_mul_ps(CODES(codes + c), s), out + (size_t)c * width);   \
            }                                                                                      \
    }                                                                                              \
    TARGET static void DISPATCH(const vqkv_layout_t *l, const uint8_t *in,                         \
                                const vqkv__tile_t *tile)                                          \
    {                                                                                              \
        switch (tile->dtype) {                                                                     \
        case VQKV_DTYPE_F16: ROWS(l, in, tile, VQKV_DTYPE_F16); break;                             \
        case VQKV_DTYPE_BF16: ROWS(l, in, tile, VQKV_DTYPE_BF16); break;                           \
        case VQKV_DTYPE_F32: ROWS(l, in, tile, VQKV_DTYPE_F32); break;                             \
        }                                                                                          \
    }

VQKV__FP8_ROWS(vqkv__fp8_rows_x86, vqkv__fp8_decode_x86, VQKV__X86, 256, 8, vqkv__fp8_codes8_x86,
               vqkv__store8_x86)
VQKV__FP8_ROWS(vqkv__fp8_rows_x512, vqkv__fp8_decode_x512, VQKV__X512, 512, 16,
               vqkv__fp8_codes16_x512, vqkv__store16_x512)
#endif

static void vqkv__fp8_decode(const vqkv_codec_t *codec, uint32_t layer, int kv, const uint8_t *in,
                             const vqkv__tile_t *tile, const vqkv__ahead_t *ahead)
{
    (void)layer, (void)kv, (void)ahead;
    const vqkv_layout_t *l = &codec->layout;
    const uint8_t *scales = in;
    const uint8_t *codes = in + 2 * (size_t)l->block_tokens * l->num_kv_heads;
    float row[VQKV_MAX_HEAD_DIM];
#if defined(__x86_64__)
    if (vqkv__simd_enabled() && l->head_dim % 8 == 0) {
        (vqkv__simd_avx512() && l->head_dim % 16 == 0 ? vqkv__fp8_decode_x512
                                                      : vqkv__fp8_decode_x86)(l, in, tile);
        return;
    }
#endif
    for (uint32_t t = 0; t < l->block_tokens; t++) {
        for (uint32_t h = 0; h < l->num_kv_heads; h++) {
            vqkv__fp8_row_decode(scales, codes, l->head_dim, row);
            scales += 2;
            codes += l->head_dim;
            vqkv__tile_store(tile, t, h, l->head_dim, row);
        }
    }
}

static int vqkv__fp8_kplan(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books)
{
    (void)codec, (void)books;
    plan->kind = VQKV_KIND_FP8;
    return VQKV_OK;
}

const vqkv__codec_ops_t vqkv__fp8_ops = {
    .name = "fp8",
    .init = vqkv__fp8_init,
    .encode_part = vqkv__fp8_encode,
    .decode_part = vqkv__fp8_decode,
    .kplan = vqkv__fp8_kplan,
};

/* ---- KIVI ------------------------------------------------------------ */

typedef struct {
    uint32_t bits;
    uint32_t group; /* value channels per group */
} vqkv__kivi_t;

/* Quantization groups in a part: keys have one per (head, channel), values
 * one per (token, head, channel group). */
static size_t vqkv__kivi_groups(const vqkv_codec_t *codec, int kv)
{
    const vqkv_layout_t *l = &codec->layout;
    const vqkv__kivi_t *k = codec->state;
    if (kv == 0)
        return (size_t)l->num_kv_heads * l->head_dim;
    return (size_t)l->block_tokens * l->num_kv_heads * (l->head_dim / k->group);
}

static int vqkv__kivi_init(vqkv_codec_t *codec, vqkv__spec_t *spec, uint32_t bits)
{
    const vqkv_layout_t *l = &codec->layout;
    uint32_t group;
    int rc = vqkv__spec_num(spec, "g", l->head_dim < 32 ? l->head_dim : 32, 1, l->head_dim, &group);
    if (rc != VQKV_OK || l->head_dim % group != 0)
        return VQKV_ESPEC;
    vqkv__kivi_t *k = malloc(sizeof *k);
    if (k == NULL)
        return VQKV_ENOMEM;
    k->bits = bits;
    k->group = group;
    codec->state = k;
    uint64_t values = (uint64_t)l->block_tokens * l->num_kv_heads * l->head_dim;
    for (int kv = 0; kv < 2; kv++)
        codec->part_bytes[kv] = 4 * vqkv__kivi_groups(codec, kv) + vqkv__bits_bytes(values, bits);
    snprintf(codec->spec, sizeof codec->spec, "kivi%u:g=%u", bits, group);
    return VQKV_OK;
}

static int vqkv__kivi2_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    return vqkv__kivi_init(codec, spec, 2);
}

static int vqkv__kivi4_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    return vqkv__kivi_init(codec, spec, 4);
}

/* Stores the fp16 minimum and step of [lo, hi] and returns them as floats. */
static void vqkv__kivi_range(float lo, float hi, uint32_t bits, uint8_t *min_out, uint8_t *step_out,
                             float *min, float *step)
{
    uint16_t min_h = vqkv_f32_to_f16(lo);
    uint16_t step_h = vqkv_f32_to_f16(fminf((hi - lo) / (float)((1u << bits) - 1u), VQKV_F16_MAX));
    vqkv__put_u16(min_out, min_h);
    vqkv__put_u16(step_out, step_h);
    *min = vqkv_f16_to_f32(min_h);
    *step = vqkv_f16_to_f32(step_h);
}

static uint32_t vqkv__kivi_code(float x, float min, float step, uint32_t bits)
{
    if (!(step > 0.0f))
        return 0;
    float q = nearbyintf((x - min) / step);
    float top = (float)((1u << bits) - 1u);
    /* "q > 0" and not "q < 0" so that NaN (from a NaN or infinite value in
     * worker memory) gives code 0: converting NaN to an integer is
     * undefined behaviour. */
    return (uint32_t)(q > 0.0f ? (q > top ? top : q) : 0.0f);
}

#if defined(__x86_64__)
/* vqkv__kivi_code of eight values, packed at out (byte-aligned: 8 * bits
 * bits): the same difference, quotient and rounding (nearest even, as
 * nearbyintf in the default mode); max(q, 0) keeps 0 where q is NaN or
 * negative, and a range whose step is not positive gives 0, as there. */
VQKV__X86 static inline void vqkv__kivi_codes8_put_x86(__m256 x, __m256 min, __m256 step,
                                                       uint32_t bits, uint8_t *out)
{
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, min), step),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()),
                      _mm256_set1_ps((float)((1u << bits) - 1u)));
    q = _mm256_and_ps(q, _mm256_cmp_ps(step, _mm256_setzero_ps(), _CMP_GT_OQ));
    __m256i shifts = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                               : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    __m256i v = _mm256_sllv_epi32(_mm256_cvttps_epi32(q), shifts);
    __m128i o = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    o = _mm_or_si128(o, _mm_shuffle_epi32(o, 0x4e));
    o = _mm_or_si128(o, _mm_shuffle_epi32(o, 0xb1));
    uint32_t word = (uint32_t)_mm_cvtsi128_si32(o);
    memcpy(out, &word, bits); /* 8 codes of `bits` bits: `bits` bytes, little-endian */
}

VQKV__X86 static void vqkv__kivi_put_codes_x86(uint8_t *codes, uint64_t at, const float *x,
                                               uint32_t n, const float *min, const float *step,
                                               size_t stride, uint32_t bits)
{
    __m256 m = _mm256_set1_ps(min[0]), s = _mm256_set1_ps(step[0]);
    for (uint32_t d = 0; d < n; d += 8) {
        if (stride != 0) {
            m = _mm256_loadu_ps(min + d);
            s = _mm256_loadu_ps(step + d);
        }
        vqkv__kivi_codes8_put_x86(_mm256_loadu_ps(x + d), m, s, bits, codes + (at + d) * bits / 8);
    }
}

/* vqkv_range_lo and vqkv_range_hi of eight lanes. minps and maxps return
 * their second operand, x, on a +0/-0 tie (as those do) and wherever
 * either operand is NaN: right where the bound is NaN; where x is, the
 * blend puts the bound back. */
VQKV__X86 static inline __m256 vqkv__range_lo8(__m256 lo, __m256 x)
{
    return _mm256_blendv_ps(_mm256_min_ps(lo, x), lo, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

VQKV__X86 static inline __m256 vqkv__range_hi8(__m256 hi, __m256 x)
{
    return _mm256_blendv_ps(_mm256_max_ps(hi, x), hi, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

VQKV__X86 static void vqkv__kivi_widen_x86(float *lo, float *hi, const float *row, uint32_t D)
{
    for (uint32_t d = 0; d < D; d += 8) {
        __m256 x = _mm256_loadu_ps(row + d);
        _mm256_storeu_ps(lo + d, vqkv__range_lo8(_mm256_loadu_ps(lo + d), x));
        _mm256_storeu_ps(hi + d, vqkv__range_hi8(_mm256_loadu_ps(hi + d), x));
    }
}

/* Lane i takes values i, i + 8, ... in order; then halves, quarters and
 * pairs combine, the lower lanes as the bound. */
VQKV__X86 static void vqkv__kivi_span_x86(const float *x, uint32_t n, float *lo_out, float *hi_out)
{
    __m256 lo = _mm256_loadu_ps(x), hi = lo;
    for (uint32_t d = 8; d < n; d += 8) {
        __m256 v = _mm256_loadu_ps(x + d);
        lo = vqkv__range_lo8(lo, v);
        hi = vqkv__range_hi8(hi, v);
    }
    lo = vqkv__range_lo8(lo, _mm256_permute2f128_ps(lo, lo, 1));
    hi = vqkv__range_hi8(hi, _mm256_permute2f128_ps(hi, hi, 1));
    lo = vqkv__range_lo8(lo, _mm256_permute_ps(lo, 0x4e));
    hi = vqkv__range_hi8(hi, _mm256_permute_ps(hi, 0x4e));
    lo = vqkv__range_lo8(lo, _mm256_permute_ps(lo, 0xb1));
    hi = vqkv__range_hi8(hi, _mm256_permute_ps(hi, 0xb1));
    *lo_out = _mm256_cvtss_f32(lo);
    *hi_out = _mm256_cvtss_f32(hi);
}
#endif

/* Widens each key channel's range [lo[d], hi[d]] by the next token's
 * row[d]: token order in every lane, so the vector path is the scalar one
 * value for value. */
static void vqkv__kivi_widen(float *lo, float *hi, const float *row, uint32_t D)
{
#if defined(__x86_64__)
    if (vqkv__simd_enabled() && D % 8 == 0) {
        vqkv__kivi_widen_x86(lo, hi, row, D);
        return;
    }
#endif
    for (uint32_t d = 0; d < D; d++) {
        lo[d] = vqkv_range_lo(lo[d], row[d]);
        hi[d] = vqkv_range_hi(hi[d], row[d]);
    }
}

/* The range of a value group x[0..n): the least and greatest value in
 * channel order. The vector path takes them in another order, which gives
 * the same bits except for which zero wins a +0/-0 tie, so a range with
 * a zero bound is taken again in order (O(n) more, for groups that hold
 * a zero only). */
static void vqkv__kivi_span(const float *x, uint32_t n, float *lo, float *hi)
{
#if defined(__x86_64__)
    if (vqkv__simd_enabled() && n % 8 == 0) {
        vqkv__kivi_span_x86(x, n, lo, hi);
        if (*lo != 0.0f && *hi != 0.0f)
            return;
    }
#endif
    *lo = *hi = x[0];
    for (uint32_t d = 1; d < n; d++) {
        *lo = vqkv_range_lo(*lo, x[d]);
        *hi = vqkv_range_hi(*hi, x[d]);
    }
}

/* The codes of x[0..n) from stream index `at` on, against ranges min[d *
 * stride] and step[d * stride] (a key's per channel, stride 1; a value
 * group's one, stride 0); eight at a time where they fill whole bytes. */
static void vqkv__kivi_put_codes(uint8_t *codes, uint64_t at, const float *x, uint32_t n,
                                 const float *min, const float *step, size_t stride, uint32_t bits)
{
#if defined(__x86_64__)
    if (vqkv__simd_enabled() && n % 8 == 0 && at % 8 == 0) {
        vqkv__kivi_put_codes_x86(codes, at, x, n, min, step, stride, bits);
        return;
    }
#endif
    for (uint32_t d = 0; d < n; d++)
        vqkv__bits_put(codes, (at + d) * bits, bits,
                       vqkv__kivi_code(x[d], min[d * stride], step[d * stride], bits));
}

static void vqkv__kivi_encode(const vqkv_codec_t *codec, uint32_t layer, int kv,
                              const vqkv__tile_t *tile, uint8_t *out)
{
    (void)layer;
    const vqkv_layout_t *l = &codec->layout;
    const vqkv__kivi_t *k = codec->state;
    size_t groups = vqkv__kivi_groups(codec, kv);
    uint8_t *mins = out, *steps = out + 2 * groups, *codes = out + 4 * groups;
    uint32_t D = l->head_dim, H = l->num_kv_heads;
    float row[VQKV_MAX_HEAD_DIM];

    memset(codes, 0, codec->part_bytes[kv] - 4 * groups);
    if (kv == 0) {
        /* Keys: a channel's range over the block's tokens, one pass to find
         * it and one to quantize, reading worker memory twice rather than
         * copying the block. */
        float lo[VQKV_MAX_HEAD_DIM], hi[VQKV_MAX_HEAD_DIM];
        float min[VQKV_MAX_HEAD_DIM], step[VQKV_MAX_HEAD_DIM];
        for (uint32_t h = 0; h < H; h++) {
            vqkv__tile_load(tile, 0, h, D, lo);
            memcpy(hi, lo, D * sizeof *hi);
            for (uint32_t t = 1; t < l->block_tokens; t++) {
                vqkv__tile_load(tile, t, h, D, row);
                vqkv__kivi_widen(lo, hi, row, D);
            }
            for (uint32_t d = 0; d < D; d++) {
                size_t g = (size_t)h * D + d;
                vqkv__kivi_range(lo[d], hi[d], k->bits, mins + 2 * g, steps + 2 * g, &min[d],
                                 &step[d]);
            }
            for (uint32_t t = 0; t < l->block_tokens; t++) {
                vqkv__tile_load(tile, t, h, D, row);
                vqkv__kivi_put_codes(codes, ((uint64_t)t * H + h) * D, row, D, min, step, 1,
                                     k->bits);
            }
        }
        return;
    }
    for (uint32_t t = 0; t < l->block_tokens; t++) {
        for (uint32_t h = 0; h < H; h++) {
            vqkv__tile_load(tile, t, h, D, row);
            uint64_t base = ((uint64_t)t * H + h) * D;
            for (uint32_t c0 = 0; c0 < D; c0 += k->group) {
                float lo, hi, min, step;
                vqkv__kivi_span(row + c0, k->group, &lo, &hi);
                size_t g = (base + c0) / k->group;
                vqkv__kivi_range(lo, hi, k->bits, mins + 2 * g, steps + 2 * g, &min, &step);
                vqkv__kivi_put_codes(codes, base + c0, row + c0, k->group, &min, &step, 0, k->bits);
            }
        }
    }
}

/* The n codes from value `first` of a stream of `bits`-bit codes (2 or 4,
 * so a row starts on a byte when first * bits is a multiple of 8), as
 * floats. */
static void vqkv__kivi_codes(const uint8_t *codes, uint64_t first, uint32_t n, uint32_t bits,
                             float *q)
{
    uint32_t per_byte = 8 / bits, mask = (1u << bits) - 1;
    uint64_t bit = first * bits;
    uint32_t d = 0;
    if (bit % 8 == 0) {
        const uint8_t *p = codes + bit / 8;
        for (; d + per_byte <= n; d += per_byte, p++)
            for (uint32_t k = 0; k < per_byte; k++)
                q[d + k] = (float)((*p >> (k * bits)) & mask);
    }
    for (; d < n; d++)
        q[d] = (float)vqkv__bits_get(codes, (first + d) * bits, bits);
}

/* One pass of a KIVI decode: the rows of heads [h0, h1) of every token.
 * Keys' ranges per channel come converted (min, step: the tile's heads);
 * values' per group are read from the part's fp16 (mins, steps) row by
 * row. */
typedef struct {
    const uint8_t *codes, *mins, *steps;
    const float *min, *step;
    uint32_t bits, D, H, h0, h1, group, tokens;
    int kv;
} vqkv__kivi_pass_t;

typedef void (*vqkv__kivi_pass_fn)(const vqkv__kivi_pass_t *, const vqkv__tile_t *);

/* The ranges of the value row starting at value `base`, one per group. */
static inline void vqkv__kivi_value_ranges(const vqkv__kivi_pass_t *ps, uint64_t base, float *min,
                                           float *step)
{
    size_t g0 = (size_t)(base / ps->group);
    for (uint32_t g = 0; g < ps->D / ps->group; g++) {
        min[g] = vqkv_f16_to_f32(vqkv__get_u16(ps->mins + 2 * (g0 + g)));
        step[g] = vqkv_f16_to_f32(vqkv__get_u16(ps->steps + 2 * (g0 + g)));
    }
}

/* The reference pass: codes first, then the arithmetic in a loop without
 * branches or bit fiddling, which the compiler vectorizes. */
static void vqkv__kivi_pass_scalar(const vqkv__kivi_pass_t *ps, const vqkv__tile_t *tile)
{
    uint32_t D = ps->D;
    float q[VQKV_MAX_HEAD_DIM], row[VQKV_MAX_HEAD_DIM];
    float vmin[VQKV_MAX_HEAD_DIM], vstep[VQKV_MAX_HEAD_DIM];
    for (uint32_t t = 0; t < ps->tokens; t++)
        for (uint32_t h = ps->h0; h < ps->h1; h++) {
            uint64_t base = ((uint64_t)t * ps->H + h) * D;
            vqkv__kivi_codes(ps->codes, base, D, ps->bits, q);
            if (ps->kv == 0) {
                const float *min = ps->min + (size_t)(h - ps->h0) * D;
                const float *step = ps->step + (size_t)(h - ps->h0) * D;
                for (uint32_t d = 0; d < D; d++)
                    row[d] = q[d] * step[d] + min[d];
            } else {
                vqkv__kivi_value_ranges(ps, base, vmin, vstep);
                for (uint32_t c0 = 0, g = 0; c0 < D; c0 += ps->group, g++)
                    for (uint32_t d = c0; d < c0 + ps->group; d++)
                        row[d] = q[d] * vstep[g] + vmin[g];
            }
            vqkv__tile_store(tile, t, h, D, row);
        }
}

#if defined(__x86_64__)
/* Eight codes of `bits` (2 or 4) from `bits` bytes, as floats: each shifted
 * out of a broadcast little-endian word. */
VQKV__X86 static inline __m256 vqkv__kivi_codes8_x86(const uint8_t *codes, uint32_t bits)
{
    uint32_t word = bits == 4 ? (uint32_t)codes[0] | (uint32_t)codes[1] << 8 |
                                    (uint32_t)codes[2] << 16 | (uint32_t)codes[3] << 24
                              : (uint32_t)codes[0] | (uint32_t)codes[1] << 8;
    __m256i shifts = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                               : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32((1 << bits) - 1)));
}

/* vqkv__kivi_codes8_x86 on sixteen codes from 2 * bits bytes, eight at a
 * time. */
VQKV__X512 static inline __m512 vqkv__kivi_codes16_x512(const uint8_t *codes, uint32_t bits)
{
    return vqkv__join16_x512(vqkv__kivi_codes8_x86(codes, bits),
                             vqkv__kivi_codes8_x86(codes + bits, bits));
}

/* One (code width, dtype) case of a pass. */
#define VQKV__KIVI_CASE(NAME, BITS, DTYPE)                                                         \
    case (BITS) << 4 | (DTYPE): NAME(ps, tile, BITS, DTYPE); break;

/* ROW: one row of D (a multiple of LANES) codes starting on a byte, into
 * worker memory LANES values a step: vqkv__kivi_decode's q * step + min
 * (multiply, then add), with ranges per channel (keys) or per group of
 * `group` channels, a multiple of LANES (values); inlined with bits a
 * constant. ROWS: a pass's rows in address order, a value row's ranges
 * converted as the scalar path converts them. DISPATCH: the pass with one
 * loop per code width and dtype, so neither is tested per value or per
 * row. For AVX2 (8 lanes) and AVX-512 (16). */
#define VQKV__KIVI_ROWS(ROW, ROWS, DISPATCH, TARGET, W, LANES, CODES, STORE)                       \
    TARGET static inline __attribute__((always_inline)) void ROW(                                  \
        const uint8_t *codes, uint32_t bits, uint32_t D, const float *min, const float *step,      \
        bool per_channel, uint32_t group, uint8_t *out, vqkv_dtype_t dtype)                        \
    {                                                                                              \
        uint32_t width = dtype == VQKV_DTYPE_F32 ? 4 : 2;                                          \
        for (uint32_t c0 = 0, g = 0; c0 < D; c0 += group, g++) {                                   \
            __m##W s = _mm##W##_set1_ps(step[g]), m = _mm##W##_set1_ps(min[g]);                    \
            for (uint32_t c = c0; c < c0 + group;                                                  \
                 c += (LANES), codes += bits * (LANES) / 8, out += (LANES)*width) {                \
                if (per_channel) {                                                                 \
                    s = _mm##W##_loadu_ps(step + c);                                               \
                    m = _mm##W##_loadu_ps(min + c);                                                \
                }                                                                                  \
                __m##W q = CODES(codes, bits);                                                     \
                STORE(dtype, _mm##W##_add_ps(_mm##W##_mul_ps(q, s), m), out);                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    TARGET static inline __attribute__((always_inline)) void ROWS(                                 \
        const vqkv__kivi_pass_t *ps, const vqkv__tile_t *tile, uint32_t bits, vqkv_dtype_t dtype)  \
    {                                                                                              \
        uint32_t D = ps->D;                                                                        \
        float vmin[VQKV_MAX_HEAD_DIM], vstep[VQKV_MAX_HEAD_DIM];                                   \
        for (uint32_t t = 0; t < ps->tokens; t++)                                                  \
            for (uint32_t h = ps->h0; h < ps->h1; h++) {                                           \
                uint64_t base = ((uint64_t)t * ps->H + h) * D;                                     \
                uint8_t *out = tile->base + t * tile->token_stride + h * tile->head_stride;        \
                const uint8_t *codes = ps->codes + base * bits / 8;                                \
                if (ps->kv == 0) {                                                                 \
                    size_t at = (size_t)(h - ps->h0) * D;                                          \
                    ROW(codes, bits, D, ps->min + at, ps->step + at, true, D, out, dtype);         \
                    continue;                                                                      \
                }                                                                                  \
                vqkv__kivi_value_ranges(ps, base, vmin, vstep);                                    \
                ROW(codes, bits, D, vmin, vstep, false, ps->group, out, dtype);                    \
            }                                                                                      \
    }                                                                                              \
    TARGET static void DISPATCH(const vqkv__kivi_pass_t *ps, const vqkv__tile_t *tile)             \
    {                                                                                              \
        switch (ps->bits << 4 | tile->dtype) {                                                     \
            VQKV__KIVI_CASE(ROWS, 2, VQKV_DTYPE_F16)                                               \
            VQKV__KIVI_CASE(ROWS, 2, VQKV_DTYPE_BF16)                                              \
            VQKV__KIVI_CASE(ROWS, 2, VQKV_DTYPE_F32)                                               \
            VQKV__KIVI_CASE(ROWS, 4, VQKV_DTYPE_F16)                                               \
            VQKV__KIVI_CASE(ROWS, 4, VQKV_DTYPE_BF16)                                              \
            VQKV__KIVI_CASE(ROWS, 4, VQKV_DTYPE_F32)                                               \
        }                                                                                          \
    }

VQKV__KIVI_ROWS(vqkv__kivi_row_x86, vqkv__kivi_rows_x86, vqkv__kivi_pass_x86, VQKV__X86, 256, 8,
                vqkv__kivi_codes8_x86, vqkv__store8_x86)
VQKV__KIVI_ROWS(vqkv__kivi_row_x512, vqkv__kivi_rows_x512, vqkv__kivi_pass_x512, VQKV__X512, 512,
                16, vqkv__kivi_codes16_x512, vqkv__store16_x512)

#endif

/* The pass for this CPU and part: a vector one for rows of whole bytes and
 * value groups of whole registers, else the reference. */
static vqkv__kivi_pass_fn vqkv__kivi_pass_pick(uint32_t D, int kv, uint32_t group)
{
#if defined(__x86_64__)
    if (vqkv__simd_enabled()) {
        if (vqkv__simd_avx512() && D % 16 == 0 && (kv == 0 || group % 16 == 0))
            return vqkv__kivi_pass_x512;
        if (D % 8 == 0 && (kv == 0 || group % 8 == 0))
            return vqkv__kivi_pass_x86;
    }
#endif
    (void)D, (void)kv, (void)group;
    return vqkv__kivi_pass_scalar;
}

/* Floats of key ranges a decode converts at once: 8 heads of 128. */
#define VQKV__KIVI_TILE 1024

static void vqkv__kivi_decode(const vqkv_codec_t *codec, uint32_t layer, int kv, const uint8_t *in,
                              const vqkv__tile_t *tile, const vqkv__ahead_t *ahead)
{
    (void)layer, (void)ahead;
    const vqkv_layout_t *l = &codec->layout;
    const vqkv__kivi_t *k = codec->state;
    size_t groups = vqkv__kivi_groups(codec, kv);
    uint32_t D = l->head_dim, H = l->num_kv_heads;
    /* keys: the per-channel ranges of a tile of heads */
    float min[VQKV__KIVI_TILE], step[VQKV__KIVI_TILE];
    uint32_t tile_heads = D <= VQKV__KIVI_TILE / H ? H : VQKV__KIVI_TILE / D;
    vqkv__kivi_pass_fn pass = vqkv__kivi_pass_pick(D, kv, k->group);
    vqkv__kivi_pass_t ps = {.codes = in + 4 * groups,
                            .mins = in,
                            .steps = in + 2 * groups,
                            .min = min,
                            .step = step,
                            .bits = k->bits,
                            .D = D,
                            .H = H,
                            .group = k->group,
                            .tokens = l->block_tokens,
                            .kv = kv};

    /* Tokens outer and heads inner within a tile of heads, so worker memory
     * is written in address order (a head at a time over the tokens wrote
     * 256 bytes every 2 KiB and decoded at half the speed: bench/RESULTS.md);
     * a key head's per-channel ranges are converted once a tile for all its
     * tokens, a value row's groups are its own. */
    for (ps.h0 = 0; ps.h0 < H; ps.h0 = ps.h1) {
        ps.h1 = ps.h0 + tile_heads < H ? ps.h0 + tile_heads : H;
        if (kv == 0) {
            size_t n = (size_t)(ps.h1 - ps.h0) * D;
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, ps.mins + 2 * (size_t)ps.h0 * D, n, min);
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, ps.steps + 2 * (size_t)ps.h0 * D, n, step);
        }
        pass(&ps, tile);
    }
}

static int vqkv__kivi_kplan(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books)
{
    (void)books;
    const vqkv__kivi_t *k = codec->state;
    plan->kind = VQKV_KIND_KIVI;
    plan->bits = k->bits;
    plan->group = k->group;
    return VQKV_OK;
}

static void vqkv__kivi_free(void *state)
{
    free(state);
}

const vqkv__codec_ops_t vqkv__kivi2_ops = {
    .name = "kivi2",
    .init = vqkv__kivi2_init,
    .free_state = vqkv__kivi_free,
    .encode_part = vqkv__kivi_encode,
    .decode_part = vqkv__kivi_decode,
    .kplan = vqkv__kivi_kplan,
};

const vqkv__codec_ops_t vqkv__kivi4_ops = {
    .name = "kivi4",
    .init = vqkv__kivi4_init,
    .free_state = vqkv__kivi_free,
    .encode_part = vqkv__kivi_encode,
    .decode_part = vqkv__kivi_decode,
    .kplan = vqkv__kivi_kplan,
};
