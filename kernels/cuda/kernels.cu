/* kernels.cu -- the codec kernels as __global__ functions and their host
 * launcher (vqkv_cuda.h).
 *
 * Each kernel is a thin wrapper that hands its block and thread indices to
 * a body of kbody.h; everything the body does is executed on the CPU by the
 * tests' emulator, so what only a GPU proves is the launch itself. The
 * launcher checks a request on the host (vqkv_kbatch_check), copies its
 * slot and offset lists to the job's device scratch on the job's stream and
 * launches once for the whole batch. Built with --fmad=false on top of the
 * bodies' explicit __fmul_rn/__fadd_rn, so no multiply-add is ever fused.
 */
#include "../kmeans.h"
#include "kbody.h"
#include "vqkv_cuda.h"

#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct vqkv_cuda_codec {
    vqkv_kplan_t plan; /* host copy: sizes, units, checks */
    vqkv_kplan_t *plan_device;
    float *books_device;
};

struct vqkv_cuda_job {
    cudaStream_t stream;
    uint32_t max_blocks;
    uint32_t *slots_device;
    uint64_t *store_at_device;
};

__global__ void __launch_bounds__(VQKV_KERNEL_THREADS) vqkv_kdecode(vqkv_kbatch_t b)
{
    vqkv_kdecode_body(&b, blockIdx.x, blockDim.x, threadIdx.x);
}

__global__ void __launch_bounds__(VQKV_KERNEL_THREADS) vqkv_kencode_prep(vqkv_kbatch_t b)
{
    vqkv_kencode_prep_body(&b, blockIdx.x, blockDim.x, threadIdx.x);
}

__global__ void __launch_bounds__(VQKV_KERNEL_THREADS) vqkv_kencode(vqkv_kbatch_t b)
{
    vqkv_kencode_body(&b, blockIdx.x, blockDim.x, threadIdx.x);
}

__global__ void __launch_bounds__(VQKV_KERNEL_THREADS) vqkv_kassign(vqkv_kassign_t a)
{
    vqkv_kassign_body(&a, blockIdx.x, blockDim.x, threadIdx.x);
}

static thread_local char vqkv__cuda_error[160];

/* VQKV_OK for cudaSuccess; otherwise keeps the CUDA error's text. */
static int vqkv__cuda_rc(cudaError_t err)
{
    if (err == cudaSuccess)
        return VQKV_OK;
    snprintf(vqkv__cuda_error, sizeof vqkv__cuda_error, "%s: %s", cudaGetErrorName(err),
             cudaGetErrorString(err));
    return VQKV_EDEVICE;
}

extern "C" const char *vqkv_cuda_last_error(void)
{
    return vqkv__cuda_error;
}

extern "C" int vqkv_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* "no driver" must not stick to later calls */
        return 0;
    }
    return n;
}

extern "C" int vqkv_cuda_codec_create(const vqkv_codec_t *codec, vqkv_cuda_codec_t **out)
{
    if (codec == NULL || out == NULL)
        return VQKV_EINVAL;
    *out = NULL;
    vqkv_cuda_codec_t *gc = (vqkv_cuda_codec_t *)calloc(1, sizeof *gc);
    float *books = NULL;
    if (gc == NULL)
        return VQKV_ENOMEM;
    int rc = vqkv_kplan_build(codec, &gc->plan, &books);
    if (rc != VQKV_OK)
        goto fail;
    rc = vqkv__cuda_rc(cudaMalloc(&gc->plan_device, sizeof gc->plan));
    if (rc == VQKV_OK)
        rc = vqkv__cuda_rc(
            cudaMemcpy(gc->plan_device, &gc->plan, sizeof gc->plan, cudaMemcpyHostToDevice));
    if (rc == VQKV_OK && books != NULL) {
        size_t bytes = gc->plan.book_floats * sizeof(float);
        rc = vqkv__cuda_rc(cudaMalloc(&gc->books_device, bytes));
        if (rc == VQKV_OK)
            rc = vqkv__cuda_rc(cudaMemcpy(gc->books_device, books, bytes, cudaMemcpyHostToDevice));
    }
    if (rc != VQKV_OK)
        goto fail;
    free(books);
    *out = gc;
    return VQKV_OK;
fail:
    free(books);
    vqkv_cuda_codec_free(gc);
    return rc;
}

extern "C" void vqkv_cuda_codec_free(vqkv_cuda_codec_t *gc)
{
    if (gc == NULL)
        return;
    cudaFree(gc->plan_device);
    cudaFree(gc->books_device);
    free(gc);
}

extern "C" int vqkv_cuda_job_create(void *stream, uint32_t max_blocks, vqkv_cuda_job_t **out)
{
    if (out == NULL || max_blocks == 0)
        return VQKV_EINVAL;
    *out = NULL;
    vqkv_cuda_job_t *job = (vqkv_cuda_job_t *)calloc(1, sizeof *job);
    if (job == NULL)
        return VQKV_ENOMEM;
    job->stream = stream != NULL ? (cudaStream_t)stream : cudaStreamPerThread;
    job->max_blocks = max_blocks;
    int rc = vqkv__cuda_rc(cudaMalloc(&job->slots_device, max_blocks * sizeof(uint32_t)));
    if (rc == VQKV_OK)
        rc = vqkv__cuda_rc(cudaMalloc(&job->store_at_device, max_blocks * sizeof(uint64_t)));
    if (rc != VQKV_OK) {
        vqkv_cuda_job_free(job);
        return rc;
    }
    *out = job;
    return VQKV_OK;
}

extern "C" int vqkv_cuda_job_sync(vqkv_cuda_job_t *job)
{
    if (job == NULL)
        return VQKV_EINVAL;
    return vqkv__cuda_rc(cudaStreamSynchronize(job->stream));
}

extern "C" void vqkv_cuda_job_free(vqkv_cuda_job_t *job)
{
    if (job == NULL)
        return;
    cudaStreamSynchronize(job->stream);
    cudaFree(job->slots_device);
    cudaFree(job->store_at_device);
    free(job);
}

/* Checks a request, copies its lists to the job's scratch and fills the
 * batch the kernels get. The copies are queued on the job's stream after
 * its earlier launches, so the scratch is never overwritten under one. */
static int vqkv__cuda_batch(vqkv_cuda_job_t *job, const vqkv_cuda_codec_t *gc, uint8_t *store,
                            uint64_t store_bytes, const uint64_t *store_at, uint8_t *worker,
                            const vqkv_kv_view_t *view, const uint32_t *slots, uint32_t n_blocks,
                            vqkv_kbatch_t *b)
{
    if (job == NULL || gc == NULL || store == NULL || store_at == NULL || worker == NULL ||
        view == NULL || slots == NULL)
        return VQKV_EINVAL;
    if (n_blocks > job->max_blocks)
        return VQKV_EINVAL;
    int rc = vqkv_kbatch_check(&gc->plan, view, slots, store_at, n_blocks, store_bytes);
    if (rc != VQKV_OK)
        return rc;
    rc = vqkv__cuda_rc(cudaMemcpyAsync(job->slots_device, slots, n_blocks * sizeof *slots,
                                       cudaMemcpyHostToDevice, job->stream));
    if (rc == VQKV_OK)
        rc = vqkv__cuda_rc(cudaMemcpyAsync(job->store_at_device, store_at,
                                           n_blocks * sizeof *store_at, cudaMemcpyHostToDevice,
                                           job->stream));
    if (rc != VQKV_OK)
        return rc;
    memset(b, 0, sizeof *b);
    b->plan = gc->plan_device;
    b->books = gc->books_device;
    b->store = store;
    b->store_at = job->store_at_device;
    b->worker = worker;
    b->slots = job->slots_device;
    b->view = *view;
    b->n_blocks = n_blocks;
    return VQKV_OK;
}

typedef void (*vqkv__kernel_fn)(vqkv_kbatch_t);

static int vqkv__cuda_launch(vqkv__kernel_fn kernel, vqkv_kernel_t which, vqkv_kbatch_t *b,
                             const vqkv_cuda_codec_t *gc, cudaStream_t stream)
{
    vqkv_kgeom_t g = vqkv_kbatch_prepare(b, &gc->plan, which);
    if (g.grid == 0)
        return VQKV_OK;
    kernel<<<g.grid, g.block, g.shared, stream>>>(*b);
    return vqkv__cuda_rc(cudaGetLastError());
}

extern "C" int vqkv_cuda_decode(vqkv_cuda_job_t *job, const vqkv_cuda_codec_t *gc,
                                const uint8_t *store, uint64_t store_bytes,
                                const uint64_t *store_at, void *worker, const vqkv_kv_view_t *view,
                                const uint32_t *slots, uint32_t n_blocks)
{
    vqkv_kbatch_t b;
    int rc = vqkv__cuda_batch(job, gc, (uint8_t *)store, store_bytes, store_at, (uint8_t *)worker,
                              view, slots, n_blocks, &b);
    if (rc != VQKV_OK)
        return rc;
    return vqkv__cuda_launch(vqkv_kdecode, VQKV_KERNEL_DECODE, &b, gc, job->stream);
}

extern "C" int vqkv_cuda_encode(vqkv_cuda_job_t *job, const vqkv_cuda_codec_t *gc, uint8_t *store,
                                uint64_t store_bytes, const uint64_t *store_at, const void *worker,
                                const vqkv_kv_view_t *view, const uint32_t *slots,
                                uint32_t n_blocks)
{
    vqkv_kbatch_t b;
    int rc = vqkv__cuda_batch(job, gc, store, store_bytes, store_at, (uint8_t *)worker, view, slots,
                              n_blocks, &b);
    if (rc == VQKV_OK)
        rc = vqkv__cuda_launch(vqkv_kencode_prep, VQKV_KERNEL_ENCODE_PREP, &b, gc, job->stream);
    if (rc == VQKV_OK)
        rc = vqkv__cuda_launch(vqkv_kencode, VQKV_KERNEL_ENCODE, &b, gc, job->stream);
    return rc;
}

/* k-means assignment on the current device, on the calling thread's default
 * stream, so training threads run their steps side by side. One
 * stream-ordered allocation per step (no device-wide synchronization) holds
 * the points, the centroids and the answers; O(n*d) bytes over the bus
 * against O(n*k*d) work on the GPU. */
static int vqkv__cuda_assign(void *ctx, const float *x, size_t n, uint32_t d,
                             const float *centroids, const float *norms, uint32_t k,
                             uint32_t *assign, float *mind)
{
    (void)ctx;
    cudaStream_t stream = cudaStreamPerThread;
    size_t x_bytes = n * d * sizeof(float), c_bytes = (size_t)k * d * sizeof(float);
    size_t norm_bytes = k * sizeof(float), out_bytes = n * sizeof(float);
    uint8_t *buf = NULL;
    int rc = vqkv__cuda_rc(
        cudaMallocAsync((void **)&buf, x_bytes + c_bytes + norm_bytes + 2 * out_bytes, stream));
    if (rc != VQKV_OK)
        return rc;
    vqkv_kassign_t a;
    a.x = (const float *)buf;
    a.centroids = (const float *)(buf + x_bytes);
    a.norms = (const float *)(buf + x_bytes + c_bytes);
    a.assign = (uint32_t *)(buf + x_bytes + c_bytes + norm_bytes);
    a.mind = (float *)(buf + x_bytes + c_bytes + norm_bytes + out_bytes);
    a.n = n;
    a.d = d;
    a.k = k;
    vqkv_kgeom_t g = vqkv_kassign_geometry(n);
    cudaMemcpyAsync((void *)a.x, x, x_bytes, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync((void *)a.centroids, centroids, c_bytes, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync((void *)a.norms, norms, norm_bytes, cudaMemcpyHostToDevice, stream);
    vqkv_kassign<<<g.grid, g.block, g.shared, stream>>>(a);
    cudaMemcpyAsync(assign, a.assign, out_bytes, cudaMemcpyDeviceToHost, stream);
    cudaMemcpyAsync(mind, a.mind, out_bytes, cudaMemcpyDeviceToHost, stream);
    cudaFreeAsync(buf, stream);
    /* Any failure above is sticky in the stream or reported here. */
    rc = vqkv__cuda_rc(cudaGetLastError());
    if (rc == VQKV_OK)
        rc = vqkv__cuda_rc(cudaStreamSynchronize(stream));
    return rc;
}

static const vqkv_assigner_t vqkv__cuda_assigner = {vqkv__cuda_assign, NULL};

extern "C" const vqkv_assigner_t *vqkv_cuda_assigner(void)
{
    return vqkv_cuda_device_count() > 0 ? &vqkv__cuda_assigner : NULL;
}
