/* codec_internal.h -- what the codec implementations share with codec.c.
 *
 * A codec compresses a block as layers x {K, V} independent parts: part
 * (layer, kv) is part_bytes[kv] bytes at offset
 *   layer * (part_bytes[0] + part_bytes[1]) + kv * part_bytes[0]
 * of the block. Each implementation supplies encode_part/decode_part over a
 * vqkv__tile_t, the [block_tokens][heads][head_dim] window of one (layer,
 * kv, slot) in worker memory, so codec.c alone deals with views and bounds.
 */
#ifndef VQKV_CODEC_INTERNAL_H
#define VQKV_CODEC_INTERNAL_H

#include "cuda/kplan.h"
#include "numeric.h"
#include "vqkv_codec.h"

#include <stdbool.h>

/* One (layer, kv, slot) in worker memory: element (t, h, d) lives at
 * base + t*token_stride + h*head_stride + d*element size. */
typedef struct {
    uint8_t *base;
    uint64_t token_stride;
    uint64_t head_stride;
    vqkv_dtype_t dtype;
} vqkv__tile_t;

/* One "key=value" of a spec string; values are unsigned or words. */
typedef struct {
    char key[16];
    char word[16];
    uint32_t num;
    bool is_num;
    bool used;
} vqkv__param_t;

#define VQKV__MAX_PARAMS 12

typedef struct {
    char name[16];
    vqkv__param_t p[VQKV__MAX_PARAMS];
    uint32_t n;
} vqkv__spec_t;

/* The part a batch decodes after the current one, and the current call's
 * share of the batch: a codec with codebooks may fetch that share of the
 * next part's codewords into cache while it decodes, so that they arrive
 * as a stream instead of as one cache miss per lookup. */
typedef struct {
    uint32_t layer;
    int kv;
    uint32_t share, shares;
} vqkv__ahead_t;

typedef struct vqkv__codec_ops {
    const char *name;
    /* Reads its parameters from spec, fills codec->part_bytes and
     * codec->spec, and allocates codec->state. */
    int (*init)(vqkv_codec_t *codec, vqkv__spec_t *spec);
    void (*free_state)(void *state);
    void (*encode_part)(const vqkv_codec_t *codec, uint32_t layer, int kv, const vqkv__tile_t *tile,
                        uint8_t *out);
    /* ahead: NULL where no part follows (vqkv__ahead_t). */
    void (*decode_part)(const vqkv_codec_t *codec, uint32_t layer, int kv, const uint8_t *in,
                        const vqkv__tile_t *tile, const vqkv__ahead_t *ahead);
    /* NULL for codecs without codebooks. */
    int (*train)(vqkv_codec_t *codec, uint32_t layer, int kv, const float *x, size_t n,
                 const vqkv_train_opts_t *opts);
    bool (*needs_training)(const vqkv_codec_t *codec);
    /* The codebooks as one float array, for the codebook file. */
    const float *(*books)(const vqkv_codec_t *codec, size_t *n_floats);
    /* Checks books (as many floats as books() reports, all finite) and
     * makes them the codec's: VQKV_OK, or VQKV_EFORMAT leaving the codec
     * as it was. */
    int (*books_install)(vqkv_codec_t *codec, const float *books);
    /* Fills the codec's kind and parameters into plan (kplan.h), whose
     * layout and sizes are set, and for codecs with codebooks allocates
     * *books in the plan's order. */
    int (*kplan)(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books);
} vqkv__codec_ops_t;

struct vqkv_codec {
    const vqkv__codec_ops_t *ops;
    vqkv_layout_t layout;
    char spec[96];
    size_t part_bytes[2];
    size_t block_bytes;
    void *state;
};

/* Spec parameters: each returns VQKV_ESPEC for a present but bad value. */
int vqkv__spec_num(vqkv__spec_t *spec, const char *key, uint32_t dflt, uint32_t lo, uint32_t hi,
                   uint32_t *out);
int vqkv__spec_word(vqkv__spec_t *spec, const char *key, const char *const *choices, uint32_t dflt,
                    uint32_t *out);

/* Rows of n values converted with this CPU's vector instructions
 * (numeric_x86.c), bit for bit numeric.h's results; false, with nothing
 * done, where there are none (or VQKV_CPU_SIMD=0 turned them off) or for
 * f32, so the caller converts one value at a time. Any alignment. */
bool vqkv__simd_enabled(void);
/* Whether AVX-512F is there and allowed too (VQKV_CPU_SIMD=avx2 stops at
 * AVX2). */
bool vqkv__simd_avx512(void);
/* Whether AVX-512 VNNI is there and allowed too (VQKV_CPU_SIMD=avx512
 * stops before it): the batch search's integer screen. */
bool vqkv__simd_vnni(void);
/* Whether the CPU has FMA as well, which the AVX2 batch search needs. */
bool vqkv__simd_fma(void);
bool vqkv__rows_to_f32(vqkv_dtype_t dtype, const void *src, size_t n, float *dst);
bool vqkv__rows_from_f32(vqkv_dtype_t dtype, const float *src, size_t n, void *dst);

/* Token-head vectors in worker memory, converted through float. */
void vqkv__tile_load(const vqkv__tile_t *tile, uint32_t t, uint32_t h, uint32_t n, float *out);
void vqkv__tile_store(const vqkv__tile_t *tile, uint32_t t, uint32_t h, uint32_t n,
                      const float *in);

static inline void vqkv__put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline uint16_t vqkv__get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* The channels (*re, *im) of RoPE pair p in a head of D channels: (p,
 * p + D/2) rotate-half, (2p, 2p + 1) interleaved. */
static inline void vqkv__rope_pair(vqkv_rope_style_t style, uint32_t D, uint32_t p, uint32_t *re,
                                   uint32_t *im)
{
    *re = style == VQKV_ROPE_NEOX ? p : 2 * p;
    *im = style == VQKV_ROPE_NEOX ? p + D / 2 : 2 * p + 1;
}

/* One row of n values as an f16 scale (amax / 448) and n e4m3 codes: the
 * fp8 codec's vectors, and the VQ codecs' escape vectors. */
void vqkv__fp8_row_encode(const float *row, uint32_t n, uint8_t *scale_out, uint8_t *codes);
void vqkv__fp8_row_decode(const uint8_t *scale_in, const uint8_t *codes, uint32_t n, float *row);

extern const vqkv__codec_ops_t vqkv__fp16_ops;
extern const vqkv__codec_ops_t vqkv__fp8_ops;
extern const vqkv__codec_ops_t vqkv__kivi2_ops;
extern const vqkv__codec_ops_t vqkv__kivi4_ops;
extern const vqkv__codec_ops_t vqkv__rvq_ops;
extern const vqkv__codec_ops_t vqkv__vqkv_ops;
extern const vqkv__codec_ops_t vqkv__commvq_ops;

#endif
