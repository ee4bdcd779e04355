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
 * vqkv__nearest_scalar), mind[i] the squared distance to it summed in channel
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

/* Refines a residual chain of `stages` codebooks of k centroids words[s][k][d]
 * (search[s] their search forms, kept in step), trained greedily on
 * x[n][d]: stage s by k-means on what stages before it left; codes[s][n]
 * are the points' codes as the encoder gives them and resid[n][d] what
 * the chain misses of them (x less its codewords), both worked in. Greedy
 * training fits each stage to what came before and never to what later
 * stages take away; residual VQ papers refine the chain jointly after.
 * Each of up to `rounds` rounds sets every stage's centroids in turn to
 * the mean of what the other stages leave of the points coded with them
 * (the least-squares centroids for the codes held: the error cannot
 * rise), then codes the points again as the encoder does, greedily stage
 * by stage; a round that does not lower that error is undone and ends
 * the refinement. A centroid no point uses stays as it is. Costs
 * O(rounds * stages * n * k * d), the assignment steps' of `rounds` Lloyd
 * iterations per stage. VQKV_OK or VQKV_ENOMEM (nothing changed). */
int vqkv__rvq_refine(const float *x, size_t n, uint32_t d, uint32_t k, uint32_t stages,
                     uint32_t rounds, float *const *words, float *const *search, uint32_t *codes,
                     float *resid);

/* One stage of a residual chain, as the encoders and training code it:
 * codes[i] = the centroid of words[k][d] (search, its search form)
 * nearest to x_i = xs + i * stride (vqkv__nearest_batch), then, if
 * subtract, x_i less that centroid, what the next stage codes. O(n*k*d). */
void vqkv__rvq_stage(float *xs, size_t n, size_t stride, const float *words, const float *search,
                     uint32_t d, uint32_t k, uint32_t *codes, bool subtract);

/* Codebooks the batch search's fused pass takes (search_x86.c), and whose
 * twins vqkv__search_mark_twins marks: at most this many codewords. */
#define VQKV__FUSED_MAX_K 512u

/* A codebook's search form, (d + 1) * k floats: ||c||^2 for each of the k
 * centroids, then the centroids transposed to [d][k], so the distance loop
 * runs over contiguous centroids and vectorizes. The norms are true ones
 * (commvq's soft E-step reads them as distances). */
void vqkv__search_prepare(const float *centroids, uint32_t d, uint32_t k, float *search);
/* For nearest searches: a centroid bit for bit equal to an earlier one (k
 * a power of two up to VQKV__FUSED_MAX_K) gets +inf for its norm in
 * search: no search would pick it, and the batch search no longer has to
 * rule it out. Answers stay those over the true norms. O(k*d). */
void vqkv__search_mark_twins(const float *centroids, uint32_t d, uint32_t k, float *search);
/* The search form every nearest search takes (encoders, Lloyd's
 * assignment): vqkv__search_prepare, then vqkv__search_mark_twins. */
void vqkv__search_prepare_nearest(const float *centroids, uint32_t d, uint32_t k, float *search);

/* The centroid nearest to x by ||c||^2 - 2 x.c, from the search form; ties
 * go to the lower index. O(k*d). vqkv__nearest_scalar is the reference:
 * from ||c||^2, + (-2 x[j]) * c[j] for j in order, each product and sum
 * rounded on its own, NaN never chosen. The AVX2 and AVX-512F searches
 * (search_x86.c; the latter only where vqkv__simd_avx512() says it may run)
 * give its answer bit for bit. */
uint32_t vqkv__nearest_scalar(const float *x, const float *search, uint32_t d, uint32_t k);
uint32_t vqkv__nearest_x86(const float *x, const float *search, uint32_t d, uint32_t k);
uint32_t vqkv__nearest_x512(const float *x, const float *search, uint32_t d, uint32_t k);

/* out[i] = the centroid nearest to the n vectors x_i = xs + i * stride, all
 * searched in one codebook: the reference's answers, found with AVX-512F,
 * or AVX2 and FMA, where the CPU has them and VQKV_CPU_SIMD allows (a fused
 * pass over four vectors at once, made exact: search_x86.c), else vector
 * by vector with vqkv__nearest_scalar. O(n*k*d); the batch is where the
 * speed is, as each codeword is loaded once for four vectors. */
void vqkv__nearest_batch(const float *xs, size_t n, size_t stride, const float *search, uint32_t d,
                         uint32_t k, uint32_t *out);
void vqkv__nearest_batch_scalar(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out);
void vqkv__nearest_batch_x86(const float *xs, size_t n, size_t stride, const float *search,
                             uint32_t d, uint32_t k, uint32_t *out);
void vqkv__nearest_batch_x512(const float *xs, size_t n, size_t stride, const float *search,
                              uint32_t d, uint32_t k, uint32_t *out);
/* Batches shorter than this take the fused batch instead of a screen: by
 * operation count, the screen's scaling of the codebook costs about what
 * four to five vectors' search does (not measured). */
#define VQKV__SCREEN_MIN_N 16u
/* The same answers with AVX-512 VNNI, where vqkv__simd_vnni() says it may
 * run: an integer screen made exact (search_x86.c) for d = 4, 8 and 16
 * and k a multiple of 16 up to 256, the AVX-512F batch for the rest.
 * Returns how many vectors the screen settled alone (the others took the
 * reference's distances or the exact search), for tests and tuning. */
size_t vqkv__nearest_batch_vnni(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out);
/* The same screen with AVX2 (vpmaddwd), where vqkv__simd_fma() says it
 * may run and AVX-512 may not: d = 4 and 8, k a multiple of 8 up to 256,
 * the AVX2 fused batch for the rest. Returns the settled count as
 * vqkv__nearest_batch_vnni does. */
size_t vqkv__nearest_batch_madd(const float *xs, size_t n, size_t stride, const float *search,
                                uint32_t d, uint32_t k, uint32_t *out);
/* Whether the vector searches may run for this d and k (a codebook size
 * a multiple of 8). */
bool vqkv__nearest_simd(uint32_t d, uint32_t k);

/* k-means++'s pass over the points for a new centroid c: mind[i] =
 * ||x[i] - c||^2 for every point (first), or the least of it and mind[i],
 * with the points given transposed, xt[d][n]: each distance summed in
 * channel order, every step rounded on its own, so the AVX2 path
 * (search_x86.c) and the scalar one give the same floats. With them,
 * mind's running sums in point order, in double: run[i] the sum of
 * mind[0..i], each addition rounded in turn (the draws' binary search
 * reads them); returns the total. The sums are a chain of dependent
 * additions, kept for its order: in one pass with the distances, the
 * chain's latency hides their arithmetic. _scalar starts at point start,
 * the sum so far total. O(n*d). */
double vqkv__mind_update(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                         bool first, double *run);
double vqkv__mind_update_scalar(const float *xt, size_t n, size_t start, uint32_t d, const float *c,
                                float *mind, bool first, double *run, double total);
double vqkv__mind_update_x86(const float *xt, size_t n, uint32_t d, const float *c, float *mind,
                             bool first, double *run);

/* splitmix64: a tiny, well-mixed generator and seed combiner. */
static inline uint64_t vqkv__mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#endif
