/* cuda_vmm.h -- VMM device memory for the GPU tests, allocated the way
 * PyTorch's expandable segments do (cuMemCreate with a POSIX fd handle type,
 * mapped at a reserved address, readable and writable by the device). The
 * driver is reached with dlopen, as libvqkv reaches it, so the tests link
 * the CUDA runtime only and still start, and skip, without a driver.
 * Needs a current context (any runtime call makes the primary one).
 */
#ifndef VQKV_TEST_CUDA_VMM_H
#define VQKV_TEST_CUDA_VMM_H

#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

#include <cuda.h>

#define VMM_MAX_PIECES 16

/* n_pieces physical allocations of piece_bytes mapped one after another
 * from va, one piece into a reservation with room for two more: as an
 * expandable segment, whose reservation is larger than what is mapped and
 * whose start is not the tensor's. */
typedef struct {
    CUmemGenericAllocationHandle handles[VMM_MAX_PIECES];
    size_t n_pieces, piece_bytes; /* each rounded up to the allocation granularity */
    CUdeviceptr reserved;
    size_t reserved_bytes;
    CUdeviceptr va; /* the first piece */
    size_t bytes;   /* mapped: n_pieces * piece_bytes */
} vmm_mem_t;

/* A driver function, or NULL. */
static inline void *vmm_driver_fn(const char *name)
{
    static void *lib;
    if (lib == NULL)
        lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    return lib != NULL ? dlsym(lib, name) : NULL;
}

#define VMM_CALL(type, name, ...)                                                                  \
    (vmm_driver_fn(#name) != NULL ? ((type)vmm_driver_fn(#name))(__VA_ARGS__)                      \
                                  : CUDA_ERROR_NOT_FOUND)

/* n_pieces (1 .. VMM_MAX_PIECES) pieces of at least piece_bytes of VMM
 * memory on the current device: CUDA_SUCCESS or the first failing call's
 * error. */
static inline CUresult vmm_alloc(size_t piece_bytes, size_t n_pieces, vmm_mem_t *m)
{
    typedef CUresult (*ctx_get_device_fn)(CUdevice *);
    typedef CUresult (*granularity_fn)(size_t *, const CUmemAllocationProp *,
                                       CUmemAllocationGranularity_flags);
    typedef CUresult (*create_fn)(CUmemGenericAllocationHandle *, size_t,
                                  const CUmemAllocationProp *, unsigned long long);
    typedef CUresult (*reserve_fn)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    typedef CUresult (*map_fn)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                               unsigned long long);
    typedef CUresult (*set_access_fn)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    memset(m, 0, sizeof *m);
    if (n_pieces == 0 || n_pieces > VMM_MAX_PIECES)
        return CUDA_ERROR_INVALID_VALUE;
    CUdevice dev;
    CUresult rc = VMM_CALL(ctx_get_device_fn, cuCtxGetDevice, &dev);
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t gran = 0;
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(granularity_fn, cuMemGetAllocationGranularity, &gran, &prop,
                      CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    m->piece_bytes = gran != 0 ? (piece_bytes + gran - 1) / gran * gran : piece_bytes;
    m->bytes = n_pieces * m->piece_bytes;
    m->reserved_bytes = m->bytes + 2 * m->piece_bytes;
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(reserve_fn, cuMemAddressReserve, &m->reserved, m->reserved_bytes, 0, 0, 0);
    m->va = m->reserved + m->piece_bytes;
    for (; rc == CUDA_SUCCESS && m->n_pieces < n_pieces; m->n_pieces++) {
        rc = VMM_CALL(create_fn, cuMemCreate, &m->handles[m->n_pieces], m->piece_bytes, &prop, 0);
        if (rc != CUDA_SUCCESS)
            break;
        rc = VMM_CALL(map_fn, cuMemMap, m->va + m->n_pieces * m->piece_bytes, m->piece_bytes, 0,
                      m->handles[m->n_pieces], 0);
    }
    CUmemAccessDesc access = {.location = prop.location,
                              .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(set_access_fn, cuMemSetAccess, m->va, m->bytes, &access, 1);
    return rc;
}

static inline void vmm_free(vmm_mem_t *m)
{
    typedef CUresult (*range_fn)(CUdeviceptr, size_t);
    typedef CUresult (*release_fn)(CUmemGenericAllocationHandle);
    for (size_t i = 0; i < m->n_pieces; i++) {
        VMM_CALL(range_fn, cuMemUnmap, m->va + i * m->piece_bytes, m->piece_bytes);
        VMM_CALL(release_fn, cuMemRelease, m->handles[i]);
    }
    VMM_CALL(range_fn, cuMemAddressFree, m->reserved, m->reserved_bytes);
}

#endif
