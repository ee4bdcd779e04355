/* test_vqkv_bench.c -- smoke test of vqkv-benchmark (ctest label bench):
 * the binary against a test daemon, in both modes, briefly. It checks what
 * the benchmark reports, never how fast anything was: a serving run with
 * 2 clients for 1 second must exit 0 and write JSON with every key
 * serve.sh reads, every lookup of a pinned prefix must hit, and a capacity
 * fill of a small pool must stop at its first eviction with the
 * tokens-per-GiB figure its own counts give. Every run's stderr is
 * captured: into a pipe it must hold no progress line (no '\r'), and a
 * capacity fill on a pseudo-terminal must draw one, with blocks/s and an
 * ETA, and erase it before the table.
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
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "capture.h"
#include "daemon_harness.h"

/* Runs vqkv-benchmark with args (NULL-terminated), its stderr into err[len]
 * through a pipe or, with tty, a pseudo-terminal (capture.h), and copied to
 * ours for the test's log; its exit status. */
static int run_bench_captured(const char *const *args, bool tty, char *err, size_t len)
{
    const char *argv[24] = {VQKV_BENCHMARK_PATH};
    size_t n = 1;
    for (size_t i = 0; args[i] != NULL && n < 23; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    int rc = capture_run(argv, tty, err, len);
    if (!tty)
        fputs(err, stderr);
    return rc;
}

/* run_bench_captured through a pipe, as under ctest or in a CI log: no
 * progress line may be written there. */
static int run_bench(const char *const *args)
{
    char err[8192];
    int rc = run_bench_captured(args, false, err, sizeof err);
    capture_assert_no_progress("vqkv-benchmark", err);
    return rc;
}

static json_object *field(json_object *obj, const char *key)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(obj, key, &v))
        fail_msg("the benchmark's JSON has no \"%s\"", key);
    return v;
}

static void test_serve_json(void **state)
{
    daemon_t *d = *state;
    char json_path[128];
    snprintf(json_path, sizeof json_path, "%s/serve.json", d->dir);
    const char *args[] = {"--socket", d->path,      "--clients", "2",      "--seconds",
                          "1",        "--prefixes", "4",         "--json", json_path,
                          "--codec",  "fp8",        NULL};
    assert_int_equal(run_bench(args), 0);

    json_object *obj = json_object_from_file(json_path);
    assert_non_null(obj);
    unlink(json_path);
    static const char *numbers[] = {"lookups_per_s", "gets_per_s",    "get_gbps",      "p50_us",
                                    "p99_us",        "lookup_p50_us", "lookup_p99_us", "get_p50_us",
                                    "get_p99_us",    "hit_rate",      "seconds"};
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        json_object *v = field(obj, numbers[i]);
        assert_true(json_object_is_type(v, json_type_double) ||
                    json_object_is_type(v, json_type_int));
        assert_true(json_object_get_double(v) >= 0.0);
    }
    assert_int_equal(json_object_get_int(field(obj, "clients")), 2);
    assert_int_equal(json_object_get_int(field(obj, "blocks_per_get")), 4);
    assert_true(strncmp(json_object_get_string(field(obj, "codec")), "fp8", 3) == 0);
    /* The setup pinned every prefix the clients look up: all of them hit,
     * and every lookup was followed by a get. */
    int64_t lookups = json_object_get_int64(field(obj, "lookups"));
    assert_true(lookups >= 2);
    assert_int_equal(json_object_get_int64(field(obj, "gets")), lookups);
    assert_true(json_object_get_double(field(obj, "hit_rate")) == 1.0);
    json_object_put(obj);
}

static int setup_capacity(void **state)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    const char *extra[] = {"--pool-bytes", "8M", NULL};
    daemon_start(d, extra);
    return 0;
}

static void test_capacity_json(void **state)
{
    daemon_t *d = *state;
    char json_path[128];
    snprintf(json_path, sizeof json_path, "%s/capacity.json", d->dir);
    const char *args[] = {"--socket", d->path,  "--capacity", "--codec",
                          "fp16",     "--json", json_path,    NULL};
    assert_int_equal(run_bench(args), 0);

    json_object *obj = json_object_from_file(json_path);
    assert_non_null(obj);
    unlink(json_path);
    int64_t blocks = json_object_get_int64(field(obj, "blocks_held"));
    int64_t pool = json_object_get_int64(field(obj, "pool_bytes"));
    int64_t block_bytes = json_object_get_int64(field(obj, "block_bytes"));
    int64_t stored = json_object_get_int64(field(obj, "bytes_stored"));
    assert_int_equal(pool, 8 << 20);
    /* SmolLM2's f16 block: 30 layers x K,V x 16 tokens x 3 heads x 64 x 2 B. */
    assert_int_equal(block_bytes, 368640);
    assert_true(blocks > 0);
    assert_int_equal(stored, blocks * block_bytes);
    assert_true(stored <= pool);
    double want = (double)blocks * 16.0 / ((double)pool / (double)(1 << 30));
    double got = json_object_get_double(field(obj, "tokens_per_gib"));
    assert_true(got > want - 0.1 && got < want + 0.1);
    json_object_put(obj);
    /* A daemon that holds blocks cannot be measured again. */
    assert_int_equal(run_bench(args), 1);
}

/* On a terminal the fill draws its progress line and erases it; the run's
 * figures are the same as through a pipe. */
static void test_capacity_progress_on_tty(void **state)
{
    daemon_t *d = *state;
    char json_path[128];
    snprintf(json_path, sizeof json_path, "%s/capacity-tty.json", d->dir);
    const char *args[] = {"--socket", d->path,  "--capacity", "--codec",
                          "fp16",     "--json", json_path,    NULL};
    static char err[1 << 16];
    assert_int_equal(run_bench_captured(args, true, err, sizeof err), 0);
    static const char *const words[] = {"filling: ", " blocks, pool ", "% full, ", " blocks/s",
                                        NULL};
    capture_assert_progress("vqkv-benchmark --capacity", err, words);
    json_object *obj = json_object_from_file(json_path);
    assert_non_null(obj);
    unlink(json_path);
    assert_true(json_object_get_int64(field(obj, "blocks_held")) > 0);
    json_object_put(obj);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_serve_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_capacity_json, setup_capacity, teardown),
        cmocka_unit_test_setup_teardown(test_capacity_progress_on_tty, setup_capacity, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
