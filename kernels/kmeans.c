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

void vqkv__centroid_norms(const float *centroids, uint32_t d, uint32_t k, float *norms2)
{
    for (uint32_t c = 0; c < k; c++) {
        float s = 0.0f;
        for (uint32_t j = 0; j < d; j++)
            s += centroids[(size_t)c * d + j] * centroids[(size_t)c * d + j];
        norms2[c] = s;
    }
}

uint32_t vqkv__nearest(const float *x, const float *centroids, const float *norms2, uint32_t d,
                       uint32_t k)
{
    uint32_t best = 0;
    float best_dist = FLT_MAX;
    for (uint32_t c = 0; c < k; c++) {
        const float *cv = centroids + (size_t)c * d;
        float dot = 0.0f;
        for (uint32_t j = 0; j < d; j++)
            dot += x[j] * cv[j];
        float dist = norms2[c] - 2.0f * dot;
        if (dist < best_dist) {
            best_dist = dist;
            best = c;
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
                 uint64_t seed, float *centroids)
{
    int rc = VQKV_ENOMEM;
    uint64_t rng = seed;
    float *mind = malloc(n * sizeof *mind);
    float *norms2 = malloc(k * sizeof *norms2);
    double *sums = malloc((size_t)k * d * sizeof *sums);
    size_t *counts = malloc(k * sizeof *counts);
    uint32_t *assign = malloc(n * sizeof *assign);
    if (mind == NULL || norms2 == NULL || sums == NULL || counts == NULL || assign == NULL)
        goto out;

    vqkv__kmeanspp(x, n, d, k, &rng, centroids, mind);
    for (uint32_t it = 0; it < iterations; it++) {
        vqkv__centroid_norms(centroids, d, k, norms2);
        memset(sums, 0, (size_t)k * d * sizeof *sums);
        memset(counts, 0, k * sizeof *counts);
        size_t moved = 0;
        for (size_t i = 0; i < n; i++) {
            const float *xi = x + i * d;
            uint32_t c = vqkv__nearest(xi, centroids, norms2, d, k);
            moved += it == 0 || c != assign[i];
            assign[i] = c;
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
    free(norms2);
    free(sums);
    free(counts);
    free(assign);
    return rc;
}
