/* pins.c -- Pin and Unpin (keep blocks from eviction, for a TTL or, with
 * ttl_ms 0, until Unpin or the connection closes: the connection keeps a
 * table of those), Evict (drop named blocks or a whole model's) and Flush
 * (write memory down to the disk tier; tiers.h).
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

/* A Pin with ttl_ms 0 pins for this long (about 36 million years) and the
 * connection remembers the block, to unpin it on Unpin or when it closes. */
#define VQKVD_PIN_FOREVER_MS (UINT64_C(1) << 60)

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

/* The pin table's first size: a connection that pins at all pins a few
 * chains. */
#define VQKVD_PINS_FIRST_CAP 64

/* Room for want entries at a load of at most one half. */
static int vqkvd__pin_reserve(vqkvd_client_t *c, uint32_t want)
{
    if ((uint64_t)want * 2 <= c->cap_pins)
        return VQKV_OK;
    uint32_t cap = c->cap_pins ? c->cap_pins : VQKVD_PINS_FIRST_CAP;
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

void vqkvd_session_pin(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
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
        if (vqkvd_store_pin(&s->store, tenant, m->store_id, key, now, ttl) != VQKV_OK)
            continue; /* not held: skipped */
        count++;
        /* A later pin replaces the TTL: only a ttl_ms 0 pin is remembered. */
        long at = vqkvd__pin_index(c, m->store_id, key);
        if (forever && at < 0)
            vqkvd__pin_add(c, m->store_id, key);
        else if (!forever && at >= 0)
            vqkvd__pin_remove_at(c, (uint32_t)at);
    }
    vqkvd__ack(c, id, count);
}

void vqkvd_session_unpin(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
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
        vqkvd__pin_forget(c, m->store_id, key);
        const vqkvd_block_t *b = vqkvd_store_find(&s->store, tenant, m->store_id, key);
        if (b == NULL || !vqkvd_store_pinned(b, now))
            continue; /* absent or not pinned: skipped */
        vqkvd_store_unpin(&s->store, tenant, m->store_id, key);
        count++;
    }
    vqkvd__ack(c, id, count);
}

/* ---- Evict, FindModel, Flush --------------------------------------------------- */

/* Whether c may make requests that act for every tenant: a uid of
 * admin_uids, root, or vqkvd's own user (its operator). */
static bool vqkvd__is_operator(const vqkvd_client_t *c)
{
    return vqkvd__is_admin(c) || c->uid == 0 || c->uid == geteuid();
}

void vqkvd_session_flush(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    vqkvd_server_t *s = c->server;
    if (!vqkvd__is_operator(c)) {
        vqkvd_client_error(c, req->request_id, VQKV_EPERM,
                           "flush: only admin_uids, root or vqkvd's own user may flush");
        return;
    }
    int rc = vqkvd_tiers_flush_wait(s, c, req->request_id);
    if (rc == VQKV_EINVAL)
        vqkvd_client_error(c, req->request_id, rc, "flush: there is no disk tier (disk_dir unset)");
    else if (rc != VQKV_OK)
        vqkvd_client_error(c, req->request_id, rc, "flush: %s", vqkv_proto_strerror(rc));
}

void vqkvd_session_evict(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
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
    int64_t n = vqkvd_store_evict(&s->store, (uint32_t)c->uid, m->store_id, keys,
                                  (uint32_t)e->n_keys, e->all, uv_now(s->loop));
    if (n >= 0)
        n += (int64_t)vqkvd_tiers_forget(s, (uint32_t)c->uid, m->store_id, keys,
                                         (uint32_t)e->n_keys, e->all);
    free(keys);
    if (n < 0) {
        vqkvd_client_error(c, id, (int)n, "evict: %s", vqkv_proto_strerror((int)n));
        return;
    }
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: evicted %lld blocks of model %u",
              (unsigned long long)c->id, (long long)n, (unsigned)m->id);
    vqkvd__ack(c, id, n > UINT32_MAX ? UINT32_MAX : (uint32_t)n);
}
