/* backend_cuda.c -- vqkvd's CUDA backend (backend.h): compressed blocks in
 * the memory of one GPU or several, workers' paged KV caches opened
 * through CUDA IPC, and the codec kernels of kernels/cuda run between the
 * two on streams of the daemon's own. Built only when vqkvd is built with
 * CUDA (VQKVD_CUDA).
 *
 * The arena is one range of device addresses over pieces of at most
 * VQKVD_CUDA_MAX_ALLOC bytes each (cuda_store.h), carved into chunks like
 * the CPU's; a slot "pointer" is a device address the host never
 * dereferences. A batch's device addresses become offsets into that one
 * store, which is what the kernels take, however many pieces it has.
 *
 * Several GPUs. The store is shared evenly by the GPUs served and every
 * one of them may reach all of it (peer access, checked at start), so a
 * block is stored once wherever the pool puts it and restored into a
 * worker on any GPU. Each GPU has its own streams, jobs and copies of the
 * codebooks; a request runs on the GPU of its region. A block another
 * GPU holds costs peer reads (NVLink or PCIe); placing blocks on the GPU
 * that asked would save them, but the pool's chunks are not per device:
 * not done so far.
 *
 * Regions. A CUDA_IPC region is opened with cudaIpcOpenMemHandle (the
 * handle names the allocation; the view's offset finds the tensor in it);
 * a CUDA_VMM_FD region is imported from its fd (the driver API, reached
 * through the runtime's entry points so vqkvd links no libcuda), mapped at
 * an address of the daemon's and made readable and writable by this GPU.
 * Either is refused unless its gpu_uuid is this GPU's. Both are closed by
 * region_close, which the session calls after the last job using the
 * region has finished.
 *
 * Streams. Each thread-pool thread runs its requests on a job of its own
 * (a stream and the scratch for slot lists), taken from a free list under
 * a mutex and given back after the request has been synchronised, so
 * requests on different threads overlap on the GPU. A request is one launch
 * for every block and layer (whole_blocks), so the session does not split
 * it by layers.
 *
 * Events. A Put may name an interprocess event the worker recorded after
 * writing its blocks: the job's stream waits on it before the encode. A
 * Get may name one too: the job records it after the decode's launches
 * and the session replies at once, while finish, on another pool thread,
 * waits for the stream before the blocks' holds and the job are let go.
 *
 * Failure. A CUDA error fails its request with the error's name. A sticky
 * error (the context is lost: an illegal address, a launch failure) is
 * logged and the process exits with status 70, so that systemd restarts
 * vqkvd instead of it serving from a broken context.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "backend.h"
#include "config.h"
#include "cuda_store.h"
#include "log.h"
#include "vqkv_cuda.h"

/* Slots one job's scratch lists: the most blocks a request names (a Put
 * or Get is at most 256 MiB of logical KV; 65536 covers 4 KiB blocks). */
#define VQKVD__CUDA_JOB_BLOCKS 65536
/* Codecs whose device copies a backend keeps: one per model and fallback. */
#define VQKVD__CUDA_MAX_CODECS (2 * 1024)
/* The exit status after a sticky CUDA error (EX_SOFTWARE). */
#define VQKVD__CUDA_EXIT_STICKY 70

typedef struct vqkvd__cuda_job_entry {
    struct vqkvd__cuda_job_entry *next;
    vqkv_cuda_job_t *job;
    cudaStream_t stream;
} vqkvd__cuda_job_entry_t;

/* One GPU served: its jobs and its copies of the codecs. */
typedef struct {
    int ordinal;
    vqkvd__cuda_job_entry_t *idle_jobs;
    struct {
        const vqkv_codec_t *host;
        vqkv_cuda_codec_t *device;
    } codecs[VQKVD__CUDA_MAX_CODECS];
    uint32_t n_codecs;
} vqkvd__cuda_gpu_t;

typedef struct {
    vqkvd_backend_t base; /* first: the session sees this */
    vqkvd_device_t info[VQKVD_MAX_GPUS];
    vqkvd__cuda_gpu_t *gpus[VQKVD_MAX_GPUS]; /* base.n_devices of them */
    vqkvd_cuda_driver_t driver;
    vqkvd_cuda_store_t store; /* the arena's device memory, on every GPU */
    pthread_mutex_t lock;     /* every GPU's jobs and codecs */
} vqkvd__cuda_t;

/* ---- errors ----------------------------------------------------------------- */

/* Errors after which the context cannot be used again. */
static bool vqkvd__cuda_sticky(cudaError_t err)
{
    switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable: return true;
    default: return false;
    }
}

/* After a failed CUDA call: exits on a sticky error (see the top). */
static void vqkvd__cuda_check_context(const char *what)
{
    cudaError_t err = cudaPeekAtLastError();
    if (!vqkvd__cuda_sticky(err))
        return;
    vqkvd_log(VQKVD_LOG_ERROR,
              "%s: %s (%s): the CUDA context is lost; exiting so that vqkvd restarts", what,
              cudaGetErrorName(err), cudaGetErrorString(err));
    _exit(VQKVD__CUDA_EXIT_STICKY);
}

/* VQKV_OK, or VQKV_EDEVICE with why naming the call and the error. */
static int vqkvd__cuda_rt(cudaError_t err, const char *call, char *why, size_t why_size)
{
    if (err == cudaSuccess)
        return VQKV_OK;
    snprintf(why, why_size, "%s: %s", call, cudaGetErrorName(err));
    vqkvd__cuda_check_context(call);
    return VQKV_EDEVICE;
}

static int vqkvd__cuda_drv(CUresult err, const char *call, char *why, size_t why_size)
{
    if (err == CUDA_SUCCESS)
        return VQKV_OK;
    snprintf(why, why_size, "%s: CUDA driver error %d", call, (int)err);
    return VQKV_EMAP;
}

int vqkvd_backend_cuda_count(void)
{
    return vqkv_cuda_device_count();
}

/* ---- the arena -------------------------------------------------------------- */

static int vqkvd__cuda_arena_alloc(vqkvd_arena_t *a, void **ptr, uint64_t *offset)
{
    if (a->chunks_used >= a->max_chunks)
        return VQKV_ENOMEM;
    uint64_t off = (uint64_t)a->chunks_used * a->chunk_bytes;
    *ptr = a->base + off;
    *offset = off;
    a->chunks_used++;
    return VQKV_OK;
}

static void vqkvd__cuda_arena_free(vqkvd_arena_t *a)
{
    vqkvd__cuda_t *g = a->owner;
    cudaSetDevice(g->gpus[0]->ordinal);
    vqkvd_cuda_store_close(&g->driver, &g->store);
    a->base = NULL;
}

static const vqkvd_arena_ops_t vqkvd__cuda_arena_ops = {
    .name = "cuda",
    .alloc_chunk = vqkvd__cuda_arena_alloc,
    .free_all = vqkvd__cuda_arena_free,
};

/* ---- jobs and device codecs ---------------------------------------------------- */

/* A job on gpu (current on this thread) for this thread's request: an
 * idle one, or a new one on a stream of its own. NULL with why filled when
 * CUDA cannot make one. */
static vqkvd__cuda_job_entry_t *vqkvd__cuda_job_take(vqkvd__cuda_t *g, vqkvd__cuda_gpu_t *gpu,
                                                     char *why, size_t why_size)
{
    pthread_mutex_lock(&g->lock);
    vqkvd__cuda_job_entry_t *e = gpu->idle_jobs;
    if (e != NULL)
        gpu->idle_jobs = e->next;
    pthread_mutex_unlock(&g->lock);
    if (e != NULL)
        return e;
    e = calloc(1, sizeof *e);
    if (e == NULL) {
        snprintf(why, why_size, "out of memory");
        return NULL;
    }
    if (vqkvd__cuda_rt(cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking),
                       "cudaStreamCreate", why, why_size) != VQKV_OK) {
        free(e);
        return NULL;
    }
    if (vqkv_cuda_job_create(e->stream, VQKVD__CUDA_JOB_BLOCKS, &e->job) != VQKV_OK) {
        snprintf(why, why_size, "a job: %s", vqkv_cuda_last_error());
        cudaStreamDestroy(e->stream);
        free(e);
        return NULL;
    }
    return e;
}

static void vqkvd__cuda_job_give(vqkvd__cuda_t *g, vqkvd__cuda_gpu_t *gpu,
                                 vqkvd__cuda_job_entry_t *e)
{
    pthread_mutex_lock(&g->lock);
    e->next = gpu->idle_jobs;
    gpu->idle_jobs = e;
    pthread_mutex_unlock(&g->lock);
}

/* codec's copy on gpu (current on this thread), made on first use
 * (codecs without codebooks) or when its codebooks became final; NULL when
 * CUDA cannot make it. The codecs live as long as the server, so the host
 * pointer names them. A linear search under the lock, once per run of
 * blocks: O(codecs), two per model, noise next to a launch; a hash is not
 * needed so far. */
static vqkv_cuda_codec_t *vqkvd__cuda_codec(vqkvd__cuda_t *g, vqkvd__cuda_gpu_t *gpu,
                                            const vqkv_codec_t *codec)
{
    vqkv_cuda_codec_t *found = NULL;
    pthread_mutex_lock(&g->lock);
    for (uint32_t i = 0; i < gpu->n_codecs && found == NULL; i++)
        if (gpu->codecs[i].host == codec)
            found = gpu->codecs[i].device;
    if (found == NULL && gpu->n_codecs < VQKVD__CUDA_MAX_CODECS &&
        vqkv_cuda_codec_create(codec, &found) == VQKV_OK) {
        gpu->codecs[gpu->n_codecs].host = codec;
        gpu->codecs[gpu->n_codecs].device = found;
        gpu->n_codecs++;
    }
    pthread_mutex_unlock(&g->lock);
    return found;
}

/* ---- regions --------------------------------------------------------------------- */

static int vqkvd__cuda_open_ipc(vqkvd__cuda_t *g, const Vqkv__RegisterRegion *rr,
                                vqkvd_region_mem_t *mem, char *why, size_t why_size)
{
    cudaIpcMemHandle_t handle;
    memcpy(&handle, rr->cuda_ipc_handle.data, sizeof handle);
    void *ptr = NULL;
    int rc = vqkvd__cuda_rt(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess),
                            "cudaIpcOpenMemHandle", why, why_size);
    if (rc != VQKV_OK)
        return VQKV_EMAP;
    /* The worker said how large its allocation is; the driver knows. */
    CUdeviceptr start = 0;
    size_t size = 0;
    rc = vqkvd__cuda_drv(g->driver.address_range(&start, &size, (CUdeviceptr)(uintptr_t)ptr),
                         "cuMemGetAddressRange", why, why_size);
    if (rc == VQKV_OK && size < rr->region_bytes) {
        snprintf(why, why_size, "region_bytes %llu is past the allocation's %zu bytes",
                 (unsigned long long)rr->region_bytes, size);
        rc = VQKV_ERANGE;
    }
    if (rc != VQKV_OK) {
        cudaIpcCloseMemHandle(ptr);
        return rc;
    }
    mem->base = ptr;
    mem->bytes = rr->region_bytes;
    mem->vmm = false;
    return VQKV_OK;
}

static int vqkvd__cuda_piece_import(vqkvd_backend_t *be, int fd, uint64_t *piece, char *why,
                                    size_t why_size)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    CUmemGenericAllocationHandle h = 0;
    cudaSetDevice(g->gpus[0]->ordinal); /* a context; the handle is not bound to it */
    int rc = vqkvd__cuda_drv(
        g->driver.import(&h, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle (is the fd an exported VMM allocation?)", why, why_size);
    *piece = h;
    return rc;
}

static void vqkvd__cuda_piece_release(vqkvd_backend_t *be, uint64_t piece)
{
    ((vqkvd__cuda_t *)be)->driver.release(piece);
}

/* Unmaps the pieces mapped over [va, va + bytes), one call each as the
 * driver asks (a range is unmapped as it was mapped), found by asking the
 * driver where each mapping ends: O(pieces) calls. */
static void vqkvd__cuda_unmap_pieces(const vqkvd_cuda_driver_t *d, CUdeviceptr va, size_t bytes)
{
    for (CUdeviceptr at = va, end = va + bytes; at < end;) {
        CUdeviceptr start = 0;
        size_t len = 0;
        if (d->address_range(&start, &len, at) != CUDA_SUCCESS || start + len <= at) {
            d->unmap(at, end - at); /* not expected: a last try at the rest */
            return;
        }
        d->unmap(at, start + len - at);
        at = start + len;
    }
}

/* Maps the region's pieces (imported by piece_import) one after another
 * over a range of addresses of ours; the caller lets the pieces go after,
 * as a mapping keeps its memory. The driver refuses a piece larger than
 * its allocation, or not a multiple of the granularity, so a worker's
 * wrong piece_bytes fails here, before any job. O(pieces) driver calls,
 * once per registration. */
static int vqkvd__cuda_open_vmm(vqkvd__cuda_t *g, int ordinal, const Vqkv__RegisterRegion *rr,
                                const uint64_t *pieces, size_t n_pieces, vqkvd_region_mem_t *mem,
                                char *why, size_t why_size)
{
    const vqkvd_cuda_driver_t *d = &g->driver;
    size_t size = rr->region_bytes, at = 0;
    CUdeviceptr va = 0;
    int rc = vqkvd__cuda_drv(d->reserve(&va, size, 0, 0, 0), "cuMemAddressReserve", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    for (size_t i = 0; i < n_pieces; i++) {
        size_t piece = rr->n_piece_bytes > 0 ? rr->piece_bytes[i] : size;
        if (d->map(va + at, piece, 0, pieces[i], 0) != CUDA_SUCCESS) {
            snprintf(why, why_size,
                     "cuMemMap of piece %zu (%zu bytes at offset %zu) failed: larger than its "
                     "allocation, or not a multiple of its granularity?",
                     i, piece, at);
            rc = VQKV_EMAP;
            break;
        }
        at += piece;
    }
    CUmemAccessDesc access = {.location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = ordinal},
                              .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    if (rc == VQKV_OK)
        rc = vqkvd__cuda_drv(d->set_access(va, size, &access, 1), "cuMemSetAccess", why, why_size);
    if (rc != VQKV_OK) {
        vqkvd__cuda_unmap_pieces(d, va, at);
        d->address_free(va, size);
        return rc;
    }
    mem->base = (uint8_t *)(uintptr_t)va;
    mem->bytes = size;
    mem->vmm = true;
    return VQKV_OK;
}

static int vqkvd__cuda_region_open(vqkvd_backend_t *be, const Vqkv__RegisterRegion *rr,
                                   const int *fds, size_t n_fds, const uint64_t *pieces,
                                   size_t n_pieces, vqkvd_region_mem_t *mem, char *why,
                                   size_t why_size)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    if (rr->kind == VQKV__REGION_KIND__REGION_KIND_MEMFD) {
        snprintf(why, why_size,
                 "this vqkvd serves GPU memory (--device cuda); register the "
                 "KV cache's CUDA memory, or run a cpu vqkvd for memfd regions");
        return VQKV_EDEVICE;
    }
    uint32_t k = 0;
    while (k < g->base.n_devices &&
           memcmp(rr->gpu_uuid.data, g->info[k].uuid, sizeof g->info[k].uuid))
        k++;
    if (k == g->base.n_devices) {
        char theirs[VQKVD_GPU_UUID_TEXT], ours[VQKVD_GPU_UUID_TEXT];
        vqkvd_gpu_uuid_format(rr->gpu_uuid.data, theirs);
        vqkvd_gpu_uuid_format(g->info[0].uuid, ours);
        snprintf(why, why_size, "%s is not one of this vqkvd's GPUs (it serves %s%s)", theirs, ours,
                 g->base.n_devices > 1 ? " and others: Welcome.devices lists them" : "");
        return VQKV_EDEVICE;
    }
    cudaSetDevice(g->gpus[k]->ordinal);
    mem->device = k;
    if (rr->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_IPC)
        return vqkvd__cuda_open_ipc(g, rr, mem, why, why_size);
    (void)fds, (void)n_fds; /* the pieces' fds were imported by the session */
    return vqkvd__cuda_open_vmm(g, g->gpus[k]->ordinal, rr, pieces, n_pieces, mem, why, why_size);
}

static void vqkvd__cuda_region_close(vqkvd_backend_t *be, vqkvd_region_mem_t *mem)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    cudaSetDevice(g->gpus[mem->device]->ordinal);
    if (mem->vmm) {
        CUdeviceptr va = (CUdeviceptr)(uintptr_t)mem->base;
        vqkvd__cuda_unmap_pieces(&g->driver, va, mem->bytes);
        g->driver.address_free(va, mem->bytes);
    } else {
        cudaIpcCloseMemHandle(mem->base);
    }
    mem->base = NULL;
}

/* ---- requests --------------------------------------------------------------------- */

/* A worker's interprocess event, opened in this process; NULL with the
 * reason in why. The worker owns the event; destroying this handle only
 * lets go of the daemon's reference. */
static cudaEvent_t vqkvd__cuda_event_open(const uint8_t *handle_bytes, char *why, size_t why_size)
{
    cudaIpcEventHandle_t handle;
    memcpy(&handle, handle_bytes, sizeof handle);
    cudaEvent_t ev = NULL;
    if (vqkvd__cuda_rt(cudaIpcOpenEventHandle(&ev, handle),
                       "the worker's event: cudaIpcOpenEventHandle", why, why_size) != VQKV_OK)
        return NULL;
    return ev;
}

/* A decode that replied before its blocks were written: the job, busy
 * until the stream has run, and the worker's event it recorded. */
typedef struct {
    vqkvd__cuda_gpu_t *gpu;
    vqkvd__cuda_job_entry_t *entry;
    cudaEvent_t event;
} vqkvd__cuda_pending_t;

/* Queues the launches for runs of blocks with one codec (and for encode,
 * only the blocks with somewhere to go), their slots and store offsets
 * gathered per run. */
static int vqkvd__cuda_launch(vqkvd__cuda_t *g, vqkvd__cuda_gpu_t *gpu, vqkvd__cuda_job_entry_t *e,
                              vqkvd_batch_t *b, bool encode, uint32_t *slots, uint64_t *at)
{
    int rc = VQKV_OK;
    for (uint32_t i = 0, end; rc == VQKV_OK && i < b->n; i = end) {
        const vqkv_codec_t *codec = encode ? b->codec : b->codecs[i];
        uint32_t n = 0;
        for (end = i; end < b->n && (encode || b->codecs[end] == codec); end++) {
            const uint8_t *slot = encode ? b->dst[end] : b->src[end];
            if (slot == NULL)
                continue;
            slots[n] = b->slots[end];
            at[n++] = (uint64_t)(slot - g->store.base);
        }
        vqkv_cuda_codec_t *dc = vqkvd__cuda_codec(g, gpu, codec);
        if (dc == NULL)
            rc = VQKV_EDEVICE;
        else if (n > 0)
            rc = encode ? vqkv_cuda_encode(e->job, dc, g->store.base, g->store.bytes, at, b->base,
                                           b->view, slots, n)
                        : vqkv_cuda_decode(e->job, dc, g->store.base, g->store.bytes, at, b->base,
                                           b->view, slots, n);
        if (rc != VQKV_OK)
            b->failed = i;
    }
    return rc;
}

/* One request on this thread's job: waits on the worker's event first
 * (encode), queues the launches, then either waits for them, or records
 * the worker's event and leaves them pending (decode with record_event). */
static int vqkvd__cuda_run(vqkvd__cuda_t *g, vqkvd_batch_t *b, bool encode)
{
    char why[sizeof b->why] = ""; /* the batch's message is all a reply carries */
    uint32_t *slots = malloc((size_t)b->n * sizeof *slots);
    uint64_t *at = malloc((size_t)b->n * sizeof *at);
    vqkvd__cuda_pending_t *pending = b->record_event != NULL ? calloc(1, sizeof *pending) : NULL;
    if (slots == NULL || at == NULL || (b->record_event != NULL && pending == NULL)) {
        free(slots);
        free(at);
        free(pending);
        return VQKV_ENOMEM;
    }
    vqkvd__cuda_gpu_t *gpu = g->gpus[b->device]; /* the region's, which region_open set */
    cudaSetDevice(gpu->ordinal);
    vqkvd__cuda_job_entry_t *e = vqkvd__cuda_job_take(g, gpu, why, sizeof why);
    int rc = e != NULL ? VQKV_OK : VQKV_EDEVICE;
    if (e == NULL)
        vqkvd_log(VQKVD_LOG_ERROR, "cuda: %s", why);
    const uint8_t *worker_event = encode ? b->wait_event : b->record_event;
    cudaEvent_t ev = rc == VQKV_OK && worker_event != NULL
                         ? vqkvd__cuda_event_open(worker_event, why, sizeof why)
                         : NULL;
    if (worker_event != NULL && ev == NULL)
        rc = VQKV_EDEVICE;
    if (rc == VQKV_OK && encode && ev != NULL)
        rc = vqkvd__cuda_rt(cudaStreamWaitEvent(e->stream, ev, 0), "cudaStreamWaitEvent", why,
                            sizeof why);
    if (rc == VQKV_OK)
        rc = vqkvd__cuda_launch(g, gpu, e, b, encode, slots, at);
    if (rc == VQKV_OK && pending != NULL) {
        rc = vqkvd__cuda_rt(cudaEventRecord(ev, e->stream), "cudaEventRecord", why, sizeof why);
        if (rc == VQKV_OK) {
            *pending = (vqkvd__cuda_pending_t){.gpu = gpu, .entry = e, .event = ev};
            b->pending = pending;
            /* finish's now */
            e = NULL;
            ev = NULL;
            pending = NULL;
        }
    } else if (rc == VQKV_OK) {
        rc = vqkv_cuda_job_sync(e->job);
    }
    if (rc != VQKV_OK) {
        /* The reply names the CUDA error; why, when set here, names the call. */
        snprintf(b->why, sizeof b->why, "%s",
                 why[0] != '\0'       ? why
                 : rc == VQKV_EDEVICE ? vqkv_cuda_last_error()
                                      : "");
        vqkvd_log(VQKVD_LOG_WARN, "cuda: %s of %u blocks: %s", encode ? "encode" : "decode",
                  (unsigned)b->n, b->why);
        vqkvd__cuda_check_context(encode ? "encode" : "decode");
    }
    if (e != NULL && e->job != NULL && rc != VQKV_OK)
        vqkv_cuda_job_sync(e->job); /* nothing of it may still run when given back */
    if (e != NULL)
        vqkvd__cuda_job_give(g, gpu, e);
    if (ev != NULL)
        cudaEventDestroy(ev);
    free(pending);
    free(slots);
    free(at);
    return rc;
}

static void vqkvd__cuda_finish(vqkvd_backend_t *be, void *pending)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    vqkvd__cuda_pending_t *p = pending;
    cudaSetDevice(p->gpu->ordinal);
    if (vqkv_cuda_job_sync(p->entry->job) != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_WARN, "cuda: a decode replied early failed: %s",
                  vqkv_cuda_last_error());
        vqkvd__cuda_check_context("decode");
    }
    cudaEventDestroy(p->event);
    vqkvd__cuda_job_give(g, p->gpu, p->entry);
    free(p);
}

static int vqkvd__cuda_encode(vqkvd_backend_t *be, vqkvd_batch_t *b)
{
    return vqkvd__cuda_run((vqkvd__cuda_t *)be, b, true);
}

static int vqkvd__cuda_decode(vqkvd_backend_t *be, vqkvd_batch_t *b)
{
    return vqkvd__cuda_run((vqkvd__cuda_t *)be, b, false);
}

static int vqkvd__cuda_block_copy(vqkvd__cuda_t *g, void *dst, const void *src, size_t bytes,
                                  enum cudaMemcpyKind kind)
{
    char why[96];
    cudaSetDevice(g->gpus[0]->ordinal); /* unified addressing: any GPU reaches the store */
    int rc = vqkvd__cuda_rt(cudaMemcpy(dst, src, bytes, kind), "cudaMemcpy", why, sizeof why);
    if (rc != VQKV_OK)
        vqkvd_log(VQKVD_LOG_WARN, "cuda: a stored block: %s", why);
    return rc;
}

static int vqkvd__cuda_block_read(vqkvd_backend_t *be, const uint8_t *slot, size_t bytes,
                                  void *host)
{
    return vqkvd__cuda_block_copy((vqkvd__cuda_t *)be, host, slot, bytes, cudaMemcpyDeviceToHost);
}

static int vqkvd__cuda_block_write(vqkvd_backend_t *be, uint8_t *slot, const void *host,
                                   size_t bytes)
{
    return vqkvd__cuda_block_copy((vqkvd__cuda_t *)be, slot, host, bytes, cudaMemcpyHostToDevice);
}

/* Uploads the final codebooks to every GPU now, on the loop, so that no
 * request pays for it; a failure keeps the model on its fp16 fallback. */
static int vqkvd__cuda_codebooks_ready(vqkvd_backend_t *be, const vqkv_codec_t *codec)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    for (uint32_t k = 0; k < g->base.n_devices; k++) {
        cudaSetDevice(g->gpus[k]->ordinal);
        if (vqkvd__cuda_codec(g, g->gpus[k], codec) == NULL) {
            vqkvd_log(VQKVD_LOG_ERROR, "cuda:%d: cannot upload codebooks: %s", g->gpus[k]->ordinal,
                      vqkv_cuda_last_error());
            return VQKV_EDEVICE;
        }
    }
    return VQKV_OK;
}

static const vqkv_assigner_t *vqkvd__cuda_assigner(vqkvd_backend_t *be)
{
    cudaSetDevice(((vqkvd__cuda_t *)be)->gpus[0]->ordinal); /* training runs on the first GPU */
    return vqkv_cuda_assigner();
}

/* Frees what gpu made: its idle jobs and codec copies. */
static void vqkvd__cuda_gpu_free(vqkvd__cuda_gpu_t *gpu)
{
    if (gpu == NULL)
        return;
    cudaSetDevice(gpu->ordinal);
    while (gpu->idle_jobs != NULL) {
        vqkvd__cuda_job_entry_t *e = gpu->idle_jobs;
        gpu->idle_jobs = e->next;
        vqkv_cuda_job_free(e->job);
        cudaStreamDestroy(e->stream);
        free(e);
    }
    for (uint32_t i = 0; i < gpu->n_codecs; i++)
        vqkv_cuda_codec_free(gpu->codecs[i].device);
    free(gpu);
}

static void vqkvd__cuda_destroy(vqkvd_backend_t *be)
{
    vqkvd__cuda_t *g = (vqkvd__cuda_t *)be;
    for (uint32_t k = 0; k < g->base.n_devices; k++)
        vqkvd__cuda_gpu_free(g->gpus[k]);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

static const vqkvd_backend_ops_t vqkvd__cuda_ops = {
    .name = "cuda",
    .region_open = vqkvd__cuda_region_open,
    .region_close = vqkvd__cuda_region_close,
    .piece_import = vqkvd__cuda_piece_import,
    .piece_release = vqkvd__cuda_piece_release,
    .encode = vqkvd__cuda_encode,
    .decode = vqkvd__cuda_decode,
    .block_read = vqkvd__cuda_block_read,
    .block_write = vqkvd__cuda_block_write,
    .whole_blocks = true,
    .events = true,
    .host_regions = false,
    .finish = vqkvd__cuda_finish,
    .codebooks_ready = vqkvd__cuda_codebooks_ready,
    .assigner = vqkvd__cuda_assigner,
    .destroy = vqkvd__cuda_destroy,
};

/* ---- creation ---------------------------------------------------------------------- */

/* GPU k's name and UUID; the pool share is filled once the store is open. */
static int vqkvd__cuda_device_info(vqkvd__cuda_t *g, uint32_t k, char *why, size_t why_size)
{
    struct cudaDeviceProp prop;
    int ordinal = g->gpus[k]->ordinal;
    int rc = vqkvd__cuda_rt(cudaSetDevice(ordinal), "cudaSetDevice", why, why_size);
    if (rc == VQKV_OK)
        rc = vqkvd__cuda_rt(cudaGetDeviceProperties(&prop, ordinal), "cudaGetDeviceProperties", why,
                            why_size);
    if (rc != VQKV_OK)
        return rc;
    snprintf(g->info[k].name, sizeof g->info[k].name, "%s", prop.name);
    memcpy(g->info[k].uuid, prop.uuid.bytes, sizeof g->info[k].uuid);
    return VQKV_OK;
}

/* Whether every pair of the GPUs can reach each other's memory, which
 * one store over all of them needs: VQKV_OK, or VQKV_EINVAL naming a pair
 * that cannot. O(GPUs^2) queries, once at start. */
static int vqkvd__cuda_peers_check(const vqkvd__cuda_t *g, char *why, size_t why_size)
{
    for (uint32_t a = 0; a < g->base.n_devices; a++)
        for (uint32_t b = 0; b < g->base.n_devices; b++) {
            int can = 0, from = g->gpus[a]->ordinal, to = g->gpus[b]->ordinal;
            if (a == b || (cudaDeviceCanAccessPeer(&can, from, to) == cudaSuccess && can))
                continue;
            snprintf(why, why_size,
                     "cuda:%d cannot reach the memory of cuda:%d (no peer access), and one "
                     "pool over several GPUs needs it: run one vqkvd per GPU instead",
                     from, to);
            return VQKV_EINVAL;
        }
    return VQKV_OK;
}

/* The GPUs' names and UUIDs, and the arena's store over all of them
 * (cuda_store.h). */
static int vqkvd__cuda_devices_open(vqkvd__cuda_t *g, const int *ordinals, uint64_t arena_bytes,
                                    char *why, size_t why_size)
{
    int rc = VQKV_OK;
    for (uint32_t k = 0; rc == VQKV_OK && k < g->base.n_devices; k++)
        rc = vqkvd__cuda_device_info(g, k, why, why_size);
    if (rc == VQKV_OK)
        rc = vqkvd__cuda_peers_check(g, why, why_size);
    if (rc == VQKV_OK)
        rc = vqkvd_cuda_driver_load(&g->driver, why, why_size);
    if (rc != VQKV_OK)
        return rc;
    cudaSetDevice(ordinals[0]);
    rc = vqkvd_cuda_store_open(&g->driver, ordinals, g->base.n_devices, arena_bytes,
                               VQKVD_CUDA_MAX_ALLOC, &g->store, why, why_size);
    if (rc == VQKV_ENOMEM)
        snprintf(why + strlen(why), why_size - strlen(why), " on %s", g->info[0].name);
    for (uint32_t k = 0; rc == VQKV_OK && k < g->base.n_devices; k++)
        g->info[k].pool_bytes = g->store.share_bytes;
    return rc;
}

int vqkvd_backend_cuda_create(const int *ordinals, uint32_t n, uint64_t arena_bytes,
                              uint64_t chunk_bytes, vqkvd_backend_t **be, vqkvd_arena_t *arena,
                              char *why, size_t why_size)
{
    *be = NULL;
    /* The list itself (distinct GPUs this machine has) the factory checked
     * (vqkvd__backend_gpus); n bounds the arrays below. */
    if (n == 0 || n > VQKVD_MAX_GPUS) {
        snprintf(why, why_size, "between 1 and %d GPUs (%u named)", VQKVD_MAX_GPUS, (unsigned)n);
        return VQKV_EINVAL;
    }
    int rc = VQKV_OK;
    if (chunk_bytes == 0 || arena_bytes < chunk_bytes) {
        snprintf(why, why_size, "a GPU pool of %llu bytes: at least one chunk (%llu bytes)",
                 (unsigned long long)arena_bytes, (unsigned long long)chunk_bytes);
        return VQKV_EINVAL;
    }
    vqkvd__cuda_t *g = calloc(1, sizeof *g);
    if (g == NULL) {
        snprintf(why, why_size, "out of memory");
        return VQKV_ENOMEM;
    }
    pthread_mutex_init(&g->lock, NULL);
    g->base.ops = &vqkvd__cuda_ops;
    g->base.devices = g->info;
    for (uint32_t k = 0; k < n && rc == VQKV_OK; k++) {
        g->gpus[k] = calloc(1, sizeof *g->gpus[k]);
        if (g->gpus[k] == NULL) {
            snprintf(why, why_size, "out of memory");
            rc = VQKV_ENOMEM;
            break;
        }
        g->gpus[k]->ordinal = ordinals[k];
        g->base.n_devices = k + 1;
    }
    if (rc == VQKV_OK)
        rc = vqkvd__cuda_devices_open(g, ordinals, arena_bytes, why, why_size);
    if (rc != VQKV_OK) {
        vqkvd__cuda_destroy(&g->base);
        return rc;
    }
    *arena = (vqkvd_arena_t){
        .ops = &vqkvd__cuda_arena_ops,
        .bytes = arena_bytes,
        .chunk_bytes = chunk_bytes,
        .max_chunks = (uint32_t)(arena_bytes / chunk_bytes),
        .fd = -1,
        .base = g->store.base,
        .owner = g,
    };
    for (uint32_t k = 0; k < n; k++) {
        char uuid[VQKVD_GPU_UUID_TEXT];
        vqkvd_gpu_uuid_format(g->info[k].uuid, uuid);
        vqkvd_log(VQKVD_LOG_INFO,
                  "cuda:%d: %s (%s), %llu MiB of the pool in its memory (%u piece%s)", ordinals[k],
                  g->info[k].name, uuid, (unsigned long long)(g->info[k].pool_bytes >> 20),
                  (unsigned)g->store.pieces_per_share, g->store.pieces_per_share == 1 ? "" : "s");
    }
    *be = &g->base;
    return VQKV_OK;
}
