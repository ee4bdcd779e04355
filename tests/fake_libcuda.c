/* fake_libcuda.c -- a CUDA driver without a GPU, for the tests of
 * libvqkv's run-time door to the driver (client/cuda_driver.c): loaded in
 * place of libcuda.so.1 through VQKV_LIBCUDA, it answers the calls libvqkv
 * makes about one stretch of device addresses the test describes with
 * fake_cuda_setup. The stretch is either one legacy allocation (cudaMalloc:
 * IPC capable, RANGE_START and RANGE_SIZE name it) or VMM memory as
 * PyTorch's expandable segments make it: n pieces of piece_bytes mapped one
 * after another inside a larger reservation, which RANGE_START and
 * RANGE_SIZE name instead, and cuMemGetAddressRange names each piece. An
 * exported piece is a memfd, so the fds libvqkv makes are real and can be
 * counted and sent. Nothing is ever dereferenced.
 *
 * The names are the driver's symbols; the types are libvqkv's declarations
 * of them (cuda_driver.h), which tests/test_cuda_abi.c holds to cuda.h.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "cuda_driver.h"
#include "fake_libcuda.h"

enum {
    FAKE_INVALID_VALUE = 1, /* CUDA_ERROR_INVALID_VALUE */
    FAKE_OUT_OF_MEMORY = 2, /* CUDA_ERROR_OUT_OF_MEMORY */
};

static struct {
    fake_cuda_memory_t mem;
    int exports;  /* fds made so far */
    int retained; /* handles retained and not released */
} fake;

void fake_cuda_setup(const fake_cuda_memory_t *mem)
{
    fake.mem = *mem;
    fake.exports = 0;
    fake.retained = 0;
}

void fake_cuda_counts(int *exports, int *retained)
{
    *exports = fake.exports;
    *retained = fake.retained;
}

/* The piece holding ptr (0-based), or -1. */
static long fake_piece(vqkv__CUdeviceptr ptr)
{
    const fake_cuda_memory_t *m = &fake.mem;
    if (ptr < m->base || ptr - m->base >= m->piece_bytes * m->n_pieces)
        return -1;
    return (long)((ptr - m->base) / m->piece_bytes);
}

vqkv__CUresult cuInit(unsigned int flags)
{
    (void)flags;
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuGetErrorName(vqkv__CUresult err, const char **name)
{
    *name = err == FAKE_INVALID_VALUE   ? "CUDA_ERROR_INVALID_VALUE"
            : err == FAKE_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY"
                                        : NULL;
    return *name != NULL ? VQKV__CUDA_SUCCESS : FAKE_INVALID_VALUE;
}

vqkv__CUresult cuPointerGetAttribute(void *data, int attribute, vqkv__CUdeviceptr ptr)
{
    const fake_cuda_memory_t *m = &fake.mem;
    if (fake_piece(ptr) < 0)
        return FAKE_INVALID_VALUE;
    switch (attribute) {
    case VQKV__CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned int *)data = VQKV__CU_MEMORYTYPE_DEVICE;
        return VQKV__CUDA_SUCCESS;
    case VQKV__CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = 0; return VQKV__CUDA_SUCCESS;
    case VQKV__CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *(int *)data = m->legacy;
        return VQKV__CUDA_SUCCESS;
    case VQKV__CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        *(vqkv__CUdeviceptr *)data = m->legacy ? m->base : m->reserved;
        return VQKV__CUDA_SUCCESS;
    case VQKV__CU_POINTER_ATTRIBUTE_RANGE_SIZE:
        *(size_t *)data = m->legacy ? m->piece_bytes : m->reserved_bytes;
        return VQKV__CUDA_SUCCESS;
    default: return FAKE_INVALID_VALUE;
    }
}

vqkv__CUresult cuDeviceGet(int *device, int ordinal)
{
    *device = ordinal;
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuDeviceGetUuid_v2(vqkv__CUuuid *uuid, int device)
{
    (void)device;
    memcpy(uuid->bytes, FAKE_CUDA_UUID, sizeof uuid->bytes);
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuIpcGetMemHandle(vqkv__CUipcMemHandle *handle, vqkv__CUdeviceptr ptr)
{
    if (!fake.mem.legacy || ptr != fake.mem.base)
        return FAKE_INVALID_VALUE;
    memset(handle->reserved, 0xa5, sizeof handle->reserved);
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuMemRetainAllocationHandle(vqkv__CUmemGenericAllocationHandle *handle, void *addr)
{
    long piece = fake_piece((vqkv__CUdeviceptr)(uintptr_t)addr);
    if (fake.mem.legacy || piece < 0)
        return FAKE_INVALID_VALUE;
    *handle = (vqkv__CUmemGenericAllocationHandle)piece + 1;
    fake.retained++;
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuMemExportToShareableHandle(void *shareable,
                                            vqkv__CUmemGenericAllocationHandle handle, int type,
                                            unsigned long long flags)
{
    (void)handle;
    if (type != VQKV__CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || flags != 0)
        return FAKE_INVALID_VALUE;
    if (fake.exports == fake.mem.fail_export_at)
        return FAKE_OUT_OF_MEMORY;
    int fd = memfd_create("fake-vmm-piece", MFD_CLOEXEC);
    if (fd < 0)
        return FAKE_OUT_OF_MEMORY;
    *(int *)shareable = fd;
    fake.exports++;
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuMemRelease(vqkv__CUmemGenericAllocationHandle handle)
{
    (void)handle;
    fake.retained--;
    return VQKV__CUDA_SUCCESS;
}

vqkv__CUresult cuMemGetAddressRange_v2(vqkv__CUdeviceptr *base, size_t *size, vqkv__CUdeviceptr ptr)
{
    long piece = fake_piece(ptr);
    if (piece < 0)
        return FAKE_INVALID_VALUE;
    const fake_cuda_memory_t *m = &fake.mem;
    *base = m->base + (uint64_t)piece * m->piece_bytes;
    *size = m->piece_bytes;
    return VQKV__CUDA_SUCCESS;
}
