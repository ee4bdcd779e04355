/* session.c -- the session layer's own state and what its requests
 * share: the pool, the store and the tick timer that sweeps leases and
 * evicts down to the watermark; the store counters of Stats; the handles a
 * connection holds (models and regions) and what happens to them when it
 * closes; the checks every request naming keys makes; Release.
 *
 * The requests themselves are in models.c (RegisterModel, RegisterRegion,
 * FindModel), jobs.c (Put, Lookup, Get: the work on the thread pool) and
 * pins.c (Pin, Unpin, Evict). Every index a request carries is checked
 * there; the backend (backend.h) only ever sees checked slots.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "log.h"
#include "session.h"
#include "tiers.h"
#include "transcode.h"

/* How often leases are swept and the pool evicted down to its watermark. */
#define VQKVD_TICK_MS 100
/* Pool watermarks: evict above 90% down to 80%. */
#define VQKVD_HIGH_WATER 0.9
#define VQKVD_LOW_WATER 0.8

/* ---- pool, store, timer ------------------------------------------------- */

static void vqkvd__on_tick(uv_timer_t *t)
{
    vqkvd_server_t *s = t->data;
    vqkvd_store_tick(&s->store, uv_now(s->loop));
    vqkvd_transcode_poll(s);
    vqkvd_tiers_tick(s, uv_now(s->loop));
    vqkvd_remote_tick(s, uv_now(s->loop));
}

/* The daemon's pool chunk: 16 MiB (pool.h's own default, 2 MiB, is for
 * callers that pass 0), or a quarter of a small pool so that it still has
 * a few chunks (and a test's tiny pool can evict): a class strands at most
 * a chunk, and a block larger than a chunk cannot be stored. */
#define VQKVD_CHUNK_BYTES (16u << 20)
#define VQKVD_CHUNKS_MIN 4

static uint64_t vqkvd__chunk_bytes(uint64_t pool_bytes)
{
    long page_l = sysconf(_SC_PAGESIZE);
    uint64_t page = page_l > 0 ? (uint64_t)page_l : 4096;
    uint64_t chunk = pool_bytes / VQKVD_CHUNKS_MIN;
    if (chunk > VQKVD_CHUNK_BYTES)
        chunk = VQKVD_CHUNK_BYTES;
    chunk -= chunk % page;
    return chunk < page ? page : chunk;
}

int vqkvd_session_start(vqkvd_server_t *s)
{
    uint64_t chunk = vqkvd__chunk_bytes(s->cfg.pool_bytes);
    vqkvd_arena_t arena;
    char why[256];
    int rc = vqkvd_backend_create(s->cfg.device, s->cfg.pool_bytes, chunk, &s->backend, &arena, why,
                                  sizeof why);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "%s", why);
        return rc;
    }
    rc = vqkvd_pool_init(&s->pool, &arena);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot make a pool of %llu bytes: %s",
                  (unsigned long long)s->cfg.pool_bytes, vqkv_strerror(rc));
        s->backend->ops->destroy(s->backend);
        s->backend = NULL;
        return rc;
    }
    /* The quotas are server.c's to set: a reload sets them again. */
    rc = vqkvd_store_init(&s->store, &s->pool, VQKVD_HIGH_WATER, VQKVD_LOW_WATER, NULL);
    if (rc != VQKV_OK) {
        vqkvd_store_destroy(&s->store);
        vqkvd_pool_destroy(&s->pool);
        s->backend->ops->destroy(s->backend);
        s->backend = NULL;
        vqkvd_log(VQKVD_LOG_ERROR, "no memory for the block index");
        return VQKV_ENOMEM;
    }
    rc = vqkvd_tiers_start(s);
    if (rc != VQKV_OK) {
        vqkvd_store_destroy(&s->store);
        vqkvd_pool_destroy(&s->pool);
        s->backend->ops->destroy(s->backend);
        s->backend = NULL;
        vqkvd_log(VQKVD_LOG_ERROR, "no memory for the disk tier's index");
        return rc;
    }
    rc = vqkvd_remote_start(s);
    if (rc != VQKV_OK) {
        vqkvd_tiers_destroy(s);
        vqkvd_store_destroy(&s->store);
        vqkvd_pool_destroy(&s->pool);
        s->backend->ops->destroy(s->backend);
        s->backend = NULL;
        return rc;
    }
    uv_timer_init(s->loop, &s->tick); /* cannot fail */
    s->tick.data = s;
    uv_timer_start(&s->tick, vqkvd__on_tick, VQKVD_TICK_MS, VQKVD_TICK_MS);
    vqkvd_log(VQKVD_LOG_INFO, "pool: %llu bytes in %llu-byte chunks",
              (unsigned long long)s->cfg.pool_bytes, (unsigned long long)chunk);
    return VQKV_OK;
}

void vqkvd_session_stop(vqkvd_server_t *s)
{
    if (s->tick.loop != NULL && !uv_is_closing((uv_handle_t *)&s->tick))
        uv_close((uv_handle_t *)&s->tick, NULL);
    vqkvd_tiers_stop(s);
    vqkvd_remote_stop(s);
}

void vqkvd_session_destroy(vqkvd_server_t *s)
{
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_calib_free(s->models[i]);
        vqkv_codec_free(s->models[i]->fallback);
        vqkv_codec_free(s->models[i]->codec);
        free(s->models[i]->model_id);
        free(s->models[i]);
    }
    free(s->models);
    s->models = NULL;
    s->n_models = s->cap_models = 0;
    vqkvd_tiers_destroy(s);
    vqkvd_remote_destroy(s);
    vqkvd_store_destroy(&s->store);
    vqkvd_pool_destroy(&s->pool);
    if (s->backend != NULL)
        s->backend->ops->destroy(s->backend);
    s->backend = NULL;
}

/* A StatsReply tenant entry with the room for its name. */
typedef struct {
    Vqkv__TenantStats ts;
    char name[16]; /* the uid in decimal */
} vqkvd_tenant_entry_t;

static void vqkvd__tenant_entry(vqkvd_tenant_entry_t *e, const vqkvd_tenant_stats_t *t)
{
    vqkv__tenant_stats__init(&e->ts);
    snprintf(e->name, sizeof e->name, "%u", (unsigned)t->tenant);
    e->ts.tenant = e->name;
    e->ts.hits = t->hits;
    e->ts.misses = t->misses;
    e->ts.blocks = t->blocks;
    e->ts.bytes_stored = t->bytes_stored;
    e->ts.bytes_logical = t->bytes_logical;
    e->ts.evictions = t->evictions;
    e->ts.quota_bytes = t->quota_bytes;
}

int vqkvd__is_admin(const vqkvd_client_t *c)
{
    const vqkvd_config_t *cfg = &c->server->cfg;
    for (size_t i = 0; i < cfg->n_admin_uids; i++)
        if (cfg->admin_uids[i] == c->uid)
            return 1;
    return 0;
}

void vqkvd_session_totals(const vqkvd_server_t *s, vqkvd_totals_t *t)
{
    memset(t, 0, sizeof *t);
    vqkvd_store_stats(&s->store, &t->store);
    vqkvd_pool_stats(&s->pool, &t->pool);
    t->clients = s->n_clients;
    t->models = s->n_models;
    t->staging = s->staging;
    if (s->disk != NULL)
        vqkvd_disk_stats(s->disk, &t->disk);
    vqkvd_remote_stats(s, &t->remote);
    for (const vqkvd_client_t *c = s->clients; c != NULL; c = c->next) {
        t->regions += c->n_regions;
        t->pins += c->n_pins;
    }
}

int vqkvd_session_stats(vqkvd_client_t *c, Vqkv__StatsReply *st)
{
    vqkvd_server_t *s = c->server;
    vqkvd_totals_t tot;
    vqkvd_session_totals(s, &tot);
    st->hits = tot.store.hits;
    st->misses = tot.store.misses;
    st->blocks = tot.store.blocks;
    st->bytes_stored = tot.store.bytes_stored;
    st->bytes_logical = tot.store.bytes_logical;
    st->evictions = tot.store.evictions;
    st->leases = tot.store.leases;
    st->clients = tot.clients;
    st->pool_bytes = tot.pool.usable_bytes;
    st->regions = tot.regions;
    st->pool_slots_used = tot.pool.slots_used;
    st->pool_bytes_used = tot.pool.bytes_stored;
    st->staging_bytes = tot.staging.bytes;
    st->encode_backlog = tot.staging.backlog;
    st->puts_staged = tot.staging.puts_staged;
    st->puts_staging_full = tot.staging.puts_full;
    st->disk_blocks = tot.disk.blocks;
    st->disk_bytes = tot.disk.bytes;
    st->disk_limit_bytes = tot.disk.limit_bytes;
    st->disk_writes = tot.disk.writes;
    st->disk_reads = tot.disk.reads;
    st->disk_bad_records = tot.disk.bad_records;
    st->disk_write_errors = tot.disk.write_errors;
    st->disk_dropped = tot.disk.dropped;

    /* The pointers, then the entries, in one allocation: room for the
     * caller's own entry and every tenant the store knows. */
    uint32_t own = (uint32_t)c->uid;
    uint32_t known = vqkvd_store_tenant_count(&s->store);
    size_t cap = vqkvd__is_admin(c) ? (size_t)known + 1 : 1;
    size_t ptr_bytes = cap * sizeof *st->tenants;
    Vqkv__TenantStats **tenants = calloc(1, ptr_bytes + cap * sizeof(vqkvd_tenant_entry_t));
    if (tenants == NULL)
        return VQKV_ENOMEM;
    vqkvd_tenant_entry_t *entries = (vqkvd_tenant_entry_t *)((uint8_t *)tenants + ptr_bytes);
    vqkvd_tenant_stats_t t;
    vqkvd_store_tenant_stats(&s->store, own, &t);
    vqkvd__tenant_entry(&entries[0], &t);
    size_t n = 1;
    for (uint32_t i = 0; n < cap && i < known; i++) {
        const vqkvd_tenant_stats_t *other = vqkvd_store_tenant_at(&s->store, i);
        if (other->tenant != own)
            vqkvd__tenant_entry(&entries[n++], other);
    }
    for (size_t i = 0; i < n; i++)
        tenants[i] = &entries[i].ts;
    st->n_tenants = n;
    st->tenants = tenants;
    return VQKV_OK;
}

/* ---- handles ------------------------------------------------------------- */

vqkvd_model_t *vqkvd__client_model(const vqkvd_client_t *c, uint64_t handle)
{
    for (uint32_t i = 0; i < c->n_models; i++)
        if (c->models[i] == handle)
            return c->server->models[handle - 1];
    return NULL;
}

vqkvd_region_t *vqkvd__client_region(const vqkvd_client_t *c, uint64_t handle)
{
    for (vqkvd_region_t *r = c->regions; r != NULL; r = r->next)
        if (r->handle == handle)
            return r;
    return NULL;
}

void vqkvd__region_unref(vqkvd_region_t *r)
{
    if (--r->refs > 0)
        return;
    r->backend->ops->region_close(r->backend, &r->mem);
    free(r->layer_offsets);
    free(r);
}

void vqkvd_session_client_gone(vqkvd_client_t *c)
{
    uint64_t n = vqkvd_store_release_owner(&c->server->store, c->id);
    if (n > 0)
        vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: %llu leases released", (unsigned long long)c->id,
                  (unsigned long long)n);
    while (c->regions != NULL) {
        vqkvd_region_t *r = c->regions;
        c->regions = r->next;
        vqkvd__region_unref(r);
    }
    c->n_regions = 0;
    vqkvd__pieces_release(c);
    free(c->pieces);
    c->pieces = NULL;
    c->cap_pieces = 0;
    vqkvd_server_t *s = c->server;
    for (uint32_t i = 0; i < c->cap_pins; i++)
        if (c->pins[i].model != 0)
            vqkvd_store_unpin(&s->store, (uint32_t)c->uid, c->pins[i].model, c->pins[i].key);
    if (c->n_pins > 0)
        vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: %u pins released", (unsigned long long)c->id,
                  (unsigned)c->n_pins);
    free(c->pins);
    c->pins = NULL;
    c->n_pins = c->cap_pins = 0;
}

/* ---- Lookup, Get, Release ---------------------------------------------------- */

/* The model of a request naming keys, once the handle, the number of keys
 * and every key's size are checked; NULL after an Error reply. */
vqkvd_model_t *vqkvd__keys_check(vqkvd_client_t *c, uint64_t id, const char *what,
                                 uint64_t model_handle, size_t n_keys,
                                 const ProtobufCBinaryData *keys)
{
    vqkvd_model_t *m = vqkvd__client_model(c, model_handle);
    if (m == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "no model %llu on this connection",
                           (unsigned long long)model_handle);
        return NULL;
    }
    if (n_keys > VQKVD_STORE_MAX_CHAIN) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "%s takes at most %d keys", what,
                           VQKVD_STORE_MAX_CHAIN);
        return NULL;
    }
    for (size_t i = 0; i < n_keys; i++) {
        if (keys[i].len != VQKVD_KEY_BYTES) {
            vqkvd_client_error(c, id, VQKV_EINVAL, "key %zu is not %d bytes", i, VQKVD_KEY_BYTES);
            return NULL;
        }
    }
    return m;
}

/* The reply of requests with nothing to say but a count. */
void vqkvd__ack(vqkvd_client_t *c, uint64_t id, uint32_t count)
{
    Vqkv__Ack ack = VQKV__ACK__INIT;
    ack.count = count;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_ACK;
    env.ack = &ack;
    vqkvd_client_reply(c, &env);
}

/* The n checked keys end to end, as the store takes them (malloc'd); NULL
 * with the error sent when out of memory. */
uint8_t *vqkvd__keys_flat(vqkvd_client_t *c, uint64_t id, const ProtobufCBinaryData *keys, size_t n)
{
    uint8_t *flat = malloc(n ? n * VQKVD_KEY_BYTES : 1);
    if (flat == NULL) {
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        memcpy(flat + i * VQKVD_KEY_BYTES, keys[i].data, VQKVD_KEY_BYTES);
    return flat;
}

void vqkvd_session_release(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    int rc = vqkvd_store_release(&c->server->store, c->id, req->release->lease_id);
    if (rc != VQKV_OK) {
        vqkvd_client_error(c, req->request_id, rc, "lease %llu is not held by this connection",
                           (unsigned long long)req->release->lease_id);
        return;
    }
    vqkvd__ack(c, req->request_id, 0);
}
