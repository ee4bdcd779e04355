/* test_kmeans.c -- k-means (kernels/kmeans.h) and codebook training through
 * the codec interface: results depend on the data and the seed alone, never
 * on the thread count, and training does what it is for.
 */
#include "test_util.h"

#include "codec_internal.h"
#include "kmeans.h"

#include <float.h>

static double dist2(const float *a, const float *b, uint32_t d)
{
    double s = 0.0;
    for (uint32_t j = 0; j < d; j++)
        s += ((double)a[j] - b[j]) * ((double)a[j] - b[j]);
    return s;
}

/* Mean squared distance of each point to its nearest centroid. */
static double distortion(const float *x, size_t n, uint32_t d, const float *centroids, uint32_t k)
{
    double total = 0.0;
    for (size_t i = 0; i < n; i++) {
        double best = DBL_MAX;
        for (uint32_t c = 0; c < k; c++)
            best = fmin(best, dist2(x + i * d, centroids + (size_t)c * d, d));
        total += best;
    }
    return total / (double)n;
}

static float *gaussian_points(size_t n, uint32_t d, uint64_t seed)
{
    float *x = malloc(n * d * sizeof *x);
    assert_non_null(x);
    test_rng_t rng = {seed};
    for (size_t i = 0; i < n * d; i++)
        x[i] = (float)test_rng_gaussian(&rng);
    return x;
}

/* ---- k-means -------------------------------------------------------------- */

/* Eight tight, far-apart clusters: every seed must find all eight, each
 * centroid at its cluster's centre. */
static void test_kmeans_recovers_clusters(void **state)
{
    (void)state;
    enum { K = 8, D = 4, PER_CLUSTER = 64, N = K * PER_CLUSTER };
    float centres[K * D], x[N * D], centroids[K * D];
    test_rng_t rng = {99};
    for (size_t i = 0; i < K * D; i++)
        centres[i] = (float)(100.0 * test_rng_uniform(&rng));
    for (size_t i = 0; i < N; i++)
        for (uint32_t j = 0; j < D; j++)
            x[i * D + j] = centres[(i % K) * D + j] + 0.2f * (float)test_rng_gaussian(&rng);

    for (uint64_t seed = 1; seed <= 5; seed++) {
        assert_ok(vqkv__kmeans(x, N, D, K, 10, seed, NULL, centroids));
        for (uint32_t c = 0; c < K; c++) {
            /* One centroid per centre, within a few noise widths. */
            uint32_t matches = 0;
            for (uint32_t k = 0; k < K; k++)
                matches += dist2(centres + c * D, centroids + k * D, D) < 0.1;
            assert_int_equal(matches, 1);
        }
        assert_true(distortion(x, N, D, centroids, K) < 4 * 0.2 * 0.2 * 1.5);
    }
}

static void test_kmeans_deterministic_by_seed(void **state)
{
    (void)state;
    enum { N = 600, D = 4, K = 16 };
    float *x = gaussian_points(N, D, 3);
    float first[K * D], same_seed[K * D], other_seed[K * D];
    assert_ok(vqkv__kmeans(x, N, D, K, 6, 11, NULL, first));
    assert_ok(vqkv__kmeans(x, N, D, K, 6, 11, NULL, same_seed));
    assert_ok(vqkv__kmeans(x, N, D, K, 6, 12, NULL, other_seed));
    assert_memory_equal(first, same_seed, sizeof first);
    assert_memory_not_equal(first, other_seed, sizeof first);
    free(x);
}

/* Lloyd iterations never make the fit worse than the seeding alone. */
static void test_kmeans_iterations_lower_distortion(void **state)
{
    (void)state;
    enum { N = 1000, D = 8, K = 32 };
    float *x = gaussian_points(N, D, 4);
    float seeded[K * D], trained[K * D];
    assert_ok(vqkv__kmeans(x, N, D, K, 0, 5, NULL, seeded));
    assert_ok(vqkv__kmeans(x, N, D, K, 8, 5, NULL, trained));
    double before = distortion(x, N, D, seeded, K), after = distortion(x, N, D, trained, K);
    assert_true(after < before * 0.9);
    free(x);
}

/* With fewer points than centroids, every point becomes a centroid and the
 * surplus centroids repeat points: nothing invented, nothing NaN. */
static void test_kmeans_fewer_points_than_centroids(void **state)
{
    (void)state;
    enum { N = 5, D = 3, K = 8 };
    float *x = gaussian_points(N, D, 6);
    float centroids[K * D];
    assert_ok(vqkv__kmeans(x, N, D, K, 4, 1, NULL, centroids));
    for (uint32_t c = 0; c < K; c++) {
        int is_point = 0;
        for (size_t i = 0; i < N; i++)
            is_point |= memcmp(centroids + c * D, x + i * D, D * sizeof(float)) == 0;
        assert_true(is_point);
    }
    for (size_t i = 0; i < N; i++) {
        int covered = 0;
        for (uint32_t c = 0; c < K; c++)
            covered |= memcmp(centroids + c * D, x + i * D, D * sizeof(float)) == 0;
        assert_true(covered);
    }
    free(x);
}

/* All points equal: no division by an empty cluster, no NaN. */
static void test_kmeans_identical_points(void **state)
{
    (void)state;
    enum { N = 100, D = 4, K = 16 };
    float x[N * D], centroids[K * D];
    for (size_t i = 0; i < N * D; i++)
        x[i] = (float)(i % D) - 1.5f;
    assert_ok(vqkv__kmeans(x, N, D, K, 5, 1, NULL, centroids));
    for (uint32_t c = 0; c < K; c++)
        assert_memory_equal(centroids + c * D, x, D * sizeof(float));
}

/* k-means++ draws a point with chance in proportion to its distance from
 * the centroids so far: with one point away from all the others (copies of
 * one vector), the second draw must take it, wherever it sits (first,
 * inside, last) and whichever point was drawn first. Catches a draw one
 * off the running sums (the point after or before the one whose sum passes
 * the target). */
static void test_kmeanspp_draws_the_only_far_point(void **state)
{
    (void)state;
    enum { D = 4 };
    static const size_t ns[] = {2, 3, 7, 64, 1001};
    float centroids[2 * D], far[D] = {9.0f, -9.0f, 9.0f, -9.0f}, near[D] = {1.0f, 2.0f, 3.0f, 4.0f};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        size_t n = ns[ni];
        float *x = malloc(n * D * sizeof *x);
        assert_non_null(x);
        size_t ats[] = {0, n / 2, n - 1};
        for (size_t a = 0; a < sizeof ats / sizeof ats[0]; a++)
            for (uint64_t seed = 1; seed <= 8; seed++) {
                for (size_t i = 0; i < n; i++)
                    memcpy(x + i * D, i == ats[a] ? far : near, sizeof far);
                assert_ok(vqkv__kmeans(x, n, D, 2, 0, seed, NULL, centroids));
                bool far_first = memcmp(centroids, far, sizeof far) == 0;
                if (memcmp(centroids + D, far_first ? near : far, sizeof far) != 0)
                    fail_msg("n %zu, far point %zu, seed %llu: the second draw missed it", n,
                             ats[a], (unsigned long long)seed);
            }
        free(x);
    }
}

/* The batch search for one vector. */
static uint32_t nearest(const float *x, const float *search, uint32_t d, uint32_t k)
{
    uint32_t c;
    vqkv__nearest_batch(x, 1, d, search, d, k, &c);
    return c;
}

static void test_nearest_matches_brute_force(void **state)
{
    (void)state;
    enum { N = 200, D = 6, K = 100 }; /* K not a multiple of any chunk size */
    float *x = gaussian_points(N, D, 8), *centroids = gaussian_points(K, D, 9);
    float *search = malloc((size_t)K * (D + 1) * sizeof *search);
    assert_non_null(search);
    vqkv__search_prepare(centroids, D, K, search);
    for (size_t i = 0; i < N; i++) {
        uint32_t got = nearest(x + i * D, search, D, K), best = 0;
        for (uint32_t c = 1; c < K; c++)
            if (dist2(x + i * D, centroids + c * D, D) < dist2(x + i * D, centroids + best * D, D))
                best = c;
        /* Float rounding may pick a centroid that is as near to within
         * rounding; never a clearly farther one. */
        assert_true(dist2(x + i * D, centroids + got * D, D) <=
                    dist2(x + i * D, centroids + best * D, D) + 1e-4);
    }
    /* Equal distances go to the lower index. */
    const float twins[3 * 2] = {1.0f, 0.0f, -1.0f, 0.0f, 1.0f, 0.0f};
    float twin_search[3 * 3];
    vqkv__search_prepare(twins, 2, 3, twin_search);
    assert_int_equal(nearest((const float[2]){0.0f, 0.0f}, twin_search, 2, 3), 0);
    assert_int_equal(nearest((const float[2]){2.0f, 0.0f}, twin_search, 2, 3), 0);
    assert_int_equal(nearest((const float[2]){-2.0f, 0.0f}, twin_search, 2, 3), 1);
    test_free_all(search, x, centroids);
}

/* The AVX2 and AVX-512 searches (when this CPU has them) give the scalar reference's
 * answer for every vector: codebook sizes 8 to 256 and dims 1 to 16,
 * Gaussian data, exact ties (repeated codewords, a vector equidistant from
 * two), signed zeros, huge values whose distances overflow to inf and NaN
 * codewords, which neither path ever picks. */
static void test_nearest_simd_matches_scalar(void **state)
{
    (void)state;
    if (!vqkv__nearest_simd(8, 256))
        skip(); /* no AVX2 here, or VQKV_CPU_SIMD=0: the reference is all there is */
    static const uint32_t ks[] = {8, 16, 24, 64, 72, 136, 256, 392}, ds[] = {1, 2, 3, 4, 8, 16};
    test_rng_t rng = {.state = 31};
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
        for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
            uint32_t k = ks[ki], d = ds[di];
            float *words = malloc((size_t)k * d * sizeof *words);
            float *search = malloc((size_t)k * (d + 1) * sizeof *search);
            float x[16];
            assert_non_null(words);
            assert_non_null(search);
            for (size_t i = 0; i < (size_t)k * d; i++)
                words[i] = (float)test_rng_gaussian(&rng);
            memcpy(words + (size_t)(k - 1) * d, words, d * sizeof *words); /* a twin of 0 */
            words[(size_t)(k / 2) * d] = NAN;
            if (k > 8)
                words[(size_t)5 * d] = 3.0e38f; /* its norm overflows to inf */
            vqkv__search_prepare_nearest(words, d, k, search);
            for (int trial = 0; trial < 400; trial++) {
                for (uint32_t j = 0; j < d; j++)
                    x[j] = trial % 7 == 0    ? words[j]               /* on codeword 0 */
                           : trial % 11 == 0 ? (j % 2 ? -0.0f : 0.0f) /* signed zeros */
                                             : (float)test_rng_gaussian(&rng) * 2.0f;
                if (trial % 13 == 0)
                    x[0] = 1.0e30f;
                uint32_t want = vqkv__nearest_scalar(x, search, d, k);
                uint32_t got = vqkv__nearest_x86(x, search, d, k);
                if (got != want)
                    fail_msg("k %u d %u trial %d: AVX2 %u, scalar %u", k, d, trial, got, want);
                got = vqkv__simd_avx512() ? vqkv__nearest_x512(x, search, d, k) : want;
                if (got != want)
                    fail_msg("k %u d %u trial %d: AVX-512 %u, scalar %u", k, d, trial, got, want);
            }
            test_free_all(words, search);
        }
}

/* Codebook kinds for the batch search's test, each aimed at one part of
 * its exactness argument (search_x86.c). */
enum { BOOK_GAUSS, BOOK_ULPS, BOOK_TWINS, BOOK_HUGE, BOOK_TINY, BOOK_ODD, BOOK_KINDS };

/* A float n ulps from v (toward +inf for n > 0). */
static float ulps_from(float v, int n)
{
    for (; n > 0; n--)
        v = nextafterf(v, INFINITY);
    for (; n < 0; n++)
        v = nextafterf(v, -INFINITY);
    return v;
}

static void make_book(int kind, test_rng_t *rng, uint32_t d, uint32_t k, float *words)
{
    float scale = kind == BOOK_HUGE ? 3.0e5f : kind == BOOK_TINY ? 1.0e-21f : 1.0f;
    for (size_t i = 0; i < (size_t)k * d; i++)
        words[i] = (float)test_rng_gaussian(rng) * scale;
    for (uint32_t c = 1; c < k; c++) {
        float *w = words + (size_t)c * d;
        uint64_t r = test_rng_next(rng);
        if (kind == BOOK_ULPS || (kind == BOOK_TWINS && r % 4 == 0)) {
            /* A few ulps from an earlier codeword: near-ties everywhere. */
            memcpy(w, words + (size_t)(r % c) * d, d * sizeof *w);
            w[r % d] = ulps_from(w[r % d], kind == BOOK_TWINS ? 0 : (int)(r >> 40) % 7 - 3);
        } else if (kind == BOOK_TWINS && r % 4 == 1) {
            memset(w, 0, d * sizeof *w);
        } else if (kind == BOOK_ODD && r % 16 == 0) {
            w[r % d] = r % 3 == 0 ? NAN : r % 3 == 1 ? INFINITY : 3.0e38f;
        } else if (kind == BOOK_ODD && r % 16 == 1) {
            w[r % d] = r & 64 ? -0.0f : 0.0f;
        }
    }
}

/* A vector for book: Gaussian at the book's scale, on a codeword, half-way
 * between two (ties in the reals), a codeword nudged by an ulp, signed
 * zeros, or out of the fused pass's reach (huge, NaN, Inf). */
static void make_vector(test_rng_t *rng, const float *words, uint32_t d, uint32_t k, float scale,
                        float *x)
{
    uint64_t r = test_rng_next(rng);
    const float *a = words + (size_t)(r % k) * d, *b = words + (size_t)((r >> 20) % k) * d;
    for (uint32_t j = 0; j < d; j++) {
        switch (r >> 56 & 7) {
        case 0: x[j] = a[j]; break;
        case 1: x[j] = a[j] * 0.5f + b[j] * 0.5f; break;
        case 2: x[j] = ulps_from(a[j], (int)(test_rng_next(rng) % 3) - 1); break;
        case 3: x[j] = test_rng_next(rng) & 1 ? -0.0f : 0.0f; break;
        default: x[j] = (float)test_rng_gaussian(rng) * scale;
        }
    }
    if ((r >> 32) % 97 == 0)
        x[r % d] = (r >> 8) % 3 == 0 ? NAN : (r >> 8) % 3 == 1 ? -INFINITY : 1.0e25f;
}

/* The batch searches (AVX2 with FMA, AVX-512F: the fused pass and its
 * rescore; AVX-512 VNNI and AVX2: the integer screen) give the scalar reference's answer for every
 * vector of every codebook kind, d from 1 to 16 (odd ones too) and k from 8 to 512, batch lengths
 * not a multiple of the pass's four vectors. About two million vectors; the dispatcher's answer
 * too, whatever path it takes. */
static void test_nearest_batch_matches_scalar(void **state)
{
    (void)state;
    static const uint32_t ks[] = {8, 16, 24, 32, 64, 96, 128, 256, 512};
    static const uint32_t ds[] = {1, 3, 4, 5, 8, 16};
    enum { N = 2003 };
    bool x86 = vqkv__nearest_simd(8, 256) && vqkv__simd_fma(), x512 = vqkv__simd_avx512();
    bool vnni = vqkv__simd_vnni();
    test_rng_t rng = {.state = 4242};
    float *xs = malloc((size_t)N * 16 * sizeof *xs);
    uint32_t *got = malloc(N * sizeof *got);
    size_t checked = 0;
    assert_non_null(xs);
    assert_non_null(got);
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
        for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++)
            for (int kind = 0; kind < BOOK_KINDS; kind++) {
                uint32_t k = ks[ki], d = ds[di];
                float *words = malloc((size_t)k * d * sizeof *words);
                float *search = malloc((size_t)k * (d + 1) * sizeof *search);
                assert_non_null(words);
                assert_non_null(search);
                make_book(kind, &rng, d, k, words);
                vqkv__search_prepare_nearest(words, d, k, search);
                float scale = kind == BOOK_HUGE ? 3.0e5f : kind == BOOK_TINY ? 1.0e-21f : 1.0f;
                for (size_t i = 0; i < N; i++)
                    make_vector(&rng, words, d, k, scale, xs + i * d);
                for (int path = 0; path < 5; path++) {
                    if ((path == 1 && !x86) || (path == 2 && !x512) || (path == 3 && !vnni) ||
                        (path == 4 && !x86))
                        continue;
                    if (path == 0)
                        vqkv__nearest_batch(xs, N, d, search, d, k, got);
                    else if (path == 1)
                        vqkv__nearest_batch_x86(xs, N, d, search, d, k, got);
                    else if (path == 2)
                        vqkv__nearest_batch_x512(xs, N, d, search, d, k, got);
                    else if (path == 3)
                        vqkv__nearest_batch_vnni(xs, N, d, search, d, k, got);
                    else
                        vqkv__nearest_batch_madd(xs, N, d, search, d, k, got);
                    for (size_t i = 0; i < N; i++) {
                        uint32_t want = vqkv__nearest_scalar(xs + i * d, search, d, k);
                        if (got[i] != want)
                            fail_msg("k %u d %u kind %d path %d vector %zu: %u, scalar %u", k, d,
                                     kind, path, i, got[i], want);
                    }
                    checked += N;
                }
                test_free_all(words, search);
            }
    print_message("%zu vectors checked\n", checked);
    test_free_all(xs, got);
}

/* The integer screen as the encoders call it (batches strided through
 * 128-channel rows, here of 32 vectors where the encoders' are 256; the
 * codebook's groups of 4, 8 or 16 channels)
 * settles nearly every vector itself and gives the reference's answers:
 * vectors at the codebook's scale, and vectors ten times smaller, for
 * which a third to half of the codewords score past the screen's range
 * (capped). Both screens, each at the group sizes it takes: AVX2's where
 * the CPU has AVX2 and FMA, VNNI's where it has AVX-512 VNNI (and says so
 * where it has not). */
typedef size_t (*screen_fn)(const float *, size_t, size_t, const float *, uint32_t, uint32_t,
                            uint32_t *);

static void screen_settles_encoder_batches(const char *name, screen_fn screen, uint32_t max_d)
{
    enum { BATCH = 32, BATCHES = 64, ROW = 128, K = 256 };
    static const uint32_t ds[] = {4, 8, 16};
    test_rng_t rng = {.state = 777};
    float *rows = malloc((size_t)BATCH * ROW * sizeof *rows);
    float *words = malloc((size_t)K * 16 * sizeof *words);
    float *search = malloc((size_t)K * 17 * sizeof *search);
    assert_non_null(rows);
    assert_non_null(words);
    assert_non_null(search);
    for (size_t di = 0; di < sizeof ds / sizeof ds[0] && ds[di] <= max_d; di++)
        for (int small = 0; small < 2; small++) {
            uint32_t d = ds[di], got[BATCH];
            size_t settled = 0;
            for (size_t i = 0; i < (size_t)K * d; i++)
                words[i] = (float)test_rng_gaussian(&rng);
            vqkv__search_prepare_nearest(words, d, K, search);
            for (int b = 0; b < BATCHES; b++) {
                for (size_t i = 0; i < (size_t)BATCH * ROW; i++)
                    rows[i] = (float)test_rng_gaussian(&rng) * (small ? 0.1f : 1.1f);
                uint32_t g = (uint32_t)b % (ROW / d); /* the group's channels in each row */
                settled += screen(rows + g * d, BATCH, ROW, search, d, K, got);
                for (uint32_t i = 0; i < BATCH; i++) {
                    uint32_t want =
                        vqkv__nearest_scalar(rows + (size_t)i * ROW + g * d, search, d, K);
                    if (got[i] != want)
                        fail_msg("%s: d %u small %d batch %d vector %u: %u, scalar %u", name, d,
                                 small, b, i, got[i], want);
                }
            }
            print_message("%s: d %u, small vectors %d: the screen settled %zu of %d\n", name, d,
                          small, settled, BATCH * BATCHES);
            assert_true(settled >= (size_t)BATCH * BATCHES * 9 / 10);
        }
    test_free_all(rows, words, search);
}

static void test_screen_settles_encoder_batches(void **state)
{
    (void)state;
    if (!vqkv__nearest_simd(8, 256) || !vqkv__simd_fma())
        skip(); /* no AVX2 and FMA here, or VQKV_CPU_SIMD=0: no screen to check */
    screen_settles_encoder_batches("AVX2", vqkv__nearest_batch_madd, 8);
    if (vqkv__simd_vnni())
        screen_settles_encoder_batches("AVX-512 VNNI", vqkv__nearest_batch_vnni, 16);
    else
        print_message("SKIPPED the VNNI screen: no AVX-512 VNNI on this CPU (or VQKV_CPU_SIMD "
                      "turned it off)\n");
}

/* Twins get norm +inf in the search form, the first of them its own; the
 * answers stay the reference's over the true norms. */
static void test_search_mark_twins(void **state)
{
    (void)state;
    const float words[4 * 2] = {1.0f, 2.0f, 0.0f, 0.0f, 1.0f, 2.0f, -0.0f, 0.0f};
    float search[4 * 3];
    vqkv__search_prepare(words, 2, 4, search);
    assert_true(search[2] == 5.0f); /* the true norm: commvq's soft E-step reads it */
    vqkv__search_mark_twins(words, 2, 4, search);
    assert_true(search[0] == 5.0f && search[1] == 0.0f);
    assert_true(search[2] == INFINITY); /* twin of 0 */
    assert_true(search[3] == 0.0f);     /* -0 differs in bits: kept */
    assert_int_equal(nearest((const float[2]){1.0f, 2.0f}, search, 2, 4), 0);
    assert_int_equal(nearest((const float[2]){0.0f, 0.0f}, search, 2, 4), 1);
}

/* k-means++'s distance pass: the AVX2 path's floats, running sums and
 * total are the scalar reference's, first pass and later ones, tails of
 * every length; the sums are mind's, added in point order. */
static void test_mind_update_simd_matches_scalar(void **state)
{
    (void)state;
    if (!vqkv__nearest_simd(8, 256))
        skip();
    test_rng_t rng = {.state = 77};
    static const size_t ns[] = {1, 7, 8, 9, 100, 1003};
    static const uint32_t ds[] = {1, 3, 8, 16};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
            size_t n = ns[ni];
            uint32_t d = ds[di];
            float *xt = malloc(n * d * sizeof *xt), *want = malloc(n * sizeof *want);
            float *got = malloc(n * sizeof *got), c[16];
            double *want_run = malloc(n * sizeof *want_run), *got_run = malloc(n * sizeof *got_run);
            assert_non_null(xt);
            assert_non_null(want);
            assert_non_null(got);
            assert_non_null(want_run);
            assert_non_null(got_run);
            for (size_t i = 0; i < n * d; i++)
                xt[i] = (float)test_rng_gaussian(&rng) * 3.0f;
            for (int pass = 0; pass < 3; pass++) {
                for (uint32_t j = 0; j < d; j++)
                    c[j] = (float)test_rng_gaussian(&rng);
                double want_total =
                    vqkv__mind_update_scalar(xt, n, 0, d, c, want, pass == 0, want_run, 0.0);
                double got_total = vqkv__mind_update_x86(xt, n, d, c, got, pass == 0, got_run);
                assert_memory_equal(got, want, n * sizeof *got);
                assert_memory_equal(got_run, want_run, n * sizeof *got_run);
                assert_true(got_total == want_total && want_total == want_run[n - 1]);
                double sum = 0.0;
                for (size_t i = 0; i < n; i++)
                    sum += want[i];
                assert_true(sum == want_total);
            }
            test_free_all(xt, want, got, want_run, got_run);
        }
}

/* ---- training through the codec -------------------------------------------- */

static uint8_t *trained_bytes(const char *spec, const vqkv_layout_t *l, size_t n,
                              const vqkv_train_opts_t *opts, size_t *len)
{
    vqkv_codec_t *codec = NULL;
    uint8_t *buf = NULL;
    assert_ok(vqkv_codec_create(spec, l, &codec));
    assert_ok(test_train_all(codec, 42, n, opts));
    assert_int_equal(vqkv_codec_needs_training(codec), 0);
    assert_ok(vqkv_codebook_save_buffer(codec, &buf, len));
    vqkv_codec_free(codec);
    return buf;
}

/* Same data and seed: the same codebooks, byte for byte, with one thread,
 * two, or one per CPU; another seed gives other codebooks. */
static void test_training_deterministic_across_threads(void **state)
{
    (void)state;
    /* Block-centered keys (bc=1) with escapes left out of the means, channel
     * statistics, sets per head, and the defaults. */
    static const char *const specs[] = {"rvq:d=8,b=6,r=2,bc=1,esc=3",
                                        "vqkv:b=5,dlo=2,dhi=4,dv=4,cs=1", "rvq:d=8,b=6,r=2,ph=1",
                                        "vqkv:b=5,ph=1,bc=1", "rvq:d=8,b=6,r=2"};
    vqkv_layout_t l = {1, 2, 32, 8, VQKV_DTYPE_F16};
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        vqkv_train_opts_t opts = {.seed = 17, .iterations = 4, .threads = 1};
        size_t len_one, len_two, len_all, len_other;
        uint8_t *one = trained_bytes(specs[si], &l, 512, &opts, &len_one);
        opts.threads = 2;
        uint8_t *two = trained_bytes(specs[si], &l, 512, &opts, &len_two);
        opts.threads = 0;
        uint8_t *all = trained_bytes(specs[si], &l, 512, &opts, &len_all);
        opts.seed = 18;
        uint8_t *other = trained_bytes(specs[si], &l, 512, &opts, &len_other);
        assert_int_equal(len_one, len_two);
        assert_int_equal(len_one, len_all);
        assert_memory_equal(one, two, len_one);
        assert_memory_equal(one, all, len_one);
        assert_int_equal(len_one, len_other);
        assert_memory_not_equal(one, other, len_one);
        test_free_all(one, two, all, other);
    }
}

/* Relative error of held-out blocks through a codec trained on n vectors. */
static void held_out_error(const char *spec, double err[2])
{
    vqkv_layout_t l = {1, 2, 64, 32, VQKV_DTYPE_F32};
    vqkv_train_opts_t opts = {.seed = 1, .iterations = 4};
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(spec, &l, &codec));
    assert_ok(test_train_all(codec, 42, 2048, &opts));
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, &l, 1);
    size_t n = test_block_values(&l);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    uint8_t *region = malloc(v.region_bytes), *block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(src && got && region && block);
    test_synth_block(&l, 42, 123, src);
    test_write_block(&l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(&l, &v, region, 0, got);
    err[0] = test_rel_error(&l, src, got, 0);
    err[1] = test_rel_error(&l, src, got, 1);
    test_free_all(src, got, region, block);
    vqkv_codec_free(codec);
}

/* Each residual stage quantizes what the ones before it left, so more
 * stages must mean clearly less error. */
static void test_more_stages_lower_error(void **state)
{
    (void)state;
    static const char *const specs[] = {"rvq:d=8,b=6,r=1", "rvq:d=8,b=6,r=2", "rvq:d=8,b=6,r=3"};
    double err[3][2];
    for (size_t i = 0; i < 3; i++) {
        held_out_error(specs[i], err[i]);
        print_message("  %-18s rel. error K %.4f  V %.4f\n", specs[i], err[i][0], err[i][1]);
    }
    for (size_t i = 1; i < 3; i++)
        for (int kv = 0; kv < 2; kv++)
            assert_true(err[i][kv] < 0.9 * err[i - 1][kv]);
}

/* Squared error of coding x[n][d] greedily through a chain of stages
 * (brute-force nearest by true distance: the test's own search). */
static double chain_error(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t stages,
                          float *const *words)
{
    double total = 0.0;
    float r[16];
    for (size_t i = 0; i < n; i++) {
        memcpy(r, x + i * d, d * sizeof *r);
        for (uint32_t s = 0; s < stages; s++) {
            uint32_t best = 0;
            for (uint32_t c = 1; c < k; c++)
                if (dist2(r, words[s] + (size_t)c * d, d) <
                    dist2(r, words[s] + (size_t)best * d, d))
                    best = c;
            for (uint32_t j = 0; j < d; j++)
                r[j] -= words[s][(size_t)best * d + j];
        }
        for (uint32_t j = 0; j < d; j++)
            total += (double)r[j] * r[j];
    }
    return total;
}

/* A residual chain trained greedily, then refined jointly: its error on
 * the points it was trained on falls, on points it never saw it does not
 * rise, and the search forms follow the centroids (a stale one would code
 * with the old centroids' norms). */
static void test_rvq_refine_lowers_error(void **state)
{
    (void)state;
    enum { N = 4096, D = 4, K = 16, STAGES = 3 };
    float *x = gaussian_points(N, D, 5), *unseen = gaussian_points(N, D, 6);
    float *resid = malloc(N * D * sizeof *resid), *fresh = malloc(K * (D + 1) * sizeof *fresh);
    float words[STAGES][K * D], search[STAGES][K * (D + 1)];
    float *wp[STAGES], *sp[STAGES];
    uint32_t codes[STAGES * N];
    assert_true(resid && fresh);
    memcpy(resid, x, N * D * sizeof *resid);
    for (uint32_t s = 0; s < STAGES; s++) {
        wp[s] = words[s];
        sp[s] = search[s];
        assert_ok(vqkv__kmeans(resid, N, D, K, 8, 7 + s, NULL, words[s]));
        vqkv__search_prepare_nearest(words[s], D, K, search[s]);
        vqkv__rvq_stage(resid, N, D, words[s], search[s], D, K, codes + s * N, true);
    }
    double seen0 = chain_error(x, N, D, K, STAGES, wp);
    double unseen0 = chain_error(unseen, N, D, K, STAGES, wp);
    assert_ok(vqkv__rvq_refine(x, N, D, K, STAGES, 4, wp, sp, codes, resid));
    double seen1 = chain_error(x, N, D, K, STAGES, wp);
    double unseen1 = chain_error(unseen, N, D, K, STAGES, wp);
    print_message("  greedy %.1f / %.1f, refined %.1f / %.1f (trained on / unseen)\n", seen0,
                  unseen0, seen1, unseen1);
    assert_true(seen1 < 0.98 * seen0);
    assert_true(unseen1 < unseen0);
    for (uint32_t s = 0; s < STAGES; s++) {
        vqkv__search_prepare_nearest(words[s], D, K, fresh);
        assert_memory_equal(fresh, search[s], K * (D + 1) * sizeof *fresh);
    }
    test_free_all(x, unseen, resid, fresh);
}

/* A refused training call changes nothing: a non-finite value anywhere in
 * the vectors is refused before the codebooks are touched. */
static void test_training_refuses_non_finite(void **state)
{
    (void)state;
    vqkv_layout_t l = {1, 2, 16, 4, VQKV_DTYPE_F16};
    vqkv_train_opts_t opts = {.seed = 2, .iterations = 2};
    enum { N = 128 };
    vqkv_codec_t *codec = NULL;
    /* This codec block-centers its keys (escapes left out of the means)
     * before it fits the statistics: non-finite values must still be
     * refused before anything changes. */
    assert_ok(vqkv_codec_create("rvq:d=4,b=4,r=1,bc=1,esc=2", &l, &codec));
    float *x = malloc(N * 16 * sizeof *x);
    assert_non_null(x);
    const float bad_values[] = {NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < 3; i++) {
        test_synth_vectors(42, 1, 0, 0, 16, N, x);
        x[(N - 1) * 16 + 15] = bad_values[i]; /* the very last value */
        assert_rc(vqkv_codec_train(codec, 0, 0, x, N, &opts), VQKV_EINVAL);
    }
    assert_int_equal(vqkv_codec_needs_training(codec), 1);

    assert_ok(test_train_all(codec, 42, N, &opts));
    uint8_t *before = NULL;
    size_t before_len;
    assert_ok(vqkv_codebook_save_buffer(codec, &before, &before_len));
    test_synth_vectors(42, 7, 0, 1, 16, N, x);
    x[3] = NAN;
    assert_rc(vqkv_codec_train(codec, 0, 1, x, N, &opts), VQKV_EINVAL);
    /* Keys are block-centered first: the refusal still comes before
     * anything is touched. */
    test_synth_vectors(42, 8, 0, 0, 16, N, x);
    x[N * 16 - 1] = INFINITY;
    assert_rc(vqkv_codec_train(codec, 0, 0, x, N, &opts), VQKV_EINVAL);
    assert_int_equal(vqkv_codec_needs_training(codec), 0);
    test_assert_saves_as(codec, before, before_len);
    free(before);
    free(x);
    vqkv_codec_free(codec);
}

/* Training on the same data with max_samples capping it is still
 * deterministic, and a cap above the data size changes nothing. */
static void test_training_max_samples(void **state)
{
    (void)state;
    vqkv_layout_t l = {1, 2, 16, 4, VQKV_DTYPE_F16};
    vqkv_train_opts_t opts = {.seed = 4, .iterations = 3, .max_samples = 100};
    size_t len_a, len_b, len_c, len_d;
    uint8_t *a = trained_bytes("rvq:d=4,b=4,r=2", &l, 400, &opts, &len_a);
    uint8_t *b = trained_bytes("rvq:d=4,b=4,r=2", &l, 400, &opts, &len_b);
    assert_int_equal(len_a, len_b);
    assert_memory_equal(a, b, len_a);
    opts.max_samples = 400;
    uint8_t *c = trained_bytes("rvq:d=4,b=4,r=2", &l, 400, &opts, &len_c);
    opts.max_samples = 100000;
    uint8_t *d = trained_bytes("rvq:d=4,b=4,r=2", &l, 400, &opts, &len_d);
    assert_int_equal(len_c, len_d);
    assert_memory_equal(c, d, len_c);
    test_free_all(a, b, c, d);
}

/* ---- a codebook set per kv head (ph=1) --------------------------------------- */

/* Trains every (layer, kv) of a new codec from gen(layer, kv, out), n
 * vectors [tokens][heads][dim] each. */
typedef void (*vector_gen_t)(const vqkv_layout_t *l, uint32_t layer, int kv, size_t n, float *out,
                             const void *arg);

static vqkv_codec_t *trained_with(const char *spec, const vqkv_layout_t *l, size_t n,
                                  vector_gen_t gen, const void *arg, const vqkv_train_opts_t *opts)
{
    vqkv_codec_t *codec = NULL;
    float *x = malloc(n * l->head_dim * sizeof *x);
    assert_non_null(x);
    assert_ok(vqkv_codec_create(spec, l, &codec));
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            gen(l, layer, kv, n, x, arg);
            assert_ok(vqkv_codec_train(codec, layer, kv, x, n, opts));
        }
    free(x);
    return codec;
}

static vqkv_codec_t *trained_on(const char *spec, const vqkv_layout_t *l, size_t n,
                                vector_gen_t gen, const void *arg)
{
    vqkv_train_opts_t opts = {.seed = 21, .iterations = 8};
    return trained_with(spec, l, n, gen, arg, &opts);
}

/* Encodes and decodes src[block values] in f32 memory. */
static void round_trip(const vqkv_codec_t *codec, const float *src, float *got)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    vqkv_kv_view_t v;
    vqkv_kv_view_vllm(&v, l, 1);
    uint8_t *region = malloc(v.region_bytes), *block = malloc(vqkv_codec_block_bytes(codec));
    assert_true(region && block);
    test_write_block(l, &v, region, 0, src);
    assert_ok(vqkv_codec_encode(codec, region, &v, 0, block));
    assert_ok(vqkv_codec_decode(codec, block, region, &v, 0));
    test_read_block(l, &v, region, 0, got);
    free(region);
    free(block);
}

/* Each head's vectors are one of 16 patterns of its own plus a little noise:
 * heads as different as they come. arg points to the sample seed. */
enum { PATTERNS = 16 };

static void head_patterns(const vqkv_layout_t *l, uint32_t layer, int kv, size_t n, float *out,
                          const void *arg)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    test_rng_t rng = {*(const uint64_t *)arg * 7919u + layer * 2u + (uint64_t)kv};
    for (size_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)(i % H), k = (uint32_t)(test_rng_next(&rng) % PATTERNS);
        /* Pattern (layer, kv, h, k), the same for every sample seed. */
        test_rng_t pattern = {1000003u * (layer * 2u + (uint64_t)kv) + 101u * h + k + 1u};
        for (uint32_t d = 0; d < D; d++)
            out[i * D + d] =
                (float)(2.0 * test_rng_gaussian(&pattern) + 0.01 * test_rng_gaussian(&rng));
    }
}

/* With ph=1 each head gets codebooks trained on its own vectors: 2^b = 16
 * codewords per group can hold one head's 16 patterns, not the 32 of two
 * heads, so per-head sets reconstruct held-out vectors far better than one
 * shared set. */
static void test_per_head_sets_fit_each_head(void **state)
{
    (void)state;
    vqkv_layout_t l = {1, 2, 32, 64, VQKV_DTYPE_F32};
    static const char *const specs[2] = {"rvq:d=8,b=4,r=1,bc=0,ph=0", "rvq:d=8,b=4,r=1,bc=0,ph=1"};
    const uint64_t train_seed = 1, test_seed = 2;
    size_t n = test_block_values(&l);
    float *src = malloc(n * sizeof *src), *got = malloc(n * sizeof *got);
    assert_true(src && got);
    for (int kv = 0; kv < 2; kv++)
        head_patterns(&l, 0, kv, (size_t)l.block_tokens * l.num_kv_heads,
                      src + test_block_index(&l, 0, kv, 0, 0, 0), &test_seed);
    double err[2][2];
    for (int ph = 0; ph < 2; ph++) {
        vqkv_codec_t *codec = trained_on(specs[ph], &l, 4096, head_patterns, &train_seed);
        round_trip(codec, src, got);
        for (int kv = 0; kv < 2; kv++)
            err[ph][kv] = test_rel_error(&l, src, got, kv);
        vqkv_codec_free(codec);
    }
    print_message("  two kinds of heads: shared set K %.4f V %.4f, a set per head K %.4f V %.4f\n",
                  err[0][0], err[0][1], err[1][0], err[1][1]);
    for (int kv = 0; kv < 2; kv++)
        assert_true(err[1][kv] < 0.5 * err[0][kv]);
    free(src);
    free(got);
}

/* Synthetic vectors, with head *arg's replaced by other draws from another
 * distribution (none when *arg is negative). */
static void synth_maybe_other_head(const vqkv_layout_t *l, uint32_t layer, int kv, size_t n,
                                   float *out, const void *arg)
{
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    int head = *(const int *)arg;
    test_synth_vectors(42, 0x7a11u, layer, kv, D, n, out);
    if (head >= 0) {
        test_rng_t rng = {99 + layer * 2u + (uint64_t)kv};
        for (size_t i = (size_t)head; i < n; i += H)
            for (uint32_t d = 0; d < D; d++)
                out[i * D + d] = (float)(5.0 + 3.0 * test_rng_gaussian(&rng));
    }
}

/* Head h's set learns from head h's vectors alone: training data that
 * differs only in head 1 gives codecs that code heads 0 and 2 identically
 * (block means, channel statistics and codebooks alike) and head 1
 * differently. With one shared set, every head sees the change. */
static void test_per_head_sets_learn_from_their_head_only(void **state)
{
    (void)state;
    vqkv_layout_t l = {2, 3, 16, 8, VQKV_DTYPE_F32};
    static const char *const specs[] = {"rvq:d=4,b=4,r=2,ph=1,bc=1",
                                        "vqkv:b=4,dlo=2,dhi=4,dv=4,ph=1",
                                        "rvq:d=4,b=4,r=2,ph=1,cs=1", "rvq:d=4,b=4,r=2,ph=0"};
    const int same = -1, other = 1;
    size_t n = test_block_values(&l);
    float *src = malloc(n * sizeof *src), *got[2];
    got[0] = malloc(n * sizeof *got[0]);
    got[1] = malloc(n * sizeof *got[1]);
    assert_true(src && got[0] && got[1]);
    test_synth_block(&l, 42, 555, src);
    for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
        vqkv_codec_t *a = trained_on(specs[si], &l, 240, synth_maybe_other_head, &same);
        vqkv_codec_t *b = trained_on(specs[si], &l, 240, synth_maybe_other_head, &other);
        round_trip(a, src, got[0]);
        round_trip(b, src, got[1]);
        int per_head = strstr(specs[si], "ph=1") != NULL;
        for (uint32_t layer = 0; layer < l.num_layers; layer++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t h = 0; h < l.num_kv_heads; h++) {
                    int differs = 0;
                    for (uint32_t t = 0; t < l.block_tokens; t++) {
                        size_t at = test_block_index(&l, layer, kv, t, h, 0);
                        differs |= memcmp(got[0] + at, got[1] + at, l.head_dim * sizeof(float));
                    }
                    int want_differs = h == 1 || !per_head;
                    if ((differs != 0) != want_differs) {
                        print_error("%s: layer %u %s head %u decodes %s when only head 1's "
                                    "training vectors changed\n",
                                    specs[si], layer, kv ? "V" : "K", h,
                                    differs ? "differently" : "the same");
                        fail();
                    }
                }
        vqkv_codec_free(a);
        vqkv_codec_free(b);
    }
    test_free_all(src, got[0], got[1]);
}

/* A cap on the samples (max_samples) still gives a shared set every
 * head's vectors: the even stride runs over tokens, each taken with all
 * its heads. It ran over (token, head) rows, so a stride that is a
 * multiple of the head count took one head alone (4 heads at 4x the cap:
 * rows 0, 4, 8, ..., head 0) and 1.5 with 3 heads never took head 2: on
 * SmolLM2's 3 heads at 8192 calibration tokens, a shared set that never
 * saw head 2 raised perplexity by 155%. Data that differ only in head h
 * must then train a shared set differently, for every h. */
static void test_max_samples_keep_every_head(void **state)
{
    (void)state;
    static const struct {
        uint32_t heads, tokens, cap;
    } cases[] = {{4, 64, 64}, {3, 128, 256}};
    const int none = -1;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        vqkv_layout_t l = {1, cases[ci].heads, 16, 8, VQKV_DTYPE_F32};
        vqkv_train_opts_t opts = {.seed = 21, .iterations = 4, .max_samples = cases[ci].cap};
        size_t n = (size_t)cases[ci].tokens * cases[ci].heads, len_a, len_b;
        uint8_t *a = NULL, *b = NULL;
        vqkv_codec_t *base = trained_with("rvq:d=4,b=4,r=2", &l, n, synth_maybe_other_head, &none,
                                          &opts);
        assert_ok(vqkv_codebook_save_buffer(base, &a, &len_a));
        for (int h = 0; h < (int)cases[ci].heads; h++) {
            vqkv_codec_t *c =
                trained_with("rvq:d=4,b=4,r=2", &l, n, synth_maybe_other_head, &h, &opts);
            assert_ok(vqkv_codebook_save_buffer(c, &b, &len_b));
            assert_int_equal(len_a, len_b);
            if (memcmp(a, b, len_a) == 0) {
                print_error("%u heads, %zu vectors, at most %u samples: head %d's vectors "
                            "were not trained on\n",
                            cases[ci].heads, n, cases[ci].cap, h);
                fail();
            }
            free(b);
            vqkv_codec_free(c);
        }
        free(a);
        vqkv_codec_free(base);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kmeans_recovers_clusters),
        cmocka_unit_test(test_kmeans_deterministic_by_seed),
        cmocka_unit_test(test_kmeans_iterations_lower_distortion),
        cmocka_unit_test(test_kmeans_fewer_points_than_centroids),
        cmocka_unit_test(test_kmeans_identical_points),
        cmocka_unit_test(test_kmeanspp_draws_the_only_far_point),
        cmocka_unit_test(test_nearest_matches_brute_force),
        cmocka_unit_test(test_nearest_simd_matches_scalar),
        cmocka_unit_test(test_nearest_batch_matches_scalar),
        cmocka_unit_test(test_screen_settles_encoder_batches),
        cmocka_unit_test(test_search_mark_twins),
        cmocka_unit_test(test_mind_update_simd_matches_scalar),
        cmocka_unit_test(test_training_deterministic_across_threads),
        cmocka_unit_test(test_more_stages_lower_error),
        cmocka_unit_test(test_rvq_refine_lowers_error),
        cmocka_unit_test(test_training_refuses_non_finite),
        cmocka_unit_test(test_training_max_samples),
        cmocka_unit_test(test_max_samples_keep_every_head),
        cmocka_unit_test(test_per_head_sets_fit_each_head),
        cmocka_unit_test(test_per_head_sets_learn_from_their_head_only),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
