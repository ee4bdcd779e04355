/* test_libvqkv.c -- libvqkv (client/vqkv.h) against the vqkvd binary, and
 * vqkvctl's stats and health subcommands. The daemon runs on a socket in a
 * fresh temporary directory and is stopped with SIGTERM; exit status 0 is
 * required (under ASan a daemon leak fails the test). Apart from starting
 * the processes, everything goes through libvqkv's public API.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
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

#include "libvqkv_harness.h"
#include "vqkv.h"
#include "vqkv_codec.h"

#define TIMEOUT_MS 5000

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

/* A vLLM-layout region of slots slots of layout l, zeroed. */
static void region_make(region_t *r, const vqkv_layout_t *l, uint32_t slots)
{
    vqkv_kv_view_vllm(&r->view, l, slots);
    assert_vqkv(vqkv_memfd_create("test_libvqkv", r->view.region_bytes, &r->fd), VQKV_OK);
    r->base = mmap(NULL, r->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    assert_true(r->base != MAP_FAILED);
}

static void region_new(region_t *r, unsigned seed)
{
    region_make(r, &layout, SLOTS);
    srand(seed);
    uint16_t *v = (uint16_t *)r->base;
    for (size_t i = 0; i < r->view.region_bytes / 2; i++) {
        float x = (float)rand() / (float)RAND_MAX * 4.0f - 2.0f;
        vqkv_dtype_from_f32(VQKV_DTYPE_F16, &x, 1, &v[i]);
    }
}

/* Registers the whole of region r for model m on c: its handle. */
static vqkv_region_t region_register(vqkv_client_t *c, const vqkv_model_t *m, const region_t *r)
{
    vqkv_region_t h = 0;
    assert_vqkv(vqkv_register_memfd_region(c, m, r->fd, r->view.region_bytes, 0, &r->view, &h),
                VQKV_OK);
    return h;
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

/* A client with the fp16 model and two regions, seeded `seed` and seed + 1,
 * registered: the setup of the tests that put from one region and get
 * into the other. */
static vqkv_client_t *connect_with_regions(const daemon_t *d, const char *name, unsigned seed,
                                           vqkv_model_t **m, region_t *a, region_t *b,
                                           vqkv_region_t *ha, vqkv_region_t *hb)
{
    vqkv_client_t *c = connect_ok(d, name);
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", m), VQKV_OK);
    region_new(a, seed);
    region_new(b, seed + 1);
    *ha = region_register(c, *m, a);
    *hb = region_register(c, *m, b);
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
    vqkv_region_t ha = region_register(a, ma, &ra);
    vqkv_region_t hb = region_register(b, mb, &rb);
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
    assert_non_null(strstr(out, "hit rate    100.0%"));
    assert_non_null(strstr(out, "KiB stored"));
    /* --socket after the command, and --version. */
    const char *after[] = {"stats", "--socket", d->path, NULL};
    char again[4096];
    assert_int_equal(run_ctl(after, again, sizeof again), 0);
    assert_non_null(strstr(again, "hit rate"));
    const char *version[] = {"--version", NULL};
    assert_int_equal(run_ctl(version, again, sizeof again), 0);
    assert_string_equal(again, "vqkvctl " VQKV_VERSION "\n");

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
    /* The same id otherwise: the message names the field that differs. */
    vqkv_layout_t other = layout;
    other.dtype = VQKV_DTYPE_BF16;
    vqkv_model_t *m2 = NULL;
    assert_vqkv(vqkv_register_model(c, MODEL, &other, "fp16", &m2), VQKV_EMISMATCH);
    if (strstr(vqkv_last_error(c), "dtype bf16, registered f16") == NULL)
        fail_msg("\"%s\" does not name the dtype", vqkv_last_error(c));
    other = layout;
    other.block_tokens *= 2;
    assert_vqkv(vqkv_register_model(c, MODEL, &other, "fp16", &m2), VQKV_EMISMATCH);
    if (strstr(vqkv_last_error(c), "block_tokens") == NULL)
        fail_msg("\"%s\" does not name block_tokens", vqkv_last_error(c));
    region_t r;
    region_new(&r, 3);
    vqkv_region_t h;
    /* A view larger than the memfd. */
    assert_vqkv(vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes / 2, 0, &r.view, &h),
                VQKV_ERANGE);
    assert_true(strlen(vqkv_last_error(c)) > 0);
    h = region_register(c, m, &r);
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

/* ---- codebooks -------------------------------------------------------------- */

/* Small codebooks (16 entries) train in a blink; 64 tokens are 4 blocks. */
#define VQ_SPEC "rvq:d=8,b=4,r=1"
#define CALIB_BLOCKS 4
#define CALIB_TOKENS_ARG "64"

/* The keys of n blocks of tokens chained from `first` on, and the slots
 * first_slot.. that hold them. */
static void chain_keys(const vqkv_model_t *m, uint32_t first, uint8_t (*keys)[VQKV_KEY_BYTES],
                       uint32_t first_slot, uint32_t *slots, size_t n)
{
    uint32_t tokens[CALIB_BLOCKS * TOKENS];
    assert_true(n <= CALIB_BLOCKS);
    for (size_t i = 0; i < n; i++)
        slots[i] = first_slot + (uint32_t)i;
    for (size_t i = 0; i < n * TOKENS; i++)
        tokens[i] = first + (uint32_t)i;
    size_t got = 0;
    assert_vqkv(vqkv_model_block_keys(m, NULL, tokens, n * TOKENS, NULL, 0, keys, n, &got),
                VQKV_OK);
    assert_int_equal(got, n);
}

/* Puts n blocks from slots first.. of region h, all stored. */
static void put_chain(vqkv_client_t *c, const vqkv_model_t *m, vqkv_region_t h,
                      uint32_t first_token, uint32_t first_slot, size_t n)
{
    uint8_t keys[CALIB_BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[CALIB_BLOCKS];
    chain_keys(m, first_token, keys, first_slot, slots, n);
    assert_vqkv(vqkv_put(c, m, h, keys, NULL, slots, n, NULL), (int)n);
}

/* Looks the chain up and gets all n blocks into slots first.. of h. */
static void get_chain(vqkv_client_t *c, const vqkv_model_t *m, vqkv_region_t h,
                      uint32_t first_token, uint32_t first_slot, size_t n)
{
    uint8_t keys[CALIB_BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[CALIB_BLOCKS];
    chain_keys(m, first_token, keys, first_slot, slots, n);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, n, &found, &lease), VQKV_OK);
    assert_int_equal(found, n);
    assert_vqkv(vqkv_get(c, lease, h, slots, n), (int)n);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
}

/* A region_t over malloc'd memory holding what codec makes of slots
 * [first, first + n) of src: the bytes a Get through the daemon must write. */
static void region_expected(region_t *want, const vqkv_codec_t *codec, const region_t *src,
                            uint32_t first, size_t n)
{
    want->fd = -1;
    want->view = src->view;
    want->base = malloc(src->view.region_bytes);
    assert_non_null(want->base);
    memcpy(want->base, src->base, src->view.region_bytes);
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    assert_non_null(block);
    for (uint32_t s = first; s < first + n; s++) {
        assert_vqkv(vqkv_codec_encode(codec, src->base, &src->view, s, block), VQKV_OK);
        assert_vqkv(vqkv_codec_decode(codec, block, want->base, &want->view, s), VQKV_OK);
    }
    free(block);
}

/* spec's codec with codebooks trained on slots [0, n_slots) of r, as
 * vqkvd trains on the blocks it keeps as samples. */
static vqkv_codec_t *train_codec(const char *spec, const region_t *r, uint32_t n_slots,
                                 const vqkv_train_opts_t *opts)
{
    vqkv_codec_t *codec = NULL;
    assert_vqkv(vqkv_codec_create(spec, &layout, &codec), VQKV_OK);
    size_t part = (size_t)TOKENS * HEADS * DIM;
    float *x = malloc(n_slots * part * sizeof *x);
    assert_non_null(x);
    for (uint32_t l = 0; l < LAYERS; l++)
        for (int kv = 0; kv < 2; kv++) {
            for (uint32_t s = 0; s < n_slots; s++)
                vqkv_dtype_to_f32(VQKV_DTYPE_F16,
                                  r->base + l * r->view.layer_stride + kv * r->view.kv_stride +
                                      s * r->view.slot_stride,
                                  part, x + s * part);
            assert_vqkv(vqkv_codec_train(codec, l, kv, x, n_slots * part / DIM, opts), VQKV_OK);
        }
    free(x);
    return codec;
}

/* Trains spec's codebooks on every slot of r (seeded) and saves them to path. */
static void train_file(const char *spec, const region_t *r, uint64_t seed, const char *path)
{
    vqkv_train_opts_t opts = {.seed = seed, .threads = 1};
    vqkv_codec_t *codec = train_codec(spec, r, SLOTS, &opts);
    assert_vqkv(vqkv_codebook_save(codec, path), VQKV_OK);
    vqkv_codec_free(codec);
}

/* The one codebook file vqkvd saved under state_dir into path. */
static void saved_codebook(const char *state_dir, char *path, size_t size)
{
    char dir[256];
    snprintf(dir, sizeof dir, "%s/codebooks", state_dir);
    DIR *dp = opendir(dir);
    if (dp == NULL)
        fail_msg("vqkvd saved nothing under %s", state_dir);
    int found = 0;
    for (struct dirent *e; (e = readdir(dp)) != NULL;) {
        size_t len = strlen(e->d_name);
        if (len > 5 && strcmp(e->d_name + len - 5, ".vqcb") == 0) {
            snprintf(path, size, "%s/%s", dir, e->d_name);
            found++;
        } else {
            assert_true(e->d_name[0] == '.'); /* no temporary file left */
        }
    }
    closedir(dp);
    assert_int_equal(found, 1);
}

/* Removes a daemon's state dir holding the one codebook file at path. */
static void state_dir_remove(const char *state_dir, const char *path)
{
    assert_int_equal(unlink(path), 0);
    char dir[512];
    snprintf(dir, sizeof dir, "%s/codebooks", state_dir);
    assert_int_equal(rmdir(dir), 0);
    snprintf(dir, sizeof dir, "%s/salt-secret", state_dir);
    assert_int_equal(unlink(dir), 0);
    assert_int_equal(rmdir(state_dir), 0);
}

/* Polls stats until the daemon stores `bytes` (or fails at the deadline). */
static void wait_bytes_stored(vqkv_client_t *c, uint64_t bytes)
{
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    vqkv_stats_t st;
    for (;;) {
        assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
        if (st.bytes_stored == bytes)
            return;
        if (now_ms() > deadline)
            fail_msg("%llu bytes stored, not %llu", (unsigned long long)st.bytes_stored,
                     (unsigned long long)bytes);
        sleep_ms(10);
    }
}

/* A VQ model without codebooks stores fp16 until CALIB_BLOCKS are in,
 * trains, switches, saves; a restarted daemon loads the saved codebooks.
 * vqkvd trains through the generic codec interface, so every VQ codec
 * (spec) takes this path unchanged. */
static void online_calibration(const char *spec)
{
    char state_dir[] = "/tmp/vqkvd-state.XXXXXX";
    assert_non_null(mkdtemp(state_dir));
    const char *extra[] = {"--state-dir", state_dir, "--calibration-tokens", CALIB_TOKENS_ARG,
                           NULL};
    daemon_t d;
    daemon_start(&d, extra);
    vqkv_client_t *c = connect_ok(&d, "calibration");
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, spec, &m), VQKV_OK);
    assert_false(vqkv_model_codebooks_ready(m));
    region_t ra, rb;
    region_new(&ra, 21);
    region_new(&rb, 22);
    vqkv_region_t ha = region_register(c, m, &ra);
    vqkv_region_t hb = region_register(c, m, &rb);

    /* Before the codebooks: fp16, so the round trip is exact. */
    uint64_t fp16_bytes = 2u * LAYERS * TOKENS * HEADS * DIM * 2;
    put_chain(c, m, ha, 100, 0, CALIB_BLOCKS);
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_int_equal(st.bytes_stored, CALIB_BLOCKS * fp16_bytes);

    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (!vqkv_model_codebooks_ready(m)) {
        if (now_ms() > deadline)
            fail_msg("codebooks not trained after %d blocks", CALIB_BLOCKS);
        sleep_ms(10);
        assert_vqkv(vqkv_register_model(c, MODEL, &layout, spec, &m), VQKV_OK);
    }
    char path[512];
    saved_codebook(state_dir, path, sizeof path);
    vqkv_codec_t *codec = NULL;
    assert_vqkv(vqkv_codec_create(vqkv_model_codec(m), &layout, &codec), VQKV_OK);
    assert_vqkv(vqkv_codebook_load(codec, path), VQKV_OK);

    /* After: the VQ codec's bytes, and its decode exactly; and the blocks
     * stored in fp16 meanwhile are re-encoded in the background, to the
     * very bytes a put now would store (the fallback was exact). */
    put_chain(c, m, ha, 500, 4, CALIB_BLOCKS);
    wait_bytes_stored(c, 2 * CALIB_BLOCKS * (uint64_t)vqkv_model_block_bytes(m));
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_int_equal(st.blocks, 2 * CALIB_BLOCKS);
    region_t want;
    region_expected(&want, codec, &ra, 0, SLOTS);
    assert_memory_not_equal(want.base + 4 * ra.view.slot_stride, ra.base + 4 * ra.view.slot_stride,
                            ra.view.slot_stride);
    get_chain(c, m, hb, 100, 0, CALIB_BLOCKS);
    get_chain(c, m, hb, 500, 4, CALIB_BLOCKS);
    for (uint32_t s = 0; s < SLOTS; s++)
        assert_block_equal(&rb, s, &want, s);
    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);

    /* A new daemon on the same state dir: ready at once, same codebooks. */
    daemon_start(&d, extra);
    c = connect_ok(&d, "after restart");
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, spec, &m), VQKV_OK);
    assert_true(vqkv_model_codebooks_ready(m));
    ha = region_register(c, m, &ra);
    hb = region_register(c, m, &rb);
    put_chain(c, m, ha, 900, 4, CALIB_BLOCKS);
    memset(rb.base, 0, rb.view.region_bytes);
    get_chain(c, m, hb, 900, 4, CALIB_BLOCKS);
    for (uint32_t s = 4; s < 4 + CALIB_BLOCKS; s++)
        assert_block_equal(&rb, s, &want, s);
    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);

    free(want.base);
    vqkv_codec_free(codec);
    region_free(&ra);
    region_free(&rb);
    state_dir_remove(state_dir, path);
}

static void test_online_calibration(void **state)
{
    (void)state;
    online_calibration(VQ_SPEC);
}

static void test_online_calibration_commvq(void **state)
{
    (void)state;
    online_calibration("commvq:d=8,b=4,r=1");
}

/* The block bytes codec a and codec b make of slot of r are the same. */
static bool codecs_encode_alike(const vqkv_codec_t *a, const vqkv_codec_t *b, const region_t *r,
                                uint32_t slot)
{
    size_t n = vqkv_codec_block_bytes(a);
    uint8_t *ba = malloc(n), *bb = malloc(n);
    assert_true(ba && bb && vqkv_codec_block_bytes(b) == n);
    assert_vqkv(vqkv_codec_encode(a, r->base, &r->view, slot, ba), VQKV_OK);
    assert_vqkv(vqkv_codec_encode(b, r->base, &r->view, slot, bb), VQKV_OK);
    bool alike = memcmp(ba, bb, n) == 0;
    free(ba);
    free(bb);
    return alike;
}

/* A model registered with its RoPE trains on keys turned through offsets
 * below --calibration-positions: the daemon's codebooks are the library's
 * trained with those options on the same blocks, not the ones trained on
 * the keys as they came. A bad RoPE is refused by the library before
 * anything is sent; another RoPE for the model by the daemon. */
static void test_online_calibration_rope(void **state)
{
    (void)state;
    char state_dir[] = "/tmp/vqkvd-state.XXXXXX";
    assert_non_null(mkdtemp(state_dir));
    const char *extra[] = {"--state-dir",
                           state_dir,
                           "--calibration-tokens",
                           CALIB_TOKENS_ARG,
                           "--calibration-positions",
                           "4096",
                           NULL};
    daemon_t d;
    daemon_start(&d, extra);
    vqkv_client_t *c = connect_ok(&d, "rope");
    const vqkv_rope_t rope = {10000.0, VQKV_ROPE_NEOX}, other = {500000.0, VQKV_ROPE_NEOX},
                      bad[] = {{1.0, VQKV_ROPE_NEOX}, {NAN, VQKV_ROPE_NEOX}, {1e4, 2}};
    vqkv_model_t *m;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_vqkv(vqkv_register_model_rope(c, MODEL, &layout, VQ_SPEC, NULL, &bad[i], &m),
                    VQKV_EINVAL);
        assert_non_null(strstr(vqkv_last_error(c), "register_model: RoPE")); /* the library's */
    }
    assert_vqkv(vqkv_register_model_rope(c, MODEL, &layout, VQ_SPEC, NULL, &rope, &m), VQKV_OK);
    assert_vqkv(vqkv_register_model_rope(c, MODEL, &layout, VQ_SPEC, NULL, &other, &m),
                VQKV_EMISMATCH);
    assert_non_null(strstr(vqkv_last_error(c), "RoPE base 10000"));
    /* Naming none, or the same, is the same model. */
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, VQ_SPEC, &m), VQKV_OK);
    region_t r;
    region_new(&r, 23);
    vqkv_region_t h = region_register(c, m, &r);
    /* One block a put, so the daemon keeps its samples in slot order, as
     * train_codec reads them (the blocks of one put may finish in any). */
    for (uint32_t s = 0; s < CALIB_BLOCKS; s++)
        put_chain(c, m, h, 100 + s * TOKENS, s, 1);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (!vqkv_model_codebooks_ready(m)) {
        if (now_ms() > deadline)
            fail_msg("codebooks not trained after %d blocks", CALIB_BLOCKS);
        sleep_ms(10);
        assert_vqkv(vqkv_register_model_rope(c, MODEL, &layout, VQ_SPEC, NULL, &rope, &m), VQKV_OK);
    }
    char path[512];
    saved_codebook(state_dir, path, sizeof path);
    vqkv_codec_t *daemons = NULL;
    assert_vqkv(vqkv_codec_create(vqkv_model_codec(m), &layout, &daemons), VQKV_OK);
    assert_vqkv(vqkv_codebook_load(daemons, path), VQKV_OK);
    vqkv_train_opts_t opts = {.seed = 1, .rope_positions = 4096, .rope = rope};
    vqkv_codec_t *turned = train_codec(VQ_SPEC, &r, CALIB_BLOCKS, &opts);
    opts.rope_positions = 0;
    vqkv_codec_t *as_came = train_codec(VQ_SPEC, &r, CALIB_BLOCKS, &opts);
    for (uint32_t s = CALIB_BLOCKS; s < SLOTS; s++) {
        assert_true(codecs_encode_alike(daemons, turned, &r, s));
        assert_false(codecs_encode_alike(daemons, as_came, &r, s));
    }
    vqkv_codec_free(daemons);
    vqkv_codec_free(turned);
    vqkv_codec_free(as_came);
    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);
    region_free(&r);
    state_dir_remove(state_dir, path);
}

/* Codebook files sent with RegisterModel: used at once; others for a model
 * that has codebooks, other codecs' files and garbage are refused. */
static void test_codebook_files(void **state)
{
    daemon_t *d = *state;
    region_t r;
    region_new(&r, 31);
    char cb1[128], cb2[128], other[128], junk[128];
    snprintf(cb1, sizeof cb1, "%s/one.vqcb", d->dir);
    snprintf(cb2, sizeof cb2, "%s/two.vqcb", d->dir);
    snprintf(other, sizeof other, "%s/other.vqcb", d->dir);
    snprintf(junk, sizeof junk, "%s/junk.vqcb", d->dir);
    train_file(VQ_SPEC, &r, 1, cb1);
    train_file(VQ_SPEC, &r, 2, cb2);
    train_file("rvq:d=8,b=4,r=2", &r, 1, other);
    FILE *f = fopen(junk, "w");
    assert_non_null(f);
    fputs("not a codebook file", f);
    fclose(f);

    vqkv_client_t *c = connect_ok(d, "codebooks");
    vqkv_model_t *m = NULL;
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, junk, &m), VQKV_EFORMAT);
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, other, &m),
                VQKV_EMISMATCH);
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, "fp16", cb1, &m), VQKV_EINVAL);
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, d->dir, &m), VQKV_EINVAL);
    strcat(junk, ".missing");
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, junk, &m), VQKV_EINVAL);

    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, cb1, &m), VQKV_OK);
    assert_true(vqkv_model_codebooks_ready(m));
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, cb1, &m), VQKV_OK);
    vqkv_model_t *refused = m;
    assert_vqkv(vqkv_register_model_codebook(c, MODEL, &layout, VQ_SPEC, cb2, &refused),
                VQKV_EMISMATCH);
    assert_null(refused);
    if (strstr(vqkv_last_error(c), "other codebooks") == NULL)
        fail_msg("\"%s\" does not say why", vqkv_last_error(c));

    vqkv_codec_t *codec = NULL;
    assert_vqkv(vqkv_codec_create(VQ_SPEC, &layout, &codec), VQKV_OK);
    assert_vqkv(vqkv_codebook_load(codec, cb1), VQKV_OK);
    region_t want;
    region_expected(&want, codec, &r, 0, 2);
    vqkv_region_t h = region_register(c, m, &r);
    put_chain(c, m, h, 7, 0, 2);
    get_chain(c, m, h, 7, 2, 2);
    for (uint32_t s = 0; s < 2; s++)
        assert_block_equal(&r, 2 + s, &want, s);

    vqkv_close(c);
    free(want.base);
    vqkv_codec_free(codec);
    region_free(&r);
    const char *files[] = {cb1, cb2, other};
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(unlink(files[i]), 0);
    junk[strlen(junk) - strlen(".missing")] = '\0';
    assert_int_equal(unlink(junk), 0);
}

/* ---- reconnecting ----------------------------------------------------------- */

/* A model registered with a RoPE is registered with it again when the
 * client reconnects: the restarted daemon knows that RoPE, so another
 * client naming a different one is refused as it was before the restart
 * (a daemon told nothing would take the other as the first named). */
static void test_reconnect_resends_rope(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "rope-reconnect");
    const vqkv_rope_t rope = {10000.0, VQKV_ROPE_NEOX}, other = {500000.0, VQKV_ROPE_NEOX};
    vqkv_model_t *m, *m_other;
    assert_vqkv(vqkv_register_model_rope(c, MODEL, &layout, VQ_SPEC, NULL, &rope, &m), VQKV_OK);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_int_equal(waitpid(d->pid, NULL, 0), d->pid);
    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK); /* reconnects, registering the model again */
    assert_int_equal(st.clients, 1);
    vqkv_client_t *c2 = connect_ok(d, "rope-other");
    assert_vqkv(vqkv_register_model_rope(c2, MODEL, &layout, VQ_SPEC, NULL, &other, &m_other),
                VQKV_EMISMATCH);
    assert_non_null(strstr(vqkv_last_error(c2), "RoPE base 10000"));
    assert_vqkv(vqkv_register_model_rope(c2, MODEL, &layout, VQ_SPEC, NULL, &rope, &m_other),
                VQKV_OK);
    vqkv_close(c2);
    vqkv_close(c);
}

/* The daemon dies (SIGKILL) under a client holding a model, a region and
 * a lease: the next call says so, the one after (no daemon yet) says it
 * could not reconnect, and once a daemon is back on the socket the client
 * works again with the same model and region handles; the old lease is
 * refused. */
static void test_reconnect(void **state)
{
    daemon_t *d = *state;
    vqkv_model_t *m;
    region_t ra, rb;
    vqkv_region_t ha, hb;
    vqkv_client_t *c = connect_with_regions(d, "reconnect", 41, &m, &ra, &rb, &ha, &hb);
    put_chain(c, m, ha, 10, 0, CALIB_BLOCKS);
    uint8_t keys[CALIB_BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[CALIB_BLOCKS];
    chain_keys(m, 10, keys, 0, slots, CALIB_BLOCKS);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, CALIB_BLOCKS, &found, &lease), VQKV_OK);
    assert_int_equal(found, CALIB_BLOCKS);
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_int_equal(st.regions, 2);
    assert_int_equal(st.leases, 1);

    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_int_equal(waitpid(d->pid, NULL, 0), d->pid);
    /* The lost connection is retried at once; nothing listens: the call
     * fails, and says the next one tries again. */
    assert_vqkv(vqkv_stats(c, &st), VQKV_EIO);
    if (strstr(vqkv_last_error(c), "reconnecting") == NULL ||
        strstr(vqkv_last_error(c), "the next call tries again") == NULL)
        fail_msg("\"%s\" does not say it is reconnecting", vqkv_last_error(c));
    assert_vqkv(vqkv_stats(c, &st), VQKV_EIO);
    if (strstr(vqkv_last_error(c), "reconnecting") == NULL ||
        strstr(vqkv_last_error(c), "the next call tries again") == NULL)
        fail_msg("\"%s\" does not say it is reconnecting", vqkv_last_error(c));

    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_int_equal(st.regions, 2);
    assert_int_equal(st.leases, 0);
    assert_int_equal(st.blocks, 0);
    assert_int_equal(st.clients, 1);
    /* Same model and region handles; keys computed again (a new daemon
     * may give the tenant a new salt). */
    put_chain(c, m, ha, 10, 0, CALIB_BLOCKS);
    chain_keys(m, 10, keys, 0, slots, CALIB_BLOCKS);
    vqkv_lease_t fresh = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, CALIB_BLOCKS, &found, &fresh), VQKV_OK);
    assert_int_equal(found, CALIB_BLOCKS);
    /* The old lease went with the old daemon, though the new one may have
     * given the fresh lease the same number. */
    assert_true(fresh != lease);
    assert_vqkv(vqkv_get(c, lease, hb, slots, CALIB_BLOCKS), VQKV_ELEASE);
    assert_vqkv(vqkv_release(c, lease), VQKV_ELEASE);
    memset(rb.base, 0, rb.view.region_bytes);
    assert_vqkv(vqkv_get(c, fresh, hb, slots, CALIB_BLOCKS), CALIB_BLOCKS);
    assert_vqkv(vqkv_release(c, fresh), VQKV_OK);
    for (uint32_t s = 0; s < CALIB_BLOCKS; s++)
        assert_block_equal(&rb, s, &ra, s);

    /* Restarted between two calls: the next idempotent call just works
     * (its first try meets the dead connection, the retry a new one); a
     * get names a lease of the old connection and is not retried. */
    assert_vqkv(vqkv_lookup(c, m, keys, CALIB_BLOCKS, &found, &fresh), VQKV_OK);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_int_equal(waitpid(d->pid, NULL, 0), d->pid);
    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    assert_vqkv(vqkv_get(c, fresh, hb, slots, CALIB_BLOCKS), VQKV_ECLOSED);
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK); /* connected again */
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_int_equal(waitpid(d->pid, NULL, 0), d->pid);
    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    chain_keys(m, 10, keys, 0, slots, CALIB_BLOCKS);
    assert_vqkv(vqkv_put(c, m, ha, keys, NULL, slots, CALIB_BLOCKS, NULL), CALIB_BLOCKS);
    /* A region number this client never had is refused here. */
    assert_vqkv(vqkv_put(c, m, ha + hb, keys, NULL, slots, 1, NULL), VQKV_EHANDLE);

    vqkv_close(c);
    region_free(&ra);
    region_free(&rb);
}

/* The default socket as a user other than root (fn runs as nobody):
 * $VQKV_SOCKET first, then the user's own socket only when one exists,
 * else the system service's. */
static int default_socket_as_user(const void *arg)
{
    const daemon_t *d = arg;
    char buf[108], xdg[128];
    setenv("VQKV_SOCKET", d->path, 1);
    if (vqkv_default_socket(buf, sizeof buf) != VQKV_OK || strcmp(buf, d->path) != 0)
        return 1;
    unsetenv("VQKV_SOCKET");
    unsetenv("XDG_RUNTIME_DIR");
    if (vqkv_default_socket(buf, sizeof buf) != VQKV_OK || strcmp(buf, "/run/vqkv/vqkv.sock") != 0)
        return 2;
    /* d->dir stands in for XDG_RUNTIME_DIR: no vqkv/vqkv.sock there. */
    setenv("XDG_RUNTIME_DIR", d->dir, 1);
    if (vqkv_default_socket(buf, sizeof buf) != VQKV_OK || strcmp(buf, "/run/vqkv/vqkv.sock") != 0)
        return 3;
    /* The parent made <dir>/xdg/vqkv/vqkv.sock a link to the daemon's socket. */
    snprintf(xdg, sizeof xdg, "%s/xdg", d->dir);
    setenv("XDG_RUNTIME_DIR", xdg, 1);
    snprintf(xdg, sizeof xdg, "%s/xdg/vqkv/vqkv.sock", d->dir);
    if (vqkv_default_socket(buf, sizeof buf) != VQKV_OK || strcmp(buf, xdg) != 0)
        return 4;
    if (vqkv_default_socket(buf, 8) != VQKV_EINVAL)
        return 5;
    return 0;
}

static void test_default_socket(void **state)
{
    daemon_t *d = *state;
    char buf[108];
    /* Root always gets the system service's socket unless told otherwise. */
    unsetenv("VQKV_SOCKET");
    assert_int_equal(vqkv_default_socket(buf, sizeof buf), VQKV_OK);
    if (geteuid() != 0) {
        fprintf(stderr, "test_default_socket: SKIPPED the non-root cases: needs root to run "
                        "them as another uid\n");
        skip();
    }
    assert_string_equal(buf, "/run/vqkv/vqkv.sock");
    char dir[128], link[160];
    snprintf(dir, sizeof dir, "%s/xdg", d->dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(dir, sizeof dir, "%s/xdg/vqkv", d->dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(link, sizeof link, "%s/vqkv.sock", dir);
    assert_int_equal(symlink(d->path, link), 0);
    daemon_open_to_all(d);
    assert_int_equal(run_as(65534, 65534, default_socket_as_user, d), 0);
    unlink(link);
    rmdir(dir);
    snprintf(dir, sizeof dir, "%s/xdg", d->dir);
    rmdir(dir);
}

/* A leased fp16 block keeps its slot while the others are re-encoded (a
 * get may be reading it), and is re-encoded once the lease ends. The lease
 * is taken before the put that completes the calibration window, so the
 * order is certain. */
static void test_reencode_waits_for_leases(void **state)
{
    (void)state;
    const char *extra[] = {"--calibration-tokens", CALIB_TOKENS_ARG, NULL};
    daemon_t d;
    daemon_start(&d, extra);
    vqkv_client_t *c = connect_ok(&d, "reencode");
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "rvq:d=8,b=4,r=1", &m), VQKV_OK);
    region_t ra, rb;
    region_new(&ra, 61);
    region_new(&rb, 62);
    vqkv_region_t ha = region_register(c, m, &ra);
    vqkv_region_t hb = region_register(c, m, &rb);
    uint8_t keys[CALIB_BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[CALIB_BLOCKS];
    chain_keys(m, 7, keys, 0, slots, CALIB_BLOCKS);
    size_t held = CALIB_BLOCKS - 1, found = 0;
    assert_vqkv(vqkv_put(c, m, ha, keys, NULL, slots, held, NULL), (int)held);
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, held, &found, &lease), VQKV_OK);
    assert_int_equal(found, held);
    uint8_t parent[1][VQKV_KEY_BYTES];
    memcpy(parent[0], keys[held - 1], VQKV_KEY_BYTES);
    assert_vqkv(vqkv_put(c, m, ha, &keys[held], parent, &slots[held], 1, NULL), 1);

    uint64_t fp16_bytes = 2u * LAYERS * TOKENS * HEADS * DIM * 2;
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (!vqkv_model_codebooks_ready(m)) {
        if (now_ms() > deadline)
            fail_msg("codebooks not trained");
        sleep_ms(10);
        assert_vqkv(vqkv_register_model(c, MODEL, &layout, "rvq:d=8,b=4,r=1", &m), VQKV_OK);
    }
    uint64_t vq_bytes = vqkv_model_block_bytes(m);
    wait_bytes_stored(c, held * fp16_bytes + vq_bytes); /* the unleased one moved */
    sleep_ms(300);                                      /* three ticks: the leased ones stay */
    wait_bytes_stored(c, held * fp16_bytes + vq_bytes);
    assert_vqkv(vqkv_get(c, lease, hb, slots, held), (int)held);
    for (uint32_t s = 0; s < held; s++)
        assert_block_equal(&rb, s, &ra, s); /* still the exact fp16 bytes */
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    wait_bytes_stored(c, CALIB_BLOCKS * vq_bytes);
    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);
    region_free(&ra);
    region_free(&rb);
}

/* One region serves every model of its shape: a second model (another id
 * and codec) puts from and gets into the first model's region; a model of
 * another shape is refused, the field named. */
static void test_region_shared_by_models(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "shared-region");
    vqkv_model_t *ma, *mb, *mc;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", &ma), VQKV_OK);
    assert_vqkv(vqkv_register_model(c, "test/draft@main", &layout, "kivi4", &mb), VQKV_OK);
    vqkv_layout_t other = layout;
    other.num_layers = LAYERS + 1;
    assert_vqkv(vqkv_register_model(c, "test/deeper@main", &other, "fp16", &mc), VQKV_OK);
    region_t r;
    region_new(&r, 71);
    vqkv_region_t h = region_register(c, ma, &r);
    uint8_t keys[2][VQKV_KEY_BYTES];
    uint32_t slots[2];
    chain_keys(mb, 3, keys, 0, slots, 2);
    assert_vqkv(vqkv_put(c, mb, h, keys, NULL, slots, 2, NULL), 2);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, mb, keys, 2, &found, &lease), VQKV_OK);
    assert_int_equal(found, 2);
    uint32_t into[2] = {4, 5};
    assert_vqkv(vqkv_get(c, lease, h, into, 2), 2);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_int_equal(st.blocks, 2);
    assert_true(st.bytes_stored < st.bytes_logical); /* stored as kivi4, the draft's codec */
    chain_keys(mc, 3, keys, 0, slots, 2);
    assert_vqkv(vqkv_put(c, mc, h, keys, NULL, slots, 2, NULL), VQKV_EMISMATCH);
    if (strstr(vqkv_last_error(c), "num_layers 3, registered 2") == NULL)
        fail_msg("\"%s\" does not name num_layers", vqkv_last_error(c));
    vqkv_close(c);
    region_free(&r);
}

/* A region whose layers sit apart in the memfd (reverse order, gaps):
 * blocks put from it come back through it, and into a strided region,
 * byte for byte; overlapping layers are refused naming layer_offsets. */
static void test_region_layer_offsets(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "layer-offsets");
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", &m), VQKV_OK);
    region_t strided;
    region_new(&strided, 81);
    uint64_t layer_bytes = strided.view.layer_stride, offsets[LAYERS];
    for (uint32_t l = 0; l < LAYERS; l++)
        offsets[l] = (uint64_t)(LAYERS - 1 - l) * (layer_bytes + 4096);
    vqkv_kv_view_t apart = strided.view;
    apart.layer_offsets = offsets;
    apart.region_bytes = (uint64_t)(LAYERS - 1) * (layer_bytes + 4096) + layer_bytes;
    int fd;
    assert_vqkv(vqkv_memfd_create("apart", apart.region_bytes, &fd), VQKV_OK);
    uint8_t *base = mmap(NULL, apart.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(base != MAP_FAILED);
    for (uint32_t l = 0; l < LAYERS; l++) /* the strided region's layers, placed apart */
        memcpy(base + offsets[l], strided.base + l * layer_bytes, layer_bytes);
    vqkv_region_t ha, hs;
    assert_vqkv(vqkv_register_memfd_region(c, m, fd, apart.region_bytes, 0, &apart, &ha), VQKV_OK);
    offsets[0] = 0; /* the caller's array may change: the library copied it */
    hs = region_register(c, m, &strided);
    uint8_t keys[2][VQKV_KEY_BYTES];
    uint32_t slots[2];
    chain_keys(m, 11, keys, 0, slots, 2);
    assert_vqkv(vqkv_put(c, m, ha, keys, NULL, slots, 2, NULL), 2);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, 2, &found, &lease), VQKV_OK);
    uint32_t into[2] = {6, 7};
    assert_vqkv(vqkv_get(c, lease, hs, into, 2), 2);
    assert_vqkv(vqkv_get(c, lease, ha, into, 2), 2);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    for (uint32_t s = 0; s < 2; s++)
        assert_block_equal(&strided, 6 + s, &strided, s);
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t s = 0; s < 2; s++)
            for (uint32_t kv = 0; kv < 2; kv++) {
                uint64_t in_layer = kv * strided.view.kv_stride;
                assert_memory_equal(base + (uint64_t)(LAYERS - 1 - l) * (layer_bytes + 4096) +
                                        in_layer + (6 + s) * strided.view.slot_stride,
                                    strided.base + l * layer_bytes + in_layer +
                                        s * strided.view.slot_stride,
                                    strided.view.slot_stride);
            }
    uint64_t overlap[LAYERS];
    for (uint32_t l = 0; l < LAYERS; l++)
        overlap[l] = l * (layer_bytes / 2);
    apart.layer_offsets = overlap;
    vqkv_region_t bad;
    assert_vqkv(vqkv_register_memfd_region(c, m, fd, apart.region_bytes, 0, &apart, &bad),
                VQKV_EINVAL);
    if (strstr(vqkv_last_error(c), "layer_offsets") == NULL)
        fail_msg("\"%s\" does not name layer_offsets", vqkv_last_error(c));
    vqkv_close(c);
    munmap(base, apart.region_bytes);
    close(fd);
    region_free(&strided);
}

/* A CUDA region where there is none to be had: bad arguments and a view
 * past the tensor's bytes are refused before the driver is asked; host
 * memory is VQKV_EDEVICE, the message naming why (no driver on this
 * machine, or on a GPU machine, memory CUDA does not own). Nothing was
 * registered: the client goes on with its memfd regions. */
static void test_cuda_region_refused(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "cuda-region");
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", &m), VQKV_OK);
    region_t host;
    region_new(&host, 91);
    uint64_t ptr = (uint64_t)(uintptr_t)host.base, bytes = host.view.region_bytes;
    vqkv_region_t h = 0;
    assert_vqkv(vqkv_register_cuda_region(c, m, 0, bytes, &host.view, &h), VQKV_EINVAL);
    assert_vqkv(vqkv_register_cuda_region(c, m, ptr, bytes, NULL, &h), VQKV_EINVAL);
    assert_vqkv(vqkv_register_cuda_region(c, m, ptr, bytes - 1, &host.view, &h), VQKV_ERANGE);
    if (strstr(vqkv_last_error(c), "view reaches past") == NULL)
        fail_msg("\"%s\" does not say the view is too large", vqkv_last_error(c));
    assert_vqkv(vqkv_register_cuda_region(c, m, ptr, bytes, &host.view, &h), VQKV_EDEVICE);
    const char *why = vqkv_last_error(c);
    if (strstr(why, "register_cuda_region: ") != why ||
        (strstr(why, "CUDA driver is not available") == NULL &&
         strstr(why, "is not device memory") == NULL))
        fail_msg("\"%s\" does not say why", why);
    assert_int_equal(h, 0);
    vqkv_region_t ok;
    assert_vqkv(vqkv_register_memfd_region(c, m, host.fd, bytes, 0, &host.view, &ok), VQKV_OK);

    /* GPU events: none on the cpu backend, and a call without one is a
     * caller's mistake. */
    uint8_t keys[1][VQKV_KEY_BYTES];
    uint32_t slots[1];
    chain_keys(m, 93, keys, 0, slots, 1);
    vqkv_cuda_event_t event = {{0}};
    assert_vqkv(vqkv_put_after_event(c, m, ok, keys, NULL, slots, 1, NULL, NULL), VQKV_EINVAL);
    assert_vqkv(vqkv_put_after_event(c, m, ok, keys, NULL, slots, 1, NULL, &event), VQKV_EDEVICE);
    if (strstr(vqkv_last_error(c), "no GPU events") == NULL)
        fail_msg("\"%s\" does not say why", vqkv_last_error(c));
    assert_vqkv(vqkv_put(c, m, ok, keys, NULL, slots, 1, NULL), 1);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, m, keys, 1, &found, &lease), VQKV_OK);
    assert_int_equal(found, 1);
    assert_vqkv(vqkv_get_with_event(c, lease, ok, slots, 1, NULL), VQKV_EINVAL);
    assert_vqkv(vqkv_get_with_event(c, lease, ok, slots, 1, &event), VQKV_EDEVICE);
    assert_vqkv(vqkv_get(c, lease, ok, slots, 1), 1);
    vqkv_close(c);
    region_free(&host);
}

/* Started calls: eight puts in flight at once, their completions taken
 * together; gets started on two leases; a synchronous call in between,
 * which must not eat their replies; the socket polled as an engine's loop
 * would; bad requests completing with their code; the in-flight bound; a
 * daemon gone with calls in flight completing them with VQKV_ECLOSED. */
/* The same chain put twice at once, on one connection so that the daemon
 * takes the second while the first is still encoding: the second finds
 * every block being written by the first and says PRESENT, and by the time
 * it answers they are there to be found. */
static void test_concurrent_puts_of_a_chain(void **state)
{
    daemon_t *d = *state;
    vqkv_client_t *c = connect_ok(d, "same-chain");
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", &m), VQKV_OK);
    region_t r;
    region_new(&r, 61);
    vqkv_region_t h = region_register(c, m, &r);
    uint8_t keys[CALIB_BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[CALIB_BLOCKS];
    chain_keys(m, 7000, keys, 0, slots, CALIB_BLOCKS);
    vqkv_put_status_t first[CALIB_BLOCKS], second[CALIB_BLOCKS];
    vqkv_request_t r1, r2;
    assert_vqkv(vqkv_put_start(c, m, h, keys, NULL, slots, CALIB_BLOCKS, first, &r1), VQKV_OK);
    assert_vqkv(vqkv_put_start(c, m, h, keys, NULL, slots, CALIB_BLOCKS, second, &r2), VQKV_OK);
    int second_done = 0;
    while (!second_done) {
        vqkv_completion_t done[2];
        int n = vqkv_complete(c, TIMEOUT_MS, done, 2);
        assert_true(n > 0);
        for (int i = 0; i < n; i++) {
            /* Blocks stored: all by the first, none by the second. */
            assert_int_equal(done[i].rc, done[i].request == r1 ? CALIB_BLOCKS : 0);
            second_done |= done[i].request == r2;
        }
    }
    for (int i = 0; i < CALIB_BLOCKS; i++)
        assert_int_equal(second[i], VQKV_PUT_PRESENT);
    size_t found = 0;
    vqkv_lease_t lease;
    assert_vqkv(vqkv_lookup(c, m, keys, CALIB_BLOCKS, &found, &lease), VQKV_OK);
    assert_int_equal(found, CALIB_BLOCKS);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    while (vqkv_async_pending(c) > 0) {
        vqkv_completion_t done;
        assert_int_equal(vqkv_complete(c, TIMEOUT_MS, &done, 1), 1);
        assert_int_equal(done.rc, CALIB_BLOCKS);
    }
    for (int i = 0; i < CALIB_BLOCKS; i++)
        assert_int_equal(first[i], VQKV_PUT_STORED);
    region_free(&r);
    vqkv_close(c);
}

/* A put whose middle block is held already stores the blocks either side
 * of it, each from its own slot. */
static void check_put_around_a_held_block(const daemon_t *d)
{
    vqkv_model_t *m;
    region_t src, dst;
    vqkv_region_t hs, hd;
    vqkv_client_t *c = connect_with_regions(d, "around-held", 71, &m, &src, &dst, &hs, &hd);
    /* Three one-block chains, put as roots (all-zero parents). */
    uint8_t keys[3][VQKV_KEY_BYTES], parents[3][VQKV_KEY_BYTES] = {{0}};
    uint32_t slots[3] = {0, 1, 2}, one;
    for (uint32_t i = 0; i < 3; i++)
        chain_keys(m, 8000 + 1000 * i, &keys[i], i, &one, 1);
    assert_vqkv(vqkv_put(c, m, hs, &keys[1], &parents[1], &slots[1], 1, NULL), 1);
    vqkv_put_status_t st[3];
    assert_vqkv(vqkv_put(c, m, hs, keys, parents, slots, 3, st), 2);
    assert_int_equal(st[0], VQKV_PUT_STORED);
    assert_int_equal(st[1], VQKV_PUT_PRESENT);
    assert_int_equal(st[2], VQKV_PUT_STORED);
    for (uint32_t i = 0; i < 3; i++) {
        size_t found = 0;
        vqkv_lease_t lease = 0;
        uint32_t to = 5 - i;
        assert_vqkv(vqkv_lookup(c, m, &keys[i], 1, &found, &lease), VQKV_OK);
        assert_int_equal(found, 1);
        assert_vqkv(vqkv_get(c, lease, hd, &to, 1), 1);
        assert_block_equal(&dst, to, &src, i);
        assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    }
    region_free(&src);
    region_free(&dst);
    vqkv_close(c);
}

/* check_put_around_a_held_block with staging (the put's new blocks copied
 * to a stage, encoded from there) and without (encoded from the worker's
 * region, the runs between held blocks as batches). */
static void test_put_around_a_held_block(void **state)
{
    (void)state;
    const char *const no_staging[] = {"--staging-bytes", "0", NULL};
    const char *const *extra[] = {NULL, no_staging};
    for (int i = 0; i < 2; i++) {
        daemon_t d;
        daemon_start(&d, extra[i]);
        check_put_around_a_held_block(&d);
        daemon_stop(&d);
        daemon_cleanup(&d);
    }
}

static void test_async_calls(void **state)
{
    daemon_t *d = *state;
    vqkv_model_t *m;
    region_t ra, rb;
    vqkv_region_t ha, hb;
    vqkv_client_t *c = connect_with_regions(d, "async", 51, &m, &ra, &rb, &ha, &hb);
    memset(rb.base, 0, rb.view.region_bytes);
    vqkv_completion_t done[16];
    assert_int_equal(vqkv_complete(c, 0, done, 16), 0); /* nothing in flight */

    /* Eight one-block chains, each its own put. */
    uint8_t keys[SLOTS][1][VQKV_KEY_BYTES];
    uint32_t slots[SLOTS];
    vqkv_put_status_t statuses[SLOTS];
    vqkv_request_t req[SLOTS];
    for (uint32_t i = 0; i < SLOTS; i++) {
        chain_keys(m, 1000 * (i + 1), keys[i], i, &slots[i], 1);
        assert_vqkv(vqkv_put_start(c, m, ha, keys[i], NULL, &slots[i], 1, &statuses[i], &req[i]),
                    VQKV_OK);
    }
    assert_int_equal(vqkv_async_pending(c), SLOTS);
    vqkv_stats_t st; /* a synchronous call while they are in flight */
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    size_t got = 0;
    while (got < SLOTS) {
        struct pollfd pfd = {vqkv_client_fd(c), POLLIN, 0};
        int n = vqkv_complete(c, 0, done + got, 16 - got);
        assert_true(n >= 0);
        if (n == 0)
            assert_int_equal(poll(&pfd, 1, TIMEOUT_MS), 1);
        got += (size_t)n;
    }
    assert_int_equal(vqkv_async_pending(c), 0);
    for (uint32_t i = 0; i < SLOTS; i++) {
        size_t k = 0;
        while (k < SLOTS && done[k].request != req[i])
            k++;
        assert_true(k < SLOTS);
        assert_int_equal(done[k].rc, 1);
        assert_int_equal(statuses[i], VQKV_PUT_STORED);
    }

    /* Replies that came together are taken together: the socket says
     * nothing of those already read, so none may stay behind. */
    for (uint32_t i = 0; i < SLOTS; i++)
        assert_vqkv(vqkv_put_start(c, m, ha, keys[i], NULL, &slots[i], 1, NULL, &req[i]), VQKV_OK);
    assert_int_equal(vqkv_complete(c, TIMEOUT_MS, done, 1), 1);
    /* Only non-blocking calls from here: once the socket has nothing
     * left, a reply held in the client's buffer is returned by nothing
     * but vqkv_complete's look at that buffer, so without it the count
     * stops short and the deadline fails the test. */
    size_t rest = 0;
    for (int waited = 0; rest < SLOTS - 1 && waited < TIMEOUT_MS * daemon_slowdown();
         waited += 10) {
        int n = vqkv_complete(c, 0, done, 16);
        assert_true(n >= 0);
        rest += (size_t)n;
        if (rest < SLOTS - 1)
            sleep_ms(10);
    }
    assert_int_equal(rest, SLOTS - 1);

    /* Two leases, two gets in flight, into region b's slots in reverse. */
    vqkv_lease_t lease[2];
    size_t found = 0;
    uint32_t into[2] = {SLOTS - 1, SLOTS - 2};
    for (int i = 0; i < 2; i++) {
        assert_vqkv(vqkv_lookup(c, m, keys[i], 1, &found, &lease[i]), VQKV_OK);
        assert_int_equal(found, 1);
        assert_vqkv(vqkv_get_start(c, lease[i], hb, &into[i], 1, &req[i]), VQKV_OK);
    }
    got = 0;
    while (got < 2) {
        int n = vqkv_complete(c, TIMEOUT_MS, done + got, 2 - got);
        assert_true(n > 0);
        got += (size_t)n;
    }
    assert_int_equal(done[0].rc + done[1].rc, 2);
    assert_block_equal(&rb, SLOTS - 1, &ra, 0);
    assert_block_equal(&rb, SLOTS - 2, &ra, 1);

    /* Refused by the daemon: the completion carries the code. */
    uint32_t bad = SLOTS;
    vqkv_request_t r;
    assert_vqkv(vqkv_get_start(c, lease[0], hb, &bad, 1, &r), VQKV_OK);
    assert_int_equal(vqkv_complete(c, TIMEOUT_MS, done, 1), 1);
    assert_int_equal(done[0].request, r);
    assert_int_equal(done[0].rc, VQKV_ERANGE);
    for (int i = 0; i < 2; i++)
        assert_vqkv(vqkv_release(c, lease[i]), VQKV_OK);

    /* The daemon's max_inflight (64) less one, then VQKV_ELIMIT. */
    size_t started = 0;
    int rc;
    while ((rc = vqkv_put_start(c, m, ha, keys[started % SLOTS], NULL, &slots[started % SLOTS], 1,
                                NULL, &r)) == VQKV_OK)
        started++;
    assert_int_equal(rc, VQKV_ELIMIT);
    assert_int_equal(started, 63);
    for (got = 0; got < started;) {
        int n = vqkv_complete(c, TIMEOUT_MS, done, 16);
        assert_true(n > 0);
        for (int i = 0; i < n; i++)
            assert_int_equal(done[i].rc, 0); /* all there already */
        got += (size_t)n;
    }

    /* Calls in flight when the daemon dies complete with VQKV_ECLOSED. */
    assert_vqkv(vqkv_put_start(c, m, ha, keys[0], NULL, &slots[0], 1, NULL, &r), VQKV_OK);
    daemon_stop(d);
    assert_int_equal(vqkv_complete(c, TIMEOUT_MS, done, 1), 1);
    assert_int_equal(done[0].request, r);
    assert_true(done[0].rc == VQKV_ECLOSED || done[0].rc == 0);
    vqkv_close(c);
    region_free(&ra);
    region_free(&rb);
    daemon_cleanup(d);
    daemon_start(d, NULL); /* for the teardown's stop */
}

/* Calls bigger than one request: a put of 300 MiB of fp16 (over the 256
 * MiB a Put may stage) and one of 20,000 small blocks (over what a 1 MiB
 * frame holds), each one call; a lookup of 20,000 keys; pin, unpin and
 * evict of VQKV_KEYS_MAX keys, most of them absent. */
static void test_large_calls(void **state)
{
    (void)state;
    const char *extra[] = {"--pool-bytes", "1G", NULL};
    daemon_t d;
    daemon_start(&d, extra);
    vqkv_client_t *c = connect_ok(&d, "large");

    /* 1 MiB blocks: 8 layers x K, V x 32 tokens x 8 heads x 128 x f16. */
    const vqkv_layout_t big = {8, 8, 128, 32, VQKV_DTYPE_F16};
    enum { BIG = 300, SMALL = 20000 };
    vqkv_model_t *mb, *ms;
    assert_vqkv(vqkv_register_model(c, "test/big@main", &big, "fp16", &mb), VQKV_OK);
    region_t rb, got;
    region_make(&rb, &big, BIG);
    region_make(&got, &big, 4);
    for (uint32_t s = 0; s < BIG; s++) /* f16 bit patterns, distinct per slot */
        for (uint32_t l = 0; l < big.num_layers; l++)
            for (uint32_t kv = 0; kv < 2; kv++)
                memset(rb.base + l * rb.view.layer_stride + kv * rb.view.kv_stride +
                           s * rb.view.slot_stride,
                       (int)(s * 7 + l + kv) & 0x3f, rb.view.slot_stride);
    vqkv_region_t hb = region_register(c, mb, &rb);
    vqkv_region_t hg = region_register(c, mb, &got);
    uint32_t *tokens = malloc(SMALL * 4 * sizeof *tokens), *slots = malloc(SMALL * sizeof *slots);
    uint8_t(*keys)[VQKV_KEY_BYTES] = calloc(VQKV_KEYS_MAX, VQKV_KEY_BYTES);
    assert_non_null(tokens);
    assert_non_null(slots);
    assert_non_null(keys);
    for (uint32_t i = 0; i < SMALL * 4; i++)
        tokens[i] = i * 2654435761u % 50000;
    for (uint32_t i = 0; i < SMALL; i++)
        slots[i] = i;
    size_t n = 0, found = 0, count = 0;
    assert_vqkv(vqkv_model_block_keys(mb, NULL, tokens, BIG * 32, NULL, 0, keys, BIG, &n), VQKV_OK);
    assert_int_equal(n, BIG);
    assert_vqkv(vqkv_put(c, mb, hb, (const uint8_t(*)[VQKV_KEY_BYTES])keys, NULL, slots, BIG, NULL),
                BIG);
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(c, mb, (const uint8_t(*)[VQKV_KEY_BYTES])keys, BIG, &found, &lease),
                VQKV_OK);
    assert_int_equal(found, BIG); /* the chain ran on across the two requests */
    assert_vqkv(vqkv_get(c, lease, hg, slots, 4), 4);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    assert_memory_equal(got.base, rb.base, got.view.slot_stride * 4); /* layer 0's K */

    /* 128-byte blocks: 1 layer x K, V x 4 tokens x 1 head x 8 x f16. */
    const vqkv_layout_t tiny = {1, 1, 8, 4, VQKV_DTYPE_F16};
    assert_vqkv(vqkv_register_model(c, "test/tiny@main", &tiny, "fp16", &ms), VQKV_OK);
    region_t rs;
    region_make(&rs, &tiny, SMALL);
    memset(rs.base, 0x11, rs.view.region_bytes);
    vqkv_region_t hs = region_register(c, ms, &rs);
    assert_vqkv(vqkv_model_block_keys(ms, NULL, tokens, SMALL * 4, NULL, 0, keys, SMALL, &n),
                VQKV_OK);
    assert_int_equal(n, SMALL);
    assert_vqkv(
        vqkv_put(c, ms, hs, (const uint8_t(*)[VQKV_KEY_BYTES])keys, NULL, slots, SMALL, NULL),
        SMALL);
    assert_vqkv(vqkv_lookup(c, ms, (const uint8_t(*)[VQKV_KEY_BYTES])keys, SMALL, &found, &lease),
                VQKV_OK);
    assert_int_equal(found, SMALL);
    assert_vqkv(vqkv_release(c, lease), VQKV_OK);
    for (size_t i = SMALL; i < VQKV_KEYS_MAX; i++) /* keys nobody holds */
        memset(keys[i], (int)(i % 255) + 1, VQKV_KEY_BYTES);
    const uint8_t(*all)[VQKV_KEY_BYTES] = (const uint8_t(*)[VQKV_KEY_BYTES])keys;
    assert_vqkv(vqkv_pin(c, ms, all, VQKV_KEYS_MAX, 0, &count), VQKV_OK);
    assert_int_equal(count, SMALL);
    assert_vqkv(vqkv_unpin(c, ms, all, VQKV_KEYS_MAX, &count), VQKV_OK);
    assert_int_equal(count, SMALL);
    assert_vqkv(vqkv_pin(c, ms, all, VQKV_KEYS_MAX + 1, 0, &count), VQKV_EINVAL);
    assert_vqkv(vqkv_evict(c, ms, all, VQKV_KEYS_MAX, 0, &count), VQKV_OK);
    assert_int_equal(count, SMALL);

    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);
    free(tokens);
    free(slots);
    free(keys);
    region_free(&rb);
    region_free(&got);
    region_free(&rs);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_lookup_get, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_health, setup, teardown),
        cmocka_unit_test(test_online_calibration),
        cmocka_unit_test(test_online_calibration_commvq),
        cmocka_unit_test(test_online_calibration_rope),
        cmocka_unit_test(test_reencode_waits_for_leases),
        cmocka_unit_test_setup_teardown(test_codebook_files, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reconnect, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reconnect_resends_rope, setup, teardown),
        cmocka_unit_test_setup_teardown(test_default_socket, setup, teardown),
        cmocka_unit_test(test_large_calls),
        cmocka_unit_test_setup_teardown(test_async_calls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_puts_of_a_chain, setup, teardown),
        cmocka_unit_test(test_put_around_a_held_block),
        cmocka_unit_test_setup_teardown(test_region_shared_by_models, setup, teardown),
        cmocka_unit_test_setup_teardown(test_region_layer_offsets, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cuda_region_refused, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
