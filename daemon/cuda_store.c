/* cuda_store.c -- the driver's virtual-memory calls (cuda_store.h): the table
 * vqkvd reaches them through, and the pool's store as one address range
 * over pieces. Built only with CUDA (VQKVD_CUDA).
 *
 * Why pieces in one range rather than one cudaMalloc: a single allocation
 * is capped (VQKVD_CUDA_MAX_ALLOC), and a pool of several allocations at
 * unrelated addresses would need a base per allocation in every kernel
 * launch. Reserving the range first and mapping each piece at its offset
 * keeps the kernels' one base and 64-bit offsets. Access is granted once
 * for the whole range, which the driver allows across mappings. Several
 * GPUs share the range the same way, each holding an equal share: a
 * kernel on any of them reaches every block through peer access, at the
 * cost of NVLink or PCIe bandwidth for a block another GPU holds, rather
 * than a per-device pool the session would have to place blocks in.
 */
#include <stdio.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "cuda_store.h"
#include "vqkv_proto.h"

/* The driver API version the entry points are asked for. */
#define VQKVD__CUDA_DRIVER_API 12000

int vqkvd_cuda_driver_load(vqkvd_cuda_driver_t *d, char *why, size_t why_size)
{
    static const struct {
        const char *symbol;
        size_t offset;
    } symbols[] = {
        {"cuMemCreate", offsetof(vqkvd_cuda_driver_t, create)},
        {"cuMemGetAllocationGranularity", offsetof(vqkvd_cuda_driver_t, granularity)},
        {"cuMemImportFromShareableHandle", offsetof(vqkvd_cuda_driver_t, import)},
        {"cuMemAddressReserve", offsetof(vqkvd_cuda_driver_t, reserve)},
        {"cuMemMap", offsetof(vqkvd_cuda_driver_t, map)},
        {"cuMemSetAccess", offsetof(vqkvd_cuda_driver_t, set_access)},
        {"cuMemUnmap", offsetof(vqkvd_cuda_driver_t, unmap)},
        {"cuMemAddressFree", offsetof(vqkvd_cuda_driver_t, address_free)},
        {"cuMemRelease", offsetof(vqkvd_cuda_driver_t, release)},
        {"cuMemGetAddressRange", offsetof(vqkvd_cuda_driver_t, address_range)},
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        void *fn = NULL;
        enum cudaDriverEntryPointQueryResult found;
        cudaError_t err = cudaGetDriverEntryPointByVersion(
            symbols[i].symbol, &fn, VQKVD__CUDA_DRIVER_API, cudaEnableDefault, &found);
        if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == NULL) {
            snprintf(why, why_size, "the CUDA driver has no %s", symbols[i].symbol);
            return VQKV_EDEVICE;
        }
        memcpy((char *)d + symbols[i].offset, &fn, sizeof fn);
    }
    return VQKV_OK;
}

int vqkvd_cuda_store_plan(uint64_t bytes, uint64_t granularity, uint64_t max_piece,
                          uint64_t *piece_bytes, uint32_t *n_pieces, uint64_t *total_bytes)
{
    if (bytes == 0 || granularity == 0 || max_piece < granularity ||
        bytes > UINT64_MAX - granularity)
        return VQKV_EINVAL;
    uint64_t total = (bytes + granularity - 1) / granularity * granularity;
    uint64_t piece = max_piece / granularity * granularity;
    piece = piece < total ? piece : total;
    uint64_t n = (total + piece - 1) / piece;
    if (n > UINT32_MAX)
        return VQKV_EINVAL;
    *piece_bytes = piece;
    *n_pieces = (uint32_t)n;
    *total_bytes = total;
    return VQKV_OK;
}

/* VQKV_OK, or the code for err (out of memory, or any other) with why
 * naming the call. */
static int vqkvd__cuda_store_call(CUresult err, const char *call, char *why, size_t why_size)
{
    if (err == CUDA_SUCCESS)
        return VQKV_OK;
    snprintf(why, why_size, "%s: CUDA driver error %d%s", call, (int)err,
             err == CUDA_ERROR_OUT_OF_MEMORY ? " (out of memory: lower pool_bytes)" : "");
    return err == CUDA_ERROR_OUT_OF_MEMORY ? VQKV_ENOMEM : VQKV_EDEVICE;
}

int vqkvd_cuda_store_layout(uint64_t bytes, uint64_t granularity, uint64_t max_piece,
                            uint32_t n_devices, vqkvd_cuda_store_t *s)
{
    uint64_t share = 0, piece = 0;
    uint32_t per_share = 0;
    if (n_devices == 0 ||
        vqkvd_cuda_store_plan(bytes / n_devices + (bytes % n_devices != 0), granularity, max_piece,
                              &piece, &per_share, &share) != VQKV_OK ||
        per_share > VQKVD_CUDA_STORE_MAX_PIECES / n_devices)
        return VQKV_EINVAL;
    s->share_bytes = share;
    s->piece_bytes = piece;
    s->pieces_per_share = per_share;
    s->bytes = share * n_devices;
    return VQKV_OK;
}

void vqkvd_cuda_store_piece(const vqkvd_cuda_store_t *s, uint32_t i, uint64_t *offset,
                            uint64_t *bytes, uint32_t *device)
{
    uint32_t in_share = i % s->pieces_per_share;
    uint64_t at = (uint64_t)in_share * s->piece_bytes;
    *device = i / s->pieces_per_share;
    *offset = (uint64_t)*device * s->share_bytes + at;
    /* the share's last piece takes what is left of it */
    *bytes = s->share_bytes - at < s->piece_bytes ? s->share_bytes - at : s->piece_bytes;
}

static CUmemAllocationProp vqkvd__cuda_store_prop(int ordinal)
{
    return (CUmemAllocationProp){.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                 .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = ordinal}};
}

/* Creates piece i on its device and maps it at its offset. */
static int vqkvd__cuda_store_map_piece(const vqkvd_cuda_driver_t *d, const int *ordinals,
                                       vqkvd_cuda_store_t *s, uint32_t i, char *why,
                                       size_t why_size)
{
    uint64_t offset, bytes;
    uint32_t device;
    vqkvd_cuda_store_piece(s, i, &offset, &bytes, &device);
    CUmemAllocationProp prop = vqkvd__cuda_store_prop(ordinals[device]);
    CUmemGenericAllocationHandle h = 0;
    int rc = vqkvd__cuda_store_call(d->create(&h, bytes, &prop, 0), "cuMemCreate", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    rc = vqkvd__cuda_store_call(d->map((CUdeviceptr)(uintptr_t)s->base + offset, bytes, 0, h, 0),
                                "cuMemMap", why, why_size);
    if (rc != VQKV_OK) {
        d->release(h);
        return rc;
    }
    s->pieces[s->n_pieces++] = h;
    return VQKV_OK;
}

int vqkvd_cuda_store_open(const vqkvd_cuda_driver_t *d, const int *ordinals, uint32_t n_devices,
                          uint64_t bytes, uint64_t max_piece, vqkvd_cuda_store_t *s, char *why,
                          size_t why_size)
{
    memset(s, 0, sizeof *s);
    /* The largest granularity of the GPUs (powers of two: a multiple of
     * the others), so that every share starts on a boundary each accepts. */
    size_t granularity = 0;
    for (uint32_t k = 0; k < n_devices; k++) {
        CUmemAllocationProp prop = vqkvd__cuda_store_prop(ordinals[k]);
        size_t g = 0;
        int rc =
            vqkvd__cuda_store_call(d->granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                                   "cuMemGetAllocationGranularity", why, why_size);
        if (rc != VQKV_OK)
            return rc;
        granularity = g > granularity ? g : granularity;
    }
    if (vqkvd_cuda_store_layout(bytes, granularity, max_piece, n_devices, s) != VQKV_OK) {
        snprintf(why, why_size,
                 "a GPU pool of %llu bytes over %u GPU%s in pieces of at most %llu: between "
                 "one granule (%zu bytes) a GPU and %u pieces",
                 (unsigned long long)bytes, (unsigned)n_devices, n_devices == 1 ? "" : "s",
                 (unsigned long long)max_piece, granularity, VQKVD_CUDA_STORE_MAX_PIECES);
        memset(s, 0, sizeof *s);
        return VQKV_EINVAL;
    }
    CUdeviceptr va = 0;
    int rc = vqkvd__cuda_store_call(d->reserve(&va, s->bytes, granularity, 0, 0),
                                    "cuMemAddressReserve", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    s->base = (uint8_t *)(uintptr_t)va;
    uint32_t n = n_devices * s->pieces_per_share;
    for (uint32_t i = 0; rc == VQKV_OK && i < n; i++)
        rc = vqkvd__cuda_store_map_piece(d, ordinals, s, i, why, why_size);
    if (rc == VQKV_OK) {
        /* Every GPU may read and write the whole range: one descriptor
         * each (the layout held n_devices to the piece limit). */
        CUmemAccessDesc access[VQKVD_CUDA_STORE_MAX_PIECES];
        for (uint32_t k = 0; k < n_devices; k++)
            access[k] = (CUmemAccessDesc){.location = vqkvd__cuda_store_prop(ordinals[k]).location,
                                          .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        rc = vqkvd__cuda_store_call(d->set_access(va, s->bytes, access, n_devices),
                                    n_devices == 1 ? "cuMemSetAccess"
                                                   : "cuMemSetAccess (do the GPUs have peer "
                                                     "access to each other?)",
                                    why, why_size);
    }
    if (rc != VQKV_OK)
        vqkvd_cuda_store_close(d, s);
    return rc;
}

void vqkvd_cuda_store_close(const vqkvd_cuda_driver_t *d, vqkvd_cuda_store_t *s)
{
    if (s->base == NULL)
        return;
    CUdeviceptr va = (CUdeviceptr)(uintptr_t)s->base;
    for (uint32_t i = 0; i < s->n_pieces; i++) {
        uint64_t offset, bytes;
        uint32_t device;
        vqkvd_cuda_store_piece(s, i, &offset, &bytes, &device);
        d->unmap(va + offset, bytes);
        d->release(s->pieces[i]);
    }
    d->address_free(va, s->bytes);
    s->base = NULL;
    s->n_pieces = 0;
}
