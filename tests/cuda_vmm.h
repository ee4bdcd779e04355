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

#include <cuda.h>

typedef struct {
    CUmemGenericAllocationHandle handle;
    CUdeviceptr va;
    size_t bytes; /* rounded up to the allocation granularity */
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

/* At least bytes of VMM memory on the current device: CUDA_SUCCESS or the
 * first failing call's error. */
static inline CUresult vmm_alloc(size_t bytes, vmm_mem_t *m)
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
    m->bytes = gran != 0 ? (bytes + gran - 1) / gran * gran : bytes;
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(create_fn, cuMemCreate, &m->handle, m->bytes, &prop, 0);
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(reserve_fn, cuMemAddressReserve, &m->va, m->bytes, 0, 0, 0);
    if (rc == CUDA_SUCCESS)
        rc = VMM_CALL(map_fn, cuMemMap, m->va, m->bytes, 0, m->handle, 0);
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
    VMM_CALL(range_fn, cuMemUnmap, m->va, m->bytes);
    VMM_CALL(range_fn, cuMemAddressFree, m->va, m->bytes);
    VMM_CALL(release_fn, cuMemRelease, m->handle);
}

#endif
