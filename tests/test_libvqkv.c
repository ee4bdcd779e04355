/* test_libvqkv.c -- libvqkv (client/vqkv.h) against the vqkvd binary, and
 * vqkvctl's stats and health subcommands. The daemon runs on a socket in a
 * fresh temporary directory and is stopped with SIGTERM; exit status 0 is
 * required (under ASan a daemon leak fails the test). Apart from starting
 * the processes, everything goes through libvqkv's public API.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "daemon_harness.h"
#include "vqkv.h"

#define TIMEOUT_MS 5000

#define assert_vqkv(expr, want)                                                                    \
    do {                                                                                           \
        int got_rc_ = (expr);                                                                      \
        int want_rc_ = (want);                                                                     \
        if (got_rc_ != want_rc_) {                                                                 \
            print_error("%s returned %d (%s), expected %d (%s)\n", #expr, got_rc_,                 \
                        vqkv_client_strerror(got_rc_), want_rc_, vqkv_client_strerror(want_rc_));  \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

/* Runs vqkvctl with args (NULL-terminated) and returns its exit status;
 * its stdout goes into out (NUL-terminated, truncated to size). */
static int run_ctl(const char *const *args, char *out, size_t size)
{
    const char *argv[16] = {VQKVCTL_PATH};
    size_t n = 1;
    for (size_t i = 0; args[i] != NULL && n < 15; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(pipefd[1], STDOUT_FILENO);
        close(pipefd[0]);
        close(pipefd[1]);
        execv(VQKVCTL_PATH, (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    size_t got = 0;
    for (;;) {
        ssize_t r = read(pipefd[0], out + got, size - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
        if (got == size - 1)
            break;
    }
    out[got] = '\0';
    close(pipefd[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- a worker's KV cache ---------------------------------------------------- */

#define LAYERS 2
#define HEADS 2
#define DIM 64
#define TOKENS 16
#define SLOTS 8
#define NBLOCKS 3
#define MODEL "test/libvqkv@main"

static const vqkv_layout_t layout = {LAYERS, HEADS, DIM, TOKENS, VQKV_DTYPE_F16};

typedef struct {
    int fd;
    uint8_t *base;
    vqkv_kv_view_t view;
} region_t;

static void region_new(region_t *r, unsigned seed)
{
    vqkv_kv_view_vllm(&r->view, &layout, SLOTS);
    assert_vqkv(vqkv_memfd_create("test_libvqkv", r->view.region_bytes, &r->fd), VQKV_OK);
    r->base = mmap(NULL, r->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    assert_true(r->base != MAP_FAILED);
    srand(seed);
    uint16_t *v = (uint16_t *)r->base;
    for (size_t i = 0; i < r->view.region_bytes / 2; i++) {
        float x = (float)rand() / (float)RAND_MAX * 4.0f - 2.0f;
        vqkv_dtype_from_f32(VQKV_DTYPE_F16, &x, 1, &v[i]);
    }
}

static void region_free(region_t *r)
{
    munmap(r->base, r->view.region_bytes);
    close(r->fd);
}

/* The bytes of block `slot` of region r, layer by layer and K then V, must
 * equal those of block `other` of region o. */
static void assert_block_equal(const region_t *r, uint32_t slot, const region_t *o, uint32_t other)
{
    size_t block = (size_t)TOKENS * HEADS * DIM * 2; /* one K or V block of one layer */
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++) {
            const uint8_t *a = r->base + l * r->view.layer_stride + kv * r->view.kv_stride +
                               slot * r->view.slot_stride;
            const uint8_t *b = o->base + l * o->view.layer_stride + kv * o->view.kv_stride +
                               other * o->view.slot_stride;
            assert_memory_equal(a, b, block);
        }
}

static vqkv_client_t *connect_ok(const daemon_t *d, const char *name)
{
    vqkv_client_t *c = NULL;
    assert_vqkv(vqkv_connect(d->path, name, TIMEOUT_MS, &c), VQKV_OK);
    assert_non_null(c);
    assert_string_equal(vqkv_last_error(c), "");
    return c;
}

/* ---- tests ------------------------------------------------------------------ */

/* Put three blocks on one connection; a second one finds, gets and checks
 * them; vqkvctl stats --json sees them. */
static void test_put_lookup_get(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *a = connect_ok(d, "worker-a");
    vqkv_client_t *b = connect_ok(d, "worker-b");

    vqkv_model_t *ma, *mb;
    assert_vqkv(vqkv_register_model(a, MODEL, &layout, "fp16", &ma), VQKV_OK);
    assert_vqkv(vqkv_register_model(b, MODEL, &layout, "fp16", &mb), VQKV_OK);
    assert_true(strncmp(vqkv_model_codec(ma), "fp16", 4) == 0);
    assert_string_equal(vqkv_model_codec(ma), vqkv_model_codec(mb));
    assert_int_equal(vqkv_model_block_bytes(ma), 2u * LAYERS * TOKENS * HEADS * DIM * 2);

    region_t ra, rb;
    region_new(&ra, 1);
    region_new(&rb, 2);
    vqkv_region_t ha, hb;
    assert_vqkv(vqkv_register_memfd_region(a, ma, ra.fd, ra.view.region_bytes, 0, &ra.view, &ha),
                VQKV_OK);
    assert_vqkv(vqkv_register_memfd_region(b, mb, rb.fd, rb.view.region_bytes, 0, &rb.view, &hb),
                VQKV_OK);
    assert_true(ha != 0 && hb != 0);

    /* 3 full blocks and a partial tail. */
    uint32_t tokens[NBLOCKS * TOKENS + 5];
    for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; i++)
        tokens[i] = (uint32_t)(1000 + i * 7);
    uint8_t keys_a[4][VQKV_KEY_BYTES], keys_b[4][VQKV_KEY_BYTES];
    size_t na = 0, nb = 0;
    size_t n_tokens = sizeof tokens / sizeof tokens[0];
    assert_vqkv(vqkv_model_block_keys(ma, NULL, tokens, n_tokens, NULL, 0, keys_a, 4, &na),
                VQKV_OK);
    assert_vqkv(vqkv_model_block_keys(mb, NULL, tokens, n_tokens, NULL, 0, keys_b, 4, &nb),
                VQKV_OK);
    assert_int_equal(na, NBLOCKS);
    assert_int_equal(nb, NBLOCKS);
    /* Same tenant, model and codec: same keys on both connections. */
    assert_memory_equal(keys_a, keys_b, sizeof keys_a[0] * NBLOCKS);
    /* A continuation from block 0 gives blocks 1 and 2. */
    uint8_t tail[4][VQKV_KEY_BYTES];
    size_t nt = 0;
    assert_vqkv(vqkv_model_block_keys(ma, keys_a[0], tokens + TOKENS, n_tokens - TOKENS, NULL, 0,
                                      tail, 4, &nt),
                VQKV_OK);
    assert_int_equal(nt, 2);
    assert_memory_equal(tail, keys_a[1], sizeof tail[0] * 2);
    /* Too small an array is refused. */
    assert_vqkv(vqkv_model_block_keys(ma, NULL, tokens, n_tokens, NULL, 0, tail, 2, &nt),
                VQKV_EINVAL);

    const uint32_t put_slots[NBLOCKS] = {5, 1, 3};
    vqkv_put_status_t st[NBLOCKS];
    assert_vqkv(vqkv_put(a, ma, ha, keys_a, NULL, put_slots, NBLOCKS, st), NBLOCKS);
    for (int i = 0; i < NBLOCKS; i++)
        assert_int_equal(st[i], VQKV_PUT_STORED);
    /* Again: all present, nothing stored (explicit parents this time). */
    uint8_t parents[NBLOCKS][VQKV_KEY_BYTES] = {{0}};
    memcpy(parents[1], keys_a[0], VQKV_KEY_BYTES);
    memcpy(parents[2], keys_a[1], VQKV_KEY_BYTES);
    assert_vqkv(vqkv_put(a, ma, ha, keys_a, parents, put_slots, NBLOCKS, st), 0);
    for (int i = 0; i < NBLOCKS; i++)
        assert_int_equal(st[i], VQKV_PUT_PRESENT);

    size_t found = 99;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(b, mb, keys_b, NBLOCKS, &found, &lease), VQKV_OK);
    assert_int_equal(found, NBLOCKS);
    assert_true(lease != 0);
    const uint32_t get_slots[NBLOCKS] = {0, 7, 2};
    assert_vqkv(vqkv_get(b, lease, hb, get_slots, NBLOCKS), NBLOCKS);
    for (int i = 0; i < NBLOCKS; i++)
        assert_block_equal(&rb, get_slots[i], &ra, put_slots[i]);
    assert_vqkv(vqkv_release(b, lease), VQKV_OK);
    /* The lease is gone: a get on it fails with the daemon's code and message. */
    assert_vqkv(vqkv_get(b, lease, hb, get_slots, NBLOCKS), VQKV_ELEASE);
    assert_true(strlen(vqkv_last_error(b)) > 0);
    assert_vqkv(vqkv_release(b, 0), VQKV_OK);

    /* Pins: counts of blocks pinned and unpinned; keys not held are skipped. */
    uint8_t pin_keys[NBLOCKS + 1][VQKV_KEY_BYTES];
    memcpy(pin_keys, keys_b, NBLOCKS * VQKV_KEY_BYTES);
    memset(pin_keys[NBLOCKS], 0xee, VQKV_KEY_BYTES);
    size_t count = 99;
    assert_vqkv(vqkv_pin(b, mb, pin_keys, NBLOCKS + 1, 0, &count), VQKV_OK);
    assert_int_equal(count, NBLOCKS);
    assert_vqkv(vqkv_pin(a, ma, pin_keys, 1, 60000, NULL), VQKV_OK);
    assert_vqkv(vqkv_unpin(b, mb, pin_keys, NBLOCKS + 1, &count), VQKV_OK);
    assert_int_equal(count, NBLOCKS);
    assert_vqkv(vqkv_unpin(b, mb, pin_keys, NBLOCKS, &count), VQKV_OK);
    assert_int_equal(count, 0);
    assert_vqkv(vqkv_pin(b, NULL, pin_keys, 1, 0, &count), VQKV_EINVAL);

    vqkv_stats_t stats;
    assert_vqkv(vqkv_stats(a, &stats), VQKV_OK);
    assert_int_equal(stats.blocks, NBLOCKS);
    assert_int_equal(stats.hits, NBLOCKS);
    assert_true(stats.bytes_stored > 0);
    assert_true(stats.clients >= 2);

    char out[4096];
    const char *args[] = {"--socket", d->path, "stats", "--json", NULL};
    assert_int_equal(run_ctl(args, out, sizeof out), 0);
    struct json_object *o = json_tokener_parse(out);
    if (o == NULL)
        fail_msg("vqkvctl stats --json printed no JSON: %s", out);
    const char *fields[] = {"blocks",    "bytes_stored", "bytes_logical", "hits",
                            "evictions", "misses",       "clients"};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        struct json_object *f;
        if (!json_object_object_get_ex(o, fields[i], &f))
            fail_msg("no \"%s\" in %s", fields[i], out);
    }
    struct json_object *blocks;
    assert_true(json_object_object_get_ex(o, "blocks", &blocks));
    assert_int_equal(json_object_get_int64(blocks), NBLOCKS);
    json_object_put(o);
    const char *table[] = {"--socket", d->path, "stats", NULL};
    assert_int_equal(run_ctl(table, out, sizeof out), 0);
    assert_non_null(strstr(out, "blocks"));

    vqkv_close(a);
    vqkv_close(b);
    region_free(&ra);
    region_free(&rb);
}

/* Refused requests return the daemon's negative code and keep its message;
 * the connection goes on working. */
static void test_errors(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "errors");
    vqkv_model_t *m = NULL;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "nonsense-codec:q=1", &m), VQKV_ESPEC);
    assert_null(m);
    if (strstr(vqkv_last_error(c), "nonsense-codec:q=1") == NULL)
        fail_msg("\"%s\" does not name the spec", vqkv_last_error(c));

    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", &m), VQKV_OK);
    assert_string_equal(vqkv_last_error(c), "");
    region_t r;
    region_new(&r, 3);
    vqkv_region_t h;
    /* A view larger than the memfd. */
    assert_vqkv(vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes / 2, 0, &r.view, &h),
                VQKV_ERANGE);
    assert_true(strlen(vqkv_last_error(c)) > 0);
    assert_vqkv(vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes, 0, &r.view, &h),
                VQKV_OK);
    uint8_t key[1][VQKV_KEY_BYTES] = {{1, 2, 3}};
    const uint32_t bad_slot = SLOTS;
    assert_vqkv(vqkv_put(c, m, h, key, NULL, &bad_slot, 1, NULL), VQKV_ERANGE);
    assert_vqkv(vqkv_put(c, m, h + 100, key, NULL, &bad_slot, 1, NULL), VQKV_EHANDLE);
    /* Still usable; a miss leases nothing. */
    size_t found = 99;
    vqkv_lease_t lease = 99;
    assert_vqkv(vqkv_lookup(c, m, key, 1, &found, &lease), VQKV_OK);
    assert_int_equal(found, 0);
    assert_int_equal(lease, 0);
    vqkv_close(c);
    region_free(&r);

    /* No daemon there. */
    char missing[128];
    snprintf(missing, sizeof missing, "%s/none.sock", d->dir);
    vqkv_client_t *none = (vqkv_client_t *)1;
    assert_vqkv(vqkv_connect(missing, "x", TIMEOUT_MS, &none), VQKV_EIO);
    assert_null(none);
    assert_vqkv(vqkv_connect(d->path, "x", 0, &none), VQKV_EINVAL);
    vqkv_close(NULL);
}

static void test_health(void **state)
{
    daemon_t *d = *state;
    char out[1024];
    const char *ok[] = {"--socket", d->path, "health", NULL};
    assert_int_equal(run_ctl(ok, out, sizeof out), 0);
    char missing[128];
    snprintf(missing, sizeof missing, "%s/none.sock", d->dir);
    const char *bad[] = {"--socket", missing, "health", NULL};
    assert_int_not_equal(run_ctl(bad, out, sizeof out), 0);
    const char *bad_stats[] = {"--socket", missing, "stats", "--json", NULL};
    assert_int_not_equal(run_ctl(bad_stats, out, sizeof out), 0);
    const char *unknown[] = {"--socket", d->path, "frobnicate", NULL};
    assert_int_equal(run_ctl(unknown, out, sizeof out), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_lookup_get, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_health, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
