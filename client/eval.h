/* eval.h -- codec fidelity on a real KV dump (`vqkvctl eval`).
 *
 * The dump is a safetensors file with, per layer N, `layers.N.q`
 * [tokens, q_heads, head_dim] and `layers.N.k`, `layers.N.v`
 * [tokens, kv_heads, head_dim]. Codebooks are trained on the last tokens
 * and every figure is measured on the held-out tokens before them, from
 * position 0: a real cache always holds the start of its sequence, the
 * attention-sink token included, and that is where shared codebooks fail
 * first.
 */
#ifndef VQKV_EVAL_H
#define VQKV_EVAL_H

#include <stddef.h>
#include <stdint.h>

#include "progress.h"

typedef struct {
    const char *kv_path;
    const char *const *specs;
    size_t n_specs;
    uint32_t block_tokens; /* tokens per block (default 32) */
    uint32_t train_tokens; /* last tokens to train on (default: half the dump) */
    uint32_t attn_stride;  /* score every n-th held-out query (default 4) */
    uint64_t seed;
    uint32_t threads;     /* training threads (0: all CPUs) */
    const char *save_dir; /* if set, trained codebooks are saved there */
    /* If set, the run draws where it is on it (codec, phase, layer) in
     * layer steps: the reference attention, each trained codec's training
     * and each codec's attention, one step a layer. vqkv_eval_run leaves the
     * line drawn; the caller ends it (vqkv_progress_end). */
    vqkv_progress_t *progress;
} vqkv_eval_opts_t;

typedef struct {
    char spec[96];
    double bits_per_value;
    double compression_ratio; /* against fp16 */
    double k_rel_err;         /* ||K - K'|| / ||K|| over all held-out values */
    double v_rel_err;
    double attn_rel_err; /* same, of the causal attention output */
    double train_seconds_per_layer;
    double encode_gbps; /* fp16 bytes in per second */
    double decode_gbps; /* fp16 bytes out per second */
} vqkv_eval_result_t;

/* Fills results[n_specs]. On failure returns a VQKV_E* code and writes the
 * reason to err. */
int vqkv_eval_run(const vqkv_eval_opts_t *opts, vqkv_eval_result_t *results, char *err,
                  size_t errlen);

#endif
