/* codec_cpu.c -- CPU codec throughput next to memcpy of the same bytes.
 *
 * Blocks of a Llama-8B-like layout (32 layers, 8 kv heads, head_dim 128,
 * 32 tokens per block: 4 MiB of fp16 per block) live in a vLLM-style paged
 * fp16 cache. Each codec encodes blocks out of it and decodes them back
 * into a second cache, one thread, and the figures are GB/s of fp16 in
 * (encode) and out (decode). Decode takes all blocks as one batch, as a
 * get does (vqkv_codec_decode_batch: layer by layer). memcpy of the same number of fp16 bytes
 * between the two caches, in the same run, is the baseline. VQ codebooks are trained briefly on the
 * same synthetic data: their quality does not matter here, only the work per block does.
 *
 * usage: codec_cpu [--blocks N] [--min-seconds S] [--json FILE] [SPEC ...]
 */
#include "bench_util.h"
#include "vqkv_codec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Blocks one run holds: a get of 64 blocks of 4 MiB is 256 MiB. */
#define BENCH_MAX_BLOCKS 64

typedef struct {
    char spec[96];
    double bits, encode_gbps, decode_gbps, memcpy_gbps;
} bench_row_t;

/* One pass over all blocks of one kind of work. */
typedef struct {
    enum { BENCH_ENCODE, BENCH_DECODE, BENCH_MEMCPY } kind;
    const vqkv_codec_t *codec;
    const vqkv_kv_view_t *view;
    uint16_t *cache, *restored;
    uint8_t *packed;
    uint32_t blocks;
    size_t fp16_bytes;
} bench_pass_t;

static int bench_pass(const bench_pass_t *p)
{
    size_t block_bytes = p->codec ? vqkv_codec_block_bytes(p->codec) : 0;
    int rc = VQKV_OK;
    for (uint32_t s = 0; s < p->blocks && rc == VQKV_OK && p->kind == BENCH_ENCODE; s++)
        rc = vqkv_codec_encode(p->codec, p->cache, p->view, s, p->packed + s * block_bytes);
    if (p->kind == BENCH_DECODE) { /* all blocks at once, as one get */
        const uint8_t *in[BENCH_MAX_BLOCKS];
        uint32_t slots[BENCH_MAX_BLOCKS];
        for (uint32_t s = 0; s < p->blocks; s++) {
            in[s] = p->packed + s * block_bytes;
            slots[s] = s;
        }
        rc = vqkv_codec_decode_batch(p->codec, in, p->restored, p->view, slots, p->blocks, 0,
                                     vqkv_codec_layout(p->codec)->num_layers);
    }
    if (p->kind == BENCH_MEMCPY) {
        memcpy(p->restored, p->cache, p->fp16_bytes);
        __asm__ volatile("" : : "r"(p->restored) : "memory");
    }
    return rc;
}

/* Repeats the pass until min_seconds have passed: GB/s of fp16 bytes. */
static double bench_timed(const bench_pass_t *p, double min_seconds, int *rc)
{
    double t0 = bench_now(), elapsed;
    size_t passes = 0;
    do {
        *rc = bench_pass(p);
        passes++;
        elapsed = bench_now() - t0;
    } while (*rc == VQKV_OK && elapsed < min_seconds);
    return (double)p->fp16_bytes * (double)passes / elapsed / 1e9;
}

static int bench_codec(const char *spec, const vqkv_layout_t *layout, const vqkv_kv_view_t *view,
                       uint16_t *cache, uint16_t *restored, uint32_t blocks, double min_seconds,
                       bench_row_t *row)
{
    vqkv_codec_t *codec;
    int rc = vqkv_codec_create(spec, layout, &codec);
    if (rc != VQKV_OK) {
        fprintf(stderr, "codec_cpu: %s: %s\n", spec, vqkv_strerror(rc));
        return rc;
    }
    rc = bench_train(codec, view, cache);

    uint8_t *packed = malloc(vqkv_codec_block_bytes(codec) * blocks);
    bench_pass_t pass = {
        BENCH_ENCODE, codec,  view,   cache,
        restored,     packed, blocks, (size_t)view->slot_stride * 2 * layout->num_layers * blocks};
    snprintf(row->spec, sizeof row->spec, "%s", vqkv_codec_spec(codec));
    row->bits = vqkv_codec_bits_per_value(codec);
    if (rc == VQKV_OK)
        row->encode_gbps = bench_timed(&pass, min_seconds, &rc);
    pass.kind = BENCH_DECODE;
    if (rc == VQKV_OK)
        row->decode_gbps = bench_timed(&pass, min_seconds, &rc);
    pass.kind = BENCH_MEMCPY;
    if (rc == VQKV_OK)
        row->memcpy_gbps = bench_timed(&pass, min_seconds, &rc);
    free(packed);
    vqkv_codec_free(codec);
    if (rc != VQKV_OK)
        fprintf(stderr, "codec_cpu: %s: %s\n", spec, vqkv_strerror(rc));
    return rc;
}

int main(int argc, char **argv)
{
    bench_args_t args = {.blocks = 4, .min_seconds = 0.5};
    int bad = bench_args_parse(&args, argc, argv, "codec_cpu", BENCH_MAX_BLOCKS);
    if (bad != 0)
        return bad;
    uint32_t blocks = args.blocks;
    double min_seconds = args.min_seconds;
    const char *json_path = args.json_path;
    const char *const *specs = args.specs;
    size_t n_specs = args.n_specs;

    vqkv_layout_t layout = {32, 8, 128, 32, VQKV_DTYPE_F16};
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, blocks);
    uint16_t *cache = malloc(view.region_bytes), *restored = malloc(view.region_bytes);
    if (cache == NULL || restored == NULL) {
        fprintf(stderr, "codec_cpu: out of memory\n");
        return 1;
    }
    bench_fill(cache, view.region_bytes / 2, layout.head_dim);
    memcpy(restored, cache, view.region_bytes);

    bench_row_t rows[32];
    printf("layout: 32 layers, 8 kv heads, head_dim 128, 32 tokens/block (%.1f MiB fp16/block), "
           "%u blocks, 1 thread\n",
           (double)view.region_bytes / blocks / (1 << 20), blocks);
    printf("%-40s %6s %12s %12s %12s %8s %8s\n", "codec", "bits", "enc GB/s", "dec GB/s",
           "memcpy GB/s", "enc/cpy", "dec/cpy");
    for (size_t i = 0; i < n_specs; i++) {
        if (bench_codec(specs[i], &layout, &view, cache, restored, blocks, min_seconds, &rows[i]) !=
            VQKV_OK)
            return 1;
        bench_row_t *r = &rows[i];
        printf("%-40s %6.3f %12.3f %12.3f %12.3f %8.3f %8.3f\n", r->spec, r->bits, r->encode_gbps,
               r->decode_gbps, r->memcpy_gbps, r->encode_gbps / r->memcpy_gbps,
               r->decode_gbps / r->memcpy_gbps);
        fflush(stdout);
    }
    if (json_path != NULL) {
        FILE *f = fopen(json_path, "w");
        if (f == NULL) {
            fprintf(stderr, "codec_cpu: cannot write %s\n", json_path);
            return 1;
        }
        fprintf(f,
                "{\"bench\": \"codec_cpu\", \"layout\": {\"num_layers\": 32, \"num_kv_heads\": 8, "
                "\"head_dim\": 128, \"block_tokens\": 32, \"dtype\": \"f16\"}, \"blocks\": %u, "
                "\"threads\": 1, \"results\": [\n",
                blocks);
        for (size_t i = 0; i < n_specs; i++)
            fprintf(f,
                    "  {\"codec\": \"%s\", \"bits_per_value\": %.4f, \"encode_gbps\": %.4f, "
                    "\"decode_gbps\": %.4f, \"memcpy_gbps\": %.4f}%s\n",
                    rows[i].spec, rows[i].bits, rows[i].encode_gbps, rows[i].decode_gbps,
                    rows[i].memcpy_gbps, i + 1 < n_specs ? "," : "");
        fprintf(f, "]}\n");
        fclose(f);
    }
    free(cache);
    free(restored);
    return 0;
}
