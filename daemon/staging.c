/* staging.c -- the stages of puts that reply before their encode
 * (staging.h): made and counted against the limit, copied into on the
 * thread pool, read by Encode and Get jobs, freed with their last
 * reference.
 *
 * A stage is one malloc of n blocks: a Put's blocks are a few MiB, which
 * glibc maps and unmaps on its own, so staging holds no memory between
 * bursts of puts. A pool of reusable stages would save those page faults
 * at the price of memory held while idle; not needed so far.
 */
#include "staging.h"

#include <stdlib.h>
#include <string.h>

vqkvd_stage_t *vqkvd_stage_new(vqkvd_staging_t *st, uint64_t limit_bytes,
                               const vqkv_layout_t *layout, uint32_t n)
{
    size_t es = vqkv_dtype_size(layout->dtype);
    uint64_t row = (uint64_t)layout->head_dim * es;
    uint64_t part = row * layout->num_kv_heads * layout->block_tokens;
    uint64_t block = part * 2 * layout->num_layers;
    if (limit_bytes == 0 || n == 0 || es == 0)
        return NULL;
    if (st->bytes > limit_bytes || (uint64_t)n * block > limit_bytes - st->bytes) {
        st->puts_full++;
        return NULL;
    }
    vqkvd_stage_t *sg = calloc(1, sizeof *sg);
    if (sg == NULL)
        return NULL;
    sg->mem = malloc((size_t)n * block);
    if (sg->mem == NULL) {
        free(sg);
        return NULL;
    }
    sg->staging = st;
    sg->refs = 1;
    sg->n = n;
    sg->bytes = (uint64_t)n * block;
    sg->view = (vqkv_kv_view_t){.region_bytes = sg->bytes,
                                .layer_stride = 2 * part,
                                .kv_stride = part,
                                .slot_stride = block,
                                .token_stride = row * layout->num_kv_heads,
                                .head_stride = row,
                                .num_slots = n};
    sg->number = ++st->made;
    sg->older = st->newest;
    if (st->newest != NULL)
        st->newest->newer = sg;
    else
        st->unencoded = sg;
    st->newest = sg;
    st->bytes += sg->bytes;
    st->backlog += n;
    st->puts_staged++;
    return sg;
}

void vqkvd_stage_ref(vqkvd_stage_t *sg)
{
    sg->refs++;
}

uint64_t vqkvd_staging_oldest_unencoded(const vqkvd_staging_t *st)
{
    return st->unencoded != NULL ? st->unencoded->number : st->made + 1;
}

void vqkvd_stage_encoded(vqkvd_stage_t *sg)
{
    vqkvd_staging_t *st = sg->staging;
    if (sg->encoded)
        return;
    st->backlog -= sg->n;
    if (sg->older != NULL)
        sg->older->newer = sg->newer;
    else
        st->unencoded = sg->newer;
    if (sg->newer != NULL)
        sg->newer->older = sg->older;
    else
        st->newest = sg->older;
    sg->encoded = 1;
}

void vqkvd_stage_unref(vqkvd_stage_t *sg)
{
    if (--sg->refs > 0)
        return;
    vqkvd_stage_encoded(sg);
    sg->staging->bytes -= sg->bytes;
    free(sg->evicted);
    free(sg->mem);
    free(sg);
}

void vqkvd_stage_copy(const vqkv_layout_t *layout, const vqkv_kv_view_t *from,
                      const uint8_t *from_base, uint32_t from_slot, const vqkv_kv_view_t *to,
                      uint8_t *to_base, uint32_t to_slot, uint32_t first_layer, uint32_t end_layer)
{
    size_t row = (size_t)layout->head_dim * vqkv_dtype_size(layout->dtype);
    uint32_t heads = layout->num_kv_heads, tokens = layout->block_tokens;
    /* A part is contiguous when its heads and then its tokens follow one
     * another: vLLM's layout and the stage's own. */
    int whole = from->head_stride == row && to->head_stride == row &&
                from->token_stride == row * heads && to->token_stride == row * heads;
    for (uint32_t l = first_layer; l < end_layer; l++) {
        for (uint32_t kv = 0; kv < 2; kv++) {
            const uint8_t *src = from_base + from->offset + vqkv_kv_view_layer(from, l) +
                                 kv * from->kv_stride + from_slot * from->slot_stride;
            uint8_t *dst = to_base + to->offset + vqkv_kv_view_layer(to, l) + kv * to->kv_stride +
                           to_slot * to->slot_stride;
            if (whole) {
                memcpy(dst, src, row * heads * tokens);
                continue;
            }
            for (uint32_t t = 0; t < tokens; t++)
                for (uint32_t h = 0; h < heads; h++)
                    memcpy(dst + t * to->token_stride + h * to->head_stride,
                           src + t * from->token_stride + h * from->head_stride, row);
        }
    }
}
