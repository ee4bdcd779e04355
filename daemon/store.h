/* store.h -- vqkvd's block index: which compressed blocks are present, for
 * whom, in which pool slot, and which may be evicted.
 *
 * A block is named by (tenant, model handle, 32-byte key): two tenants with
 * the same key have two blocks and never see each other's. Blocks form
 * chains through their parent key (all zero for a chain's first block), so
 * a lookup of keys k0..kn-1 answers with the longest present prefix, and
 * eviction takes leaves only: a block that is the parent of a present block
 * stays until its children are gone, so a chain never has a hole.
 *
 * A lookup may take a lease on the blocks it found: until the lease is
 * released or expires, none of them is evicted (the worker is copying them).
 * A pin keeps one block until its TTL runs out. Time is always passed in
 * (monotonic milliseconds), so the store never reads a clock and tests need
 * no sleeps; pins expire lazily, leases when vqkvd_store_sweep runs.
 *
 * Eviction is least-recently-used among evictable leaves (not leased, not
 * pinned, no children). It runs when an insert would take the pool above
 * the high watermark (down to the low one) and when the pool has no slot
 * for the block; when nothing can go, insert says VQKV_ENOMEM: out of
 * capacity, every block is leased, pinned or a parent of one.
 *
 * Tenants may have a byte quota on the compressed bytes they hold. An
 * insert that would take its tenant over evicts that tenant's own least
 * recently used evictable leaves first (never another tenant's), and says
 * VQKV_EQUOTA when they cannot make room. An explicit evict
 * (vqkvd_store_evict) removes named blocks with their descendants.
 *
 * Costs: key lookup is O(1) average (chained hash, SipHash-1-3 with a
 * per-store secret key, so a tenant cannot make another's lookups slow by
 * choosing colliding keys; the table doubles at load 1, O(1) amortized);
 * LRU moves are O(1) (intrusive list); taking a lease on n blocks is O(n);
 * release is O(n) for its blocks; sweep is O(expired leases) (leases are
 * kept sorted by expiry, inserted from the tail, O(1) when TTLs are equal).
 * Eviction is O(blocks examined): protected blocks at the old end of the
 * list are skipped each time, and the scan steps back to a parent that has
 * just become a leaf so the order stays strictly LRU among leaves. A
 * quota eviction walks the same list and skips other tenants' blocks: no
 * per-tenant list to keep up on every touch, at the price of a longer walk
 * when a tenant at its quota owns few of the old blocks. An explicit evict
 * is O(blocks in the store): a few passes over the list, no allocation.
 *
 * Single-threaded like the rest of the daemon: call from the loop's thread.
 */
#ifndef VQKVD_STORE_H
#define VQKVD_STORE_H

#include <stdint.h>

#include "pool.h"

#define VQKVD_KEY_BYTES 32

/* Longest chain one lookup takes (a lease holds one pointer per block). */
#define VQKVD_STORE_MAX_CHAIN 65536

typedef struct vqkvd_block vqkvd_block_t;

struct vqkvd_block {
    uint64_t writer; /* while reserved: the reservation's writer; 0 once committed */
    uint32_t tenant;
    uint32_t model;
    uint8_t key[VQKVD_KEY_BYTES];
    vqkvd_block_t *parent; /* NULL for a root; stays valid: a parent outlives its children */
    uint32_t children;     /* present blocks whose parent this is */
    uint32_t refs;         /* leases and jobs reading it (and a child's reservation under way) */
    uint32_t cls;          /* pool slot class */
    uint32_t logical_bytes;
    uint32_t stored_bytes; /* the slot's size */
    uint64_t slot;         /* pool handle */
    uint64_t pin_until;    /* monotonic ms; pinned while now < pin_until; 0: never pinned */
    /* What encoded it (the session's vqkvd_codec_ident_t); set by the
     * writer after reserving, never read by the store. */
    const struct vqkvd_codec_ident *codec;
    /* While its encode runs after the Put's reply: the stage holding the
     * worker's bytes and the block's slot there (staging.h), its pool slot
     * not yet written. NULL otherwise. Never read by the store. */
    struct vqkvd_stage *stage;
    uint32_t stage_slot;
    uint64_t stamp; /* LRU order: larger is more recent, unique */
    vqkvd_block_t *lru_prev, *lru_next;
    vqkvd_block_t *hnext; /* hash bucket chain */
    /* Scratch of vqkvd_store_evict, valid while mark_gen equals the store's:
     * the innermost named block at or above this one, and flags. Kept in
     * the block so an evict needs no allocation. */
    uint64_t mark_gen;
    vqkvd_block_t *mark;
    uint32_t mark_flags;
};

typedef struct vqkvd_lease vqkvd_lease_t;

struct vqkvd_lease {
    uint64_t id; /* never 0 */
    uint64_t owner;
    uint64_t expiry;            /* monotonic ms */
    vqkvd_lease_t *prev, *next; /* sorted by expiry, oldest first */
    vqkvd_lease_t *hnext;
    uint32_t n;
    vqkvd_block_t *blocks[];
};

/* One tenant's counters; also the store's entry for it. */
typedef struct {
    uint32_t tenant;
    uint64_t blocks;
    uint64_t bytes_stored; /* what the quota limits */
    uint64_t bytes_logical;
    uint64_t hits;        /* blocks its lookups found */
    uint64_t misses;      /* blocks its lookups asked for past the present prefix */
    uint64_t evictions;   /* its blocks evicted, for room or by vqkvd_store_evict */
    uint64_t quota_bytes; /* 0: unlimited */
} vqkvd_tenant_stats_t;

typedef struct {
    uint64_t blocks;
    uint64_t bytes_stored;
    uint64_t bytes_logical;
    uint64_t hits;      /* blocks a lookup found */
    uint64_t misses;    /* blocks a lookup asked for past the present prefix */
    uint64_t evictions; /* blocks evicted (the tenants' evictions summed) */
    uint64_t inserts;   /* blocks inserted (not counting "already present") */
    uint64_t leases;    /* leases held now */
} vqkvd_store_stats_t;

typedef struct {
    vqkvd_pool_t *pool; /* borrowed; outlives the store */
    uint64_t high_bytes, low_bytes;
    uint64_t sip_k0, sip_k1;

    vqkvd_block_t **buckets;
    uint64_t bucket_mask;               /* buckets - 1; a power of two */
    vqkvd_block_t *lru_head, *lru_tail; /* least recently used first */
    uint64_t next_stamp;

    vqkvd_lease_t **lease_buckets; /* by id & lease_mask: ids are sequential */
    uint64_t lease_mask;
    vqkvd_lease_t *lease_head, *lease_tail; /* earliest expiry first */
    uint64_t next_lease_id;

    /* Linear search: tenants are few (uids). Read-only outside store.c
     * (the daemon lists them in Stats). */
    vqkvd_tenant_stats_t *tenants;
    uint32_t n_tenants, cap_tenants;
    uint64_t default_quota_bytes; /* given to tenants as they are first seen */
    uint64_t mark_gen;            /* vqkvd_store_evict's pass number */

    vqkvd_store_stats_t stats;
    /* Called with each block that eviction takes for room or a quota,
     * before its slot goes, so that a lower tier can keep it (disk.h).
     * NULL: none. */
    void (*on_evict)(void *arg, const vqkvd_block_t *b);
    /* Called with each block vqkvd_store_evict removes, so that a lower
     * tier forgets it too (its copy must go everywhere). NULL: none. */
    void (*on_forget)(void *arg, const vqkvd_block_t *b);
    void *hooks_arg; /* both hooks' arg */
} vqkvd_store_t;

/* Starts an empty store over pool. high and low are fractions of the
 * pool's usable bytes (0 < low <= high <= 1). seed: 16 bytes keying the
 * hash, or NULL for fresh random bytes (tests pass one to be repeatable).
 * VQKV_EINVAL, VQKV_ENOMEM, or VQKV_OK. */
int vqkvd_store_init(vqkvd_store_t *s, vqkvd_pool_t *pool, double high, double low,
                     const uint8_t *seed);

/* Frees every block (its slot goes back to the pool) and lease. Safe on a
 * zeroed store and twice. */
void vqkvd_store_destroy(vqkvd_store_t *s);

/* Inserting a block is two steps, so that its bytes can be written straight
 * into its slot wherever the slot lives (host or device memory) and on
 * another thread:
 *
 *   vqkvd_store_reserve  takes the slot (evicting as the header describes)
 *                        and enters the block, reserved: lookups, finds,
 *                        pins and evicts do not see it, nor does eviction;
 *   vqkvd_store_commit   makes it present (the payload is in its slot);
 *   vqkvd_store_abort    drops it and gives the slot back.
 *
 * The slot and the block's bytes count against the pool and the tenant's
 * quota from the reservation on. writer names who reserved (any non-zero
 * value, unique among the writers with reservations outstanding): a block
 * may have a reserved parent of its own writer (a put of a whole chain),
 * never another writer's, which may yet abort. A writer aborts children
 * before their parents. A reservation always ends in a commit or an abort.
 *
 * Returns VQKV_OK with *b reserved; VQKV_EEXIST (the block is
 * there already, committed or reserved: *b is it, and a committed one
 * becomes most recently used; a put is idempotent); VQKV_ENOPARENT;
 * VQKV_EQUOTA (the tenant's quota cannot take the block even after
 * evicting the tenant's evictable blocks); VQKV_ENOMEM (out of capacity,
 * or no memory); VQKV_EINVAL. O(1) average plus eviction. */
int vqkvd_store_reserve(vqkvd_store_t *s, uint64_t writer, uint32_t tenant, uint32_t model,
                        const uint8_t *key, const uint8_t *parent_key, uint32_t cls,
                        uint32_t logical_bytes, uint64_t now, vqkvd_block_t **b);
void vqkvd_store_commit(vqkvd_store_t *s, vqkvd_block_t *b);
void vqkvd_store_abort(vqkvd_store_t *s, vqkvd_block_t *b);

/* The writer vqkvd_store_insert reserves as; callers of reserve use others. */
#define VQKVD_STORE_WRITER_INSERT UINT64_MAX

/* Reserve and commit in one step, for a payload written afterwards on the
 * loop (tests, tools): the outcomes of vqkvd_store_reserve, with *slot the
 * block's slot on VQKV_OK and VQKV_EEXIST. */
int vqkvd_store_insert(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key,
                       const uint8_t *parent_key, uint32_t cls, uint32_t logical_bytes,
                       uint64_t now, uint64_t *slot);

/* A job reading b's slot holds it, so that neither a release, an expiring
 * lease nor eviction frees the slot under the job. O(1). */
void vqkvd_store_hold(vqkvd_block_t *b);
void vqkvd_store_unhold(vqkvd_block_t *b);
/* Whether anything holds b (a lease, a job) or a pin keeps it at now. */
int vqkvd_store_held(const vqkvd_block_t *b);
int vqkvd_store_pinned(const vqkvd_block_t *b, uint64_t now);

/* The committed blocks from least to most recently used: the first with
 * b NULL, then the one after b; NULL at the end. For walks that change
 * nothing but the blocks' payload (transcode.c). O(1) a step. */
vqkvd_block_t *vqkvd_store_next(const vqkvd_store_t *s, const vqkvd_block_t *b);

/* The tenants the store knows, in the order first seen: count, then each
 * entry (i < count). The pointer is valid until the next insert or quota
 * change. O(1). */
uint32_t vqkvd_store_tenant_count(const vqkvd_store_t *s);
const vqkvd_tenant_stats_t *vqkvd_store_tenant_at(const vqkvd_store_t *s, uint32_t i);

/* Moves block b, which nothing but the caller holds, to slot of class cls
 * (already taken from the pool, its payload written) and gives its old slot
 * back; the stored-bytes counters follow. O(tenants). */
void vqkvd_store_rehome(vqkvd_store_t *s, vqkvd_block_t *b, uint32_t cls, uint64_t slot);

/* Looks up the chain keys[0..n-1] (n * 32 bytes) and returns the length of
 * the longest present prefix (0..n), or VQKV_EINVAL / VQKV_ENOMEM. The
 * prefix becomes most recently used, hits and misses are counted. With
 * lease_id non-NULL and a non-empty prefix, a lease owned by owner and
 * expiring at now + ttl_ms is taken on exactly those blocks (*lease_id; 0
 * when the prefix is empty). slots, when non-NULL, gets the prefix's slot
 * handles. O(n). */
int vqkvd_store_lookup(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                       uint32_t n, uint64_t now, uint64_t owner, uint64_t ttl_ms,
                       uint64_t *lease_id, uint64_t *slots);

/* Releases a lease: VQKV_OK, or VQKV_ELEASE when no lease of that id is held
 * by owner (released, expired, or another client's). O(blocks in it). */
int vqkvd_store_release(vqkvd_store_t *s, uint64_t owner, uint64_t lease_id);

/* The lease lease_id if owner holds it and it has not expired by now (the
 * sweep may not have run yet), else NULL. O(1) expected. */
const vqkvd_lease_t *vqkvd_store_lease_find(const vqkvd_store_t *s, uint64_t lease_id,
                                            uint64_t owner, uint64_t now);

/* Releases every lease of owner (a client that went away); returns how many.
 * O(leases held). */
uint64_t vqkvd_store_release_owner(vqkvd_store_t *s, uint64_t owner);

/* Releases the leases whose expiry is <= now; returns how many. */
uint64_t vqkvd_store_sweep(vqkvd_store_t *s, uint64_t now);

/* Pins a block until now + ttl_ms (ttl_ms > 0; a later pin replaces the
 * TTL), or unpins it. VQKV_OK, VQKV_ENOENT or VQKV_EINVAL. */
int vqkvd_store_pin(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key,
                    uint64_t now, uint64_t ttl_ms);
int vqkvd_store_unpin(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *key);

/* Removes the blocks keys[0..n) (n * 32 bytes) of (tenant, model) together
 * with their descendants, since a child whose parent is gone could never be
 * looked up again. A named block whose subtree holds a leased or pinned
 * block is skipped, whole, except for named blocks inside it whose own
 * subtree holds none; keys not held are skipped. all (keys then unused)
 * names every block of (tenant, model): every block without a leased or
 * pinned block at or below it goes. Returns the number of blocks removed
 * (counted as evictions), or VQKV_EINVAL. O(blocks in the store + n). */
int64_t vqkvd_store_evict(vqkvd_store_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                          uint32_t n, int all, uint64_t now);

/* Sets a tenant's quota on compressed bytes held (0: unlimited), making
 * its entry if it has none. A tenant already over a lowered quota keeps its
 * blocks until its next insert, which evicts down first. VQKV_ENOMEM or
 * VQKV_OK. O(tenants). */
int vqkvd_store_set_quota(vqkvd_store_t *s, uint32_t tenant, uint64_t quota_bytes);

/* The quota of tenants first seen from now on (0: unlimited, the default);
 * set it before serving. */
void vqkvd_store_set_default_quota(vqkvd_store_t *s, uint64_t quota_bytes);

/* Sweeps leases, then evicts down to the low watermark if the pool is
 * above the high one. Returns the blocks evicted. For a periodic timer. */
uint64_t vqkvd_store_tick(vqkvd_store_t *s, uint64_t now);

/* The hash of a block's name under the store's secret key (SipHash-1-3),
 * for another index of the same names (disk.h). O(1). */
uint64_t vqkvd_store_hash(const vqkvd_store_t *s, uint32_t tenant, uint32_t model,
                          const uint8_t *key);

/* The block, without touching its LRU place or the counters; NULL when absent. */
vqkvd_block_t *vqkvd_store_find(const vqkvd_store_t *s, uint32_t tenant, uint32_t model,
                                const uint8_t *key);

void vqkvd_store_stats(const vqkvd_store_t *s, vqkvd_store_stats_t *st);

/* A tenant's counters (zeros and the default quota for a tenant never
 * seen). O(tenants). */
void vqkvd_store_tenant_stats(const vqkvd_store_t *s, uint32_t tenant, vqkvd_tenant_stats_t *st);

#endif
