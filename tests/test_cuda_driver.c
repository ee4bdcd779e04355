/* test_cuda_driver.c -- libvqkv's run-time door to the CUDA driver
 * (client/cuda_driver.c), compiled in. The driver is loaded once per
 * process, so each ctest entry runs one mode, named by argv[1]:
 *
 *   missing     VQKV_LIBCUDA names no file: VQKV_EDEVICE, "not available"
 *   nosymbols   VQKV_LIBCUDA names a library without the driver API
 *   stub        VQKV_LIBCUDA names the toolkit's stub libcuda.so, which
 *               exports every symbol and fails every call: each name
 *               libvqkv looks up exists, and cuInit's failure is reported
 *   gpu         the real driver (label gpu; 77, skipped, without a GPU):
 *               cudaMalloc memory is described as a legacy IPC allocation
 *               with the right offset, size and UUID, VMM memory exported
 *               as an fd, host memory and a range past the allocation are
 *               refused
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "cuda_driver.h"
#include "vqkv_codec.h"

#ifdef VQKV_TEST_GPU
#include <cuda_runtime.h>

#include "cuda_vmm.h"
#endif

static const char *mode;

/* The call on host memory, expected to fail with code, why containing says. */
static void expect_refused(int code, const char *says)
{
    static uint8_t host[4096];
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    assert_int_equal(
        vqkv__cuda_describe((uint64_t)(uintptr_t)host, sizeof host, &mem, why, sizeof why), code);
    if (strstr(why, says) == NULL)
        fail_msg("\"%s\" does not say \"%s\"", why, says);
    /* A second call gives the same answer: the load is not retried. */
    char again[256] = "";
    assert_int_equal(
        vqkv__cuda_describe((uint64_t)(uintptr_t)host, sizeof host, &mem, again, sizeof again),
        code);
    assert_string_equal(why, again);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    vqkv__cuda_mem_t mem;
    char why[64];
    assert_int_equal(vqkv__cuda_describe(0, 16, &mem, why, sizeof why), VQKV_EINVAL);
    assert_int_equal(vqkv__cuda_describe(4096, 0, &mem, why, sizeof why), VQKV_EINVAL);
    assert_int_equal(vqkv__cuda_describe(4096, 16, NULL, why, sizeof why), VQKV_EINVAL);
}

#ifdef VQKV_TEST_GPU
/* The GPU's UUID as the runtime sees it, to compare with the driver's answer. */
static void runtime_uuid(uint8_t out[VQKV__GPU_UUID_BYTES])
{
    int dev;
    struct cudaDeviceProp prop;
    assert_int_equal(cudaGetDevice(&dev), cudaSuccess);
    assert_int_equal(cudaGetDeviceProperties(&prop, dev), cudaSuccess);
    memcpy(out, prop.uuid.bytes, VQKV__GPU_UUID_BYTES);
}

static void check_legacy(void)
{
    const size_t bytes = 8u << 20;
    void *p = NULL;
    assert_int_equal(cudaMalloc(&p, bytes), cudaSuccess);
    uint8_t uuid[VQKV__GPU_UUID_BYTES];
    runtime_uuid(uuid);
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    uint64_t at = (uint64_t)(uintptr_t)p + 4096; /* a tensor inside the allocation */
    int rc = vqkv__cuda_describe(at, bytes - 4096, &mem, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("cudaMalloc memory: %s", why);
    assert_int_equal(mem.vmm, 0);
    assert_int_equal(mem.fd, -1);
    assert_int_equal(mem.offset, 4096);
    assert_true(mem.alloc_bytes >= bytes);
    assert_memory_equal(mem.gpu_uuid, uuid, sizeof uuid);
    /* The handle is the allocation's: the runtime's own for p agrees. */
    cudaIpcMemHandle_t handle;
    assert_int_equal(cudaIpcGetMemHandle(&handle, p), cudaSuccess);
    assert_memory_equal(mem.ipc_handle, &handle, sizeof mem.ipc_handle);
    assert_int_equal(vqkv__cuda_describe(at, mem.alloc_bytes - 4096 + 1, &mem, why, sizeof why),
                     VQKV_ERANGE);
    assert_int_equal(cudaFree(p), cudaSuccess);
}

static void check_vmm(void)
{
    vmm_mem_t vm;
    CUresult err = vmm_alloc(4u << 21, &vm);
    if (err != CUDA_SUCCESS)
        fail_msg("VMM allocation: CUDA driver error %d", (int)err);
    size_t quarter = vm.bytes / 4;
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    int rc = vqkv__cuda_describe(vm.va + quarter, quarter, &mem, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("VMM memory: %s", why);
    assert_int_equal(mem.vmm, 1);
    assert_true(mem.fd >= 0);
    assert_int_equal(mem.offset, quarter);
    assert_int_equal(mem.alloc_bytes, vm.bytes);
    close(mem.fd);
    vmm_free(&vm);
}
#endif

static void test_mode(void **state)
{
    (void)state;
    if (strcmp(mode, "missing") == 0) {
        expect_refused(VQKV_EDEVICE, "the CUDA driver is not available");
    } else if (strcmp(mode, "nosymbols") == 0) {
        expect_refused(VQKV_EDEVICE, "has no cuInit");
    } else if (strcmp(mode, "stub") == 0) {
        expect_refused(VQKV_EDEVICE, "cuInit: CUDA error 34"); /* CUDA_ERROR_STUB_LIBRARY */
    } else if (strcmp(mode, "gpu") == 0) {
#ifdef VQKV_TEST_GPU
        expect_refused(VQKV_EDEVICE, "is not device memory");
        check_legacy();
        check_vmm();
#endif
    } else {
        fail_msg("unknown mode %s", mode);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s missing|nosymbols|stub|gpu\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    if (strcmp(mode, "gpu") == 0) {
#ifdef VQKV_TEST_GPU
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
            fprintf(stderr, "SKIPPED: no CUDA device\n");
            return 77;
        }
        cudaFree(NULL); /* the primary context, current on this thread */
#else
        fprintf(stderr, "SKIPPED: built without CUDA\n");
        return 77;
#endif
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_mode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
