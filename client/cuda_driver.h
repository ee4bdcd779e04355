/* cuda_driver.h -- what libvqkv asks the CUDA driver about a worker's GPU
 * memory before registering it with vqkvd: which allocation holds a device
 * pointer, on which GPU (by UUID), and how another process may open it (a
 * legacy IPC handle, or for VMM memory a POSIX fd exported from its
 * physical allocation).
 *
 * The driver (libcuda.so.1) is loaded with dlopen on first use, never
 * linked: libvqkv loads and works on machines without CUDA, and its CPU
 * users need neither the driver nor the toolkit. The few driver types and
 * constants used are declared in cuda_driver.c, and tests/test_cuda_abi.c
 * holds them to the toolkit's cuda.h wherever a toolkit is installed.
 * Private to libvqkv.
 */
#ifndef VQKV_CUDA_DRIVER_H
#define VQKV_CUDA_DRIVER_H

#include <stddef.h>
#include <stdint.h>

#define VQKV__CUDA_IPC_HANDLE_BYTES 64
#define VQKV__GPU_UUID_BYTES 16

/* The driver ABI libvqkv uses, as cuda.h declares it: tests/test_cuda_abi.c
 * holds each to the toolkit's own. */
typedef int vqkv__CUresult;
typedef unsigned long long vqkv__CUdeviceptr;
typedef unsigned long long vqkv__CUmemGenericAllocationHandle;
typedef struct {
    char reserved[VQKV__CUDA_IPC_HANDLE_BYTES];
} vqkv__CUipcMemHandle;
typedef struct {
    char bytes[VQKV__GPU_UUID_BYTES];
} vqkv__CUuuid;

enum {
    VQKV__CUDA_SUCCESS = 0,
    VQKV__CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
    VQKV__CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    VQKV__CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
    VQKV__CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11,
    VQKV__CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12,
    VQKV__CU_MEMORYTYPE_DEVICE = 2,
    VQKV__CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1,
};

typedef struct {
    int vmm;              /* 0: ipc_handle is set; 1: the pieces are */
    uint64_t alloc_bytes; /* the allocation that holds the memory; VMM: its pieces together */
    uint64_t offset;      /* where the memory starts inside it (VMM: in the first piece) */
    uint8_t gpu_uuid[VQKV__GPU_UUID_BYTES];
    uint8_t ipc_handle[VQKV__CUDA_IPC_HANDLE_BYTES];
    /* VMM: the physical allocations mapped one after another that hold the
     * memory, in address order, each's size and each exported as a POSIX
     * fd; malloc'd, the caller's (vqkv__cuda_mem_free). 0 and NULL for
     * legacy IPC memory. */
    size_t n_pieces;
    uint64_t *piece_bytes;
    int *fds;
} vqkv__cuda_mem_t;

/* Describes [devptr, devptr + bytes) of device memory into *out.
 * VQKV_OK; VQKV_EDEVICE when the driver cannot be loaded (why names the
 * library and dlopen's reason), devptr is not device memory, or a driver
 * call fails (why names the call and the CUDA error); VQKV_ERANGE when the
 * memory runs past the end of its allocation (legacy IPC) or past what is
 * mapped (VMM); VQKV_ELIMIT when it spans more than
 * VQKV_REGION_MAX_PIECES physical allocations; VQKV_ENOMEM. Nothing is
 * left open on failure. Thread-safe: the driver is loaded once
 * (pthread_once). Does not need a current CUDA context beyond what the
 * pointer queries need (the worker's own). */
int vqkv__cuda_describe(uint64_t devptr, uint64_t bytes, vqkv__cuda_mem_t *out, char *why,
                        size_t why_size);

/* Closes the fds and frees the arrays of a described memory; safe on one
 * whose arrays were taken (set to NULL). */
void vqkv__cuda_mem_free(vqkv__cuda_mem_t *mem);

#endif
