/* store.c -- the block index (store.h).
 *
 * Three structures share the blocks: a chained hash table from (tenant,
 * model, key) to block, an intrusive LRU list (head = least recent) and the
 * parent pointers with their child counts. Leases live apart, in a table by
 * id and a list sorted by expiry. Every block is one malloc; its pointer is
 * stable for as long as it is present, which is what lets leases and
 * children point at blocks directly (a leased block or a parent is never
 * evicted, so those pointers never dangle).
 *
 * Tenants are a small array of counters, one entry per tenant seen (or
 * given a quota). A block's bytes are added to its tenant's entry when it
 * is inserted and taken off when it goes, the same moments the totals
 * change, so the entries always sum to the totals.
 */
#include "store.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "vqkv_codec.h"
#include "vqkv_proto.h"

static const uint8_t vqkvd__zero_key[VQKVD_KEY_BYTES];

/* ---- hashing: SipHash-1-3 over key || tenant || model (40 bytes) ------- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1;                                                                                  \
        v1 = ROTL(v1, 13);                                                                         \
        v1 ^= v0;                                                                                  \
        v0 = ROTL(v0, 32);                                                                         \
        v2 += v3;                                                                                  \
        v3 = ROTL(v3, 16);                                                                         \
        v3 ^= v2;                                                                                  \
        v0 += v3;                                                                                  \
        v3 = ROTL(v3, 21);                                                                         \
        v3 ^= v0;                                                                                  \
        v2 += v1;                                                                                  \
        v1 = ROTL(v1, 17);                                                                         \
        v1 ^= v2;                                                                                  \
        v2 = ROTL(v2, 32);                                                                         \
    } while (0)

static uint64_t vqkvd__le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

uint64_t vqkvd_store_hash(const vqkvd_store_t *s, uint32_t tenant, uint32_t model,
                          const uint8_t *key)
{
    uint64_t v0 = s->sip_k0 ^ 0x736f6d6570736575ull;
    uint64_t v1 = s->sip_k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = s->sip_k0 ^ 0x6c7967656e657261ull;
    uint64_t v3 = s->sip_k1 ^ 0x7465646279746573ull;
    uint64_t m[6];
    for (int i = 0; i < 4; i++)
        m[i] = vqkvd__le64(key + 8 * i);
    m[4] = (uint64_t)tenant | ((uint64_t)model << 32);
    m[5] = (uint64_t)40 << 56; /* the length byte of the final block */
    for (int i = 0; i < 6; i++) {
        v3 ^= m[i];
        SIPROUND;
        v0 ^= m[i];
    }
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static vqkvd_block_t **vqkvd__store_bucket(const vqkvd_store_t *s, uint32_t tenant, uint32_t model,
                                           const uint8_t *key)
{
    return &s->buckets[vqkvd_store_hash(s, tenant, model, key) & s->bucket_mask];
}

static vqkvd_block_t *vqkvd__store_block_get(const vqkvd_store_t *s, uint32_t tenant,
                                             uint32_t model, const uint8_t *key)
{
    vqkvd_block_t *b = *vqkvd__store_bucket(s, tenant, model, key);
    for (; b != NULL; b = b->hnext) {
        if (b->tenant == tenant && b->model == model && memcmp(b->key, key, VQKVD_KEY_BYTES) == 0)
            return b;
    }
    return NULL;
}

/* A committed block: a reserved one is no one's to see until its writer
 * commits it. */
static vqkvd_block_t *vqkvd__store_block_present(const vqkvd_store_t *s, uint32_t tenant,
                                                 uint32_t model, const uint8_t *key)
{
    vqkvd_block_t *b = vqkvd__store_block_get(s, tenant, model, key);
    return b != NULL && b->writer == 0 ? b : NULL;
}

/* Doubles the bucket array when blocks outnumber buckets: O(blocks), so O(1)
 * amortized per insert. A failed grow only leaves chains longer. */
static void vqkvd__store_table_maybe_grow(vqkvd_store_t *s)
{
    uint64_t n = s->bucket_mask + 1;
    if (s->stats.blocks < n || n > (UINT64_MAX >> 1) / sizeof(vqkvd_block_t *))
        return;
    vqkvd_block_t **nb = calloc(2 * n, sizeof(*nb));
    if (nb == NULL)
        return;
    vqkvd_block_t **old = s->buckets;
    s->buckets = nb;
    s->bucket_mask = 2 * n - 1;
    for (uint64_t i = 0; i < n; i++) {
        vqkvd_block_t *b = old[i];
        while (b != NULL) {
            vqkvd_block_t *next = b->hnext;
            vqkvd_block_t **head = vqkvd__store_bucket(s, b->tenant, b->model, b->key);
            b->hnext = *head;
            *head = b;
            b = next;
        }
    }
    free(old);
}

/* ---- LRU list ------------------------------------------------------------ */

static void vqkvd__store_lru_unlink(vqkvd_store_t *s, vqkvd_block_t *b)
{
    if (b->lru_prev != NULL)
        b->lru_prev->lru_next = b->lru_next;
    else
        s->lru_head = b->lru_next;
    if (b->lru_next != NULL)
        b->lru_next->lru_prev = b->lru_prev;
    else
        s->lru_tail = b->lru_prev;
    b->lru_prev = b->lru_next = NULL;
}

static void vqkvd__store_lru_append(vqkvd_store_t *s, vqkvd_block_t *b)
{
    b->stamp = ++s->next_stamp;
    b->lru_prev = s->lru_tail;
    b->lru_next = NULL;
    if (s->lru_tail != NULL)
        s->lru_tail->lru_next = b;
    else
        s->lru_head = b;
    s->lru_tail = b;
}

static void vqkvd__store_lru_touch(vqkvd_store_t *s, vqkvd_block_t *b)
{
    vqkvd__store_lru_unlink(s, b);
    vqkvd__store_lru_append(s, b);
}

/* ---- tenants ------------------------------------------------------------- */

static vqkvd_tenant_stats_t *vqkvd__store_tenant_find(const vqkvd_store_t *s, uint32_t tenant)
{
    for (uint32_t i = 0; i < s->n_tenants; i++) {
        if (s->tenants[i].tenant == tenant)
            return &s->tenants[i];
    }
    return NULL;
}

/* The tenant's entry, made on first use; NULL only when out of memory. */
static vqkvd_tenant_stats_t *vqkvd__store_tenant_get(vqkvd_store_t *s, uint32_t tenant)
{
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_find(s, tenant);
    if (t != NULL)
        return t;
    if (s->n_tenants == s->cap_tenants) {
        uint32_t cap = s->cap_tenants ? s->cap_tenants * 2 : 8;
        t = realloc(s->tenants, cap * sizeof(*t));
        if (t == NULL)
            return NULL;
        s->tenants = t;
        s->cap_tenants = cap;
    }
    t = &s->tenants[s->n_tenants++];
    memset(t, 0, sizeof(*t));
    t->tenant = tenant;
    t->quota_bytes = s->default_quota_bytes;
    return t;
}

/* ---- blocks -------------------------------------------------------------- */

static int vqkvd__store_block_evictable(const vqkvd_block_t *b, uint64_t now)
{
    return b->children == 0 && b->refs == 0 && b->pin_until <= now;
}

/* Unlinks b from the table, the LRU list (when committed) and its parent,
 * gives its slot back and takes its bytes off the counters. b must be a
 * leaf without leases. O(bucket chain). */
static void vqkvd__store_block_unlink(vqkvd_store_t *s, vqkvd_block_t *b)
{
    vqkvd_block_t **pp = vqkvd__store_bucket(s, b->tenant, b->model, b->key);
    while (*pp != b)
        pp = &(*pp)->hnext;
    *pp = b->hnext;
    if (b->writer == 0)
        vqkvd__store_lru_unlink(s, b);
    if (b->parent != NULL)
        b->parent->children--;
    vqkvd_pool_free(s->pool, b->slot);
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_find(s, b->tenant); /* made at reserve */
    if (t != NULL) {
        t->blocks--;
        t->bytes_stored -= b->stored_bytes;
        t->bytes_logical -= b->logical_bytes;
    }
    s->stats.blocks--;
    s->stats.bytes_stored -= b->stored_bytes;
    s->stats.bytes_logical -= b->logical_bytes;
}

/* Evicts committed block b, a leaf without leases, and frees it. */
static void vqkvd__store_block_remove(vqkvd_store_t *s, vqkvd_block_t *b)
{
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_find(s, b->tenant);
    if (t != NULL)
        t->evictions++;
    s->stats.evictions++;
    vqkvd__store_block_unlink(s, b);
    free(b);
}

void vqkvd_store_rehome(vqkvd_store_t *s, vqkvd_block_t *b, uint32_t cls, uint64_t slot)
{
    uint32_t bytes = vqkvd_pool_class_slot_bytes(s->pool, cls);
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_find(s, b->tenant); /* made at insert */
    if (t != NULL)
        t->bytes_stored = t->bytes_stored - b->stored_bytes + bytes;
    s->stats.bytes_stored = s->stats.bytes_stored - b->stored_bytes + bytes;
    vqkvd_pool_free(s->pool, b->slot);
    b->cls = cls;
    b->slot = slot;
    b->stored_bytes = bytes;
}

/* Evicts least recently used evictable leaves: of class cls only and just
 * one when cls >= 0 (an alloc of that class failed); else of tenant t only
 * until it holds at most target bytes when t is not NULL (its quota); else
 * any until the pool holds at most target bytes. Returns how many went.
 *
 * When an evicted block's parent becomes a leaf and is older than where the
 * scan stands, the scan steps back to it: everything older than the cursor
 * was looked at already and only that parent changed, so the order stays
 * strictly LRU among leaves. */
static uint64_t vqkvd__store_evict_lru(vqkvd_store_t *s, uint64_t now, uint64_t target, int cls,
                                       const vqkvd_tenant_stats_t *t)
{
    uint64_t n = 0;
    vqkvd_block_t *b = s->lru_head;

    while (b != NULL) {
        if (cls < 0 && (t != NULL ? t->bytes_stored : s->pool->bytes_stored) <= target)
            break;
        vqkvd_block_t *next = b->lru_next;
        if (vqkvd__store_block_evictable(b, now) && (cls < 0 || b->cls == (uint32_t)cls) &&
            (t == NULL || b->tenant == t->tenant)) {
            vqkvd_block_t *parent = b->parent;
            if (s->on_evict != NULL)
                s->on_evict(s->hooks_arg, b);
            vqkvd__store_block_remove(s, b);
            n++;
            if (cls >= 0)
                break;
            if (parent != NULL && vqkvd__store_block_evictable(parent, now) &&
                (next == NULL || parent->stamp < next->stamp))
                next = parent;
        }
        b = next;
    }
    return n;
}

int vqkvd_store_init(vqkvd_store_t *s, vqkvd_pool_t *pool, double high, double low,
                     const uint8_t *seed)
{
    uint8_t rnd[16];

    memset(s, 0, sizeof(*s));
    if (pool == NULL || !(low > 0.0) || !(low <= high) || !(high <= 1.0))
        return VQKV_EINVAL;
    if (seed == NULL) {
        if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
            return VQKV_EIO;
        seed = rnd;
    }
    s->buckets = calloc(64, sizeof(*s->buckets));
    s->lease_buckets = calloc(64, sizeof(*s->lease_buckets));
    if (s->buckets == NULL || s->lease_buckets == NULL) {
        vqkvd_store_destroy(s);
        return VQKV_ENOMEM;
    }
    vqkvd_pool_stats_t ps;
    vqkvd_pool_stats(pool, &ps);
    s->pool = pool;
    s->high_bytes = (uint64_t)(high * (double)ps.usable_bytes);
    s->low_bytes = (uint64_t)(low * (double)ps.usable_bytes);
    s->sip_k0 = vqkvd__le64(seed);
    s->sip_k1 = vqkvd__le64(seed + 8);
    s->bucket_mask = 63;
    s->lease_mask = 63;
    s->next_lease_id = 1;
    return VQKV_OK;
}

static void vqkvd__store_lease_free(vqkvd_store_t *s, vqkvd_lease_t *l);

void vqkvd_store_destroy(vqkvd_store_t *s)
{
    while (s->lease_head != NULL)
        vqkvd__store_lease_free(s, s->lease_head);
    /* Everything goes at once, so the tree order does not matter here; the
     * table, unlike the LRU list, holds reserved blocks too. */
    for (uint64_t i = 0; s->buckets != NULL && i <= s->bucket_mask; i++) {
        vqkvd_block_t *b = s->buckets[i];
        while (b != NULL) {
            vqkvd_block_t *next = b->hnext;
            if (s->pool != NULL)
                vqkvd_pool_free(s->pool, b->slot);
            free(b);
            b = next;
        }
    }
    free(s->buckets);
    free(s->lease_buckets);
    free(s->tenants);
    memset(s, 0, sizeof(*s));
}

/* Makes room for a slot_bytes block of tenant t: the tenant's quota first
 * (what the tenant evicts for it also makes room in the pool), then the
 * high watermark, then a slot of class cls, evicting as store.h describes.
 * parent, when not NULL, is held so that making room cannot take it. */
static int vqkvd__store_take_slot(vqkvd_store_t *s, vqkvd_tenant_stats_t *t, vqkvd_block_t *parent,
                                  uint32_t cls, uint32_t slot_bytes, uint64_t now, uint64_t *slot)
{
    int rc = VQKV_OK;
    if (parent != NULL)
        parent->refs++;
    if (t->quota_bytes != 0 && t->bytes_stored + slot_bytes > t->quota_bytes) {
        if (slot_bytes <= t->quota_bytes)
            vqkvd__store_evict_lru(s, now, t->quota_bytes - slot_bytes, -1, t);
        rc = t->bytes_stored + slot_bytes > t->quota_bytes ? VQKV_EQUOTA : VQKV_OK;
    }
    if (rc == VQKV_OK && s->pool->bytes_stored + slot_bytes > s->high_bytes)
        vqkvd__store_evict_lru(s, now, s->low_bytes, -1, NULL);
    if (rc == VQKV_OK)
        rc = vqkvd_pool_alloc(s->pool, cls, slot);
    if (rc == VQKV_ENOMEM) {
        /* Other classes may hold the free memory; then only this class's
         * own blocks can make room. */
        vqkvd__store_evict_lru(s, now, s->low_bytes, -1, NULL);
        rc = vqkvd_pool_alloc(s->pool, cls, slot);
        if (rc == VQKV_ENOMEM && vqkvd__store_evict_lru(s, now, 0, (int)cls, NULL) > 0)
            rc = vqkvd_pool_alloc(s->pool, cls, slot);
    }
    if (parent != NULL)
        parent->refs--;
    return rc;
}

int vqkvd_store_reserve(vqkvd_store_t *s, uint64_t writer, uint32_t tenant, uint32_t model,
                        const uint8_t *key, const uint8_t *parent_key, uint32_t cls,
                        uint32_t logical_bytes, uint64_t now, vqkvd_block_t **out)
{
    vqkvd_block_t *parent = NULL, *b = NULL;
    uint64_t h = 0;

    if (writer == 0 || key == NULL || out == NULL || cls >= s->pool->n_classes)
        return VQKV_EINVAL;
    uint32_t slot_bytes = vqkvd_pool_class_slot_bytes(s->pool, cls);
    b = vqkvd__store_block_get(s, tenant, model, key);
    if (b != NULL) {
        if (b->writer == 0)
            vqkvd__store_lru_touch(s, b);
        *out = b;
        return VQKV_EEXIST;
    }
    if (parent_key != NULL && memcmp(parent_key, vqkvd__zero_key, VQKVD_KEY_BYTES) != 0) {
        parent = vqkvd__store_block_get(s, tenant, model, parent_key);
        /* A parent another writer has yet to commit may still be aborted. */
        if (parent == NULL || (parent->writer != 0 && parent->writer != writer))
            return VQKV_ENOPARENT;
    }
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_get(s, tenant);
    if (t == NULL)
        return VQKV_ENOMEM;
    int rc = vqkvd__store_take_slot(s, t, parent, cls, slot_bytes, now, &h);
    if (rc != VQKV_OK)
        return rc;
    b = calloc(1, sizeof(*b));
    if (b == NULL) {
        vqkvd_pool_free(s->pool, h);
        return VQKV_ENOMEM;
    }
    b->writer = writer;
    b->tenant = tenant;
    b->model = model;
    memcpy(b->key, key, VQKVD_KEY_BYTES);
    b->parent = parent;
    b->cls = cls;
    b->logical_bytes = logical_bytes;
    b->stored_bytes = slot_bytes;
    b->slot = h;
    vqkvd_block_t **head = vqkvd__store_bucket(s, tenant, model, key);
    b->hnext = *head;
    *head = b;
    if (parent != NULL)
        parent->children++;
    t->blocks++;
    t->bytes_stored += slot_bytes;
    t->bytes_logical += logical_bytes;
    s->stats.blocks++;
    s->stats.bytes_stored += slot_bytes;
    s->stats.bytes_logical += logical_bytes;
    vqkvd__store_table_maybe_grow(s);
    *out = b;
    return VQKV_OK;
}

void vqkvd_store_commit(vqkvd_store_t *s, vqkvd_block_t *b)
{
    b->writer = 0;
    vqkvd__store_lru_append(s, b);
    s->stats.inserts++;
}

void vqkvd_store_abort(vqkvd_store_t *s, vqkvd_block_t *b)
{
    vqkvd__store_block_unlink(s, b);
    free(b);
}

int vqkvd_store_insert(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key,
                       const uint8_t *parent_key, uint32_t cls, uint32_t logical_bytes,
                       uint64_t now, uint64_t *slot)
{
    vqkvd_block_t *b = NULL;
    if (slot == NULL)
        return VQKV_EINVAL;
    int rc = vqkvd_store_reserve(s, VQKVD_STORE_WRITER_INSERT, tenant, model, key, parent_key, cls,
                                 logical_bytes, now, &b);
    if (rc == VQKV_OK)
        vqkvd_store_commit(s, b);
    if (rc == VQKV_OK || rc == VQKV_EEXIST)
        *slot = b->slot;
    return rc;
}

void vqkvd_store_hold(vqkvd_block_t *b)
{
    b->refs++;
}

void vqkvd_store_unhold(vqkvd_block_t *b)
{
    b->refs--;
}

int vqkvd_store_held(const vqkvd_block_t *b)
{
    return b->refs != 0;
}

int vqkvd_store_pinned(const vqkvd_block_t *b, uint64_t now)
{
    return b->pin_until > now;
}

vqkvd_block_t *vqkvd_store_next(const vqkvd_store_t *s, const vqkvd_block_t *b)
{
    return b == NULL ? s->lru_head : b->lru_next;
}

uint32_t vqkvd_store_tenant_count(const vqkvd_store_t *s)
{
    return s->n_tenants;
}

const vqkvd_tenant_stats_t *vqkvd_store_tenant_at(const vqkvd_store_t *s, uint32_t i)
{
    return &s->tenants[i];
}

/* ---- leases -------------------------------------------------------------- */

static vqkvd_lease_t **vqkvd__store_lease_slot(vqkvd_store_t *s, uint64_t id)
{
    vqkvd_lease_t **pp = &s->lease_buckets[id & s->lease_mask];
    while (*pp != NULL && (*pp)->id != id)
        pp = &(*pp)->hnext;
    return pp;
}

/* Doubles the lease table at load 1: O(1) amortized. */
static void vqkvd__store_lease_table_maybe_grow(vqkvd_store_t *s)
{
    uint64_t n = s->lease_mask + 1;
    if (s->stats.leases < n || n > (UINT64_MAX >> 1) / sizeof(vqkvd_lease_t *))
        return;
    vqkvd_lease_t **nb = calloc(2 * n, sizeof(*nb));
    if (nb == NULL)
        return;
    for (uint64_t i = 0; i < n; i++) {
        vqkvd_lease_t *l = s->lease_buckets[i];
        while (l != NULL) {
            vqkvd_lease_t *next = l->hnext;
            l->hnext = nb[l->id & (2 * n - 1)];
            nb[l->id & (2 * n - 1)] = l;
            l = next;
        }
    }
    free(s->lease_buckets);
    s->lease_buckets = nb;
    s->lease_mask = 2 * n - 1;
}

/* Drops l's holds on its blocks and frees it. O(l->n + bucket chain). */
static void vqkvd__store_lease_free(vqkvd_store_t *s, vqkvd_lease_t *l)
{
    vqkvd_lease_t **pp = vqkvd__store_lease_slot(s, l->id);
    if (*pp == l)
        *pp = l->hnext;
    if (l->prev != NULL)
        l->prev->next = l->next;
    else
        s->lease_head = l->next;
    if (l->next != NULL)
        l->next->prev = l->prev;
    else
        s->lease_tail = l->prev;
    for (uint32_t i = 0; i < l->n; i++)
        l->blocks[i]->refs--;
    s->stats.leases--;
    free(l);
}

int vqkvd_store_lookup(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                       uint32_t n, uint64_t now, uint64_t owner, uint64_t ttl_ms,
                       uint64_t *lease_id, uint64_t *slots)
{
    vqkvd_lease_t *l = NULL;
    uint32_t found = 0;

    if ((keys == NULL && n > 0) || n > VQKVD_STORE_MAX_CHAIN ||
        (lease_id != NULL && (ttl_ms == 0 || ttl_ms > UINT64_MAX - now)))
        return VQKV_EINVAL;
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_get(s, tenant);
    if (t == NULL)
        return VQKV_ENOMEM;
    while (found < n &&
           vqkvd__store_block_present(s, tenant, model, keys + (size_t)found * VQKVD_KEY_BYTES))
        found++;
    if (lease_id != NULL && found > 0) {
        l = malloc(sizeof(*l) + (size_t)found * sizeof(l->blocks[0]));
        if (l == NULL)
            return VQKV_ENOMEM;
    }

    /* Nothing can fail from here on. */
    for (uint32_t i = 0; i < found; i++) {
        vqkvd_block_t *b =
            vqkvd__store_block_present(s, tenant, model, keys + (size_t)i * VQKVD_KEY_BYTES);
        vqkvd__store_lru_touch(s, b);
        if (slots != NULL)
            slots[i] = b->slot;
        if (l != NULL) {
            l->blocks[i] = b;
            b->refs++;
        }
    }
    t->hits += found;
    t->misses += n - found;
    s->stats.hits += found;
    s->stats.misses += n - found;
    if (lease_id != NULL)
        *lease_id = 0;
    if (l == NULL)
        return (int)found;

    l->id = s->next_lease_id++;
    l->owner = owner;
    l->expiry = now + ttl_ms;
    l->n = found;
    vqkvd_lease_t **pp = vqkvd__store_lease_slot(s, l->id);
    l->hnext = NULL;
    *pp = l;
    /* Sorted insert from the tail: O(1) when every TTL is the same. */
    vqkvd_lease_t *after = s->lease_tail;
    while (after != NULL && after->expiry > l->expiry)
        after = after->prev;
    l->prev = after;
    l->next = after != NULL ? after->next : s->lease_head;
    if (l->next != NULL)
        l->next->prev = l;
    else
        s->lease_tail = l;
    if (after != NULL)
        after->next = l;
    else
        s->lease_head = l;
    s->stats.leases++;
    vqkvd__store_lease_table_maybe_grow(s);
    *lease_id = l->id;
    return (int)found;
}

int vqkvd_store_release(vqkvd_store_t *s, uint64_t owner, uint64_t lease_id)
{
    vqkvd_lease_t *l = *vqkvd__store_lease_slot(s, lease_id);
    if (lease_id == 0 || l == NULL || l->owner != owner)
        return VQKV_ELEASE;
    vqkvd__store_lease_free(s, l);
    return VQKV_OK;
}

uint64_t vqkvd_store_release_owner(vqkvd_store_t *s, uint64_t owner)
{
    uint64_t n = 0;
    vqkvd_lease_t *l = s->lease_head;
    while (l != NULL) {
        vqkvd_lease_t *next = l->next;
        if (l->owner == owner) {
            vqkvd__store_lease_free(s, l);
            n++;
        }
        l = next;
    }
    return n;
}

uint64_t vqkvd_store_sweep(vqkvd_store_t *s, uint64_t now)
{
    uint64_t n = 0;
    while (s->lease_head != NULL && s->lease_head->expiry <= now) {
        vqkvd__store_lease_free(s, s->lease_head);
        n++;
    }
    return n;
}

/* ---- explicit evict ------------------------------------------------------- */

/* Flags of a block's mark during one vqkvd_store_evict. */
#define VQKVD__MARK_PROTECTED 1u /* named, and its subtree holds a leased or pinned block */
#define VQKVD__MARK_DOOMED 2u    /* goes */

static void vqkvd__store_mark_named(vqkvd_block_t *b, uint64_t gen)
{
    b->mark_gen = gen;
    b->mark = b;
    b->mark_flags = 0;
}

/* The innermost named block at or above b, NULL when none is. Remembered in
 * every block walked, so one pass over all blocks is O(blocks), however
 * long the chains. */
static vqkvd_block_t *vqkvd__store_mark_named_above(vqkvd_block_t *b, uint64_t gen)
{
    vqkvd_block_t *top = b;
    while (top != NULL && top->mark_gen != gen)
        top = top->parent;
    vqkvd_block_t *named = top != NULL ? top->mark : NULL;
    for (; b != top; b = b->parent) {
        b->mark_gen = gen;
        b->mark = named;
        b->mark_flags = 0;
    }
    return named;
}

static int vqkvd__store_mark_doomed(const vqkvd_block_t *b, uint64_t gen)
{
    return b != NULL && b->mark_gen == gen && (b->mark_flags & VQKVD__MARK_DOOMED);
}

/* Four passes over the LRU list, because blocks know their parent but not
 * their children: name, protect (a leased or pinned block protects every
 * named block above it), doom (a block goes when its innermost named block
 * is unprotected; those are whole subtrees), remove (leaves first). */
int64_t vqkvd_store_evict(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                          uint32_t n, int all, uint64_t now)
{
    vqkvd_block_t *b;
    int64_t removed = 0;

    if ((!all && keys == NULL && n > 0) || n > VQKVD_STORE_MAX_CHAIN)
        return VQKV_EINVAL;
    uint64_t gen = ++s->mark_gen;
    if (all) {
        for (b = s->lru_head; b != NULL; b = b->lru_next)
            if (b->tenant == tenant && b->model == model)
                vqkvd__store_mark_named(b, gen);
    } else {
        for (uint32_t i = 0; i < n; i++) {
            b = vqkvd__store_block_present(s, tenant, model, keys + (size_t)i * VQKVD_KEY_BYTES);
            if (b != NULL)
                vqkvd__store_mark_named(b, gen);
        }
    }
    for (b = s->lru_head; b != NULL; b = b->lru_next) {
        if (b->tenant != tenant || b->model != model || (b->refs == 0 && b->pin_until <= now))
            continue;
        vqkvd_block_t *named = vqkvd__store_mark_named_above(b, gen);
        while (named != NULL && !(named->mark_flags & VQKVD__MARK_PROTECTED)) {
            named->mark_flags |= VQKVD__MARK_PROTECTED;
            named =
                named->parent != NULL ? vqkvd__store_mark_named_above(named->parent, gen) : NULL;
        }
    }
    for (b = s->lru_head; b != NULL; b = b->lru_next) {
        if (b->tenant != tenant || b->model != model)
            continue;
        const vqkvd_block_t *named = vqkvd__store_mark_named_above(b, gen);
        if (named != NULL && !(named->mark_flags & VQKVD__MARK_PROTECTED))
            b->mark_flags |= VQKVD__MARK_DOOMED;
    }
    /* A doomed block's children are doomed too, so once they are gone it
     * is a leaf: removing upward from each doomed leaf takes all of them. */
    b = s->lru_head;
    while (b != NULL) {
        vqkvd_block_t *next = b->lru_next;
        for (vqkvd_block_t *p = b; vqkvd__store_mark_doomed(p, gen) && p->children == 0;) {
            vqkvd_block_t *parent = p->parent;
            if (p == next)
                next = p->lru_next;
            if (s->on_forget != NULL)
                s->on_forget(s->hooks_arg, p);
            vqkvd__store_block_remove(s, p);
            removed++;
            p = parent;
        }
        b = next;
    }
    return removed;
}

/* ---- pins, upkeep, queries ------------------------------------------------ */

int vqkvd_store_pin(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key,
                    uint64_t now, uint64_t ttl_ms)
{
    if (key == NULL || ttl_ms == 0 || ttl_ms > UINT64_MAX - now)
        return VQKV_EINVAL;
    vqkvd_block_t *b = vqkvd__store_block_present(s, tenant, model, key);
    if (b == NULL)
        return VQKV_ENOENT;
    b->pin_until = now + ttl_ms;
    return VQKV_OK;
}

int vqkvd_store_unpin(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key)
{
    if (key == NULL)
        return VQKV_EINVAL;
    vqkvd_block_t *b = vqkvd__store_block_present(s, tenant, model, key);
    if (b == NULL)
        return VQKV_ENOENT;
    b->pin_until = 0;
    return VQKV_OK;
}

uint64_t vqkvd_store_tick(vqkvd_store_t *s, uint64_t now)
{
    vqkvd_store_sweep(s, now);
    if (s->pool->bytes_stored <= s->high_bytes)
        return 0;
    return vqkvd__store_evict_lru(s, now, s->low_bytes, -1, NULL);
}

vqkvd_block_t *vqkvd_store_find(const vqkvd_store_t *s, uint32_t tenant, uint32_t model,
                                const uint8_t *key)
{
    if (key == NULL)
        return NULL;
    return vqkvd__store_block_present(s, tenant, model, key);
}

void vqkvd_store_stats(const vqkvd_store_t *s, vqkvd_store_stats_t *st)
{
    *st = s->stats;
}

void vqkvd_store_tenant_stats(const vqkvd_store_t *s, uint32_t tenant, vqkvd_tenant_stats_t *st)
{
    const vqkvd_tenant_stats_t *t = vqkvd__store_tenant_find(s, tenant);
    if (t != NULL) {
        *st = *t;
        return;
    }
    memset(st, 0, sizeof(*st));
    st->tenant = tenant;
    st->quota_bytes = s->default_quota_bytes;
}

int vqkvd_store_set_quota(vqkvd_store_t *s, uint32_t tenant, uint64_t quota_bytes)
{
    vqkvd_tenant_stats_t *t = vqkvd__store_tenant_get(s, tenant);
    if (t == NULL)
        return VQKV_ENOMEM;
    t->quota_bytes = quota_bytes;
    return VQKV_OK;
}

void vqkvd_store_set_default_quota(vqkvd_store_t *s, uint64_t quota_bytes)
{
    s->default_quota_bytes = quota_bytes;
}

const vqkvd_lease_t *vqkvd_store_lease_find(const vqkvd_store_t *s, uint64_t lease_id,
                                            uint64_t owner, uint64_t now)
{
    if (s == NULL || s->lease_buckets == NULL)
        return NULL;
    const vqkvd_lease_t *l = s->lease_buckets[lease_id & s->lease_mask];
    while (l != NULL && l->id != lease_id)
        l = l->hnext;
    if (l == NULL || l->owner != owner || l->expiry <= now)
        return NULL;
    return l;
}
