/* pool.c -- the slot pool (pool.h) and its CPU arena.
 *
 * The CPU arena is one memfd mapped MAP_SHARED once at start: chunks are
 * consecutive ranges of it handed out by a bump counter, so taking a chunk
 * is O(1) and costs no syscall. The kernel backs pages on first touch, so
 * a large arena costs nothing until blocks arrive.
 *
 * Each chunk keeps its free slots on a stack of indices sized to its slot
 * count (so a push never fails), and a class links its chunks that have a
 * free slot. When none has, the class takes a chunk: an emptied one from
 * the pool's spare stack first, else the next from the arena, and fills its
 * stack (O(slots per chunk), once per chunk taken, which is what makes
 * alloc O(1) amortized). A chunk that empties is given back (see pool.h for
 * the one a class keeps); its stack and flags are freed with it because the
 * next class cuts it into slots of another size.
 */
#include "pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vqkv_codec.h"

#define VQKVD__SLOT_CHUNK(h) ((uint32_t)((h) >> 32))
#define VQKVD__SLOT_INDEX(h) ((uint32_t)((h)&0xffffffffu))
#define VQKVD__SLOT_HANDLE(c, i) (((uint64_t)(c) << 32) | (uint64_t)(i))

/* ---- CPU arena ---------------------------------------------------------- */

static int vqkvd__arena_cpu_alloc_chunk(vqkvd_arena_t *a, void **ptr, uint64_t *offset)
{
    if (a->chunks_used >= a->max_chunks)
        return VQKV_ENOMEM;
    uint64_t off = (uint64_t)a->chunks_used * a->chunk_bytes;
    a->chunks_used++;
    *ptr = a->base + off;
    *offset = off;
    return VQKV_OK;
}

static void vqkvd__arena_cpu_free_all(vqkvd_arena_t *a)
{
    if (a->base != NULL)
        munmap(a->base, (size_t)a->bytes);
    if (a->fd >= 0)
        close(a->fd);
    a->base = NULL;
    a->fd = -1;
}

static const vqkvd_arena_ops_t vqkvd__arena_cpu_ops = {"cpu", vqkvd__arena_cpu_alloc_chunk,
                                                       vqkvd__arena_cpu_free_all};

int vqkvd_arena_init_cpu(vqkvd_arena_t *a, uint64_t bytes, uint64_t chunk_bytes)
{
    long page_l = sysconf(_SC_PAGESIZE);
    uint64_t page = page_l > 0 ? (uint64_t)page_l : 4096;

    memset(a, 0, sizeof(*a));
    a->fd = -1;
    if (chunk_bytes == 0)
        chunk_bytes = VQKVD_POOL_DEFAULT_CHUNK;
    if (chunk_bytes % page != 0 || chunk_bytes > UINT32_MAX || bytes == 0 ||
        bytes > UINT64_MAX - page)
        return VQKV_EINVAL;
    bytes = (bytes + page - 1) / page * page;
    if (bytes < chunk_bytes || bytes / chunk_bytes > UINT32_MAX || bytes > SIZE_MAX)
        return VQKV_EINVAL;

    int fd = memfd_create("vqkvd-pool", MFD_CLOEXEC);
    if (fd < 0)
        return VQKV_ENOMEM;
    if (ftruncate(fd, (off_t)bytes) != 0) {
        close(fd);
        return VQKV_ENOMEM;
    }
    void *base = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        close(fd);
        return VQKV_ENOMEM;
    }
    a->ops = &vqkvd__arena_cpu_ops;
    a->bytes = bytes;
    a->chunk_bytes = chunk_bytes;
    a->max_chunks = (uint32_t)(bytes / chunk_bytes);
    a->fd = fd;
    a->base = base;
    return VQKV_OK;
}

/* ---- pool --------------------------------------------------------------- */

int vqkvd_pool_init(vqkvd_pool_t *p, const vqkvd_arena_t *arena)
{
    memset(p, 0, sizeof(*p));
    p->arena = *arena;
    if (arena->ops == NULL || arena->max_chunks == 0) {
        vqkvd_pool_destroy(p);
        return VQKV_EINVAL;
    }
    p->chunks = calloc(arena->max_chunks, sizeof(*p->chunks));
    p->spare = malloc(arena->max_chunks * sizeof(*p->spare));
    if (p->chunks == NULL || p->spare == NULL) {
        vqkvd_pool_destroy(p);
        return VQKV_ENOMEM;
    }
    return VQKV_OK;
}

int vqkvd_pool_init_cpu(vqkvd_pool_t *p, uint64_t arena_bytes, uint64_t chunk_bytes)
{
    vqkvd_arena_t a;
    memset(p, 0, sizeof(*p));
    p->arena.fd = -1;
    int rc = vqkvd_arena_init_cpu(&a, arena_bytes, chunk_bytes);
    if (rc != VQKV_OK)
        return rc;
    return vqkvd_pool_init(p, &a);
}

void vqkvd_pool_destroy(vqkvd_pool_t *p)
{
    if (p->chunks != NULL) {
        for (uint32_t c = 0; c < p->arena.chunks_used; c++) {
            free(p->chunks[c].used);
            free(p->chunks[c].free);
        }
    }
    free(p->classes);
    free(p->chunks);
    free(p->spare);
    if (p->arena.ops != NULL)
        p->arena.ops->free_all(&p->arena);
    memset(p, 0, sizeof(*p));
    p->arena.fd = -1;
}

int vqkvd_pool_add_class(vqkvd_pool_t *p, uint32_t slot_bytes)
{
    if (p->chunks == NULL || slot_bytes == 0 || slot_bytes > p->arena.chunk_bytes)
        return VQKV_EINVAL;
    if (p->n_classes >= VQKVD_POOL_MAX_CLASSES)
        return VQKV_ENOMEM;
    /* Grown by one each time: classes are registered rarely (one per
     * layout), so the O(n) copy is not worth a capacity field. */
    vqkvd_slot_class_t *cl = realloc(p->classes, (p->n_classes + 1) * sizeof(*cl));
    if (cl == NULL)
        return VQKV_ENOMEM;
    p->classes = cl;
    memset(&cl[p->n_classes], 0, sizeof(*cl));
    cl[p->n_classes].slot_bytes = slot_bytes;
    cl[p->n_classes].slots_per_chunk = (uint32_t)(p->arena.chunk_bytes / slot_bytes);
    cl[p->n_classes].with_room = VQKVD_POOL_NO_CHUNK;
    return (int)p->n_classes++;
}

/* Puts chunk c at the head of its class's list of chunks with room. O(1). */
static void vqkvd__pool_room_link(vqkvd_pool_t *p, vqkvd_slot_class_t *cl, uint32_t c)
{
    vqkvd_chunk_t *ch = &p->chunks[c];
    ch->prev = VQKVD_POOL_NO_CHUNK;
    ch->next = cl->with_room;
    if (cl->with_room != VQKVD_POOL_NO_CHUNK)
        p->chunks[cl->with_room].prev = c;
    cl->with_room = c;
}

static void vqkvd__pool_room_unlink(vqkvd_pool_t *p, vqkvd_slot_class_t *cl, uint32_t c)
{
    vqkvd_chunk_t *ch = &p->chunks[c];
    if (ch->prev != VQKVD_POOL_NO_CHUNK)
        p->chunks[ch->prev].next = ch->next;
    else
        cl->with_room = ch->next;
    if (ch->next != VQKVD_POOL_NO_CHUNK)
        p->chunks[ch->next].prev = ch->prev;
}

/* Gives class cls a chunk (a spare one, else the arena's next) with every
 * slot free, the last slot deepest so that allocation walks the chunk
 * from its start. O(slots per chunk). */
static int vqkvd__pool_class_grow(vqkvd_pool_t *p, uint32_t cls)
{
    vqkvd_slot_class_t *cl = &p->classes[cls];
    if (p->n_spare == 0 && p->arena.chunks_used >= p->arena.max_chunks)
        return VQKV_ENOMEM; /* before allocating, since a full pool asks often */
    uint8_t *used = calloc(cl->slots_per_chunk, 1);
    uint32_t *free_idx = malloc(cl->slots_per_chunk * sizeof(*free_idx));
    int rc = VQKV_ENOMEM;
    uint32_t c;

    if (used == NULL || free_idx == NULL)
        goto cleanup;
    if (p->n_spare > 0) {
        c = p->spare[--p->n_spare];
    } else {
        void *ptr = NULL;
        uint64_t offset = 0;
        c = p->arena.chunks_used; /* the index the arena's next chunk gets */
        rc = p->arena.ops->alloc_chunk(&p->arena, &ptr, &offset);
        if (rc != VQKV_OK)
            goto cleanup;
        p->chunks[c].ptr = ptr;
        p->chunks[c].offset = offset;
    }
    vqkvd_chunk_t *ch = &p->chunks[c];
    ch->cls = cls;
    ch->used = used;
    ch->free = free_idx;
    ch->n_free = 0;
    for (uint32_t i = cl->slots_per_chunk; i-- > 0;)
        ch->free[ch->n_free++] = i;
    used = NULL;
    free_idx = NULL;
    vqkvd__pool_room_link(p, cl, c);
    cl->n_chunks++;
    cl->slots_total += cl->slots_per_chunk;
    cl->n_free += cl->slots_per_chunk;
    rc = VQKV_OK;
cleanup:
    free(used);
    free(free_idx);
    return rc;
}

/* Gives empty chunk c of class cl back to the pool's spares. O(1). */
static void vqkvd__pool_class_shrink(vqkvd_pool_t *p, vqkvd_slot_class_t *cl, uint32_t c)
{
    vqkvd_chunk_t *ch = &p->chunks[c];
    vqkvd__pool_room_unlink(p, cl, c);
    free(ch->used);
    free(ch->free);
    ch->used = NULL;
    ch->free = NULL;
    ch->n_free = 0;
    cl->n_chunks--;
    cl->slots_total -= cl->slots_per_chunk;
    cl->n_free -= cl->slots_per_chunk;
    p->spare[p->n_spare++] = c;
}

int vqkvd_pool_alloc(vqkvd_pool_t *p, uint32_t cls, uint64_t *slot)
{
    if (cls >= p->n_classes || slot == NULL)
        return VQKV_EINVAL;
    vqkvd_slot_class_t *cl = &p->classes[cls];
    if (cl->with_room == VQKVD_POOL_NO_CHUNK) {
        int rc = vqkvd__pool_class_grow(p, cls);
        if (rc != VQKV_OK)
            return rc;
    }
    uint32_t c = cl->with_room;
    vqkvd_chunk_t *ch = &p->chunks[c];
    uint32_t i = ch->free[--ch->n_free];
    if (ch->n_free == 0)
        vqkvd__pool_room_unlink(p, cl, c);
    ch->used[i] = 1;
    cl->n_free--;
    cl->slots_used++;
    p->slots_used++;
    p->bytes_stored += cl->slot_bytes;
    *slot = VQKVD__SLOT_HANDLE(c, i);
    return VQKV_OK;
}

/* The chunk of a handle naming a slot that exists (used or not), or NULL. */
static const vqkvd_chunk_t *vqkvd__pool_slot_chunk(const vqkvd_pool_t *p, uint64_t slot)
{
    uint32_t c = VQKVD__SLOT_CHUNK(slot);
    if (p->chunks == NULL || c >= p->arena.chunks_used)
        return NULL;
    const vqkvd_chunk_t *ch = &p->chunks[c];
    if (ch->used == NULL || VQKVD__SLOT_INDEX(slot) >= p->classes[ch->cls].slots_per_chunk)
        return NULL;
    return ch;
}

int vqkvd_pool_free(vqkvd_pool_t *p, uint64_t slot)
{
    if (vqkvd__pool_slot_chunk(p, slot) == NULL ||
        !p->chunks[VQKVD__SLOT_CHUNK(slot)].used[VQKVD__SLOT_INDEX(slot)])
        return VQKV_EINVAL;
    uint32_t c = VQKVD__SLOT_CHUNK(slot);
    vqkvd_chunk_t *ch = &p->chunks[c];
    vqkvd_slot_class_t *cl = &p->classes[ch->cls];
    ch->used[VQKVD__SLOT_INDEX(slot)] = 0;
    ch->free[ch->n_free++] = VQKVD__SLOT_INDEX(slot); /* fits: the stack holds every slot */
    if (ch->n_free == 1)
        vqkvd__pool_room_link(p, cl, c);
    cl->n_free++;
    cl->slots_used--;
    p->slots_used--;
    p->bytes_stored -= cl->slot_bytes;
    /* Kept when it is the class's only chunk with room (pool.h). */
    if (ch->n_free == cl->slots_per_chunk &&
        (ch->prev != VQKVD_POOL_NO_CHUNK || ch->next != VQKVD_POOL_NO_CHUNK))
        vqkvd__pool_class_shrink(p, cl, c);
    return VQKV_OK;
}

int vqkvd_pool_slot_class(const vqkvd_pool_t *p, uint64_t slot)
{
    const vqkvd_chunk_t *ch = vqkvd__pool_slot_chunk(p, slot);
    if (ch == NULL || !ch->used[VQKVD__SLOT_INDEX(slot)])
        return VQKV_EINVAL;
    return (int)ch->cls;
}

void *vqkvd_pool_slot_ptr(const vqkvd_pool_t *p, uint64_t slot)
{
    const vqkvd_chunk_t *ch = vqkvd__pool_slot_chunk(p, slot);
    if (ch == NULL || ch->ptr == NULL)
        return NULL;
    return ch->ptr + (uint64_t)VQKVD__SLOT_INDEX(slot) * p->classes[ch->cls].slot_bytes;
}

uint64_t vqkvd_pool_slot_offset(const vqkvd_pool_t *p, uint64_t slot)
{
    const vqkvd_chunk_t *ch = vqkvd__pool_slot_chunk(p, slot);
    if (ch == NULL)
        return UINT64_MAX;
    return ch->offset + (uint64_t)VQKVD__SLOT_INDEX(slot) * p->classes[ch->cls].slot_bytes;
}

int vqkvd_pool_fd(const vqkvd_pool_t *p)
{
    return p->arena.fd;
}

uint32_t vqkvd_pool_class_slot_bytes(const vqkvd_pool_t *p, uint32_t cls)
{
    return cls < p->n_classes ? p->classes[cls].slot_bytes : 0;
}

void vqkvd_pool_stats(const vqkvd_pool_t *p, vqkvd_pool_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    st->arena_bytes = p->arena.bytes;
    st->chunk_bytes = p->arena.chunk_bytes;
    st->chunks_total = p->arena.max_chunks;
    st->usable_bytes = (uint64_t)p->arena.max_chunks * p->arena.chunk_bytes;
    st->chunks_used = p->arena.chunks_used - p->n_spare;
    st->bytes_in_chunks = st->chunks_used * p->arena.chunk_bytes;
    st->slots_used = p->slots_used;
    st->bytes_stored = p->bytes_stored;
}
