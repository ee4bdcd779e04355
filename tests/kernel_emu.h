/* kernel_emu.h -- the GPU codec kernels run on the CPU: every body of
 * kernels/cuda/kbody.h executed for each (block, thread) of the geometry
 * vqkv_kbatch_prepare gives, after the same vqkv_kbatch_check the CUDA
 * launcher does. The bodies are the device code itself, compiled as C, so
 * what this runs is what a GPU runs, minus the parallel schedule: units
 * write disjoint bytes by design, and emu_run's `reverse` runs the threads
 * backwards to show that their order does not matter.
 */
#ifndef VQKV_KERNEL_EMU_H
#define VQKV_KERNEL_EMU_H

#include "cuda/kbody.h"
#include "kmeans.h"

typedef void (*emu_body_t)(const vqkv_kbatch_t *b, uint32_t block_idx, uint32_t block_dim,
                           uint32_t thread_idx);

static inline void emu_launch(emu_body_t body, const vqkv_kbatch_t *b, vqkv_kgeom_t geom,
                              int reverse)
{
    uint64_t threads = (uint64_t)geom.grid * geom.block;
    for (uint64_t i = 0; i < threads; i++) {
        uint64_t k = reverse ? threads - 1 - i : i;
        body(b, (uint32_t)(k / geom.block), geom.block, (uint32_t)(k % geom.block));
    }
}

/* One request as the CUDA launcher runs it: checked, then decoded, or
 * encoded (prep kernel, then encode kernel). */
typedef struct {
    const vqkv_kplan_t *plan;
    const float *books;
    uint8_t *store;
    uint64_t store_bytes;
    const uint64_t *store_at;
    uint8_t *worker;
    const vqkv_kv_view_t *view;
    const uint32_t *slots;
    uint32_t n_blocks;
} emu_request_t;

static inline int emu_run(const emu_request_t *r, int encode, int reverse)
{
    int rc =
        vqkv_kbatch_check(r->plan, r->view, r->slots, r->store_at, r->n_blocks, r->store_bytes);
    if (rc != VQKV_OK)
        return rc;
    vqkv_kbatch_t b;
    memset(&b, 0, sizeof b);
    b.plan = r->plan;
    b.books = r->books;
    b.store = r->store;
    b.store_at = r->store_at;
    b.worker = r->worker;
    b.slots = r->slots;
    b.view = *r->view;
    b.n_blocks = r->n_blocks;
    if (!encode) {
        emu_launch(vqkv_kdecode_body, &b, vqkv_kbatch_prepare(&b, r->plan, VQKV_KERNEL_DECODE),
                   reverse);
        return VQKV_OK;
    }
    emu_launch(vqkv_kencode_prep_body, &b,
               vqkv_kbatch_prepare(&b, r->plan, VQKV_KERNEL_ENCODE_PREP), reverse);
    emu_launch(vqkv_kencode_body, &b, vqkv_kbatch_prepare(&b, r->plan, VQKV_KERNEL_ENCODE),
               reverse);
    return VQKV_OK;
}

/* kmeans.h's assignment step by the device body, run over its geometry:
 * what vqkv_cuda_assigner launches. */
static inline int emu_assign(void *ctx, const float *x, size_t n, uint32_t d,
                             const float *centroids, const float *norms, uint32_t k,
                             uint32_t *assign, float *mind)
{
    (void)ctx;
    vqkv_kassign_t a = {x, centroids, norms, assign, mind, n, d, k};
    vqkv_kgeom_t g = vqkv_kassign_geometry(n);
    for (uint32_t bi = 0; bi < g.grid; bi++)
        for (uint32_t ti = 0; ti < g.block; ti++)
            vqkv_kassign_body(&a, bi, g.block, ti);
    return VQKV_OK;
}

#endif
