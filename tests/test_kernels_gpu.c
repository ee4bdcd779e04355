/* test_kernels_gpu.c -- the codec kernels launched on a real GPU (ctest label
 * `gpu`), held to the CPU codecs over the cases of kernel_cases.h: decode
 * must give the CPU's bytes in the whole device region (nothing outside
 * the named slots moves), encode the CPU's bytes except where two codewords
 * tie (counted, and the reconstruction error must match). test_kernels
 * already holds the emulated bodies to the same bytes, so a difference here
 * is the launch's or the device arithmetic's. Requests out of range must be
 * refused before any launch. Without a CUDA device it exits 77, which ctest
 * reports as skipped, never as passed. VQKV_GPU_TEST_QUICK=1 runs every
 * codec once (f16, split layout, batches of 1 and 20): what the sanitizers,
 * many times slower, run in tools/gpu-check.sh.
 */
#include "kernel_cases.h"
#include "vqkv_cuda.h"

#include <cuda_runtime_api.h>

#define assert_cuda(expr) assert_int_equal((int)(expr), (int)cudaSuccess)

static void *device_copy(const void *host, size_t n)
{
    void *dev = NULL;
    assert_cuda(cudaMalloc(&dev, n));
    assert_cuda(cudaMemcpy(dev, host, n, cudaMemcpyHostToDevice));
    return dev;
}

static void host_copy(void *host, const void *dev, size_t n)
{
    assert_cuda(cudaMemcpy(host, dev, n, cudaMemcpyDeviceToHost));
}

/* Mean squared error of `store`'s blocks decoded on the CPU against the
 * source slots. */
static double reconstruction_mse(const vqkv_codec_t *codec, const region_t *src, const request_t *q,
                                 const uint8_t *store)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t nv = test_block_values(l);
    float *want = malloc(nv * sizeof *want), *got = malloc(nv * sizeof *got);
    uint8_t *out = malloc(src->view.region_bytes);
    assert_non_null(want);
    assert_non_null(got);
    assert_non_null(out);
    double se = 0.0;
    for (uint32_t i = 0; i < q->n; i++) {
        assert_ok(vqkv_codec_decode(codec, store + q->store_at[i], out, &src->view, q->slots[i]));
        test_read_block(l, &src->view, src->mem, q->slots[i], want);
        test_read_block(l, &src->view, out, q->slots[i], got);
        for (size_t k = 0; k < nv; k++)
            se += ((double)want[k] - got[k]) * ((double)want[k] - got[k]);
    }
    test_free_all(want, got, out);
    return se / ((double)nv * q->n);
}

static void check_on_gpu(vqkv_cuda_job_t *job, size_t ci, vqkv_dtype_t dtype, int split,
                         uint32_t n_blocks, uint32_t num_slots)
{
    vqkv_codec_t *codec = case_codec(ci, dtype);
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    uint64_t bb = vqkv_codec_block_bytes(codec);
    vqkv_cuda_codec_t *gc = NULL;
    assert_ok(vqkv_cuda_codec_create(codec, &gc));
    region_t src;
    region_make(&src, l, num_slots, split);
    request_t q;
    request_make(&q, n_blocks, num_slots, bb);

    uint8_t *want = malloc(q.store_bytes), *got = malloc(q.store_bytes);
    assert_non_null(want);
    assert_non_null(got);
    memset(want, 0xa5, q.store_bytes);
    for (uint32_t i = 0; i < n_blocks; i++)
        assert_ok(vqkv_codec_encode(codec, src.mem, &src.view, q.slots[i], want + q.store_at[i]));

    /* Encode on the device. */
    uint8_t *worker_dev = device_copy(src.mem, src.view.region_bytes);
    uint8_t *store_dev = device_copy(want, q.store_bytes);
    assert_cuda(cudaMemset(store_dev + 8, 0xa5, q.store_bytes - 16));
    assert_ok(vqkv_cuda_encode(job, gc, store_dev, q.store_bytes, q.store_at, worker_dev, &src.view,
                               q.slots, n_blocks));
    assert_ok(vqkv_cuda_job_sync(job));
    host_copy(got, store_dev, q.store_bytes);
    size_t differ = 0;
    for (uint64_t k = 0; k < q.store_bytes; k++)
        differ += want[k] != got[k];
    int is_vq = strncmp(kcases[ci].spec, "rvq", 3) == 0 ||
                strncmp(kcases[ci].spec, "vqkv", 4) == 0 ||
                strncmp(kcases[ci].spec, "commvq", 6) == 0;
    if (differ > 0) {
        print_message("%s dtype %d split %d: %zu of %llu encoded bytes differ\n", kcases[ci].spec,
                      dtype, split, differ, (unsigned long long)q.store_bytes);
        /* Only VQ codes may differ, only at ties: rare, and as good. */
        assert_true(is_vq);
        assert_true(differ * 1000 <= q.store_bytes);
        double mse_cpu = reconstruction_mse(codec, &src, &q, want);
        double mse_gpu = reconstruction_mse(codec, &src, &q, got);
        assert_true(fabs(mse_gpu - mse_cpu) <= 0.01 * mse_cpu);
    }

    /* Decode the CPU's blocks on the device: the CPU's bytes everywhere. */
    uint8_t *cpu = region_copy(&src, 0x77), *gpu = region_copy(&src, 0);
    for (uint32_t i = 0; i < n_blocks; i++)
        assert_ok(vqkv_codec_decode(codec, want + q.store_at[i], cpu, &src.view, q.slots[i]));
    assert_cuda(cudaMemcpy(store_dev, want, q.store_bytes, cudaMemcpyHostToDevice));
    assert_cuda(cudaMemset(worker_dev, 0x77, src.view.region_bytes));
    assert_ok(vqkv_cuda_decode(job, gc, store_dev, q.store_bytes, q.store_at, worker_dev, &src.view,
                               q.slots, n_blocks));
    assert_ok(vqkv_cuda_job_sync(job));
    host_copy(gpu, worker_dev, src.view.region_bytes);
    if (memcmp(cpu, gpu, src.view.region_bytes) != 0) {
        size_t at = 0;
        while (cpu[at] == gpu[at])
            at++;
        fail_msg("%s dtype %d split=%d: GPU decode differs at region byte %zu", kcases[ci].spec,
                 dtype, split, at);
    }
    assert_cuda(cudaFree(worker_dev));
    assert_cuda(cudaFree(store_dev));
    test_free_all(want, got, cpu, gpu, src.mem);
    request_free(&q);
    vqkv_cuda_codec_free(gc);
    vqkv_codec_free(codec);
}

static int quick(void)
{
    const char *q = getenv("VQKV_GPU_TEST_QUICK");
    return q != NULL && strcmp(q, "1") == 0;
}

static void test_every_codec_dtype_layout(void **state)
{
    vqkv_cuda_job_t *job = *state;
    size_t n_dtypes = quick() ? 1 : 3;
    for (size_t ci = 0; ci < NUM_KCASES; ci++)
        for (size_t di = 0; di < n_dtypes; di++)
            for (int split = quick(); split < 2; split++)
                check_on_gpu(job, ci, dtypes[di], split, 3, 5);
}

static void test_batches_of_1_and_500(void **state)
{
    vqkv_cuda_job_t *job = *state;
    static const char *const specs[] = {"fp16", "kivi2", "rvq", "rvq:esc=2", "commvq"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        check_on_gpu(job, kcase_named(specs[i]), VQKV_DTYPE_F16, 0, 1, 1);
        check_on_gpu(job, kcase_named(specs[i]), VQKV_DTYPE_BF16, 1, quick() ? 20 : 500, 61);
    }
}

/* A bad slot or offset anywhere in a batch: refused, nothing launched. */
static void test_out_of_range_refused(void **state)
{
    vqkv_cuda_job_t *job = *state;
    vqkv_codec_t *codec = case_codec(kcase_named("rvq:esc=2"), VQKV_DTYPE_F16);
    uint64_t bb = vqkv_codec_block_bytes(codec);
    vqkv_cuda_codec_t *gc = NULL;
    assert_ok(vqkv_cuda_codec_create(codec, &gc));
    region_t reg;
    region_make(&reg, vqkv_codec_layout(codec), 4, 0);
    request_t q;
    request_make(&q, 3, 4, bb);
    uint8_t *worker_dev = device_copy(reg.mem, reg.view.region_bytes);
    uint8_t *store_dev = NULL;
    assert_cuda(cudaMalloc((void **)&store_dev, q.store_bytes));
    q.slots[1] = 4;
    assert_rc(vqkv_cuda_decode(job, gc, store_dev, q.store_bytes, q.store_at, worker_dev, &reg.view,
                               q.slots, q.n),
              VQKV_ERANGE);
    q.slots[1] = 1;
    q.store_at[2] = q.store_bytes - bb + 1;
    assert_rc(vqkv_cuda_encode(job, gc, store_dev, q.store_bytes, q.store_at, worker_dev, &reg.view,
                               q.slots, q.n),
              VQKV_ERANGE);
    assert_rc(vqkv_cuda_decode(job, gc, store_dev, q.store_bytes, q.store_at, worker_dev, &reg.view,
                               q.slots, 1000),
              VQKV_EINVAL); /* more blocks than the job holds */
    assert_ok(vqkv_cuda_job_sync(job));
    uint8_t *after = region_copy(&reg, 0);
    host_copy(after, worker_dev, reg.view.region_bytes);
    assert_memory_equal(after, reg.mem, reg.view.region_bytes);
    assert_cuda(cudaFree(worker_dev));
    assert_cuda(cudaFree(store_dev));
    test_free_all(after, reg.mem);
    request_free(&q);
    vqkv_cuda_codec_free(gc);
    vqkv_codec_free(codec);
}

/* Codebook training with k-means's assignment steps on the GPU: the CPU's
 * codebooks (a tie decided otherwise may move some), and on held-back data
 * the same reconstruction error. */
static void test_training_on_gpu(void **state)
{
    (void)state;
    static const char *const specs[] = {"rvq", "rvq:d=4,b=6,r=3,bc=1", "vqkv", "rvq:b=6,ph=1"};
    const vqkv_assigner_t *gpu = vqkv_cuda_assigner();
    assert_non_null(gpu);
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        size_t ci = kcase_named(specs[i]);
        vqkv_codec_t *codec = NULL;
        vqkv_train_opts_t opts = {.seed = 3, .iterations = 3, .threads = 2, .assigner = gpu};
        assert_ok(vqkv_codec_create(kcases[ci].spec, &kcases[ci].layout, &codec));
        assert_ok(test_train_all(codec, PROFILE, 1026, &opts));
        vqkv_codec_t *cpu = case_codec(ci, VQKV_DTYPE_F16);
        uint8_t *a = NULL, *b = NULL;
        size_t a_len = 0, b_len = 0, same = 0;
        assert_ok(vqkv_codebook_save_buffer(codec, &a, &a_len));
        assert_ok(vqkv_codebook_save_buffer(cpu, &b, &b_len));
        assert_int_equal(a_len, b_len);
        for (size_t k = 0; k < a_len; k++)
            same += a[k] == b[k];
        print_message("%s: %zu of %zu codebook file bytes as the CPU's\n", specs[i], same, a_len);

        region_t held;
        region_make(&held, vqkv_codec_layout(codec), 4, 0);
        request_t q;
        request_make(&q, 4, 4, vqkv_codec_block_bytes(codec));
        uint8_t *sa = calloc(1, q.store_bytes), *sb = calloc(1, q.store_bytes);
        for (uint32_t k = 0; k < q.n; k++) {
            assert_ok(
                vqkv_codec_encode(codec, held.mem, &held.view, q.slots[k], sa + q.store_at[k]));
            assert_ok(vqkv_codec_encode(cpu, held.mem, &held.view, q.slots[k], sb + q.store_at[k]));
        }
        double mse_gpu = reconstruction_mse(codec, &held, &q, sa);
        double mse_cpu = reconstruction_mse(cpu, &held, &q, sb);
        print_message("%s: held-back MSE %.6g (GPU-trained) vs %.6g (CPU-trained)\n", specs[i],
                      mse_gpu, mse_cpu);
        assert_true(fabs(mse_gpu - mse_cpu) <= 0.01 * mse_cpu);
        test_free_all(a, b, sa, sb, held.mem);
        request_free(&q);
        vqkv_codec_free(cpu);
        vqkv_codec_free(codec);
    }
}

static int job_setup(void **state)
{
    vqkv_cuda_job_t *job = NULL;
    if (vqkv_cuda_job_create(NULL, 512, &job) != VQKV_OK)
        return -1;
    *state = job;
    return 0;
}

static int job_teardown(void **state)
{
    vqkv_cuda_job_free(*state);
    return 0;
}

int main(void)
{
    if (vqkv_cuda_device_count() == 0) {
        fprintf(stderr, "SKIPPED: no CUDA device; the GPU kernels were not launched "
                        "(tools/gpu-check.sh runs this on a GPU machine)\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_out_of_range_refused, job_setup, job_teardown),
        cmocka_unit_test_setup_teardown(test_every_codec_dtype_layout, job_setup, job_teardown),
        cmocka_unit_test_setup_teardown(test_batches_of_1_and_500, job_setup, job_teardown),
        cmocka_unit_test(test_training_on_gpu),
    };
    return cmocka_run_group_tests(tests, train_cases, free_cases);
}
