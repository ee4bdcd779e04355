/* kbody.h -- the bodies of the GPU codec kernels, compiled for the device by
 * nvcc (kernels.cu wraps each in a __global__ function) and for the host by
 * the C compiler (the tests' emulator runs them over a whole launch).
 *
 * A body takes its grid and thread indices as arguments and does one unit
 * of a batch (kplan.h), with no shared memory and no cooperation between
 * threads: each unit reads what it needs and writes bytes no other unit
 * writes. That is what lets the emulator run the units one after another
 * and still be the GPU's launch, and what makes the ownership rules below
 * matter:
 *   decode         a unit is (vector, VQ group) or (vector, 8 channels);
 *                  it writes only its channels of its vector.
 *   encode prep    VQ with block means or escapes: one unit per part picks
 *                  the escapes and writes the part's block means and escape
 *                  entries, as the CPU codec does (codec_vq.c); O(T*H*D) on
 *                  one thread, paid only by codecs that ask for bc or esc.
 *   encode         a unit is a run of vectors whose codes fill whole bytes
 *                  (vqkv_kplan_run), or for KIVI keys one code byte's
 *                  channels of one head over all tokens; it zeroes and
 *                  fills only its own bytes.
 * Every float operation is the CPU codec's, in its order, each rounded on
 * its own (VQKV_FMUL and friends are __fmul_rn and friends on the device;
 * the C build has -ffp-contract=off), with numeric.h's conversions, so
 * decode gives the CPU's bytes and encode the CPU's codes.
 */
#ifndef VQKV_KBODY_H
#define VQKV_KBODY_H

#include "../bitpack.h"
#include "../numeric.h"
#include "kplan.h"

#include <math.h>

#ifdef __CUDACC__
#define VQKV_KB __host__ __device__ inline
#else
#define VQKV_KB static inline
#endif

#ifdef __CUDA_ARCH__
#define VQKV_FMUL(a, b) __fmul_rn((a), (b))
#define VQKV_FADD(a, b) __fadd_rn((a), (b))
#define VQKV_FSUB(a, b) __fsub_rn((a), (b))
#define VQKV_FDIV(a, b) __fdiv_rn((a), (b))
#define VQKV_FSQRT(a) __fsqrt_rn(a)
#else
#define VQKV_FMUL(a, b) ((a) * (b))
#define VQKV_FADD(a, b) ((a) + (b))
#define VQKV_FSUB(a, b) ((a) - (b))
#define VQKV_FDIV(a, b) ((a) / (b))
#define VQKV_FSQRT(a) sqrtf(a)
#endif

#define VQKV_KFLT_MAX 3.40282347e+38f
#define VQKV_KMAX_STAGES 8
/* An escape entry: u32 vector index, f16 scale, e4m3[D]. */
#define VQKV_KESCAPE_BYTES(D) (6u + (D))

/* ---- memory ------------------------------------------------------------ */

VQKV_KB uint16_t vqkv__kget_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

VQKV_KB void vqkv__kput_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

VQKV_KB float vqkv__kget_f16(const uint8_t *p)
{
    return vqkv_f16_to_f32(vqkv__kget_u16(p));
}

/* An element of worker memory. vqkv_kbatch_check has made every element
 * address a multiple of its size, so the device does one load or store of
 * the element's width; the host goes through memcpy, which compiles to the
 * same and keeps C's aliasing rules. */
VQKV_KB float vqkv__kload(vqkv_dtype_t dtype, const uint8_t *p)
{
    uint16_t h = 0;
    uint32_t u = 0;
#ifdef __CUDA_ARCH__
    h = dtype == VQKV_DTYPE_F32 ? 0 : *(const uint16_t *)p;
    u = dtype == VQKV_DTYPE_F32 ? *(const uint32_t *)p : 0;
#else
    memcpy(&h, p, sizeof h);
    memcpy(&u, p, dtype == VQKV_DTYPE_F32 ? sizeof u : 0);
#endif
    switch (dtype) {
    case VQKV_DTYPE_F16: return vqkv_f16_to_f32(h);
    case VQKV_DTYPE_BF16: return vqkv_bf16_to_f32(h);
    default: return vqkv_bits_to_f32(u);
    }
}

VQKV_KB void vqkv__kstore_bits(uint8_t *p, uint32_t bits, uint32_t size)
{
#ifdef __CUDA_ARCH__
    if (size == 4)
        *(uint32_t *)p = bits;
    else
        *(uint16_t *)p = (uint16_t)bits;
#else
    uint16_t h = (uint16_t)bits;
    if (size == 4)
        memcpy(p, &bits, sizeof bits);
    else
        memcpy(p, &h, sizeof h);
#endif
}

VQKV_KB void vqkv__kstore(vqkv_dtype_t dtype, uint8_t *p, float x)
{
    switch (dtype) {
    case VQKV_DTYPE_F16: vqkv__kstore_bits(p, vqkv_f32_to_f16(x), 2); return;
    case VQKV_DTYPE_BF16: vqkv__kstore_bits(p, vqkv_f32_to_bf16(x), 2); return;
    default: vqkv__kstore_bits(p, vqkv_f32_to_bits(x), 4);
    }
}

/* ---- units --------------------------------------------------------------- */

/* One unit of a launch: which block, layer and side it works on, and where
 * that part sits in worker memory (tile) and in the store (part). */
typedef struct {
    uint32_t block;
    uint32_t layer;
    int kv;
    uint32_t unit; /* within the part */
    uint8_t *tile;
    uint8_t *part;
    vqkv_dtype_t dtype;
    uint32_t esize;
    uint64_t token_stride;
    uint64_t head_stride;
} vqkv_kunit_t;

/* Finds the unit of thread (block_idx, thread_idx); 0 past the batch's end. */
VQKV_KB int vqkv__kunit_at(const vqkv_kbatch_t *b, uint32_t block_idx, uint32_t block_dim,
                           uint32_t thread_idx, vqkv_kunit_t *u)
{
    uint64_t i = (uint64_t)block_idx * block_dim + thread_idx;
    if (i >= b->total)
        return 0;
    const vqkv_kplan_t *p = b->plan;
    uint64_t per_layer = (uint64_t)b->units[0] + b->units[1];
    uint64_t per_block = per_layer * p->layout.num_layers;
    u->block = (uint32_t)(i / per_block);
    uint64_t r = i % per_block;
    u->layer = (uint32_t)(r / per_layer);
    r %= per_layer;
    u->kv = r >= b->units[0];
    u->unit = (uint32_t)(u->kv ? r - b->units[0] : r);
    u->tile = b->worker + b->view.offset + u->layer * b->view.layer_stride +
              (uint64_t)u->kv * b->view.kv_stride + b->slots[u->block] * b->view.slot_stride;
    u->part = b->store + b->store_at[u->block] + u->layer * (p->part_bytes[0] + p->part_bytes[1]) +
              (u->kv ? p->part_bytes[0] : 0);
    u->dtype = p->layout.dtype;
    u->esize = u->dtype == VQKV_DTYPE_F32 ? 4u : 2u;
    u->token_stride = b->view.token_stride;
    u->head_stride = b->view.head_stride;
    return 1;
}

/* Element (t, h, c) of the unit's tile. */
VQKV_KB uint8_t *vqkv__kelem(const vqkv_kunit_t *u, uint32_t t, uint32_t h, uint32_t c)
{
    return u->tile + t * u->token_stride + h * u->head_stride + (uint64_t)c * u->esize;
}

VQKV_KB float vqkv__kget(const vqkv_kunit_t *u, uint32_t t, uint32_t h, uint32_t c)
{
    return vqkv__kload(u->dtype, vqkv__kelem(u, t, h, c));
}

VQKV_KB void vqkv__kzero(uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        p[i] = 0;
}

/* ---- fp16, fp8, KIVI -------------------------------------------------------- */

/* The fp8 row of vector (t, h) as an f16 scale (amax / 448) and e4m3
 * codes; reads the vector twice rather than holding it. */
VQKV_KB void vqkv__kfp8_row_encode(const vqkv_kunit_t *u, uint32_t D, uint32_t t, uint32_t h,
                                   uint8_t *scale_out, uint8_t *codes)
{
    float amax = 0.0f;
    for (uint32_t c = 0; c < D; c++)
        amax = fmaxf(amax, fabsf(vqkv__kget(u, t, h, c)));
    uint16_t scale_h = vqkv_f32_to_f16(fminf(VQKV_FDIV(amax, VQKV_E4M3_MAX), VQKV_F16_MAX));
    float scale = vqkv_f16_to_f32(scale_h);
    vqkv__kput_u16(scale_out, scale_h);
    for (uint32_t c = 0; c < D; c++)
        codes[c] = scale > 0.0f ? vqkv_f32_to_e4m3(VQKV_FDIV(vqkv__kget(u, t, h, c), scale)) : 0;
}

VQKV_KB float vqkv__kfp8_value(const uint8_t *scale_in, uint8_t code)
{
    return VQKV_FMUL(vqkv_e4m3_to_f32(code), vqkv__kget_f16(scale_in));
}

/* KIVI quantization groups of side kv (kernels/README.md). */
VQKV_KB uint64_t vqkv__kkivi_groups(const vqkv_kplan_t *p, int kv)
{
    const vqkv_layout_t *l = &p->layout;
    if (kv == 0)
        return (uint64_t)l->num_kv_heads * l->head_dim;
    return (uint64_t)l->block_tokens * l->num_kv_heads * (l->head_dim / p->group);
}

/* Stores the f16 minimum and step of [lo, hi] for group g and returns them. */
VQKV_KB void vqkv__kkivi_range(const vqkv_kplan_t *p, uint8_t *part, uint64_t groups, uint64_t g,
                               float lo, float hi, float *min, float *step)
{
    float levels = (float)((1u << p->bits) - 1u);
    uint16_t min_h = vqkv_f32_to_f16(lo);
    uint16_t step_h = vqkv_f32_to_f16(fminf(VQKV_FDIV(VQKV_FSUB(hi, lo), levels), VQKV_F16_MAX));
    vqkv__kput_u16(part + 2 * g, min_h);
    vqkv__kput_u16(part + 2 * groups + 2 * g, step_h);
    *min = vqkv_f16_to_f32(min_h);
    *step = vqkv_f16_to_f32(step_h);
}

VQKV_KB uint32_t vqkv__kkivi_code(float x, float min, float step, uint32_t bits)
{
    if (!(step > 0.0f))
        return 0;
    float q = nearbyintf(VQKV_FDIV(VQKV_FSUB(x, min), step));
    float top = (float)((1u << bits) - 1u);
    return (uint32_t)(q > 0.0f ? (q > top ? top : q) : 0.0f); /* NaN gives 0 */
}

/* Decode unit (vector, chunk of VQKV_KDECODE_CHANNELS channels). */
VQKV_KB void vqkv__kdecode_flat(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim;
    uint32_t chunks = (D + VQKV_KDECODE_CHANNELS - 1) / VQKV_KDECODE_CHANNELS;
    uint32_t v = u->unit / chunks, t = v / H, h = v % H;
    uint32_t c0 = (u->unit % chunks) * VQKV_KDECODE_CHANNELS;
    uint32_t c1 = c0 + VQKV_KDECODE_CHANNELS < D ? c0 + VQKV_KDECODE_CHANNELS : D;
    uint64_t vectors = (uint64_t)p->layout.block_tokens * H;
    uint64_t groups = p->kind == VQKV_KIND_KIVI ? vqkv__kkivi_groups(p, u->kv) : 0;
    for (uint32_t c = c0; c < c1; c++) {
        uint64_t i = (uint64_t)v * D + c;
        uint8_t *dst = vqkv__kelem(u, t, h, c);
        float x;
        if (p->kind == VQKV_KIND_FP16) {
            if (u->dtype == VQKV_DTYPE_F16) { /* bits as stored, NaN payloads too */
                vqkv__kstore_bits(dst, vqkv__kget_u16(u->part + 2 * i), 2);
                continue;
            }
            x = vqkv__kget_f16(u->part + 2 * i);
        } else if (p->kind == VQKV_KIND_FP8) {
            x = vqkv__kfp8_value(u->part + 2 * (uint64_t)v, u->part[2 * vectors + i]);
        } else {
            uint64_t g = u->kv == 0 ? (uint64_t)h * D + c : i / p->group;
            float min = vqkv__kget_f16(u->part + 2 * g);
            float step = vqkv__kget_f16(u->part + 2 * groups + 2 * g);
            uint32_t q = vqkv__bits_get(u->part + 4 * groups, i * p->bits, p->bits);
            x = VQKV_FADD(VQKV_FMUL((float)q, step), min);
        }
        vqkv__kstore(u->dtype, dst, x);
    }
}

/* Encode unit: one vector of fp16 or fp8. */
VQKV_KB void vqkv__kencode_vector(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim;
    uint32_t v = u->unit, t = v / H, h = v % H;
    if (p->kind == VQKV_KIND_FP8) {
        uint64_t vectors = (uint64_t)p->layout.block_tokens * H;
        vqkv__kfp8_row_encode(u, D, t, h, u->part + 2 * (uint64_t)v,
                              u->part + 2 * vectors + (uint64_t)v * D);
        return;
    }
    uint8_t *out = u->part + (uint64_t)v * D * 2;
    for (uint32_t c = 0; c < D; c++) {
        const uint8_t *src = vqkv__kelem(u, t, h, c);
        if (u->dtype == VQKV_DTYPE_F16) {
            out[2 * c] = src[0];
            out[2 * c + 1] = src[1];
        } else {
            vqkv__kput_u16(out + 2 * c, vqkv_f32_to_f16(vqkv__kload(u->dtype, src)));
        }
    }
}

/* Encode unit of KIVI keys: channels [c0, c1) of heads [h0, h1) over all
 * tokens, per channel a range over the tokens, then its codes. */
VQKV_KB void vqkv__kencode_kivi_keys(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim, T = p->layout.block_tokens;
    uint64_t groups = vqkv__kkivi_groups(p, 0);
    uint8_t *codes = u->part + 4 * groups;
    uint32_t h0 = 0, h1 = H, c0 = 0, c1 = D;
    if ((uint64_t)D * p->bits % 8 == 0) {
        uint32_t per_byte = 8 / p->bits, per_head = D / per_byte;
        h0 = u->unit / per_head;
        h1 = h0 + 1;
        c0 = (u->unit % per_head) * per_byte;
        c1 = c0 + per_byte;
        for (uint32_t t = 0; t < T; t++)
            codes[(((uint64_t)t * H + h0) * D + c0) * p->bits / 8] = 0;
    } else {
        vqkv__kzero(codes, vqkv__bits_bytes((uint64_t)T * H * D, p->bits));
    }
    for (uint32_t h = h0; h < h1; h++) {
        for (uint32_t c = c0; c < c1; c++) {
            float lo = 0.0f, hi = 0.0f, min, step;
            for (uint32_t t = 0; t < T; t++) {
                float x = vqkv__kget(u, t, h, c);
                lo = t == 0 ? x : vqkv_range_lo(lo, x);
                hi = t == 0 ? x : vqkv_range_hi(hi, x);
            }
            vqkv__kkivi_range(p, u->part, groups, (uint64_t)h * D + c, lo, hi, &min, &step);
            for (uint32_t t = 0; t < T; t++) {
                uint64_t i = ((uint64_t)t * H + h) * D + c;
                vqkv__bits_put(codes, i * p->bits, p->bits,
                               vqkv__kkivi_code(vqkv__kget(u, t, h, c), min, step, p->bits));
            }
        }
    }
}

/* Encode unit of KIVI values: a run of vectors, each in groups of
 * p->group channels with their own range. */
VQKV_KB void vqkv__kencode_kivi_values(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim;
    uint64_t vectors = (uint64_t)p->layout.block_tokens * H, vbits = (uint64_t)D * p->bits;
    uint64_t groups = vqkv__kkivi_groups(p, 1);
    uint8_t *codes = u->part + 4 * groups;
    uint64_t run = vqkv_kplan_run(vbits), v0 = u->unit * run;
    uint64_t v1 = v0 + run < vectors ? v0 + run : vectors;
    vqkv__kzero(codes + v0 * vbits / 8, (v1 * vbits + 7) / 8 - v0 * vbits / 8);
    for (uint64_t v = v0; v < v1; v++) {
        uint32_t t = (uint32_t)(v / H), h = (uint32_t)(v % H);
        for (uint32_t c0 = 0; c0 < D; c0 += p->group) {
            float lo = vqkv__kget(u, t, h, c0), hi = lo, min, step;
            for (uint32_t c = c0; c < c0 + p->group; c++) {
                float x = vqkv__kget(u, t, h, c);
                lo = vqkv_range_lo(lo, x);
                hi = vqkv_range_hi(hi, x);
            }
            vqkv__kkivi_range(p, u->part, groups, (v * D + c0) / p->group, lo, hi, &min, &step);
            for (uint32_t c = c0; c < c0 + p->group; c++)
                vqkv__bits_put(codes, (v * D + c) * p->bits, p->bits,
                               vqkv__kkivi_code(vqkv__kget(u, t, h, c), min, step, p->bits));
        }
    }
}

/* ---- VQ ------------------------------------------------------------------ */

/* Where a VQ part's fields start (kernels/README.md). */
typedef struct {
    uint64_t mean_bytes; /* f16 block means [H][D], keys with bc=1 only */
    uint8_t *norms;      /* f16 [vectors][branches] */
    uint8_t *codes;
    uint8_t *escapes;
} vqkv_kvq_part_t;

VQKV_KB vqkv_kvq_part_t vqkv__kvq_part(const vqkv_kplan_t *p, const vqkv_kunit_t *u)
{
    const vqkv_kside_t *side = &p->side[u->kv];
    uint64_t vectors = (uint64_t)p->layout.block_tokens * p->layout.num_kv_heads;
    vqkv_kvq_part_t f;
    f.mean_bytes =
        p->block_center && u->kv == 0 ? 2ull * p->layout.num_kv_heads * p->layout.head_dim : 0;
    f.norms = u->part + f.mean_bytes;
    f.codes = f.norms + 2 * vectors * side->n_branches;
    f.escapes = f.codes + vqkv__bits_bytes(vectors * side->codes, p->bits);
    return f;
}

/* Codebook set of (layer, head): one per layer, or one per head with ph=1. */
VQKV_KB uint64_t vqkv__kset_layer(const vqkv_kplan_t *p, uint32_t layer, uint32_t h)
{
    return (uint64_t)layer * p->sets + (p->sets > 1 ? h : 0);
}

/* First codeword float, and first norm, of codebook (group g, stage s). */
VQKV_KB uint64_t vqkv__kbook_words(const vqkv_kplan_t *p, uint64_t set_layer, int kv,
                                   const vqkv_kbranch_t *br, uint32_t g, uint32_t s)
{
    uint64_t per_set = p->side[0].wfloats + p->side[1].wfloats;
    return set_layer * per_set + (kv ? p->side[0].wfloats : 0) + br->first_wfloat +
           (((uint64_t)g * br->stages + s) << p->bits) * br->d;
}

VQKV_KB uint64_t vqkv__kbook_norms(const vqkv_kplan_t *p, uint64_t set_layer, int kv,
                                   const vqkv_kbranch_t *br, uint32_t g, uint32_t s)
{
    uint64_t per_set = p->side[0].words + p->side[1].words;
    return p->norms_at + set_layer * per_set + (kv ? p->side[0].words : 0) + br->first_word +
           (((uint64_t)g * br->stages + s) << p->bits);
}

/* mean[D] of (layer, kv, head); scale[D] follows it. */
VQKV_KB const float *vqkv__kstats(const vqkv_kbatch_t *b, uint32_t layer, int kv, uint32_t h)
{
    const vqkv_layout_t *l = &b->plan->layout;
    uint64_t index = ((uint64_t)layer * 2 + (uint64_t)kv) * l->num_kv_heads + h;
    return b->books + b->plan->stats_at + index * 2 * l->head_dim;
}

/* Decode unit (vector, group): the group's channels of one vector, from its
 * codes, or from its escape entry when it has one (the last entry naming it
 * wins, as on the CPU, where entries overwrite in order). */
VQKV_KB void vqkv__kdecode_vq(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    const vqkv_kside_t *side = &p->side[u->kv];
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim;
    uint32_t v = u->unit / side->groups, gi = u->unit % side->groups, t = v / H, h = v % H;
    uint32_t bi = side->n_branches > 1 && gi >= side->br[1].first_group ? 1 : 0;
    const vqkv_kbranch_t *br = &side->br[bi];
    uint32_t g = gi - br->first_group;
    vqkv_kvq_part_t f = vqkv__kvq_part(p, u);

    const uint8_t *escape = NULL;
    for (uint32_t i = 0; i < p->escapes; i++) {
        const uint8_t *e = f.escapes + (uint64_t)i * VQKV_KESCAPE_BYTES(D);
        uint32_t index =
            (uint32_t)e[0] | (uint32_t)e[1] << 8 | (uint32_t)e[2] << 16 | (uint32_t)e[3] << 24;
        if (index == v)
            escape = e;
    }
    uint64_t set_layer = vqkv__kset_layer(p, u->layer, h);
    const float *words[VQKV_KMAX_STAGES];
    for (uint32_t s = 0; s < br->stages; s++) {
        uint64_t pos = (uint64_t)v * side->codes + br->first_code + (uint64_t)g * br->stages + s;
        uint32_t code = vqkv__bits_get(f.codes, pos * p->bits, p->bits);
        words[s] =
            b->books + vqkv__kbook_words(p, set_layer, u->kv, br, g, s) + (uint64_t)code * br->d;
    }
    float norm = vqkv__kget_f16(f.norms + 2 * ((uint64_t)v * side->n_branches + bi));
    const float *mean = vqkv__kstats(b, u->layer, u->kv, h), *scale = mean + D;
    for (uint32_t j = 0; j < br->d; j++) {
        uint32_t c = br->chan[g * br->d + j];
        float x;
        if (escape != NULL) {
            x = vqkv__kfp8_value(escape + 4, escape[6 + c]);
        } else {
            float acc = 0.0f;
            for (uint32_t s = 0; s < br->stages; s++)
                acc = VQKV_FADD(acc, words[s][j]);
            x = VQKV_FMUL(acc, norm);
            if (p->channel_scale)
                x = VQKV_FADD(VQKV_FMUL(x, scale[c]), mean[c]);
            if (f.mean_bytes > 0)
                x = VQKV_FADD(x, vqkv__kget_f16(u->part + 2 * ((uint64_t)h * D + c)));
        }
        vqkv__kstore(u->dtype, vqkv__kelem(u, t, h, c), x);
    }
}

/* The codeword of a codebook nearest to x[d] by ||c||^2 - 2 x.c, ties to
 * the lower index: kmeans.c's search, operation for operation. */
VQKV_KB uint32_t vqkv__knearest(const float *x, const float *words, const float *norms, uint32_t d,
                                uint32_t k)
{
    float best_dist = VQKV_KFLT_MAX;
    uint32_t best = 0;
    for (uint32_t c = 0; c < k; c++) {
        float dist = norms[c];
        for (uint32_t j = 0; j < d; j++)
            dist = VQKV_FADD(dist, VQKV_FMUL(VQKV_FMUL(-2.0f, x[j]), words[(uint64_t)c * d + j]));
        if (dist < best_dist) {
            best_dist = dist;
            best = c;
        }
    }
    return best;
}

/* Encode unit: a run of vectors, each centered, standardized, normalized per
 * branch and coded group by group, stage by stage. */
VQKV_KB void vqkv__kencode_vq(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    const vqkv_kside_t *side = &p->side[u->kv];
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim;
    uint64_t vectors = (uint64_t)p->layout.block_tokens * H;
    uint64_t vbits = (uint64_t)side->codes * p->bits;
    uint64_t run = vqkv_kplan_run(vbits), v0 = u->unit * run;
    uint64_t v1 = v0 + run < vectors ? v0 + run : vectors;
    vqkv_kvq_part_t f = vqkv__kvq_part(p, u);
    float row[VQKV_MAX_HEAD_DIM], resid[VQKV_MAX_HEAD_DIM];

    vqkv__kzero(f.codes + v0 * vbits / 8, (v1 * vbits + 7) / 8 - v0 * vbits / 8);
    for (uint64_t v = v0; v < v1; v++) {
        uint32_t t = (uint32_t)(v / H), h = (uint32_t)(v % H);
        const float *mean = vqkv__kstats(b, u->layer, u->kv, h), *scale = mean + D;
        for (uint32_t c = 0; c < D; c++) {
            row[c] = vqkv__kget(u, t, h, c);
            if (f.mean_bytes > 0)
                row[c] = VQKV_FSUB(row[c], vqkv__kget_f16(u->part + 2 * ((uint64_t)h * D + c)));
            if (p->channel_scale)
                row[c] = VQKV_FDIV(VQKV_FSUB(row[c], mean[c]), scale[c]);
        }
        uint64_t set_layer = vqkv__kset_layer(p, u->layer, h);
        for (uint32_t bi = 0; bi < side->n_branches; bi++) {
            const vqkv_kbranch_t *br = &side->br[bi];
            float ss = 0.0f;
            for (uint32_t i = 0; i < br->n_channels; i++)
                ss = VQKV_FADD(ss, VQKV_FMUL(row[br->chan[i]], row[br->chan[i]]));
            float rms = VQKV_FSQRT(VQKV_FDIV(ss, (float)br->n_channels));
            uint16_t norm_h = vqkv_f32_to_f16(fminf(rms, VQKV_F16_MAX));
            float norm = vqkv_f16_to_f32(norm_h);
            vqkv__kput_u16(f.norms + 2 * (v * side->n_branches + bi), norm_h);
            for (uint32_t i = 0; i < br->n_channels; i++)
                resid[i] = norm > 0.0f ? VQKV_FDIV(row[br->chan[i]], norm) : 0.0f;
            for (uint32_t g = 0; g < br->groups; g++) {
                float *x = resid + (uint64_t)g * br->d;
                for (uint32_t s = 0; s < br->stages; s++) {
                    const float *words =
                        b->books + vqkv__kbook_words(p, set_layer, u->kv, br, g, s);
                    const float *norms =
                        b->books + vqkv__kbook_norms(p, set_layer, u->kv, br, g, s);
                    uint32_t code = vqkv__knearest(x, words, norms, br->d, 1u << p->bits);
                    uint64_t pos = v * side->codes + br->first_code + (uint64_t)g * br->stages + s;
                    vqkv__bits_put(f.codes, pos * p->bits, p->bits, code);
                    for (uint32_t j = 0; j < br->d; j++)
                        x[j] = VQKV_FSUB(x[j], words[(uint64_t)code * br->d + j]);
                }
            }
        }
    }
}

VQKV_KB int vqkv__klisted(const uint32_t *list, uint32_t n, uint32_t v)
{
    for (uint32_t i = 0; i < n; i++)
        if (list[i] == v)
            return 1;
    return 0;
}

/* Writes each head's f16 channel means over the part's tokens, those in
 * skip[n_skip] left out: a float sum in token order over the count. */
VQKV_KB void vqkv__kblock_means(const vqkv_kunit_t *u, uint32_t T, uint32_t H, uint32_t D,
                                const uint32_t *skip, uint32_t n_skip)
{
    for (uint32_t h = 0; h < H; h++) {
        uint32_t count = 0;
        for (uint32_t t = 0; t < T; t++)
            count += !vqkv__klisted(skip, n_skip, t * H + h);
        for (uint32_t c = 0; c < D; c++) {
            float sum = 0.0f;
            for (uint32_t t = 0; t < T; t++)
                if (!vqkv__klisted(skip, n_skip, t * H + h))
                    sum = VQKV_FADD(sum, vqkv__kget(u, t, h, c));
            float mean = count > 0 ? VQKV_FDIV(sum, (float)count) : 0.0f;
            mean = fminf(fmaxf(mean, -VQKV_F16_MAX), VQKV_F16_MAX);
            vqkv__kput_u16(u->part + 2 * ((uint64_t)h * D + c), vqkv_f32_to_f16(mean));
        }
    }
}

/* Encode prep unit (one per VQ part that has block means or escapes): the
 * escapes are the vectors farthest from their head's reference (the block
 * means for centered keys, the trained channel means otherwise), largest
 * first, ties to the lower index; the stored means leave them out. */
VQKV_KB void vqkv__kencode_prep(const vqkv_kbatch_t *b, const vqkv_kunit_t *u)
{
    const vqkv_kplan_t *p = b->plan;
    uint32_t H = p->layout.num_kv_heads, D = p->layout.head_dim, T = p->layout.block_tokens;
    vqkv_kvq_part_t f = vqkv__kvq_part(p, u);
    uint32_t escapes[8], n = 0;
    float dist[8];

    if (f.mean_bytes > 0)
        vqkv__kblock_means(u, T, H, D, escapes, 0);
    if (p->escapes == 0)
        return;
    for (uint32_t h = 0; h < H; h++) {
        const float *stats_mean = vqkv__kstats(b, u->layer, u->kv, h);
        for (uint32_t t = 0; t < T; t++) {
            float d2 = 0.0f;
            for (uint32_t c = 0; c < D; c++) {
                float ref = f.mean_bytes > 0 ? vqkv__kget_f16(u->part + 2 * ((uint64_t)h * D + c))
                                             : stats_mean[c];
                float diff = VQKV_FSUB(vqkv__kget(u, t, h, c), ref);
                d2 = VQKV_FADD(d2, VQKV_FMUL(diff, diff));
            }
            uint32_t v = t * H + h, at = n;
            while (at > 0 && (d2 > dist[at - 1] || (d2 == dist[at - 1] && v < escapes[at - 1])))
                at--;
            if (at >= p->escapes)
                continue;
            uint32_t keep = n < p->escapes ? n : p->escapes - 1;
            for (uint32_t i = keep; i > at; i--) {
                escapes[i] = escapes[i - 1];
                dist[i] = dist[i - 1];
            }
            escapes[at] = v;
            dist[at] = d2;
            n = keep + 1;
        }
    }
    if (f.mean_bytes > 0)
        vqkv__kblock_means(u, T, H, D, escapes, n);
    for (uint32_t i = 0; i < p->escapes; i++) {
        uint8_t *e = f.escapes + (uint64_t)i * VQKV_KESCAPE_BYTES(D);
        uint32_t v = i < n ? escapes[i] : 0xffffffffu;
        for (int k = 0; k < 4; k++)
            e[k] = (uint8_t)(v >> (8 * k));
        if (i < n)
            vqkv__kfp8_row_encode(u, D, v / H, v % H, e + 4, e + 6);
        else
            vqkv__kzero(e + 4, 2 + D);
    }
}

/* ---- k-means --------------------------------------------------------------- */

/* Assignment unit: point i's nearest centroid, as vqkv__nearest_scalar picks it,
 * and its squared distance, as kmeans.c sums it. */
VQKV_KB void vqkv_kassign_body(const vqkv_kassign_t *a, uint32_t block_idx, uint32_t block_dim,
                               uint32_t thread_idx)
{
    uint64_t i = (uint64_t)block_idx * block_dim + thread_idx;
    if (i >= a->n)
        return;
    const float *x = a->x + i * a->d;
    uint32_t c = vqkv__knearest(x, a->centroids, a->norms, a->d, a->k);
    const float *w = a->centroids + (uint64_t)c * a->d;
    float s = 0.0f;
    for (uint32_t j = 0; j < a->d; j++)
        s = VQKV_FADD(s, VQKV_FMUL(VQKV_FSUB(x[j], w[j]), VQKV_FSUB(x[j], w[j])));
    a->assign[i] = c;
    a->mind[i] = s;
}

/* ---- the bodies ---------------------------------------------------------------- */

VQKV_KB void vqkv_kdecode_body(const vqkv_kbatch_t *b, uint32_t block_idx, uint32_t block_dim,
                               uint32_t thread_idx)
{
    vqkv_kunit_t u;
    if (!vqkv__kunit_at(b, block_idx, block_dim, thread_idx, &u))
        return;
    if (b->kind == VQKV_KIND_VQ)
        vqkv__kdecode_vq(b, &u);
    else
        vqkv__kdecode_flat(b, &u);
}

VQKV_KB void vqkv_kencode_prep_body(const vqkv_kbatch_t *b, uint32_t block_idx, uint32_t block_dim,
                                    uint32_t thread_idx)
{
    vqkv_kunit_t u;
    if (vqkv__kunit_at(b, block_idx, block_dim, thread_idx, &u))
        vqkv__kencode_prep(b, &u);
}

VQKV_KB void vqkv_kencode_body(const vqkv_kbatch_t *b, uint32_t block_idx, uint32_t block_dim,
                               uint32_t thread_idx)
{
    vqkv_kunit_t u;
    if (!vqkv__kunit_at(b, block_idx, block_dim, thread_idx, &u))
        return;
    switch (b->kind) {
    case VQKV_KIND_FP16:
    case VQKV_KIND_FP8: vqkv__kencode_vector(b, &u); break;
    case VQKV_KIND_KIVI:
        if (u.kv == 0)
            vqkv__kencode_kivi_keys(b, &u);
        else
            vqkv__kencode_kivi_values(b, &u);
        break;
    case VQKV_KIND_VQ: vqkv__kencode_vq(b, &u); break;
    }
}

#endif
