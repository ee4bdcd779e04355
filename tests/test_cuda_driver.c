/* test_cuda_driver.c -- libvqkv's run-time door to the CUDA driver
 * (client/cuda_driver.c), compiled in. The driver is loaded once per
 * process, so each ctest entry runs one mode, named by argv[1]:
 *
 *   missing     VQKV_LIBCUDA names no file: VQKV_EDEVICE, "not available"
 *   nosymbols   VQKV_LIBCUDA names a library without the driver API
 *   stub        VQKV_LIBCUDA names the toolkit's stub libcuda.so, which
 *               exports every symbol and fails every call: each name
 *               libvqkv looks up exists, and cuInit's failure is reported
 *   fake        VQKV_LIBCUDA names fake_libcuda.so (fake_libcuda.c), a
 *               driver without a GPU: VMM memory over many pieces inside a
 *               larger reservation is walked piece by piece (sizes, the
 *               offset in the first, an fd each), memory past what is
 *               mapped and more pieces than a region may span are refused
 *               before any fd is made, a failed export leaves no fd open
 *               and no handle retained; a legacy allocation is described
 *               from its RANGE_START and RANGE_SIZE
 *   gpu         the real driver (label gpu; 77, skipped, without a GPU):
 *               cudaMalloc memory is described as a legacy IPC allocation
 *               with the right offset, size and UUID, VMM memory over
 *               three pieces exported as three fds, host memory and a
 *               range past the allocation are refused
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
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
#include "fake_libcuda.h"
#include "test_util.h"
#include "vqkv_codec.h"
#include "vqkv_errors.h"
#include "vqkv_limits.h"

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
    assert_int_equal(mem.n_pieces, 0);
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

/* Three pieces mapped inside a larger reservation, as PyTorch's
 * expandable segments map them: a tensor from a quarter into the first to
 * the middle of the third spans all three. */
static void check_vmm(void)
{
    vmm_mem_t vm;
    CUresult err = vmm_alloc(1, 3, &vm);
    if (err != CUDA_SUCCESS)
        fail_msg("VMM allocation: CUDA driver error %d", (int)err);
    size_t piece = vm.piece_bytes;
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    int rc = vqkv__cuda_describe(vm.va + piece / 4, 2 * piece, &mem, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("VMM memory: %s", why);
    assert_int_equal(mem.vmm, 1);
    assert_int_equal(mem.n_pieces, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(mem.piece_bytes[i], piece);
        assert_true(fcntl(mem.fds[i], F_GETFD) >= 0);
    }
    assert_int_equal(mem.offset, piece / 4);
    assert_int_equal(mem.alloc_bytes, 3 * piece);
    vqkv__cuda_mem_free(&mem);
    assert_int_equal(vqkv__cuda_describe(vm.va + piece / 4, 3 * piece, &mem, why, sizeof why),
                     VQKV_ERANGE);
    vmm_free(&vm);
}
#endif

/* ---- the fake driver -------------------------------------------------------- */

static fake_cuda_setup_fn fake_setup;
static fake_cuda_counts_fn fake_counts;

static void fake_open(void)
{
    if (!fake_cuda_open(&fake_setup, &fake_counts))
        fail_msg("the fake driver: %s", dlerror());
}

#define FAKE_PIECE (2ull << 20)
#define FAKE_BASE 0x7f0000200000ull

static void fake_vmm(uint64_t n, int fail_export_at)
{
    fake_cuda_memory_t m = fake_cuda_vmm(FAKE_BASE, FAKE_PIECE, n, fail_export_at);
    fake_setup(&m);
}

/* describe's answer, its message holding says, and no fd left open or
 * handle retained by the failure. */
static void fake_refused(uint64_t devptr, uint64_t bytes, int code, const char *says, int exports)
{
    int before = count_open_fds(), made, retained;
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    assert_int_equal(vqkv__cuda_describe(devptr, bytes, &mem, why, sizeof why), code);
    if (strstr(why, says) == NULL)
        fail_msg("\"%s\" does not say \"%s\"", why, says);
    fake_counts(&made, &retained);
    assert_int_equal(made, exports);
    assert_int_equal(retained, 0);
    assert_int_equal(count_open_fds(), before);
}

static void check_fake(void)
{
    fake_open();
    /* Nine pieces: a tensor 4 KiB into the first, to 4 KiB into the ninth. */
    fake_vmm(9, -1);
    int before = count_open_fds(), made, retained;
    vqkv__cuda_mem_t mem;
    char why[256] = "";
    uint64_t at = FAKE_BASE + 4096;
    int rc = vqkv__cuda_describe(at, 8 * FAKE_PIECE, &mem, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("fake VMM memory: %s", why);
    assert_int_equal(mem.vmm, 1);
    assert_int_equal(mem.n_pieces, 9);
    assert_int_equal(mem.offset, 4096); /* from the first piece, not the reservation */
    assert_int_equal(mem.alloc_bytes, 9 * FAKE_PIECE);
    assert_memory_equal(mem.gpu_uuid, FAKE_CUDA_UUID, VQKV__GPU_UUID_BYTES);
    for (size_t i = 0; i < mem.n_pieces; i++) {
        assert_int_equal(mem.piece_bytes[i], FAKE_PIECE);
        assert_true(fcntl(mem.fds[i], F_GETFD) >= 0);
    }
    assert_int_equal(count_open_fds(), before + 9);
    fake_counts(&made, &retained);
    assert_int_equal(made, 9);
    assert_int_equal(retained, 0);
    vqkv__cuda_mem_free(&mem);
    assert_int_equal(count_open_fds(), before);
    assert_null(mem.fds);

    /* Exactly what is mapped, in one piece: one fd. */
    assert_int_equal(vqkv__cuda_describe(FAKE_BASE, FAKE_PIECE, &mem, why, sizeof why), VQKV_OK);
    assert_int_equal(mem.n_pieces, 1);
    assert_int_equal(mem.offset, 0);
    vqkv__cuda_mem_free(&mem);

    /* One byte past the ninth piece: refused before any export. */
    fake_vmm(9, -1);
    fake_refused(at, 9 * FAKE_PIECE - 4096 + 1, VQKV_ERANGE, "is not mapped", 0);
    /* The third export fails: the two made are closed. */
    fake_vmm(9, 2);
    fake_refused(at, 8 * FAKE_PIECE, VQKV_EDEVICE,
                 "cuMemExportToShareableHandle (allocate with a POSIX fd handle type): "
                 "CUDA_ERROR_OUT_OF_MEMORY",
                 2);
    /* One piece more than a region may span. */
    fake_vmm(VQKV_REGION_MAX_PIECES + 1, -1);
    fake_refused(FAKE_BASE, (VQKV_REGION_MAX_PIECES + 1) * FAKE_PIECE, VQKV_ELIMIT,
                 "more than 8192 physical allocations", 0);
    /* As many as it may: fine. */
    fake_vmm(VQKV_REGION_MAX_PIECES, -1);
    assert_int_equal(
        vqkv__cuda_describe(FAKE_BASE, VQKV_REGION_MAX_PIECES * FAKE_PIECE, &mem, why, sizeof why),
        VQKV_OK);
    assert_int_equal(mem.n_pieces, VQKV_REGION_MAX_PIECES);
    vqkv__cuda_mem_free(&mem);

    /* A legacy allocation: RANGE_START and RANGE_SIZE are the allocation. */
    fake_cuda_memory_t legacy = {.legacy = 1,
                                 .base = FAKE_BASE,
                                 .piece_bytes = FAKE_PIECE,
                                 .n_pieces = 1,
                                 .fail_export_at = -1};
    fake_setup(&legacy);
    assert_int_equal(vqkv__cuda_describe(at, FAKE_PIECE - 4096, &mem, why, sizeof why), VQKV_OK);
    assert_int_equal(mem.vmm, 0);
    assert_int_equal(mem.n_pieces, 0);
    assert_null(mem.fds);
    assert_int_equal(mem.offset, 4096);
    assert_int_equal(mem.alloc_bytes, FAKE_PIECE);
    assert_int_equal(mem.ipc_handle[0], 0xa5);
    fake_refused(at, FAKE_PIECE - 4096 + 1, VQKV_ERANGE, "run past the end of their allocation", 0);
}

static void test_mode(void **state)
{
    (void)state;
    if (strcmp(mode, "missing") == 0) {
        expect_refused(VQKV_EDEVICE, "the CUDA driver is not available");
    } else if (strcmp(mode, "nosymbols") == 0) {
        expect_refused(VQKV_EDEVICE, "has no cuInit");
    } else if (strcmp(mode, "stub") == 0) {
        expect_refused(VQKV_EDEVICE, "cuInit: CUDA error 34"); /* CUDA_ERROR_STUB_LIBRARY */
    } else if (strcmp(mode, "fake") == 0) {
        check_fake();
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
        fprintf(stderr, "usage: %s missing|nosymbols|stub|fake|gpu\n", argv[0]);
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
