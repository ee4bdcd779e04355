/* staging.h -- puts that do not wait for their encode.
 *
 * With a backend whose regions are host memory (the CPU backend), a Put
 * copies each new block out of the worker's region into a stage, commits
 * the blocks and replies; a background job then encodes them from the
 * stage into their pool slots (jobs.c). The copy is the worker's own bytes
 * in the worker's dtype; until the encode is done a Get encodes from the
 * stage itself and decodes that (the bytes a Get returns never depend on
 * when the encode runs), and lookups find the blocks like any other.
 *
 * A stage is one Put's new blocks in one allocation, block after block,
 * each laid out [layer][K|V][token][head][dim] (a vqkv_kv_view_t of n
 * slots, so the codecs encode from it as from any region). It lives while
 * its encode job or a Get reading it holds a reference.
 *
 * Staging is bounded by cfg.staging_bytes (live on reload). A Put whose
 * blocks do not fit in what is left is encoded before its reply, as
 * without staging: it waits for its encode, it is never dropped or
 * refused for want of staging. 0 turns staging off.
 *
 * Single-threaded like the store: stages are made and released on the
 * loop; vqkvd_stage_copy runs on the thread pool.
 */
#ifndef VQKVD_STAGING_H
#define VQKVD_STAGING_H

#include <stdbool.h>
#include <stdint.h>

#include "vqkv_codec.h"

typedef struct vqkvd_staging vqkvd_staging_t;

typedef struct vqkvd_stage {
    vqkvd_staging_t *staging;
    uint64_t number;                   /* stages are numbered as made, from 1 */
    struct vqkvd_stage *older, *newer; /* the unencoded stages, oldest first */
    uint32_t refs; /* its encode job (or the Put copying into it) and each Get reading it */
    uint32_t n;    /* blocks */
    uint64_t bytes;
    int encoded;         /* its blocks are in their pool slots: they left the backlog */
    vqkv_kv_view_t view; /* n slots of one block each, at mem */
    uint8_t *mem;
    /* Blocks evicted for room before their encode was done, by stage
     * slot: their codes go to the disk tier when it is (tiers.h); NULL
     * until one is. */
    struct vqkvd_stage_evicted {
        bool evicted;
        bool has_parent;
        uint8_t parent[32];
    } * evicted;
} vqkvd_stage_t;

struct vqkvd_staging {
    uint64_t made;                     /* the last stage's number */
    vqkvd_stage_t *unencoded, *newest; /* stages not yet encoded, oldest first */
    uint64_t bytes;                    /* held by stages now */
    uint64_t backlog;                  /* blocks staged and not yet encoded */
    uint64_t puts_staged;              /* puts that replied before their encode */
    uint64_t puts_full;                /* puts encoded before their reply: staging was full */
};

/* A stage for n blocks of layout, counted against limit_bytes (the
 * configuration's, which a reload may change) with a reference for the
 * caller; NULL when staging is off (limit 0), when the blocks do not fit
 * under the limit (puts_full counts it) or without memory. */
vqkvd_stage_t *vqkvd_stage_new(vqkvd_staging_t *st, uint64_t limit_bytes,
                               const vqkv_layout_t *layout, uint32_t n);
void vqkvd_stage_ref(vqkvd_stage_t *sg);
/* The number of the oldest stage not yet encoded, or made + 1 when every
 * stage is: a flush waits for the stages made before it. O(1). */
uint64_t vqkvd_staging_oldest_unencoded(const vqkvd_staging_t *st);
/* Its blocks are encoded: they leave the backlog (as they do when a stage
 * goes unencoded, its Put failed). */
void vqkvd_stage_encoded(vqkvd_stage_t *sg);
/* Drops a reference; the last one frees the stage and its bytes. */
void vqkvd_stage_unref(vqkvd_stage_t *sg);

/* Copies layers [first_layer, end_layer) of one block of layout from slot
 * from_slot of (from, from_base) to slot to_slot of (to, to_base), bytes
 * unchanged. Both views are checked already. O(values); a whole (layer,
 * K|V) part in one memcpy where both views keep it contiguous. */
void vqkvd_stage_copy(const vqkv_layout_t *layout, const vqkv_kv_view_t *from,
                      const uint8_t *from_base, uint32_t from_slot, const vqkv_kv_view_t *to,
                      uint8_t *to_base, uint32_t to_slot, uint32_t first_layer, uint32_t end_layer);

#endif
