/* pool.h -- vqkvd's memory pool: one arena carved into fixed-size slots.
 *
 * Every stored block is one codec block of a fixed size per model and
 * codec, so the pool never needs a general allocator: each registered model
 * gets a "slot class" (slot bytes = its codec's block bytes; a VQ model
 * that calibrates online a second one for its fp16 fallback), and a class
 * takes chunks of the arena (VQKVD_POOL_DEFAULT_CHUNK when the caller
 * passes 0; vqkvd uses 16 MiB) one at a time and cuts them into
 * slots. Allocating and freeing a slot is a pop or push on a chunk's free
 * stack: O(1) amortized, no search, no fragmentation inside a chunk. A chunk
 * that empties goes back to the pool for any class to take, unless it is
 * the class's only chunk with room: a model whose blocks all went (the
 * lossless fallback a VQ model uses while it calibrates, a model no worker
 * uses any more) strands at most one chunk, and a class that frees and
 * takes one slot over and over at a chunk boundary does not churn chunks.
 *
 * The arena is the only part that knows where memory comes from. The CPU
 * backend is one memfd (MFD_CLOEXEC) mapped once, so the payload can be
 * handed to other processes or read back by fd; a CUDA backend would fill
 * in the same vqkvd_arena_ops_t with cudaMalloc'd chunks and leave fd at -1.
 * Slots are named by a 64-bit handle (chunk index << 32 | slot index), never
 * by pointer, so nothing above the pool depends on the backend.
 *
 * Not thread-safe: the daemon calls it from its loop thread only.
 */
#ifndef VQKVD_POOL_H
#define VQKVD_POOL_H

#include <stddef.h>
#include <stdint.h>

/* Chunk size when the caller passes 0: large enough that the per-chunk
 * bookkeeping is noise, small enough that a class with few blocks does not
 * strand much memory. */
#define VQKVD_POOL_DEFAULT_CHUNK (2u << 20)

/* Slot classes a pool may have (one per registered model and codec). */
#define VQKVD_POOL_MAX_CLASSES 1024

typedef struct vqkvd_arena vqkvd_arena_t;

/* What a backend provides. alloc_chunk hands out the next chunk_bytes of
 * the arena as chunk number chunks_used, then counts it (*ptr: where the
 * pool addresses it; *offset: its place in the arena, the file offset on
 * the CPU backend) or returns VQKV_ENOMEM once the arena is used up;
 * free_all releases everything, once. */
typedef struct {
    const char *name; /* "cpu", later "cuda" */
    int (*alloc_chunk)(vqkvd_arena_t *a, void **ptr, uint64_t *offset);
    void (*free_all)(vqkvd_arena_t *a);
} vqkvd_arena_ops_t;

struct vqkvd_arena {
    const vqkvd_arena_ops_t *ops;
    uint64_t bytes;       /* capacity, rounded up to the page size */
    uint64_t chunk_bytes; /* every chunk is this size */
    uint32_t max_chunks;  /* bytes / chunk_bytes; a tail shorter than a chunk is never used */
    uint32_t chunks_used;
    int fd;        /* CPU: the memfd; -1 where there is none */
    uint8_t *base; /* the address of byte 0 (CPU: the mapping; CUDA: a device address) */
    void *owner;   /* the backend state the ops need; NULL on the CPU */
};

/* Creates the CPU arena: memfd_create + ftruncate + mmap(MAP_SHARED) of
 * bytes rounded up to the page size. chunk_bytes must be a multiple of the
 * page size (0: the default). VQKV_EINVAL for sizes that leave no whole
 * chunk, VQKV_ENOMEM when the kernel refuses; on failure nothing is open. */
int vqkvd_arena_init_cpu(vqkvd_arena_t *a, uint64_t bytes, uint64_t chunk_bytes);

/* No chunk: the end of a class's list of chunks with room. */
#define VQKVD_POOL_NO_CHUNK UINT32_MAX

/* One slot class. Its chunks with a free slot form a list, so alloc looks
 * at one chunk only: the list's head. */
typedef struct {
    uint32_t slot_bytes;
    uint32_t slots_per_chunk;
    uint32_t n_chunks;
    uint64_t slots_total; /* n_chunks * slots_per_chunk */
    uint64_t slots_used;
    uint64_t n_free;    /* free slots over the class's chunks */
    uint32_t with_room; /* first chunk with a free slot, or VQKVD_POOL_NO_CHUNK */
} vqkvd_slot_class_t;

typedef struct {
    uint8_t *ptr;    /* NULL-able on backends the host cannot address */
    uint64_t offset; /* in the arena */
    uint32_t cls;
    uint8_t *used;  /* slots_per_chunk flags (catches double frees); NULL: spare */
    uint32_t *free; /* stack of the chunk's free slot indices */
    uint32_t n_free;
    uint32_t prev, next; /* the class's chunks with room (VQKVD_POOL_NO_CHUNK ends) */
} vqkvd_chunk_t;

typedef struct {
    vqkvd_arena_t arena;
    vqkvd_slot_class_t *classes;
    uint32_t n_classes;
    vqkvd_chunk_t *chunks; /* arena.max_chunks entries */
    uint32_t *spare;       /* stack of emptied chunks no class holds */
    uint32_t n_spare;
    uint64_t bytes_stored; /* sum over classes of slots_used * slot_bytes */
    uint64_t slots_used;
} vqkvd_pool_t;

typedef struct {
    uint64_t arena_bytes;     /* what the arena holds, page-rounded */
    uint64_t usable_bytes;    /* max_chunks * chunk_bytes: what slots can use */
    uint64_t chunk_bytes;     /* the size of one chunk */
    uint64_t chunks_total;    /* max_chunks */
    uint64_t chunks_used;     /* given to classes */
    uint64_t bytes_in_chunks; /* chunks_used * chunk_bytes */
    uint64_t slots_used;      /* over all classes */
    uint64_t bytes_stored;    /* sum of slots_used * slot_bytes */
} vqkvd_pool_stats_t;

/* A pool on a CPU arena of arena_bytes (see vqkvd_arena_init_cpu). */
int vqkvd_pool_init_cpu(vqkvd_pool_t *p, uint64_t arena_bytes, uint64_t chunk_bytes);

/* A pool on an arena the caller has initialized (any backend); the pool
 * owns it from here on, also on failure. */
int vqkvd_pool_init(vqkvd_pool_t *p, const vqkvd_arena_t *arena);

/* Frees the classes and the arena. Safe on a zeroed pool and twice. */
void vqkvd_pool_destroy(vqkvd_pool_t *p);

/* Registers a slot class of slot_bytes (1..chunk_bytes) and returns its id
 * (>= 0), VQKV_EINVAL or VQKV_ENOMEM. It takes no chunk until its first
 * alloc. O(1) amortized. */
int vqkvd_pool_add_class(vqkvd_pool_t *p, uint32_t slot_bytes);

/* Takes a free slot of class cls into *slot: O(1) amortized (a chunk is
 * taken from the arena when the class has none free). VQKV_ENOMEM when the
 * class is full and the arena has no chunk left: the store evicts then.
 * VQKV_EINVAL for an unknown class. */
int vqkvd_pool_alloc(vqkvd_pool_t *p, uint32_t cls, uint64_t *slot);

/* Gives a slot back to its class: O(1). VQKV_EINVAL for a handle that is
 * not an allocated slot (unknown, or freed already). */
int vqkvd_pool_free(vqkvd_pool_t *p, uint64_t slot);

/* The class of an allocated slot, or VQKV_EINVAL. */
int vqkvd_pool_slot_class(const vqkvd_pool_t *p, uint64_t slot);

/* Where a slot lives: host pointer (NULL when the handle is not valid or
 * the backend is not host memory) and offset in the arena (UINT64_MAX when
 * not valid); on the CPU backend the offset is the memfd's file offset. */
void *vqkvd_pool_slot_ptr(const vqkvd_pool_t *p, uint64_t slot);
uint64_t vqkvd_pool_slot_offset(const vqkvd_pool_t *p, uint64_t slot);

/* The arena's memfd (CPU backend) or -1. Owned by the pool. */
int vqkvd_pool_fd(const vqkvd_pool_t *p);

void vqkvd_pool_stats(const vqkvd_pool_t *p, vqkvd_pool_stats_t *st);

/* Bytes a slot of class cls takes (0 for an unknown class). */
uint32_t vqkvd_pool_class_slot_bytes(const vqkvd_pool_t *p, uint32_t cls);

#endif
