/* cuda_store.c -- the driver's virtual-memory calls (cuda_store.h): the table
 * vqkvd reaches them through, and the pool's store as one address range
 * over pieces. Built only with CUDA (VQKVD_CUDA).
 *
 * Why pieces in one range rather than one cudaMalloc: a single allocation
 * is capped (VQKVD_CUDA_MAX_ALLOC), and a pool of several allocations at
 * unrelated addresses would need a base per allocation in every kernel
 * launch. Reserving the range first and mapping each piece at its offset
 * keeps the kernels' one base and 64-bit offsets. Access is granted once
 * for the whole range, which the driver allows across mappings.
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

/* Bytes of piece i: the last one takes what is left. */
static uint64_t vqkvd__cuda_piece_bytes(const vqkvd_cuda_store_t *s, uint32_t i)
{
    uint64_t at = (uint64_t)i * s->piece_bytes;
    return s->bytes - at < s->piece_bytes ? s->bytes - at : s->piece_bytes;
}

int vqkvd_cuda_store_open(const vqkvd_cuda_driver_t *d, int ordinal, uint64_t bytes,
                          uint64_t max_piece, vqkvd_cuda_store_t *s, char *why, size_t why_size)
{
    memset(s, 0, sizeof *s);
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = ordinal}};
    size_t granularity = 0;
    int rc = vqkvd__cuda_store_call(
        d->granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
        "cuMemGetAllocationGranularity", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    uint32_t n = 0;
    if (vqkvd_cuda_store_plan(bytes, granularity, max_piece, &s->piece_bytes, &n, &s->bytes) !=
            VQKV_OK ||
        n > VQKVD_CUDA_STORE_MAX_PIECES) {
        snprintf(why, why_size,
                 "a GPU pool of %llu bytes in pieces of at most %llu: between one "
                 "granule (%zu bytes) and %u pieces",
                 (unsigned long long)bytes, (unsigned long long)max_piece, granularity,
                 VQKVD_CUDA_STORE_MAX_PIECES);
        return VQKV_EINVAL;
    }
    CUdeviceptr va = 0;
    rc = vqkvd__cuda_store_call(d->reserve(&va, s->bytes, granularity, 0, 0), "cuMemAddressReserve",
                                why, why_size);
    if (rc != VQKV_OK)
        return rc;
    s->base = (uint8_t *)(uintptr_t)va;
    for (uint32_t i = 0; rc == VQKV_OK && i < n; i++) {
        uint64_t piece = vqkvd__cuda_piece_bytes(s, i);
        CUmemGenericAllocationHandle h = 0;
        rc = vqkvd__cuda_store_call(d->create(&h, piece, &prop, 0), "cuMemCreate", why, why_size);
        if (rc != VQKV_OK)
            break;
        rc = vqkvd__cuda_store_call(d->map(va + (uint64_t)i * s->piece_bytes, piece, 0, h, 0),
                                    "cuMemMap", why, why_size);
        if (rc != VQKV_OK) {
            d->release(h);
            break;
        }
        s->pieces[s->n_pieces++] = h;
    }
    if (rc == VQKV_OK) {
        CUmemAccessDesc access = {.location = prop.location,
                                  .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        rc = vqkvd__cuda_store_call(d->set_access(va, s->bytes, &access, 1), "cuMemSetAccess", why,
                                    why_size);
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
        d->unmap(va + (uint64_t)i * s->piece_bytes, vqkvd__cuda_piece_bytes(s, i));
        d->release(s->pieces[i]);
    }
    d->address_free(va, s->bytes);
    s->base = NULL;
    s->n_pieces = 0;
}
