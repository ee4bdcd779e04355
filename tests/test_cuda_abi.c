/* test_cuda_abi.c -- the CUDA driver types and constants libvqkv declares
 * for itself (client/cuda_driver.h, so that CPU users need no toolkit),
 * held to the toolkit's cuda.h. Everything is checked when it compiles;
 * running it only says so. Built where a CUDA toolkit is installed.
 */
#include <stdio.h>

#include <cuda.h>

#include "cuda_driver.h"

/* Each of ours equals cuda.h's; the casts only let two enums compare. */
#define SAME(ours, theirs) _Static_assert((long long)(ours) == (long long)(theirs), #theirs)

SAME(sizeof(vqkv__CUresult), sizeof(CUresult));
SAME(sizeof(vqkv__CUdeviceptr), sizeof(CUdeviceptr));
SAME(sizeof(vqkv__CUmemGenericAllocationHandle), sizeof(CUmemGenericAllocationHandle));
SAME(sizeof(vqkv__CUipcMemHandle), sizeof(CUipcMemHandle));
SAME(VQKV__CUDA_IPC_HANDLE_BYTES, CU_IPC_HANDLE_SIZE);
SAME(sizeof(vqkv__CUuuid), sizeof(CUuuid));
SAME(VQKV__CUDA_SUCCESS, CUDA_SUCCESS);
SAME(VQKV__CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_MEMORY_TYPE);
SAME(VQKV__CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL);
SAME(VQKV__CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
     CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE);
SAME(VQKV__CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR);
SAME(VQKV__CU_POINTER_ATTRIBUTE_RANGE_SIZE, CU_POINTER_ATTRIBUTE_RANGE_SIZE);
SAME(VQKV__CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_DEVICE);
SAME(VQKV__CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);

int main(void)
{
    printf("libvqkv's CUDA driver declarations match cuda.h %d\n", CUDA_VERSION);
    return 0;
}
