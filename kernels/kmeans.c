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

#include "vqkv_codec.h"

#include <float.h>
#include <stdlib.h>
#include <string.h>

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

uint32_t vqkv__nearest(const float *x, const float *search, uint32_t d, uint32_t k)
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

static void vqkv__kmeanspp(const float *x, size_t n, uint32_t d, uint32_t k, uint64_t *rng,
                           float *centroids, float *mind)
{
    size_t first = (size_t)(vqkv__uniform(rng) * (double)n);
    memcpy(centroids, x + first * d, d * sizeof(float));
    double total = 0.0;
    for (size_t i = 0; i < n; i++) {
        mind[i] = vqkv__dist2(x + i * d, centroids, d);
        total += mind[i];
    }
    for (uint32_t c = 1; c < k; c++) {
        size_t pick = (size_t)c % n;
        if (total > 0.0) {
            double target = vqkv__uniform(rng) * total, run = 0.0;
            for (pick = 0; pick + 1 < n; pick++) {
                run += mind[pick];
                if (run > target)
                    break;
            }
        }
        float *cv = centroids + (size_t)c * d;
        memcpy(cv, x + pick * d, d * sizeof(float));
        total = 0.0;
        for (size_t i = 0; i < n; i++) {
            float dist = vqkv__dist2(x + i * d, cv, d);
            if (dist < mind[i])
                mind[i] = dist;
            total += mind[i];
        }
    }
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
    uint32_t *next = assigner != NULL ? malloc(n * sizeof *next) : NULL;
    if (mind == NULL || search == NULL || sums == NULL || counts == NULL || assign == NULL ||
        (assigner != NULL && next == NULL))
        goto out;

    vqkv__kmeanspp(x, n, d, k, &rng, centroids, mind);
    for (uint32_t it = 0; it < iterations; it++) {
        vqkv__search_prepare(centroids, d, k, search);
        memset(sums, 0, (size_t)k * d * sizeof *sums);
        memset(counts, 0, k * sizeof *counts);
        size_t moved = 0;
        if (assigner != NULL) {
            rc = assigner->assign(assigner->ctx, x, n, d, centroids, search, k, next, mind);
            if (rc != VQKV_OK)
                goto out;
        }
        for (size_t i = 0; i < n; i++) {
            const float *xi = x + i * d;
            uint32_t c = assigner != NULL ? next[i] : vqkv__nearest(xi, search, d, k);
            moved += it == 0 || c != assign[i];
            assign[i] = c;
            if (assigner == NULL)
                mind[i] = vqkv__dist2(xi, centroids + (size_t)c * d, d);
            counts[c]++;
            for (uint32_t j = 0; j < d; j++)
                sums[(size_t)c * d + j] += xi[j];
        }
        if (moved == 0)
            break;
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
