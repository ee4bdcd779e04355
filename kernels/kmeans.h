/* kmeans.h -- k-means++ seeding and Lloyd iterations for codebook training.
 *
 * Deterministic: the same data, k, iterations and seed give the same
 * centroids on every machine and at every thread count (callers parallelize
 * across independent trainings, never inside one).
 */
#ifndef VQKV_KMEANS_H
#define VQKV_KMEANS_H

#include "vqkv_codec.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Lloyd's assignment step, the O(n*k*d) part of every iteration, done
 * elsewhere (vqkv_cuda_assigner: on a GPU). It must give what the CPU
 * gives: assign[i] the index of x[i]'s nearest centroid by
 * ||c||^2 - 2 x.c (norms[] holds ||c||^2, ties to the lower index, as
 * vqkv__nearest), mind[i] the squared distance to it summed in channel
 * order. Returns VQKV_OK or an error, which ends the training. */
struct vqkv_assigner {
    int (*assign)(void *ctx, const float *x, size_t n, uint32_t d, const float *centroids,
                  const float *norms, uint32_t k, uint32_t *assign, float *mind);
    void *ctx;
};

/* Trains k centroids[k][d] on x[n][d], the assignment steps on `assigner`
 * (NULL: here). With n < k the surplus centroids repeat data points (they
 * stay unused). VQKV_OK, VQKV_ENOMEM or the assigner's error. */
int vqkv__kmeans(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t iterations,
                 uint64_t seed, const vqkv_assigner_t *assigner, float *centroids);

/* A codebook's search form, (d + 1) * k floats: ||c||^2 for each of the k
 * centroids, then the centroids transposed to [d][k], so the distance loop
 * runs over contiguous centroids and vectorizes. */
void vqkv__search_prepare(const float *centroids, uint32_t d, uint32_t k, float *search);

/* The centroid nearest to x by ||c||^2 - 2 x.c, from the search form; ties
 * go to the lower index. O(k*d). With AVX2 (search_x86.c) where the CPU
 * has it and VQKV_CPU_SIMD is not 0; the scalar loop, the reference,
 * otherwise: the same answer either way, bit for bit. */
uint32_t vqkv__nearest(const float *x, const float *search, uint32_t d, uint32_t k);
uint32_t vqkv__nearest_scalar(const float *x, const float *search, uint32_t d, uint32_t k);
uint32_t vqkv__nearest_x86(const float *x, const float *search, uint32_t d, uint32_t k);
/* The AVX-512F search; only where vqkv__simd_avx512() says it may run. */
uint32_t vqkv__nearest_x512(const float *x, const float *search, uint32_t d, uint32_t k);
/* Whether vqkv__nearest takes the AVX2 path for this d and k. */
bool vqkv__nearest_simd(uint32_t d, uint32_t k);

/* mind[i] = ||x[i] - c||^2 for every point (first), or the least of it and
 * mind[i], with the points given transposed, xt[d][n]: each distance summed
 * in channel order, every step rounded on its own, so the AVX2 path
 * (search_x86.c) and the scalar one give the same floats. */
void vqkv__mind_update(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                       bool first);
void vqkv__mind_update_scalar(const float *xt, size_t n, size_t start, uint32_t d, const float *c,
                              float *mind, bool first);
void vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                           bool first);

/* splitmix64: a tiny, well-mixed generator and seed combiner. */
static inline uint64_t vqkv__mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#endif
