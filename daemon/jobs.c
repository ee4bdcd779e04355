/* jobs.c -- Put (encode blocks out of the worker's region into the pool),
 * Lookup (longest present prefix, leased) and Get (decode leased blocks
 * into the region).
 *
 * The loop never runs a codec: encoding and decoding run on libuv's thread
 * pool (uv_queue_work), one job per request, as one backend batch. A Put
 * reserves a pool slot for each new block on the loop (store.h: reserved
 * blocks are invisible and cannot be evicted), the job encodes straight
 * into those slots, and its completion, back on the loop, commits them (or
 * aborts them all if the encode failed); no block is copied on the loop. A
 * Get job decodes straight from the pool slots; each block it reads is
 * held (vqkvd_store_hold) until the job is done, so neither a Release nor
 * an expiring lease nor eviction can reuse a slot under it.
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
#include "remote.h"
#include "session.h"
#include "tiers.h"
#include "transcode.h"

/* A Put copies or encodes blocks out of the worker's region, a Get
 * decodes or copies them into it; an Encode, which no client waits for,
 * encodes a staged Put's blocks after its reply (staging.h); a Promote
 * reads a Lookup's blocks back from the disk tier (tiers.h) before the
 * Lookup answers. */
typedef enum { VQKVD_JOB_PUT, VQKVD_JOB_GET, VQKVD_JOB_ENCODE, VQKVD_JOB_PROMOTE } vqkvd_job_kind_t;

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
    char why[96]; /* the backend's words for rc */
} vqkvd_job_part_t;

/* One request on the thread pool, in one part or (a large get) several
 * that run at once. The arrays are allocated with the job. */
struct vqkvd_job {
    vqkvd_job_part_t parts[VQKVD_JOB_PARTS];
    uint32_t n_parts, parts_left;
    int status; /* the first part's failed uv status, 0 otherwise */
    vqkvd_job_kind_t kind;
    vqkvd_server_t *s;
    vqkvd_client_t *c; /* NULL for an Encode */
    vqkvd_region_t *r; /* NULL for an Encode and a Promote */
    vqkvd_model_t *m;
    /* The memory the slots name: the region's, or an Encode's stage's */
    uint8_t *base;
    uint32_t device; /* the region's device (vqkvd_region_mem_t) */
    const vqkv_kv_view_t *view;
    vqkvd_backend_t *be;
    /* Put: the stage its new blocks are copied into, encoded after the
     * reply (NULL: encoded before it); Encode: the stage it reads. */
    vqkvd_stage_t *stage;
    /* Put: each block's slot in the stage; Get: the stage slot of each
     * block encoded from a stage */
    uint32_t *stage_slots;
    /* Encode: its blocks' tenant and keys, to find them again when done
     * (eviction may have taken some), and their codes, one after another,
     * copied into their slots then */
    uint32_t tenant;
    uint8_t *keys;
    uint8_t *out;
    /* Promote: the disk reads of its reserved blocks and how each went
     * (VQKV_EAGAIN: not tried, or failed past the disk); keys (n_keys of
     * them) are the Lookup's, answered when the blocks are in */
    vqkvd_disk_read_t *reads;
    int *read_rc;
    uint32_t n_keys;
    /* Promote: blocks [remote_from, n) come from the remote tier, values
     * remote_first on of this fetch (owned) */
    vqkvd_remote_fetch_t *remote;
    uint32_t remote_from, remote_first;
    const vqkv_codec_t *codec;        /* Put: the model's codec or its fallback */
    const vqkvd_codec_ident_t *ident; /* Put: its identity, recorded in every block */
    uint32_t cls;                     /* Put: that codec's pool class */
    uint64_t request_id;
    uint64_t queued_ns; /* uv_hrtime when handed to the thread pool */
    uint32_t n;
    uint32_t *slots; /* region slots */
    int rc;          /* the first codec error, VQKV_OK otherwise */
    uint32_t failed; /* the block it came from */
    char why[96];    /* and the backend's words for it */
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
    /* The stage of each block whose encode has not yet run (held until
     * the job ends), NULL for the others */
    vqkvd_stage_t **stages;
    /* A worker's interprocess event (backend.h): waited on before a Put's
     * encode, recorded after a Get's decode, which then replies at once
     * while the backend's finish waits for the work left pending. */
    uint8_t event[VQKVD_EVENT_BYTES];
    bool has_event;
    void *pending;
    bool replied; /* the early reply went: the end sends none */
};

/* ---- jobs ---------------------------------------------------------------- */

static vqkvd_job_t *vqkvd__job_new(vqkvd_job_kind_t kind, vqkvd_server_t *s, vqkvd_client_t *c,
                                   vqkvd_region_t *r, vqkvd_model_t *m, uint64_t request_id,
                                   uint32_t n)
{
    vqkvd_job_t *j = calloc(1, sizeof *j);
    if (j == NULL)
        return NULL;
    j->kind = kind;
    j->s = s;
    j->c = c;
    j->r = r;
    j->m = m;
    j->be = s->backend;
    if (r != NULL) {
        j->base = r->mem.base;
        j->device = r->mem.device;
        j->view = &r->view;
    }
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
    if (j->stage != NULL)
        vqkvd_stage_unref(j->stage);
    for (uint32_t k = 0; j->stages != NULL && k < j->n; k++)
        if (j->stages[k] != NULL)
            vqkvd_stage_unref(j->stages[k]);
    free(j->stage_slots);
    free(j->reads);
    free(j->read_rc);
    vqkvd_remote_fetch_free(j->remote);
    free(j->keys);
    free(j->out);
    free(j->stages);
    free(j);
}

static void vqkvd__job_after(uv_work_t *w, int status);

/* A staged Put's new blocks into its stage, for the part's layers: bytes
 * unchanged, no codec. */
static void vqkvd__put_copy(const vqkvd_job_t *j, const vqkvd_job_part_t *part)
{
    for (uint32_t i = 0; i < j->n; i++)
        if (j->dst[i] != NULL)
            vqkvd_stage_copy(&j->m->layout, j->view, j->base, j->slots[i], &j->stage->view,
                             j->stage->mem, j->stage_slots[i], part->first_layer, part->end_layer);
}

/* A Get's blocks still in their stages encoded, for the part's layers,
 * into the job's own buffer (their src): the codes their Encode is writing
 * too, so that what a Get returns never depends on whether that is done. */
static int vqkvd__get_encode_staged(vqkvd_job_t *j, vqkvd_job_part_t *part)
{
    for (uint32_t k = 0; k < j->n; k++) {
        if (j->stages[k] == NULL)
            continue;
        vqkvd_batch_t e = {.base = j->stages[k]->mem,
                           .view = &j->stages[k]->view,
                           .slots = &j->stage_slots[k],
                           .n = 1,
                           .first_layer = part->first_layer,
                           .end_layer = part->end_layer,
                           .codec = j->codecs[k],
                           .dst = &j->dst[k]};
        int rc = j->be->ops->encode(j->be, &e);
        if (rc != VQKV_OK) {
            part->failed = k;
            memcpy(part->why, e.why, sizeof part->why);
            return rc;
        }
    }
    return VQKV_OK;
}

/* A remote block's payload, checked against its header's CRC (the rest
 * of the header was checked on the loop), into its reserved slot. */
static int vqkvd__promote_remote(vqkvd_job_t *j, uint32_t k)
{
    uint32_t i = j->remote_first + (k - j->remote_from);
    const vqkvd_segment_record_t *rec = &j->remote->recs[i];
    const uint8_t *payload = j->remote->values[i] + VQKVD_SEGMENT_RECORD_BYTES;
    if (vqkvd_segment_crc32c(0, payload, rec->payload_bytes) != rec->payload_crc)
        return VQKV_EFORMAT;
    return j->be->ops->block_write(j->be, j->dst[k], payload, rec->payload_bytes) == VQKV_OK
               ? VQKV_OK
               : VQKV_EAGAIN;
}

/* A Promote's payloads from disk, then from the remote tier, into their
 * reserved slots, in chain order, until one fails: the blocks after it
 * could not be committed without it. */
static void vqkvd__promote_read(vqkvd_job_t *j)
{
    int rc = VQKV_OK;
    for (uint32_t k = 0; k < j->n; k++) {
        j->read_rc[k] = VQKV_EAGAIN;
        if (rc != VQKV_OK)
            continue;
        if (k >= j->remote_from) {
            rc = j->read_rc[k] = vqkvd__promote_remote(j, k);
            continue;
        }
        uint32_t bytes = j->reads[k].rec.payload_bytes;
        uint8_t *buf = malloc(bytes);
        rc = buf != NULL ? vqkvd_disk_read(&j->reads[k], buf) : VQKV_ENOMEM;
        j->read_rc[k] = rc == VQKV_ENOMEM ? VQKV_EAGAIN : rc;
        if (rc == VQKV_OK && (rc = j->be->ops->block_write(j->be, j->dst[k], buf, bytes)) != 0)
            j->read_rc[k] = VQKV_EAGAIN;
        free(buf);
    }
}

/* Runs on a pool thread: only the job, the codecs, the region's memory and
 * the stages it holds, the part's layers of every block. */
static void vqkvd__job_work(uv_work_t *w)
{
    vqkvd_job_part_t *part = w->data;
    vqkvd_job_t *j = part->job;
    vqkvd_batch_t b = {.base = j->base,
                       .device = j->device,
                       .view = j->view,
                       .slots = j->slots,
                       .n = j->n,
                       .first_layer = part->first_layer,
                       .end_layer = part->end_layer};
    part->rc = VQKV_OK;
    if (j->kind == VQKVD_JOB_PROMOTE) {
        vqkvd__promote_read(j);
    } else if (j->kind == VQKVD_JOB_PUT && j->stage != NULL) {
        vqkvd__put_copy(j, part);
    } else if (j->kind != VQKVD_JOB_GET) {
        b.codec = j->codec;
        b.dst = j->dst;
        b.wait_event = j->has_event ? j->event : NULL;
        part->rc = j->be->ops->encode(j->be, &b);
    } else {
        b.codecs = j->codecs;
        b.src = j->src;
        b.record_event = j->has_event ? j->event : NULL;
        if (j->out != NULL && (part->rc = vqkvd__get_encode_staged(j, part)) != VQKV_OK)
            return;
        part->rc = j->be->ops->decode(j->be, &b);
        j->pending = b.pending; /* a job with an event runs in one part */
    }
    part->failed = b.failed;
    memcpy(part->why, b.why, sizeof part->why);
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
        memcpy(j->why, part->why, sizeof j->why);
    }
    if (--j->parts_left == 0)
        vqkvd__job_after(&j->parts[0].work, j->status);
}

/* The references a job holds from the moment it is handed on until it
 * ends: its client (freed only after) and its region (closed only after). */
static void vqkvd__job_hold(vqkvd_job_t *j)
{
    if (j->c != NULL) {
        j->c->refs++;
        j->c->pending++;
    }
    if (j->r != NULL)
        j->r->refs++;
}

/* Hands j to the thread pool, holding its client and region: a large
 * request in up to VQKVD_JOB_PARTS parts by layers, anything else in one.
 * The parts that were queued finish the job even if a later one cannot be. */
static int vqkvd__job_queue(vqkvd_job_t *j)
{
    uint32_t layers = j->m->layout.num_layers, parts = 1;
    if (!j->be->ops->whole_blocks && j->kind != VQKVD_JOB_PROMOTE &&
        (uint64_t)j->n * j->m->logical_bytes / vqkv_dtype_size(j->m->layout.dtype) >=
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
        int rc = uv_queue_work(j->s->loop, &part->work, vqkvd__job_work, vqkvd__job_part_after);
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
static void vqkvd__lookup_answer(vqkvd_client_t *c, uint64_t id, const vqkvd_model_t *m,
                                 const uint8_t *keys, uint32_t n);

/* The blocks a job reserved: those before index good committed (a Put's
 * stored even when its client has gone: the bytes are good), the others
 * aborted, children before parents. A waiting put whose block was aborted
 * learns NO_SPACE (any abort tells every waiter so: it may ask again). */
static void vqkvd__job_commit(vqkvd_job_t *j, uint32_t good)
{
    vqkvd_server_t *s = j->s;
    int failed = 0;
    for (uint32_t k = j->n; k-- > 0;) {
        vqkvd_block_t *b = j->blocks[k];
        if (b == NULL)
            continue;
        if (k >= good) {
            vqkvd_store_abort(&s->store, b);
            failed = 1;
            continue;
        }
        vqkvd_store_commit(&s->store, b);
        if (j->stage != NULL) {
            b->stage = j->stage;
            b->stage_slot = j->stage_slots[k];
        } else if (j->kind == VQKVD_JOB_PUT) {
            if (j->codec == j->m->fallback)
                vqkvd_calib_add(s, j->m, j->dst[k]);
            vqkvd_remote_put(s, j->m, b);
        }
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
    if (j->kind == VQKVD_JOB_PROMOTE) {
        /* Whatever came back from disk, the Lookup is answered from memory. */
        if (!c->closing)
            vqkvd__lookup_answer(c, j->request_id, j->m, j->keys, j->n_keys);
    } else if (j->status < 0) {
        vqkvd_client_error(c, j->request_id, VQKV_EIO, "cannot run the job: %s",
                           uv_strerror(j->status));
    } else if (j->rc != VQKV_OK) {
        vqkvd_client_error(c, j->request_id, j->rc, "block %u (slot %u): %s%s%s",
                           (unsigned)j->failed, (unsigned)j->slots[j->failed], vqkv_strerror(j->rc),
                           j->why[0] != '\0' ? ": " : "", j->why);
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
    if (c == NULL) { /* an Encode */
        vqkvd__job_free(j);
        return;
    }
    if (!j->replied) {
        vqkvd__job_reply(j);
        c->pending--;
    }
    if (j->kind != VQKVD_JOB_PROMOTE)
        vqkvd_counters_observe(&c->server->counters,
                               j->kind == VQKVD_JOB_PUT ? VQKVD_TIMED_PUT : VQKVD_TIMED_GET,
                               uv_hrtime() - j->queued_ns);
    if (j->r != NULL)
        vqkvd__region_unref(j->r);
    vqkvd__job_free(j);
    vqkvd_client_settle(c);
    vqkvd_client_unref(c);
}

/* On a pool thread: the backend waits for a Get that replied early. */
static void vqkvd__job_finish_work(uv_work_t *w)
{
    vqkvd_job_t *j = ((vqkvd_job_part_t *)w->data)->job;
    j->be->ops->finish(j->be, j->pending);
    j->pending = NULL;
}

/* Back on the loop once the blocks of an early Get are written: what the
 * job held goes. */
static void vqkvd__job_finish_after(uv_work_t *w, int status)
{
    vqkvd_job_t *j = ((vqkvd_job_part_t *)w->data)->job;
    (void)status; /* the backend's finish ran, or libuv could not queue it: see below */
    for (uint32_t i = 0; i < j->n; i++)
        vqkvd_store_unhold(j->blocks[i]);
    j->work_done = 1;
    vqkvd__job_maybe_end(j);
}

/* A Get whose decode is queued with the worker's event recorded: replies
 * now, and lets finish wait for the work on another pool thread, the
 * blocks held until then. Waits here, on the loop, only when libuv cannot
 * queue the wait (a loop that is closing). */
static void vqkvd__job_reply_early(vqkvd_job_t *j)
{
    vqkvd__job_reply(j);
    j->replied = true;
    j->c->pending--;
    vqkvd_client_settle(j->c);
    uv_work_t *w = &j->parts[0].work;
    if (uv_queue_work(j->s->loop, w, vqkvd__job_finish_work, vqkvd__job_finish_after) < 0) {
        vqkvd__job_finish_work(w);
        vqkvd__job_finish_after(w, 0);
    }
}

/* ---- staged puts' encodes ------------------------------------------------ */

/* What a block whose staged encode failed records as its codec: it names
 * no model's codec, so it is never decoded (only a defect gets here). */
static const vqkvd_codec_ident_t vqkvd__encode_failed = {.spec = "nothing (its encode failed)"};

/* The Encode of a staged Put's new blocks, from its stage into a buffer
 * of its own, or NULL without memory. It takes its own reference on the
 * stage. The codes are copied into the blocks' slots on the loop when it
 * is done, not written there by the job: a staged block may be evicted
 * meanwhile, its slot given to another block, and the loop knows which
 * are left. The copy is of compressed bytes, a few percent of the encode's
 * time. */
static vqkvd_job_t *vqkvd__encode_new(const vqkvd_job_t *put)
{
    vqkvd_job_t *e = vqkvd__job_new(VQKVD_JOB_ENCODE, put->s, NULL, NULL, put->m, 0, put->reserved);
    size_t bytes = vqkv_codec_block_bytes(put->codec);
    if (e == NULL)
        return NULL;
    e->dst = calloc(put->reserved, sizeof *e->dst);
    e->keys = malloc((size_t)put->reserved * VQKVD_KEY_BYTES);
    e->out = malloc((size_t)put->reserved * bytes);
    if (e->dst == NULL || e->keys == NULL || e->out == NULL) {
        vqkvd__job_free(e);
        return NULL;
    }
    e->tenant = (uint32_t)put->c->uid;
    for (uint32_t i = 0, k = 0; i < put->n; i++) {
        if (put->blocks[i] == NULL)
            continue;
        e->slots[k] = put->stage_slots[i];
        e->dst[k] = e->out + (size_t)k * bytes;
        memcpy(e->keys + (size_t)k * VQKVD_KEY_BYTES, put->blocks[i]->key, VQKVD_KEY_BYTES);
        k++;
    }
    e->codec = put->codec;
    e->ident = put->ident;
    e->stage = put->stage;
    vqkvd_stage_ref(e->stage);
    e->base = e->stage->mem;
    e->view = &e->stage->view;
    return e;
}

/* Back on the loop after a Put's work. A staged Put's copy is done: its
 * Encode is queued before the blocks are committed, so that a block is
 * found only once its encode is sure to run. */
static void vqkvd__put_after(vqkvd_job_t *j)
{
    int failed = j->status < 0 || j->rc != VQKV_OK;
    if (!failed && j->stage != NULL) {
        vqkvd_job_t *e = vqkvd__encode_new(j);
        int rc = e != NULL ? vqkvd__job_queue(e) : VQKV_ENOMEM;
        if (rc != 0) {
            if (e != NULL)
                vqkvd__job_free(e);
            failed = 1;
            j->rc = VQKV_ENOMEM;
            j->failed = 0;
            snprintf(j->why, sizeof j->why, "cannot start its encode");
        }
    }
    vqkvd__job_commit(j, failed ? 0 : j->n);
}

/* Back on the loop, a staged Put's blocks encoded: the codes of those
 * still there (and still this stage's) go into their slots, and Gets
 * decode them from now on; their stage goes with the last Get reading
 * it. A block whose encode failed is marked never to be decoded and
 * evicted unless something holds it. Children before parents, so that an
 * evicted parent takes no child still to be visited. */
static void vqkvd__encode_after(vqkvd_job_t *j)
{
    vqkvd_server_t *s = j->s;
    size_t bytes = vqkv_codec_block_bytes(j->codec);
    int rc = j->status < 0 ? VQKV_EIO : j->rc;
    bool flush = s->stopping || s->flush_waits != NULL; /* the blocks it makes whole go too */
    for (uint32_t k = j->n; k-- > 0;) {
        const uint8_t *key = j->keys + (size_t)k * VQKVD_KEY_BYTES;
        vqkvd_block_t *b = vqkvd_store_find(&s->store, j->tenant, j->m->store_id, key);
        if (b == NULL || b->stage != j->stage) {
            /* Evicted while it was encoded: for room, it goes to disk now. */
            uint32_t slot = j->slots[k];
            if (rc == VQKV_OK && j->stage->evicted != NULL && j->stage->evicted[slot].evicted)
                vqkvd_tiers_write_codes(s, j->m, j->ident, j->tenant, key, &j->stage->evicted[slot],
                                        j->out + (size_t)k * bytes);
            continue;
        }
        b->stage = NULL;
        uint8_t *slot = vqkvd_pool_slot_ptr(&s->pool, b->slot);
        if (rc == VQKV_OK)
            rc = j->be->ops->block_write(j->be, slot, j->out + (size_t)k * bytes, bytes);
        if (rc != VQKV_OK) {
            b->codec = &vqkvd__encode_failed;
            vqkvd_store_evict(&s->store, b->tenant, b->model, b->key, 1, 0, uv_now(s->loop));
        } else {
            if (j->codec == j->m->fallback)
                vqkvd_calib_add(s, j->m, slot);
            if (flush)
                vqkvd_tiers_flush_block(s, b);
            vqkvd_remote_put(s, j->m, b);
        }
    }
    if (rc != VQKV_OK)
        vqkvd_log(VQKVD_LOG_ERROR, "model %u: staged blocks could not be encoded (%s%s%s)",
                  (unsigned)j->m->id, vqkv_strerror(rc), j->why[0] != '\0' ? ": " : "", j->why);
    vqkvd_stage_encoded(j->stage);
    if (flush)
        vqkvd_tiers_flush_resume(s);
}

/* Each read a Promote started, ended on the disk's books (ran: the job's
 * work ran, so read_rc says how each went): a damaged record leaves the
 * index there; the remote tier counts what it brought and what came
 * damaged. Returns how many blocks, from the first, came in whole. */
static uint32_t vqkvd__promote_end_reads(vqkvd_job_t *j, bool ran)
{
    uint32_t good = 0, remote_good = 0, damaged = 0;
    for (uint32_t k = 0; j->reads != NULL && k < j->n; k++) {
        int rc = ran ? j->read_rc[k] : VQKV_EAGAIN;
        bool whole = rc == VQKV_OK && good == k;
        good += whole;
        if (k >= j->remote_from) {
            remote_good += whole;
            damaged += rc == VQKV_EFORMAT;
        } else if (j->reads[k].started) {
            vqkvd_disk_read_done(j->s->disk, &j->reads[k], rc);
        }
    }
    vqkvd_remote_fetch_result(j->s, remote_good, damaged);
    return good;
}

static void vqkvd__job_after(uv_work_t *w, int status)
{
    vqkvd_job_t *j = ((vqkvd_job_part_t *)w->data)->job;
    if (status < 0 && j->status == 0)
        j->status = status;
    if (j->pending != NULL) {
        vqkvd__job_reply_early(j);
        return;
    }
    if (j->kind == VQKVD_JOB_GET)
        for (uint32_t i = 0; i < j->n; i++)
            vqkvd_store_unhold(j->blocks[i]);
    else if (j->kind == VQKVD_JOB_ENCODE)
        vqkvd__encode_after(j);
    else if (j->kind == VQKVD_JOB_PROMOTE)
        vqkvd__job_commit(j, vqkvd__promote_end_reads(j, j->status >= 0));
    else
        vqkvd__put_after(j);
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
        int rc = vqkvd_store_reserve(&s->store, (uint64_t)(uintptr_t)j, (uint32_t)j->c->uid,
                                     j->m->store_id, p->keys[i].data, parent, j->cls,
                                     j->m->logical_bytes, now, &b);
        j->slots[i] = p->slots[i];
        switch (rc) {
        case VQKV_OK:
            b->codec = j->ident;
            j->blocks[i] = b;
            j->dst[i] = vqkvd_pool_slot_ptr(&s->pool, b->slot);
            j->put_status[i] = VQKV__PUT_STATUS__PUT_STORED;
            j->reserved++;
            break;
        case VQKV_EEXIST:
            j->put_status[i] = VQKV__PUT_STATUS__PUT_PRESENT;
            if (b->writer != 0 && b->writer != (uint64_t)(uintptr_t)j)
                vqkvd__put_wait(j, i, (vqkvd_job_t *)(uintptr_t)b->writer);
            break;
        case VQKV_ENOPARENT: j->put_status[i] = VQKV__PUT_STATUS__PUT_NO_PARENT; break;
        case VQKV_EQUOTA: j->put_status[i] = VQKV__PUT_STATUS__PUT_OVER_QUOTA; break;
        default: j->put_status[i] = VQKV__PUT_STATUS__PUT_NO_SPACE; break;
        }
    }
}

/* Gives a Put with new blocks a stage to copy them into, where the
 * backend's regions are host memory and staging has room: it then replies
 * once they are copied, and an Encode job writes their slots. Without one
 * the Put encodes before its reply. Each block's stage slot is its place
 * among the new blocks. */
static void vqkvd__put_stage(vqkvd_job_t *j)
{
    vqkvd_server_t *s = j->s;
    if (j->reserved == 0 || !j->be->ops->host_regions)
        return;
    j->stage = vqkvd_stage_new(&s->staging, s->cfg.staging_bytes, &j->m->layout, j->reserved);
    for (uint32_t i = 0, k = 0; j->stage != NULL && i < j->n; i++)
        if (j->blocks[i] != NULL)
            j->stage_slots[i] = k++;
}

/* A request's cuda_event into j: none, or 64 bytes for a backend with
 * events. false after replying with the error. */
static bool vqkvd__job_event(vqkvd_job_t *j, uint64_t id, const ProtobufCBinaryData *ev)
{
    if (ev->len == 0)
        return true;
    const vqkvd_backend_t *be = j->c->server->backend;
    if (ev->len != VQKVD_EVENT_BYTES) {
        vqkvd_client_error(j->c, id, VQKV_EINVAL,
                           "cuda_event is %zu bytes; a cudaIpcEventHandle_t is %d", ev->len,
                           VQKVD_EVENT_BYTES);
        return false;
    }
    if (!be->ops->events) {
        vqkvd_client_error(j->c, id, VQKV_EDEVICE,
                           "cuda_event: the %s backend has no GPU events; leave it empty",
                           be->ops->name);
        return false;
    }
    memcpy(j->event, ev->data, VQKVD_EVENT_BYTES);
    j->has_event = true;
    return true;
}

void vqkvd_session_put(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    vqkvd_server_t *s = c->server;
    const Vqkv__Put *p = req->put;
    uint64_t id = req->request_id;
    vqkvd_region_t *r = NULL;

    vqkvd_model_t *m = vqkvd__put_check(c, id, p, &r);
    if (m == NULL)
        return;
    size_t cnt = p->n_keys ? p->n_keys : 1;
    vqkvd_job_t *j = vqkvd__job_new(VQKVD_JOB_PUT, s, c, r, m, id, (uint32_t)p->n_keys);
    if (j != NULL) {
        j->put_status = calloc(cnt, sizeof *j->put_status);
        j->dst = calloc(cnt, sizeof *j->dst);
        j->blocks = calloc(cnt, sizeof *j->blocks);
        j->stage_slots = calloc(cnt, sizeof *j->stage_slots);
    }
    if (j == NULL || j->put_status == NULL || j->dst == NULL || j->blocks == NULL ||
        j->stage_slots == NULL) {
        if (j != NULL)
            vqkvd__job_free(j);
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return;
    }
    if (!vqkvd__job_event(j, id, &p->cuda_event)) {
        vqkvd__job_free(j);
        return;
    }
    /* Chosen now, for the whole request: a model that turns ready while
     * the job runs still stores these blocks in the fallback's class. */
    j->codec = m->ready ? m->codec : m->fallback;
    j->ident = m->ready ? &m->codec_ident : &m->fallback_ident;
    j->cls = m->ready ? m->cls : m->fallback_cls;
    vqkvd__put_reserve(j, p, uv_now(s->loop));
    vqkvd__put_stage(j);
    int rc = j->reserved > 0 ? vqkvd__job_queue(j) : 0;
    if (j->reserved == 0 || rc < 0) {
        /* Nothing to write, or no way to: ends now, or once the puts it
         * waits for have committed. */
        vqkvd__job_hold(j);
        j->queued_ns = uv_hrtime();
        j->status = rc;
        j->work_done = 1;
        if (rc < 0)
            vqkvd__job_commit(j, 0);
        vqkvd__job_maybe_end(j);
    }
}

/* Answers a Lookup of keys[0..n) from the memory tier: the present
 * prefix, leased. */
static void vqkvd__lookup_answer(vqkvd_client_t *c, uint64_t id, const vqkvd_model_t *m,
                                 const uint8_t *keys, uint32_t n)
{
    vqkvd_server_t *s = c->server;
    uint64_t lease = 0;
    int rc = vqkvd_store_lookup(&s->store, (uint32_t)c->uid, m->store_id, keys, n, uv_now(s->loop),
                                c->id, s->cfg.lease_ms, &lease, NULL);
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

/* Reserves slots for the disk blocks, then the remote ones, that continue
 * keys[p..] after memory's prefix of p, as far as the pool and the
 * tenant's quota let, and starts reading those on disk. Returns how many
 * it reserved (0: none). */
static uint32_t vqkvd__promote_reserve(vqkvd_job_t *j, const uint8_t *keys, uint32_t p,
                                       uint32_t run)
{
    vqkvd_server_t *s = j->s;
    uint32_t k = 0;
    for (; k < run; k++) {
        const uint8_t *key = keys + (size_t)(p + k) * VQKVD_KEY_BYTES;
        const vqkvd_disk_entry_t *e = NULL;
        const vqkvd_codec_ident_t *ident;
        if (k >= j->remote_from) {
            ident = j->remote->idents[j->remote_first + (k - j->remote_from)];
        } else {
            e = vqkvd_disk_find(s->disk, j->tenant, j->m->store_id, key);
            ident = vqkvd_tiers_disk_ident(j->m, e);
        }
        vqkvd_block_t *b = NULL;
        int rc = vqkvd_store_reserve(&s->store, (uint64_t)(uintptr_t)j, j->tenant, j->m->store_id,
                                     key, p + k > 0 ? key - VQKVD_KEY_BYTES : NULL,
                                     vqkvd_tiers_class(j->m, ident), j->m->logical_bytes,
                                     uv_now(s->loop), &b);
        if (rc != VQKV_OK)
            break; /* no room, over quota, or another writer has it: the prefix so far */
        b->codec = ident;
        j->blocks[k] = b;
        j->dst[k] = vqkvd_pool_slot_ptr(&s->pool, b->slot);
        if (e != NULL)
            vqkvd_disk_read_start(e, &j->reads[k]);
    }
    return k;
}

/* How many of keys[0..n) memory holds, from the first. O(that). */
static uint32_t vqkvd__memory_prefix(const vqkvd_server_t *s, uint32_t tenant,
                                     const vqkvd_model_t *m, const uint8_t *keys, uint32_t n)
{
    uint32_t p = 0;
    while (p < n && vqkvd_store_find(&s->store, tenant, m->store_id,
                                     keys + (size_t)p * VQKVD_KEY_BYTES) != NULL)
        p++;
    return p;
}

/* How many of f's checked values, from the one for key index at on,
 * follow one another. */
static uint32_t vqkvd__remote_run(const vqkvd_remote_fetch_t *f, uint32_t at)
{
    uint32_t run = 0;
    if (f == NULL || at < f->first)
        return 0;
    for (uint32_t i = at - f->first; i < f->n && f->idents[i] != NULL; i++)
        run++;
    return run;
}

/* A Lookup whose chain goes on past what memory holds, on disk and then
 * in f (the remote tier's answers, or NULL): a Promote job reads those
 * blocks into reserved pool slots and the Lookup is answered when they
 * are in (vqkvd__job_reply). true when it started (it owns keys and f);
 * false to answer from memory now. */
static bool vqkvd__promote_start(vqkvd_client_t *c, uint64_t id, vqkvd_model_t *m, uint8_t *keys,
                                 uint32_t n, vqkvd_remote_fetch_t *f)
{
    vqkvd_server_t *s = c->server;
    uint32_t tenant = (uint32_t)c->uid;
    uint32_t p = vqkvd__memory_prefix(s, tenant, m, keys, n);
    uint32_t disk = s->disk != NULL ? vqkvd_tiers_disk_run(s, m, tenant, keys, p, n) : 0;
    uint32_t run = disk + vqkvd__remote_run(f, p + disk);
    if (run == 0)
        return false;
    vqkvd_job_t *j = vqkvd__job_new(VQKVD_JOB_PROMOTE, s, c, NULL, m, id, run);
    if (j == NULL)
        return false;
    j->tenant = tenant;
    j->remote = f;
    j->remote_from = disk;
    j->remote_first = p + disk - (f != NULL ? f->first : 0);
    j->n = 0; /* none reserved yet: a failed calloc commits nothing */
    j->blocks = calloc(run, sizeof *j->blocks);
    j->dst = calloc(run, sizeof *j->dst);
    j->reads = calloc(run, sizeof *j->reads);
    j->read_rc = calloc(run, sizeof *j->read_rc);
    if (j->blocks == NULL || j->dst == NULL || j->reads == NULL || j->read_rc == NULL ||
        (j->n = vqkvd__promote_reserve(j, keys, p, run)) == 0 || vqkvd__job_queue(j) != 0) {
        vqkvd__promote_end_reads(j, false);
        vqkvd__job_commit(j, 0);
        j->remote = NULL; /* the caller's again */
        vqkvd__job_free(j);
        return false;
    }
    j->keys = keys;
    j->n_keys = n;
    return true;
}

/* A Lookup waiting for the remote tier; holds its client like a job. */
typedef struct {
    vqkvd_client_t *c;
    uint64_t id;
    vqkvd_model_t *m;
    uint8_t *keys;
    uint32_t n;
} vqkvd_remote_lookup_t;

/* The remote tier has answered (or the deadline passed): the blocks it
 * brought, after those on disk, come into memory, and the Lookup is
 * answered. */
static void vqkvd__remote_looked_up(void *arg, vqkvd_remote_fetch_t *f)
{
    vqkvd_remote_lookup_t *w = arg;
    vqkvd_client_t *c = w->c;
    if (c->closing || !vqkvd__promote_start(c, w->id, w->m, w->keys, w->n, f)) {
        if (!c->closing)
            vqkvd__lookup_answer(c, w->id, w->m, w->keys, w->n);
        vqkvd_remote_fetch_free(f);
        free(w->keys);
    }
    c->pending--;
    free(w);
    vqkvd_client_settle(c);
    vqkvd_client_unref(c);
}

/* A Lookup whose chain goes on past memory and disk: the remote tier is
 * asked for the rest (at most VQKVD_REMOTE_MAX_FETCH blocks). true when
 * asked (it owns keys); false to go on without it (no more keys, or Redis
 * is down). */
static bool vqkvd__remote_lookup(vqkvd_client_t *c, uint64_t id, vqkvd_model_t *m, uint8_t *keys,
                                 uint32_t n)
{
    vqkvd_server_t *s = c->server;
    uint32_t tenant = (uint32_t)c->uid;
    uint32_t p = vqkvd__memory_prefix(s, tenant, m, keys, n);
    if (s->disk != NULL)
        p += vqkvd_tiers_disk_run(s, m, tenant, keys, p, n);
    if (p == n)
        return false;
    vqkvd_remote_lookup_t *w = malloc(sizeof *w);
    if (w == NULL)
        return false;
    *w = (vqkvd_remote_lookup_t){.c = c, .id = id, .m = m, .keys = keys, .n = n};
    uint32_t ask = n - p < VQKVD_REMOTE_MAX_FETCH ? n - p : VQKVD_REMOTE_MAX_FETCH;
    if (vqkvd_remote_fetch(s, m, tenant, keys, p, ask, vqkvd__remote_looked_up, w) != VQKV_OK) {
        free(w);
        return false;
    }
    c->refs++;
    c->pending++;
    return true;
}

void vqkvd_session_lookup(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    vqkvd_server_t *s = c->server;
    const Vqkv__Lookup *lk = req->lookup;
    uint64_t id = req->request_id;
    vqkvd_model_t *m = vqkvd__keys_check(c, id, "a lookup", lk->model_handle, lk->n_keys, lk->keys);
    if (m == NULL)
        return;
    uint8_t *keys = vqkvd__keys_flat(c, id, lk->keys, lk->n_keys);
    if (keys == NULL)
        return;
    if (s->remote != NULL && vqkvd__remote_lookup(c, id, m, keys, (uint32_t)lk->n_keys))
        return; /* answered once the remote tier has; it owns keys */
    if (s->disk != NULL && vqkvd__promote_start(c, id, m, keys, (uint32_t)lk->n_keys, NULL))
        return; /* answered once the blocks on disk are read back; it owns keys */
    vqkvd__lookup_answer(c, id, m, keys, (uint32_t)lk->n_keys);
    free(keys);
}

/* What decodes block b of model m: the codec its identity names (blocks
 * put before the model's codebooks were ready are fp16), or NULL when it
 * names neither of the model's: such a block is never decoded. */
static const vqkv_codec_t *vqkvd__block_codec(const vqkvd_model_t *m, const vqkvd_block_t *b)
{
    if (b->codec == &m->codec_ident && m->ready)
        return m->codec;
    if (b->codec == &m->fallback_ident && m->fallback != NULL)
        return m->fallback;
    return NULL;
}

/* Block i of lease l in the Get job j: decoded from its pool slot, or,
 * while its encode runs, encoded by the job from its stage (held until the
 * job ends) into the job's buffer at *out and decoded from there. false
 * after an Error reply: a block no codec of the model decodes. */
static bool vqkvd__get_block(vqkvd_job_t *j, uint32_t i, const vqkvd_lease_t *l, const Vqkv__Get *g,
                             uint8_t **out)
{
    vqkvd_block_t *b = l->blocks[i];
    j->slots[i] = g->slots[i];
    j->blocks[i] = b;
    j->codecs[i] = vqkvd__block_codec(j->m, b);
    if (j->codecs[i] == NULL) {
        if (b->codec == &vqkvd__encode_failed)
            vqkvd_client_error(j->c, j->request_id, VQKV_EMISMATCH,
                               "block %u could not be encoded and is being dropped", (unsigned)i);
        else
            vqkvd_client_error(j->c, j->request_id, VQKV_EMISMATCH,
                               "block %u was encoded with %s, which model %u no longer has",
                               (unsigned)i, b->codec->spec, (unsigned)j->m->id);
        return false;
    }
    if (b->stage == NULL) {
        j->src[i] = vqkvd_pool_slot_ptr(&j->s->pool, b->slot);
        return true;
    }
    j->stages[i] = b->stage;
    j->stage_slots[i] = b->stage_slot;
    vqkvd_stage_ref(b->stage);
    j->dst[i] = *out;
    j->src[i] = *out;
    *out += vqkv_codec_block_bytes(j->codecs[i]);
    return true;
}

/* Bytes of the buffer a Get job encodes the staged blocks of lease l
 * into: a block's size under the largest of the model's codecs each. */
static size_t vqkvd__get_staged_bytes(const vqkvd_model_t *m, const vqkvd_lease_t *l, uint32_t n)
{
    size_t bytes = m->block_bytes > m->fallback_bytes ? m->block_bytes : m->fallback_bytes;
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += l->blocks[i]->stage != NULL ? bytes : 0;
    return total;
}

/* The Get job of g's slots from lease l into r, or NULL after an Error
 * reply. */
static vqkvd_job_t *vqkvd__get_new(vqkvd_client_t *c, uint64_t id, vqkvd_region_t *r,
                                   vqkvd_model_t *lm, const vqkvd_lease_t *l, const Vqkv__Get *g)
{
    uint32_t n = (uint32_t)g->n_slots, cnt = n ? n : 1;
    size_t staged = vqkvd__get_staged_bytes(lm, l, n);
    vqkvd_job_t *j = vqkvd__job_new(VQKVD_JOB_GET, c->server, c, r, lm, id, n);
    if (j != NULL) {
        j->blocks = calloc(cnt, sizeof *j->blocks);
        j->src = calloc(cnt, sizeof *j->src);
        j->codecs = calloc(cnt, sizeof *j->codecs);
        j->stages = calloc(cnt, sizeof *j->stages);
        j->stage_slots = calloc(cnt, sizeof *j->stage_slots);
        j->dst = calloc(cnt, sizeof *j->dst);
        j->out = staged > 0 ? malloc(staged) : NULL;
    }
    if (j == NULL || j->blocks == NULL || j->src == NULL || j->codecs == NULL ||
        j->stages == NULL || j->stage_slots == NULL || j->dst == NULL ||
        (staged > 0 && j->out == NULL)) {
        if (j != NULL)
            vqkvd__job_free(j);
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return NULL;
    }
    if (!vqkvd__job_event(j, id, &g->cuda_event)) {
        vqkvd__job_free(j);
        return NULL;
    }
    uint8_t *out = j->out;
    for (uint32_t i = 0; i < n; i++) {
        if (!vqkvd__get_block(j, i, l, g, &out)) {
            vqkvd__job_free(j);
            return NULL;
        }
    }
    return j;
}

void vqkvd_session_get(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
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
    /* A lease holds blocks of one model, the one its lookup named; models
     * live as long as the server. */
    vqkvd_model_t *lm =
        l->n > 0 ? vqkvd_model_by_store_id(s, (uint32_t)c->uid, l->blocks[0]->model) : r->model;
    if (lm == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "lease %llu names a model this daemon lacks",
                           (unsigned long long)g->lease_id);
        return;
    }
    if (!vqkvd__region_fits(c, id, r, lm))
        return;
    vqkvd_job_t *j = vqkvd__get_new(c, id, r, lm, l, g);
    if (j == NULL)
        return;
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
