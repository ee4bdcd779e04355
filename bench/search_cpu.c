/* search_cpu.c -- the nearest-codeword batch searches on this CPU, which
 * every VQ encode and codebook training spend most of their time in: ns
 * per vector for each search the CPU has, in the encoders' batches (256
 * vectors a batch, one group's channels strided through 128-channel rows,
 * one codebook of 256 codewords), at the group sizes d = 4, 8 and 16.
 *
 * The baselines, in the same run: the scalar reference
 * (vqkv__nearest_batch_scalar) and the AVX2 fused pass the screens
 * replace. Every search's answers are checked against the reference's
 * first (a mismatch fails the run). Each figure is the best of five
 * rounds of at least --min-seconds / 5, the paths taking turns round by
 * round: a shared machine slows some rounds and never speeds one up.
 *
 * usage: search_cpu [--min-seconds S] [--json FILE]
 */
#include "bench_util.h"
#include "codec_internal.h"
#include "kmeans.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    SEARCH_K = 256,
    SEARCH_BATCH = 256,
    SEARCH_ROW = 128,
    SEARCH_BATCHES = 64,
    SEARCH_ROUNDS = 5
};

typedef size_t (*search_fn)(const float *, size_t, size_t, const float *, uint32_t, uint32_t,
                            uint32_t *);

/* The searches without a settled count, in the screens' form. */
#define SEARCH_PLAIN(NAME, FN)                                                                     \
    static size_t NAME(const float *xs, size_t n, size_t stride, const float *search, uint32_t d,  \
                       uint32_t k, uint32_t *out)                                                  \
    {                                                                                              \
        FN(xs, n, stride, search, d, k, out);                                                      \
        return 0;                                                                                  \
    }
SEARCH_PLAIN(search_scalar, vqkv__nearest_batch_scalar)
SEARCH_PLAIN(search_fused256, vqkv__nearest_batch_x86)
SEARCH_PLAIN(search_fused512, vqkv__nearest_batch_x512)

typedef struct {
    const char *name;
    search_fn fn;
    bool screen; /* returns how many vectors it settled alone */
} search_path_t;

/* One round, every batch searched as often as min_seconds takes: seconds
 * a vector, and the share of vectors a screen settled alone. */
static double search_round(search_fn fn, const float *rows, const float *search, uint32_t d,
                           uint32_t *out, double min_seconds, double *share)
{
    size_t vectors = 0, settled = 0;
    double t0 = bench_now(), elapsed;
    do {
        for (uint32_t b = 0; b < SEARCH_BATCHES; b++) {
            const float *xs =
                rows + (size_t)b * SEARCH_BATCH * SEARCH_ROW + (b % (SEARCH_ROW / d)) * d;
            settled += fn(xs, SEARCH_BATCH, SEARCH_ROW, search, d, SEARCH_K,
                          out + (size_t)b * SEARCH_BATCH);
        }
        vectors += (size_t)SEARCH_BATCHES * SEARCH_BATCH;
        elapsed = bench_now() - t0;
    } while (elapsed < min_seconds);
    *share = (double)settled / (double)vectors;
    return elapsed / (double)vectors;
}

int main(int argc, char **argv)
{
    double min_seconds = 1.0;
    const char *json_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--min-seconds") == 0 && i + 1 < argc)
            min_seconds = strtod(argv[++i], NULL);
        else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc)
            json_path = argv[++i];
        else {
            fprintf(stderr, "usage: search_cpu [--min-seconds S] [--json FILE]\n");
            return 2;
        }
    }
    bool x86 = vqkv__nearest_simd(8, SEARCH_K) && vqkv__simd_fma();
    search_path_t paths[5];
    size_t n_paths = 0;
    paths[n_paths++] = (search_path_t){"scalar", search_scalar, false};
    if (x86) {
        paths[n_paths++] = (search_path_t){"avx2-fused", search_fused256, false};
        paths[n_paths++] = (search_path_t){"avx2-madd-screen", vqkv__nearest_batch_madd, true};
    }
    if (vqkv__simd_avx512())
        paths[n_paths++] = (search_path_t){"avx512-fused", search_fused512, false};
    if (vqkv__simd_vnni())
        paths[n_paths++] = (search_path_t){"vnni-screen", vqkv__nearest_batch_vnni, true};

    static const uint32_t ds[] = {4, 8, 16};
    size_t total = (size_t)SEARCH_BATCHES * SEARCH_BATCH;
    float *rows = malloc(total * SEARCH_ROW * sizeof *rows);
    float *words = malloc((size_t)SEARCH_K * 16 * sizeof *words);
    float *search = malloc((size_t)SEARCH_K * 17 * sizeof *search);
    uint32_t *want = malloc(total * sizeof *want), *got = malloc(total * sizeof *got);
    FILE *json = json_path ? fopen(json_path, "w") : NULL;
    int rc = 1;
    if (rows == NULL || words == NULL || search == NULL || want == NULL || got == NULL ||
        (json_path && json == NULL)) {
        fprintf(stderr, "search_cpu: out of memory, or cannot write %s\n",
                json_path ? json_path : "");
        goto out;
    }
    uint64_t rng = 12345;
    for (size_t i = 0; i < total * SEARCH_ROW; i++)
        rows[i] = (float)(bench_gauss(&rng) * 1.1);
    printf("nearest of %u codewords, batches of %u vectors strided in %u-channel rows, best of %d "
           "rounds\n",
           SEARCH_K, SEARCH_BATCH, SEARCH_ROW, SEARCH_ROUNDS);
    printf("%-18s %3s %10s %10s %10s %9s\n", "search", "d", "ns/vector", "vs scalar", "vs fused",
           "settled");
    if (json)
        fprintf(json, "{\"k\": %u, \"batch\": %u, \"rows\": [\n", SEARCH_K, SEARCH_BATCH);
    bool first_row = true;
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        uint32_t d = ds[di];
        for (size_t i = 0; i < (size_t)SEARCH_K * d; i++)
            words[i] = (float)bench_gauss(&rng);
        vqkv__search_prepare_nearest(words, d, SEARCH_K, search);
        double best[5], share[5], scalar_ns = 0.0, fused_ns = 0.0;
        /* Rounds go through every path in turn, so that a slow spell of
         * the machine falls on all of them rather than on one path. */
        for (int round = 0; round < SEARCH_ROUNDS; round++)
            for (size_t p = 0; p < n_paths; p++) {
                double s =
                    search_round(paths[p].fn, rows, search, d, p == 0 && round == 0 ? want : got,
                                 min_seconds / SEARCH_ROUNDS, &share[p]);
                best[p] = round == 0 || s < best[p] ? s : best[p];
                if (p > 0 && round == 0 && memcmp(got, want, total * sizeof *got) != 0) {
                    fprintf(stderr, "search_cpu: %s at d %u differs from the reference\n",
                            paths[p].name, d);
                    goto out;
                }
            }
        for (size_t p = 0; p < n_paths; p++) {
            double ns = best[p] * 1e9;
            if (p == 0)
                scalar_ns = ns;
            if (paths[p].fn == search_fused256)
                fused_ns = ns;
            char vs_fused[16] = "-", settled[16] = "-";
            if (fused_ns > 0.0)
                snprintf(vs_fused, sizeof vs_fused, "%.2fx", fused_ns / ns);
            if (paths[p].screen)
                snprintf(settled, sizeof settled, "%.3f", share[p]);
            printf("%-18s %3u %10.1f %9.2fx %10s %9s\n", paths[p].name, d, ns, scalar_ns / ns,
                   vs_fused, settled);
            if (json)
                fprintf(json,
                        "%s  {\"search\": \"%s\", \"d\": %u, \"ns_per_vector\": %.2f, "
                        "\"vs_scalar\": %.3f}",
                        first_row ? "" : ",\n", paths[p].name, d, ns, scalar_ns / ns);
            first_row = false;
        }
    }
    if (json)
        fprintf(json, "\n]}\n");
    rc = 0;
out:
    if (json)
        fclose(json);
    free(rows);
    free(words);
    free(search);
    free(want);
    free(got);
    return rc;
}
