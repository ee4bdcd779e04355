/* numeric_x86.h -- numeric.h's float-to-16-bit conversions on eight values
 * in an AVX2 register (sixteen in an AVX-512 one, as two halves unless
 * f16 without NaN), for the row converters of numeric_x86.c and for
 * decoders that convert what they compute straight into worker memory
 * instead of through a row of floats.
 *
 * Bit for bit numeric.h's results (numeric_x86.c's header says how): F16C
 * rounds as numeric.h does but keeps NaN payloads where numeric.h makes
 * every NaN canonical, so lanes holding NaN are patched; a register with no
 * NaN, the usual case, skips the patch after one compare.
 */
#ifndef VQKV_NUMERIC_X86_H
#define VQKV_NUMERIC_X86_H

#if defined(__x86_64__)
#include "vqkv_codec.h"

#include <immintrin.h>
#include <stdint.h>

#define VQKV__X86 __attribute__((target("avx2,f16c")))

/* The 16-bit halves of eight 32-bit lanes, in order (values fit 16 bits). */
VQKV__X86 static inline __m128i vqkv__narrow(__m256i x)
{
    return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

VQKV__X86 static inline __m128i vqkv__f16x8_from_f32(__m256 x)
{
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) == 0)
        return h;
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    __m256i u = _mm256_castps_si256(x);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), _mm256_set1_epi32(0x7f800000));
    __m256i canon = _mm256_or_si256(_mm256_srli_epi32(_mm256_andnot_si256(abs_mask, u), 16),
                                    _mm256_set1_epi32(0x7e00));
    return _mm_blendv_epi8(
        h, vqkv__narrow(canon),
        _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1)));
}

VQKV__X86 static inline __m128i vqkv__bf16x8_from_f32(__m256 x)
{
    __m256i u = _mm256_castps_si256(x);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rne = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return vqkv__narrow(_mm256_blendv_epi8(rne, quiet, nan));
}

/* Eight values to dst in dtype, as vqkv_dtype_from_f32 writes them. */
VQKV__X86 static inline void vqkv__store8_x86(vqkv_dtype_t dtype, __m256 x, uint8_t *dst)
{
    switch (dtype) {
    case VQKV_DTYPE_F16: _mm_storeu_si128((__m128i *)dst, vqkv__f16x8_from_f32(x)); break;
    case VQKV_DTYPE_BF16: _mm_storeu_si128((__m128i *)dst, vqkv__bf16x8_from_f32(x)); break;
    case VQKV_DTYPE_F32: _mm256_storeu_ps((float *)dst, x); break;
    }
}

#define VQKV__X512 __attribute__((target("avx2,f16c,avx512f")))

/* One register of sixteen from two of eight, lo in lanes 0-7. */
VQKV__X512 static inline __m512 vqkv__join16_x512(__m256 lo, __m256 hi)
{
    return _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

/* Sixteen values to dst in dtype, as vqkv_dtype_from_f32 writes them: f16
 * in one conversion unless a lane holds NaN, the rest as two halves. */
VQKV__X512 static inline void vqkv__store16_x512(vqkv_dtype_t dtype, __m512 x, uint8_t *dst)
{
    if (dtype == VQKV_DTYPE_F32) {
        _mm512_storeu_ps((float *)dst, x);
        return;
    }
    if (dtype == VQKV_DTYPE_F16 && _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) == 0) {
        _mm256_storeu_si256((__m256i *)dst,
                            _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
    }
    vqkv__store8_x86(dtype, _mm512_castps512_ps256(x), dst);
    vqkv__store8_x86(dtype, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)),
                     dst + 16);
}
#endif

#endif
