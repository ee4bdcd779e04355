/* cuda_driver.c -- the CUDA driver, reached at run time (cuda_driver.h).
 *
 * The driver API rather than the runtime's: a worker's runtime may be any
 * version (PyTorch ships its own), while the driver is the one installed
 * with the GPU and answers for every allocator, cudaMalloc, PyTorch's
 * caching allocator and the VMM API alike. Each name below is the symbol
 * cuda.h maps the API to (cuDeviceGetUuid is cuDeviceGetUuid_v2 since
 * CUDA 11.4); the library is opened once per process and never closed,
 * as the driver itself is never unloaded.
 *
 * Which way to share: the pointer's IS_LEGACY_CUDA_IPC_CAPABLE attribute
 * says whether cuIpcGetMemHandle can export its allocation (cudaMalloc,
 * the caching allocator's segments). Otherwise the memory is VMM
 * (PyTorch's expandable segments): a reserved range of addresses with
 * physical allocations mapped into it one after another, 20 MiB each in
 * PyTorch's large pool, so a KV cache spans hundreds. For VMM the
 * pointer's RANGE_START and RANGE_SIZE attributes name the reservation,
 * not an allocation; cuMemGetAddressRange names the mapping that holds an
 * address, which is what the walk below steps by. Each piece is retained,
 * exported as a POSIX fd and released, the fd keeping it alive.
 */
#include "cuda_driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vqkv_codec.h"
#include "vqkv_errors.h"
#include "vqkv_limits.h"

/* The default library, and the variable that names another (a container
 * whose driver lives elsewhere; the tests' stub). */
#define VQKV__LIBCUDA "libcuda.so.1"
#define VQKV__LIBCUDA_ENV "VQKV_LIBCUDA"

typedef struct {
    vqkv__CUresult (*init)(unsigned int flags);
    vqkv__CUresult (*get_error_name)(vqkv__CUresult err, const char **name);
    vqkv__CUresult (*pointer_get_attribute)(void *data, int attribute, vqkv__CUdeviceptr ptr);
    vqkv__CUresult (*device_get)(int *device, int ordinal);
    vqkv__CUresult (*device_get_uuid)(vqkv__CUuuid *uuid, int device);
    vqkv__CUresult (*ipc_get_mem_handle)(vqkv__CUipcMemHandle *handle, vqkv__CUdeviceptr ptr);
    vqkv__CUresult (*mem_retain_allocation_handle)(vqkv__CUmemGenericAllocationHandle *handle,
                                                   void *addr);
    vqkv__CUresult (*mem_export_to_shareable_handle)(void *shareable,
                                                     vqkv__CUmemGenericAllocationHandle handle,
                                                     int type, unsigned long long flags);
    vqkv__CUresult (*mem_release)(vqkv__CUmemGenericAllocationHandle handle);
    vqkv__CUresult (*mem_get_address_range)(vqkv__CUdeviceptr *base, size_t *size,
                                            vqkv__CUdeviceptr ptr);
} vqkv__cuda_api_t;

static struct {
    pthread_once_t once;
    int rc;        /* VQKV_OK once loaded and initialised */
    char why[256]; /* else what failed */
    vqkv__cuda_api_t api;
} vqkv__cuda = {.once = PTHREAD_ONCE_INIT};

/* "CUDA_ERROR_INVALID_VALUE", or the number when the driver cannot name it
 * (a stub library, which fails every call). */
static const char *vqkv__cuda_error_name(vqkv__CUresult err, char *buf, size_t size)
{
    const char *name = NULL;
    if (vqkv__cuda.api.get_error_name != NULL &&
        vqkv__cuda.api.get_error_name(err, &name) == VQKV__CUDA_SUCCESS && name != NULL)
        return name;
    snprintf(buf, size, "CUDA error %d", err);
    return buf;
}

static void vqkv__cuda_load(void)
{
    const char *path = getenv(VQKV__LIBCUDA_ENV);
    if (path == NULL || path[0] == '\0')
        path = VQKV__LIBCUDA;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        snprintf(vqkv__cuda.why, sizeof vqkv__cuda.why,
                 "the CUDA driver is not available (%s); CUDA regions need a GPU node", dlerror());
        vqkv__cuda.rc = VQKV_EDEVICE;
        return;
    }
    static const struct {
        const char *symbol;
        size_t offset;
    } symbols[] = {
        {"cuInit", offsetof(vqkv__cuda_api_t, init)},
        {"cuGetErrorName", offsetof(vqkv__cuda_api_t, get_error_name)},
        {"cuPointerGetAttribute", offsetof(vqkv__cuda_api_t, pointer_get_attribute)},
        {"cuDeviceGet", offsetof(vqkv__cuda_api_t, device_get)},
        {"cuDeviceGetUuid_v2", offsetof(vqkv__cuda_api_t, device_get_uuid)},
        {"cuIpcGetMemHandle", offsetof(vqkv__cuda_api_t, ipc_get_mem_handle)},
        {"cuMemRetainAllocationHandle", offsetof(vqkv__cuda_api_t, mem_retain_allocation_handle)},
        {"cuMemExportToShareableHandle",
         offsetof(vqkv__cuda_api_t, mem_export_to_shareable_handle)},
        {"cuMemRelease", offsetof(vqkv__cuda_api_t, mem_release)},
        {"cuMemGetAddressRange_v2", offsetof(vqkv__cuda_api_t, mem_get_address_range)},
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        void *fn = dlsym(lib, symbols[i].symbol);
        if (fn == NULL) {
            snprintf(vqkv__cuda.why, sizeof vqkv__cuda.why,
                     "%s has no %s: a CUDA driver older than 11.4", path, symbols[i].symbol);
            vqkv__cuda.rc = VQKV_EDEVICE;
            return; /* the library stays loaded: harmless, and others may use it */
        }
        memcpy((char *)&vqkv__cuda.api + symbols[i].offset, &fn, sizeof fn);
    }
    vqkv__CUresult err = vqkv__cuda.api.init(0);
    if (err != VQKV__CUDA_SUCCESS) {
        char buf[32];
        snprintf(vqkv__cuda.why, sizeof vqkv__cuda.why, "cuInit: %s",
                 vqkv__cuda_error_name(err, buf, sizeof buf));
        vqkv__cuda.rc = VQKV_EDEVICE;
        return;
    }
    vqkv__cuda.rc = VQKV_OK;
}

/* VQKV_OK, or VQKV_EDEVICE with why naming call and error. */
static int vqkv__cuda_check(vqkv__CUresult err, const char *call, char *why, size_t why_size)
{
    if (err == VQKV__CUDA_SUCCESS)
        return VQKV_OK;
    char buf[32];
    snprintf(why, why_size, "%s: %s", call, vqkv__cuda_error_name(err, buf, sizeof buf));
    return VQKV_EDEVICE;
}

static int vqkv__cuda_fail(char *why, size_t why_size, int rc, const char *what)
{
    snprintf(why, why_size, "%s", what);
    return rc;
}

/* Exports the VMM allocation mapped at ptr as a POSIX fd into *fd. */
static int vqkv__cuda_export_vmm(vqkv__CUdeviceptr ptr, int *fd, char *why, size_t why_size)
{
    const vqkv__cuda_api_t *api = &vqkv__cuda.api;
    vqkv__CUmemGenericAllocationHandle handle;
    int rc = vqkv__cuda_check(api->mem_retain_allocation_handle(&handle, (void *)(uintptr_t)ptr),
                              "cuMemRetainAllocationHandle", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    rc = vqkv__cuda_check(api->mem_export_to_shareable_handle(
                              fd, handle, VQKV__CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                          "cuMemExportToShareableHandle (allocate with a POSIX fd handle type)",
                          why, why_size);
    api->mem_release(handle); /* the fd, when made, holds the allocation */
    return rc;
}

void vqkv__cuda_mem_free(vqkv__cuda_mem_t *mem)
{
    for (size_t i = 0; mem->fds != NULL && i < mem->n_pieces; i++)
        if (mem->fds[i] >= 0)
            close(mem->fds[i]);
    free(mem->fds);
    free(mem->piece_bytes);
    mem->fds = NULL;
    mem->piece_bytes = NULL;
    mem->n_pieces = 0;
}

/* The pieces of VMM memory [ptr, ptr + bytes) into out: first their
 * sizes, stepping from mapping to mapping (O(pieces) driver calls), so
 * that a range too long or with a hole fails before any fd is made; then
 * an fd each. */
static int vqkv__cuda_vmm_pieces(vqkv__CUdeviceptr ptr, uint64_t bytes, vqkv__cuda_mem_t *out,
                                 char *why, size_t why_size)
{
    const vqkv__cuda_api_t *api = &vqkv__cuda.api;
    vqkv__CUdeviceptr first = 0, at = ptr, end = ptr + bytes;
    size_t cap = 0;
    while (at < end) {
        vqkv__CUdeviceptr base = 0;
        size_t size = 0;
        vqkv__CUresult err = api->mem_get_address_range(&base, &size, at);
        if (err != VQKV__CUDA_SUCCESS || base > at || size <= at - base) {
            char buf[32];
            snprintf(why, why_size,
                     "0x%llx, %llu bytes into the memory, is not mapped (cuMemGetAddressRange: "
                     "%s): the memory runs past what is mapped",
                     (unsigned long long)at, (unsigned long long)(at - ptr),
                     err != VQKV__CUDA_SUCCESS ? vqkv__cuda_error_name(err, buf, sizeof buf)
                                               : "a range that does not hold it");
            return VQKV_ERANGE;
        }
        if (out->n_pieces == VQKV_REGION_MAX_PIECES) {
            snprintf(why, why_size, "%llu bytes at 0x%llx span more than %d physical allocations",
                     (unsigned long long)bytes, (unsigned long long)ptr, VQKV_REGION_MAX_PIECES);
            return VQKV_ELIMIT;
        }
        if (out->n_pieces == cap) { /* doubling: O(pieces) copies */
            cap = cap ? 2 * cap : 16;
            uint64_t *grown = realloc(out->piece_bytes, cap * sizeof *grown);
            if (grown == NULL)
                return vqkv__cuda_fail(why, why_size, VQKV_ENOMEM, "out of memory");
            out->piece_bytes = grown;
        }
        if (out->n_pieces == 0)
            first = base;
        out->piece_bytes[out->n_pieces++] = size;
        out->alloc_bytes += size;
        at = base + size;
    }
    out->offset = ptr - first;
    out->fds = malloc(out->n_pieces * sizeof *out->fds);
    if (out->fds == NULL)
        return vqkv__cuda_fail(why, why_size, VQKV_ENOMEM, "out of memory");
    for (size_t i = 0; i < out->n_pieces; i++)
        out->fds[i] = -1;
    at = first;
    for (size_t i = 0; i < out->n_pieces; i++) {
        int rc = vqkv__cuda_export_vmm(at, &out->fds[i], why, why_size);
        if (rc != VQKV_OK)
            return rc;
        at += out->piece_bytes[i];
    }
    return VQKV_OK;
}

/* The legacy IPC allocation holding [ptr, ptr + bytes) into out. */
static int vqkv__cuda_ipc_allocation(vqkv__CUdeviceptr ptr, uint64_t bytes, vqkv__cuda_mem_t *out,
                                     char *why, size_t why_size)
{
    const vqkv__cuda_api_t *api = &vqkv__cuda.api;
    vqkv__CUdeviceptr start = 0;
    size_t range = 0;
    int rc = vqkv__cuda_check(
        api->pointer_get_attribute(&start, VQKV__CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptr),
        "cuPointerGetAttribute(RANGE_START_ADDR)", why, why_size);
    if (rc == VQKV_OK)
        rc = vqkv__cuda_check(
            api->pointer_get_attribute(&range, VQKV__CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptr),
            "cuPointerGetAttribute(RANGE_SIZE)", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    out->offset = ptr - start;
    out->alloc_bytes = range;
    if (out->offset > range || bytes > range - out->offset) {
        snprintf(why, why_size,
                 "%llu bytes at 0x%llx run past the end of their allocation (%zu bytes at 0x%llx)",
                 (unsigned long long)bytes, (unsigned long long)ptr, range,
                 (unsigned long long)start);
        return VQKV_ERANGE;
    }
    vqkv__CUipcMemHandle handle;
    rc = vqkv__cuda_check(api->ipc_get_mem_handle(&handle, start), "cuIpcGetMemHandle", why,
                          why_size);
    memcpy(out->ipc_handle, handle.reserved, sizeof out->ipc_handle);
    return rc;
}

int vqkv__cuda_describe(uint64_t devptr, uint64_t bytes, vqkv__cuda_mem_t *out, char *why,
                        size_t why_size)
{
    if (devptr == 0 || bytes == 0 || bytes > UINT64_MAX - devptr || out == NULL)
        return VQKV_EINVAL;
    pthread_once(&vqkv__cuda.once, vqkv__cuda_load);
    if (vqkv__cuda.rc != VQKV_OK) {
        snprintf(why, why_size, "%s", vqkv__cuda.why);
        return vqkv__cuda.rc;
    }
    const vqkv__cuda_api_t *api = &vqkv__cuda.api;
    vqkv__CUdeviceptr ptr = devptr;
    unsigned int memory_type = 0;
    int ordinal = -1, device = -1, legacy_ipc = 0;
    vqkv__CUuuid uuid;
    memset(out, 0, sizeof *out);
    /* Memory CUDA never saw (plain host memory) fails the query itself. */
    vqkv__CUresult err =
        api->pointer_get_attribute(&memory_type, VQKV__CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr);
    if (err != VQKV__CUDA_SUCCESS || memory_type != VQKV__CU_MEMORYTYPE_DEVICE) {
        char buf[32];
        snprintf(why, why_size, "0x%llx is not device memory (%s)", (unsigned long long)ptr,
                 err != VQKV__CUDA_SUCCESS ? vqkv__cuda_error_name(err, buf, sizeof buf)
                                           : "host or managed memory");
        return VQKV_EDEVICE;
    }
    int rc = vqkv__cuda_check(
        api->pointer_get_attribute(&ordinal, VQKV__CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr),
        "cuPointerGetAttribute(DEVICE_ORDINAL)", why, why_size);
    if (rc == VQKV_OK)
        rc = vqkv__cuda_check(
            api->pointer_get_attribute(&legacy_ipc,
                                       VQKV__CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr),
            "cuPointerGetAttribute(IS_LEGACY_CUDA_IPC_CAPABLE)", why, why_size);
    if (rc == VQKV_OK)
        rc = vqkv__cuda_check(api->device_get(&device, ordinal), "cuDeviceGet", why, why_size);
    if (rc == VQKV_OK)
        rc =
            vqkv__cuda_check(api->device_get_uuid(&uuid, device), "cuDeviceGetUuid", why, why_size);
    if (rc != VQKV_OK)
        return rc;
    memcpy(out->gpu_uuid, uuid.bytes, sizeof out->gpu_uuid);
    out->vmm = !legacy_ipc;
    rc = legacy_ipc ? vqkv__cuda_ipc_allocation(ptr, bytes, out, why, why_size)
                    : vqkv__cuda_vmm_pieces(ptr, bytes, out, why, why_size);
    if (rc != VQKV_OK)
        vqkv__cuda_mem_free(out);
    return rc;
}
