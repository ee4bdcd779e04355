/* test_tenants.c -- per-tenant counters, Evict, FindModel and vqkvctl's
 * pin, unpin, evict and stats against the vqkvd binary, through libvqkv.
 * Most tests run as one uid, so one tenant; test_two_uids forks a second
 * worker that drops to another uid (root only: skipped, loudly, as any
 * other user) to show that tenants never see each other's blocks through
 * the daemon, and that a uid not on the allow list is refused. The eviction
 * rules are covered in-process in test_store.c. The daemon runs on a
 * socket in a fresh temporary directory (tests/daemon_harness.h) and must
 * exit 0 on SIGTERM (under ASan: no leak).
 */
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <json-c/json.h>

#include "libvqkv_harness.h"
#include "vqkv.h"

#define TIMEOUT_MS 30000
#define LAYERS 2
#define HEADS 2
#define DIM 64
#define TOKENS 16
#define SLOTS 8
#define MODEL "test/tenants@main"

static const vqkv_layout_t layout = {LAYERS, HEADS, DIM, TOKENS, VQKV_DTYPE_F16};

/* A worker: a connection, its model and a region of SLOTS slots. */
typedef struct {
    vqkv_client_t *c;
    vqkv_model_t *m;
    int fd;
    vqkv_kv_view_t view;
    vqkv_region_t region;
} worker_t;

static void worker_open(worker_t *w, const daemon_t *d)
{
    assert_vqkv(vqkv_connect(d->path, "test_tenants", TIMEOUT_MS, &w->c), VQKV_OK);
    assert_vqkv(vqkv_register_model(w->c, MODEL, &layout, "fp16", &w->m), VQKV_OK);
    vqkv_kv_view_vllm(&w->view, &layout, SLOTS);
    assert_vqkv(vqkv_memfd_create("test_tenants", w->view.region_bytes, &w->fd), VQKV_OK);
    assert_vqkv(vqkv_register_memfd_region(w->c, w->m, w->fd, w->view.region_bytes, 0, &w->view,
                                           &w->region),
                VQKV_OK);
}

static void worker_close(worker_t *w)
{
    vqkv_close(w->c);
    close(w->fd);
}

/* Tokens 0 .. n_blocks * TOKENS - 1 plus base, keyed for w's model. */
static void tokens_of(uint32_t *tokens, size_t n_blocks, uint32_t base)
{
    for (size_t i = 0; i < n_blocks * TOKENS; i++)
        tokens[i] = base + (uint32_t)i;
}

/* Puts (or finds present) the chain of n_blocks blocks of tokens from base;
 * its keys into keys. */
static void put_chain(worker_t *w, uint32_t base, size_t n_blocks, uint8_t (*keys)[VQKV_KEY_BYTES])
{
    uint32_t tokens[SLOTS * TOKENS];
    uint32_t slots[SLOTS];
    size_t n = 0;
    tokens_of(tokens, n_blocks, base);
    assert_vqkv(
        vqkv_model_block_keys(w->m, NULL, tokens, n_blocks * TOKENS, NULL, 0, keys, n_blocks, &n),
        VQKV_OK);
    assert_int_equal(n, n_blocks);
    for (size_t i = 0; i < n_blocks; i++)
        slots[i] = (uint32_t)i;
    vqkv_put_status_t status[SLOTS];
    assert_true(vqkv_put(w->c, w->m, w->region, (const uint8_t(*)[VQKV_KEY_BYTES])keys, NULL, slots,
                         n_blocks, status) >= 0);
    for (size_t i = 0; i < n_blocks; i++)
        assert_true(status[i] == VQKV_PUT_STORED || status[i] == VQKV_PUT_PRESENT);
}

/* The caller's own tenant entry, which comes first and is the only one for
 * a peer that is not an admin (the test daemon names none). */
static vqkv_tenant_stats_t own_stats(worker_t *w, vqkv_stats_t *st)
{
    assert_vqkv(vqkv_stats(w->c, st), VQKV_OK);
    assert_int_equal(st->n_tenants, 1);
    assert_int_equal(st->n_tenants_total, 1);
    assert_string_equal(st->tenants[0].tenant, vqkv_client_tenant(w->c));
    return st->tenants[0];
}

static size_t lookup_count(worker_t *w, const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n)
{
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(w->c, w->m, keys, n, &found, &lease), VQKV_OK);
    assert_vqkv(vqkv_release(w->c, lease), VQKV_OK);
    return found;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_tenant_counters(void **state)
{
    daemon_t *d = *state;
    worker_t w;
    vqkv_stats_t st;
    uint8_t keys[4][VQKV_KEY_BYTES];

    worker_open(&w, d);
    vqkv_tenant_stats_t t = own_stats(&w, &st);
    assert_int_equal(t.blocks, 0);
    assert_int_equal(t.hits, 0);
    assert_int_equal(t.quota_bytes, 0); /* no quota configured */

    put_chain(&w, 100, 3, keys);
    uint8_t miss[2][VQKV_KEY_BYTES];
    memcpy(miss[0], keys[0], VQKV_KEY_BYTES);
    memset(miss[1], 0x77, VQKV_KEY_BYTES);
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])keys, 3), 3);
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])miss, 2), 1);
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])miss + 1, 1), 0);
    size_t n = 0;
    assert_vqkv(vqkv_evict(w.c, w.m, (const uint8_t(*)[VQKV_KEY_BYTES])keys + 2, 1, 0, &n),
                VQKV_OK);
    assert_int_equal(n, 1);

    t = own_stats(&w, &st);
    assert_int_equal(t.hits, 4);
    assert_int_equal(t.misses, 2);
    assert_int_equal(t.blocks, 2);
    assert_int_equal(t.bytes_stored, 2 * (uint64_t)vqkv_model_block_bytes(w.m));
    assert_int_equal(t.bytes_logical, 2ull * LAYERS * 2 * TOKENS * HEADS * DIM * 2);
    assert_int_equal(t.evictions, 1);
    /* One tenant: its entry is the totals. */
    assert_int_equal(st.hits, t.hits);
    assert_int_equal(st.misses, t.misses);
    assert_int_equal(st.blocks, t.blocks);
    assert_int_equal(st.evictions, t.evictions);
    worker_close(&w);
}

static void test_find_model(void **state)
{
    daemon_t *d = *state;
    worker_t w;
    vqkv_client_t *admin;
    vqkv_model_t *m = NULL;
    uint8_t keys[3][VQKV_KEY_BYTES], again[3][VQKV_KEY_BYTES];

    worker_open(&w, d);
    put_chain(&w, 500, 3, keys);
    assert_vqkv(vqkv_connect(d->path, "admin-tool", TIMEOUT_MS, &admin), VQKV_OK);
    assert_vqkv(vqkv_model_find(admin, "no/such@model", 0, 0, &m), VQKV_EHANDLE);
    assert_null(m);
    assert_non_null(strstr(vqkv_last_error(admin), "no/such@model"));
    assert_vqkv(vqkv_model_find(admin, MODEL, 1, 0, &m), VQKV_EHANDLE);
    assert_vqkv(vqkv_model_find(admin, MODEL, 0, 1, &m), VQKV_EHANDLE);
    assert_vqkv(vqkv_model_find(admin, "", 0, 0, &m), VQKV_EINVAL);
    assert_vqkv(vqkv_model_find(admin, NULL, 0, 0, &m), VQKV_EINVAL);

    assert_vqkv(vqkv_model_find(admin, MODEL, 0, HEADS, &m), VQKV_OK);
    vqkv_model_t *m2 = NULL;
    assert_vqkv(vqkv_model_find(admin, MODEL, 0, 0, &m2), VQKV_OK);
    assert_ptr_equal(m, m2); /* the same handle: the same model */
    vqkv_layout_t l;
    vqkv_model_layout(m, &l);
    assert_memory_equal(&l, &layout, sizeof l);
    assert_string_equal(vqkv_model_codec(m), vqkv_model_codec(w.m));
    assert_int_equal(vqkv_model_block_bytes(m), vqkv_model_block_bytes(w.m));
    /* Same keys, and the handle works on this connection. */
    uint32_t tokens[3 * TOKENS];
    size_t n = 0;
    tokens_of(tokens, 3, 500);
    assert_vqkv(vqkv_model_block_keys(m, NULL, tokens, 3 * TOKENS, NULL, 0, again, 3, &n), VQKV_OK);
    assert_memory_equal(keys, again, sizeof keys);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(admin, m, (const uint8_t(*)[VQKV_KEY_BYTES])again, 3, &found, &lease),
                VQKV_OK);
    assert_int_equal(found, 3);
    assert_vqkv(vqkv_release(admin, lease), VQKV_OK);
    vqkv_close(admin);
    worker_close(&w);
}

static void test_evict(void **state)
{
    daemon_t *d = *state;
    worker_t w;
    vqkv_stats_t st;
    uint8_t a[4][VQKV_KEY_BYTES], b[2][VQKV_KEY_BYTES];
    const uint8_t(*ca)[VQKV_KEY_BYTES] = (const uint8_t(*)[VQKV_KEY_BYTES])a;
    size_t n = 99;

    worker_open(&w, d);
    put_chain(&w, 1000, 4, a);
    put_chain(&w, 2000, 2, b);
    /* Naming block 1 takes 2 and 3 with it; 0 stays. */
    assert_vqkv(vqkv_evict(w.c, w.m, ca + 1, 1, 0, &n), VQKV_OK);
    assert_int_equal(n, 3);
    assert_int_equal(lookup_count(&w, ca, 4), 1);
    assert_vqkv(vqkv_evict(w.c, w.m, ca + 1, 1, 0, &n), VQKV_OK);
    assert_int_equal(n, 0);

    /* Put back; a pinned leaf protects its chain; a lease too. */
    put_chain(&w, 1000, 4, a);
    assert_vqkv(vqkv_pin(w.c, w.m, ca + 3, 1, 0, &n), VQKV_OK);
    assert_int_equal(n, 1);
    assert_vqkv(vqkv_evict(w.c, w.m, ca, 1, 0, &n), VQKV_OK);
    assert_int_equal(n, 0);
    size_t found = 0;
    vqkv_lease_t lease = 0;
    assert_vqkv(vqkv_lookup(w.c, w.m, (const uint8_t(*)[VQKV_KEY_BYTES])b, 1, &found, &lease),
                VQKV_OK);
    assert_int_equal(found, 1);
    /* all: b's leaf only (its root is leased, a's chain holds a pin). */
    assert_vqkv(vqkv_evict(w.c, w.m, NULL, 0, 1, &n), VQKV_OK);
    assert_int_equal(n, 1);
    assert_vqkv(vqkv_release(w.c, lease), VQKV_OK);
    assert_vqkv(vqkv_unpin(w.c, w.m, ca + 3, 1, &n), VQKV_OK);
    assert_vqkv(vqkv_evict(w.c, w.m, NULL, 0, 1, &n), VQKV_OK);
    assert_int_equal(n, 5);
    assert_vqkv(vqkv_stats(w.c, &st), VQKV_OK);
    assert_int_equal(st.blocks, 0);
    assert_int_equal(st.bytes_stored, 0);
    assert_int_equal(st.tenants[0].evictions, 3 + 1 + 5);

    /* Refused: keys and all, a key of the wrong size, no such model. */
    assert_vqkv(vqkv_evict(w.c, w.m, ca, 1, 1, &n), VQKV_EINVAL);
    assert_vqkv(vqkv_evict(w.c, NULL, NULL, 0, 1, &n), VQKV_EINVAL);
    worker_close(&w);
}

/* Wire-level refusals libvqkv would not send. */
static void test_evict_refused_on_the_wire(void **state)
{
    daemon_t *d = *state;
    worker_t w;
    worker_open(&w, d);
    client_t c;
    client_open(&c, d);
    Vqkv__Hello h = VQKV__HELLO__INIT;
    h.protocol_version = VQKV_PROTO_VERSION;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    send_env(&c, &env);
    Vqkv__Envelope *r = recv_env(&c);
    assert_int_equal(r->body_case, VQKV__ENVELOPE__BODY_WELCOME);
    vqkv_frame_envelope_free(r);

    Vqkv__FindModel fm = VQKV__FIND_MODEL__INIT;
    fm.model_id = MODEL;
    env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_FIND_MODEL;
    env.find_model = &fm;
    send_env(&c, &env);
    r = recv_env(&c);
    assert_int_equal(r->body_case, VQKV__ENVELOPE__BODY_MODEL_REGISTERED);
    uint64_t handle = r->model_registered->model_handle;
    assert_int_equal(r->model_registered->kv_head_count, HEADS);
    assert_int_equal(r->model_registered->layout->block_tokens, TOKENS);
    vqkv_frame_envelope_free(r);

    uint8_t key[VQKV_KEY_BYTES + 1] = {1};
    ProtobufCBinaryData bad = {VQKV_KEY_BYTES + 1, key};
    Vqkv__Evict e = VQKV__EVICT__INIT;
    e.model_handle = handle;
    e.n_keys = 1;
    e.keys = &bad;
    env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_EVICT;
    env.evict = &e;
    uint64_t id = send_env(&c, &env);
    expect_error(recv_env(&c), id, VQKV_EINVAL);
    e.model_handle = handle + 100;
    e.n_keys = 0;
    id = send_env(&c, &env);
    expect_error(recv_env(&c), id, VQKV_EHANDLE);
    client_close(&c);
    worker_close(&w);
}

/* A quota from the config file, through the daemon: the tenant's own LRU
 * blocks make room for new ones, it never holds more than its quota, and
 * with everything it holds pinned a Put gets PUT_OVER_QUOTA. */
static void test_quota_from_config(void **state)
{
    (void)state;
    const uint64_t block = 2ull * LAYERS * TOKENS * HEADS * DIM * 2; /* fp16 */
    char dir[] = "/tmp/vqkv-quota.XXXXXX", conf[64];
    assert_non_null(mkdtemp(dir));
    snprintf(conf, sizeof conf, "%s/vqkvd.conf", dir);
    FILE *f = fopen(conf, "w");
    assert_non_null(f);
    fprintf(f, "[quota]\ndefault = %llu\n", (unsigned long long)(3 * block));
    fclose(f);
    const char *const extra[] = {"--config", conf, NULL};
    daemon_t d;
    daemon_start(&d, extra);
    worker_t w;
    worker_open(&w, &d);

    uint8_t first[3][VQKV_KEY_BYTES], second[2][VQKV_KEY_BYTES], third[1][VQKV_KEY_BYTES];
    vqkv_stats_t st;
    put_chain(&w, 0, 3, first);
    vqkv_tenant_stats_t t = own_stats(&w, &st);
    assert_int_equal(t.quota_bytes, 3 * block);
    assert_int_equal(t.bytes_stored, 3 * block);
    put_chain(&w, 1000, 2, second);
    t = own_stats(&w, &st);
    assert_int_equal(t.bytes_stored, 3 * block);
    assert_int_equal(t.blocks, 3);
    assert_int_equal(t.evictions, 2);
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])second, 2), 2);

    size_t pinned = 0;
    assert_vqkv(vqkv_pin(w.c, w.m, (const uint8_t(*)[VQKV_KEY_BYTES])first, 3, 0, &pinned),
                VQKV_OK);
    assert_int_equal(pinned, 1);
    assert_vqkv(vqkv_pin(w.c, w.m, (const uint8_t(*)[VQKV_KEY_BYTES])second, 2, 0, &pinned),
                VQKV_OK);
    assert_int_equal(pinned, 2);
    uint32_t tokens[TOKENS], slot = 0;
    tokens_of(tokens, 1, 5000);
    size_t n = 0;
    assert_vqkv(vqkv_model_block_keys(w.m, NULL, tokens, TOKENS, NULL, 0, third, 1, &n), VQKV_OK);
    vqkv_put_status_t status;
    assert_vqkv(vqkv_put(w.c, w.m, w.region, (const uint8_t(*)[VQKV_KEY_BYTES])third, NULL, &slot,
                         1, &status),
                0);
    assert_int_equal(status, VQKV_PUT_OVER_QUOTA);
    t = own_stats(&w, &st);
    assert_int_equal(t.bytes_stored, 3 * block);

    worker_close(&w);
    daemon_stop(&d);
    daemon_cleanup(&d);
    assert_int_equal(unlink(conf), 0);
    assert_int_equal(rmdir(dir), 0);
}

/* ---- vqkvctl ---------------------------------------------------------------- */

/* The JSON object vqkvctl printed, and its integer field name. */
static int64_t json_int(const char *out, const char *name)
{
    struct json_object *o = json_tokener_parse(out), *f;
    if (o == NULL)
        fail_msg("no JSON: %s", out);
    if (!json_object_object_get_ex(o, name, &f))
        fail_msg("no \"%s\" in %s", name, out);
    int64_t v = json_object_get_int64(f);
    json_object_put(o);
    return v;
}

static void test_vqkvctl(void **state)
{
    daemon_t *d = *state;
    worker_t w;
    uint8_t keys[3][VQKV_KEY_BYTES];
    char out[8192], tokens[3 * TOKENS * 8 + 8];

    worker_open(&w, d);
    put_chain(&w, 7000, 3, keys);
    /* Two full blocks and a partial one: the partial one is not keyed. */
    size_t len = 0;
    for (uint32_t i = 0; i < 2 * TOKENS + 5; i++)
        len += (size_t)snprintf(tokens + len, sizeof tokens - len, "%s%u", i ? "," : "", 7000 + i);

    const char *pin[] = {"--socket", d->path, "pin",    "--model", MODEL,
                         "--tokens", tokens,  "--json", NULL};
    assert_int_equal(run_ctl(pin, out, sizeof out), 0);
    assert_int_equal(json_int(out, "blocks"), 2);
    assert_int_equal(json_int(out, "pinned"), 2);
    /* Pinned: evicting the chain from its root takes nothing. */
    const char *evict[] = {"--socket", d->path,    "evict", "--model", MODEL, "--heads",
                           "0:2",      "--tokens", tokens,  "--json",  NULL};
    assert_int_equal(run_ctl(evict, out, sizeof out), 0);
    assert_int_equal(json_int(out, "evicted"), 0);
    const char *unpin[] = {"--socket", d->path, "unpin",  "--model", MODEL,
                           "--tokens", tokens,  "--json", NULL};
    assert_int_equal(run_ctl(unpin, out, sizeof out), 0);
    assert_int_equal(json_int(out, "unpinned"), 2);
    /* Now the chain goes whole: its 2 named blocks and the third below them. */
    assert_int_equal(run_ctl(evict, out, sizeof out), 0);
    assert_int_equal(json_int(out, "evicted"), 3);
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])keys, 3), 0);

    put_chain(&w, 7000, 2, keys);
    const char *all[] = {"--socket", d->path, "evict", "--model", MODEL, "--all", NULL};
    assert_int_equal(run_ctl(all, out, sizeof out), 0);
    assert_non_null(strstr(out, "evicted 2 blocks"));

    const char *stats[] = {"--socket", d->path, "stats", "--json", NULL};
    assert_int_equal(run_ctl(stats, out, sizeof out), 0);
    assert_int_equal(json_int(out, "blocks"), 0);
    assert_int_equal(json_int(out, "evictions"), 5);
    struct json_object *o = json_tokener_parse(out), *tenants, *t, *f;
    assert_non_null(o);
    assert_true(json_object_object_get_ex(o, "tenants", &tenants));
    assert_int_equal(json_object_array_length(tenants), 1);
    t = json_object_array_get_idx(tenants, 0);
    assert_true(json_object_object_get_ex(t, "tenant", &f));
    assert_string_equal(json_object_get_string(f), vqkv_client_tenant(w.c));
    assert_true(json_object_object_get_ex(t, "evictions", &f));
    assert_int_equal(json_object_get_int64(f), 5);
    assert_true(json_object_object_get_ex(t, "quota_bytes", &f));
    assert_int_equal(json_object_get_int64(f), 0);
    json_object_put(o);
    const char *table[] = {"--socket", d->path, "stats", NULL};
    assert_int_equal(run_ctl(table, out, sizeof out), 0);
    assert_non_null(strstr(out, "quota"));
    assert_non_null(strstr(out, "hit rate"));
    assert_non_null(strstr(out, vqkv_client_tenant(w.c)));

    /* Usage errors and a model the tenant never registered. */
    const char *none[] = {"--socket", d->path, "pin", "--model", "x/y@z", "--tokens", tokens, NULL};
    assert_int_equal(run_ctl(none, out, sizeof out), 1);
    const char *both[] = {"--socket", d->path,    "evict", "--model", MODEL,
                          "--all",    "--tokens", tokens,  NULL};
    assert_int_equal(run_ctl(both, out, sizeof out), 2);
    const char *short_seq[] = {"--socket", d->path,    "pin",   "--model",
                               MODEL,      "--tokens", "1,2,3", NULL};
    assert_int_equal(run_ctl(short_seq, out, sizeof out), 1);
    const char *bad_tokens[] = {"--socket", d->path,    "unpin", "--model",
                                MODEL,      "--tokens", "1,x",   NULL};
    assert_int_equal(run_ctl(bad_tokens, out, sizeof out), 2);
    worker_close(&w);
}

/* Uids for the second tenant and for a peer the daemon does not allow:
 * nobody's, and one below it that no account uses on Debian. */
#define OTHER_UID 65534
#define REFUSED_UID 65533

/* What the checks run as another uid get: the daemon and the first
 * tenant's keys. */
typedef struct {
    const daemon_t *d;
    const uint8_t (*keys)[VQKV_KEY_BYTES];
} other_arg_t;

/* The second tenant: the first tenant's chain (same tokens, so its own
 * keys, and the first tenant's keys as they are) misses; putting the same
 * tokens stores new blocks; its stats show itself only. */
static int other_tenant(const void *arg)
{
    const daemon_t *d = ((const other_arg_t *)arg)->d;
    const uint8_t(*first_keys)[VQKV_KEY_BYTES] = ((const other_arg_t *)arg)->keys;
    vqkv_client_t *c = NULL;
    vqkv_model_t *m = NULL;
    vqkv_kv_view_t view;
    vqkv_region_t region;
    int fd = -1;
    uint32_t tokens[4 * TOKENS], slots[4] = {0, 1, 2, 3};
    uint8_t keys[4][VQKV_KEY_BYTES];
    size_t n = 0, found = 99;
    vqkv_lease_t lease = 0;
    vqkv_put_status_t put[4];
    vqkv_stats_t st;

    if (vqkv_connect(d->path, "test_tenants-other", TIMEOUT_MS, &c) != VQKV_OK)
        return 1;
    if (vqkv_register_model(c, MODEL, &layout, "fp16", &m) != VQKV_OK)
        return 2;
    vqkv_kv_view_vllm(&view, &layout, SLOTS);
    if (vqkv_memfd_create("test_tenants-other", view.region_bytes, &fd) != VQKV_OK ||
        vqkv_register_memfd_region(c, m, fd, view.region_bytes, 0, &view, &region) != VQKV_OK)
        return 3;
    tokens_of(tokens, 4, 100);
    if (vqkv_model_block_keys(m, NULL, tokens, 4 * TOKENS, NULL, 0, keys, 4, &n) != VQKV_OK ||
        n != 4)
        return 4;
    if (memcmp(keys[0], first_keys[0], VQKV_KEY_BYTES) == 0)
        return 5; /* the salt differs per tenant */
    if (vqkv_lookup(c, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, 4, &found, &lease) != VQKV_OK ||
        found != 0 || vqkv_release(c, lease) != VQKV_OK)
        return 6;
    if (vqkv_lookup(c, m, first_keys, 4, &found, &lease) != VQKV_OK || found != 0 ||
        vqkv_release(c, lease) != VQKV_OK)
        return 7;
    if (vqkv_put(c, m, region, (const uint8_t(*)[VQKV_KEY_BYTES])keys, NULL, slots, 4, put) < 0)
        return 8;
    for (int i = 0; i < 4; i++)
        if (put[i] != VQKV_PUT_STORED)
            return 9;
    if (vqkv_lookup(c, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, 4, &found, &lease) != VQKV_OK ||
        found != 4 || vqkv_release(c, lease) != VQKV_OK)
        return 10;
    if (vqkv_stats(c, &st) != VQKV_OK || st.n_tenants != 1 ||
        strcmp(st.tenants[0].tenant, vqkv_client_tenant(c)) != 0 || st.tenants[0].blocks != 4 ||
        st.tenants[0].hits != 4 || st.tenants[0].misses != 8)
        return 11;
    vqkv_close(c);
    close(fd);
    return 0;
}

/* A uid the daemon does not allow: connecting fails with VQKV_EPERM. */
static int refused_peer(const void *arg)
{
    const daemon_t *d = ((const other_arg_t *)arg)->d;
    vqkv_client_t *c = NULL;
    int rc = vqkv_connect(d->path, "test_tenants-refused", TIMEOUT_MS, &c);
    if (rc == VQKV_OK)
        vqkv_close(c);
    return rc == VQKV_EPERM ? 0 : 1;
}

static void test_two_uids(void **state)
{
    (void)state;
    if (geteuid() != 0) {
        fprintf(stderr, "test_two_uids: SKIPPED: needs root to run a worker as uid %d\n",
                OTHER_UID);
        skip();
    }
    const char *const extra[] = {"--allow-uid", "0", "--allow-uid", "65534", NULL};
    daemon_t d;
    daemon_start(&d, extra);
    /* The allow list is the daemon's gate, so the test opens the way to
     * the socket for the other uids. */
    daemon_open_to_all(&d);

    worker_t w;
    uint8_t keys[4][VQKV_KEY_BYTES];
    worker_open(&w, &d);
    put_chain(&w, 100, 4, keys);
    const other_arg_t arg = {&d, (const uint8_t(*)[VQKV_KEY_BYTES])keys};
    assert_int_equal(run_as(OTHER_UID, OTHER_UID, other_tenant, &arg), 0);
    assert_int_equal(run_as(REFUSED_UID, REFUSED_UID, refused_peer, &arg), 0);

    /* The first tenant still has its own blocks, untouched by the other's
     * identical chain, and sees only itself. */
    assert_int_equal(lookup_count(&w, (const uint8_t(*)[VQKV_KEY_BYTES])keys, 4), 4);
    vqkv_stats_t st;
    vqkv_tenant_stats_t t = own_stats(&w, &st);
    assert_int_equal(t.blocks, 4);
    assert_int_equal(t.hits, 4);
    assert_int_equal(t.misses, 0);
    assert_int_equal(st.blocks, 8);
    worker_close(&w);
    daemon_stop(&d);
    daemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_tenant_counters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_model, setup, teardown),
        cmocka_unit_test_setup_teardown(test_evict, setup, teardown),
        cmocka_unit_test_setup_teardown(test_evict_refused_on_the_wire, setup, teardown),
        cmocka_unit_test_setup_teardown(test_vqkvctl, setup, teardown),
        cmocka_unit_test(test_quota_from_config),
        cmocka_unit_test(test_two_uids),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
