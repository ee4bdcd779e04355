/* commute.c -- RoPE-commutative codebooks (commute.h): expansion and EM.
 *
 * The EM follows the CommVQ paper. E-step: every sample's squared distance
 * to all 4^h codewords, turned into soft assignments exp(-dist / tau)
 * normalized per sample (weights below e^-40 of the best are skipped), and
 * accumulated as per-codeword weights N[A][B] and weighted sums S[A][B].
 * M-step: the table minimizing sum N |mean - (u_A + i u_B)|^2 pair by pair,
 * u being a pair's complex table column. Setting the Wirtinger gradient to
 * zero gives one Hermitian system per pair whose matrix does not depend on
 * the pair,
 *   (R_a + C_a) u_a + i sum_{b != a} (N[a][b] - N[b][a]) u_b
 *     = sum_B S[a][B] - i sum_A S[A][a],
 * R and C being N's row and column sums; it is solved as the equivalent
 * real symmetric 2^(h+1) system by one Cholesky factorization in double and
 * d/2 back-substitutions. A small ridge toward the previous table keeps
 * entries that no sample uses where they are. The temperature falls from
 * soft (all codewords share a sample, so the table is shaped by the whole
 * data) to effectively hard (k-means-like), as the paper anneals it.
 */
#include "commute.h"

#include "kmeans.h"
#include "vqkv_codec.h"

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

void vqkv__commute_expand(const float *table, uint32_t d, uint32_t h, float *words)
{
    uint32_t q = 1u << h;
    for (uint32_t a = 0; a < q; a++) {
        const float *ca = table + (size_t)a * d;
        for (uint32_t b = 0; b < q; b++) {
            const float *cb = table + (size_t)b * d;
            float *w = words + ((size_t)a * q + b) * d;
            for (uint32_t j = 0; j < d; j += 2) {
                w[j] = ca[j] - cb[j + 1];
                w[j + 1] = ca[j + 1] + cb[j];
            }
        }
    }
}

typedef struct {
    const float *x;
    size_t n;
    uint32_t d, h, q, k;
    float *words;  /* [k][d], the expanded current table */
    float *search; /* its search form (kmeans.h) */
    float *dist;   /* [k] scratch */
    double *count; /* [k] soft weights N */
    double *sum;   /* [k][d] weighted sums S */
    double *sys;   /* [2q][2q] the M-step's matrix, then its Cholesky factor */
    double *rhs;   /* [2q] */
} vqkv__em_t;

/* One E-step at temperature tau over the expanded codewords in em->words:
 * fills count and sum, and returns the mean hard-assignment error. */
static double vqkv__em_estep(vqkv__em_t *em, double tau)
{
    uint32_t d = em->d, k = em->k;
    const float *norms2 = em->search, *wt = em->search + k;
    double hard = 0.0;
    memset(em->count, 0, k * sizeof *em->count);
    memset(em->sum, 0, (size_t)k * d * sizeof *em->sum);
    for (size_t i = 0; i < em->n; i++) {
        const float *xi = em->x + i * d;
        float xx = 0.0f, best = FLT_MAX;
        memcpy(em->dist, norms2, k * sizeof *em->dist);
        for (uint32_t j = 0; j < d; j++) {
            float m = -2.0f * xi[j];
            const float *w = wt + (size_t)j * k;
            for (uint32_t c = 0; c < k; c++)
                em->dist[c] += m * w[c];
            xx += xi[j] * xi[j];
        }
        for (uint32_t c = 0; c < k; c++)
            best = fminf(best, em->dist[c]);
        hard += fmax((double)best + xx, 0.0);
        double total = 0.0;
        for (uint32_t c = 0; c < k; c++) {
            double e = ((double)em->dist[c] - best) / tau;
            em->dist[c] = e < 40.0 ? (float)exp(-e) : 0.0f;
            total += em->dist[c];
        }
        for (uint32_t c = 0; c < k; c++) {
            if (em->dist[c] == 0.0f)
                continue;
            double g = em->dist[c] / total;
            em->count[c] += g;
            for (uint32_t j = 0; j < d; j++)
                em->sum[(size_t)c * d + j] += g * xi[j];
        }
    }
    return hard / (double)em->n;
}

/* In-place Cholesky factor (lower) of the symmetric positive definite
 * a[n][n]; false if a pivot is not positive. */
static bool vqkv__cholesky(double *a, uint32_t n)
{
    for (uint32_t j = 0; j < n; j++) {
        double s = a[(size_t)j * n + j];
        for (uint32_t p = 0; p < j; p++)
            s -= a[(size_t)j * n + p] * a[(size_t)j * n + p];
        if (!(s > 0.0))
            return false;
        a[(size_t)j * n + j] = sqrt(s);
        for (uint32_t i = j + 1; i < n; i++) {
            double t = a[(size_t)i * n + j];
            for (uint32_t p = 0; p < j; p++)
                t -= a[(size_t)i * n + p] * a[(size_t)j * n + p];
            a[(size_t)i * n + j] = t / a[(size_t)j * n + j];
        }
    }
    return true;
}

/* Solves L L^T z = b in place, L from vqkv__cholesky. */
static void vqkv__cholesky_solve(const double *l, uint32_t n, double *b)
{
    for (uint32_t i = 0; i < n; i++) {
        for (uint32_t p = 0; p < i; p++)
            b[i] -= l[(size_t)i * n + p] * b[p];
        b[i] /= l[(size_t)i * n + i];
    }
    for (uint32_t i = n; i-- > 0;) {
        for (uint32_t p = i + 1; p < n; p++)
            b[i] -= l[(size_t)p * n + i] * b[p];
        b[i] /= l[(size_t)i * n + i];
    }
}

/* The M-step: replaces table with the minimizer for em's counts and sums.
 * Unknowns per pair are ordered x_0..x_{q-1}, y_0..y_{q-1}. */
static void vqkv__em_mstep(vqkv__em_t *em, float *table)
{
    uint32_t q = em->q, n2 = 2 * q, d = em->d;
    double *m = em->sys, trace = 0.0;
    memset(m, 0, (size_t)n2 * n2 * sizeof *m);
    for (uint32_t a = 0; a < q; a++) {
        double diag = 0.0;
        for (uint32_t b = 0; b < q; b++)
            diag += em->count[a * q + b] + em->count[b * q + a];
        m[(size_t)a * n2 + a] = diag;
        m[(size_t)(q + a) * n2 + q + a] = diag;
        trace += 2.0 * diag;
        for (uint32_t b = 0; b < q; b++) {
            if (b == a)
                continue;
            double kab = em->count[a * q + b] - em->count[b * q + a];
            m[(size_t)a * n2 + q + b] = -kab;
            m[(size_t)(q + a) * n2 + b] = kab;
        }
    }
    double ridge = 1e-6 * trace / n2 + 1e-12;
    for (uint32_t i = 0; i < n2; i++)
        m[(size_t)i * n2 + i] += ridge;
    if (!vqkv__cholesky(m, n2))
        return; /* cannot happen with the ridge; keep the table if it does */
    for (uint32_t j = 0; j < d; j += 2) {
        for (uint32_t a = 0; a < q; a++) {
            double re = 0.0, im = 0.0;
            for (uint32_t b = 0; b < q; b++) {
                const double *s_ab = em->sum + ((size_t)a * q + b) * d + j;
                const double *s_ba = em->sum + ((size_t)b * q + a) * d + j;
                re += s_ab[0] + s_ba[1]; /* S[a][B] - i S[A][a]: (x + iy)(-i) = y - ix */
                im += s_ab[1] - s_ba[0];
            }
            em->rhs[a] = re + ridge * table[(size_t)a * d + j];
            em->rhs[q + a] = im + ridge * table[(size_t)a * d + j + 1];
        }
        vqkv__cholesky_solve(m, n2, em->rhs);
        for (uint32_t a = 0; a < q; a++) {
            table[(size_t)a * d + j] = (float)em->rhs[a];
            table[(size_t)a * d + j + 1] = (float)em->rhs[q + a];
        }
    }
}

int vqkv__commute_em(const float *x, size_t n, uint32_t d, uint32_t h, uint32_t iterations,
                     uint64_t seed, float *table)
{
    uint32_t q = 1u << h, k = q * q;
    vqkv__em_t em = {.x = x, .n = n, .d = d, .h = h, .q = q, .k = k};
    float *best = malloc((size_t)q * d * sizeof *best);
    em.words = malloc((size_t)k * d * sizeof *em.words);
    em.search = malloc((size_t)k * (d + 1) * sizeof *em.search);
    em.dist = malloc(k * sizeof *em.dist);
    em.count = malloc(k * sizeof *em.count);
    em.sum = malloc((size_t)k * d * sizeof *em.sum);
    em.sys = malloc((size_t)4 * q * q * sizeof *em.sys);
    em.rhs = malloc((size_t)2 * q * sizeof *em.rhs);
    int rc = VQKV_ENOMEM;
    if (best == NULL || em.words == NULL || em.search == NULL || em.dist == NULL ||
        em.count == NULL || em.sum == NULL || em.sys == NULL || em.rhs == NULL)
        goto out;

    double mean_sq = 0.0;
    for (size_t i = 0; i < n * d; i++)
        mean_sq += (double)x[i] * x[i];
    mean_sq /= (double)n;
    memset(table, 0, (size_t)q * d * sizeof *table);
    rc = VQKV_OK;
    if (!(mean_sq > 0.0))
        goto out; /* all zeros: the zero table codes them exactly */
    double tau0 = 0.1 * mean_sq, tau1 = 1e-4 * mean_sq;

    /* Start from k-means++ seeds as free codewords, projected onto the
     * commutative form by one soft M-step. */
    rc = vqkv__kmeans(x, n, d, k, 0, seed, NULL, em.words);
    if (rc != VQKV_OK)
        goto out;
    vqkv__search_prepare(em.words, d, k, em.search);
    vqkv__em_estep(&em, tau0);
    vqkv__em_mstep(&em, table);

    double best_err = DBL_MAX;
    for (uint32_t it = 0;; it++) {
        vqkv__commute_expand(table, d, h, em.words);
        vqkv__search_prepare(em.words, d, k, em.search);
        double frac = iterations > 1 ? (double)it / (double)(iterations - 1) : 1.0;
        double err = vqkv__em_estep(&em, tau0 * pow(tau1 / tau0, fmin(frac, 1.0)));
        if (err < best_err) {
            best_err = err;
            memcpy(best, table, (size_t)q * d * sizeof *best);
        }
        if (it == iterations) /* the last E-step only scores */
            break;
        vqkv__em_mstep(&em, table);
    }
    memcpy(table, best, (size_t)q * d * sizeof *table);
out:
    free(best);
    free(em.words);
    free(em.search);
    free(em.dist);
    free(em.count);
    free(em.sum);
    free(em.sys);
    free(em.rhs);
    return rc;
}
