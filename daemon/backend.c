/* backend.c -- the backend factory (backend.h): the configured device
 * names the backend, and the backend supplies the pool's arena; and the
 * checks every backend's regions pass first. A vqkvd built without CUDA
 * refuses "cuda:N" with a message that says so, and "auto" is the CPU.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "config.h"
#include "frame.h"
#include "log.h"

/* Bytes of a cudaIpcMemHandle_t and of a CUDA device UUID. */
#define VQKVD__CUDA_IPC_HANDLE_BYTES 64
#define VQKVD__GPU_UUID_BYTES 16

static int vqkvd__payload_fail(char *why, size_t why_size, int rc, const char *what)
{
    snprintf(why, why_size, "%s", what);
    return rc;
}

/* The pieces of a CUDA_VMM_FD region: piece_bytes, or one of region_bytes
 * when it is empty. */
static int vqkvd__pieces_check(const Vqkv__RegisterRegion *rr, size_t n_fds, size_t n_held,
                               char *why, size_t why_size)
{
    size_t n_pieces = rr->n_piece_bytes > 0 ? rr->n_piece_bytes : 1;
    if (rr->n_piece_bytes > VQKV_REGION_MAX_PIECES) {
        snprintf(why, why_size, "piece_bytes has %zu entries; a region spans at most %d",
                 rr->n_piece_bytes, VQKV_REGION_MAX_PIECES);
        return VQKV_EINVAL;
    }
    if (n_fds == 0 || n_held + n_fds != n_pieces) { /* the frame holds at most 4 */
        snprintf(why, why_size,
                 "a CUDA_VMM_FD region comes with one fd a piece: it has %zu, %zu were held "
                 "from RegionPieces and %zu came with this frame (1 to %d)",
                 n_pieces, n_held, n_fds, VQKV_FRAME_MAX_FDS);
        return VQKV_EFDS;
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < rr->n_piece_bytes; i++) {
        if (rr->piece_bytes[i] == 0 || rr->piece_bytes[i] > UINT64_MAX - sum) {
            snprintf(why, why_size,
                     "piece %zu of %llu bytes: pieces are not empty and add up "
                     "to region_bytes",
                     i, (unsigned long long)rr->piece_bytes[i]);
            return VQKV_EINVAL;
        }
        sum += rr->piece_bytes[i];
    }
    if (rr->n_piece_bytes > 0 && sum != rr->region_bytes) {
        snprintf(why, why_size, "the pieces add up to %llu bytes, region_bytes says %llu",
                 (unsigned long long)sum, (unsigned long long)rr->region_bytes);
        return VQKV_EINVAL;
    }
    return VQKV_OK;
}

int vqkvd_region_payload_check(const Vqkv__RegisterRegion *rr, size_t n_fds, size_t n_held,
                               char *why, size_t why_size)
{
    bool memfd = rr->kind == VQKV__REGION_KIND__REGION_KIND_MEMFD;
    bool ipc = rr->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_IPC;
    bool vmm = rr->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD;
    if (!memfd && !ipc && !vmm)
        return vqkvd__payload_fail(why, why_size, VQKV_EINVAL,
                                   "kind must be MEMFD, CUDA_IPC or CUDA_VMM_FD");
    if (rr->num_fds != n_fds) {
        snprintf(why, why_size, "num_fds says %u, %zu came with the frame", (unsigned)rr->num_fds,
                 n_fds);
        return VQKV_EFDS;
    }
    size_t want_fds = ipc ? 0 : 1;
    if (!vmm && (n_fds != want_fds || n_held > 0)) {
        snprintf(why, why_size, "a %s region comes with exactly %zu fd (%zu came%s)",
                 memfd ? "MEMFD" : "CUDA_IPC", want_fds, n_fds,
                 n_held > 0 ? ", and RegionPieces were sent before it" : "");
        return VQKV_EFDS;
    }
    if (!vmm && rr->n_piece_bytes > 0)
        return vqkvd__payload_fail(why, why_size, VQKV_EINVAL,
                                   "piece_bytes belongs to CUDA_VMM_FD regions only");
    int rc = vmm ? vqkvd__pieces_check(rr, n_fds, n_held, why, why_size) : VQKV_OK;
    if (rc != VQKV_OK)
        return rc;
    if (rr->device != 0)
        return vqkvd__payload_fail(why, why_size, VQKV_EINVAL,
                                   "device must be 0; a GPU is named by gpu_uuid");
    if (ipc != (rr->cuda_ipc_handle.len > 0) ||
        (ipc && rr->cuda_ipc_handle.len != VQKVD__CUDA_IPC_HANDLE_BYTES))
        return vqkvd__payload_fail(why, why_size, VQKV_EINVAL,
                                   ipc ? "cuda_ipc_handle must be the 64 bytes of a "
                                         "cudaIpcMemHandle_t"
                                       : "cuda_ipc_handle belongs to CUDA_IPC regions only");
    if (memfd == (rr->gpu_uuid.len > 0) || (!memfd && rr->gpu_uuid.len != VQKVD__GPU_UUID_BYTES))
        return vqkvd__payload_fail(why, why_size, VQKV_EINVAL,
                                   memfd ? "gpu_uuid belongs to CUDA regions only"
                                         : "gpu_uuid must be the 16 bytes of a CUDA device UUID");
    return VQKV_OK;
}

void vqkvd_gpu_uuid_format(const uint8_t uuid[16], char out[VQKVD_GPU_UUID_TEXT])
{
    static const char hex[] = "0123456789abcdef";
    char *o = out + sprintf(out, "GPU");
    for (int i = 0; i < VQKVD__GPU_UUID_BYTES; i++) {
        if (i == 0 || i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[uuid[i] >> 4];
        *o++ = hex[uuid[i] & 15];
    }
    *o = '\0';
}

#ifdef VQKVD_CUDA
#define VQKVD__HAVE_CUDA 1
#else
#define VQKVD__HAVE_CUDA 0
/* Never called: the factory only names the CUDA backend when it is built. */
int vqkvd_backend_cuda_create(const int *ordinals, uint32_t n, uint64_t arena_bytes,
                              uint64_t chunk_bytes, vqkvd_backend_t **be, vqkvd_arena_t *arena,
                              char *why, size_t why_size)
{
    (void)ordinals, (void)n, (void)arena_bytes, (void)chunk_bytes, (void)be, (void)arena;
    snprintf(why, why_size, "this vqkvd has no CUDA backend");
    return VQKV_EINVAL;
}

int vqkvd_backend_cuda_count(void)
{
    return 0;
}
#endif

/* The GPUs device names (none for cpu and auto) into ordinals, checked
 * against this vqkvd and this machine; the GPUs are counted only when
 * device names some. */
static int vqkvd__backend_gpus(const char *device, int ordinals[VQKVD_MAX_GPUS], uint32_t *n,
                               char *why, size_t why_size)
{
    *n = 0;
    if (device != NULL && vqkvd_config_parse_gpus(device, ordinals, n) != 0) {
        snprintf(why, why_size, "device %s: not cpu, auto or cuda:N[,cuda:M...]", device);
        return VQKV_EINVAL;
    }
    if (*n == 0)
        return VQKV_OK;
    if (!VQKVD__HAVE_CUDA) {
        snprintf(why, why_size, "device %s: this vqkvd has no CUDA backend; use --device cpu",
                 device);
        return VQKV_EINVAL;
    }
    return vqkvd_config_check_gpus(device, ordinals, *n, vqkvd_backend_cuda_count(), why, why_size);
}

int vqkvd_backend_check(const char *device, char *why, size_t why_size)
{
    int ordinals[VQKVD_MAX_GPUS];
    uint32_t n;
    return vqkvd__backend_gpus(device, ordinals, &n, why, why_size);
}

static int vqkvd__backend_create_cpu(uint64_t arena_bytes, uint64_t chunk_bytes,
                                     vqkvd_backend_t **be, vqkvd_arena_t *arena, char *why,
                                     size_t why_size)
{
    int rc = vqkvd_arena_init_cpu(arena, arena_bytes, chunk_bytes);
    if (rc != VQKV_OK) {
        snprintf(why, why_size, "cannot make a pool of %llu bytes: %s%s",
                 (unsigned long long)arena_bytes, vqkv_strerror(rc),
                 rc == VQKV_ENOMEM ? " (lower pool_bytes, or raise the memory limit)" : "");
        return rc;
    }
    rc = vqkvd_backend_cpu_create(be);
    if (rc != VQKV_OK) {
        arena->ops->free_all(arena);
        snprintf(why, why_size, "cannot make the cpu backend: %s", vqkv_strerror(rc));
    }
    return rc;
}

/* "auto" is every GPU this process sees (at most VQKVD_MAX_GPUS), else
 * the CPU. */
int vqkvd_backend_create(const char *device, uint64_t arena_bytes, uint64_t chunk_bytes,
                         vqkvd_backend_t **be, vqkvd_arena_t *arena, char *why, size_t why_size)
{
    *be = NULL;
    int ordinals[VQKVD_MAX_GPUS];
    uint32_t n;
    int rc = vqkvd__backend_gpus(device, ordinals, &n, why, why_size);
    if (rc != VQKV_OK)
        return rc;
    if (device != NULL && strcmp(device, "auto") == 0) {
        int gpus = vqkvd_backend_cuda_count();
        for (; n < VQKVD_MAX_GPUS && (int)n < gpus; n++)
            ordinals[n] = (int)n;
        if (gpus > VQKVD_MAX_GPUS)
            vqkvd_log(VQKVD_LOG_WARN, "device auto: %d GPUs seen; serving the first %d", gpus,
                      VQKVD_MAX_GPUS);
        if (!VQKVD__HAVE_CUDA || gpus == 0)
            vqkvd_log(VQKVD_LOG_INFO, "device auto: %s",
                      !VQKVD__HAVE_CUDA ? "no CUDA backend is built in; using the CPU"
                                        : "no CUDA device; using the CPU");
        else
            vqkvd_log(VQKVD_LOG_INFO, "device auto: using %u GPU%s", (unsigned)n,
                      n == 1 ? "" : "s");
    }
    if (n > 0)
        return vqkvd_backend_cuda_create(ordinals, n, arena_bytes, chunk_bytes, be, arena, why,
                                         why_size);
    return vqkvd__backend_create_cpu(arena_bytes, chunk_bytes, be, arena, why, why_size);
}
