/* bench_util.h -- what the codec benchmarks share: a monotonic clock and
 * the synthetic fp16 KV they fill caches with (Gaussian, per-channel
 * scales as keys have), and the brief codebook training they need (the
 * codebooks' quality does not matter to a throughput figure, only the work
 * per block does).
 */
#ifndef VQKV_BENCH_UTIL_H
#define VQKV_BENCH_UTIL_H

#include "vqkv_codec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A standard Gaussian from the stream *state starts (advanced; Box-Muller). */
static inline double bench_gauss(uint64_t *state)
{
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    double u1 = ((double)(*state >> 11) + 1.0) / 9007199254740993.0;
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    double u2 = (double)(*state >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Gaussian values with per-channel scales, as keys have: value i of the
 * stream that *state starts (advanced). */
static inline float bench_value(uint64_t *state, size_t i, uint32_t head_dim)
{
    float scale = 0.5f + (float)(i % head_dim) / (float)head_dim * 4.0f;
    return (float)bench_gauss(state) * scale;
}

/* The cache the benchmarks encode and decode: n fp16 values. */
static inline void bench_fill(uint16_t *cache, size_t n, uint32_t head_dim)
{
    uint64_t state = 42;
    for (size_t i = 0; i < n; i++)
        vqkv_dtype_from_f32(VQKV_DTYPE_F16, &(float){bench_value(&state, i, head_dim)}, 1,
                            &cache[i]);
}

/* The command line the codec benchmarks share:
 *   NAME [--shape NAME] [--blocks N] [--threads T] [--min-seconds S] [--json FILE] [SPEC ...]
 * the codecs of the table below when no SPEC is given. */
typedef struct {
    const char *specs[32];
    size_t n_specs;
    uint32_t blocks;    /* the caller's default before parsing */
    uint32_t threads;   /* likewise; 0: the program takes no --threads */
    double min_seconds; /* likewise */
    const char *json_path;
    int shapes;        /* the program takes --shape NAME (0: it does not) */
    const char *shape; /* --shape's NAME; NULL when not given */
} bench_args_t;

/* Most threads a pass is split over. */
#define BENCH_MAX_THREADS 64

/* Parses argv over a's defaults: 0, or 2 (the exit status) after saying
 * what is wrong. --blocks must be 1 to max_blocks. */
static inline int bench_args_parse(bench_args_t *a, int argc, char **argv, const char *name,
                                   uint32_t max_blocks)
{
    static const char *const default_specs[] = {
        "fp16", "fp8", "kivi4", "kivi2", "rvq:d=8,b=8,r=2", "vqkv", "commvq"};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--blocks") == 0 && i + 1 < argc)
            a->blocks = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc && a->threads != 0) {
            a->threads = (uint32_t)strtoul(argv[++i], NULL, 10);
            if (a->threads == 0 || a->threads > BENCH_MAX_THREADS) {
                fprintf(stderr, "%s: --threads must be 1 to %u\n", name, BENCH_MAX_THREADS);
                return 2;
            }
        } else if (strcmp(argv[i], "--min-seconds") == 0 && i + 1 < argc)
            a->min_seconds = strtod(argv[++i], NULL);
        else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc)
            a->json_path = argv[++i];
        else if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc && a->shapes)
            a->shape = argv[++i];
        else if (argv[i][0] != '-' && a->n_specs < 32)
            a->specs[a->n_specs++] = argv[i];
        else {
            fprintf(stderr,
                    "usage: %s%s [--blocks N]%s [--min-seconds S] [--json FILE] [SPEC ...]\n", name,
                    a->shapes ? " [--shape smollm2-135m|llama3-8b]" : "",
                    a->threads != 0 ? " [--threads T]" : "");
            return 2;
        }
    }
    if (a->n_specs == 0)
        for (; a->n_specs < sizeof default_specs / sizeof default_specs[0]; a->n_specs++)
            a->specs[a->n_specs] = default_specs[a->n_specs];
    if (a->blocks == 0 || a->blocks > max_blocks || !(a->min_seconds >= 0.0)) {
        fprintf(stderr, "%s: --blocks must be 1 to %u\n", name, (unsigned)max_blocks);
        return 2;
    }
    return 0;
}

/* Tokens the codecs are trained on, as vqkvd's calibration_tokens. */
#define BENCH_TRAIN_TOKENS 1024

/* Trains codec as vqkvd calibrates: on `tokens` tokens of the cache's
 * distribution that are not the tokens it then codes, each layer and side
 * on the same. Training on the coded block itself, as before, left most of
 * a codebook unused whenever a block has fewer vectors than a codebook
 * codewords (SmolLM2: 48 against 256), and decode then read a few
 * codewords that stay in L1: a decode figure no real cache gives. */
static inline int bench_train(vqkv_codec_t *codec, uint32_t tokens)
{
    const vqkv_layout_t *layout = vqkv_codec_layout(codec);
    size_t vectors = (size_t)tokens * layout->num_kv_heads;
    float *x = malloc(vectors * layout->head_dim * sizeof *x);
    vqkv_train_opts_t topts = {.seed = 1, .iterations = 4, .max_samples = 4096};
    int rc = x == NULL ? VQKV_ENOMEM : VQKV_OK;
    uint64_t state = 7; /* not bench_fill's 42: other tokens than the coded ones */
    for (size_t i = 0; rc == VQKV_OK && i < vectors * layout->head_dim; i++)
        x[i] = bench_value(&state, i, layout->head_dim);
    for (uint32_t l = 0; l < layout->num_layers && rc == VQKV_OK; l++)
        for (int kv = 0; kv < 2 && rc == VQKV_OK; kv++)
            rc = vqkv_codec_train(codec, l, kv, x, vectors, &topts);
    free(x);
    return rc;
}

#endif
