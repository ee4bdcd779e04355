/* transcode.c -- the blocks a VQ model stored in its fp16 fallback while it
 * calibrated, re-encoded with the model's codec once its codebooks are
 * ready, in the background. Without it they would stay fp16, 5-16x larger
 * than the rest, for as long as they are cached: usually the system prompt
 * every request shares.
 *
 * One batch at a time per model, on libuv's thread pool. The loop picks up
 * to VQKVD_TRANSCODE_BATCH fallback blocks that nothing holds, takes a hold
 * on each (vqkvd_store_hold, so none is evicted) and a slot of the codec's class for
 * it; the job decodes each block into a one-slot scratch cache of the
 * model's layout and encodes it into its new slot (on host copies the
 * backend moves, so a GPU's pool works alike); back on the loop, a
 * block still held by nobody else moves to the new slot and its fallback
 * slot goes back to the pool, while one a lease or a get took meanwhile
 * keeps its fp16 slot until a later batch (a get job reads the slot it
 * found when it started). For fp16 workers the fallback is exact, so the
 * bytes are what a Put after calibration would have stored; for bf16 and
 * f32 workers they were rounded to fp16 once, far below the codec's error.
 *
 * Picking a batch walks the store's LRU list: O(blocks) per batch, fine for
 * the few thousand blocks a calibration window leaves; not needed faster
 * so far. When the pool has no slot for the codec's class the batch is cut
 * short and the tick tries again after evictions.
 */
#include "transcode.h"

#include "log.h"
#include "remote.h"

#include <stdlib.h>

typedef struct {
    vqkvd_block_t *block;
    uint64_t slot; /* the new one, of the codec's class */
    const uint8_t *src;
    uint8_t *dst;
    int rc;
} vqkvd__transcode_item_t;

struct vqkvd_transcode {
    uv_work_t work;
    vqkvd_server_t *server;
    vqkvd_model_t *model;
    uint32_t n;
    vqkvd__transcode_item_t items[VQKVD_TRANSCODE_BATCH];
};

/* On a pool thread: touches only the items' slots and immutable codecs.
 * The CPU codecs run on host copies of the blocks, which the backend reads
 * from and writes to their slots (memcpys on the CPU, copies to and from
 * a GPU's memory there): two block copies each, noise next to a decode
 * and an encode. */
static void vqkvd__transcode_work(uv_work_t *w)
{
    struct vqkvd_transcode *t = w->data;
    const vqkvd_model_t *m = t->model;
    vqkvd_backend_t *be = t->server->backend;
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &m->layout, 1);
    uint8_t *scratch = malloc(view.region_bytes);
    uint8_t *from = malloc(m->fallback_bytes), *to = malloc(m->block_bytes);
    for (uint32_t i = 0; i < t->n; i++) {
        vqkvd__transcode_item_t *it = &t->items[i];
        it->rc = scratch == NULL || from == NULL || to == NULL ? VQKV_ENOMEM : VQKV_OK;
        if (it->rc == VQKV_OK)
            it->rc = be->ops->block_read(be, it->src, m->fallback_bytes, from);
        if (it->rc == VQKV_OK)
            it->rc = vqkv_codec_decode(m->fallback, from, scratch, &view, 0);
        if (it->rc == VQKV_OK)
            it->rc = vqkv_codec_encode(m->codec, scratch, &view, 0, to);
        if (it->rc == VQKV_OK)
            it->rc = be->ops->block_write(be, it->dst, to, m->block_bytes);
    }
    free(scratch);
    free(from);
    free(to);
}

static void vqkvd__transcode_start(vqkvd_server_t *s, vqkvd_model_t *m);

static void vqkvd__transcode_after(uv_work_t *w, int status)
{
    struct vqkvd_transcode *t = w->data;
    vqkvd_server_t *s = t->server;
    vqkvd_model_t *m = t->model;
    uint32_t moved = 0;
    for (uint32_t i = 0; i < t->n; i++) {
        vqkvd__transcode_item_t *it = &t->items[i];
        vqkvd_store_unhold(it->block);
        if (!vqkvd_store_held(it->block) && status == 0 && it->rc == VQKV_OK) {
            vqkvd_store_rehome(&s->store, it->block, m->cls, it->slot);
            it->block->codec = &m->codec_ident;
            vqkvd_remote_put(s, m, it->block);
            moved++;
        } else {
            vqkvd_pool_free(&s->pool, it->slot);
        }
    }
    m->transcode = NULL;
    m->transcoded += moved;
    vqkvd_log(VQKVD_LOG_DEBUG, "model %u: %u of %u fp16 blocks re-encoded", (unsigned)m->id,
              (unsigned)moved, (unsigned)t->n);
    free(t);
    /* Drain while it makes progress, rather than a batch a tick. */
    if (moved > 0 && !s->stopping)
        vqkvd__transcode_start(s, m);
}

static void vqkvd__transcode_start(vqkvd_server_t *s, vqkvd_model_t *m)
{
    struct vqkvd_transcode *t = calloc(1, sizeof *t);
    if (t == NULL)
        return;        /* the tick tries again */
    uint64_t left = 0; /* fallback blocks, held ones too */
    for (vqkvd_block_t *b = vqkvd_store_next(&s->store, NULL);
         b != NULL && t->n < VQKVD_TRANSCODE_BATCH; b = vqkvd_store_next(&s->store, b)) {
        if (b->codec != &m->fallback_ident) /* another model's, or not fp16 */
            continue;
        left++;
        if (vqkvd_store_held(b) || b->stage != NULL)
            continue; /* a lease or a get holds it, or its slot awaits its encode: a later batch */
        vqkvd__transcode_item_t *it = &t->items[t->n];
        if (vqkvd_pool_alloc(&s->pool, m->cls, &it->slot) != VQKV_OK)
            break;
        it->block = b;
        it->src = vqkvd_pool_slot_ptr(&s->pool, b->slot);
        it->dst = vqkvd_pool_slot_ptr(&s->pool, it->slot);
        vqkvd_store_hold(b);
        t->n++;
    }
    if (t->n == 0) {
        free(t);
        if (left == 0) {
            m->transcode_done = 1; /* no more walks for this model */
            if (m->transcoded > 0)
                vqkvd_log(VQKVD_LOG_INFO,
                          "model %u: the %llu blocks stored in fp16 while it calibrated are now "
                          "%s, %u bytes "
                          "each instead of %u",
                          (unsigned)m->id, (unsigned long long)m->transcoded,
                          vqkv_codec_spec(m->codec), (unsigned)m->block_bytes,
                          (unsigned)m->fallback_bytes);
        }
        return;
    }
    t->server = s;
    t->model = m;
    t->work.data = t;
    if (uv_queue_work(s->loop, &t->work, vqkvd__transcode_work, vqkvd__transcode_after) < 0) {
        for (uint32_t i = 0; i < t->n; i++) {
            vqkvd_store_unhold(t->items[i].block);
            vqkvd_pool_free(&s->pool, t->items[i].slot);
        }
        free(t);
        return;
    }
    m->transcode = t;
}

void vqkvd_transcode_poll(vqkvd_server_t *s)
{
    if (s->stopping)
        return;
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->ready && m->fallback != NULL && m->transcode == NULL && !m->transcode_done)
            vqkvd__transcode_start(s, m);
    }
}
