/* test_pool.c -- vqkvd's slot pool (daemon/pool.h) on the CPU arena: sizes
 * rounded and refused as documented, slots handed out and taken back with
 * exact accounting, classes taking chunks until the arena is full and then
 * VQKV_ENOMEM, handles that do not name an allocated slot refused, slots
 * that never overlap, emptied chunks passing to another class (all but the
 * one a class keeps), and a memfd that really holds what is written
 * through the mapping (read back with pread on the fd).
 *
 * Chunks are one page here so that a few slots fill an arena.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pool.h"
#include "vqkv_codec.h"

static uint64_t page(void)
{
    return (uint64_t)sysconf(_SC_PAGESIZE);
}

static void test_init_sizes(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    uint64_t pg = page();

    assert_int_equal(vqkvd_pool_init_cpu(&p, 0, pg), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_init_cpu(&p, 4 * pg, pg + 1), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_init_cpu(&p, pg, 2 * pg), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_fd(&p), -1);
    vqkvd_pool_destroy(&p); /* safe after a failed init */

    /* Rounded up to the page; whole chunks only. */
    assert_int_equal(vqkvd_pool_init_cpu(&p, 10 * pg + 1, 2 * pg), VQKV_OK);
    vqkvd_pool_stats_t st;
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.arena_bytes, 11 * pg);
    assert_int_equal(st.chunk_bytes, 2 * pg);
    assert_int_equal(st.chunks_total, 5);
    assert_int_equal(st.usable_bytes, 10 * pg);
    assert_int_equal(st.chunks_used, 0);
    assert_int_equal(st.bytes_in_chunks, 0);
    assert_int_equal(st.bytes_stored, 0);
    int fd = vqkvd_pool_fd(&p);
    assert_true(fd >= 0);
    assert_true(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    struct stat sb;
    assert_int_equal(fstat(fd, &sb), 0);
    assert_int_equal((uint64_t)sb.st_size, 11 * pg);

    assert_int_equal(vqkvd_pool_add_class(&p, 0), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_add_class(&p, (uint32_t)(2 * pg + 1)), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_add_class(&p, (uint32_t)(2 * pg)), 0);
    assert_int_equal(vqkvd_pool_add_class(&p, 1), 1);
    uint64_t h;
    assert_int_equal(vqkvd_pool_alloc(&p, 2, &h), VQKV_EINVAL);
    vqkvd_pool_destroy(&p);
    assert_int_equal(fcntl(fd, F_GETFD), -1); /* the memfd is closed */
    vqkvd_pool_destroy(&p);                   /* and twice is safe */
}

static void test_alloc_free_exact(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_pool_stats_t st;
    uint64_t pg = page();
    uint32_t sb = (uint32_t)(pg / 4 - 8); /* 4 slots a chunk, a tail left over */
    uint64_t h[9];

    assert_int_equal(vqkvd_pool_init_cpu(&p, 4 * pg, pg), VQKV_OK);
    int cls = vqkvd_pool_add_class(&p, sb);
    assert_int_equal(cls, 0);
    assert_int_equal(p.classes[0].slots_per_chunk, 4);
    for (int i = 0; i < 9; i++) {
        assert_int_equal(vqkvd_pool_alloc(&p, 0, &h[i]), VQKV_OK);
        assert_int_equal(vqkvd_pool_slot_class(&p, h[i]), 0);
        vqkvd_pool_stats(&p, &st);
        assert_int_equal(st.slots_used, (uint64_t)i + 1);
        assert_int_equal(st.bytes_stored, ((uint64_t)i + 1) * sb);
        assert_int_equal(st.chunks_used, (uint64_t)i / 4 + 1);
        assert_int_equal(st.bytes_in_chunks, ((uint64_t)i / 4 + 1) * pg);
    }
    assert_int_equal(p.classes[0].slots_used, 9);
    assert_int_equal(p.classes[0].slots_total, 12);

    /* Freed slots come back exactly once. */
    assert_int_equal(vqkvd_pool_free(&p, h[3]), VQKV_OK);
    assert_int_equal(vqkvd_pool_free(&p, h[3]), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_slot_class(&p, h[3]), VQKV_EINVAL);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.slots_used, 8);
    assert_int_equal(st.bytes_stored, 8 * (uint64_t)sb);
    assert_int_equal(st.chunks_used, 3); /* a chunk with slots in use stays */

    /* Handles that name no slot: a chunk not given out, an index past the
     * chunk's slots, an unused slot of a used chunk. */
    assert_int_equal(vqkvd_pool_free(&p, (uint64_t)3 << 32), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_free(&p, 4), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_free(&p, ((uint64_t)2 << 32) | 3), VQKV_EINVAL);
    assert_null(vqkvd_pool_slot_ptr(&p, (uint64_t)7 << 32));
    assert_int_equal(vqkvd_pool_slot_offset(&p, UINT64_MAX), UINT64_MAX);

    /* The freed slot is reused before anything new. */
    uint64_t again;
    assert_int_equal(vqkvd_pool_alloc(&p, 0, &again), VQKV_OK);
    assert_int_equal(again, h[3]);
    for (int i = 0; i < 9; i++)
        assert_int_equal(vqkvd_pool_free(&p, h[i]), VQKV_OK);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.slots_used, 0);
    assert_int_equal(st.bytes_stored, 0);
    vqkvd_pool_destroy(&p);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_classes_fill_arena(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_pool_stats_t st;
    uint64_t pg = page();
    uint32_t small = (uint32_t)(pg / 4), big = (uint32_t)(pg * 3 / 4);
    uint64_t hs[64], hb[8];
    int ns = 0, nb = 0;

    assert_int_equal(vqkvd_pool_init_cpu(&p, 8 * pg, pg), VQKV_OK);
    assert_int_equal(vqkvd_pool_add_class(&p, small), 0); /* 4 a chunk */
    assert_int_equal(vqkvd_pool_add_class(&p, big), 1);   /* 1 a chunk */
    for (; ns < 5; ns++)
        assert_int_equal(vqkvd_pool_alloc(&p, 0, &hs[ns]), VQKV_OK); /* 2 chunks */
    for (; nb < 3; nb++)
        assert_int_equal(vqkvd_pool_alloc(&p, 1, &hb[nb]), VQKV_OK); /* 3 chunks */
    /* The small class grows into the 3 chunks left: 20 slots in all. */
    while (vqkvd_pool_alloc(&p, 0, &hs[ns]) == VQKV_OK)
        ns++;
    assert_int_equal(ns, 20);
    assert_int_equal(vqkvd_pool_alloc(&p, 0, &hs[ns]), VQKV_ENOMEM);
    assert_int_equal(vqkvd_pool_alloc(&p, 1, &hb[nb]), VQKV_ENOMEM);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.chunks_used, 8);
    assert_int_equal(st.bytes_in_chunks, 8 * pg);
    assert_int_equal(st.slots_used, 23);
    assert_int_equal(st.bytes_stored, 20 * (uint64_t)small + 3 * (uint64_t)big);
    assert_int_equal(p.classes[0].n_chunks, 5);
    assert_int_equal(p.classes[1].n_chunks, 3);

    /* A slot freed in one class serves that class only. */
    assert_int_equal(vqkvd_pool_free(&p, hs[7]), VQKV_OK);
    assert_int_equal(vqkvd_pool_alloc(&p, 1, &hb[nb]), VQKV_ENOMEM);
    assert_int_equal(vqkvd_pool_alloc(&p, 0, &hs[7]), VQKV_OK);

    /* No two slots overlap and all lie inside the arena. */
    uint64_t spans[28][2];
    int n = 0;
    for (int i = 0; i < ns; i++, n++) {
        spans[n][0] = vqkvd_pool_slot_offset(&p, hs[i]);
        spans[n][1] = small;
    }
    for (int i = 0; i < nb; i++, n++) {
        spans[n][0] = vqkvd_pool_slot_offset(&p, hb[i]);
        spans[n][1] = big;
    }
    qsort(spans, (size_t)n, sizeof(spans[0]), cmp_u64);
    for (int i = 0; i < n; i++) {
        assert_true(spans[i][0] + spans[i][1] <= 8 * pg);
        if (i > 0)
            assert_true(spans[i - 1][0] + spans[i - 1][1] <= spans[i][0]);
    }
    vqkvd_pool_destroy(&p);
}

/* What a VQ model's calibration leaves behind: a class (its lossless
 * fallback) fills the arena, then its blocks all go. Every chunk but one
 * comes back and the other class (the VQ codec) grows into them; the one
 * kept is reused by its own class first. */
static void test_emptied_chunks_pass_to_other_classes(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    vqkvd_pool_stats_t st;
    uint64_t pg = page();
    uint32_t small = (uint32_t)(pg / 4), big = (uint32_t)(pg / 2);
    uint64_t hs[32], hb[16];

    assert_int_equal(vqkvd_pool_init_cpu(&p, 8 * pg, pg), VQKV_OK);
    assert_int_equal(vqkvd_pool_add_class(&p, big), 0);   /* 2 a chunk */
    assert_int_equal(vqkvd_pool_add_class(&p, small), 1); /* 4 a chunk */
    for (int i = 0; i < 16; i++)
        assert_int_equal(vqkvd_pool_alloc(&p, 0, &hb[i]), VQKV_OK);
    assert_int_equal(vqkvd_pool_alloc(&p, 1, &hs[0]), VQKV_ENOMEM);

    /* Freed in an order that empties chunks one by one and leaves them
     * half full on the way. */
    for (int i = 0; i < 16; i++)
        assert_int_equal(vqkvd_pool_free(&p, hb[i ^ 1]), VQKV_OK);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.slots_used, 0);
    assert_int_equal(st.bytes_stored, 0);
    assert_int_equal(st.chunks_used, 1);
    assert_int_equal(st.bytes_in_chunks, pg);
    assert_int_equal(p.classes[0].n_chunks, 1);
    assert_int_equal(p.classes[0].n_free, 2);
    assert_int_equal(p.classes[0].slots_total, 2);
    /* A freed handle names no slot any more, in a spare chunk or not. */
    assert_int_equal(vqkvd_pool_free(&p, hb[0]), VQKV_EINVAL);
    assert_int_equal(vqkvd_pool_slot_class(&p, hb[15]), VQKV_EINVAL);

    /* The small class takes the 7 spare chunks: 28 slots. */
    int ns = 0;
    while (ns < 32 && vqkvd_pool_alloc(&p, 1, &hs[ns]) == VQKV_OK)
        ns++;
    assert_int_equal(ns, 28);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.chunks_used, 8);
    assert_int_equal(p.classes[1].n_chunks, 7);
    assert_int_equal(st.bytes_stored, 28 * (uint64_t)small);
    /* Written slots of the reused chunks do not overlap the kept one. */
    for (int i = 0; i < ns; i++)
        memset(vqkvd_pool_slot_ptr(&p, hs[i]), 0x5a, small);
    uint64_t kept;
    assert_int_equal(vqkvd_pool_alloc(&p, 0, &kept), VQKV_OK);
    memset(vqkvd_pool_slot_ptr(&p, kept), 0xc3, big);
    for (int i = 0; i < ns; i++) {
        const uint8_t *s = vqkvd_pool_slot_ptr(&p, hs[i]);
        assert_int_equal(s[0], 0x5a);
        assert_int_equal(s[small - 1], 0x5a);
    }

    /* One slot freed and taken again at a chunk boundary keeps its chunk. */
    assert_int_equal(vqkvd_pool_free(&p, hs[27]), VQKV_OK);
    assert_int_equal(vqkvd_pool_free(&p, hs[26]), VQKV_OK);
    assert_int_equal(vqkvd_pool_free(&p, hs[25]), VQKV_OK);
    assert_int_equal(vqkvd_pool_free(&p, hs[24]), VQKV_OK);
    vqkvd_pool_stats(&p, &st);
    assert_int_equal(st.chunks_used, 8);
    assert_int_equal(vqkvd_pool_alloc(&p, 1, &hs[24]), VQKV_OK);
    vqkvd_pool_destroy(&p);
}

static void test_memfd_backs_slots(void **state)
{
    (void)state;
    vqkvd_pool_t p;
    uint64_t pg = page();
    uint32_t sb = 1000;
    uint64_t h[12];

    assert_int_equal(vqkvd_pool_init_cpu(&p, 3 * pg, pg), VQKV_OK);
    assert_int_equal(vqkvd_pool_add_class(&p, sb), 0);
    int per = (int)(pg / sb);
    int n = 3 * per < 12 ? 3 * per : 12;
    for (int i = 0; i < n; i++) {
        assert_int_equal(vqkvd_pool_alloc(&p, 0, &h[i]), VQKV_OK);
        uint8_t *ptr = vqkvd_pool_slot_ptr(&p, h[i]);
        assert_non_null(ptr);
        assert_ptr_equal(ptr, p.arena.base + vqkvd_pool_slot_offset(&p, h[i]));
        for (uint32_t j = 0; j < sb; j++)
            ptr[j] = (uint8_t)(i * 31 + j * 7 + 1);
    }
    uint8_t *buf = malloc(sb);
    assert_non_null(buf);
    for (int i = 0; i < n; i++) {
        off_t off = (off_t)vqkvd_pool_slot_offset(&p, h[i]);
        assert_int_equal(pread(vqkvd_pool_fd(&p), buf, sb, off), (ssize_t)sb);
        for (uint32_t j = 0; j < sb; j++)
            assert_int_equal(buf[j], (uint8_t)(i * 31 + j * 7 + 1));
    }
    /* And the other way: written through the fd, seen in the mapping. */
    memset(buf, 0xa5, sb);
    off_t off = (off_t)vqkvd_pool_slot_offset(&p, h[1]);
    assert_int_equal(pwrite(vqkvd_pool_fd(&p), buf, sb, off), (ssize_t)sb);
    assert_memory_equal(vqkvd_pool_slot_ptr(&p, h[1]), buf, sb);
    free(buf);
    vqkvd_pool_destroy(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_sizes),
        cmocka_unit_test(test_alloc_free_exact),
        cmocka_unit_test(test_classes_fill_arena),
        cmocka_unit_test(test_emptied_chunks_pass_to_other_classes),
        cmocka_unit_test(test_memfd_backs_slots),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
