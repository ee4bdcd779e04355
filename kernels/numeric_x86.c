/* numeric_x86.c -- numeric.h's fp16 and bf16 conversions over whole rows,
 * eight values at a time with F16C and AVX2, for the x86-64 CPUs that have
 * them (vqkv__simd_enabled says whether this one does and may).
 *
 * Bit for bit numeric.h's results, which the tests check exhaustively (every
 * f16 and bf16 pattern, and float patterns around every rounding boundary):
 * F16C rounds to nearest even as numeric.h does, subnormals included, but it
 * keeps NaN payloads where numeric.h makes every NaN canonical (0x7e00 with
 * its sign, 0x7fc0... for bf16) and quiets signalling ones on the way back,
 * so NaN lanes are replaced by numeric.h's answer with a compare and a
 * blend. Tails shorter than eight go through numeric.h itself.
 */
#include "numeric_x86.h"
#include "codec_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

VQKV__X86 static void vqkv__f32_to_f16_x86(const float *src, size_t n, uint8_t *dst)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + 2 * i), vqkv__f16x8_from_f32(_mm256_loadu_ps(src + i)));
    for (; i < n; i++) {
        uint16_t h = vqkv_f32_to_f16(src[i]);
        memcpy(dst + 2 * i, &h, sizeof h);
    }
}

VQKV__X86 static void vqkv__f16_to_f32_x86(const uint8_t *src, size_t n, float *dst)
{
    const __m256i exp_mask = _mm256_set1_epi32(0x7c00);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + 2 * i));
        __m256 x = _mm256_cvtph_ps(h);
        /* Inf and NaN as numeric.h builds them: the bits moved up, the
         * exponent rebiased, no quiet bit added. */
        __m256i w = _mm256_cvtepu16_epi32(h);
        __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(w, exp_mask), exp_mask);
        __m256i ours =
            _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7fff)), 13),
                             _mm256_set1_epi32(0x70000000));
        ours = _mm256_or_si256(
            ours, _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16));
        x = _mm256_blendv_ps(x, _mm256_castsi256_ps(ours), _mm256_castsi256_ps(special));
        _mm256_storeu_ps(dst + i, x);
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        dst[i] = vqkv_f16_to_f32(h);
    }
}

VQKV__X86 static void vqkv__f32_to_bf16_x86(const float *src, size_t n, uint8_t *dst)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + 2 * i), vqkv__bf16x8_from_f32(_mm256_loadu_ps(src + i)));
    for (; i < n; i++) {
        uint16_t h = vqkv_f32_to_bf16(src[i]);
        memcpy(dst + 2 * i, &h, sizeof h);
    }
}

VQKV__X86 static void vqkv__bf16_to_f32_x86(const uint8_t *src, size_t n, float *dst)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(w, 16));
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        dst[i] = vqkv_bf16_to_f32(h);
    }
}

/* 0: the scalar reference; 1: AVX2 and F16C; 2: AVX-512F as well; 3:
 * AVX-512 VNNI too. */
static int vqkv__simd;
static bool vqkv__fma; /* FMA too, at level 1 or 2 */
static pthread_once_t vqkv__simd_once = PTHREAD_ONCE_INIT;

/* The best the CPU has, unless VQKV_CPU_SIMD says "0" (numeric.h's
 * one-at-a-time code and the scalar search, the references, for tests and
 * comparisons), "avx2" (no AVX-512, to test and time that path on a CPU
 * that has both) or "avx512" (no VNNI: the float batch search). */
static void vqkv__simd_init(void)
{
    const char *env = getenv("VQKV_CPU_SIMD");
    unsigned eax, ebx, ecx, edx;
    /* F16C from CPUID leaf 1 (ECX bit 29): clang has no builtin name for
     * it; AVX2 and AVX-512F (with the OS saving their state) from the
     * builtin. */
    bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    __builtin_cpu_init();
    if (!f16c || !__builtin_cpu_supports("avx2") || (env != NULL && strcmp(env, "0") == 0))
        vqkv__simd = 0;
    else if (!__builtin_cpu_supports("avx512f") || (env != NULL && strcmp(env, "avx2") == 0))
        vqkv__simd = 1;
    else if (!__builtin_cpu_supports("avx512vnni") || (env != NULL && strcmp(env, "avx512") == 0))
        vqkv__simd = 2;
    else
        vqkv__simd = 3;
    vqkv__fma = vqkv__simd != 0 && __builtin_cpu_supports("fma");
}

bool vqkv__simd_enabled(void)
{
    pthread_once(&vqkv__simd_once, vqkv__simd_init);
    return vqkv__simd != 0;
}

bool vqkv__simd_avx512(void)
{
    pthread_once(&vqkv__simd_once, vqkv__simd_init);
    return vqkv__simd >= 2;
}

bool vqkv__simd_vnni(void)
{
    pthread_once(&vqkv__simd_once, vqkv__simd_init);
    return vqkv__simd == 3;
}

bool vqkv__simd_fma(void)
{
    pthread_once(&vqkv__simd_once, vqkv__simd_init);
    return vqkv__fma;
}

bool vqkv__rows_to_f32(vqkv_dtype_t dtype, const void *src, size_t n, float *dst)
{
    if (!vqkv__simd_enabled() || dtype == VQKV_DTYPE_F32)
        return false;
    if (dtype == VQKV_DTYPE_F16)
        vqkv__f16_to_f32_x86(src, n, dst);
    else
        vqkv__bf16_to_f32_x86(src, n, dst);
    return true;
}

bool vqkv__rows_from_f32(vqkv_dtype_t dtype, const float *src, size_t n, void *dst)
{
    if (!vqkv__simd_enabled() || dtype == VQKV_DTYPE_F32)
        return false;
    if (dtype == VQKV_DTYPE_F16)
        vqkv__f32_to_f16_x86(src, n, dst);
    else
        vqkv__f32_to_bf16_x86(src, n, dst);
    return true;
}

#else /* not x86-64: numeric.h's code everywhere */

bool vqkv__simd_enabled(void)
{
    return false;
}

bool vqkv__simd_avx512(void)
{
    return false;
}

bool vqkv__simd_vnni(void)
{
    return false;
}

bool vqkv__simd_fma(void)
{
    return false;
}

bool vqkv__rows_to_f32(vqkv_dtype_t dtype, const void *src, size_t n, float *dst)
{
    (void)dtype, (void)src, (void)n, (void)dst;
    return false;
}

bool vqkv__rows_from_f32(vqkv_dtype_t dtype, const float *src, size_t n, void *dst)
{
    (void)dtype, (void)src, (void)n, (void)dst;
    return false;
}

#endif
