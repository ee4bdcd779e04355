/* codec_cpu.c -- CPU codec throughput next to memcpy of the same bytes.
 *
 * Blocks of a Llama-8B-like layout (32 layers, 8 kv heads, head_dim 128,
 * 32 tokens per block: 4 MiB of fp16 per block), or with --shape NAME of a
 * model shape vqkv-benchmark serves (vqkv_worker_shape: smollm2-135m or
 * llama3-8b, 16 tokens per block), live in a vLLM-style paged fp16 cache.
 * Each codec encodes blocks out of it and decodes them back into a second
 * cache, and the figures are GB/s of fp16 in (encode) and out (decode).
 * Encode takes the blocks 4 at a time, as puts of vqkv-benchmark's 4-block
 * prefixes (vqkv_codec_encode_batch), decode all of them as one batch, as
 * a get does (vqkv_codec_decode_batch); both go layer by layer. memcpy of
 * the same number of fp16 bytes between the two caches, in the same run,
 * is the baseline. With --threads T (default 1) each pass is split T ways
 * as vqkvd splits a request: encode and decode by layers, memcpy by bytes. VQ
 * codebooks are trained as vqkvd calibrates (bench_train): on other tokens
 * of the same distribution, so that codes spread over the codebooks as a
 * real cache's do, which is what decode's codeword reads depend on.
 *
 * usage: codec_cpu [--shape smollm2-135m|llama3-8b] [--blocks N] [--threads T]
 *                  [--min-seconds S] [--json FILE] [SPEC ...]
 */
#include "bench_util.h"
#include "vqkv_codec.h"
#include "worker.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Blocks one run holds: a get of 64 blocks of 4 MiB is 256 MiB. */
#define BENCH_MAX_BLOCKS 64
/* Blocks a put carries: vqkv-benchmark's default prefix of 4 blocks. */
#define BENCH_PUT_BLOCKS 4

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

/* Share `share` of `shares` of a range of n: [n*share/shares, n*(share+1)/shares). */
static size_t bench_share_begin(size_t n, uint32_t share, uint32_t shares)
{
    return n * share / shares;
}

static int bench_pass(const bench_pass_t *p, uint32_t share, uint32_t shares)
{
    size_t block_bytes = p->codec ? vqkv_codec_block_bytes(p->codec) : 0;
    int rc = VQKV_OK;
    uint32_t layers = p->codec ? vqkv_codec_layout(p->codec)->num_layers : 0;
    uint32_t first_layer = (uint32_t)bench_share_begin(layers, share, shares);
    uint32_t end_layer = (uint32_t)bench_share_begin(layers, share + 1, shares);
    uint8_t *out[BENCH_MAX_BLOCKS];
    const uint8_t *in[BENCH_MAX_BLOCKS];
    uint32_t slots[BENCH_MAX_BLOCKS];
    for (uint32_t s = 0; s < p->blocks; s++) {
        out[s] = p->packed + s * block_bytes;
        in[s] = out[s];
        slots[s] = s;
    }
    if (p->kind == BENCH_ENCODE) /* puts of BENCH_PUT_BLOCKS blocks */
        for (uint32_t s = 0; s < p->blocks && rc == VQKV_OK; s += BENCH_PUT_BLOCKS)
            rc = vqkv_codec_encode_batch(p->codec, p->cache, p->view, slots + s, out + s,
                                         p->blocks - s < BENCH_PUT_BLOCKS ? p->blocks - s
                                                                          : BENCH_PUT_BLOCKS,
                                         first_layer, end_layer);
    if (p->kind == BENCH_DECODE) /* all blocks at once, as one get */
        rc = vqkv_codec_decode_batch(p->codec, in, p->restored, p->view, slots, p->blocks,
                                     first_layer, end_layer);
    if (p->kind == BENCH_MEMCPY) {
        size_t begin = bench_share_begin(p->fp16_bytes / 64, share, shares) * 64;
        size_t end = share + 1 == shares
                         ? p->fp16_bytes
                         : bench_share_begin(p->fp16_bytes / 64, share + 1, shares) * 64;
        memcpy((uint8_t *)p->restored + begin, (const uint8_t *)p->cache + begin, end - begin);
        __asm__ volatile("" : : "r"(p->restored) : "memory");
    }
    return rc;
}

typedef struct {
    const bench_pass_t *pass;
    uint32_t share, shares;
    int rc;
} bench_share_t;

static void *bench_share_run(void *arg)
{
    bench_share_t *s = arg;
    s->rc = bench_pass(s->pass, s->share, s->shares);
    return NULL;
}

/* One pass split over `threads` threads (this one and threads - 1 more,
 * started per pass: tens of microseconds against passes of milliseconds). */
static int bench_pass_threads(const bench_pass_t *p, uint32_t threads)
{
    bench_share_t shares[BENCH_MAX_THREADS] = {{NULL, 0, 1, VQKV_OK}};
    pthread_t tid[BENCH_MAX_THREADS];
    uint32_t started = 1;
    for (uint32_t i = 0; i < threads; i++)
        shares[i] = (bench_share_t){p, i, threads, VQKV_OK};
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, bench_share_run, &shares[started]) != 0)
            break;
    bench_share_run(&shares[0]);
    int rc = started == threads ? VQKV_OK : VQKV_ENOMEM;
    for (uint32_t i = 1; i < started; i++)
        pthread_join(tid[i], NULL);
    for (uint32_t i = 0; i < started && rc == VQKV_OK; i++)
        rc = shares[i].rc;
    return rc;
}

/* Repeats the pass until min_seconds have passed: GB/s of fp16 bytes. */
static double bench_timed(const bench_pass_t *p, uint32_t threads, double min_seconds, int *rc)
{
    double t0 = bench_now(), elapsed;
    size_t passes = 0;
    do {
        *rc = bench_pass_threads(p, threads);
        passes++;
        elapsed = bench_now() - t0;
    } while (*rc == VQKV_OK && elapsed < min_seconds);
    return (double)p->fp16_bytes * (double)passes / elapsed / 1e9;
}

static int bench_codec(const char *spec, const vqkv_layout_t *layout, const vqkv_kv_view_t *view,
                       uint16_t *cache, uint16_t *restored, uint32_t blocks, uint32_t threads,
                       double min_seconds, bench_row_t *row)
{
    vqkv_codec_t *codec;
    int rc = vqkv_codec_create(spec, layout, &codec);
    if (rc != VQKV_OK) {
        fprintf(stderr, "codec_cpu: %s: %s\n", spec, vqkv_strerror(rc));
        return rc;
    }
    rc = bench_train(codec, BENCH_TRAIN_TOKENS);

    uint8_t *packed = malloc(vqkv_codec_block_bytes(codec) * blocks);
    bench_pass_t pass = {
        BENCH_ENCODE, codec,  view,   cache,
        restored,     packed, blocks, (size_t)view->slot_stride * 2 * layout->num_layers * blocks};
    snprintf(row->spec, sizeof row->spec, "%s", vqkv_codec_spec(codec));
    row->bits = vqkv_codec_bits_per_value(codec);
    if (rc == VQKV_OK)
        row->encode_gbps = bench_timed(&pass, threads, min_seconds, &rc);
    pass.kind = BENCH_DECODE;
    if (rc == VQKV_OK)
        row->decode_gbps = bench_timed(&pass, threads, min_seconds, &rc);
    pass.kind = BENCH_MEMCPY;
    if (rc == VQKV_OK)
        row->memcpy_gbps = bench_timed(&pass, threads, min_seconds, &rc);
    free(packed);
    vqkv_codec_free(codec);
    if (rc != VQKV_OK)
        fprintf(stderr, "codec_cpu: %s: %s\n", spec, vqkv_strerror(rc));
    return rc;
}

int main(int argc, char **argv)
{
    bench_args_t args = {.blocks = 4, .threads = 1, .min_seconds = 0.5, .shapes = 1};
    int bad = bench_args_parse(&args, argc, argv, "codec_cpu", BENCH_MAX_BLOCKS);
    if (bad != 0)
        return bad;
    uint32_t blocks = args.blocks, threads = args.threads;
    double min_seconds = args.min_seconds;
    const char *json_path = args.json_path;
    const char *const *specs = args.specs;
    size_t n_specs = args.n_specs;

    vqkv_layout_t layout = {32, 8, 128, 32, VQKV_DTYPE_F16};
    const char *shape = args.shape != NULL ? args.shape : "llama-8b-like";
    if (args.shape != NULL && vqkv_worker_shape(args.shape, &layout) != VQKV_OK) {
        fprintf(stderr, "codec_cpu: unknown --shape %s (smollm2-135m or llama3-8b)\n", args.shape);
        return 2;
    }
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
    printf("layout: %s, %u layers, %u kv heads, head_dim %u, %u tokens/block (%.2f MiB "
           "fp16/block), %u blocks, %u thread%s\n",
           shape, layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_tokens,
           (double)view.region_bytes / blocks / (1 << 20), blocks, threads, threads > 1 ? "s" : "");
    printf("%-40s %6s %12s %12s %12s %8s %8s\n", "codec", "bits", "enc GB/s", "dec GB/s",
           "memcpy GB/s", "enc/cpy", "dec/cpy");
    for (size_t i = 0; i < n_specs; i++) {
        if (bench_codec(specs[i], &layout, &view, cache, restored, blocks, threads, min_seconds,
                        &rows[i]) != VQKV_OK)
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
                "{\"bench\": \"codec_cpu\", \"shape\": \"%s\", \"layout\": {\"num_layers\": %u, "
                "\"num_kv_heads\": %u, \"head_dim\": %u, \"block_tokens\": %u, \"dtype\": "
                "\"f16\"}, \"train_tokens\": %u, \"blocks\": %u, \"threads\": %u, \"results\": [\n",
                shape, layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_tokens,
                BENCH_TRAIN_TOKENS, blocks, threads);
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
