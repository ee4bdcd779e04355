/* numeric.h -- the number formats vqkv stores and reads: IEEE fp16, bf16 and
 * OCP fp8 e4m3, converted to and from float with round-to-nearest-even.
 *
 * Written with integer bit manipulation (no _Float16, no F16C), so every
 * compiler and the CUDA kernels produce the same bits for the same input;
 * the CUDA side uses the same functions through VQKV_HD. Float arithmetic in
 * the subnormal paths relies on IEEE round-to-nearest, so nothing here may be
 * built with -ffast-math.
 */
#ifndef VQKV_NUMERIC_H
#define VQKV_NUMERIC_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define VQKV_HD __host__ __device__ __forceinline__
#else
#define VQKV_HD static inline
#endif

VQKV_HD float vqkv_bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

VQKV_HD uint32_t vqkv_f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* A range's running least and greatest value, as KIVI takes them: a NaN x
 * leaves the range as it is and a NaN bound takes x (fminf's and fmaxf's
 * rule); between +0 and -0, the later x (x86's minps and maxps do so; C
 * libraries and GPUs differ there, so the rule is written out for every
 * path to share). */
VQKV_HD float vqkv_range_lo(float lo, float x)
{
    return x != x ? lo : (lo < x ? lo : x);
}

VQKV_HD float vqkv_range_hi(float hi, float x)
{
    return x != x ? hi : (hi > x ? hi : x);
}

/* Largest finite fp16, used to saturate scales and norms. */
#define VQKV_F16_MAX 65504.0f

VQKV_HD uint16_t vqkv_f32_to_f16(float f)
{
    const uint32_t f32_inf = 255u << 23;
    const uint32_t f16_overflow = (127u + 16u) << 23;
    const float denorm_magic = vqkv_bits_to_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
    uint32_t u = vqkv_f32_to_bits(f);
    uint32_t sign = u & 0x80000000u;
    uint16_t h;

    u ^= sign;
    if (u >= f16_overflow) {
        h = (u > f32_inf) ? 0x7e00 : 0x7c00;
    } else if (u < (113u << 23)) {
        /* Subnormal or zero: let the FPU round by aligning to 2^-24 units. */
        float t = vqkv_bits_to_f32(u) + denorm_magic;
        h = (uint16_t)(vqkv_f32_to_bits(t) - vqkv_f32_to_bits(denorm_magic));
    } else {
        uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd;
        h = (uint16_t)(u >> 13);
    }
    return (uint16_t)(h | (sign >> 16));
}

VQKV_HD float vqkv_f16_to_f32(uint16_t h)
{
    const float magic = vqkv_bits_to_f32(113u << 23);
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o;

    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;
    } else if (exp == 0) {
        o += 1u << 23;
        o = vqkv_f32_to_bits(vqkv_bits_to_f32(o) - magic);
    }
    o |= (uint32_t)(h & 0x8000u) << 16;
    return vqkv_bits_to_f32(o);
}

VQKV_HD uint16_t vqkv_f32_to_bf16(float f)
{
    uint32_t u = vqkv_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

VQKV_HD float vqkv_bf16_to_f32(uint16_t b)
{
    return vqkv_bits_to_f32((uint32_t)b << 16);
}

/* e4m3 "FN": bias 7, no infinities, 0x7f/0xff are NaN, largest finite 448. */
#define VQKV_E4M3_MAX 448.0f

VQKV_HD uint8_t vqkv_f32_to_e4m3(float f)
{
    uint32_t u = vqkv_f32_to_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7fffffffu;

    if (a > 0x7f800000u)
        return (uint8_t)(sign | 0x7f);
    if (a < (121u << 23)) {
        /* Below 2^-6: subnormal, in units of 2^-9. Adding 2^14 (=0.5*2^-9
         * scaled) lets the FPU round to nearest even. */
        const float magic = vqkv_bits_to_f32((127u - 9u + 23u) << 23);
        float t = vqkv_bits_to_f32(a) + magic;
        return (uint8_t)(sign | (uint8_t)(vqkv_f32_to_bits(t) - vqkv_f32_to_bits(magic)));
    }
    uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
    int32_t exp = (int32_t)(r >> 23) - 127;
    uint32_t mant = (r >> 20) & 7u;
    if (exp > 8 || (exp == 8 && mant == 7))
        return (uint8_t)(sign | 0x7e); /* saturate to 448 */
    return (uint8_t)(sign | (uint8_t)((uint32_t)(exp + 7) << 3) | (uint8_t)mant);
}

VQKV_HD float vqkv_e4m3_to_f32(uint8_t b)
{
    uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t exp = (b >> 3) & 15u;
    uint32_t mant = b & 7u;

    if ((b & 0x7fu) == 0x7fu)
        return vqkv_bits_to_f32(0x7fc00000u | sign);
    if (exp == 0) /* mant * 2^-9, exact in float */
        return vqkv_bits_to_f32(sign | vqkv_f32_to_bits((float)mant * (1.0f / 512.0f)));
    return vqkv_bits_to_f32(sign | ((exp - 7u + 127u) << 23) | (mant << 20));
}

#endif
