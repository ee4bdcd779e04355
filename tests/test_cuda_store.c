/* test_cuda_store.c -- the GPU pool's store as one address range over
 * pieces (daemon/cuda_store.h). Two programs in one: the unit one (label
 * unit) holds the split of a pool into pieces and into equal shares over
 * GPUs on any machine; `gpu` (label gpu, exits
 * 77, skipped, without a GPU) opens stores on GPU 0 and moves bytes through
 * them: a store of four small pieces, every byte written and read back
 * across the boundaries, a copy that straddles them, and nothing of the
 * device's memory kept after close; then, where the GPU has the memory, a
 * pool over VQKVD_CUDA_MAX_ALLOC (two pieces), the bytes on both sides of
 * the boundary checked; and, on a machine with two GPUs with peer access,
 * a store over both, each piece on its GPU and either reaching the other.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "backend.h"
#include "cuda_store.h"
#include "vqkv_proto.h"

#define MIB (1ull << 20)
#define GIB (1ull << 30)

static void check_plan(uint64_t bytes, uint64_t gran, uint64_t max_piece, uint64_t want_piece,
                       uint32_t want_n, uint64_t want_total)
{
    uint64_t piece = 0, total = 0;
    uint32_t n = 0;
    assert_int_equal(vqkvd_cuda_store_plan(bytes, gran, max_piece, &piece, &n, &total), VQKV_OK);
    assert_int_equal(piece, want_piece);
    assert_int_equal(n, want_n);
    assert_int_equal(total, want_total);
    /* the pieces cover the total, the last one not empty */
    assert_true((uint64_t)(n - 1) * piece < total && (uint64_t)n * piece >= total);
}

static void test_plan(void **state)
{
    (void)state;
    /* under one piece: one piece of the rounded size */
    check_plan(1 * GIB, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 1 * GIB, 1, 1 * GIB);
    check_plan(1 * GIB + 1, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 1 * GIB + 2 * MIB, 1, 1 * GIB + 2 * MIB);
    /* exactly the largest allocation: still one */
    check_plan(64 * GIB, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 64 * GIB, 1, 64 * GIB);
    /* past it: 64 GiB pieces, the last one the rest */
    check_plan(100 * GIB, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 64 * GIB, 2, 100 * GIB);
    check_plan(128 * GIB + 1, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 64 * GIB, 3, 128 * GIB + 2 * MIB);
    /* a largest allocation that is not a whole number of granules is rounded down */
    check_plan(10 * MIB, 2 * MIB, 3 * MIB, 2 * MIB, 5, 10 * MIB);
    check_plan(7 * MIB, 2 * MIB, 2 * MIB, 2 * MIB, 4, 8 * MIB);
    uint64_t piece, total;
    uint32_t n;
    assert_int_equal(vqkvd_cuda_store_plan(0, 2 * MIB, 64 * GIB, &piece, &n, &total), VQKV_EINVAL);
    assert_int_equal(vqkvd_cuda_store_plan(MIB, 0, 64 * GIB, &piece, &n, &total), VQKV_EINVAL);
    assert_int_equal(vqkvd_cuda_store_plan(MIB, 2 * MIB, MIB, &piece, &n, &total), VQKV_EINVAL);
    assert_int_equal(vqkvd_cuda_store_plan(UINT64_MAX, 2 * MIB, 64 * GIB, &piece, &n, &total),
                     VQKV_EINVAL);
}

/* The layout over GPUs: equal shares one after another, each in pieces;
 * every byte of the range in exactly one piece, on its share's GPU. */
static void check_layout(uint64_t bytes, uint64_t gran, uint64_t max_piece, uint32_t devices,
                         uint64_t want_share, uint32_t want_per_share)
{
    vqkvd_cuda_store_t s = {0};
    assert_int_equal(vqkvd_cuda_store_layout(bytes, gran, max_piece, devices, &s), VQKV_OK);
    assert_int_equal(s.share_bytes, want_share);
    assert_int_equal(s.pieces_per_share, want_per_share);
    assert_int_equal(s.bytes, want_share * devices);
    assert_true(s.bytes >= bytes);
    uint64_t next = 0;
    for (uint32_t i = 0; i < devices * s.pieces_per_share; i++) {
        uint64_t offset, piece;
        uint32_t device;
        vqkvd_cuda_store_piece(&s, i, &offset, &piece, &device);
        assert_int_equal(offset, next); /* no gap, no overlap */
        assert_true(piece > 0 && piece <= max_piece && piece % gran == 0);
        assert_int_equal(device, offset / s.share_bytes);
        assert_int_equal(device, (offset + piece - 1) / s.share_bytes); /* within its share */
        next = offset + piece;
    }
    assert_int_equal(next, s.bytes);
}

static void test_layout(void **state)
{
    (void)state;
    /* one GPU: the plan's pieces */
    check_layout(100 * GIB, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 1, 100 * GIB, 2);
    /* two: halves, each under one allocation */
    check_layout(100 * GIB, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 2, 50 * GIB, 1);
    /* three, an odd size: each share rounded up to the granule */
    check_layout(10 * MIB + 1, 2 * MIB, VQKVD_CUDA_MAX_ALLOC, 3, 4 * MIB, 1);
    /* eight GPUs, small pieces: each share in pieces, the last one shorter */
    check_layout(8 * 7 * MIB, 2 * MIB, 4 * MIB, 8, 8 * MIB, 2);
    check_layout(8 * 5 * MIB, 2 * MIB, 4 * MIB, 8, 6 * MIB, 2);
    vqkvd_cuda_store_t s = {0};
    assert_int_equal(vqkvd_cuda_store_layout(MIB, 2 * MIB, 64 * GIB, 0, &s), VQKV_EINVAL);
    /* 16 GPUs of 8 pieces each is past VQKVD_CUDA_STORE_MAX_PIECES */
    assert_int_equal(vqkvd_cuda_store_layout(16 * 16 * MIB, 2 * MIB, 2 * MIB, 16, &s), VQKV_EINVAL);
    assert_int_equal(vqkvd_cuda_store_layout(16 * 8 * MIB, 2 * MIB, 2 * MIB, 16, &s), VQKV_OK);
}

static vqkvd_cuda_driver_t driver;
static const int gpu0[] = {0};

static size_t device_free(void)
{
    size_t free_bytes = 0, total = 0;
    assert_int_equal(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
    return free_bytes;
}

/* Bytes [at, at + n) of the store hold at's ramp: byte i is (i * 131) >> 3. */
static void ramp(uint8_t *host, uint64_t at, size_t n)
{
    for (size_t i = 0; i < n; i++)
        host[i] = (uint8_t)(((at + i) * 131) >> 3);
}

static void test_small_pieces(void **state)
{
    (void)state;
    size_t gran = 0;
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};
    assert_int_equal(driver.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                     CUDA_SUCCESS);
    size_t before = device_free();
    vqkvd_cuda_store_t s;
    char why[160] = "";
    assert_int_equal(
        vqkvd_cuda_store_open(&driver, gpu0, 1, 3 * gran + gran / 2, gran, &s, why, sizeof why),
        VQKV_OK);
    assert_int_equal(s.n_pieces, 4);
    assert_int_equal(s.bytes, 4 * gran);
    uint8_t *want = malloc(s.bytes), *got = malloc(s.bytes);
    assert_non_null(want);
    assert_non_null(got);
    ramp(want, 0, s.bytes);
    assert_int_equal(cudaMemcpy(s.base, want, s.bytes, cudaMemcpyHostToDevice), cudaSuccess);
    assert_int_equal(cudaMemcpy(got, s.base, s.bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_memory_equal(got, want, s.bytes);
    /* a device copy from piece 0 into pieces 1 and 2, over their boundary */
    assert_int_equal(cudaMemcpy(s.base + gran + gran / 2, s.base, gran, cudaMemcpyDeviceToDevice),
                     cudaSuccess);
    assert_int_equal(cudaMemcpy(got, s.base, s.bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    memcpy(want + gran + gran / 2, want, gran);
    assert_memory_equal(got, want, s.bytes);
    vqkvd_cuda_store_close(&driver, &s);
    assert_null(s.base);
    vqkvd_cuda_store_close(&driver, &s); /* twice is safe */
    assert_true(device_free() >= before);
    free(want);
    free(got);
}

static void test_sizes_refused(void **state)
{
    (void)state;
    vqkvd_cuda_store_t s;
    char why[160] = "";
    assert_int_equal(
        vqkvd_cuda_store_open(&driver, gpu0, 1, 0, VQKVD_CUDA_MAX_ALLOC, &s, why, sizeof why),
        VQKV_EINVAL);
    assert_non_null(strstr(why, "granule"));
    /* more pieces than a store keeps */
    assert_int_equal(
        vqkvd_cuda_store_open(&driver, gpu0, 1, 4096 * MIB, 2 * MIB, &s, why, sizeof why),
        VQKV_EINVAL);
    assert_null(s.base);
    /* more memory than the GPU has: out of memory, nothing kept */
    size_t before = device_free();
    assert_int_equal(vqkvd_cuda_store_open(&driver, gpu0, 1, 4096 * GIB, VQKVD_CUDA_MAX_ALLOC, &s,
                                           why, sizeof why),
                     VQKV_ENOMEM);
    assert_non_null(strstr(why, "lower pool_bytes"));
    assert_null(s.base);
    assert_true(device_free() >= before);
}

static void test_past_the_largest_allocation(void **state)
{
    (void)state;
    uint64_t bytes = VQKVD_CUDA_MAX_ALLOC + 64 * MIB;
    if (device_free() < bytes + 2 * GIB) {
        fprintf(stderr,
                "SKIPPED part: a %llu MiB store needs more free memory than this GPU has "
                "(%zu MiB)\n",
                (unsigned long long)(bytes / MIB), (size_t)(device_free() / MIB));
        return;
    }
    vqkvd_cuda_store_t s;
    char why[160] = "";
    assert_int_equal(
        vqkvd_cuda_store_open(&driver, gpu0, 1, bytes, VQKVD_CUDA_MAX_ALLOC, &s, why, sizeof why),
        VQKV_OK);
    assert_int_equal(s.n_pieces, 2);
    uint8_t want[2 * MIB], got[2 * MIB];
    const uint64_t at[] = {0, VQKVD_CUDA_MAX_ALLOC - MIB, s.bytes - sizeof want};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
        ramp(want, at[i], sizeof want);
        assert_int_equal(cudaMemcpy(s.base + at[i], want, sizeof want, cudaMemcpyHostToDevice),
                         cudaSuccess);
        assert_int_equal(cudaMemcpy(got, s.base + at[i], sizeof got, cudaMemcpyDeviceToHost),
                         cudaSuccess);
        assert_memory_equal(got, want, sizeof want);
    }
    vqkvd_cuda_store_close(&driver, &s);
}

/* A store over GPUs 0 and 1: each holds its share, and a copy run by
 * either GPU reaches the other's bytes (peer access). */
static void test_two_gpus(void **state)
{
    (void)state;
    int n = 0, peer = 0;
    cudaGetDeviceCount(&n);
    if (n < 2 || cudaDeviceCanAccessPeer(&peer, 0, 1) != cudaSuccess || !peer) {
        fprintf(stderr,
                "SKIPPED part: a store over two GPUs needs two GPUs with peer access "
                "(%d GPU%s here)\n",
                n, n == 1 ? "" : "s");
        return;
    }
    static const int both[] = {0, 1};
    vqkvd_cuda_store_t s;
    char why[160] = "";
    assert_int_equal(
        vqkvd_cuda_store_open(&driver, both, 2, 64 * MIB, 16 * MIB, &s, why, sizeof why), VQKV_OK);
    assert_int_equal(s.n_pieces, 4);
    for (uint32_t i = 0; i < s.n_pieces; i++) {
        uint64_t offset, piece;
        uint32_t device;
        vqkvd_cuda_store_piece(&s, i, &offset, &piece, &device);
        struct cudaPointerAttributes attr;
        assert_int_equal(cudaPointerGetAttributes(&attr, s.base + offset), cudaSuccess);
        assert_int_equal(attr.device, both[device]);
    }
    uint8_t *want = malloc(s.bytes), *got = malloc(s.bytes);
    assert_non_null(want);
    assert_non_null(got);
    ramp(want, 0, s.bytes);
    assert_int_equal(cudaMemcpy(s.base, want, s.bytes, cudaMemcpyHostToDevice), cudaSuccess);
    /* GPU 1 copies GPU 0's first piece over the start of its own share */
    assert_int_equal(cudaSetDevice(1), cudaSuccess);
    assert_int_equal(cudaMemcpy(s.base + s.share_bytes, s.base, 8 * MIB, cudaMemcpyDeviceToDevice),
                     cudaSuccess);
    assert_int_equal(cudaSetDevice(0), cudaSuccess);
    memcpy(want + s.share_bytes, want, 8 * MIB);
    assert_int_equal(cudaMemcpy(got, s.base, s.bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_memory_equal(got, want, s.bytes);
    vqkvd_cuda_store_close(&driver, &s);
    free(want);
    free(got);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "gpu") == 0) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
            fprintf(stderr, "SKIPPED: no CUDA device; the GPU pool's store was not opened "
                            "(tools/gpu-check.sh runs this on a GPU machine)\n");
            return 77;
        }
        char why[160];
        if (cudaSetDevice(0) != cudaSuccess ||
            vqkvd_cuda_driver_load(&driver, why, sizeof why) != VQKV_OK) {
            fprintf(stderr, "cannot reach the driver: %s\n", why);
            return 1;
        }
        const struct CMUnitTest tests[] = {
            cmocka_unit_test(test_small_pieces),
            cmocka_unit_test(test_sizes_refused),
            cmocka_unit_test(test_past_the_largest_allocation),
            cmocka_unit_test(test_two_gpus),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
    }
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_plan), cmocka_unit_test(test_layout)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
