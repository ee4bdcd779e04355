/* codec_instr.c -- CPU decode and encode as regions for callgrind to count
 * instructions in (bench/instr.sh runs it under valgrind).
 *
 * A Llama-8B-like layout (32 layers, 8 kv heads, head_dim 128, 32 tokens
 * per block, f16) in a vLLM-style paged cache of 2 blocks, as in codec_cpu.
 * For each codec it trains briefly (bench_train on INSTR_TRAIN_TOKENS
 * tokens) and encodes block 1, neither of which is counted. Then two
 * measured regions, each between CALLGRIND_START_INSTRUMENTATION and
 * CALLGRIND_STOP_INSTRUMENTATION and dumped on its own by
 * CALLGRIND_DUMP_STATS_AT: "encode SPEC", block 0
 * encoded, and "decode SPEC", both blocks decoded as one batch
 * (vqkv_codec_decode_batch) into a second cache. --no-encode encodes block
 * 0 uncounted instead. Run it as
 *   valgrind --tool=callgrind --instr-atstart=no codec_instr SPEC
 * so that only the regions are counted. Callgrind counts the program's own
 * instructions, so the figure is the same on a busy machine as on a quiet
 * one; it leaves out what memory costs (cache misses, bandwidth), which
 * codec_cpu's GB/s include.
 *
 * For each codec it prints "codec SPEC bits B decoded N encoded M": the
 * canonical spec, stored bits per value and the values each region
 * handled. The first line says whether the regions are marked:
 * "callgrind: yes", or "callgrind: no" for a build without
 * <valgrind/callgrind.h> (Debian package valgrind), which runs the same
 * work and which instr.sh refuses.
 *
 * usage: codec_instr [--no-encode] [SPEC ...]
 */
#include "bench_util.h"
#include "vqkv_codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define INSTR_CALLGRIND 1
#endif
#endif
#ifndef INSTR_CALLGRIND
#define INSTR_CALLGRIND 0
#define CALLGRIND_START_INSTRUMENTATION ((void)0)
#define CALLGRIND_STOP_INSTRUMENTATION ((void)0)
#define CALLGRIND_DUMP_STATS_AT(what) ((void)(what))
#endif

/* Blocks decoded as one batch; block 0 is the one whose encode is counted. */
#define INSTR_BLOCKS 2

/* Tokens the VQ codecs train on: a block's worth. Decode's counts do not
 * depend on which codewords the codes pick, nor encode's but for the rare
 * near-tie that the batch search settles by the exact search (codec_cpu's
 * times do depend on them, and train on BENCH_TRAIN_TOKENS); training on
 * more under valgrind takes minutes a codec. */
#define INSTR_TRAIN_TOKENS 32

static int instr_codec(const char *spec, const vqkv_layout_t *layout, const vqkv_kv_view_t *view,
                       const uint16_t *cache, uint16_t *restored, int encode)
{
    vqkv_codec_t *codec;
    int rc = vqkv_codec_create(spec, layout, &codec);
    if (rc != VQKV_OK) {
        fprintf(stderr, "codec_instr: %s: %s\n", spec, vqkv_strerror(rc));
        return rc;
    }
    size_t block_bytes = vqkv_codec_block_bytes(codec);
    uint8_t *packed = malloc(block_bytes * INSTR_BLOCKS);
    const uint8_t *in[INSTR_BLOCKS];
    uint32_t slots[INSTR_BLOCKS];
    rc = packed == NULL ? VQKV_ENOMEM : bench_train(codec, INSTR_TRAIN_TOKENS);
    for (uint32_t s = 0; s < INSTR_BLOCKS; s++) {
        in[s] = packed + s * block_bytes;
        slots[s] = s;
    }
    /* Block 0 last: when it is measured, it is not the codec's first encode. */
    for (uint32_t s = 1; s < INSTR_BLOCKS && rc == VQKV_OK; s++)
        rc = vqkv_codec_encode(codec, cache, view, s, packed + s * block_bytes);
    char what[128];
    if (rc == VQKV_OK) {
        if (encode)
            CALLGRIND_START_INSTRUMENTATION;
        rc = vqkv_codec_encode(codec, cache, view, 0, packed);
        if (encode) {
            CALLGRIND_STOP_INSTRUMENTATION;
            snprintf(what, sizeof what, "encode %s", vqkv_codec_spec(codec));
            CALLGRIND_DUMP_STATS_AT(what);
        }
    }
    if (rc == VQKV_OK) {
        CALLGRIND_START_INSTRUMENTATION;
        rc = vqkv_codec_decode_batch(codec, in, restored, view, slots, INSTR_BLOCKS, 0,
                                     layout->num_layers);
        CALLGRIND_STOP_INSTRUMENTATION;
        snprintf(what, sizeof what, "decode %s", vqkv_codec_spec(codec));
        CALLGRIND_DUMP_STATS_AT(what);
    }
    if (rc == VQKV_OK) {
        size_t block_values = (size_t)layout->num_layers * 2 * layout->block_tokens *
                              layout->num_kv_heads * layout->head_dim;
        printf("codec %s bits %.4f decoded %zu encoded %zu\n", vqkv_codec_spec(codec),
               vqkv_codec_bits_per_value(codec), block_values * INSTR_BLOCKS,
               encode ? block_values : 0);
        fflush(stdout);
    } else {
        fprintf(stderr, "codec_instr: %s: %s\n", spec, vqkv_strerror(rc));
    }
    free(packed);
    vqkv_codec_free(codec);
    return rc;
}

int main(int argc, char **argv)
{
    static const char *default_specs[] = {"fp8", "kivi4", "kivi2", "rvq:d=8,b=8,r=2", "vqkv"};
    const char *specs[32];
    size_t n_specs = 0;
    int encode = 1;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-encode") == 0)
            encode = 0;
        else if (argv[i][0] != '-' && n_specs < 32)
            specs[n_specs++] = argv[i];
        else {
            fprintf(stderr, "usage: codec_instr [--no-encode] [SPEC ...]\n");
            return 2;
        }
    }
    if (n_specs == 0)
        for (; n_specs < sizeof default_specs / sizeof default_specs[0]; n_specs++)
            specs[n_specs] = default_specs[n_specs];

    vqkv_layout_t layout = {32, 8, 128, 32, VQKV_DTYPE_F16};
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, INSTR_BLOCKS);
    uint16_t *cache = malloc(view.region_bytes), *restored = malloc(view.region_bytes);
    if (cache == NULL || restored == NULL) {
        fprintf(stderr, "codec_instr: out of memory\n");
        return 1;
    }
    /* bench_fill's values for one (layer, K|V, block), repeated over all of
     * them: under valgrind libm's log and cos (FMA code, which valgrind
     * emulates) make filling all 4M values cost seconds a run, and the
     * counts come out within 0.03% of a full fill's. */
    size_t chunk = (size_t)layout.block_tokens * layout.num_kv_heads * layout.head_dim;
    bench_fill(cache, chunk, layout.head_dim);
    for (size_t at = chunk; at < view.region_bytes / 2; at += chunk)
        memcpy(cache + at, cache, chunk * sizeof *cache);

    printf("callgrind: %s\n", INSTR_CALLGRIND ? "yes" : "no");
    int rc = VQKV_OK;
    for (size_t i = 0; i < n_specs && rc == VQKV_OK; i++)
        rc = instr_codec(specs[i], &layout, &view, cache, restored, encode);
    free(cache);
    free(restored);
    return rc == VQKV_OK ? 0 : 1;
}
