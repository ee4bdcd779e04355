/* session.c -- vqkvd's block requests: RegisterModel, RegisterRegion
 * (worker KV memory, opened by the backend), Put (encode blocks out of the
 * region into the pool), Lookup (longest present prefix, leased), Get
 * (decode leased blocks into the region), Release, Pin and Unpin (keep
 * blocks from eviction), Evict and FindModel (what an admin tool needs to
 * act on a tenant's blocks), and the store counters of Stats. Every index a
 * request carries is checked here; the backend (backend.h) only ever sees
 * checked slots.
 *
 * The loop never runs a codec: encoding and decoding run on libuv's thread
 * pool (uv_queue_work), one job per request, as one backend batch. A Put
 * reserves a pool slot for each new block on the loop (store.h: reserved
 * blocks are invisible and cannot be evicted), the job encodes straight
 * into those slots, and its completion, back on the loop, commits them (or
 * aborts them all if the encode failed); no block is copied on the loop. A
 * Get job decodes straight from the pool slots; each block it reads is
 * held (vqkvd_store_hold) until the job is done, so neither a Release nor
 * an expiring lease nor eviction can reuse a slot * under it.
 *
 * Every job references its client and its region (session.h), so a client
 * that disconnects with work on the thread pool leaks nothing and crashes
 * nothing: the work finishes against the still-mapped region, Put results
 * are still stored (the bytes are good), and the reply is dropped.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "log.h"
#include "metrics.h"
#include "session.h"
#include "transcode.h"

/* How often leases are swept and the pool evicted down to its watermark. */
#define VQKVD_TICK_MS 100
/* A Pin with ttl_ms 0 pins for this long (about 36 million years) and the
 * connection remembers the block, to unpin it on Unpin or when it closes. */
#define VQKVD_PIN_FOREVER_MS (UINT64_C(1) << 60)
/* RegisterModel.model_id may be this long. */
#define VQKVD_MODEL_ID_MAX 256
/* Pool watermarks: evict above 90% down to 80%. */
#define VQKVD_HIGH_WATER 0.9
#define VQKVD_LOW_WATER 0.8

typedef enum { VQKVD_JOB_PUT, VQKVD_JOB_GET } vqkvd_job_kind_t;

/* A request this large (values read or written) is split by layers over
 * several of the thread pool's threads; smaller ones are not worth the
 * handoffs. */
#define VQKVD_SPLIT_VALUES (1u << 20)
/* The most parts a job is split into: libuv's pool has 4 threads unless
 * UV_THREADPOOL_SIZE says otherwise. */
#define VQKVD_JOB_PARTS 4

typedef struct vqkvd_job vqkvd_job_t;

/* A put (job) waiting for another's reserved block, its block index. */
typedef struct vqkvd_put_wait {
    struct vqkvd_put_wait *next;
    vqkvd_job_t *job;
    uint32_t index;
} vqkvd_put_wait_t;

/* One thread's share of a job: layers [first_layer, end_layer). */
typedef struct {
    uv_work_t work;
    vqkvd_job_t *job;
    uint32_t first_layer, end_layer;
    int rc;
    uint32_t failed;
} vqkvd_job_part_t;

/* One request on the thread pool, in one part or (a large get) several
 * that run at once. The arrays are allocated with the job. */
struct vqkvd_job {
    vqkvd_job_part_t parts[VQKVD_JOB_PARTS];
    uint32_t n_parts, parts_left;
    int status; /* the first part's failed uv status, 0 otherwise */
    vqkvd_job_kind_t kind;
    vqkvd_client_t *c;
    vqkvd_region_t *r;
    vqkvd_model_t *m;
    const vqkv_codec_t *codec; /* Put: the model's codec or its fallback */
    uint32_t cls;              /* Put: that codec's pool class */
    uint64_t request_id;
    uint64_t queued_ns; /* uv_hrtime when handed to the thread pool */
    uint32_t n;
    uint32_t *slots; /* region slots */
    int rc;          /* the first codec error, VQKV_OK otherwise */
    uint32_t failed; /* the block it came from */
    int work_done;   /* the thread pool is done with it (or it never went) */
    /* Put: blocks reserved in the store (NULL: not written, status says
     * why), written straight into their pool slots, committed when done */
    Vqkv__PutStatus *put_status;
    uint8_t **dst; /* the reserved blocks' slots; NULL for the others */
    uint32_t reserved;
    /* Put: blocks another put is writing. Told PRESENT, the client must
     * find them, so the reply waits until those puts have committed. */
    uint32_t waits;
    vqkvd_put_wait_t *waiters; /* the puts waiting for this one's blocks */
    /* Put: the reservations; Get: the blocks read, each held until done */
    vqkvd_block_t **blocks;
    /* Get */
    const uint8_t **src;         /* their pool slots, looked up on the loop */
    const vqkv_codec_t **codecs; /* what decodes each: codec or fallback */
};

/* ---- pool, store, timer ------------------------------------------------- */

static void vqkvd__on_tick(uv_timer_t *t)
{
    vqkvd_server_t *s = t->data;
    vqkvd_store_tick(&s->store, uv_now(s->loop));
    vqkvd_transcode_poll(s);
}

/* Chunks of 16 MiB, or a quarter of a small pool so that it still has a
 * few chunks (and a test's tiny pool can evict): a class strands at most a
 * chunk, and a block larger than a chunk cannot be stored. */
static uint64_t vqkvd__chunk_bytes(uint64_t pool_bytes)
{
    long page_l = sysconf(_SC_PAGESIZE);
    uint64_t page = page_l > 0 ? (uint64_t)page_l : 4096;
    uint64_t chunk = pool_bytes / 4;
    if (chunk > (16u << 20))
        chunk = 16u << 20;
    chunk -= chunk % page;
    return chunk < page ? page : chunk;
}

int vqkvd_session_start(vqkvd_server_t *s)
{
    s->backend = &vqkvd_backend_cpu;
    uint64_t chunk = vqkvd__chunk_bytes(s->cfg.pool_bytes);
    int rc = vqkvd_pool_init_cpu(&s->pool, s->cfg.pool_bytes, chunk);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot make a pool of %llu bytes: %s%s",
                  (unsigned long long)s->cfg.pool_bytes, vqkv_strerror(rc),
                  rc == VQKV_ENOMEM ? " (lower pool_bytes, or raise the memory limit)" : "");
        return rc == VQKV_ENOMEM ? -ENOMEM : -EINVAL;
    }
    /* The quotas are server.c's to set: a reload sets them again. */
    rc = vqkvd_store_init(&s->store, &s->pool, VQKVD_HIGH_WATER, VQKVD_LOW_WATER, NULL);
    if (rc != VQKV_OK) {
        vqkvd_store_destroy(&s->store);
        vqkvd_pool_destroy(&s->pool);
        return -ENOMEM;
    }
    uv_timer_init(s->loop, &s->tick); /* cannot fail */
    s->tick.data = s;
    uv_timer_start(&s->tick, vqkvd__on_tick, VQKVD_TICK_MS, VQKVD_TICK_MS);
    vqkvd_log(VQKVD_LOG_INFO, "pool: %llu bytes in %llu-byte chunks",
              (unsigned long long)s->cfg.pool_bytes, (unsigned long long)chunk);
    return 0;
}

void vqkvd_session_stop(vqkvd_server_t *s)
{
    if (s->tick.loop != NULL && !uv_is_closing((uv_handle_t *)&s->tick))
        uv_close((uv_handle_t *)&s->tick, NULL);
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
    vqkvd_store_destroy(&s->store);
    vqkvd_pool_destroy(&s->pool);
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

static int vqkvd__is_admin(const vqkvd_client_t *c)
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

    /* The pointers, then the entries, in one allocation: room for the
     * caller's own entry and every tenant the store knows. */
    uint32_t own = (uint32_t)c->uid;
    size_t cap = vqkvd__is_admin(c) ? (size_t)s->store.n_tenants + 1 : 1;
    size_t ptr_bytes = cap * sizeof *st->tenants;
    Vqkv__TenantStats **tenants = calloc(1, ptr_bytes + cap * sizeof(vqkvd_tenant_entry_t));
    if (tenants == NULL)
        return VQKV_ENOMEM;
    vqkvd_tenant_entry_t *entries = (vqkvd_tenant_entry_t *)((uint8_t *)tenants + ptr_bytes);
    vqkvd_tenant_stats_t t;
    vqkvd_store_tenant_stats(&s->store, own, &t);
    vqkvd__tenant_entry(&entries[0], &t);
    size_t n = 1;
    for (uint32_t i = 0; n < cap && i < s->store.n_tenants; i++)
        if (s->store.tenants[i].tenant != own)
            vqkvd__tenant_entry(&entries[n++], &s->store.tenants[i]);
    for (size_t i = 0; i < n; i++)
        tenants[i] = &entries[i].ts;
    st->n_tenants = n;
    st->tenants = tenants;
    return VQKV_OK;
}

/* ---- handles ------------------------------------------------------------- */

static vqkvd_model_t *vqkvd__client_model(const vqkvd_client_t *c, uint64_t handle)
{
    for (uint32_t i = 0; i < c->n_models; i++)
        if (c->models[i] == handle)
            return c->server->models[handle - 1];
    return NULL;
}

static vqkvd_region_t *vqkvd__client_region(const vqkvd_client_t *c, uint64_t handle)
{
    for (vqkvd_region_t *r = c->regions; r != NULL; r = r->next)
        if (r->handle == handle)
            return r;
    return NULL;
}

static void vqkvd__region_unref(vqkvd_region_t *r)
{
    if (--r->refs > 0)
        return;
    r->backend->region_close(&r->mem);
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

/* ---- RegisterModel --------------------------------------------------------- */

static vqkvd_model_t *vqkvd__model_find(const vqkvd_server_t *s, uint32_t tenant,
                                        const char *model_id, uint32_t first, uint32_t count)
{
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->tenant == tenant && m->kv_head_first == first && m->kv_head_count == count &&
            strcmp(m->model_id, model_id) == 0)
            return m;
    }
    return NULL;
}

/* Names the first field in which the registration `now` differs from the
 * model as registered (`was`, with codec spec was_spec), as
 * "num_kv_heads 4, registered 3"; 0 when none differs. With NULL specs the
 * layouts alone are compared. */
static int vqkvd__model_diff(const vqkv_layout_t *was, const char *was_spec,
                             const vqkv_layout_t *now, const char *now_spec, char *buf, size_t size)
{
    static const char *const dtypes[] = {"f16", "bf16", "f32"};
    const struct {
        const char *name;
        uint32_t was, now;
    } fields[] = {
        {"num_layers", was->num_layers, now->num_layers},
        {"num_kv_heads", was->num_kv_heads, now->num_kv_heads},
        {"head_dim", was->head_dim, now->head_dim},
        {"block_tokens", was->block_tokens, now->block_tokens},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (fields[i].was != fields[i].now) {
            snprintf(buf, size, "%s %u, registered %u", fields[i].name, (unsigned)fields[i].now,
                     (unsigned)fields[i].was);
            return 1;
        }
    if (was->dtype != now->dtype) { /* both checked by vqkv_layout_check */
        snprintf(buf, size, "dtype %s, registered %s", dtypes[now->dtype], dtypes[was->dtype]);
        return 1;
    }
    if (was_spec != NULL && now_spec != NULL && strcmp(was_spec, now_spec) != 0) {
        snprintf(buf, size, "codec %s, registered %s", now_spec, was_spec);
        return 1;
    }
    return 0;
}

/* A new model taking codec; NULL (codec still the caller's) on failure,
 * with *why set. */
static vqkvd_model_t *vqkvd__model_new(vqkvd_server_t *s, uint32_t tenant, const char *model_id,
                                       const Vqkv__RegisterModel *rm, const vqkv_layout_t *layout,
                                       vqkv_codec_t *codec, uint64_t logical, const char **why)
{
    vqkvd_model_t *m = NULL;
    *why = "out of memory";
    if (s->n_models == s->cap_models) {
        uint32_t cap = s->cap_models ? 2 * s->cap_models : 8;
        vqkvd_model_t **grown = realloc(s->models, cap * sizeof *grown);
        if (grown == NULL)
            goto fail;
        s->models = grown;
        s->cap_models = cap;
    }
    m = calloc(1, sizeof *m);
    if (m == NULL || (m->model_id = strdup(model_id)) == NULL)
        goto fail;
    size_t bb = vqkv_codec_block_bytes(codec);
    /* The class is taken last: a pool class cannot be given back. */
    int cls = bb <= UINT32_MAX ? vqkvd_pool_add_class(&s->pool, (uint32_t)bb) : VQKV_EINVAL;
    if (cls < 0) {
        *why = "the codec's block does not fit one pool chunk";
        goto fail;
    }
    m->id = s->n_models + 1;
    m->tenant = tenant;
    m->kv_head_first = rm->kv_head_first;
    m->kv_head_count = rm->kv_head_count;
    m->layout = *layout;
    m->codec = codec;
    m->ready = !vqkv_codec_needs_training(codec);
    m->cls = (uint32_t)cls;
    m->block_bytes = (uint32_t)bb;
    m->logical_bytes = (uint32_t)logical;
    s->models[s->n_models++] = m;
    return m;

fail:
    if (m != NULL)
        free(m->model_id);
    free(m);
    return NULL;
}

/* ModelRegistered for m: the reply to RegisterModel and FindModel. */
static void vqkvd__model_reply(vqkvd_client_t *c, uint64_t id, const vqkvd_model_t *m)
{
    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = m->layout.num_layers;
    wl.num_kv_heads = m->layout.num_kv_heads;
    wl.head_dim = m->layout.head_dim;
    wl.block_tokens = m->layout.block_tokens;
    wl.dtype = (Vqkv__DType)m->layout.dtype;
    Vqkv__ModelRegistered mr = VQKV__MODEL_REGISTERED__INIT;
    mr.model_handle = m->id;
    mr.codec = (char *)vqkv_codec_spec(m->codec);
    mr.block_bytes = m->block_bytes;
    mr.codebooks_ready = m->ready;
    mr.layout = &wl;
    mr.kv_head_first = m->kv_head_first;
    mr.kv_head_count = m->kv_head_count;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_MODEL_REGISTERED;
    env.model_registered = &mr;
    vqkvd_client_reply(c, &env);
}

/* A fresh codec like m's holding the codebook file open on fd; NULL with
 * *rc and *why set when the file does not hold codebooks for it. */
static vqkv_codec_t *vqkvd__codebook_read(const vqkvd_model_t *m, int fd, int *rc, const char **why)
{
    vqkv_codec_t *codec = NULL;
    *why = "out of memory";
    *rc = vqkv_codec_create(vqkv_codec_spec(m->codec), &m->layout, &codec);
    if (*rc == VQKV_OK)
        *rc = vqkvd_calib_load_fd(codec, fd, why);
    if (*rc != VQKV_OK) {
        vqkv_codec_free(codec);
        return NULL;
    }
    return codec;
}

/* 1 when a and b hold the same codebooks (compared as saved files). */
static int vqkvd__codebooks_equal(const vqkv_codec_t *a, const vqkv_codec_t *b)
{
    uint8_t *ba = NULL, *bb = NULL;
    size_t la = 0, lb = 0;
    int equal = vqkv_codebook_save_buffer(a, &ba, &la) == VQKV_OK &&
                vqkv_codebook_save_buffer(b, &bb, &lb) == VQKV_OK && la == lb &&
                memcmp(ba, bb, la) == 0;
    free(ba);
    free(bb);
    return equal;
}

/* Codebooks sent for a model already registered. Taken while it has none
 * (its fp16 blocks keep their fallback); once it has some, accepted only
 * when equal, since blocks already encoded with them would decode wrongly
 * under others. Swapping m->codec is safe while it is not ready: no job
 * reads it, and no block of its class exists. */
static int vqkvd__model_take_codebooks(vqkvd_model_t *m, int fd, const char **why)
{
    if (vqkvd_calib_training(m)) {
        *why = "the model is training its own codebooks; register it again without a file";
        return VQKV_EMISMATCH;
    }
    int rc;
    vqkv_codec_t *sent = vqkvd__codebook_read(m, fd, &rc, why);
    if (sent == NULL)
        return rc;
    if (m->ready) {
        rc = vqkvd__codebooks_equal(sent, m->codec) ? VQKV_OK : VQKV_EMISMATCH;
        *why = "the model already stores blocks with other codebooks";
        vqkv_codec_free(sent);
        return rc;
    }
    vqkv_codec_free(m->codec);
    m->codec = sent;
    m->ready = 1;
    vqkvd_calib_free(m);
    return VQKV_OK;
}

static void vqkvd__register_model(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                  const vqkv_frame_t *frame)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__RegisterModel *rm = req->register_model;
    const Vqkv__Layout *wl = rm->layout;
    vqkv_codec_t *codec = NULL;
    uint64_t id = req->request_id;

    size_t id_len = strlen(rm->model_id);
    if (id_len == 0 || id_len > VQKVD_MODEL_ID_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "model_id must have 1 to %d bytes, not %zu",
                           VQKVD_MODEL_ID_MAX, id_len);
        return;
    }
    if (wl == NULL) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "RegisterModel has no layout");
        return;
    }
    if (rm->kv_head_count == 0 || rm->kv_head_first > wl->num_kv_heads ||
        rm->kv_head_count > wl->num_kv_heads - rm->kv_head_first) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "kv heads [%u, +%u) are not within the %u of %s",
                           (unsigned)rm->kv_head_first, (unsigned)rm->kv_head_count,
                           (unsigned)wl->num_kv_heads, rm->model_id);
        return;
    }
    vqkv_layout_t layout = {wl->num_layers, rm->kv_head_count, wl->head_dim, wl->block_tokens,
                            (vqkv_dtype_t)wl->dtype};
    if (vqkv_layout_check(&layout) != VQKV_OK) {
        vqkvd_client_error(c, id, VQKV_EINVAL,
                           "layout %u layers x %u heads x %u dims x %u tokens (dtype %d) is not "
                           "valid (head_dim even, at most %d)",
                           (unsigned)layout.num_layers, (unsigned)layout.num_kv_heads,
                           (unsigned)layout.head_dim, (unsigned)layout.block_tokens,
                           (int)layout.dtype, VQKV_MAX_HEAD_DIM);
        return;
    }
    /* Uncompressed bytes of one block: K and V of every layer, token, head. */
    uint64_t logical = (uint64_t)layout.num_layers * 2 * layout.block_tokens * layout.num_kv_heads *
                       layout.head_dim * vqkv_dtype_size(layout.dtype);
    if (logical > UINT32_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "a block of %llu bytes is too large",
                           (unsigned long long)logical);
        return;
    }
    int rc = vqkv_codec_create(rm->codec, &layout, &codec);
    if (rc != VQKV_OK) {
        vqkvd_client_error(c, id, rc, "codec \"%s\": %s", rm->codec, vqkv_strerror(rc));
        return;
    }
    const char *spec = vqkv_codec_spec(codec);
    if (rm->num_fds > 1 || frame->n_fds != rm->num_fds) {
        vqkvd_client_error(c, id, VQKV_EFDS,
                           "RegisterModel comes with 0 fds or 1 (a codebook file): num_fds %u, "
                           "%zu came",
                           (unsigned)rm->num_fds, frame->n_fds);
        goto cleanup;
    }
    int codebook_fd = frame->n_fds == 1 ? frame->fds[0] : -1;
    if (codebook_fd >= 0 && !vqkv_codec_needs_training(codec)) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "codec %s has no codebooks to load", spec);
        goto cleanup;
    }
    vqkvd_model_t *m =
        vqkvd__model_find(s, (uint32_t)c->uid, rm->model_id, rm->kv_head_first, rm->kv_head_count);
    char differs[160];
    if (m != NULL && vqkvd__model_diff(&m->layout, vqkv_codec_spec(m->codec), &layout, spec,
                                       differs, sizeof differs)) {
        vqkvd_client_error(c, id, VQKV_EMISMATCH,
                           "model \"%s\" is registered otherwise: this registration says %s",
                           rm->model_id, differs);
        goto cleanup;
    }
    if ((m == NULL || vqkvd__client_model(c, m->id) == NULL) &&
        c->n_models == VQKVD_CLIENT_MAX_MODELS) {
        vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %d models",
                           VQKVD_CLIENT_MAX_MODELS);
        goto cleanup;
    }
    const char *why;
    if (m != NULL && codebook_fd >= 0) {
        rc = vqkvd__model_take_codebooks(m, codebook_fd, &why);
        if (rc != VQKV_OK) {
            vqkvd_client_error(c, id, rc, "model \"%s\": %s", rm->model_id, why);
            goto cleanup;
        }
    }
    if (m == NULL) {
        if (codebook_fd >= 0 && (rc = vqkvd_calib_load_fd(codec, codebook_fd, &why)) != VQKV_OK) {
            vqkvd_client_error(c, id, rc, "model \"%s\": %s", rm->model_id, why);
            goto cleanup;
        }
        m = vqkvd__model_new(s, (uint32_t)c->uid, rm->model_id, rm, &layout, codec, logical, &why);
        if (m == NULL) {
            vqkvd_client_error(c, id, VQKV_ENOMEM, "model \"%s\": %s", rm->model_id, why);
            goto cleanup;
        }
        codec = NULL; /* the model's now */
        /* Registered even when calibration cannot start: its Puts then say
         * why, and a later RegisterModel with a codebook file mends it. */
        if (!m->ready && !vqkvd_calib_load_saved(s, m) &&
            (rc = vqkvd_calib_begin(s, m)) != VQKV_OK) {
            vqkvd_client_error(c, id, rc, "model \"%s\": cannot start calibration: %s",
                               rm->model_id, vqkv_strerror(rc));
            goto cleanup;
        }
        vqkvd_log(VQKVD_LOG_INFO, "model %u: \"%s\" heads [%u, +%u) codec %s, %u-byte blocks",
                  (unsigned)m->id, m->model_id, (unsigned)m->kv_head_first,
                  (unsigned)m->kv_head_count, vqkv_codec_spec(m->codec), (unsigned)m->block_bytes);
    }
    if (vqkvd__client_model(c, m->id) == NULL)
        c->models[c->n_models++] = m->id;

    vqkvd__model_reply(c, id, m);

cleanup:
    vqkv_codec_free(codec);
}

/* ---- RegisterRegion -------------------------------------------------------- */

static void vqkvd__register_region(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                   const vqkv_frame_t *frame)
{
    const Vqkv__RegisterRegion *rr = req->register_region;
    uint64_t id = req->request_id;

    if (rr->cuda_ipc_handle.len > 0 || rr->device != 0) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "cuda_ipc_handle and device are reserved");
        return;
    }
    if (rr->num_fds != 1 || frame->n_fds != 1) {
        vqkvd_client_error(c, id, VQKV_EFDS,
                           "a MEMFD region comes with exactly 1 fd (num_fds %u, %zu came)",
                           (unsigned)rr->num_fds, frame->n_fds);
        return;
    }
    vqkvd_model_t *m = vqkvd__client_model(c, rr->model_handle);
    if (m == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "no model %llu on this connection",
                           (unsigned long long)rr->model_handle);
        return;
    }
    if (c->n_regions >= c->server->cfg.max_regions) {
        vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %u regions",
                           (unsigned)c->server->cfg.max_regions);
        return;
    }
    if (rr->region_bytes == 0 || rr->offset >= rr->region_bytes) {
        vqkvd_client_error(c, id, VQKV_ERANGE, "offset %llu is outside the region's %llu bytes",
                           (unsigned long long)rr->offset, (unsigned long long)rr->region_bytes);
        return;
    }
    if (rr->n_layer_offsets != 0 && rr->n_layer_offsets != m->layout.num_layers) {
        vqkvd_client_error(c, id, VQKV_EINVAL,
                           "layer_offsets has %zu entries; the model has %u layers (or give none)",
                           rr->n_layer_offsets, (unsigned)m->layout.num_layers);
        return;
    }
    vqkv_kv_view_t view = {
        rr->region_bytes, rr->offset,      rr->layer_stride,
        rr->kv_stride,    rr->slot_stride, rr->token_stride,
        rr->head_stride,  rr->num_slots,   rr->n_layer_offsets > 0 ? rr->layer_offsets : NULL};
    /* Strides are unsigned, so the last slot reaches furthest: checking it
     * checks every slot, once, here instead of per request. */
    if (rr->num_slots == 0 || vqkv_kv_view_check(&m->layout, &view, rr->num_slots - 1) != VQKV_OK) {
        vqkvd_client_error(c, id, VQKV_ERANGE,
                           "the view of %u slots reaches past the region's %llu bytes",
                           (unsigned)rr->num_slots, (unsigned long long)rr->region_bytes);
        return;
    }
    const char *stride;
    if (vqkv_kv_view_disjoint(&m->layout, &view, &stride) != VQKV_OK) {
        if (stride != NULL && strcmp(stride, "layer_offsets") == 0)
            vqkvd_client_error(c, id, VQKV_EINVAL,
                               "the view overlaps itself: by its layer_offsets a layer starts "
                               "before the one below it ends, so blocks would overwrite each "
                               "other");
        else
            vqkvd_client_error(c, id, VQKV_EINVAL,
                               "the view overlaps itself: its %s is too small to step past what "
                               "the smaller strides span, so blocks would overwrite each other",
                               stride != NULL ? stride : "strides");
        return;
    }
    vqkvd_region_t *r = calloc(1, sizeof *r);
    size_t offsets_bytes = rr->n_layer_offsets * sizeof *rr->layer_offsets;
    if (r != NULL && offsets_bytes > 0 && (r->layer_offsets = malloc(offsets_bytes)) == NULL) {
        free(r);
        r = NULL;
    }
    if (r == NULL) {
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return;
    }
    if (offsets_bytes > 0) /* the request's copy goes with the frame */
        memcpy(r->layer_offsets, rr->layer_offsets, offsets_bytes);
    view.layer_offsets = r->layer_offsets;
    const char *why;
    int rc = c->server->backend->region_open(rr, frame->fds[0], &r->mem, &why);
    if (rc != VQKV_OK) {
        free(r->layer_offsets);
        free(r);
        vqkvd_client_error(c, id, rc, "region of %llu bytes: %s",
                           (unsigned long long)rr->region_bytes, why);
        return;
    }
    r->backend = c->server->backend;
    r->handle = ++c->next_region;
    r->refs = 1; /* the client's list */
    r->model = m;
    r->view = view;
    r->next = c->regions;
    c->regions = r;
    c->n_regions++;

    Vqkv__RegionRegistered rg = VQKV__REGION_REGISTERED__INIT;
    rg.region_handle = r->handle;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_REGION_REGISTERED;
    env.region_registered = &rg;
    vqkvd_client_reply(c, &env);
}

/* Whether region r can hold model m's blocks: a region serves every model
 * of its own model's shape (one memfd for several models, a model and its
 * draft); otherwise replies VQKV_EMISMATCH naming the field that differs. */
static bool vqkvd__region_fits(vqkvd_client_t *c, uint64_t id, const vqkvd_region_t *r,
                               const vqkvd_model_t *m)
{
    char differs[160];
    if (r->model == m ||
        !vqkvd__model_diff(&r->model->layout, NULL, &m->layout, NULL, differs, sizeof differs))
        return true;
    vqkvd_client_error(c, id, VQKV_EMISMATCH,
                       "region %llu is shaped for model %u, which model %u does not fit (%s)",
                       (unsigned long long)r->handle, (unsigned)r->model->id, (unsigned)m->id,
                       differs);
    return false;
}

/* ---- jobs ---------------------------------------------------------------- */

static vqkvd_job_t *vqkvd__job_new(vqkvd_job_kind_t kind, vqkvd_client_t *c, vqkvd_region_t *r,
                                   vqkvd_model_t *m, uint64_t request_id, uint32_t n)
{
    vqkvd_job_t *j = calloc(1, sizeof *j);
    if (j == NULL)
        return NULL;
    j->kind = kind;
    j->c = c;
    j->r = r;
    j->m = m;
    j->request_id = request_id;
    j->n = n;
    j->slots = calloc(n ? n : 1, sizeof *j->slots);
    if (j->slots == NULL) {
        free(j);
        return NULL;
    }
    return j;
}

static void vqkvd__job_free(vqkvd_job_t *j)
{
    free(j->slots);
    free(j->put_status);
    free(j->dst);
    free(j->blocks);
    free(j->src);
    free(j->codecs);
    free(j);
}

static void vqkvd__job_after(uv_work_t *w, int status);

/* Runs on a pool thread: only the job, the codecs and the region's memory,
 * the part's layers of every block. */
static void vqkvd__job_work(uv_work_t *w)
{
    vqkvd_job_part_t *part = w->data;
    vqkvd_job_t *j = part->job;
    vqkvd_batch_t b = {.base = j->r->mem.base,
                       .view = &j->r->view,
                       .slots = j->slots,
                       .n = j->n,
                       .first_layer = part->first_layer,
                       .end_layer = part->end_layer};
    if (j->kind == VQKVD_JOB_PUT) {
        b.codec = j->codec;
        b.dst = j->dst;
        part->rc = j->r->backend->encode(&b);
    } else {
        b.codecs = j->codecs;
        b.src = j->src;
        part->rc = j->r->backend->decode(&b);
    }
    part->failed = b.failed;
}

/* Back on the loop once per part; the last one finishes the job. */
static void vqkvd__job_part_after(uv_work_t *w, int status)
{
    vqkvd_job_part_t *part = w->data;
    vqkvd_job_t *j = part->job;
    if (status < 0 && j->status == 0)
        j->status = status;
    if (part->rc != VQKV_OK && j->rc == VQKV_OK) {
        j->rc = part->rc;
        j->failed = part->failed;
    }
    if (--j->parts_left == 0)
        vqkvd__job_after(&j->parts[0].work, j->status);
}

/* The references a job holds from the moment it is handed on until it
 * ends: its client (freed only after) and its region (closed only after). */
static void vqkvd__job_hold(vqkvd_job_t *j)
{
    j->c->refs++;
    j->c->pending++;
    j->r->refs++;
}

/* Hands j to the thread pool, holding its client and region: a large
 * request in up to VQKVD_JOB_PARTS parts by layers, anything else in one.
 * The parts that were queued finish the job even if a later one cannot be. */
static int vqkvd__job_queue(vqkvd_job_t *j)
{
    uint32_t layers = j->m->layout.num_layers, parts = 1;
    if ((uint64_t)j->n * j->m->logical_bytes / vqkv_dtype_size(j->m->layout.dtype) >=
        VQKVD_SPLIT_VALUES)
        parts = layers < VQKVD_JOB_PARTS ? layers : VQKVD_JOB_PARTS;
    j->queued_ns = uv_hrtime();
    j->n_parts = j->parts_left = parts;
    for (uint32_t i = 0; i < parts; i++) {
        vqkvd_job_part_t *part = &j->parts[i];
        part->job = j;
        part->work.data = part;
        part->first_layer = layers * i / parts;
        part->end_layer = layers * (i + 1) / parts;
        int rc =
            uv_queue_work(j->c->server->loop, &part->work, vqkvd__job_work, vqkvd__job_part_after);
        if (rc < 0) {
            if (i == 0)
                return rc;
            /* The queued parts finish the job, as failed. */
            j->parts_left -= parts - i;
            j->rc = VQKV_ENOMEM;
            break;
        }
    }
    vqkvd__job_hold(j);
    return 0;
}

static void vqkvd__job_maybe_end(vqkvd_job_t *j);

/* Back on the loop, the Put's blocks in their slots: commits them (stored
 * even when the client has gone: the bytes are good), or aborts them all
 * when the encode failed, children before parents. Then the puts waiting
 * for them may answer; a block aborted under one becomes NO_SPACE there. */
static void vqkvd__put_commit(vqkvd_job_t *j, int failed)
{
    vqkvd_server_t *s = j->c->server;
    for (uint32_t k = j->n; k-- > 0;) {
        vqkvd_block_t *b = j->blocks[k];
        if (b == NULL)
            continue;
        if (failed) {
            vqkvd_store_abort(&s->store, b);
            continue;
        }
        vqkvd_store_commit(&s->store, b);
        if (j->codec == j->m->fallback)
            vqkvd_calib_add(s, j->m, j->dst[k]);
    }
    while (j->waiters != NULL) {
        vqkvd_put_wait_t *w = j->waiters;
        j->waiters = w->next;
        if (failed)
            w->job->put_status[w->index] = VQKV__PUT_STATUS__PUT_NO_SPACE;
        if (--w->job->waits == 0)
            vqkvd__job_maybe_end(w->job);
        free(w);
    }
}

static void vqkvd__job_reply(vqkvd_job_t *j)
{
    vqkvd_client_t *c = j->c;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = j->request_id;
    if (j->status < 0) {
        vqkvd_client_error(c, j->request_id, VQKV_EIO, "cannot run the job: %s",
                           uv_strerror(j->status));
    } else if (j->rc != VQKV_OK) {
        vqkvd_client_error(c, j->request_id, j->rc, "block %u (slot %u): %s", (unsigned)j->failed,
                           (unsigned)j->slots[j->failed], vqkv_strerror(j->rc));
    } else if (j->kind == VQKVD_JOB_PUT) {
        Vqkv__PutDone pd = VQKV__PUT_DONE__INIT;
        pd.stored = j->reserved;
        pd.n_status = j->n;
        pd.status = j->put_status;
        env.body_case = VQKV__ENVELOPE__BODY_PUT_DONE;
        env.put_done = &pd;
        vqkvd_client_reply(c, &env);
    } else {
        Vqkv__GetDone gd = VQKV__GET_DONE__INIT;
        gd.written = j->n;
        env.body_case = VQKV__ENVELOPE__BODY_GET_DONE;
        env.get_done = &gd;
        vqkvd_client_reply(c, &env);
    }
}

/* Answers and frees a job once its work is done and nothing it waits for
 * is outstanding; drops what vqkvd__job_hold took. */
static void vqkvd__job_maybe_end(vqkvd_job_t *j)
{
    if (!j->work_done || j->waits > 0)
        return;
    vqkvd_client_t *c = j->c;
    vqkvd__job_reply(j);
    c->pending--;
    vqkvd_metrics_observe(&c->server->counters,
                          j->kind == VQKVD_JOB_PUT ? VQKVD_TIMED_PUT : VQKVD_TIMED_GET,
                          uv_hrtime() - j->queued_ns);
    vqkvd__region_unref(j->r);
    vqkvd__job_free(j);
    vqkvd_client_settle(c);
    vqkvd_client_unref(c);
}

static void vqkvd__job_after(uv_work_t *w, int status)
{
    vqkvd_job_t *j = ((vqkvd_job_part_t *)w->data)->job;
    if (status < 0 && j->status == 0)
        j->status = status;
    if (j->kind == VQKVD_JOB_GET)
        for (uint32_t i = 0; i < j->n; i++)
            vqkvd_store_unhold(j->blocks[i]);
    else
        vqkvd__put_commit(j, j->status < 0 || j->rc != VQKV_OK);
    j->work_done = 1;
    vqkvd__job_maybe_end(j);
}

/* ---- Put ------------------------------------------------------------------ */

/* The model of a Put whose handles, counts, key sizes and slots are all
 * good (*rp its region); NULL after an Error reply. */
static vqkvd_model_t *vqkvd__put_check(vqkvd_client_t *c, uint64_t id, const Vqkv__Put *p,
                                       vqkvd_region_t **rp)
{
    vqkvd_model_t *m = vqkvd__client_model(c, p->model_handle);
    vqkvd_region_t *r = vqkvd__client_region(c, p->region_handle);
    if (m == NULL || r == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "no %s %llu on this connection",
                           m == NULL ? "model" : "region",
                           (unsigned long long)(m == NULL ? p->model_handle : p->region_handle));
        return NULL;
    }
    if (!vqkvd__region_fits(c, id, r, m))
        return NULL;
    if (p->cuda_event.len > 0) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "cuda_event is reserved for the CUDA backend");
        return NULL;
    }
    size_t n = p->n_keys;
    if (p->n_parent_keys != n || p->n_slots != n) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "%zu keys, %zu parent_keys and %zu slots differ", n,
                           p->n_parent_keys, p->n_slots);
        return NULL;
    }
    if (!m->ready && m->fallback == NULL) {
        vqkvd_client_error(c, id, VQKV_ENOCODEBOOK,
                           "model %u has no codebooks (calibration "
                           "could not start); register it with a codebook file",
                           (unsigned)m->id);
        return NULL;
    }
    uint32_t bytes = m->ready ? m->block_bytes : m->fallback_bytes;
    if ((uint64_t)n * bytes > VQKV_PUT_STAGING_MAX) {
        vqkvd_client_error(c, id, VQKV_ELIMIT, "a Put of %zu blocks of %u bytes is over %u bytes",
                           n, (unsigned)bytes, VQKV_PUT_STAGING_MAX);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (p->keys[i].len != VQKVD_KEY_BYTES ||
            (p->parent_keys[i].len != 0 && p->parent_keys[i].len != VQKVD_KEY_BYTES)) {
            vqkvd_client_error(c, id, VQKV_EINVAL, "block %zu: keys are %d bytes", i,
                               VQKVD_KEY_BYTES);
            return NULL;
        }
        if (p->slots[i] >= r->view.num_slots) {
            vqkvd_client_error(c, id, VQKV_ERANGE, "block %zu: slot %u outside region of %u slots",
                               i, (unsigned)p->slots[i], (unsigned)r->view.num_slots);
            return NULL;
        }
    }
    *rp = r;
    return m;
}

/* Makes j's reply wait for writer's commit of j's block i. Without memory
 * for the wait, the block is reported NO_SPACE rather than PRESENT too
 * early. */
static void vqkvd__put_wait(vqkvd_job_t *j, uint32_t i, vqkvd_job_t *writer)
{
    vqkvd_put_wait_t *w = malloc(sizeof *w);
    if (w == NULL) {
        j->put_status[i] = VQKV__PUT_STATUS__PUT_NO_SPACE;
        return;
    }
    w->job = j;
    w->index = i;
    w->next = writer->waiters;
    writer->waiters = w;
    j->waits++;
}

/* Reserves a pool slot for each block of the Put that is not there yet, in
 * request order, so that a chain's blocks find their parents among its
 * own reservations. The job is the reservations' writer: it lives until it
 * has committed or aborted them all. Eviction for room happens here, before
 * the encode: a put whose encode then fails has evicted for nothing, which
 * only a defect can cause. */
static void vqkvd__put_reserve(vqkvd_job_t *j, const Vqkv__Put *p, uint64_t now)
{
    vqkvd_server_t *s = j->c->server;
    for (uint32_t i = 0; i < j->n; i++) {
        vqkvd_block_t *b = NULL;
        const uint8_t *parent =
            p->parent_keys[i].len == VQKVD_KEY_BYTES ? p->parent_keys[i].data : NULL;
        int rc =
            vqkvd_store_reserve(&s->store, (uint64_t)(uintptr_t)j, (uint32_t)j->c->uid, j->m->id,
                                p->keys[i].data, parent, j->cls, j->m->logical_bytes, now, &b);
        j->slots[i] = p->slots[i];
        switch (rc) {
        case VQKV_OK:
            j->blocks[i] = b;
            j->dst[i] = vqkvd_pool_slot_ptr(&s->pool, b->slot);
            j->put_status[i] = VQKV__PUT_STATUS__PUT_STORED;
            j->reserved++;
            break;
        case VQKVD_STORE_PRESENT:
            j->put_status[i] = VQKV__PUT_STATUS__PUT_PRESENT;
            if (b->writer != 0 && b->writer != (uint64_t)(uintptr_t)j)
                vqkvd__put_wait(j, i, (vqkvd_job_t *)(uintptr_t)b->writer);
            break;
        case VQKVD_STORE_NOPARENT: j->put_status[i] = VQKV__PUT_STATUS__PUT_NO_PARENT; break;
        case VQKV_EQUOTA: j->put_status[i] = VQKV__PUT_STATUS__PUT_OVER_QUOTA; break;
        default: j->put_status[i] = VQKV__PUT_STATUS__PUT_NO_SPACE; break;
        }
    }
}

static void vqkvd__put(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Put *p = req->put;
    uint64_t id = req->request_id;
    vqkvd_region_t *r = NULL;

    vqkvd_model_t *m = vqkvd__put_check(c, id, p, &r);
    if (m == NULL)
        return;
    size_t cnt = p->n_keys ? p->n_keys : 1;
    vqkvd_job_t *j = vqkvd__job_new(VQKVD_JOB_PUT, c, r, m, id, (uint32_t)p->n_keys);
    if (j != NULL) {
        j->put_status = calloc(cnt, sizeof *j->put_status);
        j->dst = calloc(cnt, sizeof *j->dst);
        j->blocks = calloc(cnt, sizeof *j->blocks);
    }
    if (j == NULL || j->put_status == NULL || j->dst == NULL || j->blocks == NULL) {
        if (j != NULL)
            vqkvd__job_free(j);
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return;
    }
    /* Chosen now, for the whole request: a model that turns ready while
     * the job runs still stores these blocks in the fallback's class. */
    j->codec = m->ready ? m->codec : m->fallback;
    j->cls = m->ready ? m->cls : m->fallback_cls;
    vqkvd__put_reserve(j, p, uv_now(s->loop));
    int rc = j->reserved > 0 ? vqkvd__job_queue(j) : 0;
    if (j->reserved == 0 || rc < 0) {
        /* Nothing to write, or no way to: ends now, or once the puts it
         * waits for have committed. */
        vqkvd__job_hold(j);
        j->queued_ns = uv_hrtime();
        j->status = rc;
        j->work_done = 1;
        if (rc < 0)
            vqkvd__put_commit(j, 1);
        vqkvd__job_maybe_end(j);
    }
}

/* ---- Lookup, Get, Release ---------------------------------------------------- */

/* The model of a request naming keys, once the handle, the number of keys
 * and every key's size are checked; NULL after an Error reply. */
static vqkvd_model_t *vqkvd__keys_check(vqkvd_client_t *c, uint64_t id, const char *what,
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
static void vqkvd__ack(vqkvd_client_t *c, uint64_t id, uint32_t count)
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
static uint8_t *vqkvd__keys_flat(vqkvd_client_t *c, uint64_t id, const ProtobufCBinaryData *keys,
                                 size_t n)
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

static void vqkvd__lookup(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Lookup *lk = req->lookup;
    uint64_t id = req->request_id;
    vqkvd_model_t *m = vqkvd__keys_check(c, id, "a lookup", lk->model_handle, lk->n_keys, lk->keys);
    if (m == NULL)
        return;
    uint8_t *keys = vqkvd__keys_flat(c, id, lk->keys, lk->n_keys);
    if (keys == NULL)
        return;
    uint64_t lease = 0;
    int rc = vqkvd_store_lookup(&s->store, (uint32_t)c->uid, m->id, keys, (uint32_t)lk->n_keys,
                                uv_now(s->loop), c->id, s->cfg.lease_ms, &lease, NULL);
    free(keys);
    if (rc < 0) {
        vqkvd_client_error(c, id, rc, "lookup: %s", vqkv_proto_strerror(rc));
        return;
    }
    Vqkv__LookupResult lr = VQKV__LOOKUP_RESULT__INIT;
    lr.present = (uint32_t)rc;
    lr.lease_id = lease;
    lr.lease_ttl_ms = lease != 0 ? s->cfg.lease_ms : 0;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP_RESULT;
    env.lookup_result = &lr;
    vqkvd_client_reply(c, &env);
}

static void vqkvd__get(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Get *g = req->get;
    uint64_t id = req->request_id;

    vqkvd_region_t *r = vqkvd__client_region(c, g->region_handle);
    if (r == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "no region %llu on this connection",
                           (unsigned long long)g->region_handle);
        return;
    }
    const vqkvd_lease_t *l = vqkvd_store_lease_find(&s->store, g->lease_id, c->id, uv_now(s->loop));
    if (l == NULL) {
        vqkvd_client_error(c, id, VQKV_ELEASE,
                           "lease %llu is not held by this connection (released, expired, or "
                           "another's)",
                           (unsigned long long)g->lease_id);
        return;
    }
    if (g->n_slots > l->n) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "%zu slots for a lease of %u blocks", g->n_slots,
                           (unsigned)l->n);
        return;
    }
    for (size_t i = 0; i < g->n_slots; i++) {
        if (g->slots[i] >= r->view.num_slots) {
            vqkvd_client_error(c, id, VQKV_ERANGE, "block %zu: slot %u outside region of %u slots",
                               i, (unsigned)g->slots[i], (unsigned)r->view.num_slots);
            return;
        }
    }
    /* A lease holds blocks of one model, the one its lookup named. */
    vqkvd_model_t *lm = l->n > 0 ? s->models[l->blocks[0]->model - 1] : r->model;
    if (!vqkvd__region_fits(c, id, r, lm))
        return;
    vqkvd_job_t *j = vqkvd__job_new(VQKVD_JOB_GET, c, r, lm, id, (uint32_t)g->n_slots);
    if (j != NULL) {
        j->blocks = calloc(g->n_slots ? g->n_slots : 1, sizeof *j->blocks);
        j->src = calloc(g->n_slots ? g->n_slots : 1, sizeof *j->src);
        j->codecs = calloc(g->n_slots ? g->n_slots : 1, sizeof *j->codecs);
    }
    if (j == NULL || j->blocks == NULL || j->src == NULL || j->codecs == NULL) {
        if (j != NULL)
            vqkvd__job_free(j);
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return;
    }
    for (size_t i = 0; i < g->n_slots; i++) {
        j->slots[i] = g->slots[i];
        j->blocks[i] = l->blocks[i];
        j->src[i] = vqkvd_pool_slot_ptr(&s->pool, l->blocks[i]->slot);
        /* Blocks put before the model's codebooks were ready are fp16. */
        j->codecs[i] = lm->fallback != NULL && l->blocks[i]->cls == lm->fallback_cls ? lm->fallback
                                                                                     : lm->codec;
    }
    int rc = vqkvd__job_queue(j);
    if (rc < 0) {
        vqkvd_client_error(c, id, VQKV_EIO, "cannot queue the work: %s", uv_strerror(rc));
        vqkvd__job_free(j);
        return;
    }
    /* The job's own hold: the slots stay put whatever happens to the lease. */
    for (uint32_t i = 0; i < j->n; i++)
        vqkvd_store_hold(j->blocks[i]);
}

static void vqkvd__release(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    int rc = vqkvd_store_release(&c->server->store, c->id, req->release->lease_id);
    if (rc != VQKV_OK) {
        vqkvd_client_error(c, req->request_id, rc, "lease %llu is not held by this connection",
                           (unsigned long long)req->release->lease_id);
        return;
    }
    vqkvd__ack(c, req->request_id, 0);
}

/* ---- Pin, Unpin --------------------------------------------------------------- */

/* c's ttl_ms 0 pins are a hash table with linear probing; the keys are
 * already hashes, so their first bytes are the hash. */
static uint32_t vqkvd__pin_hash(uint32_t model, const uint8_t *key)
{
    uint64_t h;
    memcpy(&h, key, sizeof h);
    h ^= (uint64_t)model * UINT64_C(0x9e3779b97f4a7c15);
    return (uint32_t)(h ^ (h >> 32));
}

/* The slot of (model, key) in c's pins, or -1. */
static long vqkvd__pin_index(const vqkvd_client_t *c, uint32_t model, const uint8_t *key)
{
    if (c->cap_pins == 0)
        return -1;
    uint32_t mask = c->cap_pins - 1;
    for (uint32_t i = vqkvd__pin_hash(model, key) & mask; c->pins[i].model != 0; i = (i + 1) & mask)
        if (c->pins[i].model == model && memcmp(c->pins[i].key, key, VQKVD_KEY_BYTES) == 0)
            return (long)i;
    return -1;
}

/* Adds (model, key), absent, to c's pins; the table has room. */
static void vqkvd__pin_add(vqkvd_client_t *c, uint32_t model, const uint8_t *key)
{
    uint32_t mask = c->cap_pins - 1;
    uint32_t i = vqkvd__pin_hash(model, key) & mask;
    while (c->pins[i].model != 0)
        i = (i + 1) & mask;
    c->pins[i].model = model;
    memcpy(c->pins[i].key, key, VQKVD_KEY_BYTES);
    c->n_pins++;
}

/* Empties slot i, moving later entries of its run back (no tombstones). */
static void vqkvd__pin_remove_at(vqkvd_client_t *c, uint32_t i)
{
    uint32_t mask = c->cap_pins - 1;
    for (uint32_t j = (i + 1) & mask; c->pins[j].model != 0; j = (j + 1) & mask) {
        uint32_t home = vqkvd__pin_hash(c->pins[j].model, c->pins[j].key) & mask;
        /* j's entry may move to i unless its home lies cyclically in (i, j]. */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            c->pins[i] = c->pins[j];
            i = j;
        }
    }
    c->pins[i].model = 0;
    c->n_pins--;
}

static void vqkvd__pin_forget(vqkvd_client_t *c, uint32_t model, const uint8_t *key)
{
    long i = vqkvd__pin_index(c, model, key);
    if (i >= 0)
        vqkvd__pin_remove_at(c, (uint32_t)i);
}

/* Room for want entries at a load of at most one half. */
static int vqkvd__pin_reserve(vqkvd_client_t *c, uint32_t want)
{
    if ((uint64_t)want * 2 <= c->cap_pins)
        return VQKV_OK;
    uint32_t cap = c->cap_pins ? c->cap_pins : 64;
    while ((uint64_t)want * 2 > cap)
        cap *= 2;
    vqkvd_pin_t *old = c->pins;
    uint32_t old_cap = c->cap_pins;
    c->pins = calloc(cap, sizeof *c->pins);
    if (c->pins == NULL) {
        c->pins = old;
        return VQKV_ENOMEM;
    }
    c->cap_pins = cap;
    c->n_pins = 0;
    for (uint32_t i = 0; i < old_cap; i++)
        if (old[i].model != 0)
            vqkvd__pin_add(c, old[i].model, old[i].key);
    free(old);
    return VQKV_OK;
}

static void vqkvd__pin(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Pin *p = req->pin;
    uint64_t id = req->request_id;
    vqkvd_model_t *m = vqkvd__keys_check(c, id, "a pin", p->model_handle, p->n_keys, p->keys);
    if (m == NULL)
        return;
    uint32_t tenant = (uint32_t)c->uid;
    int forever = p->ttl_ms == 0;
    if (forever) {
        /* Room for every key up front, so a pin is never half done. */
        if (p->n_keys > VQKVD_CLIENT_MAX_PINS - c->n_pins) {
            vqkvd_client_error(c, id, VQKV_ELIMIT,
                               "a connection may hold at most %d blocks pinned until Unpin",
                               VQKVD_CLIENT_MAX_PINS);
            return;
        }
        if (vqkvd__pin_reserve(c, c->n_pins + (uint32_t)p->n_keys) != VQKV_OK) {
            vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
            return;
        }
    }
    uint64_t now = uv_now(s->loop);
    uint64_t ttl = forever ? VQKVD_PIN_FOREVER_MS : p->ttl_ms;
    uint32_t count = 0;
    for (size_t i = 0; i < p->n_keys; i++) {
        const uint8_t *key = p->keys[i].data;
        if (vqkvd_store_pin(&s->store, tenant, m->id, key, now, ttl) != VQKV_OK)
            continue; /* not held: skipped */
        count++;
        /* A later pin replaces the TTL: only a ttl_ms 0 pin is remembered. */
        long at = vqkvd__pin_index(c, m->id, key);
        if (forever && at < 0)
            vqkvd__pin_add(c, m->id, key);
        else if (!forever && at >= 0)
            vqkvd__pin_remove_at(c, (uint32_t)at);
    }
    vqkvd__ack(c, id, count);
}

static void vqkvd__unpin(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Unpin *u = req->unpin;
    uint64_t id = req->request_id;
    vqkvd_model_t *m = vqkvd__keys_check(c, id, "an unpin", u->model_handle, u->n_keys, u->keys);
    if (m == NULL)
        return;
    uint32_t tenant = (uint32_t)c->uid;
    uint64_t now = uv_now(s->loop);
    uint32_t count = 0;
    for (size_t i = 0; i < u->n_keys; i++) {
        const uint8_t *key = u->keys[i].data;
        vqkvd__pin_forget(c, m->id, key);
        const vqkvd_block_t *b = vqkvd_store_find(&s->store, tenant, m->id, key);
        if (b == NULL || b->pin_until <= now)
            continue; /* absent or not pinned: skipped */
        vqkvd_store_unpin(&s->store, tenant, m->id, key);
        count++;
    }
    vqkvd__ack(c, id, count);
}

/* ---- Evict, FindModel ---------------------------------------------------------- */

static void vqkvd__evict(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    vqkvd_server_t *s = c->server;
    const Vqkv__Evict *e = req->evict;
    uint64_t id = req->request_id;
    vqkvd_model_t *m = vqkvd__keys_check(c, id, "an evict", e->model_handle, e->n_keys, e->keys);
    if (m == NULL)
        return;
    if (e->all && e->n_keys > 0) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "an evict names keys or sets all, not both");
        return;
    }
    uint8_t *keys = vqkvd__keys_flat(c, id, e->keys, e->n_keys);
    if (keys == NULL)
        return;
    int64_t n = vqkvd_store_evict(&s->store, (uint32_t)c->uid, m->id, keys, (uint32_t)e->n_keys,
                                  e->all, uv_now(s->loop));
    free(keys);
    if (n < 0) {
        vqkvd_client_error(c, id, (int)n, "evict: %s", vqkv_proto_strerror((int)n));
        return;
    }
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: evicted %lld blocks of model %u",
              (unsigned long long)c->id, (long long)n, (unsigned)m->id);
    vqkvd__ack(c, id, n > UINT32_MAX ? UINT32_MAX : (uint32_t)n);
}

/* The model a FindModel names, of c's tenant only; kv_head_count 0 takes
 * the first registered with kv_head_first. O(models): finds are rare. */
static vqkvd_model_t *vqkvd__find_tenant_model(const vqkvd_client_t *c, const Vqkv__FindModel *fm)
{
    const vqkvd_server_t *s = c->server;
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->tenant == (uint32_t)c->uid && m->kv_head_first == fm->kv_head_first &&
            (fm->kv_head_count == 0 || m->kv_head_count == fm->kv_head_count) &&
            strcmp(m->model_id, fm->model_id) == 0)
            return m;
    }
    return NULL;
}

static void vqkvd__find_model(vqkvd_client_t *c, const Vqkv__Envelope *req)
{
    const Vqkv__FindModel *fm = req->find_model;
    uint64_t id = req->request_id;

    size_t id_len = strlen(fm->model_id);
    if (id_len == 0 || id_len > VQKVD_MODEL_ID_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "model_id must have 1 to %d bytes, not %zu",
                           VQKVD_MODEL_ID_MAX, id_len);
        return;
    }
    vqkvd_model_t *m = vqkvd__find_tenant_model(c, fm);
    if (m == NULL) {
        vqkvd_client_error(
            c, id, VQKV_EHANDLE, "tenant %s has registered no model \"%s\" with heads [%u, +%u)",
            c->tenant, fm->model_id, (unsigned)fm->kv_head_first, (unsigned)fm->kv_head_count);
        return;
    }
    if (vqkvd__client_model(c, m->id) == NULL) {
        if (c->n_models == VQKVD_CLIENT_MAX_MODELS) {
            vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %d models",
                               VQKVD_CLIENT_MAX_MODELS);
            return;
        }
        c->models[c->n_models++] = m->id;
    }

    vqkvd__model_reply(c, id, m);
}

void vqkvd_session_dispatch(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    switch (req->body_case) {
    case VQKV__ENVELOPE__BODY_REGISTER_MODEL: vqkvd__register_model(c, req, frame); return;
    case VQKV__ENVELOPE__BODY_REGISTER_REGION: vqkvd__register_region(c, req, frame); return;
    case VQKV__ENVELOPE__BODY_PUT: vqkvd__put(c, req); return;
    case VQKV__ENVELOPE__BODY_LOOKUP: vqkvd__lookup(c, req); return;
    case VQKV__ENVELOPE__BODY_GET: vqkvd__get(c, req); return;
    case VQKV__ENVELOPE__BODY_RELEASE: vqkvd__release(c, req); return;
    case VQKV__ENVELOPE__BODY_PIN: vqkvd__pin(c, req); return;
    case VQKV__ENVELOPE__BODY_UNPIN: vqkvd__unpin(c, req); return;
    case VQKV__ENVELOPE__BODY_EVICT: vqkvd__evict(c, req); return;
    case VQKV__ENVELOPE__BODY_FIND_MODEL: vqkvd__find_model(c, req); return;
    default: vqkvd_client_error(c, req->request_id, VQKV_EPROTO, "not a block request"); return;
    }
}
