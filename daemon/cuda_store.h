/* cuda_store.h -- the CUDA driver's virtual-memory calls vqkvd makes, and
 * the pool's device store built with them.
 *
 * The store is one range of device addresses over as many physical
 * allocations as its size needs, none over max_piece bytes (the backend
 * passes VQKVD_CUDA_MAX_ALLOC), on one GPU or shared evenly by several: a
 * kernel addresses the whole pool as one base plus a 64-bit offset,
 * whatever the number of pieces and whichever GPU holds them, and a pool
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
    uint8_t *base;        /* the device address of byte 0 */
    uint64_t bytes;       /* the range: share_bytes times the GPUs */
    uint64_t share_bytes; /* each device's part, rounded up to the granularity */
    uint64_t piece_bytes; /* a share's pieces; its last one may be shorter */
    uint32_t pieces_per_share;
    uint32_t n_pieces; /* mapped so far (all of every share's once open) */
    CUmemGenericAllocationHandle pieces[VQKVD_CUDA_STORE_MAX_PIECES];
} vqkvd_cuda_store_t;

/* Lays out a store of at least bytes over n_devices GPUs: every device
 * holds one share of bytes / n_devices (rounded up to granularity), the
 * shares one after another in device order, each in pieces planned by
 * vqkvd_cuda_store_plan. Fills s's sizes and nothing else. VQKV_OK, or
 * VQKV_EINVAL for what the plan refuses, no devices, or more than
 * VQKVD_CUDA_STORE_MAX_PIECES pieces. Pure, like the plan. */
int vqkvd_cuda_store_layout(uint64_t bytes, uint64_t granularity, uint64_t max_piece,
                            uint32_t n_devices, vqkvd_cuda_store_t *s);

/* Where piece i of a laid-out store sits: its offset from base, its size,
 * and which device (the index into the store's ordinals) holds it. Pure. */
void vqkvd_cuda_store_piece(const vqkvd_cuda_store_t *s, uint32_t i, uint64_t *offset,
                            uint64_t *bytes, uint32_t *device);

/* The store of at least bytes over the n_devices GPUs ordinals names, in
 * pieces of at most max_piece bytes, readable and writable by every one of
 * them: a kernel on any of them addresses the whole pool (which needs the
 * GPUs to reach each other's memory: peer access). VQKV_OK; VQKV_ENOMEM
 * when a GPU has not the memory; VQKV_EINVAL for sizes the layout refuses;
 * VQKV_EDEVICE for any other driver error (cuMemSetAccess's, when the GPUs
 * lack peer access). why says which call failed; on failure nothing stays
 * allocated. */
int vqkvd_cuda_store_open(const vqkvd_cuda_driver_t *d, const int *ordinals, uint32_t n_devices,
                          uint64_t bytes, uint64_t max_piece, vqkvd_cuda_store_t *s, char *why,
                          size_t why_size);

/* Unmaps and frees every piece and the address range. Safe on a store that
 * failed to open and twice. */
void vqkvd_cuda_store_close(const vqkvd_cuda_driver_t *d, vqkvd_cuda_store_t *s);

#endif
