/* kplan.c -- codecs turned into kernel plans, requests checked and cut into
 * launch units. Host code only, built with or without CUDA: the CPU
 * emulator of the tests uses it exactly as the CUDA launcher does.
 *
 * Each codec fills its own part of the plan through its ops' kplan hook
 * (codec_scalar.c, codec_vq.c), so this file never learns a codec's state.
 */
#include "kplan.h"

#include "../codec_internal.h"

#include <string.h>

int vqkv_kplan_build(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books)
{
    if (codec == NULL || plan == NULL || books == NULL)
        return VQKV_EINVAL;
    if (vqkv_codec_needs_training(codec))
        return VQKV_ENOCODEBOOK;
    memset(plan, 0, sizeof *plan);
    *books = NULL;
    plan->layout = codec->layout;
    plan->part_bytes[0] = codec->part_bytes[0];
    plan->part_bytes[1] = codec->part_bytes[1];
    plan->block_bytes = codec->block_bytes;
    return codec->ops->kplan(codec, plan, books);
}

static uint64_t vqkv__ceil_div(uint64_t a, uint64_t b)
{
    return (a + b - 1) / b;
}

/* Units of one (layer, kv) part; kbody.h says what each unit does. */
static uint64_t vqkv__kplan_units(const vqkv_kplan_t *plan, vqkv_kernel_t kernel, int kv)
{
    const vqkv_layout_t *l = &plan->layout;
    uint64_t vectors = (uint64_t)l->block_tokens * l->num_kv_heads;
    uint64_t vector_bits = (uint64_t)l->head_dim * plan->bits;
    switch (kernel) {
    case VQKV_KERNEL_DECODE:
        if (plan->kind == VQKV_KIND_VQ)
            return vectors * plan->side[kv].groups;
        return vectors * vqkv__ceil_div(l->head_dim, VQKV_KDECODE_CHANNELS);
    case VQKV_KERNEL_ENCODE_PREP:
        if (plan->kind != VQKV_KIND_VQ)
            return 0;
        return plan->escapes > 0 || (kv == 0 && plan->block_center) ? 1 : 0;
    case VQKV_KERNEL_ENCODE:
        switch (plan->kind) {
        case VQKV_KIND_FP16:
        case VQKV_KIND_FP8: return vectors;
        case VQKV_KIND_KIVI:
            if (kv == 1)
                return vqkv__ceil_div(vectors, vqkv_kplan_run(vector_bits));
            /* A key unit is one code byte's channels of one head over all
             * tokens; rows that do not end on a byte make one unit. */
            return vector_bits % 8 == 0 ? l->num_kv_heads * vector_bits / 8 : 1;
        case VQKV_KIND_VQ:
            return vqkv__ceil_div(vectors,
                                  vqkv_kplan_run((uint64_t)plan->side[kv].codes * plan->bits));
        }
    }
    return 0;
}

vqkv_kgeom_t vqkv_kbatch_prepare(vqkv_kbatch_t *batch, const vqkv_kplan_t *plan,
                                 vqkv_kernel_t kernel)
{
    vqkv_kgeom_t geom = {0, VQKV_KERNEL_THREADS, 0};
    uint64_t units[2] = {vqkv__kplan_units(plan, kernel, 0), vqkv__kplan_units(plan, kernel, 1)};
    batch->units[0] = (uint32_t)units[0];
    batch->units[1] = (uint32_t)units[1];
    batch->kind = plan->kind;
    batch->total = (uint64_t)batch->n_blocks * plan->layout.num_layers * (units[0] + units[1]);
    geom.grid = (uint32_t)vqkv__ceil_div(batch->total, VQKV_KERNEL_THREADS);
    return geom;
}

int vqkv_kbatch_check(const vqkv_kplan_t *plan, const vqkv_kv_view_t *view, const uint32_t *slots,
                      const uint64_t *store_at, uint32_t n_blocks, uint64_t store_bytes)
{
    if (plan == NULL || view == NULL || slots == NULL || store_at == NULL || n_blocks == 0)
        return VQKV_EINVAL;
    /* The largest launch must fit a grid of 2^31 - 1 blocks and units
     * numbered in 32 bits per part. */
    for (int kernel = VQKV_KERNEL_DECODE; kernel <= VQKV_KERNEL_ENCODE; kernel++) {
        for (int kv = 0; kv < 2; kv++)
            if (vqkv__kplan_units(plan, (vqkv_kernel_t)kernel, kv) > UINT32_MAX)
                return VQKV_EINVAL;
        uint64_t per_block =
            plan->layout.num_layers * (vqkv__kplan_units(plan, (vqkv_kernel_t)kernel, 0) +
                                       vqkv__kplan_units(plan, (vqkv_kernel_t)kernel, 1));
        if (per_block * n_blocks / VQKV_KERNEL_THREADS >= INT32_MAX)
            return VQKV_EINVAL;
    }
    /* Element-aligned views (what every engine's cache is), so kernels move
     * whole elements; the region's base is aligned by its allocator. */
    uint64_t esize = vqkv_dtype_size(plan->layout.dtype);
    /* Per-layer offsets live in host memory; the kernels read the view by
     * value, so they take strided layers only (for now). */
    if (view->layer_offsets != NULL)
        return VQKV_EINVAL;
    if (view->offset % esize != 0 || view->layer_stride % esize != 0 ||
        view->kv_stride % esize != 0 || view->slot_stride % esize != 0 ||
        view->token_stride % esize != 0 || view->head_stride % esize != 0)
        return VQKV_EINVAL;
    for (uint32_t i = 0; i < n_blocks; i++) {
        int rc = vqkv_kv_view_check(&plan->layout, view, slots[i]);
        if (rc != VQKV_OK)
            return rc;
        if (store_at[i] > store_bytes || store_bytes - store_at[i] < plan->block_bytes)
            return VQKV_ERANGE;
    }
    return VQKV_OK;
}

vqkv_kgeom_t vqkv_kassign_geometry(uint64_t n)
{
    vqkv_kgeom_t geom = {(uint32_t)vqkv__ceil_div(n, VQKV_KERNEL_THREADS), VQKV_KERNEL_THREADS, 0};
    return geom;
}
