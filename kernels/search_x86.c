/* search_x86.c -- the nearest-codeword search of kmeans.h with AVX2, for
 * the x86-64 CPUs that have it (vqkv__simd_enabled): k-means assignment in
 * codebook training, and every VQ encode. Two searches: the exact one for
 * one vector, below, and the batch search (further down), a fused
 * multiply-add pass over four vectors at once made exact by an error bound
 * (and the exact search on a near-tie), which is what the encoders and
 * training call.
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
#include <math.h>

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

/* ---- many vectors, one codebook: a fused pass made exact ------------------
 *
 * The reference distance of codeword c to x, with m_j = -2 x_j (exact) and
 * n_c the stored float ||c||^2, is D_c = n_c, then D_c += m_j * c_j for j
 * in order, d products and d sums each rounded. The batch search first
 * builds F_c the same way with a fused multiply-add, one rounding a step and
 * half the instructions, and bounds |F_c - D_c| by e for every c. The
 * reference's answer c* (the first codeword at the least D) then has
 *     F_c* <= D_c* + e <= D_f + e <= F_f + 2e,
 * f being the codeword of least F, and so has every c tied with c*: the
 * codewords with F_c <= F_f + 2e hold all of them. When there is one such
 * codeword it is the answer; when there are more, the vector goes through
 * the exact search above, whose answer is the reference's. In practice
 * one, as codewords within 2e (about 1e-6 of the distances' scale) of the
 * best are rare; twins, which would always tie, are marked out of the
 * search form (vqkv__search_mark_twins).
 *
 * The bound. In IEEE single precision, u = 2^-24, each operation's result is
 * (exact)(1 + t) + s with |t| <= u, |s| <= 2^-150 (s only where a product or
 * a fused result is subnormal; sums that underflow are exact), and with
 * gamma_n = n u / (1 - n u) the usual recursive-summation analysis gives,
 * for E_c = n_c + sum_j m_j c_j computed exactly and
 * M_c = n_c + sum_j |m_j c_j|:
 *     |D_c - E_c| <= gamma_(d+1) M_c + d 2^-149   (term j: a product and at
 *                                                   most d sums),
 *     |F_c - E_c| <= gamma_d M_c + d 2^-149       (at most d roundings),
 * so |F_c - D_c| <= (gamma_d + gamma_(d+1)) M_c + d 2^-148. By Cauchy-
 * Schwarz M_c <= n_c + 2 ||x|| ||c||, and as n_c is ||c||^2 summed the same
 * way, ||c||^2 <= (n_c + d 2^-149) / (1 - gamma_d). With N the largest n_c
 * of the codebook, e = (gamma_d + gamma_(d+1)) (N + 2 ||x|| sqrt((N + d
 * 2^-149) / (1 - gamma_d))) + d 2^-148 bounds every codeword; it is
 * evaluated in double, whose own rounding (relative 2^-53 an operation) the
 * factor VQKV__SLACK covers many times over, and F_f + 2e rounded up to a
 * float. The analysis holds only without overflow, infinities and NaN:
 * codebooks with N > 2^40 (or a NaN norm, which a NaN or infinite codeword
 * gives) and vectors with ||x||^2 > 2^40 (or NaN) take the reference path
 * instead; below those limits every term and partial sum of both paths is
 * under 2^51, far from FLT_MAX, so the reference's start at FLT_MAX never
 * excludes a codeword. Costs: the pass, k*d fused steps a vector and five
 * lane operations a register to keep each lane's least two distances, so
 * that whether one codeword is under the threshold is known without a
 * second look at the k distances (which, stored and scanned, cost as much
 * as the fused steps); the exact search for a vector with two or more. */
#define VQKV__FUSED_LIMIT 0x1p40
#define VQKV__SLACK 1.01

/* Vectors a fused pass takes at once. */
#define VQKV__V 4

/* One codebook's batch: its search form, e = a + b ||x|| for the vectors
 * searched in it, and a bound on the norm of every codeword of finite
 * norm. (d goes to each pass as an argument, a constant in the common
 * sizes.) */
typedef struct {
    const float *search;
    uint32_t k;
    double a, b, cmax;
} vqkv__batch_t;

/* The codebook's part of the bound, over the codewords of finite norm (one
 * of norm +inf, a twin or an overflowing codeword, starts both its fused
 * and its reference distance at +inf, which stays +inf or turns NaN: never
 * a candidate, never the reference's answer); false where a norm is NaN or
 * over the limit (the reference path then). O(k), k a multiple of 8. */
VQKV__AVX2 static bool vqkv__batch_init(vqkv__batch_t *bt, const float *search, uint32_t d,
                                        uint32_t k)
{
    __m256 most = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (uint32_t c = 0; c < k; c += 8) {
        __m256 n = _mm256_loadu_ps(search + c);
        n = _mm256_andnot_ps(_mm256_cmp_ps(n, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ), n);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(n, _mm256_set1_ps((float)VQKV__FUSED_LIMIT),
                                              _CMP_NLE_UQ)); /* NaN too */
        most = _mm256_max_ps(n, most);
    }
    double nmax = -vqkv__least256(_mm256_sub_ps(_mm256_setzero_ps(), most));
    double u = 0x1p-24, gd = d * u / (1.0 - d * u), gd1 = (d + 1) * u / (1.0 - (d + 1) * u);
    double g = (gd + gd1) * VQKV__SLACK, cmax = sqrt((nmax + d * 0x1p-149) / (1.0 - gd));
    bt->search = search;
    bt->k = k;
    bt->a = g * nmax + d * 0x1p-148 * VQKV__SLACK;
    bt->b = g * 2.0 * cmax;
    bt->cmax = cmax;
    return _mm256_movemask_ps(bad) == 0;
}

/* The candidates' thresholds of the pass's vectors, F_f + 2e rounded up (in
 * double, then up by more than the conversion to float can take off); NaN
 * where x is out of the bound's reach or no codeword has a finite fused
 * distance (the caller takes the reference path). */
VQKV__AVX2 static inline void vqkv__thresholds(const vqkv__batch_t *bt, const double *xx,
                                               const float *least, float *thr)
{
    __m256d lst = _mm256_cvtps_pd(_mm_loadu_ps(least));
    __m256d e =
        _mm256_add_pd(_mm256_set1_pd(bt->a),
                      _mm256_mul_pd(_mm256_set1_pd(bt->b), _mm256_sqrt_pd(_mm256_loadu_pd(xx))));
    __m256d t = _mm256_add_pd(lst, _mm256_add_pd(e, e));
    __m256d up = _mm256_andnot_pd(_mm256_set1_pd(-0.0), t); /* |t| */
    up = _mm256_add_pd(_mm256_mul_pd(up, _mm256_set1_pd(0x1p-22)), _mm256_set1_pd(0x1p-149));
    _mm_storeu_ps(thr, _mm256_cvtpd_ps(_mm256_add_pd(t, up)));
    for (uint32_t v = 0; v < VQKV__V; v++)
        thr[v] = xx[v] <= VQKV__FUSED_LIMIT && least[v] < INFINITY ? thr[v] : NAN;
}

/* Per register width, one step of the pass's tracking: each lane keeps the
 * least fused distance it has seen (m1), the least of the others (s2) and
 * the codeword of m1 (first of equals: a later equal one goes to s2). A NaN
 * distance changes none of them (min and max return their second operand
 * when either is NaN, compares are false). */
VQKV__AVX2 static inline void vqkv__track256(__m256 f, __m256i cur, __m256 *m1, __m256 *s2,
                                             __m256i *idx)
{
    __m256 lt = _mm256_cmp_ps(f, *m1, _CMP_LT_OQ);
    *s2 = _mm256_min_ps(_mm256_max_ps(*m1, f), *s2);
    *m1 = _mm256_min_ps(f, *m1);
    *idx = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(*idx), _mm256_castsi256_ps(cur), lt));
}

VQKV__AVX512 static inline void vqkv__track512(__m512 f, __m512i cur, __m512 *m1, __m512 *s2,
                                               __m512i *idx)
{
    __mmask16 lt = _mm512_cmp_ps_mask(f, *m1, _CMP_LT_OQ);
    *s2 = _mm512_min_ps(_mm512_max_ps(*m1, f), *s2);
    *m1 = _mm512_min_ps(f, *m1);
    *idx = _mm512_mask_mov_epi32(*idx, lt, cur);
}

VQKV__AVX2 static inline unsigned vqkv__below256(__m256 v, __m256 at)
{
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, at, _CMP_LE_OQ));
}

VQKV__AVX512 static inline unsigned vqkv__below512(__m512 v, __m512 at)
{
    return (unsigned)_mm512_cmp_ps_mask(v, at, _CMP_LE_OQ);
}

/* Lane numbers: a register's codewords are c0 + these. */
static const int32_t vqkv__iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* The fused pass over VQKV__V vectors at once (x[]; the answers of the
 * first nv kept): each block of R registers of codewords is loaded once a
 * channel for all of them, whose accumulators stay in registers; each
 * vector's lanes track their least two distances and the least's codeword.
 * A vector's answer is the one codeword at or under its threshold: the
 * least of one lane, when no other lane's least and no lane's second
 * reaches the threshold. Otherwise (a near-tie within 2e, or a vector or
 * codebook the bound does not cover) the exact search answers. */
#define VQKV__FUSED(NAME, TARGET, BITS, LANES, R, EXACT)                                           \
    TARGET static inline __attribute__((always_inline)) void NAME(                                 \
        const vqkv__batch_t *bt, const float *const *x, uint32_t nv, uint32_t d, uint32_t *out)    \
    {                                                                                              \
        enum { V = VQKV__V };                                                                      \
        const float *norms2 = bt->search, *wt = bt->search + bt->k;                                \
        uint32_t k = bt->k;                                                                        \
        float m[V][VQKV_MAX_HEAD_DIM], lst[V], thr[V];                                             \
        uint32_t lane_word[LANES];                                                                 \
        double xx[V];                                                                              \
        __m##BITS m1[V], s2[V];                                                                    \
        __m##BITS##i idx[V], iota = _mm##BITS##_loadu_si##BITS((const void *)vqkv__iota);          \
        for (uint32_t v = 0; v < V; v++) {                                                         \
            xx[v] = 0.0;                                                                           \
            for (uint32_t j = 0; j < d; j++) {                                                     \
                m[v][j] = -2.0f * x[v][j];                                                         \
                xx[v] += (double)x[v][j] * x[v][j];                                                \
            }                                                                                      \
            m1[v] = s2[v] = _mm##BITS##_set1_ps(INFINITY);                                         \
            idx[v] = _mm##BITS##_setzero_si##BITS();                                               \
        }                                                                                          \
        for (uint32_t c0 = 0; c0 < k; c0 += (LANES) * (R)) {                                       \
            __m##BITS acc[V][R];                                                                   \
            for (uint32_t r = 0; r < (R); r++)                                                     \
                for (uint32_t v = 0; v < V; v++)                                                   \
                    acc[v][r] = _mm##BITS##_loadu_ps(norms2 + c0 + (LANES)*r);                     \
            for (uint32_t j = 0; j < d; j++) {                                                     \
                __m##BITS w[R];                                                                    \
                for (uint32_t r = 0; r < (R); r++)                                                 \
                    w[r] = _mm##BITS##_loadu_ps(wt + (size_t)j * k + c0 + (LANES)*r);              \
                for (uint32_t v = 0; v < V; v++) {                                                 \
                    __m##BITS mv = _mm##BITS##_set1_ps(m[v][j]);                                   \
                    for (uint32_t r = 0; r < (R); r++)                                             \
                        acc[v][r] = _mm##BITS##_fmadd_ps(mv, w[r], acc[v][r]);                     \
                }                                                                                  \
            }                                                                                      \
            for (uint32_t r = 0; r < (R); r++) {                                                   \
                __m##BITS##i cur =                                                                 \
                    _mm##BITS##_add_epi32(iota, _mm##BITS##_set1_epi32((int)(c0 + (LANES)*r)));    \
                for (uint32_t v = 0; v < V; v++)                                                   \
                    vqkv__track##BITS(acc[v][r], cur, &m1[v], &s2[v], &idx[v]);                    \
            }                                                                                      \
        }                                                                                          \
        for (uint32_t v = 0; v < V; v++)                                                           \
            lst[v] = vqkv__least##BITS(m1[v]);                                                     \
        vqkv__thresholds(bt, xx, lst, thr);                                                        \
        for (uint32_t v = 0; v < nv; v++) {                                                        \
            __m##BITS at = _mm##BITS##_set1_ps(thr[v]);                                            \
            unsigned below = vqkv__below##BITS(m1[v], at);                                         \
            if (thr[v] == thr[v] && __builtin_popcount(below) == 1 &&                              \
                vqkv__least##BITS(s2[v]) > thr[v]) {                                               \
                _mm##BITS##_storeu_si##BITS((void *)lane_word, idx[v]);                            \
                out[v] = lane_word[__builtin_ctz(below)];                                          \
            } else {                                                                               \
                out[v] = EXACT(x[v], bt->search, d, k);                                            \
            }                                                                                      \
        }                                                                                          \
    }

/* The batch: VQKV__V vectors a pass, the last pass padded with repeats of
 * the last vector; codebooks the pass cannot take (k not a multiple of a
 * block, or over VQKV__FUSED_MAX_K) or the bound cannot cover go vector by
 * vector through the exact search. */
#define VQKV__BATCH(NAME, FUSED, TARGET, LANES, R, EXACT)                                          \
    TARGET void NAME(const float *xs, size_t n, size_t stride, const float *search, uint32_t d,    \
                     uint32_t k, uint32_t *out)                                                    \
    {                                                                                              \
        vqkv__batch_t bt;                                                                          \
        if (k % ((LANES) * (R)) != 0 || k > VQKV__FUSED_MAX_K || d > VQKV_MAX_HEAD_DIM ||          \
            !vqkv__batch_init(&bt, search, d, k)) {                                                \
            for (size_t i = 0; i < n; i++)                                                         \
                out[i] = EXACT(xs + i * stride, search, d, k);                                     \
            return;                                                                                \
        }                                                                                          \
        /* d a constant in the common group sizes, so that the pass's channel                      \
         * loop unrolls (its counter and compare were a sixth of its time). */                     \
        switch (d) {                                                                               \
        case 4: VQKV__PASSES(FUSED(&bt, x, nv, 4, out + i)); break;                                \
        case 8: VQKV__PASSES(FUSED(&bt, x, nv, 8, out + i)); break;                                \
        case 16: VQKV__PASSES(FUSED(&bt, x, nv, 16, out + i)); break;                              \
        default: VQKV__PASSES(FUSED(&bt, x, nv, d, out + i));                                      \
        }                                                                                          \
    }

/* A batch's passes over xs: VQKV__V vectors x[] at a time (nv of them
 * real, the last pass padded with repeats of its last vector), the pass
 * PASS run on each, i its first vector's index. */
#define VQKV__PASSES(PASS)                                                                         \
    for (size_t i = 0; i < n; i += VQKV__V) {                                                      \
        const float *x[VQKV__V];                                                                   \
        uint32_t nv = n - i < VQKV__V ? (uint32_t)(n - i) : VQKV__V;                               \
        for (uint32_t v = 0; v < VQKV__V; v++)                                                     \
            x[v] = xs + (i + (v < nv ? v : nv - 1)) * stride;                                      \
        PASS;                                                                                      \
    }

#define VQKV__AVX2_FMA __attribute__((target("avx2,fma")))
VQKV__FUSED(vqkv__fused256, VQKV__AVX2_FMA, 256, 8, 2, vqkv__nearest_x86)
VQKV__BATCH(vqkv__nearest_batch_x86, vqkv__fused256, VQKV__AVX2_FMA, 8, 2, vqkv__nearest_x86)
VQKV__FUSED(vqkv__fused512, VQKV__AVX512, 512, 16, 4, vqkv__nearest_x512)
VQKV__BATCH(vqkv__nearest_batch_x512, vqkv__fused512, VQKV__AVX512, 16, 4, vqkv__nearest_x512)

/* ---- many vectors, one codebook: an integer screen made exact -------------
 *
 * With AVX-512 VNNI, vpdpwssd multiplies 16-bit integers two to a 32-bit
 * lane and adds both products, where a fused multiply-add does one product
 * a lane: a screen in integers, made exact as the fused pass is, halves the
 * pass's arithmetic. Per batch, codewords and vectors are scaled to
 * integers of norm at most Q = 0.998 * 2^14.5: p_j = round(c_j s_c) and
 * q = round(x s_x), s_c = Q / (the batch bound on ||c||), s_x = Q / (the
 * largest ||x|| of the batch), both floats. With lambda = 2 / (s_x s_c),
 * the exact distance E_j = n_j - 2 x.c_j (n_j the stored ||c_j||^2) is
 * lambda times
 *     n_j / lambda - (q + delta).(p_j + eps_j),
 * delta = x s_x - q and eps_j = c_j s_c - p_j, whose components are within
 * 1/2 + Q 2^-24 (the float product's rounding), so their norms within D =
 * sqrt(d) (1/2 + Q 2^-24), and ||q||, ||p_j|| within P = Q (1 + 2^-20) + D.
 * The screen's score is A_j = K_j - q.p_j, K_j the integer nearest
 * n_j / lambda, capped at 2^30 - 1: exact in int32, as |q.p_j| <= P^2 <
 * 2^29. By Cauchy-Schwarz on the three cross terms, for K_j not capped,
 *     |A_j - E_j / lambda| <= beta = 1/2 + 2^-20 + D (2 P + D).
 * With the reference's own error r (the fused pass's bound a + b ||x||,
 * which covers it), the fused pass's argument gives: the reference's
 * answer, and every codeword tied with it, has A_j <= A_f + tau, tau = 2
 * beta + 2 r / lambda, f the codeword of least A. Each of the 16 lanes
 * (codewords j = i mod 16) keeps only its least score, and the threshold
 * is m + floor(tau) + 1, m the least of all: every A_j <= A_f + tau is at
 * or under it. A lane whose least is over it holds no candidate; where one
 * lane alone is under it, that lane's column (its codeword of every block,
 * stored as a block is) is scored in one more step, and one score under
 * the threshold there is the answer. Otherwise the reference's distance of
 * each candidate decides (vqkv__screen_resolve). Tracking a second score
 * per lane instead cost two operations a block for every vector.
 *
 * Where it does not apply: codewords of norm +inf (twins) get the cap and
 * p = 0; a threshold that reaches 2^30 - 1 - 2^29 (where a capped score
 * could be under it) sends the vector to the exact search, as do vectors
 * with a component past 2^18 in magnitude (so ||x||^2 <= 2^40, the fused
 * pass's limit), NaN or infinite, which play no part in s_x. Batches whose
 * codebook the fused pass's bound does not cover, or whose scales
 * overflow, take the fused pass. Costs: per batch O(k d) to scale the
 * codebook and O(n d) for s_x (hence VQKV__SCREEN_MIN_N, kmeans.h); per
 * vector k d / 32 multiply-adds and one lane minimum a register of 16
 * codewords (the fused pass: k d / 16 and five), d / 2 more for the
 * column, and for the vectors with a near-tie, the screen again and the
 * reference's distances of the candidates. Tau times lambda is about
 * 5e-4 of the batch's largest ||x|| times the largest ||c|| at d = 8
 * (beta ~ 2 D Q), against about 1e-6 for the fused pass: on Gaussian
 * codebooks 1.6-1.9% of vectors have a near-tie
 * (test_screen_settles_encoder_batches). */
#define VQKV__SCREEN_MAX_K 256u
#define VQKV__SCREEN_MAX_D 16u
#define VQKV__SCREEN_Q (0.998 * 0x1p14 * 1.4142135623730951)
#define VQKV__SCREEN_DOT (1 << 29)   /* |q.p_j| under this */
#define VQKV__SCREEN_KCAP 0x3fffffff /* the cap on K: 2^30 - 1 */
#define VQKV__SCREEN_X_MAX 0x1p18f   /* vector components the screen takes */

#define VQKV__VNNI __attribute__((target("avx2,fma,avx512f,avx512vnni")))

/* One batch's screen: K, and the codewords' -p_j as 16-bit pairs, block
 * by block (16 codewords) and pair by pair, 16 lanes each; and the same
 * again by columns: column i holds codeword 16 r + i in lane r (blocks
 * past k / 16 give the cap and p = 0). */
typedef struct {
    int32_t K[VQKV__SCREEN_MAX_K] __attribute__((aligned(64)));
    int32_t P[VQKV__SCREEN_MAX_K * VQKV__SCREEN_MAX_D / 2] __attribute__((aligned(64)));
    int32_t K_col[VQKV__SCREEN_MAX_K] __attribute__((aligned(64)));
    int32_t P_col[VQKV__SCREEN_MAX_K * VQKV__SCREEN_MAX_D / 2] __attribute__((aligned(64)));
    float s_x;
    int32_t slack; /* floor(tau) + 1 */
} vqkv__screen_t;

/* A batch's scales, for taken vectors of ||x||^2 up to xx: s_x and the
 * slack (floor(tau) + 1) into sc, s_c and 1 / lambda out. False where the
 * screen does not apply: a scale not finite, or scores or the threshold
 * past the room int32 leaves them. The same for either register width. */
static bool vqkv__screen_frame(vqkv__screen_t *sc, const vqkv__batch_t *bt, float xx, uint32_t d,
                               float *s_c, double *scale)
{
    /* The float sum ||x||^2 is within gamma_16 < 2^-20 of the true one. */
    double xn = sqrt(xx * (1.0 + 0x1p-18)), Q = VQKV__SCREEN_Q;
    float s_x = xn > 0.0 ? (float)(Q / xn) : 1.0f;
    *s_c = bt->cmax > 0.0 ? (float)(Q / bt->cmax) : 1.0f;
    if (!isfinite(*s_c) || !isfinite(s_x))
        return false;
    *scale = 0.5 * s_x * *s_c; /* 1 / lambda */
    double D = sqrt((double)d) * (0.5 + Q * 0x1p-24), P = Q * (1.0 + 0x1p-20) + D;
    double beta = 0.5 + 0x1p-20 + D * (2.0 * P + D);
    double tau = (2.0 * beta + 2.0 * (bt->a + bt->b * xn) * *scale) * VQKV__SLACK;
    if (!(P * P < VQKV__SCREEN_DOT) || !(tau < VQKV__SCREEN_DOT))
        return false;
    sc->s_x = s_x;
    sc->slack = (int32_t)tau + 1;
    return true;
}

/* The column tables from the block tables of w lanes (blocks of w
 * codewords): column i holds codeword w r + i in lane r mod w of its row
 * r / w, rows i * rows .. i * rows + rows - 1; lanes past the blocks get
 * the cap and p = 0. One row a column at w = 16 (k <= 256), up to four at
 * w = 8. O(k d) scalar: a batch's setup, not its passes. */
static void vqkv__screen_columns(vqkv__screen_t *sc, uint32_t k, uint32_t pairs, uint32_t w)
{
    uint32_t blocks = k / w, rows = (blocks + w - 1) / w;
    for (uint32_t i = 0; i < w; i++)
        for (uint32_t g = 0; g < rows; g++)
            for (uint32_t l = 0; l < w; l++) {
                uint32_t r = w * g + l, row = i * rows + g;
                bool held = r < blocks;
                sc->K_col[row * w + l] = held ? sc->K[w * r + i] : VQKV__SCREEN_KCAP;
                for (uint32_t t = 0; t < pairs; t++)
                    sc->P_col[(row * pairs + t) * w + l] =
                        held ? sc->P[(r * pairs + t) * w + i] : 0;
            }
}

/* Codeword c's distance to the vector whose -2 x is m, built as the
 * reference builds it. */
static inline float vqkv__screen_distance(const vqkv__batch_t *bt, const float *m, uint32_t c,
                                          uint32_t d)
{
    const float *wt = bt->search + bt->k;
    float dist = bt->search[c];
    for (uint32_t j = 0; j < d; j++)
        dist += m[j] * wt[(size_t)j * bt->k + c];
    return dist;
}

/* Whether the screen takes vector x: every component within
 * VQKV__SCREEN_X_MAX (NaN compares unordered: no). */
VQKV__VNNI static inline bool vqkv__screen_takes(__m512 x)
{
    return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(VQKV__SCREEN_X_MAX), _CMP_NLE_UQ) ==
           0;
}

/* The largest ||x||^2 (as a float sum) of the batch's vectors the screen
 * takes; 0 if none. O(n d). */
VQKV__VNNI static float vqkv__screen_xmax(const float *xs, size_t n, size_t stride, uint32_t d)
{
    __mmask16 dm = (__mmask16)((1u << d) - 1);
    float most = 0.0f;
    for (size_t i = 0; i < n; i++) {
        __m512 x = _mm512_maskz_loadu_ps(dm, xs + i * stride);
        float xx = _mm512_reduce_add_ps(_mm512_mul_ps(x, x));
        if (vqkv__screen_takes(x) && xx > most)
            most = xx;
    }
    return most;
}

/* Scales the codebook (k a multiple of 16 up to VQKV__SCREEN_MAX_K, d = 4,
 * 8 or 16) for vectors of ||x||^2 up to xx; false where the screen does
 * not apply (the fused pass then). O(k d). */
VQKV__VNNI static bool vqkv__screen_init(vqkv__screen_t *sc, const vqkv__batch_t *bt, float xx,
                                         uint32_t d)
{
    const float *norms = bt->search, *wt = bt->search + bt->k;
    uint32_t k = bt->k, pairs = d / 2;
    float s_c;
    double scale;
    if (!vqkv__screen_frame(sc, bt, xx, d, &s_c, &scale))
        return false;
    __m512d kscale = _mm512_set1_pd(scale), kcap = _mm512_set1_pd(VQKV__SCREEN_KCAP);
    __m512 neg = _mm512_set1_ps(-s_c), inf = _mm512_set1_ps(INFINITY);
    __m512i low16 = _mm512_set1_epi32(0xffff);
    for (uint32_t r = 0; r < k / 16; r++) {
        const float *nr = norms + 16 * r;
        __mmask16 live = _mm512_cmp_ps_mask(_mm512_loadu_ps(nr), inf, _CMP_NEQ_UQ);
        /* min(+inf, cap) is the cap: twins get it. */
        __m512d k0 =
            _mm512_min_pd(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(nr)), kscale), kcap);
        __m512d k1 =
            _mm512_min_pd(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(nr + 8)), kscale), kcap);
        _mm256_store_si256((__m256i *)(sc->K + 16 * r), _mm512_cvtpd_epi32(k0));
        _mm256_store_si256((__m256i *)(sc->K + 16 * r + 8), _mm512_cvtpd_epi32(k1));
        for (uint32_t t = 0; t < pairs; t++) {
            /* round(-c s_c) = -round(c s_c): rounding to even is odd. */
            __m512i lo = _mm512_maskz_cvtps_epi32(
                live, _mm512_mul_ps(_mm512_loadu_ps(wt + 2 * t * k + 16 * r), neg));
            __m512i hi = _mm512_maskz_cvtps_epi32(
                live, _mm512_mul_ps(_mm512_loadu_ps(wt + (2 * t + 1) * k + 16 * r), neg));
            _mm512_store_si512(sc->P + (r * pairs + t) * 16,
                               _mm512_ternarylogic_epi32(lo, low16, _mm512_slli_epi32(hi, 16),
                                                         0xea)); /* lo & 0xffff | hi << 16 */
        }
    }
    vqkv__screen_columns(sc, k, pairs, 16);
    return true;
}

/* The scores A_j of 16 codewords (a block, or a column) for the vector
 * whose pairs are xq: their K in k, their pairs in p. */
VQKV__VNNI static inline __attribute__((always_inline)) __m512i
vqkv__screen_scores(__m512i k, uint32_t pairs, const int32_t *xq, const __m512i *p)
{
    _Pragma("GCC unroll 8") for (uint32_t t = 0; t < pairs; t++) k =
        _mm512_dpwssd_epi32(k, p[t], _mm512_set1_epi32(xq[t]));
    return k;
}

/* The scores of row r of a (K, P) table pair, blocks or columns, for the
 * vector whose pairs are xq. */
VQKV__VNNI static inline __attribute__((always_inline)) __m512i
vqkv__screen_row(const int32_t *K, const int32_t *P, uint32_t r, uint32_t pairs, const int32_t *xq)
{
    __m512i p[VQKV__SCREEN_MAX_D / 2];
    for (uint32_t t = 0; t < pairs; t++)
        p[t] = _mm512_load_si512(P + (r * pairs + t) * 16);
    return vqkv__screen_scores(_mm512_load_si512(K + 16 * r), pairs, xq, p);
}

/* The reference's answer for x among the codewords whose score is at or
 * under thr, which hold it and every codeword tied with it: each
 * one's distance built as the reference builds it, the first least kept
 * (they come in index order). O(k d / 32 + candidates * d). One function
 * per register width: W lanes a block, UNDER(r) the lanes of block r
 * whose score is at or under thr, as bits. */
#define VQKV__SCREEN_RESOLVE(NAME, TARGET, W, UNDER)                                               \
    TARGET static uint32_t NAME(const vqkv__screen_t *sc, const vqkv__batch_t *bt, const float *x, \
                                const int32_t *xq, int32_t thr, uint32_t d)                        \
    {                                                                                              \
        uint32_t pairs = d / 2, best = 0;                                                          \
        float m[VQKV__SCREEN_MAX_D], best_dist = FLT_MAX;                                          \
        for (uint32_t j = 0; j < d; j++)                                                           \
            m[j] = -2.0f * x[j];                                                                   \
        for (uint32_t r = 0; r < bt->k / (W); r++) {                                               \
            for (unsigned under = (UNDER); under != 0; under &= under - 1) {                       \
                uint32_t c = (W)*r + (uint32_t)__builtin_ctz(under);                               \
                float dist = vqkv__screen_distance(bt, m, c, d);                                   \
                if (dist < best_dist) {                                                            \
                    best_dist = dist;                                                              \
                    best = c;                                                                      \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        return best;                                                                               \
    }
VQKV__SCREEN_RESOLVE(vqkv__screen_resolve, VQKV__VNNI, 16,
                     _mm512_cmple_epi32_mask(vqkv__screen_row(sc->K, sc->P, r, pairs, xq),
                                             _mm512_set1_epi32(thr)))

/* The one codeword of column i (of the codewords 16 r + i) whose score is
 * at or under thr, or -1 where there are more. */
VQKV__VNNI static inline int32_t vqkv__screen_column(const vqkv__screen_t *sc, uint32_t i,
                                                     uint32_t pairs, const int32_t *xq, int32_t thr)
{
    __m512i acc = vqkv__screen_row(sc->K_col, sc->P_col, i, pairs, xq);
    __mmask16 under = _mm512_cmple_epi32_mask(acc, _mm512_set1_epi32(thr));
    return __builtin_popcount(under) == 1 ? (int32_t)(16 * (uint32_t)__builtin_ctz(under) + i) : -1;
}

/* A screen pass's answers for its first nv vectors (v), from each one's
 * lanes' least scores, as either register width words them: LEAST the
 * least of vector v's lanes, BELOW its lanes at or under thr as bits,
 * COLUMN the one codeword of lane ctz(below)'s column at or under thr (or
 * -1), RESOLVE the candidates' reference distances, EXACT the exact search
 * (vectors the screen does not take, or a threshold past the cap's reach).
 * Counts the vectors settled without RESOLVE or EXACT in settled. */
#define VQKV__SCREEN_SETTLE(LEAST, BELOW, COLUMN, RESOLVE, EXACT)                                  \
    for (uint32_t v = 0; v < nv; v++) {                                                            \
        int64_t thr = (int64_t)(LEAST) + sc->slack;                                                \
        if (!takes[v] || thr >= VQKV__SCREEN_KCAP - VQKV__SCREEN_DOT) {                            \
            out[v] = (EXACT);                                                                      \
            continue;                                                                              \
        }                                                                                          \
        unsigned below = (BELOW);                                                                  \
        int32_t only = __builtin_popcount(below) == 1 ? (COLUMN) : -1;                             \
        if (only >= 0) {                                                                           \
            out[v] = (uint32_t)only;                                                               \
            settled++;                                                                             \
        } else {                                                                                   \
            out[v] = (RESOLVE);                                                                    \
        }                                                                                          \
    }

/* The screen over VQKV__V vectors at once, as the fused pass: each block's
 * K and pairs loaded once for all of them; each vector's lanes keep their
 * least score. Returns how many the screen settled alone. */
VQKV__VNNI static inline __attribute__((always_inline)) size_t
vqkv__screen_pass(const vqkv__screen_t *sc, const vqkv__batch_t *bt, const float *const *x,
                  uint32_t nv, uint32_t d, uint32_t *out)
{
    enum { V = VQKV__V };
    uint32_t pairs = d / 2;
    __mmask16 dm = (__mmask16)((1u << d) - 1);
    __m512i least[V];
    int32_t xq[V][VQKV__SCREEN_MAX_D / 2];
    bool takes[V];
    size_t settled = 0;
    for (uint32_t v = 0; v < V; v++) {
        __m512 xv = _mm512_maskz_loadu_ps(dm, x[v]);
        takes[v] = vqkv__screen_takes(xv);
        _mm256_storeu_si256((__m256i *)xq[v], _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
                                                  _mm512_mul_ps(xv, _mm512_set1_ps(sc->s_x)))));
        least[v] = _mm512_set1_epi32(INT32_MAX);
    }
    for (uint32_t r = 0; r < bt->k / 16; r++) {
        __m512i p[VQKV__SCREEN_MAX_D / 2];
        _Pragma("GCC unroll 8") for (uint32_t t = 0; t < pairs; t++) p[t] =
            _mm512_load_si512(sc->P + (r * pairs + t) * 16);
        __m512i k = _mm512_load_si512(sc->K + 16 * r);
        _Pragma("GCC unroll 4") for (uint32_t v = 0; v < V; v++) least[v] =
            _mm512_min_epi32(vqkv__screen_scores(k, pairs, xq[v], p), least[v]);
    }
    VQKV__SCREEN_SETTLE(
        _mm512_reduce_min_epi32(least[v]),
        _mm512_cmple_epi32_mask(least[v], _mm512_set1_epi32((int32_t)thr)),
        vqkv__screen_column(sc, (uint32_t)__builtin_ctz(below), pairs, xq[v], (int32_t)thr),
        vqkv__screen_resolve(sc, bt, x[v], xq[v], (int32_t)thr, d),
        vqkv__nearest_x512(x[v], bt->search, d, bt->k));
    return settled;
}

VQKV__VNNI size_t vqkv__nearest_batch_vnni(const float *xs, size_t n, size_t stride,
                                           const float *search, uint32_t d, uint32_t k,
                                           uint32_t *out)
{
    vqkv__batch_t bt;
    vqkv__screen_t sc;
    size_t settled = 0;
    if ((d != 4 && d != 8 && d != 16) || k % 16 != 0 || k > VQKV__SCREEN_MAX_K ||
        !vqkv__batch_init(&bt, search, d, k) ||
        !vqkv__screen_init(&sc, &bt, vqkv__screen_xmax(xs, n, stride, d), d)) {
        vqkv__nearest_batch_x512(xs, n, stride, search, d, k, out);
        return 0;
    }
    switch (d) {
    case 4: VQKV__PASSES(settled += vqkv__screen_pass(&sc, &bt, x, nv, 4, out + i)); break;
    case 8: VQKV__PASSES(settled += vqkv__screen_pass(&sc, &bt, x, nv, 8, out + i)); break;
    default: VQKV__PASSES(settled += vqkv__screen_pass(&sc, &bt, x, nv, 16, out + i));
    }
    return settled;
}

/* ---- the same screen with AVX2: vpmaddwd -----------------------------------
 *
 * Without VNNI, AVX2's vpmaddwd still multiplies 16-bit integers two to a
 * 32-bit lane and adds both products; a vpaddd adds them to the score.
 * The scores are the VNNI screen's to the bit (same scaling, same K and
 * pairs), so its exactness argument holds unchanged, in blocks of 8
 * codewords: each of 8 lanes keeps its least score, and a lane's column
 * (codewords 8 r + i, up to 32) is up to four rows of 8. Per vector and 8
 * codewords: d / 2 multiply-adds, d / 2 adds and one min, where the fused
 * AVX2 pass does d fused multiply-adds and five lane operations to track
 * two distances and an index. d = 4 and 8 only: at d = 16 the pass's eight
 * pairs and four vectors' least scores do not fit AVX2's sixteen registers,
 * and it ran no faster than the fused pass (bench/search_cpu; at d = 4
 * and 8 it ran 1.06-1.28x the fused pass on Zen 3, bench/RESULTS.md).
 * Vector setup is SSE, four channels a step. */
#define VQKV__MADD __attribute__((target("avx2,fma")))

/* Components of v out of the screen's reach (past VQKV__SCREEN_X_MAX, or
 * NaN), as bits. */
VQKV__MADD static inline int vqkv__screen_out128(__m128 v)
{
    __m128 mag = _mm_andnot_ps(_mm_set1_ps(-0.0f), v);
    return _mm_movemask_ps(_mm_cmp_ps(mag, _mm_set1_ps(VQKV__SCREEN_X_MAX), _CMP_NLE_UQ));
}

/* vqkv__screen_xmax, four channels a step. */
VQKV__MADD static float vqkv__screen_xmax128(const float *xs, size_t n, size_t stride, uint32_t d)
{
    float most = 0.0f;
    for (size_t i = 0; i < n; i++) {
        __m128 sum = _mm_setzero_ps();
        int out = 0;
        for (uint32_t j = 0; j < d; j += 4) {
            __m128 v = _mm_loadu_ps(xs + i * stride + j);
            sum = _mm_add_ps(sum, _mm_mul_ps(v, v));
            out |= vqkv__screen_out128(v);
        }
        sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        float xx = _mm_cvtss_f32(_mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1)));
        if (out == 0 && xx > most)
            most = xx;
    }
    return most;
}

/* x's pairs into xq (round(x s_x), 16 bits each, two to an int32), and
 * whether the screen takes x. */
VQKV__MADD static inline bool vqkv__screen_quantize128(const float *x, uint32_t d, float s_x,
                                                       int32_t *xq)
{
    int out = 0;
    for (uint32_t j = 0; j < d; j += 4) {
        __m128 v = _mm_loadu_ps(x + j);
        __m128i q = _mm_cvtps_epi32(_mm_mul_ps(v, _mm_set1_ps(s_x)));
        _mm_storel_epi64((__m128i *)(xq + j / 2), _mm_packs_epi32(q, q));
        out |= vqkv__screen_out128(v);
    }
    return out == 0;
}

/* vqkv__screen_init in blocks of 8 codewords. */
VQKV__MADD static bool vqkv__screen_init256(vqkv__screen_t *sc, const vqkv__batch_t *bt, float xx,
                                            uint32_t d)
{
    const float *norms = bt->search, *wt = bt->search + bt->k;
    uint32_t k = bt->k, pairs = d / 2;
    float s_c;
    double scale;
    if (!vqkv__screen_frame(sc, bt, xx, d, &s_c, &scale))
        return false;
    __m256d kscale = _mm256_set1_pd(scale), kcap = _mm256_set1_pd(VQKV__SCREEN_KCAP);
    __m256 neg = _mm256_set1_ps(-s_c);
    __m256i low16 = _mm256_set1_epi32(0xffff);
    for (uint32_t r = 0; r < k / 8; r++) {
        const float *nr = norms + 8 * r;
        __m256i live = _mm256_castps_si256(
            _mm256_cmp_ps(_mm256_loadu_ps(nr), _mm256_set1_ps(INFINITY), _CMP_NEQ_UQ));
        for (uint32_t h = 0; h < 2; h++) /* min(+inf, cap) is the cap: twins get it. */
            _mm_store_si128(
                (__m128i *)(sc->K + 8 * r + 4 * h),
                _mm256_cvtpd_epi32(_mm256_min_pd(
                    _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(nr + 4 * h)), kscale), kcap)));
        for (uint32_t t = 0; t < pairs; t++) {
            __m256i lo = _mm256_and_si256(live, _mm256_cvtps_epi32(_mm256_mul_ps(
                                                    _mm256_loadu_ps(wt + 2 * t * k + 8 * r), neg)));
            __m256i hi =
                _mm256_and_si256(live, _mm256_cvtps_epi32(_mm256_mul_ps(
                                           _mm256_loadu_ps(wt + (2 * t + 1) * k + 8 * r), neg)));
            _mm256_store_si256(
                (__m256i *)(sc->P + (r * pairs + t) * 8),
                _mm256_or_si256(_mm256_and_si256(lo, low16), _mm256_slli_epi32(hi, 16)));
        }
    }
    vqkv__screen_columns(sc, k, pairs, 8);
    return true;
}

/* vqkv__screen_scores in 8 lanes. */
VQKV__MADD static inline __attribute__((always_inline)) __m256i
vqkv__screen_scores256(__m256i k, uint32_t pairs, const int32_t *xq, const __m256i *p)
{
    _Pragma("GCC unroll 8") for (uint32_t t = 0; t < pairs; t++) k =
        _mm256_add_epi32(k, _mm256_madd_epi16(p[t], _mm256_set1_epi32(xq[t])));
    return k;
}

/* vqkv__screen_row in 8 lanes. */
VQKV__MADD static inline __attribute__((always_inline)) __m256i
vqkv__screen_row256(const int32_t *K, const int32_t *P, uint32_t r, uint32_t pairs,
                    const int32_t *xq)
{
    __m256i p[VQKV__SCREEN_MAX_D / 2];
    for (uint32_t t = 0; t < pairs; t++)
        p[t] = _mm256_load_si256((const __m256i *)(P + (r * pairs + t) * 8));
    return vqkv__screen_scores256(_mm256_load_si256((const __m256i *)(K + 8 * r)), pairs, xq, p);
}

/* The lanes of v at or under thr, as bits. */
VQKV__MADD static inline unsigned vqkv__screen_under256(__m256i v, int32_t thr)
{
    __m256i over = _mm256_cmpgt_epi32(v, _mm256_set1_epi32(thr));
    return ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(over)) & 0xffu;
}

VQKV__MADD static inline int32_t vqkv__screen_least256(__m256i v)
{
    __m128i m = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    return _mm_cvtsi128_si32(m);
}

VQKV__SCREEN_RESOLVE(vqkv__screen_resolve256, VQKV__MADD, 8,
                     vqkv__screen_under256(vqkv__screen_row256(sc->K, sc->P, r, pairs, xq), thr))

/* The one codeword of column i (codewords 8 r + i) at or under thr, or -1
 * where there are more. */
VQKV__MADD static int32_t vqkv__screen_column256(const vqkv__screen_t *sc, uint32_t k, uint32_t i,
                                                 uint32_t pairs, const int32_t *xq, int32_t thr)
{
    uint32_t rows = (k / 8 + 7) / 8, under = 0; /* bit 8 g + l: row g, lane l */
    for (uint32_t g = 0; g < rows; g++)
        under |= vqkv__screen_under256(
                     vqkv__screen_row256(sc->K_col, sc->P_col, i * rows + g, pairs, xq), thr)
                 << 8 * g;
    return __builtin_popcount(under) == 1 ? (int32_t)(8 * (uint32_t)__builtin_ctz(under) + i) : -1;
}

/* vqkv__screen_pass in blocks of 8. */
VQKV__MADD static inline __attribute__((always_inline)) size_t
vqkv__screen_pass256(const vqkv__screen_t *sc, const vqkv__batch_t *bt, const float *const *x,
                     uint32_t nv, uint32_t d, uint32_t *out)
{
    enum { V = VQKV__V };
    uint32_t pairs = d / 2;
    __m256i least[V];
    int32_t xq[V][VQKV__SCREEN_MAX_D / 2];
    bool takes[V];
    size_t settled = 0;
    for (uint32_t v = 0; v < V; v++) {
        takes[v] = vqkv__screen_quantize128(x[v], d, sc->s_x, xq[v]);
        least[v] = _mm256_set1_epi32(INT32_MAX);
    }
    for (uint32_t r = 0; r < bt->k / 8; r++) {
        __m256i p[VQKV__SCREEN_MAX_D / 2];
        _Pragma("GCC unroll 8") for (uint32_t t = 0; t < pairs; t++) p[t] =
            _mm256_load_si256((const __m256i *)(sc->P + (r * pairs + t) * 8));
        __m256i k = _mm256_load_si256((const __m256i *)(sc->K + 8 * r));
        _Pragma("GCC unroll 4") for (uint32_t v = 0; v < V; v++) least[v] =
            _mm256_min_epi32(vqkv__screen_scores256(k, pairs, xq[v], p), least[v]);
    }
    VQKV__SCREEN_SETTLE(vqkv__screen_least256(least[v]),
                        vqkv__screen_under256(least[v], (int32_t)thr),
                        vqkv__screen_column256(sc, bt->k, (uint32_t)__builtin_ctz(below), pairs,
                                               xq[v], (int32_t)thr),
                        vqkv__screen_resolve256(sc, bt, x[v], xq[v], (int32_t)thr, d),
                        vqkv__nearest_x86(x[v], bt->search, d, bt->k));
    return settled;
}

VQKV__MADD size_t vqkv__nearest_batch_madd(const float *xs, size_t n, size_t stride,
                                           const float *search, uint32_t d, uint32_t k,
                                           uint32_t *out)
{
    vqkv__batch_t bt;
    vqkv__screen_t sc;
    size_t settled = 0;
    if ((d != 4 && d != 8) || k % 8 != 0 || k > VQKV__SCREEN_MAX_K ||
        !vqkv__batch_init(&bt, search, d, k) ||
        !vqkv__screen_init256(&sc, &bt, vqkv__screen_xmax128(xs, n, stride, d), d)) {
        vqkv__nearest_batch_x86(xs, n, stride, search, d, k, out);
        return 0;
    }
    switch (d) {
    case 4: VQKV__PASSES(settled += vqkv__screen_pass256(&sc, &bt, x, nv, 4, out + i)); break;
    default: VQKV__PASSES(settled += vqkv__screen_pass256(&sc, &bt, x, nv, 8, out + i));
    }
    return settled;
}

VQKV__AVX2 double vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c,
                                        float *mind, bool first, double *run)
{
    double total = 0.0, wide[8];
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
        _mm256_storeu_pd(wide, _mm256_cvtps_pd(_mm256_castps256_ps128(m)));
        _mm256_storeu_pd(wide + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(m, 1)));
        for (uint32_t l = 0; l < 8; l++)
            run[i + l] = total += wide[l];
    }
    /* the last n % 8 */
    return vqkv__mind_update_scalar(xt, n, i, d, c, mind, first, run, total);
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

double vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                             bool first, double *run)
{
    return vqkv__mind_update_scalar(xt, n, 0, d, c, mind, first, run, 0.0);
}

uint32_t vqkv__nearest_x86(const float *x, const float *search, uint32_t d, uint32_t k)
{
    return vqkv__nearest_scalar(x, search, d, k);
}

void vqkv__nearest_batch_x86(const float *xs, size_t n, size_t stride, const float *search,
                             uint32_t d, uint32_t k, uint32_t *out)
{
    vqkv__nearest_batch_scalar(xs, n, stride, search, d, k, out);
}

void vqkv__nearest_batch_x512(const float *xs, size_t n, size_t stride, const float *search,
                              uint32_t d, uint32_t k, uint32_t *out)
{
    vqkv__nearest_batch_scalar(xs, n, stride, search, d, k, out);
}

size_t vqkv__nearest_batch_vnni(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out)
{
    vqkv__nearest_batch_scalar(xs, n, stride, search, d, k, out);
    return 0;
}

size_t vqkv__nearest_batch_madd(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out)
{
    vqkv__nearest_batch_scalar(xs, n, stride, search, d, k, out);
    return 0;
}

bool vqkv__nearest_simd(uint32_t d, uint32_t k)
{
    (void)d, (void)k;
    return false;
}

#endif
