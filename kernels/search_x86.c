/* search_x86.c -- the nearest-codeword search of kmeans.h with AVX2, for
 * the x86-64 CPUs that have it (vqkv__simd_enabled): k-means assignment in
 * codebook training, and every VQ encode.
 *
 * Bit for bit vqkv__nearest_scalar's answer. Each codeword's distance is
 * built exactly as the scalar loop builds it, ||c||^2 then + (-2 x[j]) *
 * c[j] for j = 0 .. d-1, each product and sum rounded on its own (no fused
 * multiply-add): eight codewords to a register change which codewords
 * share an instruction, never the operations on one of them. The least
 * distance is a min over lanes written as the scalar comparison (NaN is
 * never the least), and the answer is the first codeword at it, as the
 * scalar scan takes. Blocks of 64 codewords keep eight accumulators in
 * registers across the d steps, where the scalar loop reads and writes
 * its distances in memory at each step, and the first codeword at the
 * least is found by comparing registers, not by a scan: that, and eight
 * lanes instead of the compiler's four, is the gain. Codebooks whose size is not a multiple
 * of 8 take the scalar path.
 */
#include "codec_internal.h"
#include "kmeans.h"

#include <float.h>

#if defined(__x86_64__)
#include <immintrin.h>

#define VQKV__AVX2 __attribute__((target("avx2")))
/* One attribute with both: clang keeps only one of two stacked targets. */
#define VQKV__AVX512 __attribute__((target("avx2,avx512f")))

/* Per register width, the two steps that differ in form: the least lane,
 * and the lanes equal to a value as bits. */
VQKV__AVX2 static inline float vqkv__least256(__m256 v)
{
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

VQKV__AVX2 static inline unsigned vqkv__hits256(__m256 v, __m256 at)
{
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, at, _CMP_EQ_OQ));
}

VQKV__AVX512 static inline float vqkv__least512(__m512 v)
{
    return _mm512_reduce_min_ps(v);
}

VQKV__AVX512 static inline unsigned vqkv__hits512(__m512 v, __m512 at)
{
    return (unsigned)_mm512_cmp_ps_mask(v, at, _CMP_EQ_OQ);
}

/* Codewords [c0, c0 + LANES * REGS) against the best so far, in registers
 * of BITS bits: their distances built in registers, the least of them, and
 * when it beats best_dist the first codeword at it. `d < least ? d :
 * least` is _mm*_min_ps(d, least), which returns its second operand when
 * either is NaN or both are equal, so NaN is never the least. REGS is a
 * constant at each use, so the accumulators stay in registers. */
#define VQKV__SEARCH_BLOCK(BITS, LANES, REGS)                                                      \
    do {                                                                                           \
        __m##BITS acc[REGS];                                                                       \
        for (uint32_t r = 0; r < (REGS); r++)                                                      \
            acc[r] = _mm##BITS##_loadu_ps(norms2 + c0 + (LANES)*r);                                \
        for (uint32_t j = 0; j < d; j++) {                                                         \
            __m##BITS mj = _mm##BITS##_set1_ps(m[j]);                                              \
            const float *w = wt + (size_t)j * k + c0;                                              \
            for (uint32_t r = 0; r < (REGS); r++)                                                  \
                acc[r] = _mm##BITS##_add_ps(                                                       \
                    acc[r], _mm##BITS##_mul_ps(mj, _mm##BITS##_loadu_ps(w + (LANES)*r)));          \
        }                                                                                          \
        __m##BITS least = _mm##BITS##_set1_ps(best_dist);                                          \
        for (uint32_t r = 0; r < (REGS); r++)                                                      \
            least = _mm##BITS##_min_ps(acc[r], least);                                             \
        float block_least = vqkv__least##BITS(least);                                              \
        if (block_least < best_dist) {                                                             \
            __m##BITS at = _mm##BITS##_set1_ps(block_least);                                       \
            for (uint32_t r = 0; r < (REGS); r++) {                                                \
                unsigned hit = vqkv__hits##BITS(acc[r], at);                                       \
                if (hit != 0) {                                                                    \
                    best = c0 + (LANES)*r + (uint32_t)__builtin_ctz(hit);                          \
                    break;                                                                         \
                }                                                                                  \
            }                                                                                      \
            best_dist = block_least;                                                               \
        }                                                                                          \
    } while (0)

/* The search with eight registers of BITS bits a block; the codewords past
 * the last whole block go eight at a time. */
#define VQKV__NEAREST(NAME, TARGET, BITS, LANES)                                                   \
    TARGET uint32_t NAME(const float *x, const float *search, uint32_t d, uint32_t k)              \
    {                                                                                              \
        const float *norms2 = search, *wt = search + k;                                            \
        float m[VQKV_MAX_HEAD_DIM], best_dist = FLT_MAX;                                           \
        uint32_t best = 0, c0 = 0;                                                                 \
        for (uint32_t j = 0; j < d; j++)                                                           \
            m[j] = -2.0f * x[j];                                                                   \
        for (; c0 + 8 * (LANES) <= k; c0 += 8 * (LANES))                                           \
            VQKV__SEARCH_BLOCK(BITS, LANES, 8);                                                    \
        for (; c0 < k; c0 += 8)                                                                    \
            VQKV__SEARCH_BLOCK(256, 8, 1);                                                         \
        return best;                                                                               \
    }

VQKV__NEAREST(vqkv__nearest_x86, VQKV__AVX2, 256, 8)
VQKV__NEAREST(vqkv__nearest_x512, VQKV__AVX512, 512, 16)

VQKV__AVX2 void vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c,
                                      float *mind, bool first)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 s = _mm256_setzero_ps();
        for (uint32_t j = 0; j < d; j++) {
            __m256 diff =
                _mm256_sub_ps(_mm256_loadu_ps(xt + (size_t)j * n + i), _mm256_set1_ps(c[j]));
            s = _mm256_add_ps(s, _mm256_mul_ps(diff, diff));
        }
        /* s < mind ? s : mind, as the scalar comparison. */
        __m256 m = first ? s : _mm256_min_ps(s, _mm256_loadu_ps(mind + i));
        _mm256_storeu_ps(mind + i, m);
    }
    vqkv__mind_update_scalar(xt, n, i, d, c, mind, first); /* the last n % 8 */
}

bool vqkv__nearest_simd(uint32_t d, uint32_t k)
{
    return k % 8 == 0 && d <= VQKV_MAX_HEAD_DIM && vqkv__simd_enabled();
}

#else

uint32_t vqkv__nearest_x512(const float *x, const float *search, uint32_t d, uint32_t k)
{
    return vqkv__nearest_scalar(x, search, d, k);
}

void vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                           bool first)
{
    vqkv__mind_update_scalar(xt, n, 0, d, c, mind, first);
}

uint32_t vqkv__nearest_x86(const float *x, const float *search, uint32_t d, uint32_t k)
{
    return vqkv__nearest_scalar(x, search, d, k);
}

bool vqkv__nearest_simd(uint32_t d, uint32_t k)
{
    (void)d, (void)k;
    return false;
}

#endif
