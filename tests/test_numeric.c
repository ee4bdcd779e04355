/* test_numeric.c -- fp16, bf16 and e4m3 conversions (kernels/numeric.h),
 * and the code bit streams (kernels/bitpack.h).
 *
 * Rounding is checked exhaustively rather than on samples: for every pair of
 * adjacent representable values, the float exactly halfway between them
 * (always exact in float, these formats having far fewer mantissa bits) must
 * round to the one with an even mantissa, and the floats one ulp either side
 * of it to the nearer one. That covers every rounding boundary, subnormals
 * and the carry into the next binade included.
 */
#include "bitpack.h"
#include "test_util.h"

#include <float.h>

static uint32_t f32_bits(float f)
{
    return vqkv_f32_to_bits(f);
}

/* ---- fp16 ------------------------------------------------------------- */

static int f16_is_nan(uint16_t h)
{
    return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0;
}

static void test_f16_round_trip_all_patterns(void **state)
{
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        float f = vqkv_f16_to_f32((uint16_t)h);
        uint16_t back = vqkv_f32_to_f16(f);
        if (f16_is_nan((uint16_t)h)) {
            /* NaN payloads are not kept: every NaN comes back as the
             * canonical quiet NaN, with its sign. */
            assert_true(isnan(f));
            assert_int_equal(back, (h & 0x8000u) | 0x7e00u);
        } else {
            assert_int_equal(back, h);
        }
    }
}

static void test_f16_to_f32_known_values(void **state)
{
    (void)state;
    assert_true(f32_bits(vqkv_f16_to_f32(0x0000)) == f32_bits(0.0f));
    assert_true(f32_bits(vqkv_f16_to_f32(0x8000)) == f32_bits(-0.0f));
    assert_true(vqkv_f16_to_f32(0x3c00) == 1.0f);
    assert_true(vqkv_f16_to_f32(0xc000) == -2.0f);
    assert_true(vqkv_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(vqkv_f16_to_f32(0x0400) == ldexpf(1.0f, -14)); /* smallest normal */
    assert_true(vqkv_f16_to_f32(0x0001) == ldexpf(1.0f, -24)); /* smallest subnormal */
    assert_true(vqkv_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24));
    assert_true(isinf(vqkv_f16_to_f32(0x7c00)) && vqkv_f16_to_f32(0x7c00) > 0.0f);
    assert_true(isinf(vqkv_f16_to_f32(0xfc00)) && vqkv_f16_to_f32(0xfc00) < 0.0f);
    assert_true(isnan(vqkv_f16_to_f32(0x7e00)));
    assert_true(isnan(vqkv_f16_to_f32(0x7c01))); /* signalling pattern still NaN */
}

/* Checks rounding at the boundary between adjacent fp16 values lo_bits and
 * lo_bits + 1 of the same sign; hi is the float value of the upper one. */
static void check_f16_boundary(uint16_t lo_bits, float lo, float hi)
{
    uint16_t hi_bits = (uint16_t)(lo_bits + 1);
    float mid = (lo + hi) / 2.0f;
    assert_true((double)mid == ((double)lo + (double)hi) / 2.0); /* exact */
    uint16_t even = (lo_bits & 1u) ? hi_bits : lo_bits;
    assert_int_equal(vqkv_f32_to_f16(mid), even);
    assert_int_equal(vqkv_f32_to_f16(nextafterf(mid, lo)), lo_bits);
    assert_int_equal(vqkv_f32_to_f16(nextafterf(mid, hi)), hi_bits);
    assert_int_equal(vqkv_f32_to_f16(lo), lo_bits);
}

static void test_f16_rounding_every_boundary(void **state)
{
    (void)state;
    for (int negative = 0; negative < 2; negative++) {
        uint16_t sign = negative ? 0x8000u : 0;
        for (uint32_t mag = 0; mag < 0x7bffu; mag++) {
            uint16_t lo_bits = (uint16_t)(sign | mag);
            check_f16_boundary(lo_bits, vqkv_f16_to_f32(lo_bits),
                               vqkv_f16_to_f32((uint16_t)(lo_bits + 1)));
        }
        /* Above the largest finite value the next step would be 2^16: the
         * halfway point 65520 and everything beyond it overflow to inf,
         * 65519.99 still rounds down to 65504. */
        float max = sign ? -65504.0f : 65504.0f, next = sign ? -65536.0f : 65536.0f;
        check_f16_boundary((uint16_t)(sign | 0x7bffu), max, next);
    }
}

static void test_f16_overflow_and_specials(void **state)
{
    (void)state;
    assert_int_equal(vqkv_f32_to_f16(65520.0f), 0x7c00);
    assert_int_equal(vqkv_f32_to_f16(1e10f), 0x7c00);
    assert_int_equal(vqkv_f32_to_f16(-1e10f), 0xfc00);
    assert_int_equal(vqkv_f32_to_f16(FLT_MAX), 0x7c00);
    assert_int_equal(vqkv_f32_to_f16(INFINITY), 0x7c00);
    assert_int_equal(vqkv_f32_to_f16(-INFINITY), 0xfc00);
    assert_int_equal(vqkv_f32_to_f16(NAN), 0x7e00);
    assert_int_equal(vqkv_f32_to_f16(-NAN), 0xfe00);
    /* A NaN whose payload sits only in bits fp16 drops stays a NaN. */
    assert_int_equal(vqkv_f32_to_f16(vqkv_bits_to_f32(0x7f800001u)), 0x7e00);
    assert_int_equal(vqkv_f32_to_f16(-0.0f), 0x8000);
    /* Below half the smallest subnormal: zero, keeping the sign. */
    assert_int_equal(vqkv_f32_to_f16(ldexpf(1.0f, -26)), 0x0000);
    assert_int_equal(vqkv_f32_to_f16(-ldexpf(1.0f, -26)), 0x8000);
    assert_int_equal(vqkv_f32_to_f16(FLT_MIN), 0x0000);
    assert_int_equal(vqkv_f32_to_f16(FLT_TRUE_MIN), 0x0000);
    /* Exactly half the smallest subnormal ties to even (zero); a hair
     * above it rounds up. */
    assert_int_equal(vqkv_f32_to_f16(ldexpf(1.0f, -25)), 0x0000);
    assert_int_equal(vqkv_f32_to_f16(nextafterf(ldexpf(1.0f, -25), 1.0f)), 0x0001);
    /* Largest subnormal rounding up into the smallest normal. */
    assert_int_equal(vqkv_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);
}

/* ---- bf16 ------------------------------------------------------------- */

static void test_bf16_round_trip_all_patterns(void **state)
{
    (void)state;
    for (uint32_t b = 0; b <= 0xffffu; b++) {
        float f = vqkv_bf16_to_f32((uint16_t)b);
        assert_int_equal(f32_bits(f), b << 16); /* bf16 is the top half of f32 */
        uint16_t back = vqkv_f32_to_bf16(f);
        if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0) {
            /* NaN: quieted (quiet bit set), payload and sign kept. */
            assert_int_equal(back, b | 0x0040u);
        } else {
            assert_int_equal(back, b);
        }
    }
}

static void test_bf16_rounding_every_boundary(void **state)
{
    (void)state;
    /* Every finite bf16 except the largest of each sign: the halfway point
     * to its neighbour is the f32 with low half 0x8000. */
    for (uint32_t b = 0; b <= 0xffffu; b++) {
        if ((b & 0x7f80u) == 0x7f80u || (b & 0x7fffu) == 0x7f7fu)
            continue;
        uint32_t base = b << 16;
        uint16_t even = (b & 1u) ? (uint16_t)(b + 1) : (uint16_t)b;
        assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(base | 0x8000u)), even);
        assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(base | 0x7fffu)), b);
        assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(base | 0x8001u)), b + 1);
    }
    /* Past the largest finite bf16 (odd mantissa) the tie goes to inf, as
     * IEEE rounding does; below it stays finite. */
    assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(0x7f7f8000u)), 0x7f80);
    assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(0x7f7f7fffu)), 0x7f7f);
    assert_int_equal(vqkv_f32_to_bf16(FLT_MAX), 0x7f80);
    assert_int_equal(vqkv_f32_to_bf16(-FLT_MAX), 0xff80);
    assert_int_equal(vqkv_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(vqkv_f32_to_bf16(-0.0f), 0x8000);
    /* A NaN whose payload sits only in the dropped half must not round
     * to inf (0x7f80) or carry into the sign. */
    assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(0x7f800001u)), 0x7fc0);
    assert_int_equal(vqkv_f32_to_bf16(vqkv_bits_to_f32(0xffffffffu)), 0xffff);
}

/* ---- e4m3 ------------------------------------------------------------- */

static void test_e4m3_round_trip_all_patterns(void **state)
{
    (void)state;
    for (uint32_t b = 0; b <= 0xffu; b++) {
        float f = vqkv_e4m3_to_f32((uint8_t)b);
        if ((b & 0x7fu) == 0x7fu) {
            assert_true(isnan(f));
        } else {
            assert_true(isfinite(f));
            assert_true(fabsf(f) <= VQKV_E4M3_MAX);
            assert_true((signbit(f) != 0) == ((b & 0x80u) != 0));
        }
        /* Every pattern, NaN included, comes back bit for bit. */
        assert_int_equal(vqkv_f32_to_e4m3(f), b);
    }
}

static void test_e4m3_known_values(void **state)
{
    (void)state;
    assert_true(vqkv_e4m3_to_f32(0x00) == 0.0f);
    assert_true(vqkv_e4m3_to_f32(0x01) == ldexpf(1.0f, -9)); /* smallest subnormal */
    assert_true(vqkv_e4m3_to_f32(0x07) == ldexpf(7.0f, -9)); /* largest subnormal */
    assert_true(vqkv_e4m3_to_f32(0x08) == ldexpf(1.0f, -6)); /* smallest normal */
    assert_true(vqkv_e4m3_to_f32(0x38) == 1.0f);
    assert_true(vqkv_e4m3_to_f32(0x7e) == 448.0f);
    assert_true(vqkv_e4m3_to_f32(0xfe) == -448.0f);
    assert_true(vqkv_e4m3_to_f32(0x78) == 256.0f); /* exponent 15 is finite in e4m3 "FN" */
}

/* Values of e4m3 patterns are increasing in the magnitude bits, so adjacent
 * magnitudes are adjacent values. */
static void test_e4m3_rounding_every_boundary(void **state)
{
    (void)state;
    for (int negative = 0; negative < 2; negative++) {
        uint8_t sign = negative ? 0x80u : 0;
        for (uint8_t mag = 0; mag < 0x7eu; mag++) {
            uint8_t lo_bits = (uint8_t)(sign | mag), hi_bits = (uint8_t)(lo_bits + 1);
            float lo = vqkv_e4m3_to_f32(lo_bits), hi = vqkv_e4m3_to_f32(hi_bits);
            float mid = (lo + hi) / 2.0f;
            uint8_t even = (lo_bits & 1u) ? hi_bits : lo_bits;
            assert_int_equal(vqkv_f32_to_e4m3(lo), lo_bits);
            assert_int_equal(vqkv_f32_to_e4m3(mid), even);
            assert_int_equal(vqkv_f32_to_e4m3(nextafterf(mid, lo)), lo_bits);
            assert_int_equal(vqkv_f32_to_e4m3(nextafterf(mid, hi)), hi_bits);
        }
    }
}

static void test_e4m3_saturation_and_specials(void **state)
{
    (void)state;
    /* No infinities in e4m3: everything past 448 saturates to it. */
    assert_int_equal(vqkv_f32_to_e4m3(448.0f), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(464.0f), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(500.0f), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(1e6f), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(FLT_MAX), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(INFINITY), 0x7e);
    assert_int_equal(vqkv_f32_to_e4m3(-1e6f), 0xfe);
    assert_int_equal(vqkv_f32_to_e4m3(-INFINITY), 0xfe);
    assert_int_equal(vqkv_f32_to_e4m3(NAN), 0x7f);
    assert_int_equal(vqkv_f32_to_e4m3(-NAN), 0xff);
    assert_int_equal(vqkv_f32_to_e4m3(-0.0f), 0x80);
    /* Half the smallest subnormal ties to zero; just above rounds up. */
    assert_int_equal(vqkv_f32_to_e4m3(ldexpf(1.0f, -10)), 0x00);
    assert_int_equal(vqkv_f32_to_e4m3(nextafterf(ldexpf(1.0f, -10), 1.0f)), 0x01);
    assert_int_equal(vqkv_f32_to_e4m3(ldexpf(1.0f, -20)), 0x00);
    assert_int_equal(vqkv_f32_to_e4m3(FLT_TRUE_MIN), 0x00);
    assert_int_equal(vqkv_f32_to_e4m3(-FLT_TRUE_MIN), 0x80);
}

/* The row conversions (vqkv_dtype_to_f32 / from_f32, vector instructions
 * where the CPU has them) against numeric.h one value at a time, bit for
 * bit: every f16 and bf16 pattern, and float patterns at and around every
 * f16 and bf16 rounding boundary, NaNs of every payload, subnormals, and 40
 * million random ones; rows of every length mod 8 and at odd addresses. */
static void check_rows(const float *x, size_t n)
{
    uint8_t *h = malloc(2 * n + 1), *b = malloc(2 * n + 1);
    float *back = malloc(n * sizeof *back);
    assert_non_null(h);
    assert_non_null(b);
    assert_non_null(back);
    vqkv_dtype_from_f32(VQKV_DTYPE_F16, x, n, h + 1);
    vqkv_dtype_from_f32(VQKV_DTYPE_BF16, x, n, b + 1);
    for (size_t i = 0; i < n; i++) {
        uint16_t got_h, got_b;
        memcpy(&got_h, h + 1 + 2 * i, 2);
        memcpy(&got_b, b + 1 + 2 * i, 2);
        if (got_h != vqkv_f32_to_f16(x[i]) || got_b != vqkv_f32_to_bf16(x[i]))
            fail_msg("float %08x: row f16 %04x bf16 %04x, numeric.h %04x %04x",
                     vqkv_f32_to_bits(x[i]), got_h, got_b, vqkv_f32_to_f16(x[i]),
                     vqkv_f32_to_bf16(x[i]));
    }
    vqkv_dtype_to_f32(VQKV_DTYPE_F16, h + 1, n, back);
    for (size_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, h + 1 + 2 * i, 2);
        assert_int_equal(vqkv_f32_to_bits(back[i]), vqkv_f32_to_bits(vqkv_f16_to_f32(v)));
    }
    vqkv_dtype_to_f32(VQKV_DTYPE_BF16, b + 1, n, back);
    for (size_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, b + 1 + 2 * i, 2);
        assert_int_equal(vqkv_f32_to_bits(back[i]), vqkv_f32_to_bits(vqkv_bf16_to_f32(v)));
    }
    free(h);
    free(b);
    free(back);
}

static void test_rows_match_numeric_h(void **state)
{
    (void)state;
    enum { N = 1 << 20 };
    float *x = malloc(N * sizeof *x);
    assert_non_null(x);
    /* Every 16-bit pattern as f16 and as bf16, so the way back sees them all. */
    for (uint32_t i = 0; i < 65536; i++) {
        x[2 * i] = vqkv_f16_to_f32((uint16_t)i);
        x[2 * i + 1] = vqkv_bf16_to_f32((uint16_t)i);
    }
    check_rows(x, 2 * 65536);
    /* Around every f16 value (rounding boundaries, subnormals, overflow)
     * and around every bf16 one: the value and its neighbours. */
    size_t n = 0;
    for (uint32_t i = 0; i < 65536; i++) {
        uint32_t f = vqkv_f32_to_bits(vqkv_f16_to_f32((uint16_t)i));
        uint32_t g = (uint32_t)i << 16;
        uint32_t near[] = {f - 1, f, f + 1, f + 0x1000 - 1, f + 0x1000, f + 0x1000 + 1,
                           g + 0x7fff, g + 0x8000, g + 0x8001};
        for (size_t k = 0; k < sizeof near / sizeof near[0]; k++) {
            x[n++] = vqkv_bits_to_f32(near[k]);
            if (n == N) {
                check_rows(x, n);
                n = 0;
            }
        }
    }
    check_rows(x, n);
    /* Random patterns, NaN payloads among them, in rows of every length. */
    uint64_t state_rng = 12345;
    for (int round = 0; round < 40; round++) {
        for (size_t i = 0; i < N; i++) {
            state_rng = state_rng * 6364136223846793005ull + 1442695040888963407ull;
            x[i] = vqkv_bits_to_f32((uint32_t)(state_rng >> 32));
        }
        check_rows(x, N - (size_t)round % 8);
    }
    free(x);
}

/* ---- bit streams -------------------------------------------------------- */

/* Codes of every width 1..16 put at every bit offset 0..15 of a zeroed
 * stream land bit by bit where bitpack.h says (bit k of the stream is bit
 * k % 8 of byte k / 8), only their low `width` bits, no bit outside them
 * set; vqkv__bits_get reads each back. Both have a one-byte fast path
 * (codes of 1, 2, 4 and 8 bits) and a general loop, so every width and
 * offset crosses both. */
static void test_bits_put_get_every_width_and_offset(void **state)
{
    (void)state;
    enum { CODES = 37, BYTES = (16 + CODES * 16) / 8 + 2 };
    uint64_t rng = 99;
    for (uint32_t width = 1; width <= 16; width++)
        for (uint32_t offset = 0; offset < 16; offset++) {
            uint8_t buf[BYTES] = {0};
            uint32_t value[CODES];
            for (uint32_t i = 0; i < CODES; i++) {
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                value[i] = (uint32_t)(rng >> 32); /* high bits set: put must mask them */
                vqkv__bits_put(buf, offset + (uint64_t)i * width, width, value[i]);
            }
            for (uint32_t k = 0; k < 8 * BYTES; k++) {
                uint32_t bit = (buf[k / 8] >> (k % 8)) & 1u, want = 0;
                if (k >= offset && k < offset + CODES * width)
                    want = (value[(k - offset) / width] >> ((k - offset) % width)) & 1u;
                assert_int_equal(bit, want);
            }
            for (uint32_t i = 0; i < CODES; i++)
                assert_int_equal(vqkv__bits_get(buf, offset + (uint64_t)i * width, width),
                                 value[i] & ((1u << width) - 1u));
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_round_trip_all_patterns),
        cmocka_unit_test(test_f16_to_f32_known_values),
        cmocka_unit_test(test_f16_rounding_every_boundary),
        cmocka_unit_test(test_f16_overflow_and_specials),
        cmocka_unit_test(test_bf16_round_trip_all_patterns),
        cmocka_unit_test(test_bf16_rounding_every_boundary),
        cmocka_unit_test(test_e4m3_round_trip_all_patterns),
        cmocka_unit_test(test_e4m3_known_values),
        cmocka_unit_test(test_e4m3_rounding_every_boundary),
        cmocka_unit_test(test_e4m3_saturation_and_specials),
        cmocka_unit_test(test_rows_match_numeric_h),
        cmocka_unit_test(test_bits_put_get_every_width_and_offset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
