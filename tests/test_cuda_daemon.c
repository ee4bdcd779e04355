/* test_cuda_daemon.c -- vqkvd's CUDA backend between worker processes on a
 * real GPU (label gpu; exits 77, skipped, without a GPU). vqkvd runs with
 * --device cuda:0; every worker is a process of its own that allocates a
 * paged fp16 KV cache in GPU memory, registers it through libvqkv
 * (vqkv_register_cuda_region) and puts or gets blocks; every byte a get
 * wrote is checked against what the writer put (fp16 is lossless).
 *
 *   - a cudaMalloc cache (legacy IPC), the same with the tensor 4 KiB into
 *     its allocation, and a VMM cache as PyTorch's expandable segments map
 *     one: 2 MiB pieces inside a larger reservation, the tensor 4 KiB into
 *     the first and its layers 4.5 MiB apart, so that it spans 7 pieces,
 *     sent as one fd each over two frames (RegionPieces, RegisterRegion);
 *   - a put and a get with the workers' interprocess events, neither
 *     worker synchronizing its stream;
 *   - a worker SIGKILLed right after starting a get: its regions are closed
 *     (the daemon's region count goes back to 0) and the daemon serves on;
 *   - VQKV_GPU_SOAK_S seconds (default 30) of 8 workers putting, looking up
 *     and getting blocks of their own;
 *   - on a machine with two GPUs with peer access, a vqkvd over both
 *     (--device cuda:0,cuda:1): a worker on one GPU gets what a worker on
 *     the other put (skipped, and said so, elsewhere).
 *
 * The parent never touches CUDA (a process that did cannot fork workers that
 * use it); the device check runs in a child too.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <cuda_runtime.h>

#include "cuda_vmm.h"
#include "libvqkv_harness.h"
#include "test_util.h" /* test_rng_t */
#include "vqkv_cuda.h"

#define MODEL "test/cuda-daemon@1"
#define SLOTS 32
#define BLOCKS 8
#define WORKERS 8
#define TOKENS_PER_BLOCK 16

static const vqkv_layout_t layout = {4, 2, 64, TOKENS_PER_BLOCK, VQKV_DTYPE_F16};

typedef enum { CACHE_MALLOC, CACHE_AT_OFFSET, CACHE_VMM } cache_kind_t;

/* A worker's cache on the GPU and its host image. */
typedef struct {
    cache_kind_t kind;
    vqkv_kv_view_t view;
    void *alloc; /* cudaMalloc'd, or NULL */
    vmm_mem_t vmm;
    uint8_t *tensor; /* where the view starts on the device */
    uint8_t *host;   /* view.region_bytes */
} cache_t;

/* Failing a worker: a message and exit status 1, which the parent reports. */
static void worker_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void worker_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "worker %d: ", (int)getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    _exit(1);
}

#define WORKER_CHECK(cond, ...)                                                                    \
    do {                                                                                           \
        if (!(cond))                                                                               \
            worker_fail(__VA_ARGS__);                                                              \
    } while (0)

/* The VMM cache's layers lie this far apart (see the top). */
#define VMM_LAYER_STRIDE (4608u << 10)
#define VMM_PIECE (2u << 20)

/* Where block slot of layer l, side kv starts in k. */
static size_t cache_block_at(const cache_t *k, uint32_t l, uint32_t kv, uint32_t slot)
{
    return l * k->view.layer_stride + kv * k->view.kv_stride + slot * k->view.slot_stride;
}

/* The host image of a cache of kind and seed: what a writer of seed put
 * there. A block's values depend on seed and the block alone, not on
 * where the kind's view puts it. */
static void cache_image(cache_t *k, cache_kind_t kind, unsigned seed)
{
    memset(k, 0, sizeof *k);
    vqkv_kv_view_vllm(&k->view, &layout, SLOTS);
    if (kind == CACHE_VMM) {
        k->view.layer_stride = VMM_LAYER_STRIDE;
        k->view.region_bytes = (layout.num_layers - 1) * VMM_LAYER_STRIDE + 2 * k->view.kv_stride;
    }
    k->host = calloc(1, k->view.region_bytes);
    WORKER_CHECK(k->host != NULL, "out of memory");
    for (uint32_t l = 0; l < layout.num_layers; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t slot = 0; slot < SLOTS; slot++) {
                test_rng_t rng = {((uint64_t)seed << 32) + (l * 2u + kv) * SLOTS + slot};
                uint16_t *v = (uint16_t *)(k->host + cache_block_at(k, l, kv, slot));
                for (size_t i = 0; i < k->view.slot_stride / 2; i++) {
                    float f = (float)(test_rng_uniform(&rng) * 4.0 - 2.0);
                    vqkv_dtype_from_f32(VQKV_DTYPE_F16, &f, 1, &v[i]);
                }
            }
}

/* A cache of kind on the GPU holding the image of seed, unless clear: then
 * zeros on the GPU (the image stays, for the writer to copy in itself). */
static void cache_new(cache_t *k, cache_kind_t kind, unsigned seed, bool clear)
{
    cache_image(k, kind, seed);
    k->kind = kind;
    size_t bytes = k->view.region_bytes, skip = kind != CACHE_MALLOC ? 4096 : 0;
    if (kind == CACHE_VMM) {
        CUresult err = vmm_alloc(VMM_PIECE, (bytes + skip + VMM_PIECE - 1) / VMM_PIECE, &k->vmm);
        WORKER_CHECK(err == CUDA_SUCCESS, "VMM allocation: driver error %d", (int)err);
        k->tensor = (uint8_t *)(uintptr_t)k->vmm.va + skip;
    } else {
        cudaError_t err = cudaMalloc(&k->alloc, bytes + skip);
        WORKER_CHECK(err == cudaSuccess, "cudaMalloc: %s", cudaGetErrorName(err));
        k->tensor = (uint8_t *)k->alloc + skip;
    }
    cudaError_t err = clear ? cudaMemset(k->tensor, 0, bytes)
                            : cudaMemcpy(k->tensor, k->host, bytes, cudaMemcpyHostToDevice);
    WORKER_CHECK(err == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess,
                 "filling the cache: %s", cudaGetErrorName(err));
}

static void cache_pull(cache_t *k)
{
    cudaError_t err = cudaMemcpy(k->host, k->tensor, k->view.region_bytes, cudaMemcpyDeviceToHost);
    WORKER_CHECK(err == cudaSuccess, "cudaMemcpy back: %s", cudaGetErrorName(err));
}

/* Block `slot` of a equals block `other` of b, byte for byte, wherever
 * their views put them. */
static bool cache_block_equal(const cache_t *a, uint32_t slot, const cache_t *b, uint32_t other)
{
    for (uint32_t l = 0; l < layout.num_layers; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            if (memcmp(a->host + cache_block_at(a, l, kv, slot),
                       b->host + cache_block_at(b, l, kv, other), a->view.slot_stride) != 0)
                return false;
    return true;
}

/* Connects, registers the model and the cache; the block keys of seq. */
static vqkv_client_t *worker_open(const char *sock, cache_t *k, vqkv_model_t **m, vqkv_region_t *r,
                                  unsigned seq, uint8_t (*keys)[VQKV_KEY_BYTES])
{
    vqkv_client_t *c = NULL;
    WORKER_CHECK(vqkv_connect(sock, "gpu-worker", 10000, &c) == VQKV_OK, "connect");
    WORKER_CHECK(vqkv_register_model(c, MODEL, &layout, "fp16", m) == VQKV_OK, "model: %s",
                 vqkv_last_error(c));
    int rc = vqkv_register_cuda_region(c, *m, (uint64_t)(uintptr_t)k->tensor, k->view.region_bytes,
                                       &k->view, r);
    WORKER_CHECK(rc == VQKV_OK, "register_cuda_region: %s", vqkv_last_error(c));
    uint32_t tokens[BLOCKS * TOKENS_PER_BLOCK];
    for (uint32_t i = 0; i < BLOCKS * TOKENS_PER_BLOCK; i++)
        tokens[i] = seq * 100000u + i;
    size_t n = 0;
    rc = vqkv_model_block_keys(*m, NULL, tokens, BLOCKS * TOKENS_PER_BLOCK, NULL, 0, keys, BLOCKS,
                               &n);
    WORKER_CHECK(rc == VQKV_OK && n == BLOCKS, "block keys");
    return c;
}

/* Slots 0 .. BLOCKS-1, or from the last slot down. */
static void worker_slots(uint32_t *slots, bool from_last)
{
    for (uint32_t i = 0; i < BLOCKS; i++)
        slots[i] = from_last ? SLOTS - 1 - i : i;
}

/* A worker's interprocess event and its handle. */
static cudaEvent_t worker_event(vqkv_cuda_event_t *handle)
{
    cudaEvent_t ev;
    cudaIpcEventHandle_t h;
    WORKER_CHECK(cudaEventCreateWithFlags(&ev, cudaEventInterprocess | cudaEventDisableTiming) ==
                         cudaSuccess &&
                     cudaIpcGetEventHandle(&h, ev) == cudaSuccess,
                 "an interprocess event");
    memcpy(handle->bytes, &h, sizeof handle->bytes);
    return ev;
}

/* Puts slots 0..BLOCKS-1 of a cache of seed under the keys of seq. With
 * an event, the worker writes the blocks on a stream and records the event
 * after them, and never synchronizes: the daemon waits on it. */
static void worker_put(const char *sock, cache_kind_t kind, unsigned seed, unsigned seq, bool event)
{
    cache_t k;
    cache_new(&k, kind, seed, event);
    vqkv_model_t *m;
    vqkv_region_t r;
    uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
    vqkv_client_t *c = worker_open(sock, &k, &m, &r, seq, keys);
    uint32_t slots[BLOCKS];
    worker_slots(slots, false);
    int rc;
    if (event) {
        cudaStream_t stream;
        vqkv_cuda_event_t handle;
        cudaEvent_t ev = worker_event(&handle);
        WORKER_CHECK(cudaStreamCreate(&stream) == cudaSuccess &&
                         cudaMemcpyAsync(k.tensor, k.host, k.view.region_bytes,
                                         cudaMemcpyHostToDevice, stream) == cudaSuccess &&
                         cudaEventRecord(ev, stream) == cudaSuccess,
                     "the writes and their event");
        rc = vqkv_put_after_event(c, m, r, keys, NULL, slots, BLOCKS, NULL, &handle);
    } else {
        rc = vqkv_put(c, m, r, keys, NULL, slots, BLOCKS, NULL);
    }
    WORKER_CHECK(rc == BLOCKS, "put: %d %s", rc, vqkv_last_error(c));
    vqkv_close(c);
}

/* Looks up the keys of seq, all of which must be there. */
static vqkv_lease_t worker_lookup(vqkv_client_t *c, const vqkv_model_t *m,
                                  const uint8_t (*keys)[VQKV_KEY_BYTES])
{
    size_t found = 0;
    vqkv_lease_t lease = 0;
    WORKER_CHECK(vqkv_lookup(c, m, keys, BLOCKS, &found, &lease) == VQKV_OK && found == BLOCKS,
                 "lookup found %zu: %s", found, vqkv_last_error(c));
    return lease;
}

/* Gets the blocks of seq into slots SLOTS-1 down, and checks them against
 * the image a writer of seed put. With an event, the call returns once the
 * decode is queued; the worker's stream waits on the event, then copies
 * the cache back. */
static void worker_get(const char *sock, cache_kind_t kind, unsigned seed, unsigned seq, bool event)
{
    cache_t k, want;
    cache_new(&k, kind, seed + 1000, false);
    cache_image(&want, CACHE_MALLOC, seed);
    vqkv_model_t *m;
    vqkv_region_t r;
    uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
    vqkv_client_t *c = worker_open(sock, &k, &m, &r, seq, keys);
    vqkv_lease_t lease = worker_lookup(c, m, keys);
    uint32_t slots[BLOCKS];
    worker_slots(slots, true);
    if (event) {
        cudaStream_t stream;
        vqkv_cuda_event_t handle;
        cudaEvent_t ev = worker_event(&handle);
        WORKER_CHECK(cudaStreamCreate(&stream) == cudaSuccess, "stream");
        int rc = vqkv_get_with_event(c, lease, r, slots, BLOCKS, &handle);
        WORKER_CHECK(rc == BLOCKS, "get_with_event: %d %s", rc, vqkv_last_error(c));
        WORKER_CHECK(cudaStreamWaitEvent(stream, ev, 0) == cudaSuccess &&
                         cudaMemcpyAsync(k.host, k.tensor, k.view.region_bytes,
                                         cudaMemcpyDeviceToHost, stream) == cudaSuccess &&
                         cudaStreamSynchronize(stream) == cudaSuccess,
                     "wait and copy back");
    } else {
        int rc = vqkv_get(c, lease, r, slots, BLOCKS);
        WORKER_CHECK(rc == BLOCKS, "get: %d %s", rc, vqkv_last_error(c));
        cache_pull(&k);
    }
    vqkv_release(c, lease);
    for (uint32_t i = 0; i < BLOCKS; i++)
        WORKER_CHECK(cache_block_equal(&k, SLOTS - 1 - i, &want, i), "block %u differs", i);
    vqkv_close(c);
}

/* Starts a get and dies with it in flight. */
static void worker_die_in_get(const char *sock, unsigned seed, unsigned seq)
{
    cache_t k;
    cache_new(&k, CACHE_MALLOC, seed, false);
    vqkv_model_t *m;
    vqkv_region_t r;
    uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
    vqkv_client_t *c = worker_open(sock, &k, &m, &r, seq, keys);
    vqkv_lease_t lease = worker_lookup(c, m, keys);
    uint32_t slots[BLOCKS];
    worker_slots(slots, false);
    vqkv_request_t req;
    WORKER_CHECK(vqkv_get_start(c, lease, r, slots, BLOCKS, &req) == VQKV_OK, "get_start");
    raise(SIGKILL);
}

/* Puts, looks up and gets its own sequences until the deadline. */
static void worker_soak(const char *sock, unsigned index, long until_ms)
{
    for (unsigned round = 0; now_ms() < until_ms; round++) {
        unsigned seq = 1000 + index * 10000 + round;
        worker_put(sock, (cache_kind_t)(round % 3), seq, seq, round % 2 == 1);
        worker_get(sock, (cache_kind_t)((round + 1) % 3), seq, seq, round % 4 >= 2);
    }
}

/* What a worker process does. */
typedef enum { PUT, GET, PUT_EVENT, GET_EVENT, DIE_IN_GET, SOAK } role_t;

static long soak_until;
/* The GPU the next workers run on. */
static int worker_gpu;

/* A child with CUDA on worker_gpu in role, on cache kind, with seed (its
 * sequence too; the soak's worker index). */
static pid_t worker_spawn(const daemon_t *d, role_t role, cache_kind_t kind, unsigned seed)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid != 0)
        return pid;
    if (cudaSetDevice(worker_gpu) != cudaSuccess)
        _exit(77);
    switch (role) {
    case PUT: worker_put(d->path, kind, seed, seed, false); break;
    case GET: worker_get(d->path, kind, seed, seed, false); break;
    case PUT_EVENT: worker_put(d->path, kind, seed, seed, true); break;
    case GET_EVENT: worker_get(d->path, kind, seed, seed, true); break;
    case DIE_IN_GET: worker_die_in_get(d->path, seed, seed); break;
    case SOAK: worker_soak(d->path, seed, soak_until); break;
    }
    _exit(0);
}

/* The worker's wait status. */
static int worker_run(const daemon_t *d, role_t role, cache_kind_t kind, unsigned seed)
{
    return wait_exit(worker_spawn(d, role, kind, seed));
}

static int setup_cuda(void **state)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    const char *const extra[] = {"--device", "cuda:0", "--pool-bytes", "256M", NULL};
    daemon_start(d, extra);
    return 0;
}

/* One worker puts, another gets into its own memory; then the caches
 * swap kinds, so every pair of region kinds meets. */
static void test_put_get_between_processes(void **state)
{
    const daemon_t *d = *state;
    assert_int_equal(worker_run(d, PUT, CACHE_MALLOC, 1), 0);
    assert_int_equal(worker_run(d, GET, CACHE_MALLOC, 1), 0);
    assert_int_equal(worker_run(d, PUT, CACHE_AT_OFFSET, 2), 0);
    assert_int_equal(worker_run(d, GET, CACHE_VMM, 2), 0);
    assert_int_equal(worker_run(d, PUT, CACHE_VMM, 3), 0);
    assert_int_equal(worker_run(d, GET, CACHE_AT_OFFSET, 3), 0);
}

/* Neither worker synchronizes: the writer's event orders the daemon's
 * encode after its writes, the reader's orders its read after the decode. */
static void test_events_between_processes(void **state)
{
    const daemon_t *d = *state;
    assert_int_equal(worker_run(d, PUT_EVENT, CACHE_MALLOC, 5), 0);
    assert_int_equal(worker_run(d, GET_EVENT, CACHE_VMM, 5), 0);
}

static void test_worker_killed_in_get(void **state)
{
    const daemon_t *d = *state;
    assert_int_equal(worker_run(d, PUT, CACHE_MALLOC, 4), 0);
    int status = worker_run(d, DIE_IN_GET, CACHE_MALLOC, 4);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    vqkv_client_t *c = NULL;
    assert_vqkv(vqkv_connect(d->path, "gpu-watch", 10000, &c), VQKV_OK);
    vqkv_stats_t st;
    /* The get may still be running; its region closes once it is done. */
    for (long deadline = now_ms() + 5000;; sleep_ms(20)) {
        assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
        if (st.regions == 0 || now_ms() > deadline)
            break;
    }
    assert_int_equal(st.regions, 0);
    vqkv_close(c);
    assert_int_equal(worker_run(d, GET, CACHE_MALLOC, 4), 0); /* and it serves on */
}

static void test_soak(void **state)
{
    const daemon_t *d = *state;
    const char *env = getenv("VQKV_GPU_SOAK_S");
    soak_until = now_ms() + 1000L * (env != NULL ? atol(env) : 30);
    pid_t pids[WORKERS];
    for (unsigned i = 0; i < WORKERS; i++)
        pids[i] = worker_spawn(d, SOAK, CACHE_MALLOC, i);
    for (unsigned i = 0; i < WORKERS; i++) { /* longer than wait_exit's deadline */
        int status = -1;
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        assert_int_equal(status, 0);
    }
}

/* Whether GPUs 0 and 1 exist and reach each other's memory, which a
 * vqkvd over both needs; asked in a child (see the top). */
static bool gpu_pair_present(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        int n = 0, there = 0, back = 0;
        cudaGetDeviceCount(&n);
        bool pair = n >= 2 && cudaDeviceCanAccessPeer(&there, 0, 1) == cudaSuccess &&
                    cudaDeviceCanAccessPeer(&back, 1, 0) == cudaSuccess && there && back;
        _exit(pair ? 0 : 77);
    }
    int status = 0;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
           WEXITSTATUS(status) == 0;
}

/* One vqkvd over GPUs 0 and 1: a worker on either restores what a worker
 * on the other stored, whichever GPU's share of the pool holds it. */
static void test_two_gpus(void **state)
{
    (void)state;
    if (!gpu_pair_present()) {
        fprintf(stderr, "SKIPPED part: one vqkvd over two GPUs needs two GPUs with peer "
                        "access to each other\n");
        return;
    }
    daemon_t d = {0};
    const char *const extra[] = {"--device", "cuda:0,cuda:1", "--pool-bytes", "256M", NULL};
    daemon_start(&d, extra);
    for (unsigned seed = 20; seed < 24; seed++) {
        worker_gpu = (int)(seed % 2);
        assert_int_equal(worker_run(&d, PUT, CACHE_MALLOC, seed), 0);
        worker_gpu = 1 - worker_gpu;
        assert_int_equal(worker_run(&d, seed < 22 ? GET : GET_EVENT, CACHE_VMM, seed), 0);
    }
    worker_gpu = 0;
    daemon_stop(&d);
    daemon_cleanup(&d);
}

/* Whether a worker would find a GPU; asked in a child (see the top). */
static bool gpu_present(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(vqkv_cuda_device_count() > 0 ? 0 : 77);
    int status = 0;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
           WEXITSTATUS(status) == 0;
}

int main(void)
{
    if (!gpu_present()) {
        fprintf(stderr, "SKIPPED: no CUDA device\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_get_between_processes, setup_cuda, teardown),
        cmocka_unit_test_setup_teardown(test_events_between_processes, setup_cuda, teardown),
        cmocka_unit_test_setup_teardown(test_worker_killed_in_get, setup_cuda, teardown),
        cmocka_unit_test_setup_teardown(test_soak, setup_cuda, teardown),
        cmocka_unit_test(test_two_gpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
