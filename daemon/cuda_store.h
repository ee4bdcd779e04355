/* cuda_store.h -- the CUDA driver's virtual-memory calls vqkvd makes, and
 * the pool's device store built with them.
 *
 * The store is one range of device addresses over as many physical
 * allocations as its size needs, none over max_piece bytes (the backend
 * passes VQKVD_CUDA_MAX_ALLOC): a kernel addresses the whole pool as one
 * base plus a 64-bit offset, whatever the number of pieces, and a pool
 * larger than the largest allocation a driver grants stays possible. The
 * driver is reached through the runtime's entry points, so vqkvd links no
 * libcuda. Workers' VMM regions are imported with the same table
 * (backend_cuda.c).
 */
#ifndef VQKVD_CUDA_STORE_H
#define VQKVD_CUDA_STORE_H

#include <stddef.h>
#include <stdint.h>

#include <cuda.h>

typedef struct {
    CUresult (*create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*granularity)(size_t *, const CUmemAllocationProp *,
                            CUmemAllocationGranularity_flags);
    CUresult (*import)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*unmap)(CUdeviceptr, size_t);
    CUresult (*address_free)(CUdeviceptr, size_t);
    CUresult (*release)(CUmemGenericAllocationHandle);
    CUresult (*address_range)(CUdeviceptr *, size_t *, CUdeviceptr);
} vqkvd_cuda_driver_t;

/* Fills d from the runtime's driver entry points. VQKV_OK, or VQKV_EDEVICE
 * with why naming the missing function. */
int vqkvd_cuda_driver_load(vqkvd_cuda_driver_t *d, char *why, size_t why_size);

/* How a store of bytes splits: into pieces of piece_bytes (a multiple of
 * granularity, at most max_piece), the last one shorter, all of them
 * covering bytes rounded up to granularity. VQKV_OK, or VQKV_EINVAL for a
 * zero size or granularity, or a max_piece under one granularity. Pure:
 * the unit tests hold it on machines without a GPU. */
int vqkvd_cuda_store_plan(uint64_t bytes, uint64_t granularity, uint64_t max_piece,
                          uint64_t *piece_bytes, uint32_t *n_pieces, uint64_t *total_bytes);

/* The most pieces a store takes: 64 GiB pieces up to 4 TiB of pool. */
#define VQKVD_CUDA_STORE_MAX_PIECES 64

typedef struct {
    uint8_t *base;  /* the device address of byte 0 */
    uint64_t bytes; /* the range, rounded up to the granularity */
    uint64_t piece_bytes;
    uint32_t n_pieces; /* mapped so far (all of them once open) */
    CUmemGenericAllocationHandle pieces[VQKVD_CUDA_STORE_MAX_PIECES];
} vqkvd_cuda_store_t;

/* The store of at least bytes on GPU ordinal (which the calling thread
 * has made current), in pieces of at most max_piece bytes, readable and
 * writable by that GPU. VQKV_OK; VQKV_ENOMEM when the GPU has not the
 * memory; VQKV_EINVAL for sizes the plan refuses or more than
 * VQKVD_CUDA_STORE_MAX_PIECES pieces; VQKV_EDEVICE for any other driver
 * error. why says which call failed; on failure nothing stays allocated. */
int vqkvd_cuda_store_open(const vqkvd_cuda_driver_t *d, int ordinal, uint64_t bytes,
                          uint64_t max_piece, vqkvd_cuda_store_t *s, char *why, size_t why_size);

/* Unmaps and frees every piece and the address range. Safe on a store that
 * failed to open and twice. */
void vqkvd_cuda_store_close(const vqkvd_cuda_driver_t *d, vqkvd_cuda_store_t *s);

#endif
