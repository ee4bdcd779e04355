/* tiers.c -- the disk tier (disk.h) under the memory pool, as the session
 * layer uses it: blocks evicted for room are written down, a stopping
 * daemon writes down what memory holds and the disk lacks, an Evict goes
 * through both tiers, and a lookup learns how far a chain continues on
 * disk (jobs.c reads those blocks back).
 *
 * A block on disk is named by its model's store number, which is a stable
 * hash of what the model is, and records its codec's spec and codebooks'
 * SHA-256; it is read back only for a model whose codec (or fp16
 * fallback) has exactly that identity, so never with other codebooks.
 */
#include "tiers.h"

#include <stdlib.h>
#include <string.h>

#include "disk.h"
#include "log.h"

/* The identity of m that e's record names (spec and codebooks): m's
 * codec's when ready, its fallback's, or NULL. */
static bool vqkvd__tiers_ident_is(const vqkvd_codec_ident_t *ident, const char *spec,
                                  const uint8_t *codebooks_sha256)
{
    return strcmp(ident->spec, spec) == 0 &&
           memcmp(ident->codebooks_sha256, codebooks_sha256, 32) == 0;
}

const vqkvd_codec_ident_t *vqkvd_tiers_ident(const vqkvd_model_t *m, const char *spec,
                                             const uint8_t *codebooks_sha256)
{
    if (m->ready && vqkvd__tiers_ident_is(&m->codec_ident, spec, codebooks_sha256))
        return &m->codec_ident;
    if (m->fallback != NULL && vqkvd__tiers_ident_is(&m->fallback_ident, spec, codebooks_sha256))
        return &m->fallback_ident;
    return NULL;
}

const vqkvd_codec_ident_t *vqkvd_tiers_disk_ident(const vqkvd_model_t *m,
                                                  const vqkvd_disk_entry_t *e)
{
    return vqkvd_tiers_ident(m, e->spec, e->codebooks_sha256);
}

uint32_t vqkvd_tiers_block_bytes(const vqkvd_model_t *m, const vqkvd_codec_ident_t *ident)
{
    if (ident == &m->codec_ident)
        return m->block_bytes;
    if (ident == &m->fallback_ident)
        return m->fallback_bytes;
    return 0;
}

uint32_t vqkvd_tiers_class(const vqkvd_model_t *m, const vqkvd_codec_ident_t *ident)
{
    return ident == &m->codec_ident ? m->cls : m->fallback_cls;
}

void vqkvd_tiers_record(vqkvd_segment_record_t *rec, uint32_t tenant, uint32_t model,
                        uint32_t logical_bytes, const uint8_t *key, const uint8_t *parent,
                        const vqkvd_codec_ident_t *ident, uint32_t bytes)
{
    *rec = (vqkvd_segment_record_t){
        .tenant = tenant, .model = model, .logical_bytes = logical_bytes, .payload_bytes = bytes};
    memcpy(rec->key, key, VQKVD_KEY_BYTES);
    if (parent != NULL)
        memcpy(rec->parent, parent, VQKVD_KEY_BYTES);
    snprintf(rec->spec, sizeof rec->spec, "%s", ident->spec);
    memcpy(rec->codebooks_sha256, ident->codebooks_sha256, 32);
}

/* Queues b for the disk unless the disk has it already (with the same
 * identity) or cannot take it now. A staged block's slot is not written
 * yet, and a block of an identity its model no longer has can never be
 * read back: neither is written. false only when the queue is full; an
 * evicted block is then lost to both tiers, and counted. */
static bool vqkvd__tiers_write(vqkvd_server_t *s, const vqkvd_block_t *b, bool evicted)
{
    if (b->stage != NULL)
        return true;
    vqkvd_model_t *m = vqkvd_model_by_store_id(s, b->tenant, b->model);
    uint32_t bytes = m != NULL ? vqkvd_tiers_block_bytes(m, b->codec) : 0;
    if (bytes == 0)
        return true;
    const vqkvd_disk_entry_t *e = vqkvd_disk_find(s->disk, b->tenant, b->model, b->key);
    if (e != NULL && vqkvd_tiers_disk_ident(m, e) == b->codec)
        return true;
    if (!vqkvd_disk_has_room(s->disk, bytes)) {
        if (evicted)
            vqkvd_disk_refused(s->disk);
        return false;
    }
    uint8_t *payload = malloc(bytes);
    if (payload == NULL ||
        s->backend->ops->block_read(s->backend, vqkvd_pool_slot_ptr(&s->pool, b->slot), bytes,
                                    payload) != VQKV_OK) {
        free(payload);
        return true;
    }
    vqkvd_segment_record_t rec;
    vqkvd_tiers_record(&rec, b->tenant, b->model, b->logical_bytes, b->key,
                       b->parent != NULL ? b->parent->key : NULL, b->codec, bytes);
    if (vqkvd_disk_put(s->disk, &rec, payload) && !evicted)
        s->flush_queued++;
    return true;
}

/* store.h's on_evict: the block goes to disk rather than nowhere. The
 * copy of its compressed bytes runs on the loop (block_read: a memcpy on
 * the CPU backend); the write does not. */
static void vqkvd__tiers_on_evict(void *arg, const vqkvd_block_t *b)
{
    vqkvd_stage_t *sg = b->stage;
    if (sg == NULL) {
        vqkvd__tiers_write(arg, b, true);
        return;
    }
    /* Its codes do not exist yet: its Encode writes them down when done. */
    if (sg->evicted == NULL && (sg->evicted = calloc(sg->n, sizeof *sg->evicted)) == NULL)
        return;
    struct vqkvd_stage_evicted *ev = &sg->evicted[b->stage_slot];
    ev->evicted = true;
    ev->has_parent = b->parent != NULL;
    if (b->parent != NULL)
        memcpy(ev->parent, b->parent->key, VQKVD_KEY_BYTES);
}

/* store.h's on_forget: an Evict took b from memory, so its copy on disk
 * goes too, counted once, as the memory block it was. */
static void vqkvd__tiers_on_forget(void *arg, const vqkvd_block_t *b)
{
    vqkvd_server_t *s = arg;
    vqkvd_disk_drop(s->disk, b->tenant, b->model, b->key);
}

void vqkvd_tiers_write_codes(vqkvd_server_t *s, const vqkvd_model_t *m,
                             const vqkvd_codec_ident_t *ident, uint32_t tenant, const uint8_t *key,
                             const struct vqkvd_stage_evicted *ev, const uint8_t *codes)
{
    uint32_t bytes = vqkvd_tiers_block_bytes(m, ident);
    uint8_t *payload = s->disk != NULL && bytes > 0 ? malloc(bytes) : NULL;
    if (payload == NULL)
        return;
    memcpy(payload, codes, bytes);
    vqkvd_segment_record_t rec;
    vqkvd_tiers_record(&rec, tenant, m->store_id, m->logical_bytes, key,
                       ev->has_parent ? ev->parent : NULL, ident, bytes);
    vqkvd_disk_put(s->disk, &rec, payload);
}

/* Queues the blocks in memory the disk lacks, least recently used first,
 * while the write queue has room. true when none is left. O(blocks in
 * memory) a call: a flush makes one call per queue's worth written. */
static bool vqkvd__tiers_flush_some(vqkvd_server_t *s)
{
    for (vqkvd_block_t *b = vqkvd_store_next(&s->store, NULL); b != NULL;
         b = vqkvd_store_next(&s->store, b))
        if (!vqkvd__tiers_write(s, b, false))
            return false;
    return true;
}

/* A Flush request waiting for its Ack. */
struct vqkvd_flush_wait {
    struct vqkvd_flush_wait *next;
    vqkvd_client_t *c; /* held */
    uint64_t id;
    uint64_t stages;               /* the last stage made when it came: their blocks too */
    uint64_t mark;                 /* 0 until all its blocks are queued; then the last record */
    uint64_t queued, write_errors; /* flush_queued and the disk's when it came */
};

/* Answers w: an Ack with the blocks flushes queued meanwhile, or
 * VQKV_EIO when writes failed meanwhile. */
static void vqkvd__tiers_flush_answer(vqkvd_server_t *s, struct vqkvd_flush_wait *w)
{
    vqkvd_disk_stats_t st;
    vqkvd_disk_stats(s->disk, &st);
    uint64_t n = s->flush_queued - w->queued, failed = st.write_errors - w->write_errors;
    if (failed > 0)
        vqkvd_client_error(w->c, w->id, VQKV_EIO,
                           "flush: %llu blocks could not be written to the disk tier (the log says "
                           "why); the others are on disk",
                           (unsigned long long)failed);
    else
        vqkvd__ack(w->c, w->id, n > UINT32_MAX ? UINT32_MAX : (uint32_t)n);
    vqkvd_client_settle(w->c); /* answered outside its request: send it now */
    vqkvd_client_unref(w->c);
    free(w);
}

/* Goes on with a flush: queues what memory holds and the disk lacks, while
 * the queue has room; then each waiting Flush whose stages are encoded
 * (their blocks queued by now) waits for the last record queued, and is
 * answered once that is synced. O(blocks in memory) while a flush runs,
 * once per write job: under a steady stream of evictions the queue may
 * never be idle, so a flush cannot wait for that. */
static void vqkvd__tiers_flush_step(vqkvd_server_t *s)
{
    if (s->flushing && vqkvd__tiers_flush_some(s))
        s->flushing = false;
    uint64_t oldest_stage = vqkvd_staging_oldest_unencoded(&s->staging);
    for (struct vqkvd_flush_wait **p = &s->flush_waits, *w; (w = *p) != NULL;) {
        if (w->mark == 0 && !s->flushing && oldest_stage > w->stages)
            w->mark = vqkvd_disk_last_queued(s->disk) + 1; /* + 1: never 0 */
        if (w->mark != 0 && vqkvd_disk_settled(s->disk, w->mark - 1)) {
            *p = w->next;
            vqkvd__tiers_flush_answer(s, w);
        } else {
            p = &w->next;
        }
    }
}

static void vqkvd__tiers_written(void *arg)
{
    vqkvd__tiers_flush_step(arg);
}

void vqkvd_tiers_flush_block(vqkvd_server_t *s, const vqkvd_block_t *b)
{
    if (s->disk != NULL && !vqkvd__tiers_write(s, b, false))
        s->flushing = true; /* the queue is full: memory is walked when it has room */
}

void vqkvd_tiers_flush_resume(vqkvd_server_t *s)
{
    if (s->disk != NULL)
        vqkvd__tiers_flush_step(s);
}

void vqkvd_tiers_tick(vqkvd_server_t *s, uint64_t now_ms)
{
    if (s->disk == NULL)
        return;
    uint64_t every = s->cfg.disk_flush_ms;
    if (every > 0 && now_ms - s->flush_last_ms >= every) {
        s->flush_last_ms = now_ms;
        vqkvd_tiers_flush(s);
    } else if (s->flush_waits != NULL) {
        vqkvd__tiers_flush_step(s);
    }
}

void vqkvd_tiers_flush(vqkvd_server_t *s)
{
    if (s->disk == NULL)
        return;
    s->flushing = true;
    vqkvd__tiers_flush_step(s);
}

int vqkvd_tiers_flush_wait(vqkvd_server_t *s, vqkvd_client_t *c, uint64_t id)
{
    if (s->disk == NULL)
        return VQKV_EINVAL;
    struct vqkvd_flush_wait *w = calloc(1, sizeof *w);
    if (w == NULL)
        return VQKV_ENOMEM;
    vqkvd_disk_stats_t st;
    vqkvd_disk_stats(s->disk, &st);
    c->refs++;
    *w = (struct vqkvd_flush_wait){.next = s->flush_waits,
                                   .c = c,
                                   .id = id,
                                   .stages = s->staging.made,
                                   .queued = s->flush_queued,
                                   .write_errors = st.write_errors};
    s->flush_waits = w;
    vqkvd_tiers_flush(s);
    return VQKV_OK;
}

int vqkvd_tiers_start(vqkvd_server_t *s)
{
    if (s->cfg.disk_dir == NULL)
        return VQKV_OK;
    char why[512];
    uint64_t t0 = uv_hrtime();
    int rc = vqkvd_disk_open(s->cfg.disk_dir, s->cfg.disk_bytes, s->loop, &s->store, &s->disk, why,
                             sizeof why);
    if (rc == VQKV_ENOMEM)
        return rc;
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "disk tier off: %s; blocks live in memory only", why);
        return VQKV_OK;
    }
    vqkvd_disk_stats_t st;
    vqkvd_disk_stats(s->disk, &st);
    vqkvd_log(VQKVD_LOG_INFO,
              "disk: %s: %llu blocks in %llu segments, %llu of %llu bytes (%.0f ms)",
              s->cfg.disk_dir, (unsigned long long)st.blocks, (unsigned long long)st.segments,
              (unsigned long long)st.bytes, (unsigned long long)st.limit_bytes,
              (double)(uv_hrtime() - t0) / 1e6);
    s->store.on_evict = vqkvd__tiers_on_evict;
    s->store.on_forget = vqkvd__tiers_on_forget;
    s->store.hooks_arg = s;
    vqkvd_disk_on_written(s->disk, vqkvd__tiers_written, s);
    return VQKV_OK;
}

void vqkvd_tiers_stop(vqkvd_server_t *s)
{
    if (s->disk == NULL)
        return;
    vqkvd_disk_stop(s->disk);
    vqkvd_tiers_flush(s);
}

void vqkvd_tiers_destroy(vqkvd_server_t *s)
{
    /* Flushes still waiting (their writes failed to run): nobody to answer. */
    while (s->flush_waits != NULL) {
        struct vqkvd_flush_wait *w = s->flush_waits;
        s->flush_waits = w->next;
        vqkvd_client_unref(w->c);
        free(w);
    }
    vqkvd_disk_close(s->disk);
    s->disk = NULL;
}

/* Which store and model vqkvd__tiers_in_memory asks about. */
typedef struct {
    const vqkvd_store_t *store;
    uint32_t tenant, model;
} vqkvd__tiers_model_t;

static bool vqkvd__tiers_in_memory(void *arg, const uint8_t *key)
{
    const vqkvd__tiers_model_t *q = arg;
    return vqkvd_store_find(q->store, q->tenant, q->model, key) != NULL;
}

uint64_t vqkvd_tiers_forget(vqkvd_server_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                            uint32_t n, bool all)
{
    if (s->disk == NULL)
        return 0;
    vqkvd__tiers_model_t q = {&s->store, tenant, model};
    if (all)
        return vqkvd_disk_drop_model(s->disk, tenant, model, vqkvd__tiers_in_memory, &q);
    uint64_t gone = 0;
    for (uint32_t i = 0; i < n; i++)
        if (vqkvd_store_find(&s->store, tenant, model, keys + (size_t)i * VQKVD_KEY_BYTES) == NULL)
            gone += vqkvd_disk_drop(s->disk, tenant, model, keys + (size_t)i * VQKVD_KEY_BYTES);
    return gone + vqkvd_disk_drop_orphans(s->disk, tenant, model, vqkvd__tiers_in_memory, &q);
}

uint32_t vqkvd_tiers_disk_run(const vqkvd_server_t *s, const vqkvd_model_t *m, uint32_t tenant,
                              const uint8_t *keys, uint32_t from, uint32_t n)
{
    static const uint8_t zero[VQKVD_KEY_BYTES];
    uint32_t i = from;
    for (; s->disk != NULL && i < n; i++) {
        const vqkvd_disk_entry_t *e =
            vqkvd_disk_find(s->disk, tenant, m->store_id, keys + (size_t)i * VQKVD_KEY_BYTES);
        const uint8_t *parent = i > 0 ? keys + (size_t)(i - 1) * VQKVD_KEY_BYTES : zero;
        if (e == NULL || memcmp(e->parent, parent, VQKVD_KEY_BYTES) != 0 ||
            vqkvd_tiers_disk_ident(m, e) == NULL)
            break;
    }
    return i - from;
}
