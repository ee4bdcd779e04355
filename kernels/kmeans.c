/* kmeans.c -- codebook training by k-means.
 *
 * Seeding is k-means++ (each new centroid drawn with probability
 * proportional to its squared distance from the nearest chosen one), then
 * Lloyd iterations. Each iteration costs O(n*k*d) for the assignment, which
 * dominates; sums are accumulated in data order so results do not depend on
 * anything but the inputs. An emptied cluster is re-seeded with the point
 * farthest from its centroid, the usual cheap fix.
 */
#include "kmeans.h"

#include "codec_internal.h"

#include "vqkv_codec.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Gives each centroid bit for bit equal to an earlier one the norm +inf.
 * No search picks such a twin (the earlier one ties with it and comes
 * first), and none picks a norm of +inf either (its distance stays +inf or
 * turns NaN), so nearest searches answer as before; soft assignments
 * would not (commvq's E-step), which is why search_prepare leaves it to
 * callers. What changes is that a codebook full of twins (all zero in a
 * residual stage left nothing to code, or training's repeated points) no
 * longer hands the batch search's fused pass (search_x86.c) a tie on every
 * vector, each then searched again exactly. Each row hashed, then looked up
 * in an open-addressed table of 2k slots; O(k*d). Codebooks over
 * VQKV__FUSED_MAX_K codewords, which that pass leaves alone, are left as
 * they are. */
void vqkv__search_mark_twins(const float *centroids, uint32_t d, uint32_t k, float *search)
{
    uint32_t hash[VQKV__FUSED_MAX_K], mask = 2 * k - 1;
    uint16_t table[2 * VQKV__FUSED_MAX_K];
    if (k > VQKV__FUSED_MAX_K || (k & (k - 1)) != 0)
        return;
    for (uint32_t c = 0; c < k; c++) {
        uint64_t h = 0;
        for (uint32_t j = 0; j < d; j++) {
            uint32_t bits;
            memcpy(&bits, centroids + (size_t)c * d + j, sizeof bits);
            h = vqkv__mix64(h ^ bits);
        }
        hash[c] = (uint32_t)(h >> 32);
    }
    memset(table, 0xff, 2 * k * sizeof *table);
    for (uint32_t c = 0; c < k; c++) {
        uint32_t at = hash[c] & mask;
        const float *row = centroids + (size_t)c * d;
        while (table[at] != 0xffff &&
               (hash[table[at]] != hash[c] ||
                memcmp(centroids + (size_t)table[at] * d, row, d * sizeof *row) != 0))
            at = (at + 1) & mask;
        if (table[at] == 0xffff)
            table[at] = (uint16_t)c;
        else
            search[c] = INFINITY;
    }
}

void vqkv__search_prepare(const float *centroids, uint32_t d, uint32_t k, float *search)
{
    float *norms2 = search, *wt = search + k;
    for (uint32_t c = 0; c < k; c++) {
        float s = 0.0f;
        for (uint32_t j = 0; j < d; j++) {
            float w = centroids[(size_t)c * d + j];
            s += w * w;
            wt[(size_t)j * k + c] = w;
        }
        norms2[c] = s;
    }
}

void vqkv__search_prepare_nearest(const float *centroids, uint32_t d, uint32_t k, float *search)
{
    vqkv__search_prepare(centroids, d, k, search);
    vqkv__search_mark_twins(centroids, d, k, search);
}

void vqkv__nearest_batch(const float *xs, size_t n, size_t stride, const float *search, uint32_t d,
                         uint32_t k, uint32_t *out)
{
    if (!vqkv__nearest_simd(d, k))
        vqkv__nearest_batch_scalar(xs, n, stride, search, d, k, out);
    else if (vqkv__simd_vnni() && n >= VQKV__SCREEN_MIN_N)
        vqkv__nearest_batch_vnni(xs, n, stride, search, d, k, out);
    else if (vqkv__simd_avx512())
        vqkv__nearest_batch_x512(xs, n, stride, search, d, k, out);
    else if (vqkv__simd_fma() && n >= VQKV__SCREEN_MIN_N)
        vqkv__nearest_batch_madd(xs, n, stride, search, d, k, out);
    else if (vqkv__simd_fma())
        vqkv__nearest_batch_x86(xs, n, stride, search, d, k, out);
    else
        for (size_t i = 0; i < n; i++)
            out[i] = vqkv__nearest_x86(xs + i * stride, search, d, k);
}

void vqkv__nearest_batch_scalar(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out)
{
    for (size_t i = 0; i < n; i++)
        out[i] = vqkv__nearest_scalar(xs + i * stride, search, d, k);
}

uint32_t vqkv__nearest_scalar(const float *x, const float *search, uint32_t d, uint32_t k)
{
    enum { CHUNK = 256 };
    const float *norms2 = search, *wt = search + k;
    float dist[CHUNK], best_dist = FLT_MAX;
    uint32_t best = 0;
    for (uint32_t c0 = 0; c0 < k; c0 += CHUNK) {
        uint32_t n = k - c0 < CHUNK ? k - c0 : CHUNK;
        memcpy(dist, norms2 + c0, n * sizeof *dist);
        for (uint32_t j = 0; j < d; j++) {
            float m = -2.0f * x[j];
            const float *w = wt + (size_t)j * k + c0;
            for (uint32_t i = 0; i < n; i++)
                dist[i] += m * w[i];
        }
        /* The chunk's least distance, then the first codeword at it: what
         * a scan keeping the first strictly smaller one finds, NaNs never
         * chosen, but in two passes the compiler vectorizes. */
        float least = best_dist;
        for (uint32_t i = 0; i < n; i++)
            least = dist[i] < least ? dist[i] : least;
        if (least < best_dist) {
            uint32_t i = 0;
            while (dist[i] != least)
                i++;
            best_dist = least;
            best = c0 + i;
        }
    }
    return best;
}

static float vqkv__dist2(const float *a, const float *b, uint32_t d)
{
    float s = 0.0f;
    for (uint32_t j = 0; j < d; j++)
        s += (a[j] - b[j]) * (a[j] - b[j]);
    return s;
}

/* Uniform double in [0, 1) from the generator state. */
static double vqkv__uniform(uint64_t *state)
{
    *state = vqkv__mix64(*state);
    return (double)(*state >> 11) * (1.0 / 9007199254740992.0);
}

double vqkv__mind_update_scalar(const float *xt, size_t n, size_t start, uint32_t d, const float *c,
                                float *mind, bool first, double *run, double total)
{
    for (size_t i = start; i < n; i++) {
        float s = 0.0f;
        for (uint32_t j = 0; j < d; j++)
            s += (xt[(size_t)j * n + i] - c[j]) * (xt[(size_t)j * n + i] - c[j]);
        mind[i] = first || s < mind[i] ? s : mind[i];
        run[i] = total += mind[i];
    }
    return total;
}

double vqkv__mind_update(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                         bool first, double *run)
{
    if (vqkv__simd_enabled())
        return vqkv__mind_update_x86(xt, n, d, c, mind, first, run);
    return vqkv__mind_update_scalar(xt, n, 0, d, c, mind, first, run, 0.0);
}

/* The point a k-means++ draw picks for target: the first i < n - 1 whose
 * running sum passes it, else the last point. The sums never fall (mind is
 * never negative; a NaN total skips the draw), so a binary search finds
 * what a scan in point order would: O(log n) where the scan was O(n). */
static size_t vqkv__draw_point(const double *run, size_t n, double target)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (run[mid] > target)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* k-means++: O(n*k*d), each pass over the points reading them transposed
 * (xt), so that eight points' distances are built at once. */
static int vqkv__kmeanspp(const float *x, size_t n, uint32_t d, uint32_t k, uint64_t *rng,
                          float *centroids, float *mind)
{
    float *xt = malloc(n * d * sizeof *xt);
    double *run = malloc(n * sizeof *run);
    if (xt == NULL || run == NULL) {
        free(xt);
        free(run);
        return VQKV_ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            xt[(size_t)j * n + i] = x[i * d + j];
    size_t first = (size_t)(vqkv__uniform(rng) * (double)n);
    memcpy(centroids, x + first * d, d * sizeof(float));
    double total = vqkv__mind_update(xt, n, d, centroids, mind, true, run);
    for (uint32_t c = 1; c < k; c++) {
        size_t pick = (size_t)c % n;
        if (total > 0.0)
            pick = vqkv__draw_point(run, n, vqkv__uniform(rng) * total);
        float *cv = centroids + (size_t)c * d;
        memcpy(cv, x + pick * d, d * sizeof(float));
        total = vqkv__mind_update(xt, n, d, cv, mind, false, run);
    }
    free(xt);
    free(run);
    return VQKV_OK;
}

/* Whether some cluster of k has no point. */
static bool vqkv__some_empty(const size_t *counts, uint32_t k)
{
    for (uint32_t c = 0; c < k; c++)
        if (counts[c] == 0)
            return true;
    return false;
}

int vqkv__kmeans(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t iterations,
                 uint64_t seed, const vqkv_assigner_t *assigner, float *centroids)
{
    int rc = VQKV_ENOMEM;
    uint64_t rng = seed;
    float *mind = malloc(n * sizeof *mind);
    float *search = malloc((size_t)k * (d + 1) * sizeof *search);
    double *sums = malloc((size_t)k * d * sizeof *sums);
    size_t *counts = malloc(k * sizeof *counts);
    uint32_t *assign = malloc(n * sizeof *assign);
    uint32_t *next = malloc(n * sizeof *next);
    if (mind == NULL || search == NULL || sums == NULL || counts == NULL || assign == NULL ||
        next == NULL)
        goto out;

    if (vqkv__kmeanspp(x, n, d, k, &rng, centroids, mind) != VQKV_OK)
        goto out;
    for (uint32_t it = 0; it < iterations; it++) {
        vqkv__search_prepare_nearest(centroids, d, k, search);
        memset(sums, 0, (size_t)k * d * sizeof *sums);
        memset(counts, 0, k * sizeof *counts);
        size_t moved = 0;
        if (assigner == NULL)
            vqkv__nearest_batch(x, n, d, search, d, k, next);
        else if ((rc = assigner->assign(assigner->ctx, x, n, d, centroids, search, k, next,
                                        mind)) != VQKV_OK)
            goto out;
        for (size_t i = 0; i < n; i++) {
            const float *xi = x + i * d;
            uint32_t c = next[i];
            moved += it == 0 || c != assign[i];
            assign[i] = c;
            counts[c]++;
            for (uint32_t j = 0; j < d; j++)
                sums[(size_t)c * d + j] += xi[j];
        }
        if (moved == 0)
            break;
        /* Each point's distance to its centroid serves only to re-seed an
         * emptied cluster, so it is computed only then (the assigner gives
         * it anyway): rare after the first iterations, and O(n*d) saved
         * on every other. */
        if (assigner == NULL && n > k && vqkv__some_empty(counts, k))
            for (size_t i = 0; i < n; i++)
                mind[i] = vqkv__dist2(x + i * d, centroids + (size_t)assign[i] * d, d);
        for (uint32_t c = 0; c < k; c++) {
            float *cv = centroids + (size_t)c * d;
            if (counts[c] > 0) {
                for (uint32_t j = 0; j < d; j++)
                    cv[j] = (float)(sums[(size_t)c * d + j] / (double)counts[c]);
                continue;
            }
            if (n <= k)
                continue;
            size_t far = 0;
            for (size_t i = 1; i < n; i++)
                if (mind[i] > mind[far])
                    far = i;
            memcpy(cv, x + far * d, d * sizeof(float));
            mind[far] = 0.0f;
        }
    }
    rc = VQKV_OK;
out:
    free(mind);
    free(search);
    free(sums);
    free(counts);
    free(assign);
    free(next);
    return rc;
}

/* Each x_i = xs + i * stride less its codeword words[codes[i]] (d at
 * most VQKV_MAX_HEAD_DIM). The differences go through t so that GCC,
 * which cannot tell x from w, still vectorizes the row. */
static inline void vqkv__subtract_rows(float *xs, size_t n, size_t stride, const float *words,
                                       uint32_t d, const uint32_t *codes)
{
    float t[VQKV_MAX_HEAD_DIM];
    for (size_t i = 0; i < n; i++) {
        float *x = xs + i * stride;
        const float *w = words + (size_t)codes[i] * d;
        for (uint32_t j = 0; j < d; j++)
            t[j] = x[j] - w[j];
        memcpy(x, t, d * sizeof *x);
    }
}

/* vqkv__subtract_rows with d a constant in the common group sizes: a
 * row's update is then one or two vector operations rather than a counted
 * loop. */
static void vqkv__subtract_codewords(float *xs, size_t n, size_t stride, const float *words,
                                     uint32_t d, const uint32_t *codes)
{
    switch (d) {
    case 4: vqkv__subtract_rows(xs, n, stride, words, 4, codes); break;
    case 8: vqkv__subtract_rows(xs, n, stride, words, 8, codes); break;
    case 16: vqkv__subtract_rows(xs, n, stride, words, 16, codes); break;
    default: vqkv__subtract_rows(xs, n, stride, words, d, codes);
    }
}

void vqkv__rvq_stage(float *xs, size_t n, size_t stride, const float *words, const float *search,
                     uint32_t d, uint32_t k, uint32_t *codes, bool subtract)
{
    vqkv__nearest_batch(xs, n, stride, search, d, k, codes);
    if (subtract)
        vqkv__subtract_codewords(xs, n, stride, words, d, codes);
}

/* The sum of v[i]^2 over n floats, in double. */
static double vqkv__sum_squares(const float *v, size_t n)
{
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += (double)v[i] * v[i];
    return sum;
}

/* Codes x[n][d] greedily through the chain into codes[stages][n], leaving
 * resid = what it misses; returns the total squared error. */
static double vqkv__rvq_code(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t stages,
                             float *const *words, float *const *search, float *resid,
                             uint32_t *codes)
{
    memcpy(resid, x, n * d * sizeof *resid);
    for (uint32_t s = 0; s < stages; s++)
        vqkv__rvq_stage(resid, n, d, words[s], search[s], d, k, codes + s * n, true);
    return vqkv__sum_squares(resid, n * d);
}

/* Sets each centroid of words[k][d] to the mean of what the other stages
 * leave of the points coded with it (codes cs), resid kept as what the
 * whole chain misses; then its search form. */
static void vqkv__rvq_refit(size_t n, uint32_t d, uint32_t k, const uint32_t *cs, float *words,
                            float *search, float *resid, double *sums, size_t *counts)
{
    memset(sums, 0, (size_t)k * d * sizeof *sums);
    memset(counts, 0, k * sizeof *counts);
    for (size_t i = 0; i < n; i++) { /* resid: the other stages' leftover */
        float *ri = resid + i * d;
        const float *w = words + (size_t)cs[i] * d;
        counts[cs[i]]++;
        for (uint32_t j = 0; j < d; j++) {
            ri[j] += w[j];
            sums[(size_t)cs[i] * d + j] += ri[j];
        }
    }
    for (uint32_t c = 0; c < k; c++)
        for (uint32_t j = 0; j < d && counts[c] > 0; j++)
            words[(size_t)c * d + j] = (float)(sums[(size_t)c * d + j] / (double)counts[c]);
    vqkv__subtract_codewords(resid, n, d, words, d, cs);
    vqkv__search_prepare_nearest(words, d, k, search);
}

int vqkv__rvq_refine(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t stages,
                     uint32_t rounds, float *const *words, float *const *search, uint32_t *codes,
                     float *resid)
{
    size_t floats = (size_t)k * d;
    float *saved = malloc(stages * floats * sizeof *saved);
    double *sums = malloc(floats * sizeof *sums);
    size_t *counts = malloc(k * sizeof *counts);
    int rc = VQKV_ENOMEM;
    if (saved == NULL || sums == NULL || counts == NULL)
        goto out;
    double err = vqkv__sum_squares(resid, n * d);
    for (uint32_t round = 0; round < rounds; round++) {
        for (uint32_t s = 0; s < stages; s++) {
            memcpy(saved + s * floats, words[s], floats * sizeof *saved);
            vqkv__rvq_refit(n, d, k, codes + s * n, words[s], search[s], resid, sums, counts);
        }
        double next = vqkv__rvq_code(x, n, d, k, stages, words, search, resid, codes);
        if (next < err) {
            err = next;
            continue;
        }
        for (uint32_t s = 0; s < stages; s++) {
            memcpy(words[s], saved + s * floats, floats * sizeof *saved);
            vqkv__search_prepare_nearest(words[s], d, k, search[s]);
        }
        break;
    }
    rc = VQKV_OK;
out:
    free(saved);
    free(sums);
    free(counts);
    return rc;
}
