/* codec_gpu.c -- GPU codec throughput next to cudaMemcpy of the same bytes.
 *
 * Blocks of a Llama-8B-like layout (32 layers, 8 kv heads, head_dim 128,
 * 32 tokens per block: 4 MiB of fp16 per block) live in a vLLM-style paged
 * fp16 cache in device memory. Each codec encodes all blocks out of it in
 * one request (one launch, two with escapes or block means) and decodes
 * them back into a second cache in one request; the figures are GB/s of
 * fp16 read (encode) and written (decode), timed with CUDA events over
 * repeated requests. The baseline, measured in the same run on the same
 * buffers, is a device-to-device cudaMemcpy of the same fp16 bytes.
 * Without a CUDA device it says so and exits 77.
 *
 * usage: codec_gpu [--blocks N] [--min-seconds S] [--json FILE] [SPEC ...]
 */
#include "bench_util.h"
#include "vqkv_cuda.h"

#include <cuda_runtime_api.h>

#include <stdio.h>
#include <string.h>

typedef struct {
    char spec[96];
    double bits, encode_gbps, decode_gbps, copy_gbps;
} gpu_row_t;

typedef struct {
    vqkv_cuda_job_t *job;
    cudaStream_t stream;
    const vqkv_kv_view_t *view;
    uint8_t *cache, *restored, *store; /* device */
    uint64_t store_bytes;
    const uint64_t *store_at;
    const uint32_t *slots;
    uint32_t blocks;
    size_t fp16_bytes;
} gpu_bench_t;

enum { GPU_ENCODE, GPU_DECODE, GPU_COPY };

static int gpu_request(const gpu_bench_t *g, const vqkv_cuda_codec_t *gc, int kind)
{
    switch (kind) {
    case GPU_ENCODE:
        return vqkv_cuda_encode(g->job, gc, g->store, g->store_bytes, g->store_at, g->cache,
                                g->view, g->slots, g->blocks);
    case GPU_DECODE:
        return vqkv_cuda_decode(g->job, gc, g->store, g->store_bytes, g->store_at, g->restored,
                                g->view, g->slots, g->blocks);
    default:
        return cudaMemcpyAsync(g->restored, g->cache, g->fp16_bytes, cudaMemcpyDeviceToDevice,
                               g->stream) == cudaSuccess
                   ? VQKV_OK
                   : VQKV_EDEVICE;
    }
}

/* GB/s of fp16 bytes: one warm-up request, then doubling batches of
 * requests timed by events until a batch takes min_seconds. */
static double gpu_timed(const gpu_bench_t *g, const vqkv_cuda_codec_t *gc, int kind,
                        double min_seconds, int *rc)
{
    cudaEvent_t start, stop;
    float ms = 0.0f;
    uint32_t reps = 1;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    *rc = gpu_request(g, gc, kind);
    for (; *rc == VQKV_OK; reps *= 2) {
        cudaEventRecord(start, g->stream);
        for (uint32_t i = 0; i < reps && *rc == VQKV_OK; i++)
            *rc = gpu_request(g, gc, kind);
        cudaEventRecord(stop, g->stream);
        if (cudaEventSynchronize(stop) != cudaSuccess)
            *rc = VQKV_EDEVICE;
        cudaEventElapsedTime(&ms, start, stop);
        if (ms * 1e-3 >= min_seconds || reps >= (1u << 20))
            break;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms > 0.0f ? (double)g->fp16_bytes * reps / (ms * 1e-3) / 1e9 : 0.0;
}

static int gpu_codec(const char *spec, const vqkv_layout_t *layout, gpu_bench_t *g,
                     double min_seconds, gpu_row_t *row)
{
    vqkv_codec_t *codec = NULL;
    vqkv_cuda_codec_t *gc = NULL;
    uint64_t *store_at = malloc(g->blocks * sizeof *store_at);
    int rc = store_at == NULL ? VQKV_ENOMEM : vqkv_codec_create(spec, layout, &codec);
    if (rc == VQKV_OK)
        rc = bench_train(codec, BENCH_TRAIN_TOKENS);
    if (rc == VQKV_OK)
        rc = vqkv_cuda_codec_create(codec, &gc);
    if (rc == VQKV_OK) {
        uint64_t bb = vqkv_codec_block_bytes(codec);
        for (uint32_t i = 0; i < g->blocks; i++)
            store_at[i] = i * bb;
        g->store_bytes = bb * g->blocks;
        g->store_at = store_at;
        if (cudaMalloc((void **)&g->store, g->store_bytes) != cudaSuccess)
            rc = VQKV_EDEVICE;
    }
    if (rc == VQKV_OK) {
        snprintf(row->spec, sizeof row->spec, "%s", vqkv_codec_spec(codec));
        row->bits = vqkv_codec_bits_per_value(codec);
        row->encode_gbps = gpu_timed(g, gc, GPU_ENCODE, min_seconds, &rc);
    }
    if (rc == VQKV_OK)
        row->decode_gbps = gpu_timed(g, gc, GPU_DECODE, min_seconds, &rc);
    if (rc == VQKV_OK)
        row->copy_gbps = gpu_timed(g, gc, GPU_COPY, min_seconds, &rc);
    if (rc != VQKV_OK)
        fprintf(stderr, "codec_gpu: %s: %s %s\n", spec, vqkv_strerror(rc), vqkv_cuda_last_error());
    cudaFree(g->store);
    g->store = NULL;
    vqkv_cuda_codec_free(gc);
    vqkv_codec_free(codec);
    free(store_at);
    return rc;
}

static int gpu_write_json(const char *path, const char *device, uint32_t blocks,
                          const gpu_row_t *rows, size_t n)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "codec_gpu: cannot write %s\n", path);
        return 1;
    }
    fprintf(f,
            "{\"bench\": \"codec_gpu\", \"device\": \"%s\", \"layout\": {\"num_layers\": 32, "
            "\"num_kv_heads\": 8, \"head_dim\": 128, \"block_tokens\": 32, \"dtype\": \"f16\", "
            "\"view\": \"vllm\"}, \"blocks\": %u, \"results\": [\n",
            device, blocks);
    for (size_t i = 0; i < n; i++)
        fprintf(f,
                "  {\"codec\": \"%s\", \"bits_per_value\": %.4f, \"encode_gbps\": %.3f, "
                "\"decode_gbps\": %.3f, \"cudamemcpy_d2d_gbps\": %.3f}%s\n",
                rows[i].spec, rows[i].bits, rows[i].encode_gbps, rows[i].decode_gbps,
                rows[i].copy_gbps, i + 1 < n ? "," : "");
    fprintf(f, "]}\n");
    fclose(f);
    return 0;
}

int main(int argc, char **argv)
{
    bench_args_t args = {.blocks = 64, .min_seconds = 0.2};
    int bad = bench_args_parse(&args, argc, argv, "codec_gpu", 4096);
    if (bad != 0)
        return bad;
    uint32_t blocks = args.blocks;
    double min_seconds = args.min_seconds;
    const char *json_path = args.json_path;
    const char *const *specs = args.specs;
    size_t n_specs = args.n_specs;
    if (vqkv_cuda_device_count() == 0) {
        fprintf(stderr, "codec_gpu: SKIPPED: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);

    vqkv_layout_t layout = {32, 8, 128, 32, VQKV_DTYPE_F16};
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, blocks);
    uint32_t *slots = malloc(blocks * sizeof *slots);
    uint16_t *host = malloc(view.region_bytes);
    gpu_bench_t g = {
        .view = &view, .slots = slots, .blocks = blocks, .fp16_bytes = view.region_bytes};
    if (slots == NULL || host == NULL || cudaStreamCreate(&g.stream) != cudaSuccess ||
        cudaMalloc((void **)&g.cache, view.region_bytes) != cudaSuccess ||
        cudaMalloc((void **)&g.restored, view.region_bytes) != cudaSuccess ||
        vqkv_cuda_job_create(g.stream, blocks, &g.job) != VQKV_OK) {
        fprintf(stderr, "codec_gpu: out of memory for %u blocks\n", blocks);
        return 1;
    }
    for (uint32_t i = 0; i < blocks; i++)
        slots[i] = i;
    bench_fill(host, view.region_bytes / 2, layout.head_dim);
    cudaMemcpy(g.cache, host, view.region_bytes, cudaMemcpyHostToDevice);

    gpu_row_t rows[32];
    printf("device: %s; layout: 32 layers, 8 kv heads, head_dim 128, 32 tokens/block "
           "(%.1f MiB fp16/block), %u blocks per request, vLLM paged cache\n",
           prop.name, (double)view.region_bytes / blocks / (1 << 20), blocks);
    printf("%-40s %6s %12s %12s %12s %8s %8s\n", "codec", "bits", "enc GB/s", "dec GB/s",
           "d2d GB/s", "enc/cpy", "dec/cpy");
    for (size_t i = 0; i < n_specs; i++) {
        if (gpu_codec(specs[i], &layout, &g, min_seconds, &rows[i]) != VQKV_OK)
            return 1;
        gpu_row_t *r = &rows[i];
        printf("%-40s %6.3f %12.2f %12.2f %12.2f %8.3f %8.3f\n", r->spec, r->bits, r->encode_gbps,
               r->decode_gbps, r->copy_gbps, r->encode_gbps / r->copy_gbps,
               r->decode_gbps / r->copy_gbps);
        fflush(stdout);
    }
    int rc = json_path != NULL ? gpu_write_json(json_path, prop.name, blocks, rows, n_specs) : 0;
    vqkv_cuda_job_free(g.job);
    cudaFree(g.cache);
    cudaFree(g.restored);
    cudaStreamDestroy(g.stream);
    free(slots);
    free(host);
    return rc;
}
