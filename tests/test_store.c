/* test_store.c -- vqkvd's block index (daemon/store.h) over a small CPU
 * pool: chains found up to their longest present prefix, tenants and
 * models that never see each other's blocks, idempotent inserts, leases and
 * pins that keep blocks and then expire (time is passed in, never slept),
 * eviction that is LRU among leaves and never leaves a child without its
 * parent, the watermarks, "out of capacity" when nothing may go, exact
 * counters, per-tenant counters and byte quotas, two-step inserts
 * (reserve, then commit or abort), explicit evicts of
 * subtrees, and a seeded run of thousands of random operations checked
 * against a reference model after every step.
 *
 * Slots are one page and so are chunks, so the pool holds exactly as many
 * blocks as it has pages.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store.h"
#include "vqkv_codec.h"
#include "vqkv_proto.h"

#define K VQKVD_KEY_BYTES

static uint64_t page(void)
{
    return (uint64_t)sysconf(_SC_PAGESIZE);
}

/* Key number id (never all zero). */
static void key_of(uint8_t *k, uint32_t id)
{
    for (int i = 0; i < K; i++)
        k[i] = (uint8_t)(id * 131u + (uint32_t)i * 7u + 1u);
    memcpy(k, &id, sizeof(id));
    k[K - 1] = 0x5a;
}

static const uint8_t seed[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

/* A pool of n one-page slots and a store on it. */
static void setup(vqkvd_pool_t *p, vqkvd_store_t *s, uint32_t n, double high, double low)
{
    assert_int_equal(vqkvd_pool_init_cpu(p, n * page(), page()), VQKV_OK);
    assert_int_equal(vqkvd_pool_add_class(p, (uint32_t)page()), 0);
    assert_int_equal(vqkvd_store_init(s, p, high, low, seed), VQKV_OK);
}

static void teardown(vqkvd_pool_t *p, vqkvd_store_t *s)
{
    vqkvd_store_destroy(s);
    vqkvd_pool_stats_t st;
    vqkvd_pool_stats(p, &st);
    assert_int_equal(st.slots_used, 0); /* every slot went back */
    vqkvd_pool_destroy(p);
}

/* Inserts key ids[i] under ids[i-1] (ids[0] a root) for tenant 1, model 0. */
static void put_chain(vqkvd_store_t *s, const uint32_t *ids, int n, uint64_t now)
{
    uint8_t k[K], par[K];
    uint64_t slot;
    for (int i = 0; i < n; i++) {
        key_of(k, ids[i]);
        if (i > 0)
            key_of(par, ids[i - 1]);
        assert_int_equal(vqkvd_store_insert(s, 1, 0, k, i > 0 ? par : NULL, 0, 100, now, &slot),
                         VQKV_OK);
    }
}

static int present(const vqkvd_store_t *s, uint32_t id)
{
    uint8_t k[K];
    key_of(k, id);
    return vqkvd_store_find(s, 1, 0, k) != NULL;
}

static void keys_of(uint8_t *keys, const uint32_t *ids, int n)
{
    for (int i = 0; i < n; i++)
        key_of(keys + (size_t)i * K, ids[i]);
}

static void test_init_refuses(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    assert_int_equal(vqkvd_pool_init_cpu(&p, 4 * page(), page()), VQKV_OK);
    assert_int_equal(vqkvd_store_init(&s, NULL, 1.0, 0.5, seed), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_init(&s, &p, 0.5, 0.6, seed), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_init(&s, &p, 1.5, 0.6, seed), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_init(&s, &p, 0.9, 0.0, seed), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_init(&s, &p, 0.9, 0.5, NULL), VQKV_OK); /* random seed */
    uint8_t k[K];
    uint64_t slot;
    key_of(k, 1);
    /* No class registered yet. */
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 0, &slot), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, NULL, NULL, 0, 1, 0, &slot), VQKV_EINVAL);
    vqkvd_store_destroy(&s);
    vqkvd_store_destroy(&s);
    vqkvd_pool_destroy(&p);
}

static void test_chain_lookup(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;
    uint32_t ids[5] = {10, 11, 12, 13, 14};
    uint8_t keys[6 * K];
    uint64_t slots[6], lease;

    setup(&p, &s, 16, 1.0, 1.0);
    put_chain(&s, ids, 5, 0);
    keys_of(keys, ids, 5);
    for (int i = 0; i < 5; i++) {
        const vqkvd_block_t *b = vqkvd_store_find(&s, 1, 0, keys + i * K);
        assert_non_null(b);
        assert_int_equal(b->children, i < 4 ? 1 : 0);
        assert_true(i == 0 ? b->parent == NULL : b->parent != NULL);
    }

    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 5, 0, 7, 0, NULL, slots), 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(slots[i], vqkvd_store_find(&s, 1, 0, keys + i * K)->slot);

    /* A hole at 2: the prefix is 2, and the blocks after it are not looked at. */
    uint32_t holey[4] = {10, 11, 99, 13};
    keys_of(keys, holey, 4);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 4, 0, 7, 50, &lease, NULL), 2);
    assert_int_not_equal(lease, 0);
    assert_int_equal(vqkvd_store_find(&s, 1, 0, keys)->refs, 1);
    assert_int_equal(vqkvd_store_find(&s, 1, 0, keys + 3 * K)->refs, 0);

    /* A miss from the start takes no lease. */
    uint32_t miss[2] = {98, 10};
    keys_of(keys, miss, 2);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 2, 0, 7, 50, &lease, NULL), 0);
    assert_int_equal(lease, 0);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 0, 0, 7, 0, NULL, NULL), 0);

    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.hits, 5 + 2);
    assert_int_equal(st.misses, 2 + 2);
    assert_int_equal(st.blocks, 5);
    assert_int_equal(st.inserts, 5);
    assert_int_equal(st.bytes_stored, 5 * page());
    assert_int_equal(st.bytes_logical, 500);
    assert_int_equal(st.leases, 1);

    /* Bad arguments change nothing. */
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, NULL, 2, 0, 7, 0, NULL, NULL), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 1, 0, 7, 0, &lease, NULL), VQKV_EINVAL);
    assert_int_equal(
        vqkvd_store_lookup(&s, 1, 0, keys, VQKVD_STORE_MAX_CHAIN + 1, 0, 7, 0, NULL, NULL),
        VQKV_EINVAL);
    vqkvd_store_stats_t st2;
    vqkvd_store_stats(&s, &st2);
    assert_memory_equal(&st, &st2, sizeof(st));
    teardown(&p, &s); /* with a lease still held: destroy frees it */
}

static void test_tenants_models_isolated(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_tenant_stats_t ts;
    uint8_t k[K];
    uint64_t s1, s2, s3;

    setup(&p, &s, 8, 1.0, 1.0);
    key_of(k, 5);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 10, 0, &s1), VQKV_OK);
    assert_int_equal(vqkvd_store_lookup(&s, 2, 0, k, 1, 0, 9, 0, NULL, NULL), 0);
    assert_null(vqkvd_store_find(&s, 2, 0, k));
    assert_int_equal(vqkvd_store_lookup(&s, 1, 3, k, 1, 0, 9, 0, NULL, NULL), 0);
    assert_int_equal(vqkvd_store_pin(&s, 2, 0, k, 0, 100), VQKV_ENOENT);
    /* A child under another tenant's block has no parent. */
    uint8_t c[K];
    key_of(c, 6);
    assert_int_equal(vqkvd_store_insert(&s, 2, 0, c, k, 0, 10, 0, &s2), VQKV_ENOPARENT);
    /* The same key under tenant 2 is a block of its own. */
    assert_int_equal(vqkvd_store_insert(&s, 2, 0, k, NULL, 0, 20, 0, &s2), VQKV_OK);
    assert_int_equal(vqkvd_store_insert(&s, 1, 3, k, NULL, 0, 30, 0, &s3), VQKV_OK);
    assert_true(s1 != s2 && s2 != s3 && s1 != s3);
    vqkvd_store_tenant_stats(&s, 1, &ts);
    assert_int_equal(ts.blocks, 2);
    assert_int_equal(ts.bytes_stored, 2 * page());
    assert_int_equal(ts.bytes_logical, 40);
    vqkvd_store_tenant_stats(&s, 2, &ts);
    assert_int_equal(ts.blocks, 1);
    assert_int_equal(ts.bytes_logical, 20);
    vqkvd_store_tenant_stats(&s, 77, &ts);
    assert_int_equal(ts.tenant, 77);
    assert_int_equal(ts.blocks, 0);
    /* Leases are per owner. */
    uint64_t lease;
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, k, 1, 0, 9, 10, &lease, NULL), 1);
    assert_int_equal(vqkvd_store_release(&s, 8, lease), VQKV_ELEASE);
    assert_int_equal(vqkvd_store_release(&s, 9, lease), VQKV_OK);
    assert_int_equal(vqkvd_store_release(&s, 9, lease), VQKV_ELEASE);
    assert_int_equal(vqkvd_store_release(&s, 9, 0), VQKV_ELEASE);
    teardown(&p, &s);
}

static void test_duplicate_insert(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;
    uint8_t k[K], other[K];
    uint64_t a, b;

    setup(&p, &s, 4, 1.0, 1.0);
    key_of(k, 1);
    key_of(other, 2);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 10, 0, &a), VQKV_OK);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, other, NULL, 0, 10, 1, &b), VQKV_OK);
    /* Again, even naming another parent: present, same slot, nothing new,
     * and it becomes the most recent. */
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, other, 0, 99, 2, &b), VQKV_EEXIST);
    assert_int_equal(a, b);
    assert_ptr_equal(s.lru_tail, vqkvd_store_find(&s, 1, 0, k));
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.blocks, 2);
    assert_int_equal(st.inserts, 2);
    assert_int_equal(st.bytes_logical, 20);
    assert_int_equal(p.slots_used, 2);
    teardown(&p, &s);
}

/* Two-step inserts: a reserved block holds its slot and its bytes but is
 * no one's to see until it is committed; an abort leaves nothing behind;
 * a chain may be reserved whole by one writer, never under another
 * writer's reservation; eviction never takes a reserved block. */
static void test_reserve_commit_abort(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;
    uint8_t a[K], b[K], c[K];
    vqkvd_block_t *ra, *rb, *got;
    uint64_t lease;

    setup(&p, &s, 4, 1.0, 1.0);
    key_of(a, 1);
    key_of(b, 2);
    key_of(c, 3);
    assert_int_equal(vqkvd_store_reserve(&s, 0, 1, 0, a, NULL, 0, 10, 0, &ra), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_reserve(&s, 7, 1, 0, a, NULL, 0, 10, 0, &ra), VQKV_OK);
    assert_int_equal(vqkvd_store_reserve(&s, 7, 1, 0, b, a, 0, 10, 0, &rb), VQKV_OK);
    assert_non_null(vqkvd_pool_slot_ptr(&p, ra->slot));
    /* Counted, not visible. */
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.blocks, 2);
    assert_int_equal(st.inserts, 0);
    assert_int_equal(st.bytes_stored, 2 * page());
    assert_null(vqkvd_store_find(&s, 1, 0, a));
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, a, 1, 0, 1, 100, &lease, NULL), 0);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, a, 0, 100), VQKV_ENOENT);
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, NULL, 0, 1, 0), 0);
    /* Another writer: the key is taken, the reserved parent is not its. */
    assert_int_equal(vqkvd_store_reserve(&s, 8, 1, 0, a, NULL, 0, 10, 0, &got), VQKV_EEXIST);
    assert_ptr_equal(got, ra);
    assert_int_equal(vqkvd_store_reserve(&s, 8, 1, 0, c, b, 0, 10, 0, &got), VQKV_ENOPARENT);
    /* A full pool evicts nothing reserved: out of capacity. */
    assert_int_equal(vqkvd_store_reserve(&s, 8, 1, 0, c, NULL, 0, 10, 0, &got), VQKV_OK);
    vqkvd_store_commit(&s, got);
    key_of(c, 4);
    assert_int_equal(vqkvd_store_reserve(&s, 8, 1, 0, c, NULL, 0, 10, 1, &got), VQKV_OK);
    vqkvd_store_commit(&s, got);
    key_of(c, 5);
    assert_int_equal(vqkvd_store_reserve(&s, 8, 1, 0, c, NULL, 0, 10, 2, &got), VQKV_OK);
    vqkvd_store_commit(&s, got); /* evicted key 3, the only committed leaf that was older */
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(st.blocks, 4);
    /* Aborted children first: nothing is left, nothing counts as evicted. */
    vqkvd_store_abort(&s, rb);
    vqkvd_store_abort(&s, ra);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.blocks, 2);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(st.bytes_stored, 2 * page());
    assert_int_equal(p.slots_used, 2);
    /* Committed, the chain is found whole. */
    assert_int_equal(vqkvd_store_reserve(&s, 9, 1, 0, a, NULL, 0, 10, 3, &ra), VQKV_OK);
    assert_int_equal(vqkvd_store_reserve(&s, 9, 1, 0, b, a, 0, 10, 3, &rb), VQKV_OK);
    vqkvd_store_commit(&s, ra);
    vqkvd_store_commit(&s, rb);
    uint8_t chain[2 * K];
    memcpy(chain, a, K);
    memcpy(chain + K, b, K);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, chain, 2, 4, 1, 100, NULL, NULL), 2);
    /* A reservation still open when the store goes is freed with it. */
    key_of(c, 6);
    vqkvd_store_evict(&s, 1, 0, NULL, 0, 1, 5);
    assert_int_equal(vqkvd_store_reserve(&s, 10, 1, 0, c, NULL, 0, 10, 6, &got), VQKV_OK);
    teardown(&p, &s);
}

static void test_lru_leaves_first(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;
    uint8_t k[K];
    uint64_t slot;

    /* 8 slots, evict down to 2 once full. The chain a0 <- a1 <- a2 is the
     * oldest; strict LRU among leaves takes a2, then a1 and a0 (now leaves,
     * and older than any root), then r0, r1, r2. */
    setup(&p, &s, 8, 1.0, 0.25);
    uint32_t a[3] = {1, 2, 3};
    put_chain(&s, a, 3, 0);
    for (uint32_t r = 10; r < 15; r++)
        put_chain(&s, &r, 1, 0);
    assert_int_equal(p.slots_used, 8);
    key_of(k, 20);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 100, 0, &slot), VQKV_OK);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.evictions, 6);
    assert_int_equal(st.blocks, 3);
    assert_true(present(&s, 13) && present(&s, 14) && present(&s, 20));
    teardown(&p, &s);

    /* One at a time (no low watermark below full): a touched chain is kept,
     * and its leaf goes before its parent even though the parent is older. */
    setup(&p, &s, 4, 1.0, 1.0);
    put_chain(&s, a, 3, 0);
    uint32_t r = 10;
    put_chain(&s, &r, 1, 0);
    uint8_t keys[3 * K];
    keys_of(keys, a, 3);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 3, 0, 1, 0, NULL, NULL), 3);
    r = 11;
    put_chain(&s, &r, 1, 0); /* evicts 10, the least recent leaf */
    assert_false(present(&s, 10));
    r = 12;
    put_chain(&s, &r, 1, 0); /* evicts 3: 1 and 2 are older but parents */
    assert_false(present(&s, 3));
    assert_true(present(&s, 1) && present(&s, 2) && present(&s, 11));
    r = 13;
    put_chain(&s, &r, 1, 0); /* now 2 is the oldest leaf */
    assert_false(present(&s, 2));
    assert_true(present(&s, 1));
    teardown(&p, &s);
}

static void test_watermarks(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;

    /* 16 slots: high 12, low 8. */
    setup(&p, &s, 16, 0.75, 0.5);
    for (uint32_t i = 0; i < 12; i++)
        put_chain(&s, &i, 1, 0);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.evictions, 0);
    assert_int_equal(vqkvd_store_tick(&s, 0), 0); /* at high, not above */
    uint32_t next = 12;
    put_chain(&s, &next, 1, 0); /* would pass high: down to 8, then in */
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.evictions, 4);
    assert_int_equal(st.blocks, 9);
    for (uint32_t i = 0; i < 4; i++)
        assert_false(present(&s, i));
    for (uint32_t i = 4; i < 13; i++)
        assert_true(present(&s, i));
    assert_int_equal(st.bytes_stored, 9 * page());
    teardown(&p, &s);
}

static void test_leases_protect_and_expire(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_store_stats_t st;
    uint8_t keys[4 * K], k[K];
    uint64_t l1, l2, slot;

    setup(&p, &s, 4, 1.0, 1.0);
    uint32_t ids[4] = {0, 1, 2, 3};
    for (int i = 0; i < 4; i++)
        put_chain(&s, &ids[i], 1, 0);
    keys_of(keys, ids, 4);
    /* Two leases: 0 and 1 until 100 (owner 5); 2 and 3 until 50 (owner 6). */
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 2, 0, 5, 100, &l1, NULL), 2);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys + 2 * K, 2, 0, 6, 50, &l2, NULL), 2);
    assert_true(l1 != l2);
    key_of(k, 50);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 10, &slot), VQKV_ENOMEM);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.blocks, 4);
    assert_int_equal(st.evictions, 0);
    assert_int_equal(st.leases, 2);
    assert_int_equal(vqkvd_store_sweep(&s, 49), 0);
    assert_int_equal(vqkvd_store_sweep(&s, 50), 1); /* l2, the sooner one */
    assert_int_equal(vqkvd_store_release(&s, 6, l2), VQKV_ELEASE);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 51, &slot), VQKV_OK);
    assert_false(present(&s, 2)); /* the least recent unleased leaf */
    assert_true(present(&s, 0) && present(&s, 1) && present(&s, 3));
    /* The client of l1 goes away. */
    assert_int_equal(vqkvd_store_release_owner(&s, 5), 1);
    assert_int_equal(vqkvd_store_release_owner(&s, 5), 0);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.leases, 0);
    assert_int_equal(vqkvd_store_find(&s, 1, 0, keys)->refs, 0);
    key_of(k, 51);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 52, &slot), VQKV_OK);
    assert_false(present(&s, 0));
    teardown(&p, &s);
}

static void test_pins_protect_and_expire(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    uint8_t k[K];
    uint64_t slot;

    setup(&p, &s, 2, 1.0, 1.0);
    uint32_t a = 1, b = 2, c = 3, d = 4;
    put_chain(&s, &a, 1, 0);
    put_chain(&s, &b, 1, 0);
    key_of(k, a);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, k, 0, 0), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, k, 0, 100), VQKV_OK);
    put_chain(&s, &c, 1, 10); /* 1 is older but pinned: 2 goes */
    assert_true(present(&s, 1) && !present(&s, 2) && present(&s, 3));
    key_of(k, c);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, k, 10, 1000), VQKV_OK);
    key_of(k, d);
    /* Both pinned: out of capacity, nothing touched. */
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 99, &slot), VQKV_ENOMEM);
    assert_true(present(&s, 1) && present(&s, 3));
    /* At 100 the first pin has run out. */
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 100, &slot), VQKV_OK);
    assert_false(present(&s, 1));
    /* Unpinned, 3 is the least recent leaf again. */
    key_of(k, c);
    assert_int_equal(vqkvd_store_unpin(&s, 1, 0, k), VQKV_OK);
    key_of(k, a);
    assert_int_equal(vqkvd_store_unpin(&s, 1, 0, k), VQKV_ENOENT);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 101, &slot), VQKV_OK);
    assert_false(present(&s, 3));
    teardown(&p, &s);
}

static void test_parents_hold_for_children(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    uint8_t k[K], par[K];
    uint64_t slot;

    /* Full with a chain whose leaf is leased: the parents cannot go either,
     * so a new root is out of capacity. */
    setup(&p, &s, 3, 1.0, 1.0);
    uint32_t a[3] = {1, 2, 3};
    put_chain(&s, a, 3, 0);
    uint64_t lease;
    uint8_t keys[3 * K];
    keys_of(keys, a, 3);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys + 0, 3, 0, 1, 10, &lease, NULL), 3);
    key_of(k, 9);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 0, &slot), VQKV_ENOMEM);
    assert_int_equal(vqkvd_store_release(&s, 1, lease), VQKV_OK);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, keys + 2 * K, 0, 10), VQKV_OK);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, NULL, 0, 1, 0, &slot), VQKV_ENOMEM);
    /* Extending the chain: the full pool may not take the parent to make
     * room for its own child, even when it is the only leaf that could go. */
    assert_int_equal(vqkvd_store_unpin(&s, 1, 0, keys + 2 * K), VQKV_OK);
    key_of(par, 3);
    key_of(k, 4);
    assert_int_equal(vqkvd_store_insert(&s, 1, 0, k, par, 0, 1, 0, &slot), VQKV_ENOMEM);
    assert_true(present(&s, 1) && present(&s, 2) && present(&s, 3));
    teardown(&p, &s);
}

/* ---- tenants: counters, quotas, explicit evict ------------------------------ */

/* Inserts key id for tenant t, model 0, under parent id par (0: a root). */
static int put_t(vqkvd_store_t *s, uint32_t t, uint32_t id, uint32_t par, uint64_t now)
{
    uint8_t k[K], pk[K];
    uint64_t slot;
    key_of(k, id);
    key_of(pk, par);
    return vqkvd_store_insert(s, t, 0, k, par != 0 ? pk : NULL, 0, 10, now, &slot);
}

static int present_t(const vqkvd_store_t *s, uint32_t t, uint32_t id)
{
    uint8_t k[K];
    key_of(k, id);
    return vqkvd_store_find(s, t, 0, k) != NULL;
}

/* Every tenant's bytes and blocks are exactly those of its present blocks,
 * the entries sum to the totals, and none is over its quota. */
static void check_tenants(const vqkvd_store_t *s)
{
    vqkvd_store_stats_t st;
    vqkvd_store_stats(s, &st);
    uint64_t blocks = 0, bytes = 0, logical = 0, hits = 0, misses = 0, evictions = 0;
    for (uint32_t i = 0; i < s->n_tenants; i++) {
        const vqkvd_tenant_stats_t *t = &s->tenants[i];
        uint64_t tb = 0, ts = 0, tl = 0;
        for (const vqkvd_block_t *b = s->lru_head; b != NULL; b = b->lru_next) {
            if (b->tenant == t->tenant) {
                tb++;
                ts += b->stored_bytes;
                tl += b->logical_bytes;
            }
        }
        assert_int_equal(t->blocks, tb);
        assert_int_equal(t->bytes_stored, ts);
        assert_int_equal(t->bytes_logical, tl);
        assert_true(t->quota_bytes == 0 || t->bytes_stored <= t->quota_bytes);
        blocks += t->blocks;
        bytes += t->bytes_stored;
        logical += t->bytes_logical;
        hits += t->hits;
        misses += t->misses;
        evictions += t->evictions;
    }
    assert_int_equal(st.blocks, blocks);
    assert_int_equal(st.bytes_stored, bytes);
    assert_int_equal(st.bytes_logical, logical);
    assert_int_equal(st.hits, hits);
    assert_int_equal(st.misses, misses);
    assert_int_equal(st.evictions, evictions);
    assert_int_equal(s->pool->bytes_stored, bytes);
}

static void test_tenant_counters(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_tenant_stats_t t1, t2;
    uint8_t keys[3 * K];

    setup(&p, &s, 4, 1.0, 1.0);
    assert_int_equal(put_t(&s, 1, 1, 0, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 2, 1, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 2, 1, 0, 0), VQKV_OK);
    uint32_t ids[3] = {1, 2, 3};
    keys_of(keys, ids, 3);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 3, 0, 1, 0, NULL, NULL), 2);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys + 2 * K, 1, 0, 1, 0, NULL, NULL), 0);
    assert_int_equal(vqkvd_store_lookup(&s, 2, 0, keys, 3, 0, 1, 0, NULL, NULL), 1);
    /* Full: tenant 2's next block evicts the least recent leaf, tenant 1's
     * block 2 (no quota: the pool is shared). */
    assert_int_equal(put_t(&s, 2, 7, 0, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 2, 8, 0, 0), VQKV_OK);
    vqkvd_store_tenant_stats(&s, 1, &t1);
    vqkvd_store_tenant_stats(&s, 2, &t2);
    assert_int_equal(t1.hits, 2);
    assert_int_equal(t1.misses, 2);
    assert_int_equal(t2.hits, 1);
    assert_int_equal(t2.misses, 2);
    assert_int_equal(t1.evictions, 1);
    assert_int_equal(t2.evictions, 0);
    assert_int_equal(t1.blocks, 1);
    assert_int_equal(t2.blocks, 3);
    assert_int_equal(t1.quota_bytes, 0);
    assert_false(present_t(&s, 1, 2));
    check_tenants(&s);
    teardown(&p, &s);
}

static void test_quota_evicts_own_lru(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_tenant_stats_t ts;
    vqkvd_store_stats_t st;
    uint8_t keys[2 * K];
    uint64_t lease;

    setup(&p, &s, 16, 1.0, 1.0);
    assert_int_equal(vqkvd_store_set_quota(&s, 1, 3 * page()), VQKV_OK);
    vqkvd_store_set_default_quota(&s, 2 * page() + 1); /* room for 2 slots */
    /* Tenant 2, at the default quota, makes room from its own blocks. Its
     * blocks stay the oldest, unprotected: tenant 1's quota never takes them. */
    assert_int_equal(put_t(&s, 2, 50, 0, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 2, 51, 0, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 2, 52, 0, 0), VQKV_OK);
    assert_false(present_t(&s, 2, 50));
    /* Tenant 1: a chain 1 <- 2 and a root 3, at its quota of 3 slots. */
    assert_int_equal(put_t(&s, 1, 1, 0, 1), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 2, 1, 2), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 3, 0, 3), VQKV_OK);
    /* A fourth: leaves before parents, so 2 goes (1 is older but a parent). */
    assert_int_equal(put_t(&s, 1, 4, 0, 4), VQKV_OK);
    assert_false(present_t(&s, 1, 2));
    assert_true(present_t(&s, 1, 1) && present_t(&s, 1, 3) && present_t(&s, 1, 4));
    assert_true(present_t(&s, 2, 51) && present_t(&s, 2, 52));
    /* Again: now 1 is the least recent leaf. */
    assert_int_equal(put_t(&s, 1, 5, 0, 5), VQKV_OK);
    assert_false(present_t(&s, 1, 1));
    check_tenants(&s);

    /* Everything of tenant 1 leased or pinned: over quota, nothing evicted. */
    uint32_t lk[2] = {3, 4};
    keys_of(keys, lk, 2);
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 1, 6, 9, 100, &lease, NULL), 1);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, keys + K, 6, 100), VQKV_OK);
    uint8_t k5[K];
    key_of(k5, 5);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, k5, 6, 100), VQKV_OK);
    vqkvd_store_stats(&s, &st);
    uint64_t ev = st.evictions;
    assert_int_equal(put_t(&s, 1, 6, 0, 7), VQKV_EQUOTA);
    /* Extending a chain whose parent is the only candidate: the parent is
     * held for its child, so also over quota. */
    assert_int_equal(vqkvd_store_unpin(&s, 1, 0, k5), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 6, 5, 8), VQKV_EQUOTA);
    vqkvd_store_stats(&s, &st);
    assert_int_equal(st.evictions, ev);
    assert_true(present_t(&s, 1, 3) && present_t(&s, 1, 4) && present_t(&s, 1, 5));
    assert_false(present_t(&s, 1, 6));
    /* Present blocks are not new bytes: still fine at the quota. */
    assert_int_equal(put_t(&s, 1, 5, 0, 9), VQKV_EEXIST);
    /* The lease goes: 3 is the least recent evictable leaf. */
    assert_int_equal(vqkvd_store_release(&s, 9, lease), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 6, 5, 10), VQKV_OK);
    assert_false(present_t(&s, 1, 3));
    assert_true(present_t(&s, 1, 4) && present_t(&s, 1, 5) && present_t(&s, 1, 6));
    check_tenants(&s);

    /* Exact accounting after all that: 3 slots, 3 evictions for tenant 1;
     * tenant 2 untouched, the pool holds just these 5 blocks. */
    vqkvd_store_tenant_stats(&s, 1, &ts);
    assert_int_equal(ts.blocks, 3);
    assert_int_equal(ts.bytes_stored, 3 * page());
    assert_int_equal(ts.bytes_logical, 30);
    assert_int_equal(ts.evictions, 3);
    assert_int_equal(ts.quota_bytes, 3 * page());
    vqkvd_store_tenant_stats(&s, 2, &ts);
    assert_int_equal(ts.blocks, 2);
    assert_int_equal(ts.bytes_stored, 2 * page());
    assert_int_equal(ts.evictions, 1);
    assert_int_equal(ts.quota_bytes, 2 * page() + 1);
    vqkvd_store_tenant_stats(&s, 3, &ts); /* never seen: the default */
    assert_int_equal(ts.quota_bytes, 2 * page() + 1);
    assert_int_equal(p.slots_used, 5);

    /* A lowered quota: the next insert evicts down to it first. A quota
     * smaller than one slot takes nothing at all. */
    assert_int_equal(vqkvd_store_set_quota(&s, 1, 2 * page()), VQKV_OK);
    assert_int_equal(put_t(&s, 1, 7, 0, 11), VQKV_OK);
    vqkvd_store_tenant_stats(&s, 1, &ts);
    assert_int_equal(ts.blocks, 2);
    assert_true(present_t(&s, 1, 7));
    assert_int_equal(vqkvd_store_set_quota(&s, 4, page() - 1), VQKV_OK);
    assert_int_equal(put_t(&s, 4, 1, 0, 11), VQKV_EQUOTA);
    /* 0 is unlimited. */
    assert_int_equal(vqkvd_store_set_quota(&s, 2, 0), VQKV_OK);
    assert_int_equal(put_t(&s, 2, 53, 0, 12), VQKV_OK);
    assert_true(present_t(&s, 2, 51) && present_t(&s, 2, 52) && present_t(&s, 2, 53));
    check_tenants(&s);
    teardown(&p, &s);
}

/* The tree under tenant 1, model 0:  1 <- 2 <- 3,  2 <- 4,  1 <- 5 <- 6. */
static void put_tree(vqkvd_store_t *s)
{
    static const uint32_t id[6] = {1, 2, 3, 4, 5, 6}, par[6] = {0, 1, 2, 2, 1, 5};
    for (int i = 0; i < 6; i++)
        assert_int_equal(put_t(s, 1, id[i], par[i], 0), VQKV_OK);
}

static int64_t evict_ids(vqkvd_store_t *s, const uint32_t *ids, uint32_t n, uint64_t now)
{
    uint8_t keys[8 * K];
    keys_of(keys, ids, (int)n);
    return vqkvd_store_evict(s, 1, 0, keys, n, 0, now);
}

static void test_evict_subtrees(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    vqkvd_tenant_stats_t ts;
    uint8_t k[K];

    setup(&p, &s, 16, 1.0, 1.0);
    put_tree(&s);
    /* The same keys under another tenant and another model stay. */
    assert_int_equal(put_t(&s, 2, 2, 0, 0), VQKV_OK);
    uint64_t slot;
    key_of(k, 2);
    assert_int_equal(vqkvd_store_insert(&s, 1, 9, k, NULL, 0, 1, 0, &slot), VQKV_OK);

    /* 2 goes with 3 and 4; an absent key is skipped. */
    uint32_t two[2] = {2, 99};
    assert_int_equal(evict_ids(&s, two, 2, 0), 3);
    assert_false(present_t(&s, 1, 2) || present_t(&s, 1, 3) || present_t(&s, 1, 4));
    assert_true(present_t(&s, 1, 1) && present_t(&s, 1, 5) && present_t(&s, 1, 6));
    assert_true(present_t(&s, 2, 2));
    assert_non_null(vqkvd_store_find(&s, 1, 9, k));
    assert_int_equal(vqkvd_store_find(&s, 1, 0, (key_of(k, 1), k))->children, 1);
    check_tenants(&s);
    assert_int_equal(evict_ids(&s, two, 2, 0), 0);
    teardown(&p, &s);

    /* A pinned 4 protects 2 and 1 (named), not 5: naming 1, 2 and 5 takes
     * 5 and 6 only; naming 3 inside 2's subtree still takes 3. */
    setup(&p, &s, 16, 1.0, 1.0);
    put_tree(&s);
    key_of(k, 4);
    assert_int_equal(vqkvd_store_pin(&s, 1, 0, k, 0, 100), VQKV_OK);
    uint32_t named[3] = {1, 2, 5};
    assert_int_equal(evict_ids(&s, named, 3, 0), 2);
    assert_true(present_t(&s, 1, 1) && present_t(&s, 1, 2) && present_t(&s, 1, 3));
    assert_false(present_t(&s, 1, 5) || present_t(&s, 1, 6));
    uint32_t nested[2] = {1, 3};
    assert_int_equal(evict_ids(&s, nested, 2, 0), 1);
    assert_false(present_t(&s, 1, 3));
    /* Once the pin has run out, 1 takes everything left. */
    assert_int_equal(evict_ids(&s, nested, 1, 100), 3);
    vqkvd_store_tenant_stats(&s, 1, &ts);
    assert_int_equal(ts.blocks, 0);
    assert_int_equal(ts.evictions, 6);
    check_tenants(&s);
    teardown(&p, &s);

    /* all: everything without a leased or pinned block at or below it. A
     * lease on the chain 1, 2 keeps those two; 3, 4, 5 and 6 go; the other
     * tenant's and model's blocks stay. */
    setup(&p, &s, 16, 1.0, 1.0);
    put_tree(&s);
    assert_int_equal(put_t(&s, 2, 1, 0, 0), VQKV_OK);
    uint8_t keys[2 * K];
    uint32_t chain[2] = {1, 2};
    keys_of(keys, chain, 2);
    uint64_t lease;
    assert_int_equal(vqkvd_store_lookup(&s, 1, 0, keys, 2, 0, 5, 100, &lease, NULL), 2);
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, NULL, 0, 1, 0), 4);
    assert_true(present_t(&s, 1, 1) && present_t(&s, 1, 2) && present_t(&s, 2, 1));
    assert_false(present_t(&s, 1, 3) || present_t(&s, 1, 4) || present_t(&s, 1, 5));
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, NULL, 0, 1, 0), 0);
    assert_int_equal(vqkvd_store_release(&s, 5, lease), VQKV_OK);
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, NULL, 0, 1, 0), 2);
    vqkvd_store_tenant_stats(&s, 1, &ts);
    assert_int_equal(ts.blocks, 0);
    assert_int_equal(ts.evictions, 6);
    vqkvd_store_tenant_stats(&s, 2, &ts);
    assert_int_equal(ts.blocks, 1);
    assert_int_equal(ts.evictions, 0);
    check_tenants(&s);
    /* Bad arguments. */
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, NULL, 1, 0, 0), VQKV_EINVAL);
    assert_int_equal(vqkvd_store_evict(&s, 1, 0, keys, VQKVD_STORE_MAX_CHAIN + 1, 0, 0),
                     VQKV_EINVAL);
    teardown(&p, &s);
}

/* ---- randomized run against a reference model ---------------------------- */

#define R_TENANTS 2
#define R_MODELS 2
#define R_IDS 48 /* chains of 6: id % 6 == 0 is a root */
#define R_N (R_TENANTS * R_MODELS * R_IDS)
#define R_MAX_LEASES 64

typedef struct {
    int present;
    int refs;
    uint64_t pin_until;
} ref_block_t;

typedef struct {
    uint64_t id, owner, expiry;
    int n;
    int idx[6];
} ref_lease_t;

static int ridx(uint32_t t, uint32_t m, uint32_t id)
{
    return (int)((t * R_MODELS + m) * R_IDS + id);
}

static uint64_t rng_next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Checks the store against itself and the model, and learns of evictions. */
static void check_all(vqkvd_store_t *s, ref_block_t *ref, uint64_t now)
{
    uint64_t blocks = 0, bytes = 0, logical = 0, tb[R_TENANTS + 1] = {0};
    uint64_t last = 0;
    for (const vqkvd_block_t *b = s->lru_head; b != NULL; b = b->lru_next) {
        assert_true(b->stamp > last);
        last = b->stamp;
        assert_ptr_equal(vqkvd_store_find(s, b->tenant, b->model, b->key), b);
        uint32_t children = 0;
        for (const vqkvd_block_t *c = s->lru_head; c != NULL; c = c->lru_next)
            children += c->parent == b;
        assert_int_equal(children, b->children);
        if (b->parent != NULL)
            assert_ptr_equal(vqkvd_store_find(s, b->tenant, b->model, b->parent->key), b->parent);
        blocks++;
        bytes += b->stored_bytes;
        logical += b->logical_bytes;
        tb[b->tenant] += b->stored_bytes;
        assert_int_equal(vqkvd_pool_slot_class(s->pool, b->slot), (int)b->cls);
    }
    vqkvd_store_stats_t st;
    vqkvd_store_stats(s, &st);
    assert_int_equal(st.blocks, blocks);
    assert_int_equal(st.bytes_stored, bytes);
    assert_int_equal(st.bytes_logical, logical);
    assert_int_equal(s->pool->bytes_stored, bytes);
    for (uint32_t t = 1; t <= R_TENANTS; t++) {
        vqkvd_tenant_stats_t ts;
        vqkvd_store_tenant_stats(s, t, &ts);
        assert_int_equal(ts.bytes_stored, tb[t]);
    }

    uint64_t ref_blocks = 0;
    for (uint32_t t = 0; t < R_TENANTS; t++) {
        for (uint32_t m = 0; m < R_MODELS; m++) {
            for (uint32_t id = 0; id < R_IDS; id++) {
                ref_block_t *r = &ref[ridx(t, m, id)];
                uint8_t k[K];
                key_of(k, id);
                const vqkvd_block_t *b = vqkvd_store_find(s, t + 1, m, k);
                if (r->present && b == NULL) {
                    /* Evicted: only ever an unprotected one. */
                    assert_int_equal(r->refs, 0);
                    assert_true(r->pin_until <= now);
                    r->present = 0;
                    r->pin_until = 0;
                }
                assert_int_equal(r->present, b != NULL);
                if (b != NULL) {
                    ref_blocks++;
                    assert_int_equal(b->refs, (uint32_t)r->refs);
                    assert_int_equal(b->pin_until, r->pin_until);
                    if (id % 6 == 0)
                        assert_null(b->parent);
                    else
                        assert_non_null(b->parent); /* and present: checked above */
                }
            }
        }
    }
    assert_int_equal(ref_blocks, blocks);
}

static void test_random_against_model(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_store_t s;
    uint64_t pg = page(), x = 0x9e3779b97f4a7c15ull, now = 0;
    ref_block_t *ref = calloc(R_N, sizeof(*ref));
    ref_lease_t leases[R_MAX_LEASES];
    int n_leases = 0;
    uint64_t inserted = 0, evicted_seen = 0, enomem = 0;

    assert_non_null(ref);
    /* 3 pages: model 0 takes whole pages, model 1 quarter pages, so the
     * classes compete for chunks (emptied ones pass between them) and a
     * chunk held by one leased or pinned block runs a class out. */
    assert_int_equal(vqkvd_pool_init_cpu(&p, 3 * pg, pg), VQKV_OK);
    assert_int_equal(vqkvd_pool_add_class(&p, (uint32_t)pg), 0);
    assert_int_equal(vqkvd_pool_add_class(&p, (uint32_t)(pg / 4)), 1);
    assert_int_equal(vqkvd_store_init(&s, &p, 0.9, 0.6, seed), VQKV_OK);

    for (int step = 0; step < 8000; step++) {
        now += rng_next(&x) % 4;
        uint32_t t = (uint32_t)(rng_next(&x) % R_TENANTS);
        uint32_t m = (uint32_t)(rng_next(&x) % R_MODELS);
        uint32_t id = (uint32_t)(rng_next(&x) % R_IDS);
        uint8_t k[K], par[K];
        uint64_t slot;
        key_of(k, id);
        int op = (int)(rng_next(&x) % 100);
        ref_block_t *r = &ref[ridx(t, m, id)];

        if (op < 45) { /* insert */
            int root = id % 6 == 0;
            if (!root)
                key_of(par, id - 1);
            uint64_t ev0 = s.stats.evictions;
            int rc = vqkvd_store_insert(&s, t + 1, m, k, root ? NULL : par, m, 1 + id, now, &slot);
            if (r->present) {
                assert_int_equal(rc, VQKV_EEXIST);
            } else if (!root && !ref[ridx(t, m, id - 1)].present) {
                assert_int_equal(rc, VQKV_ENOPARENT);
            } else if (rc == VQKV_ENOMEM) {
                /* Out of capacity: no chunk left, no free slot of the class
                 * and no block of the class that could have gone. */
                enomem++;
                assert_int_equal(p.arena.chunks_used, p.arena.max_chunks);
                assert_int_equal(p.n_spare, 0);
                assert_int_equal(p.classes[m].n_free, 0);
                const vqkvd_block_t *pb = root ? NULL : vqkvd_store_find(&s, t + 1, m, par);
                for (const vqkvd_block_t *b = s.lru_head; b != NULL; b = b->lru_next)
                    if (b->cls == m && b != pb)
                        assert_true(b->children > 0 || b->refs > 0 || b->pin_until > now);
            } else {
                assert_int_equal(rc, VQKV_OK);
                assert_int_equal(vqkvd_pool_slot_class(&p, slot), (int)m);
                inserted++;
            }
            evicted_seen += s.stats.evictions - ev0;
            if (rc == VQKV_OK)
                r->present = 1;
        } else if (op < 70) { /* lookup a chain prefix, maybe leased */
            uint32_t start = id - id % 6, len = 1 + (uint32_t)(rng_next(&x) % 6);
            uint8_t keys[6 * K];
            for (uint32_t i = 0; i < len; i++)
                key_of(keys + i * K, start + i);
            int want = 0;
            while ((uint32_t)want < len && start + (uint32_t)want < R_IDS &&
                   ref[ridx(t, m, start + (uint32_t)want)].present)
                want++;
            int take = n_leases < R_MAX_LEASES && rng_next(&x) % 2;
            uint64_t lid = 0, ttl = 1 + rng_next(&x) % 150, owner = rng_next(&x) % 3;
            int got = vqkvd_store_lookup(&s, t + 1, m, keys, len, now, owner, ttl,
                                         take ? &lid : NULL, NULL);
            assert_int_equal(got, want);
            if (take && got > 0) {
                ref_lease_t *l = &leases[n_leases++];
                l->id = lid;
                l->owner = owner;
                l->expiry = now + ttl;
                l->n = got;
                for (int i = 0; i < got; i++) {
                    l->idx[i] = ridx(t, m, start + (uint32_t)i);
                    ref[l->idx[i]].refs++;
                }
            }
        } else if (op < 80 && n_leases > 0) { /* release */
            int i = (int)(rng_next(&x) % (uint64_t)n_leases);
            assert_int_equal(vqkvd_store_release(&s, leases[i].owner + 1, leases[i].id),
                             VQKV_ELEASE);
            assert_int_equal(vqkvd_store_release(&s, leases[i].owner, leases[i].id), VQKV_OK);
            for (int j = 0; j < leases[i].n; j++)
                ref[leases[i].idx[j]].refs--;
            leases[i] = leases[--n_leases];
        } else if (op < 82) { /* sweep */
            uint64_t want = 0;
            for (int i = 0; i < n_leases;) {
                if (leases[i].expiry <= now) {
                    for (int j = 0; j < leases[i].n; j++)
                        ref[leases[i].idx[j]].refs--;
                    leases[i] = leases[--n_leases];
                    want++;
                } else {
                    i++;
                }
            }
            assert_int_equal(vqkvd_store_sweep(&s, now), want);
        } else if (op < 94) { /* pin or unpin */
            if (rng_next(&x) % 3) {
                uint64_t ttl = 1 + rng_next(&x) % 200;
                assert_int_equal(vqkvd_store_pin(&s, t + 1, m, k, now, ttl),
                                 r->present ? VQKV_OK : VQKV_ENOENT);
                if (r->present)
                    r->pin_until = now + ttl;
            } else {
                assert_int_equal(vqkvd_store_unpin(&s, t + 1, m, k),
                                 r->present ? VQKV_OK : VQKV_ENOENT);
                if (r->present)
                    r->pin_until = 0;
            }
        } else if (op < 97) { /* the periodic tick, without expired leases */
            int expired = 0;
            for (int i = 0; i < n_leases; i++)
                expired |= leases[i].expiry <= now;
            if (!expired)
                evicted_seen += vqkvd_store_tick(&s, now);
        } else { /* a client goes away */
            uint64_t owner = rng_next(&x) % 3, want = 0;
            for (int i = 0; i < n_leases;) {
                if (leases[i].owner == owner) {
                    for (int j = 0; j < leases[i].n; j++)
                        ref[leases[i].idx[j]].refs--;
                    leases[i] = leases[--n_leases];
                    want++;
                } else {
                    i++;
                }
            }
            assert_int_equal(vqkvd_store_release_owner(&s, owner), want);
        }
        check_all(&s, ref, now);
        check_tenants(&s);
        assert_int_equal(s.stats.leases, (uint64_t)n_leases);
    }
    /* The run did what it is meant to test. */
    assert_int_equal(s.stats.evictions, evicted_seen);
    assert_true(inserted > 400);
    assert_true(evicted_seen > 300);
    assert_true(enomem > 0);
    assert_int_equal(s.stats.inserts, inserted);

    vqkvd_store_destroy(&s);
    assert_int_equal(p.slots_used, 0);
    vqkvd_pool_destroy(&p);
    free(ref);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_refuses),
        cmocka_unit_test(test_chain_lookup),
        cmocka_unit_test(test_tenants_models_isolated),
        cmocka_unit_test(test_duplicate_insert),
        cmocka_unit_test(test_reserve_commit_abort),
        cmocka_unit_test(test_lru_leaves_first),
        cmocka_unit_test(test_watermarks),
        cmocka_unit_test(test_leases_protect_and_expire),
        cmocka_unit_test(test_pins_protect_and_expire),
        cmocka_unit_test(test_parents_hold_for_children),
        cmocka_unit_test(test_tenant_counters),
        cmocka_unit_test(test_quota_evicts_own_lru),
        cmocka_unit_test(test_evict_subtrees),
        cmocka_unit_test(test_random_against_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
